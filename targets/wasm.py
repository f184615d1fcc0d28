"""WebAssembly bundles: the model's wasm32 objects + the TVM runtime, linked by emscripten into one program.

The kernels build as wasm32 objects (``system_lib=True``). The TVM runtime (tvm-ffi + the Relax VM, from
the C++ sources the apache-tvm / apache-tvm-ffi wheels ship) is compiled once per machine with Debian's
emscripten into ``<runtime cache>/wasm32/libtvm_wasm_runtime.a``, using the minimal support headers in
``runners/wasm/shim`` (the wheel lacks them) and ``-fexceptions`` (TVM reports errors as C++ exceptions).
``runners/wasm/parallel_serial.cc`` runs parallel loops serially. The bundle's ``runner.js`` +
``runner.wasm`` run under node (``NODERAWFS``: plain file paths) with the same arguments as the C++ runner. The
runner's source is not shipped: it is linked into ``runner.wasm`` and a device cannot rebuild it alone.

:func:`time_functions` links any wasm executable the same way into a throw-away program and times some of its
functions under node (the runner's ``--time`` mode): how the per-layer dense-or-sparse choice
(:mod:`.tvm_sparse_choice`) measures layers for wasm.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from onnxprune import progress
from onnxprune.errors import ToolchainError

from .spec import TargetSpec
from .toolchains import RUNNER_SOURCE, RUNNERS_DIR, _package_dir, require, runtime_cache

if TYPE_CHECKING:
    import numpy as np

SHIM = RUNNERS_DIR / "wasm" / "shim"
SERIAL = RUNNERS_DIR / "wasm" / "parallel_serial.cc"
RUNTIME_SOURCES = [
    "runtime/module.cc", "runtime/tensor.cc", "runtime/memory/memory_manager.cc", "runtime/vm/builtin.cc",
    "runtime/vm/bytecode.cc", "runtime/vm/executable.cc", "runtime/vm/vm.cc", "runtime/file_utils.cc",
    "runtime/cpu_device_api.cc", "runtime/device_api.cc", "runtime/logging.cc", "runtime/workspace_pool.cc",
]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "NODE_PATH": os.environ.get("NODE_PATH", "/usr/share/nodejs")}


def _includes() -> list[str]:
    return [f"-I{SHIM}", f"-I{_package_dir('tvm_ffi') / 'include'}", f"-I{_package_dir('tvm') / 'include'}"]


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        errs = [ln for ln in proc.stderr.splitlines() if "error" in ln] or proc.stderr.splitlines() or ["?"]
        raise ToolchainError(f"{what} failed: {errs[0][:300]}")


def wasm_runtime(emcc: str) -> Path:
    """The emscripten-built TVM runtime archive, built on first use and cached."""
    out = runtime_cache() / "wasm32" / "libtvm_wasm_runtime.a"
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory(prefix="onnxprune-wasmrt-") as tmp:
        src = Path(tmp) / "src"  # copied, not symlinked: relative includes must resolve inside the copy
        shutil.copytree(_package_dir("tvm_ffi") / "src" / "ffi", src / "ffi")
        shutil.copytree(_package_dir("tvm") / "src" / "runtime", src / "runtime")
        shutil.copytree(SHIM / "support", src / "support")
        files = [p for p in sorted((src / "ffi").glob("*.cc")) + sorted((src / "ffi" / "extra").glob("*.cc"))
                 if p.name not in ("backtrace_win.cc", "library_module_dynamic_lib.cc")]  # fmt: skip
        files += [src / f for f in RUNTIME_SOURCES]
        flags = ["-O2", "-std=c++17", "-fexceptions", "-DTVM_FFI_USE_LIBBACKTRACE=0", f"-I{src}", *_includes()]

        def compile_one(f: Path) -> Path:
            obj = Path(tmp) / (str(f.relative_to(src)).replace("/", "_") + ".o")
            _run([emcc, *flags, "-c", str(f), "-o", str(obj)], f"emcc {f.name}")
            return obj

        from concurrent.futures import ThreadPoolExecutor

        with (
            progress.task("building the TVM runtime for wasm (once per machine)", total=len(files)) as job,
            ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool,
        ):
            objs = list(job.track(pool.map(compile_one, files)))
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp_ar = out.with_suffix(".tmp.a")
            _run([shutil.which("emar") or "emar", "rcs", str(tmp_ar), *map(str, objs)], "emar")
        tmp_ar.replace(out)
    return out


def _link(ex: object, spec: TargetSpec, out: Path) -> None:
    """Link the executable's wasm objects, the runtime and the runner into ``out/runner.js`` + ``runner.wasm``."""
    emcc = require(spec.compiler, f"to build {spec.name} bundles")
    require(spec.emulator, f"to run {spec.name} bundles")
    runtime = wasm_runtime(emcc)
    with tempfile.TemporaryDirectory(prefix="onnxprune-wasmobj-") as tmp:
        objs: list[str] = []

        def collect(output: str, objects: list[str], options: object = None, **_: object) -> None:
            for o in objects:
                dst = Path(tmp) / Path(o).name
                shutil.copy(o, dst)
                objs.append(str(dst))
            Path(output).write_bytes(b"")

        collect.output_format = "o"  # type: ignore[attr-defined]
        with progress.task("writing the model's wasm objects"):
            ex.export_library(str(Path(tmp) / "model.out"), fcompile=collect)  # type: ignore[attr-defined]
        cmd = [
            emcc, "-O2", "-std=c++17", "-fexceptions", *_includes(), str(RUNNER_SOURCE), str(SERIAL), *objs,
            "-Wl,--whole-archive", str(runtime), "-Wl,--no-whole-archive", "-s", "NODERAWFS=1",
            "-s", "ALLOW_MEMORY_GROWTH=1", "-s", "INITIAL_MEMORY=128MB", "-s", "DISABLE_EXCEPTION_CATCHING=0",
            "-o", str(out / "runner.js"),
        ]  # fmt: skip
        with progress.task("linking runner.wasm with emcc"):
            _run(cmd, "linking the wasm bundle with emcc")


def export_wasm(ex: object, spec: TargetSpec, out: Path) -> dict[str, object]:
    """Link the model objects, the runtime and the runner into ``runner.js`` + ``runner.wasm``."""
    _link(ex, spec, out)
    return {"library": "runner.wasm", "runner": {"program": "runner.js", "kind": "node"},
            "runtime": ["runner.wasm (TVM runtime linked in)"]}  # fmt: skip


def time_functions(
    ex: object, spec: TargetSpec, calls: list[tuple[str, int]], inputs: list[np.ndarray], rounds: int = 3
) -> dict[str, float]:
    """Microseconds per call of VM functions of ``ex`` (a wasm executable), timed under node.

    ``calls``: (function name, index into ``inputs``) pairs, each function taking that one input. The
    functions are timed interleaved inside one runner process (the runner's ``--time`` mode): ``5 * rounds``
    passes over the list, one batch (>= 5 ms) of each function per pass, each function's fastest batch kept
    (time per call): on a loaded machine other processes only add time.

    Raises:
        ToolchainError: emcc or node is missing, or the runner failed.
    """
    import numpy as np  # not at module level: the CLI's parser imports this module (start-up time)

    node = require(spec.emulator, f"to run {spec.name} code")
    with tempfile.TemporaryDirectory(prefix="onnxprune-wasmtime-") as tmp:
        d = Path(tmp)
        _link(ex, spec, d)
        paths = []
        for i, a in enumerate(inputs):
            paths.append(str(d / f"x{i}.npy"))
            np.save(paths[-1], np.ascontiguousarray(a))
        # --no-liftoff: V8 compiles every function with its optimising tier up front; otherwise the kernels
        # start in the baseline tier and are swapped for optimised code whenever a background compile
        # finishes (seconds on a loaded machine), so which variant ran optimised varied: a 90%-sparse layer
        # measured 0.4x, 0.8x and 2.4-6.8x in three runs
        cmd = [node, "--no-experimental-fetch", "--no-liftoff", str(d / "runner.js"), "system", str(d), *paths,
               "--time", ",".join(f"{name}:{i}" for name, i in calls), "--rounds", str(rounds)]  # fmt: skip
        with progress.task(f"timing {len(calls)} function(s) under node"):
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=d, timeout=3600)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ToolchainError(f"timing under node failed (exit {proc.returncode}): {last[:300]}")
    times = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "time_us":
            times[parts[1]] = float(parts[2])
    missing = [name for name, _ in calls if name not in times]
    if missing:
        raise ToolchainError(f"timing under node printed no time for {missing[0]}")
    return times
