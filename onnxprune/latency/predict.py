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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from onnxprune.channels import ChannelAnalysis
from onnxprune.latency.grid import next_on_grid, off_grid_penalty
from onnxprune.latency.table import GroupCurve, LatencyTable
from onnxprune.metrics import count_macs, node_macs

__all__ = ["Predictor", "UniformBound", "macs_reduction", "predicted_ms", "predicted_speedup", "uniform_bound"]


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


@dataclass(frozen=True)
class UniformBound:
    """What uniform pruning can reach at best (`uniform_bound`).

    Attributes:
        ratio: every group keeps ``1 - ratio`` of its channels.
        macs_reduction: MACs before / after.
        speedup: priced time before / after, every priced node scaled as its MACs.
        efficiency: speedup / macs_reduction, the best a uniform ratio can reach.
        linear_share: share of the priced time in nodes one group scales (depthwise convs, stems, heads,
            memory-bound nodes): the time that falls only as ``1 - ratio`` while the MACs of pointwise
            layers fall as ``(1 - ratio)**2``.
    """

    ratio: float
    macs_reduction: float
    speedup: float
    efficiency: float
    linear_share: float


def uniform_bound(table: LatencyTable, analysis: ChannelAnalysis, ratio: float) -> UniformBound:
    """The best efficiency (speedup / MACs reduction) of pruning every group by `ratio` (an Amdahl bound).

    Every priced node is taken to run in time proportional to its MACs (a layer two groups touch: the
    product of both groups' kept fractions; a depthwise convolution or a memory-bound node: its one group's
    fraction; layers no group touches: unchanged), so steps, alignment and overheads are ignored: no
    rounding does better. The time shares come from the table, the MACs from the model (`metrics`).
    """
    groups_of = _groups_of(table)
    sizes = {g.id: g.size for g in analysis.groups}
    factor = {node: math.prod(max(1, round((1 - ratio) * sizes[g])) / sizes[g] for g in gids)
              for node, gids in groups_of.items()}
    macs_total, macs_after = _macs_scaled(table, analysis, factor)
    dense = sum(table.node_dense_ms.values())
    time_after = sum(ms * factor.get(node, 1.0) for node, ms in table.node_dense_ms.items())
    linear = sum(ms for node, ms in table.node_dense_ms.items() if len(groups_of.get(node, ())) == 1)
    macs_reduction = macs_total / macs_after if macs_after > 0 else 1.0
    speedup = dense / time_after if time_after > 0 else 1.0
    return UniformBound(ratio, macs_reduction, speedup, speedup / macs_reduction,
                        linear / dense if dense > 0 else 0.0)


def _groups_of(table: LatencyTable) -> dict[str, list[int]]:
    groups_of: dict[str, list[int]] = {}
    for gid, curve in table.curves.items():
        for node in curve.nodes:
            groups_of.setdefault(node, []).append(gid)
    return groups_of


def _macs_scaled(table: LatencyTable, analysis: ChannelAnalysis, factor: Mapping[str, float]) -> tuple[int, float]:
    """(the model's MACs, its MACs with every priced node's scaled by `factor[node]`)."""
    graph = analysis.graph
    by_name = {(n.name or n.output[0]): n for n in graph.model.graph.node}
    macs_total = count_macs(graph)
    touched = {node: node_macs(graph, by_name[node]) for node in factor if node in by_name}
    return macs_total, macs_total - sum(touched.values()) + sum(m * factor[n] for n, m in touched.items())


def macs_reduction(table: LatencyTable, analysis: ChannelAnalysis, kept: Mapping[int, int]) -> float:
    """MACs before / after when each group keeps `kept[group]` channels (missing groups: all), counted on the
    nodes the table prices (each scaled by the kept fraction of every group that touches it) and the model's
    total; without applying the plan."""
    sizes = {g.id: g.size for g in analysis.groups}
    factor = {node: math.prod(kept.get(g, sizes[g]) / sizes[g] for g in gids)
              for node, gids in _groups_of(table).items()}
    before, after = _macs_scaled(table, analysis, factor)
    return before / after if after > 0 else 1.0
