"""Latency-weighted ratios: remove the fraction of channels ``--ratio`` asks for, more where time is spent.

Start reading at `weighted_fractions`. A uniform ratio shrinks every group alike, so the MACs of pointwise
layers (touched by two pruned groups) fall as ``(1 - r)**2`` while the time of depthwise convolutions, stems,
heads and memory-bound nodes (touched by one) falls as ``1 - r``: on depthwise networks the MACs fall
faster than the time (`predict.uniform_bound`). Here each group's removed fraction is weighted by its
*time density* ``rho = (its layers' share of the table's time) / (their share of the MACs)``, the time being
what its channels buy (the fall of its curve, extrapolated to zero channels: a flat curve buys nothing):
``f_g = min(max_group_ratio, c * r * rho_g ** alpha)``, with ``c`` chosen (bisection) so that the channels
removed over all groups are the same as with the uniform ratio. Groups without a curve weigh 1.

Measured (onnxruntime 1 thread, thread CPU time, fastest of 25 interleaved runs, load average 9-11 on 2
cores; ``bench/latency.py`` rows ``auto`` (weighted) and ``auto-u`` (uniform) re-measure), speedup (efficiency) at the same channel fraction:

===============  =====  ===============  ===============  ================================
model            ratio  uniform          weighted         weighted by the dense layer time
===============  =====  ===============  ===============  ================================
EfficientNet-B0  0.3    1.37x (0.75)     1.81x (0.96)     1.82x (0.94)
EfficientNet-B0  0.5    2.22x (0.65)     2.48x (0.88)     2.51x (0.86)
EfficientNet-B0  0.7    3.48x (0.50)     3.73x (0.70)     3.79x (0.69)
MobileNetV2      0.5    2.45x (0.68)                      2.48x (0.80)
MobileNetV2      0.7    3.49x (0.56)                      3.84x (0.71)
ResNet-50        0.3    1.88x (1.02)                      1.69x (0.95)
ResNet-50        0.7    7.46x (0.91)                      6.41x (0.93)
===============  =====  ===============  ===============  ================================

(``alpha = 2``; the last column weighed each group by its layers' whole dense time, before `_scalable_ms`;
grids at alignment 4: with the NCHWc block alignment of `grid.aligned` the weighted EfficientNet-B0 rows
reached 0.97/1.04/0.99/0.85 at 0.1/0.3/0.5/0.7.)
On depthwise networks the weighted plan is as fast or faster than the uniform one and its latency follows
the MACs more closely; on ResNet-50, whose uniform bound is ~1.0, it is slower, so
`passes.latency_select.weighted_ratio_plan` keeps uniform ratios where the bound reaches 0.9. It moves
channels from MAC-heavy to time-heavy groups, so the accuracy trade-off differs from uniform pruning (not
measured here).

**Which prices.** The table's micro-model prices over-rate depthwise convolutions and memory-bound nodes
against the rest (in the model a depthwise conv costs ~0.35x its price, a pointwise one ~0.7x:
`latency.calibrate`). `best_weighted_plan` builds the plan from both the micro-model and the in-model
prices and keeps the one the in-model table predicts more efficient (the table in its docstring).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from onnxprune.channels import ChannelAnalysis
from onnxprune.latency.table import GroupCurve, LatencyTable
from onnxprune.metrics import count_macs, node_macs
from onnxprune.plan import KeepCounts, PruningPlan, allowed_counts, snap_keep

__all__ = ["best_weighted_plan", "time_density", "weighted_fractions", "weighted_plan"]

MAX_DENSITY = 100.0  # a group whose layers hold no MACs (memory-bound only) weighs at most this


def time_density(table: LatencyTable, analysis: ChannelAnalysis) -> dict[int, float]:
    """Group id -> the share of the priced time its channels buy over its layers' share of the MACs (1.0
    without a curve)."""
    graph = analysis.graph
    by_name = {(n.name or n.output[0]): n for n in graph.model.graph.node}
    macs_total = max(count_macs(graph), 1)
    time_total = sum(table.node_dense_ms.values()) or 1.0
    out: dict[int, float] = {}
    for g in analysis.groups:
        curve = table.curves.get(g.id)
        if curve is None:
            out[g.id] = 1.0
            continue
        ms = _scalable_ms(curve)
        macs = sum(node_macs(graph, by_name[n]) for n in curve.nodes if n in by_name)
        share = macs / macs_total
        out[g.id] = MAX_DENSITY if share <= 0 else min(MAX_DENSITY, (ms / time_total) / share)
    return out


def _scalable_ms(curve: GroupCurve) -> float:
    """The time of a group's layers that its channels buy: the fall of its curve from the dense size to its
    lowest measured count, extrapolated to zero channels (a flat curve, e.g. a squeeze-excitation layer on a
    1x1 map whose time is the call, buys none, so pruning it would cost accuracy for nothing)."""
    lowest, size = curve.counts[0], curve.size
    if size <= lowest:
        return 0.0
    return max(curve.ms[-1] - curve.ms[0], 0.0) / (1 - lowest / size)


def weighted_fractions(
    sizes: Mapping[int, int], density: Mapping[int, float], ratio: float, *, alpha: float = 2.0,
    max_group_ratio: float = 0.9,
) -> dict[int, float]:
    """Group id -> fraction of its channels to remove: ``min(max_group_ratio, c * ratio * density**alpha)``
    with ``c`` such that the channels removed total ``ratio`` of all channels (as far as the cap allows)."""
    if ratio <= 0:
        return dict.fromkeys(sizes, 0.0)
    weight = {g: float(density.get(g, 1.0)) ** alpha for g in sizes}
    wanted = ratio * sum(sizes.values())

    def removed(c: float) -> float:
        return sum(sizes[g] * min(max_group_ratio, c * ratio * weight[g]) for g in sizes)

    lo, hi = 0.0, 1.0
    while removed(hi) < wanted and hi < 1e9:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed(mid) < wanted else (lo, mid)
    return {g: min(max_group_ratio, hi * ratio * weight[g]) for g in sizes}


def weighted_plan(
    analysis: ChannelAnalysis,
    scores: Mapping[int, np.ndarray],
    table: LatencyTable,
    ratio: float,
    *,
    keep_counts: KeepCounts | None = None,
    alpha: float = 2.0,
    max_group_ratio: float = 0.9,
    top: str = "nearest",
    blend: float = 0.0,
) -> PruningPlan:
    """Remove about `ratio` of all channels, each group its `weighted_fractions` share, lowest scores first,
    kept counts snapped to `keep_counts` (`plan.snap_keep`).

    Args:
        blend: in [0, 1]: each group's fraction is ``(1 - blend) * weighted + blend * ratio`` (both remove
            `ratio` of all channels, so every blend does; 1 is the uniform ratio).
    """
    plan = PruningPlan()
    if ratio <= 0:
        return plan
    sizes = {g.id: g.size for g in analysis.groups}
    fractions = weighted_fractions(sizes, time_density(table, analysis), ratio, alpha=alpha,
                                   max_group_ratio=max_group_ratio)
    if blend > 0:
        fractions = {g: (1 - blend) * f + blend * ratio for g, f in fractions.items()}
    for g in analysis.groups:
        keep = snap_keep(g.size - int(math.floor(fractions[g.id] * g.size + 1e-9)), allowed_counts(g, keep_counts), top)
        if keep < g.size:
            order = np.argsort(scores[g.id], kind="stable")
            plan.removed[g.id] = np.sort(order[: g.size - keep])
    return plan


#: a candidate plan scores (predicted efficiency) ** EFFICIENCY_WEIGHT * (predicted speedup): efficiency
#: counts twice as much as speed (see `best_weighted_plan`)
EFFICIENCY_WEIGHT = 2.0


def best_weighted_plan(
    analysis: ChannelAnalysis,
    scores: Mapping[int, np.ndarray],
    table: LatencyTable,
    ratio: float,
    *,
    keep_counts: KeepCounts | None = None,
    alpha: float = 2.0,
    max_group_ratio: float = 0.9,
) -> PruningPlan:
    """The `weighted_plan` whose weights come from the micro-model prices (``table.alone``) or from the
    in-model prices (`table`, calibrated by `latency.calibrate`), whichever scores higher by the in-model
    prediction: ``efficiency ** EFFICIENCY_WEIGHT * speedup`` (predicted speedup over the MACs reduction,
    and the predicted speedup). An uncalibrated table has one candidate.

    Why two, and why that score: measured (onnxruntime 1 thread, thread CPU time, fastest of 50-60
    interleaved runs, load average 10-11 on 2 cores; speedup (efficiency)), the in-model weights track
    the MACs better at high ratios, while at low ones they remove fewer MACs for little or no efficiency:

    ===============  =====  ===================  ===================  ==============================
    model            ratio  micro-model weights  in-model weights     predicted eff., micro / in-model
    ===============  =====  ===================  ===================  ==============================
    EfficientNet-B0  0.1    1.39x (1.11)         1.09x (1.01)         1.09 / 1.06
    EfficientNet-B0  0.3    1.83x (1.03)         1.61x (1.06)         1.03 / 1.06
    MobileNetV2      0.3    1.95x (1.09)         1.57x (1.05)         0.96 / 1.01
    MobileNetV2      0.5    2.45x (0.99)         2.50x (1.04)         0.86 / 0.87
    EfficientNet-B0  0.5    2.30x (0.92)         2.17x (0.97)         0.92 / 0.97
    MobileNetV2      0.7    3.34x (0.79)         3.36x (0.91)         0.65 / 0.72
    EfficientNet-B0  0.7    3.94x (0.85)         3.48x (0.88)         0.67 / 0.74
    ===============  =====  ===================  ===================  ==============================

    (EfficientNet-B0 at 0.5: the CLI, 40 runs, load 8.) The in-model predictor is pessimistic at high
    ratios (MobileNetV2 at 0.7: predicted efficiency 0.72, measured 0.91) but its efficiency gaps order
    the rows: 0.05-0.07 where the in-model weights won clearly (0.5 and 0.7), at most 0.05 with a 12-17%
    slower plan at 0.1-0.3. Scoring efficiency squared times speed takes the micro-model weights at
    0.1-0.3 and MobileNetV2 0.5 and the in-model ones at EfficientNet-B0 0.5 and both 0.7 rows.

    The CLI's default no longer calls this: `latency.ratio_choice` scores the same way over more candidates
    (weight exponents 2 and 4, blends with the uniform ratio, the uniform plans) and drops those predicted
    slower than ``--round-to 1``.
    """
    from onnxprune.latency.predict import macs_reduction, predicted_speedup

    sources = [t for t in (table.alone, table) if t is not None]
    best: tuple[float, PruningPlan] | None = None
    for source in sources:
        plan = weighted_plan(analysis, scores, source, ratio, keep_counts=keep_counts, alpha=alpha,
                             max_group_ratio=max_group_ratio)
        kept = plan.kept(analysis)
        speedup = predicted_speedup(table, kept)
        score = (speedup / macs_reduction(table, analysis, kept)) ** EFFICIENCY_WEIGHT * speedup
        if best is None or score > best[0]:
            best = (score, plan)
    assert best is not None
    return best[1]
