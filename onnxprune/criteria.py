"""Importance criteria: each is one class with `score(group, analysis) -> array[group.size]`.

Scores are aggregated over all weight members of a coupled group. Each member's per-channel scores are
divided by their mean before aggregation, so a wide layer with small weights and a narrow layer with large
weights weigh equally, and groups compare in a global ranking. Criteria are stateless: the random
criterion derives its generator from (seed, group id).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from onnxprune import cblas
from onnxprune.calibration import single_threaded_blas
from onnxprune.channels import ChannelAnalysis, ChannelGroup, ChannelSlice
from onnxprune.greedy_obs import GreedyConsumer, block_traces, channel_blocks, greedy_depth, greedy_obs_scores
from onnxprune.quantized import effective_value


class Criterion:
    needs_data = False
    comparable = False  # scores already compare across groups (no per-group renormalisation)
    prefix_order = False  # `score_all(needed=...)` saves work when only a prefix of each group's order is taken

    @property
    def name(self) -> str:
        """The criterion's name (`CRITERIA` key); subclasses set it as a class attribute or a property."""
        return "base"

    def score(self, group: ChannelGroup, analysis: ChannelAnalysis) -> np.ndarray:
        raise NotImplementedError

    def score_all(self, analysis: ChannelAnalysis, groups=None, needed: dict[int, int] | None = None
                  ) -> dict[int, np.ndarray]:
        """Every group's `score`. `needed` (group id -> count): the caller takes only that many of the group's
        lowest-scored channels, so only their order must be exact (None: every channel's, as allocations that
        compare groups need); a criterion may save work with it (`OBS`), the others ignore it."""
        return {g.id: self.score(g, analysis) for g in (analysis.groups if groups is None else groups)}


def scored_members(group: ChannelGroup, analysis: ChannelAnalysis) -> list[ChannelSlice]:
    """Main weights of the group (Conv/Gemm/MatMul/embedding), or every parameter if it has none."""
    members = [m for m in group.param_members if analysis.roles.get(m.tensor) == "weight"]
    return members or group.param_members


def per_channel(member: ChannelSlice, values_per_position: np.ndarray, size: int) -> np.ndarray:
    """Sum a per-position quantity into the member's channels."""
    return np.bincount(member.channel_of, weights=values_per_position, minlength=size)


def position_norms(array: np.ndarray, axis: int, p: int) -> np.ndarray:
    """Sum of |w| (p=1) or w^2 (p=2) over every axis but `axis`, one value per position."""
    a = np.asarray(array)
    if a.dtype != np.float64:
        a = a.astype(np.float32, copy=False)  # fp16 sums overflow; float32 pairwise sums are accurate
    others = tuple(i for i in range(a.ndim) if i != axis)
    values = np.abs(a) if p == 1 else np.square(a)
    return values.sum(axis=others).astype(np.float64)


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
            w = effective_value(analysis.graph, m.tensor)
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


def _normalised_mean(parts: list[np.ndarray], size: int) -> np.ndarray:
    """Average of per-member channel scores, each divided by its mean (layers of any scale compare)."""
    if not parts:
        return np.ones(size)
    return sum(p / (np.mean(np.abs(p)) + 1e-12) for p in parts) / len(parts)


def member(group: ChannelGroup, tensor: str, axis: int) -> ChannelSlice | None:
    """The group's member on `tensor`'s `axis` (a consumer reads the group there), or None."""
    for m in group.members:
        if m.tensor == tensor and m.axis == axis:
            return m
    return None


@dataclass(frozen=True)
class BNScale(Criterion):
    """|gamma| of the normalisation scales in the group (network slimming); L1 where a group has none."""

    name = "bn"

    def score(self, group, analysis):
        parts = []
        for m in group.param_members:
            if analysis.roles.get(m.tensor) == "scale":
                gamma = np.abs(np.asarray(analysis.graph.const(m.tensor), dtype=np.float64)).reshape(-1)
                parts.append(per_channel(m, gamma[m.positions], group.size))
        return _normalised_mean(parts, group.size) if parts else Magnitude(1).score(group, analysis)


@dataclass(frozen=True)
class FPGM(Criterion):
    """Filter pruning via geometric median: a channel close to all others in its layer is redundant.

    Each member's positions are vectors (the weight sliced on the member axis); a position scores the sum
    of its Euclidean distances to the other positions of the same member.
    """

    name = "fpgm"

    def score(self, group, analysis):
        parts = []
        for m in scored_members(group, analysis):
            w = np.asarray(effective_value(analysis.graph, m.tensor), dtype=np.float64)
            vec = np.moveaxis(w, m.axis, 0).reshape(w.shape[m.axis], -1)[m.positions]
            sq = (vec**2).sum(axis=1)
            d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * vec @ vec.T, 0.0)
            parts.append(per_channel(m, np.sqrt(d2).sum(axis=1), group.size))
        return _normalised_mean(parts, group.size)


def lamp_transform(values: np.ndarray) -> np.ndarray:
    """LAMP score: v_i^2 / sum of v_j^2 over all j with v_j >= v_i (in (0, 1], the largest scores 1)."""
    sq = np.asarray(values, dtype=np.float64) ** 2
    ordered = np.sort(sq)
    suffix = np.cumsum(ordered[::-1])[::-1]  # suffix[i] = sum of ordered[i:]
    first = np.searchsorted(ordered, sq, side="left")  # ties share the sum over every v_j >= v_i
    return sq / np.maximum(suffix[first], 1e-300)


@dataclass(frozen=True)
class LAMP(Criterion):
    """Layer-adaptive magnitude pruning (Lee et al. 2021) on channel L2 norms.

    Scores are comparable across layers as they are (a layer's largest channel scores 1), so a global
    ranking uses them without renormalisation (`comparable = True`).
    """

    name = "lamp"
    comparable = True

    def score(self, group, analysis):
        l2 = Magnitude(2).score(group, analysis)
        return lamp_transform(l2)


class DataCriterion(Criterion):
    """A criterion that reads calibration statistics (`onnxprune.calibration.collect_stats`)."""

    needs_data = True

    def consumer_members(self, group, analysis):
        """(consumer, weight member on its input axis, stats) for every consumer layer reading the group."""
        stats = self.stats
        out = []
        for c in stats.consumers.values():
            m = member(group, c.weight, c.in_axis)
            if m is not None and c.name in stats.stats:
                out.append((c, m, stats.stats[c.name]))
        return out


@dataclass(frozen=True)
class Activation(DataCriterion):
    """Mean |activation| of each channel at the inputs of the layers that read it (calibration data)."""

    stats: object = None
    name = "activation"

    def score(self, group, analysis):
        parts = [per_channel(m, st.mean_abs[m.positions], group.size) for _, m, st in self.consumer_members(group, analysis)]
        return _normalised_mean(parts, group.size) if parts else Magnitude(1).score(group, analysis)


@dataclass(frozen=True)
class APoZ(DataCriterion):
    """1 - average percentage of zeros of each channel at its consumers' inputs (calibration data)."""

    stats: object = None
    name = "apoz"

    def score(self, group, analysis):
        parts = []
        for _, m, st in self.consumer_members(group, analysis):
            counts = np.bincount(m.channel_of, minlength=group.size).clip(1)
            parts.append(per_channel(m, 1.0 - st.apoz[m.positions], group.size) / counts + 1e-6)
        return _normalised_mean(parts, group.size) if parts else Magnitude(1).score(group, analysis)


def damped_inverse(H: np.ndarray, damp: float, overwrite: bool = False) -> np.ndarray | None:
    """``(H + damp * mean(diag H[:-1]) * I)^-1`` of a PSD input Hessian (last row/column: the bias input).

    By Cholesky (LAPACK potrf + potri, `_cholesky_inverse`) in float32, in place on one copy, float64 only when
    float32 is not positive definite: measured on a 2305-feature Hessian (ResNet-50's 3x3 convs reach 4609), 1 thread,
    ``np.linalg.inv`` in float64 1.20 s, potri float64 0.89 s, potri float32 0.18 s, relative difference
    5e-7 -- far below what ranks channels -- and no n x n float64 temporaries (~170 MB each at 4609).
    The upper triangle is mirrored through a boolean mask: 4,609 features 1.67 -> 1.06 s (tril_indices' index
    arrays took the difference, holding the GIL).

    `overwrite`: `H` is a C-ordered float32 array the caller gives up; it is factored and inverted in place (its
    transpose is the same symmetric matrix in Fortran order): no copy, 85 MB less per 4,609-feature Hessian
    while `OBS.score_all` scores two groups at once. None when its float32 Cholesky fails (H is then spent:
    the caller retries with a float64 H).
    """
    n = len(H)
    lam = damp * float(np.mean(np.diag(H)[:-1])) + 1e-12  # a dead input (all zeros: H's features 0) stays invertible
    if overwrite:
        assert H.dtype == np.float32 and H.flags.c_contiguous
        Hd = H.T
        Hd[np.diag_indices(n)] += lam
        if _cholesky_inverse(Hd) == 0:
            np.copyto(Hd, Hd.T, where=np.tri(n, k=-1, dtype=bool))
            return Hd
        return None
    for dtype in (np.float32, np.float64):
        K = np.array(H, dtype=dtype, order="F")  # Fortran order: LAPACK works on it in place
        K[np.diag_indices(n)] += lam
        if _cholesky_inverse(K) == 0:
            # potri fills the upper triangle only: mirror it (a boolean-mask copy, not tril_indices' two
            # int64 index arrays of n^2 / 2 entries: 170 MB and ~1 s per 4,609-feature Hessian)
            np.copyto(K, K.T, where=np.tri(n, k=-1, dtype=bool))
            return K
    return np.linalg.inv(np.asarray(H, dtype=np.float64) + lam * np.eye(n))


def _cholesky_inverse(fortran: np.ndarray) -> int:
    """The inverse of the SPD Fortran-ordered `fortran` into its upper triangle, in place; LAPACK's info. Through
    `cblas` (the GIL released: `OBS.score_all`'s two threads run together), else scipy's wrappers."""
    lib = cblas.library()
    if lib is not None:
        return cblas.cholesky_inverse(lib, fortran)
    from scipy.linalg import lapack

    single = fortran.dtype == np.float32
    factor, info = (lapack.spotrf if single else lapack.dpotrf)(fortran, lower=0, overwrite_a=1, clean=0)
    if info == 0:
        inverse, info = (lapack.spotri if single else lapack.dpotri)(factor, lower=0, overwrite_c=1)
        if info == 0 and not np.shares_memory(inverse, fortran):
            fortran[...] = inverse
    return int(info)


def channel_saliency(wm: np.ndarray, K: np.ndarray, feat_ch: np.ndarray, size: int, inverse: bool) -> np.ndarray:
    """Per channel k with features f: ``tr(W_f K_ff^-1 W_f^T)`` (`inverse`) or ``tr(W_f K_ff W_f^T)``.

    Channels with the same number of features (every channel of a conv: kh x kw) are one batch
    (`greedy_obs.channel_blocks`), each trace an elementwise product with an m x m Gram (`greedy_obs.block_traces`;
    no [outputs, outputs] matrix per channel, as before: ResNet-50's obs scoring spent 44% of its time forming those).
    """
    sal = np.zeros(size)
    for chans, idx in channel_blocks(feat_ch, size):
        blocks = K[idx[:, :, None], idx[:, None, :]].astype(np.float64)  # [channels, m, m]
        sal[chans] = block_traces(blocks, np.transpose(wm[:, idx], (1, 2, 0)), inverse)  # wf: [channels, m, outputs]
    return sal


@dataclass(frozen=True)
class OBS(DataCriterion):
    """Optimal Brain Surgeon saliency over all consumer layers of the group.

    For a consumer y = W x + b with input Hessian H = E[[x 1][x 1]^T] (damped), removing the features F
    of one channel and optimally updating the remaining weights costs
    ``tr(W_F (H^-1)_FF^-1 W_F^T)``; it is divided by the consumer's output energy ``tr(W H W^T)`` so
    layers compare, and summed over consumers. Without calibration data (`stats` None) H is the
    data-free surrogate from BatchNorm statistics: diagonal, the channel variance (the mean is restored
    by bias compensation), so the saliency becomes sum(W_F^2) * var.

    The saliency is the output error that the repair actually applied leaves behind (`repair`): with
    ``ls`` the OBS update above; with ``bias`` only the mean is restored, so the cost is
    ``tr(W_F Cov_FF W_F^T)`` (centred second moment); with ``none`` nothing is restored and the cost is
    ``tr(W_F H_FF W_F^T)`` (OBD with the off-diagonal terms, uncentred). Data-free: var or var + mean^2.

    With calibration data and the ``ls`` repair the channels are ranked greedily (`onnxprune.greedy_obs`):
    a channel's saliency is measured after the cheaper channels are gone and the weights updated for them,
    so two channels that can each stand in for the other are not both scored free.
    """

    stats: object = None
    damp: float = 0.01
    repair: str = "ls"
    name = "obs"

    needs_data = False  # works data-free with the BatchNorm surrogate
    prefix_order = True  # the greedy order stops at the channels taken (`greedy_obs.greedy_depth`)

    def score_all(self, analysis, groups=None, needed=None):
        """Every group's `score`; with calibration Hessians, `SCORE_THREADS` groups at once, largest first.
        `needed` bounds the greedy order's depth per group (`greedy_obs.greedy_depth`).

        A group's scores read only its own consumers' Hessians, so groups are independent and the result is
        the same in any order. The work is LAPACK/BLAS (Cholesky inverses through `cblas`, the greedy order's
        rank-k updates through numpy), which releases the GIL: ResNet-50, 256 samples, 20% removed, 2 quiet cores: 13.3 -> ~9.5 s wall, peak RSS
        unchanged (each 4,609-feature Hessian inverted in place: `damped_inverse(overwrite=True)`).
        """
        groups = list(analysis.groups if groups is None else groups)
        needed = needed or {}
        if self.stats is None or SCORE_THREADS <= 1 or len(groups) < 2:
            return {g.id: self.score(g, analysis, needed.get(g.id)) for g in groups}

        def cost(group: ChannelGroup) -> int:  # a Cholesky inverse is cubic in the consumer's features
            return sum(len(st.hessian) ** 3 for _, _, st in self.consumer_members(group, analysis))

        # BLAS single-threaded once around the pool: each score's own `single_threaded_blas` then restores
        # one thread, not the process default another thread's block set
        with single_threaded_blas(), ThreadPoolExecutor(SCORE_THREADS) as pool:
            futures = {g.id: pool.submit(self.score, g, analysis, needed.get(g.id))
                       for g in sorted(groups, key=cost, reverse=True)}
            return {g.id: futures[g.id].result() for g in groups}

    def consumer_members(self, group, analysis):
        if self.stats is not None:
            return super().consumer_members(group, analysis)
        from onnxprune.calibration import consumers

        out = []
        for c in consumers(analysis.graph):
            m = member(group, c.weight, c.in_axis)
            if m is not None:
                out.append((c, m, None))
        return out

    def score(self, group, analysis, needed: int | None = None):
        from onnxprune.moments import channel_moments

        depth = greedy_depth(group.size, needed)
        total = np.zeros(group.size)
        found = False
        greedy: list[GreedyConsumer] = []
        for c, m, st in self.consumer_members(group, analysis):
            w = np.asarray(effective_value(analysis.graph, c.weight), dtype=np.float64)  # QDQ: dequantized
            wm = c.weight_matrix(w)
            feat_pos = c.feature_channel(w.shape)
            pos_channel = np.full(w.shape[c.in_axis], -1)
            pos_channel[m.positions] = m.channel_of
            feat_ch = pos_channel[feat_pos]
            if st is not None:
                # ls: a float32 mean, inverted in place (`damped_inverse`); the others read float64
                H = np.divide(st.hessian, max(1, st.rows), dtype=np.float32) if self.repair == "ls" else st.H
                wa = np.concatenate([wm, np.zeros((wm.shape[0], 1))], axis=1).astype(H.dtype)  # no H copy
                energy = float(((wa @ H) * wa).sum(dtype=np.float64))
                if energy <= 0:  # a dead input (all zeros on the data): removing any channel costs this layer nothing
                    found = True
                    continue
                if self.repair == "ls":  # ranked below, every consumer together
                    with single_threaded_blas():  # OpenBLAS threads spinning on 2 loaded cores: 5x the CPU time
                        K = damped_inverse(H, self.damp, overwrite=True)
                        if K is None:  # not positive definite in float32
                            K = damped_inverse(st.H, self.damp)
                    del H
                    assert K is not None
                    greedy.append(GreedyConsumer(wa, K, feat_ch, energy, group.size, depth))
                    found = True
                    continue
                # no weight update: the error is the removed part's own (centred if bias-repaired) energy
                mu = H[-1, :-1]
                K = H[:-1, :-1] - (np.outer(mu, mu) if self.repair == "bias" else 0.0)
                sal = channel_saliency(wm, K, feat_ch, group.size, inverse=False)
            else:
                mom = channel_moments(analysis.graph, c.x, c.x_axis)
                var = np.ones(w.shape[c.in_axis]) if mom is None else mom[1] + 1e-12
                mean2 = np.zeros(w.shape[c.in_axis]) if mom is None else mom[0] ** 2
                contrib = (wm**2).sum(axis=0)
                energy = float((contrib * (var + mean2)[feat_pos]).sum()) + 1e-12
                lost = var if self.repair != "none" else var + mean2
                sal = np.bincount(feat_ch[feat_ch >= 0], weights=(contrib * lost[feat_pos])[feat_ch >= 0],
                                  minlength=group.size)
            total += sal / energy
            found = True
        if greedy:
            with single_threaded_blas():
                total += greedy_obs_scores(greedy, group.size, depth)
        return total if found else Magnitude(2).score(group, analysis)


# groups scored at once by `OBS.score_all` (one BLAS thread each)
SCORE_THREADS = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

CRITERIA: dict[str, Criterion] = {
    "l1": Magnitude(1),
    "l2": Magnitude(2),
    "random": Random(0),
    "bn": BNScale(),
    "fpgm": FPGM(),
    "lamp": LAMP(),
    "activation": Activation(),
    "apoz": APoZ(),
    "obs": OBS(),
}
DATA_CRITERIA = {"activation", "apoz"}  # need --calib; obs falls back to a data-free surrogate


def get_criterion(name: str, seed: int = 0, stats=None, repair: str = "ls") -> Criterion:
    """The criterion called `name`; data criteria get the calibration statistics `stats`.

    `repair` is the repair that will follow (none | bias | ls): the OBS saliency measures the error left
    after exactly that repair.
    """
    from onnxprune.errors import UsageError, missing_calibration

    if name == "random":
        return Random(seed)
    if name not in CRITERIA:
        raise UsageError(f"unknown criterion {name!r} (choose from {', '.join(sorted(CRITERIA))})")
    if name in DATA_CRITERIA and stats is None:
        raise missing_calibration(f"criterion {name!r}")
    if name == "obs":
        return OBS(stats=stats, repair=repair)
    if name == "activation" and stats is not None:
        return Activation(stats=stats)
    if name == "apoz" and stats is not None:
        return APoZ(stats=stats)
    return CRITERIA[name]
