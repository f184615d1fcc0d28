"""The ONE target table: every deployment target onnxprune compiles for is a row here.

A row (:class:`~.spec.TargetSpec`) says which TVM target to generate code for, which host the bundle's runner
runs on, which compiler links the library and the runner, how the library is exported (an
:class:`~.spec.Exporter` of :mod:`.exporters`) and how ``onnxprune run`` executes the bundle on this machine
(a :class:`~.spec.Runner` of :mod:`.launch`). Named device tags (``raspberry-pi-4``, ``jetson-orin``) are rows
too, refining a base target with a CPU or GPU model. Nothing here imports tvm: the backend turns a row into
TVM objects.

Start reading at :data:`TARGETS` and :func:`get_target`.
"""

from __future__ import annotations

from onnxprune.errors import UsageError

from .exporters import CudaLibrary, SharedLibrary, WasmProgram
from .launch import CudaRunner, NativeRunner, NodeRunner, QemuRunner
from .spec import HOST_CPU, TargetSpec, Toolchain

__all__ = ["TARGETS", "get_target", "target_names"]

_GXX = Toolchain("g++", "g++")
_AARCH64_GXX = Toolchain("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu")
_QEMU = Toolchain("qemu-aarch64-static", "qemu-user-static")
_EMCC = Toolchain("emcc", "emscripten")
_NODE = Toolchain("node", "nodejs")
_WASM_LD = Toolchain("wasm-ld", "lld")


def _arm(mcpu: str, **extra: object) -> dict[str, object]:
    return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu, **extra}


TARGETS: tuple[TargetSpec, ...] = (
    TargetSpec(
        name="x86",
        tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": HOST_CPU},
        arch="x86_64",
        exporter=SharedLibrary(),
        runner=NativeRunner(),
        compiler=_GXX,
        aliases=("x86_64", "x86-64", "host"),
        description="x86-64 Linux, tuned for the CPU of the compiling machine",
    ),
    TargetSpec(
        name="x86-avx2",
        tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"},
        arch="x86_64",
        exporter=SharedLibrary(),
        runner=NativeRunner(),
        compiler=_GXX,
        description="portable x86-64 Linux with AVX2/FMA (Haswell and newer)",
    ),
    TargetSpec(
        name="arm",
        tvm_target=_arm("generic", mattr=["+neon"]),
        arch="aarch64",
        exporter=SharedLibrary(),
        runner=QemuRunner(),
        compiler=_AARCH64_GXX,
        emulator=_QEMU,
        aliases=("aarch64", "arm64"),
        description="generic AArch64 Linux (NEON)",
    ),
    TargetSpec(
        name="raspberry-pi-4",
        tvm_target=_arm("cortex-a72", mattr=["+neon"]),
        arch="aarch64",
        exporter=SharedLibrary(),
        runner=QemuRunner(),
        compiler=_AARCH64_GXX,
        emulator=_QEMU,
        aliases=("rpi4",),
        description="Raspberry Pi 4 (Cortex-A72, 64-bit OS)",
    ),
    TargetSpec(
        name="raspberry-pi-5",
        tvm_target=_arm("cortex-a76", mattr=["+neon"]),
        arch="aarch64",
        exporter=SharedLibrary(),
        runner=QemuRunner(),
        compiler=_AARCH64_GXX,
        emulator=_QEMU,
        aliases=("rpi5",),
        description="Raspberry Pi 5 (Cortex-A76, 64-bit OS)",
    ),
    TargetSpec(
        name="wasm",
        # wasm32 SIMD is 128 bits; saying so spares LLVM's warning that it assumed it (once per query). +simd128:
        # without it the code is scalar (a 1x1 conv 256->256 at 28x28 under node: 59-71 ms scalar, 11-15.5 ms SIMD)
        tvm_target={"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm", "vector-width": 128,
                    "mattr": ["+simd128"]},
        arch="wasm32",
        exporter=WasmProgram(),
        runner=NodeRunner(),
        compiler=_EMCC,
        emulator=_NODE,
        aliases=("wasm32", "webassembly"),
        description="WebAssembly (wasm32), runs in node or a browser",
        extra_tools=(_WASM_LD,),
    ),
    TargetSpec(
        name="cuda",
        tvm_target={"kind": "cuda", "arch": "sm_80"},
        arch="x86_64",
        exporter=CudaLibrary(),
        runner=CudaRunner(),
        compiler=_GXX,
        description="NVIDIA GPU (sm_80), x86-64 host",
        gpu=True,
    ),
    TargetSpec(
        name="jetson-orin",
        tvm_target={"kind": "cuda", "arch": "sm_87"},
        arch="aarch64",
        exporter=CudaLibrary(),
        runner=CudaRunner(),
        compiler=_AARCH64_GXX,
        description="NVIDIA Jetson Orin (sm_87), AArch64 host; code generation only",
        gpu=True,
    ),
)

_BY_NAME = {alias: t for t in TARGETS for alias in (t.name, *t.aliases)}


def target_names() -> list[str]:
    """Every accepted name (canonical names first, then aliases)."""
    return [t.name for t in TARGETS] + [a for t in TARGETS for a in t.aliases]


def get_target(name: str) -> TargetSpec:
    """Look a target up by name or alias.

    Raises:
        UsageError: The name is not in the table.
    """
    try:
        return _BY_NAME[name.lower()]
    except KeyError:
        raise UsageError(
            f"unknown target {name!r}; choose one of: {', '.join(t.name for t in TARGETS)}"
        ) from None
