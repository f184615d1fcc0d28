"""Finding the external tools and TVM runtime libraries a target needs, and building bundle runners.

Every missing piece becomes a one-line :class:`ToolchainError` naming what to install. The TVM runtime for
the compiling machine's architecture comes from the installed ``apache-tvm`` / ``apache-tvm-ffi`` wheels; the
runtime for other architectures (aarch64) comes from the same wheels for that platform, downloaded and
unpacked by ``.ci/install-tvm.sh`` into :func:`runtime_cache`. Nothing here imports tvm.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
from pathlib import Path

from onnxprune.errors import ToolchainError

from .spec import TargetSpec, Toolchain

__all__ = [
    "RUNNER_SOURCE",
    "build_native_runner",
    "ffi_include_dir",
    "require",
    "runtime_cache",
    "runtime_libs",
    "tvm_version",
]

RUNNERS_DIR = Path(__file__).resolve().parent / "runners"
RUNNER_SOURCE = RUNNERS_DIR / "tvm_runner.cc"
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
TVM_PIN = "apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1"


def require(tool: Toolchain | None, why: str) -> str:
    """Path of a tool on PATH, or a ToolchainError naming the Debian package to install."""
    if tool is None:
        raise ToolchainError(f"no tool configured {why}")
    found = shutil.which(tool.program)
    if not found:
        raise ToolchainError(f"{tool.program} not found (needed {why}); apt-get install {tool.apt_package}")
    return found


def tvm_version() -> str:
    """Installed apache-tvm version, without importing tvm."""
    import importlib.metadata  # not at module level: the CLI's parser imports this module (start-up time)

    try:
        return importlib.metadata.version("apache-tvm")
    except importlib.metadata.PackageNotFoundError:
        raise ToolchainError(f"apache-tvm is not installed; pip install {TVM_PIN}") from None


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ToolchainError(f"python package {module} is not installed; pip install {TVM_PIN}")
    return Path(spec.origin).parent


def ffi_include_dir() -> Path:
    """The tvm-ffi C++ headers (tvm/ffi/*, dlpack) shipped in the apache-tvm-ffi wheel."""
    inc = _package_dir("tvm_ffi") / "include"
    if not (inc / "tvm" / "ffi" / "function.h").is_file():
        raise ToolchainError(f"tvm-ffi headers missing under {inc}; pip install --force-reinstall {TVM_PIN}")
    return inc


def runtime_cache() -> Path:
    """Folder holding TVM runtimes for other architectures (``<arch>/libtvm_runtime.so`` …)."""
    default = Path.home() / ".cache" / "onnxprune" / "tvm-runtime"
    return Path(os.environ.get("ONNXPRUNE_TVM_RUNTIME_CACHE", default))


def runtime_libs(arch: str) -> list[Path]:
    """``libtvm_runtime.so`` and ``libtvm_ffi.so`` built for ``arch``.

    Raises:
        ToolchainError: The runtime for that architecture is not available here.
    """
    if arch == platform.machine():
        libs = [_package_dir("tvm") / "lib" / RUNTIME_LIBS[0], _package_dir("tvm_ffi") / "lib" / RUNTIME_LIBS[1]]
    else:
        libs = [runtime_cache() / arch / name for name in RUNTIME_LIBS]
    missing = [p for p in libs if not p.is_file()]
    if missing:
        raise ToolchainError(
            f"TVM runtime for {arch} not found ({missing[0]}); run `bash .ci/install-tvm.sh` (it downloads "
            f"the {arch} wheels of {TVM_PIN} with pip download)"
        )
    return libs


def build_native_runner(spec: TargetSpec, out: Path, lib_dir: Path) -> None:
    """Compile the C++ runner for a shared-library target, linked against the runtime in ``lib_dir``.

    The runner finds the runtime through ``RPATH=$ORIGIN/lib``, so the bundle folder is self-contained.
    """
    cxx = require(spec.compiler, f"to build the {spec.name} runner")
    cmd = [
        cxx, "-O2", "-std=c++17", f"-I{ffi_include_dir()}", str(RUNNER_SOURCE), "-o", str(out),
        "-Wl,--no-as-needed", f"-L{lib_dir}", "-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN/lib",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise ToolchainError(f"building the {spec.name} runner with {spec.compiler.program} failed: {last}")
