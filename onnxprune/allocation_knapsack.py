"""Knapsack allocation: take channels where the measured end-to-end error per parameter removed is lowest.

Start reading at `knapsack_order`. Parameters removed (or MACs, or channels) are the only constraint of a
target, and groups differ a lot in what one channel costs and what it is worth: on the CIFAR ResNets a
channel of the narrow first-stage residual stream carries ~6,000 parameters and much of the accuracy,
one of a late block's inner conv ~1,150 parameters and little of it. So each group gets a measured *cost
curve* and the allocation solves the knapsack over them:

1. `measure_curves` - each group alone loses 1/8, 2/8, ... 7/8 of its channels (lowest criterion scores
   first), the removal is repaired and the relative L2 error of the model's outputs is measured on up to
   `SAMPLES` calibration samples (`onnxprune.sensitivity.sensitivity`). The measurement repair is the
   closed-form one the criterion assumes (``seq`` is measured with ``ls``): a sequential repair fitted
   and measured on the same few samples fits the outputs almost exactly and hides every difference.
2. `knapsack_order` - the cost of removing n channels of a group is ``error(n) ** 2`` (squared errors of
   independent perturbations add), its weight ``n x weight per channel`` (parameters, MACs or channels);
   each removal unit is keyed by the slope of the lower convex hull of that curve where the unit ends,
   so sorting all units by key is the greedy knapsack solution (exact on convex curves), and a prefix of
   the order meets a parameter / MAC target exactly as every other allocation (`allocation.plan_for_target`).

Measured on the pretrained CIFAR-10 ResNet20 (91.73%; obs + seq, 256 calibration images, all 10,000 test
images, `bench/accuracy_real.py`): 40% of the parameters removed, top-1 86.23 (uniform 84.81; in a separate
run LAMP 85.91, global 79.54, sensitivity 79.76, stage-3-only 84.55); 20%: 90.04 (uniform 89.33). Data-free
(``--calib synthetic``, curves measured on the synthetic inputs): 81.11 vs 78.91 at 40%, 88.39 vs 88.05 at
20%. ResNet44 (93.10%): calibrated 92.19 vs 91.19 (20%), 89.32 vs 87.58 (40%); synthetic 91.92 vs 90.33
(20%), 87.46 vs 83.23 (40%). Curves measured with the in-sample ``seq`` repair
instead gave 83.69 at 40% (ResNet20), cost = error instead of error^2 79.78, error^3 85.59. The measurement
cost ~60 s (ResNet20) to ~4 min (ResNet44) wall on a loaded 2-core machine while every point built and ran
the pruned model; measured on the masked original, downstream of the group only (`sensitivity_runs`), the
scan of 64 samples takes 20.0 -> 6.2 CPU s on ResNet20 and 2,905 -> 876 CPU s on ResNet-50 (224x224, obs +
ls; bench/sensitivity_speed.py), the same errors to 1.4e-8. The greedy order is additive:
interactions between groups pruned together are not measured. With all 2,000 calibration images instead of 256
(curves still on 64 of them; the repair and the obs statistics on all): ResNet20 90.25 / 86.99, ResNet44 92.27 /
90.67 at 20% / 40%. Curves measured with the real ``seq`` repair on held-out samples were not tried: one repair per
group and ratio (84 on ResNet20, 168 on ResNet44, each refitting everything downstream) is not affordable here.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx

from onnxprune.allocation import Unit, group_steps
from onnxprune.calibration import CalibrationData, CalibrationStats, collect_stats
from onnxprune.channels import ChannelAnalysis
from onnxprune.plan import KeepCounts
from onnxprune.sensitivity import SensitivityRow, sensitivity

RATIOS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
SAMPLES = 64
POWER = 2.0  # cost = error ** POWER; 2: squared errors of independent perturbations add


def measurement_repair(repair: str) -> str:
    """The repair the curves are measured with: ``seq`` is measured with the closed-form ``ls``."""
    return "ls" if repair == "seq" else repair


def measure_curves(
    model: onnx.ModelProto,
    data: CalibrationData,
    criterion: str,
    repair: str,
    stats: CalibrationStats | None = None,
    allow_inexact: bool = False,
) -> list[SensitivityRow]:
    """Each group's relative output error at `RATIOS` of its channels removed alone, on `data`.

    Args:
        model: the model to measure.
        data: the samples the errors are measured on (at most `SAMPLES` inputs, evenly spaced, are used: a
            model exported with a fixed batch of 8 runs 8 of them per sample; counting samples, PP-OCRv4's
            detector at --shape x=8,... took > 25 min for its curves against 190 s at batch 1).
        criterion: the criterion ordering each group's channels.
        repair: the configured repair (`measurement_repair` says what is measured).
        stats: calibration statistics of `model`; collected from `data` when the repair needs them and
            none are given.
        allow_inexact: include LayerNorm/softmax-coupled groups.
    """
    data = data.for_model(model)
    runs = max(1, SAMPLES // data.batch)  # SAMPLES inputs: a model with a fixed batch B runs B of them at a time
    if data.n > runs:  # evenly spaced: a file sorted by class still gives every class
        pick = np.linspace(0, data.n - 1, runs).round().astype(int)
        data = data.take(pick)
    used = measurement_repair(repair)
    if stats is None and (used == "ls" or criterion == "obs"):
        stats = collect_stats(model, data, hessian=True)
    return sensitivity(model, data, list(RATIOS), criterion, used, stats, allow_inexact)


def lower_hull_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Slope of the lower convex hull of the points (x, y) over each interval [x[i], x[i+1]].

    `x` is increasing. The hull's slopes never decrease, so they are the cheapest marginal costs a greedy
    choice can reach (a point above the hull is skipped: its interval takes the chord's slope).
    """
    hull = [0]
    for i in range(1, len(x)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (y[b] - y[a]) * (x[i] - x[a]) >= (y[i] - y[a]) * (x[b] - x[a]):  # b on or above chord a-i
                hull.pop()
            else:
                break
        hull.append(i)
    slopes = np.empty(len(x) - 1)
    for a, b in itertools.pairwise(hull):
        slopes[a:b] = (y[b] - y[a]) / max(x[b] - x[a], 1e-300)
    return slopes


def knapsack_order(
    analysis: ChannelAnalysis,
    scores: dict[int, np.ndarray],
    rows: list[SensitivityRow],
    ratios: list[float],
    *,
    weight: dict[int, float] | None = None,
    round_to: int = 1,
    max_group_ratio: float = 0.9,
    keep_counts: KeepCounts | None = None,
    power: float = POWER,
) -> list[Unit]:
    """All removal units ordered by measured error per unit of `weight` removed (greedy knapsack).

    Args:
        analysis: channel analysis of the model.
        scores: criterion scores per group (which channels of a group go first).
        rows: measured errors per group at `ratios` (`measure_curves`); a group without a row is kept.
        ratios: the fractions the rows were measured at.
        weight: what one channel of each group is worth towards the target (parameters by default:
            ``group.params / group.size``; MACs per channel for a MAC target; 1 for a channel ratio).
        round_to, max_group_ratio, keep_counts: the allowed kept counts (`allocation.group_steps`).
        power: the cost of a group's removal is its measured error to this power.

    No group loses more than its largest measured removal.
    """
    by_group = {r.group: r for r in rows}
    units: list[Unit] = []
    steps = group_steps(analysis, round_to, keep_counts, max_group_ratio)
    for g in analysis.groups:
        row = by_group.get(g.id)
        if row is None:
            continue
        points = {0: 0.0}
        for r, e in zip(ratios, row.errors):
            n = min(g.size - g.min_keep, int(math.floor(r * g.size + 1e-9)))
            if n > 0 and np.isfinite(e):
                points[n] = max(points.get(n, 0.0), float(e) ** power)
        removed = np.array(sorted(points))
        if len(removed) < 2:
            continue
        cost = np.maximum.accumulate(np.array([points[n] for n in removed]))
        per_channel = weight[g.id] if weight is not None else max(g.params, 1) / g.size
        slopes = lower_hull_slopes(removed * max(per_channel, 1e-12), cost)
        order = np.argsort(np.asarray(scores[g.id], dtype=np.float64), kind="stable")
        counts = steps[g.id]
        counts = counts[g.size - counts <= removed[-1]]
        for before, after in itertools.pairwise(counts):
            gone = g.size - after
            segment = int(np.searchsorted(removed, gone, side="left")) - 1  # removed[s] < gone <= removed[s+1]
            units.append(Unit(g.id, order[g.size - before : gone], float(slopes[min(max(segment, 0), len(slopes) - 1)])))
    units.sort(key=lambda u: (u.key, u.group))  # stable: a group's units keep their order on equal keys
    return units


def macs_per_channel(analysis: ChannelAnalysis) -> dict[int, float]:
    """Group id -> MACs one channel of the group costs (the MACs of removing the whole group, averaged)."""
    from onnxprune.allocation import predicted
    from onnxprune.plan import PruningPlan

    _, dense = predicted(analysis, PruningPlan())
    out = {}
    for g in analysis.groups:
        n = max(1, g.size // 2)
        _, after = predicted(analysis, PruningPlan({g.id: np.arange(n)}))
        out[g.id] = max(dense - after, 0) / n
    return out
