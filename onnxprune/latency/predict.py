"""A pruned model's latency predicted from a latency table, without measuring it.

`predicted_ms` starts from the table's dense total of the measured layers and scales each layer by the
latency ratio every group that touches it gives at its kept count (`GroupCurve.node_ratio`: exact at
measured counts, interpolated in between). A layer whose input and output channels belong to two groups
is scaled by the product of both ratios: halving both leaves a quarter of a convolution, where adding the
two groups' changes would predict nothing left (every ResNet bottleneck conv is such a layer; ResNet-50 with
every group at half its channels: the measured layers' 53.3 ms become 14.7 ms by the product, 2.5 ms by
the sum; at 70%, 26.8 against 22.1 ms). Tables
without per-layer curves fall back to adding each group's change.

`Predictor` keeps the same prediction up to date while a greedy allocation changes one group at a time.

Counts between measured ones are interpolated, which is right on a grid but optimistic off it: an
unrounded count in the coarse range (101 of 144 channels) lands between two measured multiples of 32 and
looks cheap, while onnxruntime runs it off its blocked path. Given the `grids` (`grid.keep_counts`), an
off-grid count that was not measured is priced as the next grid count up times the curve's measured
off-grid penalty (`grid.off_grid_penalty`). Measured on MobileNetV2 pruned at ``--ratio 0.3 --round-to 1``
(onnxruntime, 1 thread; the unrounded model ran at 0.80x the dense speed): plain interpolation predicted
1.44x, grid-aware pricing 1.19x: closer, still optimistic, since in the real model every layer off the
blocked path also converts layouts to and from its neighbours, which single-node models cannot show.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from onnxprune.latency.grid import next_on_grid, off_grid_penalty
from onnxprune.latency.table import GroupCurve, LatencyTable

__all__ = ["Predictor", "predicted_ms", "predicted_speedup"]


def predicted_ms(
    table: LatencyTable, kept: Mapping[int, int], *, grids: Mapping[int, Sequence[int]] | None = None
) -> float:
    """The measured layers' latency when each group keeps `kept[group]` channels (missing groups: dense).

    Args:
        grids: the allowed counts per group (`grid.keep_counts`); with them, unmeasured off-grid counts
            are priced as the next grid count up times the measured off-grid penalty.
    """
    total = table.dense_ms
    ratio: dict[str, float] = {}
    for gid, count in kept.items():
        curve = table.curves.get(gid)
        if curve is None:
            continue
        count, penalty = _priced_count(curve, int(count), None if grids is None else grids.get(gid))
        if len(curve.node_ms) != len(curve.nodes) or not table.node_dense_ms:
            total += curve.at(count) * penalty - curve.ms[-1]
            continue
        for i, node in enumerate(curve.nodes):
            ratio[node] = ratio.get(node, 1.0) * curve.node_ratio(i, count) * penalty
    return total + sum(table.node_dense_ms.get(node, 0.0) * (r - 1.0) for node, r in ratio.items())


def predicted_speedup(
    table: LatencyTable, kept: Mapping[int, int], *, grids: Mapping[int, Sequence[int]] | None = None
) -> float:
    """Dense over predicted latency of the measured layers (1.0 for an empty table)."""
    pruned = predicted_ms(table, kept, grids=grids)
    return table.dense_ms / pruned if pruned > 0 else 1.0


def _priced_count(curve: GroupCurve, count: int, grid: Sequence[int] | None) -> tuple[int, float]:
    """The count whose measurement prices `count`, and a penalty factor for it."""
    if grid is None or count in grid or count in curve.counts or count >= curve.size:
        return count, 1.0
    return next_on_grid(grid, count), off_grid_penalty(curve, grid)


class Predictor:
    """`predicted_ms` kept up to date while groups change one at a time (a greedy allocation's loop).

    ``Predictor(table).set(group, kept)`` returns the predicted latency with every group set so far at its
    count (the others dense), in time proportional to the layers the group touches.
    """

    def __init__(self, table: LatencyTable, grids: Mapping[int, Sequence[int]] | None = None):
        self.table, self.grids = table, grids
        self.kept: dict[int, int] = {}
        self.total = table.dense_ms
        self._group_ratio: dict[tuple[int, str], float] = {}  # (group, node) -> that group's ratio for the node
        self._node_ratio: dict[str, float] = {}  # node -> product over its groups

    def set(self, group: int, kept: int) -> float:
        """Set `group` to `kept` channels; returns the predicted total in milliseconds."""
        curve = self.table.curves.get(group)
        self.kept[group] = int(kept)
        if curve is None:
            return self.total
        count, penalty = _priced_count(curve, int(kept), None if self.grids is None else self.grids.get(group))
        if len(curve.node_ms) != len(curve.nodes) or not self.table.node_dense_ms:
            old = self._group_ratio.get((group, ""), curve.ms[-1])
            new = curve.at(count) * penalty
            self._group_ratio[(group, "")] = new
            self.total += new - old
            return self.total
        for i, node in enumerate(curve.nodes):
            dense = self.table.node_dense_ms.get(node, 0.0)
            before = self._node_ratio.get(node, 1.0)
            mine = curve.node_ratio(i, count) * penalty
            old_mine = self._group_ratio.get((group, node), 1.0)
            after = before / old_mine * mine if old_mine > 0 else _product(self._group_ratio, node, group, mine)
            self._group_ratio[(group, node)] = mine
            self._node_ratio[node] = after
            self.total += dense * (after - before)
        return self.total


def _product(ratios: dict[tuple[int, str], float], node: str, group: int, mine: float) -> float:
    """The product of every group's ratio for `node`, with `group`'s replaced by `mine` (a ratio of 0 cannot
    be divided out)."""
    out = mine
    for (g, n), r in ratios.items():
        if n == node and g != group:
            out *= r
    return out
