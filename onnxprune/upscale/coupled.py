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

``e_i(c)`` is writer i's output energy on channel c (`writer_energy`: measured on calibration inputs, else
from its BatchNorm, the ``energy`` criterion's N(beta, gamma^2) model, else its own squared score). Starting from the
free choice, a few rounds settle (a round that changes nothing ends the loop). Constrained pruning (every
unit the same channels) is one fixed point; the free choice is the start; the descent moves each unit only
where its neighbours make its own ranking pay off. Counts are untouched, so any per-group allocation of the
constrained path (uniform, global, LAMP, a parameter target, ``keep_counts``) carries over unchanged: the
same group counts, with freedom inside the group. Result (same model and data, `bench/unconstrained_cifar.py`):
R20 89.78 / 86.04 at 20% / 40% removed (constrained 89.60 / 85.12), and 90.00 / 86.00 with
``reader_choice="ls"`` (`ReaderLS`); R44 91.68 / 88.65, with ``ls`` 91.89 / 88.75 (constrained 91.14 / 87.73).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnxprune.channels import ChannelAnalysis
from onnxprune.greedy_obs import block_cholesky
from onnxprune.upscale.records import Piece
from onnxprune.upscale.scores import bn_energy, column_norms, measured_on, normalised, writer_output

ROUNDS = 8  # alternations of readers and writers (ResNet20/44 settle in 2-4)
USAGE_FLOOR = 1e-3  # relative to a writer's mean usage: a channel no reader keeps still ranks by own score


def coupled_keeps(units: list[Piece], own: dict[int, np.ndarray], energy: dict[int, np.ndarray],
                  analysis: ChannelAnalysis, size: int, fixed: set[int],
                  choose: Callable[[Piece, np.ndarray, np.ndarray, int], np.ndarray], allowed: np.ndarray,
                  n: int, least_squares: dict[int, ReaderLS] | None = None) -> None:  # fmt: skip
    """Set every non-fixed unit's `keep` (n channels among `allowed`) by the coupled descent.

    Args:
        units: the group's units (writers have a producer; readers' ``sources`` say which writers reach them).
        own: each unit's own scores (the criterion's).
        choose: ``choose(unit, scores, within, n)`` -> the unit's top `n` channels among `within` by `scores`.
        least_squares: readers that choose by their least-squares error (`ReaderLS`), by piece id.
    """
    writers = [pc for pc in units if pc.has_producer]
    readers = [pc for pc in units if not pc.has_producer]
    for pc in units:
        if pc.id not in fixed:
            pc.keep = choose(pc, normalised(own[pc.id]), allowed, n)
    if not writers or not readers:
        return
    energy = {pc.id: energy.get(pc.id, normalised(own[pc.id]) ** 2) for pc in writers}
    columns = {pc.id: column_norms(pc, analysis, size, 2, squared=True) for pc in readers}
    reached_by = {pc.id: _sources(pc, writers) for pc in readers}
    for _ in range(ROUNDS):
        before = [pc.kept.copy() for pc in units]
        for pc in readers:
            if pc.id not in fixed:
                cover = _coverage(reached_by[pc.id], energy)
                if least_squares is not None and pc.id in least_squares:
                    pc.keep = least_squares[pc.id].select(cover, allowed, n)
                else:
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


def writer_energy(pc: Piece, own: np.ndarray, analysis: ChannelAnalysis, size: int,
                  measured: dict[str, np.ndarray] | None, boundary_input: dict[str, str]) -> np.ndarray:  # fmt: skip
    """E[out_c^2] of a writer's contribution: measured on calibration inputs (`scores.measured_energy`), else
    from its BatchNorm (`scores.bn_energy`), else its squared own scores (mean-normalised)."""
    e = measured_on(pc, writer_output(pc, boundary_input), measured, size)
    if e is None:
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


@dataclass(eq=False)
class ReaderLS:
    """A reader's least-squares channel choice (``select="ls"``): the columns the repair can refit best.

    For y = W x with input Hessian H = E[x x^T] (calibration, damped), dropping the features F of one
    channel and refitting the rest by least squares (what ``ls``/``seq`` repair does) costs
    ``tr(W_F (K_FF)^-1 W_F^T)`` with K = H^-1 (Optimal Brain Surgeon). `select` removes channels greedily
    by that cost, scaled by how much of each channel the writers reaching the reader still carry
    (``cover``: a channel half of whose energy is gone is worth half), updating K after every removal
    (K <- K - K_:F (K_FF)^-1 K_F:), so a channel that another kept channel predicts well goes first.
    """

    weight: np.ndarray  # [out, features]
    inverse: np.ndarray  # K = (H + damp)^-1 over the features
    feature_channel: np.ndarray  # group channel of every feature (-1: not the group's)

    def select(self, cover: np.ndarray, allowed: np.ndarray, n: int) -> np.ndarray:
        """The `n` channels of `allowed` left after greedy removal (see the class docstring)."""
        keep = allowed.copy()
        chans = np.flatnonzero(np.bincount(self.feature_channel[self.feature_channel >= 0], minlength=len(cover)))
        feats = {int(c): np.flatnonzero(self.feature_channel == c) for c in chans}
        if all(len(f) == 1 for f in feats.values()):
            return self._select_single(cover, keep, n, feats)
        return self._select_blocks(cover, keep, n, feats)

    def _select_blocks(self, cover: np.ndarray, keep: np.ndarray, n: int, feats: dict[int, np.ndarray]) -> np.ndarray:
        """`select` for channels of several features each (k x k convs), updated as `greedy_obs` updates its blocks.

        A channel's cost ``tr(W_F (K'_FF)^-1 W_F^T)`` is ``<(K'_FF)^-1, W_F^T W_F>`` with the r x r Grams of the
        fixed W (`greedy_obs.block_traces`). K' is never formed: a removal B adds the rows ``V^T = L^-1 K'_B:``
        (``K'_BB = L L^T``, ``K'_B: = K_B: - V_B V^T`` over the live columns) and each channel's block K'_FF loses
        ``V_F V_F^T``; a removal costs r x (features removed so far) x (features left) multiply-adds. It was the
        Schur update of the whole F x F K per removal and a solve of every candidate's block against all outputs:
        the same channels (tested against it), 4-6x faster on 32-128-channel 3x3 readers; the Fashion-MNIST
        ResNet's unconstrained plan at a parameter target (12 allocations) spent 11.3 s here.
        """
        chans = np.array(sorted(feats), dtype=np.int64)
        slot = np.full(len(keep), -1)
        slot[chans] = np.arange(len(chans))
        r = len(feats[int(chans[0])]) if len(chans) else 1
        idx = np.stack([feats[int(c)] for c in chans]) if len(chans) else np.zeros((0, r), np.int64)  # [C, r]
        wf = self.weight[:, idx].transpose(1, 2, 0)  # [C, r, out]
        gram = wf @ wf.transpose(0, 2, 1)
        K = np.asarray(self.inverse, dtype=np.float64)
        blocks = K[idx[:, :, None], idx[:, None, :]]  # K'_FF of every channel, updated as channels go
        alive = np.ones(len(chans), dtype=bool)
        cols = np.arange(len(chans) * r).reshape(-1, r)  # a channel's columns among all group features
        Vt = np.empty((max(int(keep.sum()) - n, 0) * r, len(chans) * r))  # the removals' Schur factors, as rows
        used = 0
        while int(keep.sum()) > n:
            cand = np.flatnonzero(keep)
            at = slot[cand]
            has = at >= 0
            costs = np.zeros(len(cand))
            if has.any():
                costs[has] = (np.linalg.inv(blocks[at[has]]) * gram[at[has]]).sum(axis=(1, 2))
            costs *= cover[cand]
            gone = int(cand[int(np.argmin(costs))])
            keep[gone] = False
            if slot[gone] < 0:
                continue
            g = int(slot[gone])
            alive[g] = False
            live = cols[alive].ravel()  # the columns of the channels still there: the others are never read
            # K'_B, over the live columns: K minus the earlier removals' factors V^T V
            rows = K[idx[g][:, None], idx[alive].ravel()[None, :]] - Vt[:used, cols[g]].T @ Vt[:used, live]
            factor = block_cholesky(blocks[g])  # K'_BB (a jitter where rounding left it barely indefinite)
            new = np.linalg.solve(factor, rows)  # L^-1 K'_B:, so K'_:B K'_BB^-1 K'_B: = new^T new
            Vt[used : used + r, live] = new
            used += r
            part = new.T.reshape(-1, r, r)  # [alive channels, r, r]
            blocks[alive] -= part @ part.transpose(0, 2, 1)
        return keep

    def _select_single(self, cover: np.ndarray, keep: np.ndarray, n: int, feats: dict[int, np.ndarray]) -> np.ndarray:
        """`select` where every channel is one feature (1x1 convs, Gemm/MatMul readers): the same greedy
        removal, with the cost ``|W_f|^2 / K_ff`` read from K's diagonal and K's updates kept as their
        rank-1 factors ``u`` (K_t = K - sum u u^T), so a removal costs O(t x features) instead of a dense
        features^2 update and a batch of solves. Why: ResNet-50's stream readers (1x1 convs on up to 2,048
        channels) spent minutes per plan in those updates.
        """
        colsq = np.einsum("of,of->f", self.weight, self.weight)
        feature = np.full(len(keep), -1)
        for c, f in feats.items():
            feature[c] = int(f[0])
        diag = np.diagonal(self.inverse).astype(np.float64, copy=True)
        factors = np.empty((max(int(keep.sum()) - n, 0), len(diag)))
        t = 0
        while int(keep.sum()) > n:
            cand = np.flatnonzero(keep)
            f = feature[cand]
            has = f >= 0
            costs = np.zeros(len(cand))
            costs[has] = colsq[f[has]] / diag[f[has]]
            costs *= cover[cand]
            gone = int(cand[int(np.argmin(costs))])
            keep[gone] = False
            g = int(feature[gone])
            if g >= 0:
                column = self.inverse[:, g] - factors[:t].T @ factors[:t, g]
                u = column / np.sqrt(column[g])
                factors[t] = u
                t += 1
                diag -= u * u
        return keep


def reader_least_squares(pc: Piece, analysis: ChannelAnalysis, size: int, stats, damp: float = 0.01) -> ReaderLS | None:
    """The `ReaderLS` of a reader unit with one weight member and calibration statistics, else None."""
    if len(pc.weights) != 1 or stats is None:
        return None
    m = pc.weights[0]
    c = next((c for c in stats.consumers.values() if c.weight == m.tensor and c.in_axis == m.axis), None)
    if c is None or c.name not in stats.stats:
        return None
    w = np.asarray(analysis.graph.const(c.weight), dtype=np.float64)
    wm = c.weight_matrix(w)
    # With the constant feature (never removed: the repair refits the bias) and the repair's damping.
    H = stats.stats[c.name].H.astype(np.float64)
    H = H + (damp * float(np.mean(np.diag(H)[:-1])) + 1e-12) * np.eye(len(H))
    pos_channel = np.full(w.shape[c.in_axis], -1)
    pos_channel[m.positions] = m.channel_of
    feature_channel = np.append(pos_channel[c.feature_channel(w.shape)], -1)
    weight = np.concatenate([wm, np.zeros((wm.shape[0], 1))], axis=1)
    return ReaderLS(weight, np.linalg.inv(H), feature_channel)
