"""A pruned model's latency predicted from a latency table, without measuring it.

`predicted_ms` starts from the table's dense total of the measured layers and scales each layer by the
latency ratio every group that touches it gives at its kept count (`GroupCurve.node_ratio`: exact at
measured counts, interpolated in between). A layer whose input and output channels belong to two groups
is scaled by the product of both ratios: halving both leaves a quarter of a convolution, where adding the
two groups' changes would predict nothing left (every ResNet bottleneck conv is such a layer). Tables
without per-layer curves fall back to adding each group's change.
"""

from __future__ import annotations

from collections.abc import Mapping

from onnxprune.latency.table import LatencyTable

__all__ = ["predicted_ms", "predicted_speedup"]


def predicted_ms(table: LatencyTable, kept: Mapping[int, int]) -> float:
    """The measured layers' latency when each group keeps `kept[group]` channels (missing groups: dense)."""
    total = table.dense_ms
    ratio: dict[str, float] = {}
    for gid, count in kept.items():
        curve = table.curves.get(gid)
        if curve is None:
            continue
        if len(curve.node_ms) != len(curve.nodes) or not table.node_dense_ms:
            total += curve.at(int(count)) - curve.ms[-1]
            continue
        for i, node in enumerate(curve.nodes):
            ratio[node] = ratio.get(node, 1.0) * curve.node_ratio(i, int(count))
    return total + sum(table.node_dense_ms.get(node, 0.0) * (r - 1.0) for node, r in ratio.items())


def predicted_speedup(table: LatencyTable, kept: Mapping[int, int]) -> float:
    """Dense over predicted latency of the measured layers (1.0 for an empty table)."""
    pruned = predicted_ms(table, kept)
    return table.dense_ms / pruned if pruned > 0 else 1.0
