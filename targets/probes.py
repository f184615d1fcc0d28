"""Which channel counts a TVM latency table measures: few, since each probe is a compile.

A leaf module (no tvm, no numpy), shared by the TVM latency backends of :mod:`.tvm_latency` and the emulated
ones of :mod:`.latency`. Start reading at :func:`tvm_probe_counts`.
"""

from __future__ import annotations

__all__ = ["TILE_VECTORS", "tvm_probe_counts"]

#: Most weight vectors in one register tile row (:data:`.tvm_tiles.MAX_TILE_VECTORS`; not imported from there,
#: which imports tvm).
TILE_VECTORS = 4


def tvm_probe_counts(size: int, lowest: int, lanes: int, *, most: int = 6) -> list[int]:
    """The channel counts worth a compile for a dim of ``size`` channels, none below ``lowest``, ascending.

    TVM's CPU convolutions pad their output channels to whole vectors of ``lanes`` floats
    (:func:`.tvm_layout.pad_conv_channels`) and tile registers by 1, 2 or 4 vectors
    (:func:`.tvm_tiles.register_tile`), so latency steps at multiples of ``lanes``. The probes are such
    multiples (the bottoms of steps), at most ``most`` of them spread evenly over ``[lowest, size]``,
    preferring whole register tiles (multiples of ``lanes * TILE_VECTORS``) when there are enough of those;
    plus ``lowest`` and ``size`` and, twice, the count one past a step with the top of that next step (``g + 1``
    costs like ``g + lanes``: the step's height shows, and a table builder that allows only measured counts
    at the top of their plateau keeps ``g + lanes``, not ``g + 1``). A dim no larger than one vector is flat:
    its two ends only.
    """
    lowest = max(1, min(lowest, size))
    if size <= lanes:
        return sorted({lowest, size})
    first = -(-lowest // lanes)
    grid = [k * lanes for k in range(first, size // lanes + 1)]
    tile = lanes * TILE_VECTORS
    if sum(1 for g in grid if g % tile == 0) >= most:
        grid = [g for g in grid if g % tile == 0]
    if len(grid) > most:
        step = (len(grid) - 1) / (most - 1)
        grid = [grid[round(i * step)] for i in range(most)]
    picked = set(grid) | {size, lowest}
    inner = [g for g in grid if g + lanes < size]
    for g in (inner[len(inner) // 3], inner[(2 * len(inner)) // 3]) if len(inner) >= 2 else inner[:1]:
        picked |= {g + 1, g + lanes}
    return sorted(c for c in picked if lowest <= c <= size)
