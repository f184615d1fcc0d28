"""Tile arithmetic shared by the CPU schedules, the Winograd kernels and tuning: vector widths, register
files, and the register-tile shape of a GEMM-like reduction.

A leaf module (it imports only tvm): :mod:`.tvm_layout`, :mod:`.tvm_schedules`, :mod:`.tvm_winograd` and
:mod:`.tvm_tune` all take their tile shapes from here, so one rule decides them everywhere. Start reading at
:func:`register_tile`.
"""

from __future__ import annotations

import tvm
from tvm import tirx

__all__ = [
    "MAX_TILE_VECTORS",
    "const_int",
    "largest_divisor",
    "register_tile",
    "vector_lanes",
    "vector_registers",
]

#: Most weight vectors in one register tile row.
MAX_TILE_VECTORS = 4


def vector_lanes(target: tvm.target.Target, bits: int = 32) -> int:
    """float32 lanes of the target's SIMD registers (16 with AVX-512, 8 with AVX2, 4 with NEON/SSE)."""
    try:
        width = int(tvm.target.codegen.llvm_get_vector_width(target))
    except Exception:
        width = 128
    if width <= 0:
        width = 128
    return max(1, width // bits)


def vector_registers(target: tvm.target.Target) -> int:
    """SIMD registers of the target: 32 with AVX-512 and on AArch64 (NEON/SVE), else 16 (AVX2, SSE)."""
    triple = str(target.attrs.get("mtriple", "")) if hasattr(target, "attrs") else ""
    if vector_lanes(target) >= 16 or triple.startswith(("aarch64", "arm64")):
        return 32
    return 16


def const_int(x: object) -> int | None:
    """A static extent as an int (``IntImm`` or int), None when it is symbolic."""
    return int(x.value) if isinstance(x, tirx.IntImm) else (x if isinstance(x, int) else None)


def largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit``."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def register_tile(v_ext: int, t_ext: int, lanes: int, registers: int = 32) -> tuple[int, int]:
    """(vector tile, row tile) for a register-tiled reduction, both dividing their axes.

    Each reduction step loads ``n_vec`` weight vectors and broadcasts ``rows`` input values into registers, then
    issues ``n_vec * rows`` FMAs into the accumulator tile. The tile must fit the register file (accumulators +
    the weight vectors + one broadcast <= ``registers``, else LLVM spills inside the loop) and should do as
    many FMAs per load as possible: the score is ``n_vec * rows / (n_vec + rows)``, ties going to the larger
    tile. (16 x 14 and 32 x 7 both make 14 accumulators, but the first issues one load per FMA.)
    """
    if v_ext < lanes or v_ext % lanes:
        vecs = [largest_divisor(v_ext, lanes)]
    else:
        # powers of two only: LLVM scalarises parts of a <48 x float> tile (3 AVX-512 vectors), 20x slower
        vecs = [lanes * k for k in (1, 2, 4) if k <= MAX_TILE_VECTORS and (v_ext // lanes) % k == 0]
    best: tuple[float, int, int, int] = (0.0, 0, 0, 0)
    for vec in vecs:
        n_vec = -(-vec // lanes)
        for rows in range(1, t_ext + 1):
            if t_ext % rows or n_vec * rows + n_vec + 1 > registers:
                continue
            score = n_vec * rows / (n_vec + rows)
            best = max(best, (round(score, 6), n_vec * rows, vec, rows))
    return best[2], best[3]
