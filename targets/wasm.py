"""WebAssembly bundles (work in progress).

What exists: the kernels build as wasm32 objects (``system_lib=True``), and the TVM runtime (tvm-ffi +
Relax VM, from the C++ sources the wheels ship) compiles with Debian's emscripten using the minimal support
headers in ``runners/wasm/shim`` (the wheel lacks them) and the serial ``TVMBackendParallelLaunch`` in
``runners/wasm/parallel_serial.cc``; ``runners/tvm_runner.cc`` links against both into ``runner.js`` +
``runner.wasm``. Missing: the runtime must be built with ``-fexceptions`` (TVM reports errors as C++
exceptions; without it the first caught exception aborts), cached per tvm version, and wired in here.
"""

from __future__ import annotations

from pathlib import Path

from onnxprune.errors import ToolchainError

from .table import TargetSpec


def export_wasm(ex: object, spec: TargetSpec, out: Path) -> dict[str, object]:
    """Not finished yet: raise a one-line error instead of writing a bundle that cannot run."""
    raise ToolchainError(
        f"{spec.name} bundles are not available yet in this onnxprune version (the wasm runtime build is "
        "unfinished); use --target x86 or arm"
    )
