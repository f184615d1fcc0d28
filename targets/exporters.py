"""Exporters: how a compiled library becomes bundle files, one strategy per kind of target (a row of
:mod:`.table` holds one).

* :class:`SharedLibrary`: ``model.so`` loaded at run time by the C++ runner, with the TVM runtime for the
  target in ``lib/`` (x86, arm and the device tags refining them);
* :class:`WasmProgram`: the kernels as a system-lib object, linked with the runtime and the runner into
  ``runner.js`` + ``runner.wasm`` (:mod:`.wasm`);
* :class:`CudaLibrary`: the host ``model.so`` with the CUDA kernels embedded, plus their CUDA C source.

Each returns the manifest's ``library`` / ``runner`` / ``runtime`` fields and its README lines. Nothing here
imports tvm at module level (cross-compiling imports ``tvm.support.cc`` when it happens).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxprune import progress
from onnxprune.errors import UnsupportedModelError

from . import wasm
from .spec import Exporter, TargetSpec
from .toolchains import RUNNER_SOURCE, build_native_runner, require, runtime_libs

__all__ = ["CudaLibrary", "SharedLibrary", "WasmProgram"]


def _export_library(ex: Any, path: Path, spec: TargetSpec, why: str) -> None:
    """``ex.export_library``, through the row's cross compiler when the bundle's host is another machine."""
    if spec.arch == os.uname().machine:
        ex.export_library(str(path))
        return
    from tvm.support import cc

    ex.export_library(str(path), fcompile=cc.cross_compiler(require(spec.compiler, why)))


@dataclass(frozen=True)
class SharedLibrary(Exporter):
    """``model.so`` + the C++ runner + the target's TVM runtime in ``lib/`` (found through ``RPATH``)."""

    kind = "shared"

    def check_toolchain(self, spec: TargetSpec) -> None:
        runtime_libs(spec.arch)

    def write(self, ex: Any, out: Path, spec: TargetSpec) -> dict[str, object]:
        require(spec.compiler, f"to link {spec.name} code")
        libs = runtime_libs(spec.arch)  # fail before the (slow) link if the runtime is missing
        with progress.task("linking model.so"):
            _export_library(ex, out / "model.so", spec, f"to link {spec.name} code")
        (out / "lib").mkdir()
        for lib in libs:
            shutil.copy2(lib, out / "lib" / lib.name)
        shutil.copy2(RUNNER_SOURCE, out / "runner.cc")
        with progress.task("building the runner"):
            build_native_runner(spec, out / "runner", out / "lib")
        return {
            "library": "model.so",
            "runner": {"program": "runner", "source": "runner.cc", "kind": spec.runner.kind},
            "runtime": [f"lib/{p.name}" for p in libs],
        }

    def readme(self, inputs: str, weights_flag: str) -> list[str]:
        return [
            "Copy this whole folder to the device (it needs nothing else: `lib/` holds the TVM runtime), then:",
            "",
            "```sh",
            "mkdir -p out",
            f"./runner ./model.so out {inputs}{weights_flag}          # add --repeat 100 to print the median latency",
            "```",
            "",
            "Rebuild the runner on the device if needed: `g++ -O2 -std=c++17 -I<tvm_ffi>/include runner.cc "
            "-o runner -Wl,--no-as-needed -Llib -ltvm_runtime -ltvm_ffi -Wl,-rpath,'$ORIGIN/lib'`.",
        ]


@dataclass(frozen=True)
class WasmProgram(Exporter):
    """``runner.js`` + ``runner.wasm``: model, TVM runtime and runner linked by emscripten (:mod:`.wasm`)."""

    kind = "wasm"
    system_lib = True

    def write(self, ex: Any, out: Path, spec: TargetSpec) -> dict[str, object]:
        return wasm.export_wasm(ex, spec, out)

    def readme(self, inputs: str, weights_flag: str) -> list[str]:
        return [
            "`runner.wasm` holds the model, the TVM runtime and the runner; `runner.js` is the emscripten loader.",
            "",
            "```sh",
            "mkdir -p out",
            f"node --no-experimental-fetch runner.js system out {inputs}{weights_flag}",
            "```",
        ]


@dataclass(frozen=True)
class CudaLibrary(Exporter):
    """The host ``model.so`` with the CUDA kernels embedded, and their CUDA C source as ``model.cu``."""

    kind = "cuda"

    def write(self, ex: Any, out: Path, spec: TargetSpec) -> dict[str, object]:
        def walk(m):  # the CUDA module is imported by the host module, itself imported by the VM
            yield m
            for sub in m.imports:
                yield from walk(sub)

        dev = [m for m in walk(ex.mod) if m.kind == "cuda"]
        if not dev:
            raise UnsupportedModelError("TVM produced no CUDA device module")
        (out / "model.cu").write_text(dev[0].inspect_source(""))
        with progress.task("linking model.so"):
            _export_library(ex, out / "model.so", spec, f"to link the {spec.name} host code")
        return {
            "library": "model.so",
            "device_source": "model.cu",
            "runner": {"program": None, "kind": "cuda"},
            "runtime": [],
        }

    def readme(self, inputs: str, weights_flag: str) -> list[str]:
        return [
            "`model.so` is the host library with the CUDA kernels embedded; `model.cu` is their CUDA C source.",
            "Load it with the TVM runtime built with CUDA (`libtvm_runtime.so` + `libtvm_runtime_cuda.so`) and",
            "call `vm_load_executable`, `vm_initialization(kDLCUDA, 0, 2, kDLCPU, 0, 2)`, then `main`.",
        ]
