"""Importance criteria: each is one class with `score(group, analysis) -> array[group.size]`.

Scores are aggregated over all weight members of a coupled group. Each member's per-channel scores are
divided by their mean before aggregation, so a wide layer with small weights and a narrow layer with large
weights weigh equally, and groups compare in a global ranking. Criteria are stateless: the random
criterion derives its generator from (seed, group id).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxprune.channels import ChannelAnalysis, ChannelGroup, ChannelSlice


class Criterion:
    name = "base"
    needs_data = False

    def score(self, group: ChannelGroup, analysis: ChannelAnalysis) -> np.ndarray:
        raise NotImplementedError

    def score_all(self, analysis: ChannelAnalysis, groups=None) -> dict[int, np.ndarray]:
        return {g.id: self.score(g, analysis) for g in (analysis.groups if groups is None else groups)}


def scored_members(group: ChannelGroup, analysis: ChannelAnalysis) -> list[ChannelSlice]:
    """Main weights of the group (Conv/Gemm/MatMul/embedding), or every parameter if it has none."""
    members = [m for m in group.param_members if analysis.roles.get(m.tensor) == "weight"]
    return members or group.param_members


def per_channel(member: ChannelSlice, values_per_position: np.ndarray, size: int) -> np.ndarray:
    """Sum a per-position quantity into the member's channels."""
    return np.bincount(member.channel_of, weights=values_per_position, minlength=size)


def position_norms(array: np.ndarray, axis: int, p: int) -> np.ndarray:
    moved = np.moveaxis(np.asarray(array, dtype=np.float64), axis, 0).reshape(array.shape[axis], -1)
    if p == 1:
        return np.abs(moved).sum(axis=1)
    return (moved**2).sum(axis=1)


@dataclass(frozen=True)
class Magnitude(Criterion):
    """L1 or L2 norm of each channel's weights (L2: root of the summed squares over all members)."""

    p: int = 1

    @property
    def name(self) -> str:
        return f"l{self.p}"

    def score(self, group, analysis):
        total = np.zeros(group.size)
        members = scored_members(group, analysis)
        for m in members:
            w = analysis.graph.const(m.tensor)
            norms = position_norms(w, m.axis, self.p)[m.positions]
            ch = per_channel(m, norms, group.size)
            if self.p == 2:
                ch = np.sqrt(ch)
            total += ch / (ch.mean() + 1e-12)
        return total / max(1, len(members))


@dataclass(frozen=True)
class Random(Criterion):
    seed: int = 0
    name = "random"

    def score(self, group, analysis):
        return np.random.default_rng([self.seed, group.id]).random(group.size)


CRITERIA: dict[str, Criterion] = {
    "l1": Magnitude(1),
    "l2": Magnitude(2),
    "random": Random(0),
}


def get_criterion(name: str, seed: int = 0) -> Criterion:
    from onnxprune.errors import UsageError

    if name == "random":
        return Random(seed)
    if name not in CRITERIA:
        raise UsageError(f"unknown criterion {name!r} (choose from {', '.join(sorted(CRITERIA))})")
    return CRITERIA[name]
