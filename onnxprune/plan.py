"""Pruning plans: which channels of which group to remove, from scores and a target.

`make_plan` supports a uniform ratio per group and a global ranking across groups (scores are
normalised per group by their mean, so groups of different scale compare). A group never loses all its
channels, and with ``round_to`` the kept count is a multiple of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from onnxprune.channels import ChannelAnalysis, ChannelGroup


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


def min_keep(group: ChannelGroup, round_to: int) -> int:
    return min(group.size, max(1, round_to))


def _round_keep(keep: int, size: int, round_to: int) -> int:
    if round_to > 1 and size >= round_to:
        keep = min(size, int(math.ceil(keep / round_to) * round_to))
    return max(1, keep)


def make_plan(
    analysis: ChannelAnalysis,
    scores: dict[int, np.ndarray],
    ratio: float,
    *,
    global_ranking: bool = False,
    round_to: int = 1,
    max_group_ratio: float = 0.9,
    groups: list[ChannelGroup] | None = None,
) -> PruningPlan:
    """Remove about `ratio` of the channels, lowest scores first."""
    groups = analysis.groups if groups is None else groups
    plan = PruningPlan()
    if ratio <= 0:
        return plan
    if not global_ranking:
        for g in groups:
            keep = _round_keep(g.size - int(math.floor(ratio * g.size + 1e-9)), g.size, round_to)
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
    cap = {g.id: g.size - max(min_keep(g, round_to), int(math.ceil(g.size * (1 - max_group_ratio)))) for g in groups}
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
        keep = _round_keep(g.size - len(idx), g.size, round_to)
        # Rounding up the kept count gives back the highest-scoring removals.
        idx = sorted(idx, key=lambda i: scores[gid][i])[: g.size - keep]
        plan.removed[gid] = np.array(sorted(idx), dtype=np.int64)
    return plan
