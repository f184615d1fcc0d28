"""A pruned model's latency predicted from a latency table, without measuring it.

`predicted_ms` adds to the table's dense total each group's change at its kept count (`LatencyTable.at`:
exact at measured counts, interpolated in between). Groups add independently: a layer touched by two
groups (its input and output channels) counts both changes without their interaction, which overestimates
the latency a little when both shrink (the product of two fractions is smaller than their sum suggests).
"""

from __future__ import annotations

from collections.abc import Mapping

from onnxprune.latency.table import LatencyTable

__all__ = ["predicted_ms", "predicted_speedup"]


def predicted_ms(table: LatencyTable, kept: Mapping[int, int]) -> float:
    """The measured layers' latency when each group keeps `kept[group]` channels (missing groups: dense)."""
    total = table.dense_ms
    for gid, count in kept.items():
        curve = table.curves.get(gid)
        if curve is not None:
            total += curve.at(int(count)) - curve.ms[-1]
    return total


def predicted_speedup(table: LatencyTable, kept: Mapping[int, int]) -> float:
    """Dense over predicted latency of the measured layers (1.0 for an empty table)."""
    pruned = predicted_ms(table, kept)
    return table.dense_ms / pruned if pruned > 0 else 1.0
