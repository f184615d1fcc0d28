"""Pruning plans: which channels of which group to remove, from scores and a target.

`make_plan` supports a uniform ratio per group and a global ranking across groups (scores are
normalised per group by their mean, so groups of different scale compare). A group never loses all its
channels, and its kept count is one of the group's *allowed counts* (a grid, `KeepCounts`): every count
by default, the multiples of N with ``round_to=N`` (`latency.grid.multiples`), or the bottoms of the
latency steps measured on a backend (`latency.grid.keep_counts`, the CLI's ``--round-to auto``).

Snapping a kept count to the grid goes *up*: the allowed count at or above the asked one. A latency grid's
counts are the most channels for their latency, so rounding up keeps accuracy at the same latency (and for
``--round-to N`` it is what the flag always did). One exception, `top="nearest"` (latency grids only): when
rounding up would leave untouched a group the ratio asked to prune, the group goes down to the next allowed
count if that is at least as near; otherwise a small ratio would prune nothing at all on grids whose top
step is wide (a 2048-channel group at ratio 0.005 asks 10 channels, the grid allows 16).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxprune.channels import ChannelAnalysis, ChannelGroup

KeepCounts = Mapping[int, Sequence[int]]  # group id -> allowed kept counts, ascending, ending at the group size


@dataclass
class PruningPlan:
    """Group id -> indices of the channels to remove (group-local, sorted)."""

    removed: dict[int, np.ndarray] = field(default_factory=dict)

    def labels(self, analysis: ChannelAnalysis) -> np.ndarray:
        parts = [analysis.groups[gid].labels[idx] for gid, idx in self.removed.items() if len(idx)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    @property
    def groups_pruned(self) -> int:
        return sum(1 for idx in self.removed.values() if len(idx))

    @property
    def channels_removed(self) -> int:
        return int(sum(len(idx) for idx in self.removed.values()))

    def params_removed(self, analysis: ChannelAnalysis) -> int:
        return int(sum(analysis.groups[g].params_per_channel[idx].sum() for g, idx in self.removed.items()))

    def kept(self, analysis: ChannelAnalysis) -> dict[int, int]:
        """Group id -> kept channel count, for the groups that lose any."""
        return {gid: analysis.groups[gid].size - len(idx) for gid, idx in self.removed.items() if len(idx)}


def multiples_grid(analysis: ChannelAnalysis, n: int) -> dict[int, tuple[int, ...]]:
    """The grid of ``round_to=n``: multiples of n plus the group size; a group smaller than n keeps any count."""
    from onnxprune.latency.grid import multiples

    return multiples(analysis, n)


def allowed_counts(group: ChannelGroup, keep_counts: KeepCounts | None) -> np.ndarray:
    """The group's allowed kept counts (ascending, >= its `min_keep`, ending at its size); every count without a
    grid."""
    lowest = max(1, group.min_keep)
    if keep_counts is None or group.id not in keep_counts:
        return np.arange(lowest, group.size + 1)
    counts = sorted({int(c) for c in keep_counts[group.id] if lowest <= int(c) <= group.size} | {group.size})
    return np.asarray(counts, dtype=np.int64)


def snap_keep(keep: int, allowed: np.ndarray, top: str = "up") -> int:
    """The allowed count at or above `keep` (see the module docstring for `top="nearest"`)."""
    size = int(allowed[-1])
    keep = max(1, min(size, int(keep)))
    snapped = int(allowed[np.searchsorted(allowed, keep)])
    if top == "nearest" and snapped == size and keep < size and len(allowed) > 1:
        below = int(allowed[-2])
        if keep - below <= size - keep:
            return below
    return snapped


def floor_keep(group: ChannelGroup, allowed: np.ndarray, max_group_ratio: float, round_to: int = 1) -> int:
    """The fewest channels a group may keep before snapping: its smallest allowed count, no fewer than
    ``1 - max_group_ratio`` of its channels, and with ``round_to=N`` at least N (a group smaller than N is
    not pruned by a ranking or an order, as before grids existed; a uniform ratio still prunes it)."""
    lowest = max(int(allowed[0]), int(math.ceil(group.size * (1 - max_group_ratio))), int(round_to))
    return min(group.size, lowest)


def make_plan(
    analysis: ChannelAnalysis,
    scores: dict[int, np.ndarray],
    ratio: float,
    *,
    global_ranking: bool = False,
    round_to: int = 1,
    max_group_ratio: float = 0.9,
    groups: list[ChannelGroup] | None = None,
    keep_counts: KeepCounts | None = None,
    top: str = "up",
) -> PruningPlan:
    """Remove about `ratio` of the channels, lowest scores first.

    Args:
        keep_counts: allowed kept counts per group; None: the multiples of `round_to` (every count at 1).
        top: "up" or "nearest", how a kept count snaps to the grid (module docstring).
    """
    groups = analysis.groups if groups is None else groups
    plan = PruningPlan()
    if ratio <= 0:
        return plan
    if keep_counts is None and round_to > 1:
        keep_counts = multiples_grid(analysis, round_to)
    grid = {g.id: allowed_counts(g, keep_counts) for g in groups}
    if not global_ranking:
        for g in groups:
            keep = snap_keep(g.size - int(math.floor(ratio * g.size + 1e-9)), grid[g.id], top)
            order = np.argsort(scores[g.id], kind="stable")
            plan.removed[g.id] = np.sort(order[: g.size - keep])
        return plan
    # Global: rank every channel by its group-normalised score.
    entries = []
    for g in groups:
        s = np.asarray(scores[g.id], dtype=np.float64)
        norm = s / (np.mean(np.abs(s)) + 1e-12)
        for i in range(g.size):
            entries.append((norm[i], g.id, i))
    entries.sort()
    total = sum(g.size for g in groups)
    budget = int(math.floor(ratio * total + 1e-9))
    cap = {g.id: g.size - floor_keep(g, grid[g.id], max_group_ratio, round_to) for g in groups}
    chosen: dict[int, list[int]] = {g.id: [] for g in groups}
    for _, gid, i in entries:
        if budget <= 0:
            break
        if len(chosen[gid]) < cap[gid]:
            chosen[gid].append(i)
            budget -= 1
    by_id = {g.id: g for g in groups}
    for gid, idx in chosen.items():
        g = by_id[gid]
        keep = snap_keep(g.size - len(idx), grid[gid], top if idx else "up")
        if g.size - keep <= len(idx):
            # Rounding up the kept count gives back the highest-scoring removals.
            idx = sorted(idx, key=lambda i: scores[gid][i])[: g.size - keep]
        else:  # the nearest step lies below what the ranking chose: the group's lowest scores go
            idx = list(np.argsort(scores[gid], kind="stable")[: g.size - keep])
        plan.removed[gid] = np.array(sorted(idx), dtype=np.int64)
    return plan
