"""Greedy joint OBS: the order in which removing a group's channels one step at a time costs least.

Start reading at `greedy_obs_scores`; `onnxprune.criteria.OBS` calls it for calibrated scores with the ``ls``
(and ``seq``) repair. One-shot OBS scores each channel alone against the dense layer. Removing several at
once costs more than the sum of their scores when they stand in for each other: two duplicate channels
each score 0, removing both does not. Greedy OBS, as OBC and ZipLM do for structured removal:

1. every consumer layer y = W x + b reading the group starts from its damped inverse Hessian K = H^-1;
2. a step removes the ``ceil(size / GREEDY_STEPS)`` channels whose relative saliency, summed over the
   consumers, is lowest *now*: ``tr(W'_J (K'_JJ)^-1 W'_J^T) / tr(W H W^T)`` with the current weights W' and
   inverse Hessian K' (which the earlier steps updated);
3. each consumer is updated as the OBS repair would for the removed features B:
   ``W' -= W'_B (K'_BB)^-1 K'_B:`` and ``K' -= K'_:B (K'_BB)^-1 K'_B:`` (the Schur complement: the inverse
   Hessian of the remaining features).

K' is never formed: with ``K'_BB = L L^T`` the update is ``K' = K' - V V^T``, ``V = K'_:B L^-T``, so a
consumer keeps K, the columns V of every step and the diagonal blocks K'_JJ of its channels (float32 as K;
the blocks and Cholesky factors float64); a step then costs ``features x removed-so-far x |B|``
multiply-adds, not passes over an F x F matrix. A channel's score is the running maximum of the marginal saliencies up to its removal, nudged to
increase strictly, so ``np.argsort`` reproduces the order and a score still reads as a marginal cost.

Measured (`bench/accuracy_real.py`, obs + seq, 2,000 CIFAR-10 training images, all 10,000 test images,
one-shot in brackets): ResNet20 knapsack 20% / 40% of the parameters removed 90.36 / 87.03 (90.19 / 86.88),
uniform 89.81 / 86.21 (89.68 / 85.77), with ``--relu-refit`` 90.36 / 87.73 (90.34 / 87.46); data-free
(``--calib synthetic``) knapsack 89.82 / 85.01 (89.71 / 84.99); ResNet44 knapsack 92.61 / 90.51 (92.36 / 90.59).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import solve_triangular

__all__ = ["GREEDY_MAX_FEATURES", "GREEDY_STEPS", "GreedyConsumer", "block_cholesky", "block_traces", "channel_blocks",
           "greedy_depth", "greedy_obs_scores", "one_shot_scores"]

# At most this many removal steps per group (a step takes ceil(size / GREEDY_STEPS) channels): one channel per
# step below 65 channels (every CIFAR ResNet group), ResNet-50's 2,048-channel stream 32 at a time.
GREEDY_STEPS = 64
# The greedy steps stop once this share of a group's channels is gone; the rest are ordered by their saliency at
# that point (conditional on the removed ones) in one last step. The updates cost ~ (share removed)^2 x F^3 / 2
# multiply-adds per consumer of F features: ResNet-50's obs scores take 18.1 CPU s (one-shot 12.2; the whole order
# ~4x the greedy part), and CIFAR ResNet20's rows (20% / 40% removed, uniform and knapsack) are identical to the
# whole greedy order's. A uniform or LAMP allocation, whose counts do not read the scores, stops earlier still
# (`greedy_depth`, `passes.select.SCORE_FREE_COUNTS`): ResNet-50, 20% of the parameters, 256 samples, uniform:
# 17.2 -> 9.8 CPU s; LAMP (the default for a parameter target; 2 of the random-weight model's 37 groups pruned,
# one by 52%): the whole obs + seq run 60.6-64.3 -> 56.6-60.4 s wall on 2 cores. The same plan either way.
GREEDY_FRACTION = 0.5
# A group with a consumer wider than this keeps the one-shot order (`one_shot_scores`): its greedy columns would
# add ~F^2 / 2 float32 to the F^2 of its inverse Hessian (R3D-18's 3x3x3 convs over 512 channels: 13,824 features,
# 382 MB more beside 764 MB), and the updates ~F^3 / 8 multiply-adds.
GREEDY_MAX_FEATURES = 8192


class GreedyConsumer:
    """One consumer layer of a group during `greedy_obs_scores`: its updated weights and inverse Hessian."""

    def __init__(self, wa: np.ndarray, K: np.ndarray, feat_ch: np.ndarray, energy: float, size: int,
                 depth: float | None = None):
        """`wa`: [outputs, features + 1] (the last column: the bias input's weight, updated, never removed);
        `K`: the damped inverse Hessian [features + 1, features + 1] (read only); `feat_ch`: the group channel
        of each feature (-1: outside the group, never removed); `energy`: ``tr(W H W^T)``, the saliency unit;
        `depth`: the share of the group's channels the greedy steps will remove (`greedy_obs_scores`; None:
        `GREEDY_FRACTION`)."""
        self.wt = np.array(np.asarray(wa).T, dtype=np.float32)  # [features + 1, outputs]: a channel's rows gather fast
        self.K = K
        self.feat_ch = feat_ch
        self.energy = energy
        counts = np.bincount(feat_ch[feat_ch >= 0], minlength=size)
        # V^T, a step appends rows: at most the features of the channels the greedy steps remove (the last step,
        # which takes the rest, updates nothing); R3D-18's 13,824-feature convs would need 764 MB for all
        depth = GREEDY_FRACTION if depth is None else depth
        steps = min(size, int(np.ceil(depth * size)) + _per_step(size))
        self.rows = int(np.sort(counts)[::-1][:steps].sum())
        self.Vt = np.empty((0, len(K)), dtype=np.float32)  # allocated by the first removal
        self.used = 0
        # (channels, [c, m] features, K'_JJ) per feature count
        self.batches = [(chans, idx, K[idx[:, :, None], idx[:, None, :]].astype(np.float64))
                        for chans, idx in channel_blocks(feat_ch, size)]

    def saliency(self, alive: np.ndarray, size: int) -> np.ndarray:
        """``tr(W'_J (K'_JJ)^-1 W'_J^T) / energy`` of every alive channel J (0 elsewhere)."""
        sal = np.zeros(size)
        for chans, idx, blocks in self.batches:
            live = alive[chans]
            if live.any():
                sal[chans[live]] = block_traces(blocks[live], self.wt[idx[live]], inverse=True)
        return sal / self.energy

    def remove(self, channels: np.ndarray) -> None:
        """The OBS update for removing `channels`' features (their weights become 0)."""
        feats = np.flatnonzero(np.isin(self.feat_ch, channels))
        if len(feats) == 0:
            return
        if not self.used:
            self.Vt = np.empty((self.rows, len(self.K)), dtype=np.float32)
        # K'_B: = K_B: - V_B V^T, as rows: K is symmetric, and row gathers are contiguous
        rows = np.array(self.K[feats], dtype=np.float32)
        if self.used:
            rows -= self.Vt[: self.used, feats].T @ self.Vt[: self.used]
        L = block_cholesky(rows[:, feats].astype(np.float64))
        new = solve_triangular(L, rows, lower=True).astype(np.float32)  # L^-1 K'_B:, so K'_:B K'_BB^-1 K'_B: = new^T new
        self.wt -= new.T @ solve_triangular(L, self.wt[feats], lower=True).astype(np.float32)  # W' -= W'_B L^-T new
        self.wt[feats] = 0.0  # exactly (the update leaves rounding there)
        self.Vt[self.used : self.used + len(feats)] = new
        self.used += len(feats)
        for _, idx, blocks in self.batches:
            part = new.T[idx]  # [channels, m, |B|]
            blocks -= part @ np.transpose(part, (0, 2, 1))


def channel_blocks(feat_ch: np.ndarray, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The group's channels batched by feature count (every channel of a conv has kh x kw): (channels, their
    [channels, m] feature indices) per count m; `feat_ch` gives each feature's channel (-1: outside the group)."""
    order = np.argsort(feat_ch, kind="stable")
    order = order[feat_ch[order] >= 0]
    counts = np.bincount(feat_ch[order], minlength=size)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = []
    for m in np.unique(counts[counts > 0]):
        chans = np.flatnonzero(counts == m)
        out.append((chans, order[starts[chans][:, None] + np.arange(m)[None, :]]))
    return out


def block_traces(blocks: np.ndarray, wf: np.ndarray, inverse: bool) -> np.ndarray:
    """``tr(W_J B^-1 W_J^T)`` (`inverse`) or ``tr(W_J B W_J^T)`` per channel, `wf` [channels, m, outputs]: as
    ``<B^-1, W_J^T W_J>`` with m x m Grams, 10-50x faster than solving against every output (ResNet-50: 512
    channels x 9 features x 512 outputs, 38 -> 4 ms)."""
    gram = wf @ np.transpose(wf, (0, 2, 1))
    return ((np.linalg.inv(blocks) if inverse else blocks) * gram).sum(axis=(1, 2))


def block_cholesky(block: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of a (damped, so positive definite) inverse-Hessian block; float32 rounding in the
    accumulated updates can leave it barely indefinite: then a jitter of its scale is added."""
    block = (block + block.T) / 2
    try:
        return np.linalg.cholesky(block)
    except np.linalg.LinAlgError:
        jitter = 1e-6 * max(float(np.mean(np.abs(np.diag(block)))), 1e-30)
        return np.linalg.cholesky(block + jitter * np.eye(len(block)))


def _per_step(size: int) -> int:
    return -(-size // GREEDY_STEPS)


def one_shot_scores(consumers: list[GreedyConsumer], size: int) -> np.ndarray:
    """Every channel's saliency against the dense layers, summed over the consumers (one-shot OBS)."""
    alive = np.ones(size, dtype=bool)
    return sum((c.saliency(alive, size) for c in consumers), np.zeros(size))


def greedy_depth(size: int, needed: int | None) -> float | None:
    """The share of a group's `size` channels the greedy steps remove when the caller takes only its `needed`
    lowest-scored channels (an allocation whose per-group counts do not depend on the scores: uniform, LAMP), at most
    `GREEDY_FRACTION`; None when no count is given (`greedy_obs_scores` then reads `GREEDY_FRACTION`)."""
    return None if needed is None else min(GREEDY_FRACTION, max(0, needed) / max(1, size))


def greedy_obs_scores(consumers: list[GreedyConsumer], size: int, depth: float | None = None) -> np.ndarray:
    """Scores of a group's `size` channels whose ascending order is the greedy joint OBS removal order
    (`one_shot_scores` when a consumer is wider than `GREEDY_MAX_FEATURES`).

    The greedy steps run until `depth` of the channels are gone (`greedy_depth`); the rest are ordered by their
    saliency at that point. The ``k = depth x size`` lowest scores are those of the whole greedy order: every
    step that removes one of them starts with fewer than k removed, so it is a greedy step either way, and every
    later score is higher. The updates cost ~ depth^2: ResNet-50 at 20% of the parameters removed (uniform,
    ~10% of each group's channels) spends ~1/20 of the 50% depth's."""
    if any(len(c.K) - 1 > GREEDY_MAX_FEATURES for c in consumers):
        return one_shot_scores(consumers, size)
    depth = GREEDY_FRACTION if depth is None else depth
    alive = np.ones(size, dtype=bool)
    scores = np.zeros(size)
    per_step = _per_step(size)
    level, previous = 0.0, -np.inf
    while alive.any():
        marginal = np.zeros(size)
        for c in consumers:
            marginal += c.saliency(alive, size)
        candidates = np.flatnonzero(alive)
        take = per_step if size - len(candidates) < depth * size else len(candidates)
        picked = candidates[np.argsort(marginal[candidates], kind="stable")[:take]]
        for j in picked:
            level = max(level, float(marginal[j]))
            previous = max(level, float(np.nextafter(previous, np.inf)))
            scores[j] = previous
        alive[picked] = False
        if alive.any():
            for c in consumers:
                c.remove(picked)
    return scores
