"""Which instruction-set extensions an x86 bundle's code may use, and whether this CPU has them.

An ``x86`` bundle is compiled for the CPU of the compiling machine (LLVM ``mcpu``, e.g. ``znver4``): its kernels
may use AVX-512. Run on a CPU without those extensions, the runner dies of SIGILL with no message. So the
compile records the extensions LLVM enables for the bundle's ``mcpu`` (``target.cpu_features`` in the manifest,
in ``/proc/cpuinfo``'s spelling), and ``onnxprune run`` compares them with this CPU's before starting the
runner: one line naming what is missing and the portable alternative (``--target x86-avx2``).

Only vector and bit-manipulation extensions that compiled kernels use are listed; tuning flags
(``fast-lzcnt``, ``macrofusion``) and system instructions are not features a program needs. Nothing here
imports tvm.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = ["LLVM_TO_CPUINFO", "host_cpu_flags", "missing_cpu_features", "recorded_features"]

#: LLVM feature name -> the flag ``/proc/cpuinfo`` shows for it.
LLVM_TO_CPUINFO: dict[str, str] = {
    "sse3": "pni",
    "ssse3": "ssse3",
    "sse4.1": "sse4_1",
    "sse4.2": "sse4_2",
    "popcnt": "popcnt",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "bmi": "bmi1",
    "bmi2": "bmi2",
    "lzcnt": "abm",
    "movbe": "movbe",
    "avxvnni": "avx_vnni",
    "avx512f": "avx512f",
    "avx512cd": "avx512cd",
    "avx512bw": "avx512bw",
    "avx512dq": "avx512dq",
    "avx512vl": "avx512vl",
    "avx512ifma": "avx512ifma",
    "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2",
    "avx512vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16",
    "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq",
    "avx512fp16": "avx512_fp16",
    "gfni": "gfni",
    "vaes": "vaes",
    "vpclmulqdq": "vpclmulqdq",
    "amx-tile": "amx_tile",
    "amx-int8": "amx_int8",
    "amx-bf16": "amx_bf16",
}

CPUINFO = Path("/proc/cpuinfo")


def recorded_features(llvm_features: Iterable[str]) -> list[str]:
    """The manifest's ``cpu_features``: LLVM's feature list for the target, kept to the listed extensions,
    in ``/proc/cpuinfo``'s spelling, sorted."""
    return sorted({LLVM_TO_CPUINFO[f] for f in llvm_features if f in LLVM_TO_CPUINFO})


def host_cpu_flags(cpuinfo: Path = CPUINFO) -> set[str] | None:
    """The ``flags`` of this machine's first CPU in ``/proc/cpuinfo``, or None where it cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return set(value.split())
    return None


def missing_cpu_features(required: Iterable[str], cpuinfo: Path = CPUINFO) -> list[str]:
    """The recorded features this CPU lacks (empty when it has them all or when its flags are unknown)."""
    have = host_cpu_flags(cpuinfo)
    if have is None:
        return []
    return sorted(f for f in required if f not in have)
