"""``drive="coupled"``: writers and readers of a stream choose their channels *for each other*.

Start reading at `coupled_keeps`. With ``drive="free"`` every unit keeps its own top channels, blind to the
others. On a residual stream that wastes budget twice: a writer keeps rows no reader downstream reads (its
parameters buy nothing), and a reader keeps columns of stream channels that some writers reaching it
dropped, so it reads a *corrupted* channel (the stream there is the sum of the writers that kept it
only). Measured on the pretrained CIFAR-10 ResNet20 at 40% of parameters removed (l2 + seq repair, 10,000
test images): free 83.53, constrained 85.12 — and both mixes are worse than either (writers by the shared
ranking, readers free 81.33; readers shared, writers free 82.13): what costs is the mismatch between what a
writer writes and what its readers read, not the freedom.

The coupled choice minimises a first-order model of the output error the mismatch causes, by alternating
(coordinate descent, each step a ranking, so every unit keeps exactly its count):

* reader r keeps channel c by ``own_r(c)^2 x coverage_r(c)``: its own score (the criterion's, with the
  measured input energy) times the fraction of the stream channel's energy that the writers reaching it
  keep there (``sum_{i reaches r, c kept by i} e_i(c) / sum_{i reaches r} e_i(c)``, `_coverage`);
* writer i keeps channel c by ``own_i(c)^2 x usage_i(c)``: its own score times how much the readers it
  reaches and that keep c weigh that channel (each reader's squared column norms, normalised so that every
  reader counts alike, `_usage`), plus a small floor so a writer with no reader keeps its own ranking.

``e_i(c)`` is writer i's output energy on channel c after its BatchNorm (`scores.bn_energy`: the same
data-free N(beta, gamma^2) model as the ``energy`` criterion), else its own squared score. Starting from the
free choice, a few rounds settle (a round that changes nothing ends the loop). Constrained pruning (every
unit the same channels) is one fixed point; the free choice is the start; the descent moves each unit only
where its neighbours make its own ranking pay off. Counts are untouched, so any per-group allocation of the
constrained path (uniform, global, LAMP, a parameter target, ``keep_counts``) carries over unchanged: the
same group counts, with freedom inside the group.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnxprune.channels import ChannelAnalysis
from onnxprune.upscale.records import Piece
from onnxprune.upscale.scores import bn_energy, column_norms, normalised

ROUNDS = 8  # alternations of readers and writers (ResNet20/44 settle in 2-4)
USAGE_FLOOR = 1e-3  # relative to a writer's mean usage: a channel no reader keeps still ranks by own score


def coupled_keeps(units: list[Piece], own: dict[int, np.ndarray], analysis: ChannelAnalysis, size: int,
                  fixed: set[int], choose: Callable[[Piece, np.ndarray, np.ndarray, int], np.ndarray],
                  allowed: np.ndarray, n: int) -> None:  # fmt: skip
    """Set every non-fixed unit's `keep` (n channels among `allowed`) by the coupled descent.

    Args:
        units: the group's units (writers have a producer; readers' ``sources`` say which writers reach them).
        own: each unit's own scores (the criterion's).
        choose: ``choose(unit, scores, within, n)`` -> the unit's top `n` channels among `within` by `scores`.
    """
    writers = [pc for pc in units if pc.has_producer]
    readers = [pc for pc in units if not pc.has_producer]
    for pc in units:
        if pc.id not in fixed:
            pc.keep = choose(pc, normalised(own[pc.id]), allowed, n)
    if not writers or not readers:
        return
    energy = {pc.id: _writer_energy(pc, own[pc.id], analysis, size) for pc in writers}
    columns = {pc.id: column_norms(pc, analysis, size, 2, squared=True) for pc in readers}
    reached_by = {pc.id: _sources(pc, writers) for pc in readers}
    for _ in range(ROUNDS):
        before = [pc.kept.copy() for pc in units]
        for pc in readers:
            if pc.id not in fixed:
                cover = _coverage(reached_by[pc.id], energy)
                pc.keep = choose(pc, normalised(own[pc.id]) ** 2 * cover, allowed, n)
        for pc in writers:
            if pc.id not in fixed:
                usage = _usage(pc, readers, reached_by, columns, energy)
                pc.keep = choose(pc, normalised(own[pc.id]) ** 2 * usage, allowed, n)
        if all(np.array_equal(b, pc.kept) for b, pc in zip(before, units)):
            break


def _sources(reader: Piece, writers: list[Piece]) -> list[Piece]:
    """The writers reaching a reader (all the group's writers where that is unknown)."""
    if reader.sources is None:
        return writers
    return [w for w in writers if w.id in reader.sources]


def _writer_energy(pc: Piece, own: np.ndarray, analysis: ChannelAnalysis, size: int) -> np.ndarray:
    """E[out_c^2] of a writer's contribution (after its BatchNorm), else its squared own score."""
    e = bn_energy(pc, analysis, size)
    return e if e is not None else normalised(own) ** 2


def _coverage(sources: list[Piece], energy: dict[int, np.ndarray]) -> np.ndarray:
    """Per channel, the fraction of the reader's stream energy that the writers reaching it keep."""
    if not sources:
        return np.ones_like(next(iter(energy.values())))
    total = np.sum([energy[w.id] for w in sources], axis=0)
    kept = np.sum([energy[w.id] * w.kept for w in sources], axis=0)
    return kept / np.maximum(total, 1e-12)


def _usage(writer: Piece, readers: list[Piece], reached_by: dict[int, list[Piece]], columns: dict[int, np.ndarray],
           energy: dict[int, np.ndarray]) -> np.ndarray:  # fmt: skip
    """Per channel, how much the readers this writer reaches (and that keep the channel) weigh it: each
    reader's squared column norms over its total input-weighted column energy (every reader counts alike)."""
    usage = np.zeros(len(writer.kept))
    for r in readers:
        srcs = reached_by[r.id]
        if writer not in srcs:
            continue
        stream = np.sum([energy[w.id] for w in srcs], axis=0)
        q = columns[r.id] / max(float((columns[r.id] * stream).sum()), 1e-12)
        usage += q * r.kept
    floor = USAGE_FLOOR * (usage.mean() if usage.any() else 1.0)
    return usage + floor
