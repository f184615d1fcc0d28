"""Allocation: how many channels each group loses, for a ratio or a parameter / MAC target.

Start reading at `removal_order`. Every allocation is a single *order of removal units*: one unit takes a
group from one allowed kept count to the next lower one (`plan.KeepCounts`: every count, the multiples of
``round_to``, or the bottoms of measured latency steps), lowest scores first within the group:

* ``uniform``: units interleaved so every group loses the same fraction at every point of the order;
* ``global``: units ranked by their score normalised by the group's mean score (or raw scores when the
  criterion's scores already compare across groups, e.g. LAMP);
* ``lamp``: scores turned into LAMP scores per group (s^2 / sum of s_j^2 >= s^2), ranked globally, so
  each layer keeps its own large channels (layer-adaptive sparsity, Lee et al. 2021);
* ``sensitivity``: units ranked by the measured end-to-end error of their group (`sensitivity_order`);
* ``knapsack``: units ranked by measured end-to-end error per parameter (or MAC) removed, the greedy
  knapsack over the groups' measured cost curves (`onnxprune.allocation_knapsack`).

A target (`--target-params`, `--target-macs`: what to *keep*, an absolute count or a percentage) is met
by binary search over prefixes of that order, counting parameters and MACs from the analysis alone (the
pruned shape of every dim), so the result is the smallest removal that meets the target: consecutive
prefixes differ by one unit of one group, which is the granularity guarantee. A latency target orders
the same units by importance lost per millisecond saved instead (`latency_allocation`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from onnxprune.channels import ChannelAnalysis, DimRef
from onnxprune.errors import UsageError
from onnxprune.metrics import count_macs
from onnxprune.plan import KeepCounts, PruningPlan, allowed_counts, floor_keep, multiples_grid, snap_keep
from onnxprune.quantized import is_parameter

ALLOCATIONS = ("uniform", "global", "lamp", "sensitivity", "knapsack")


def default_allocation(*, global_ranking: bool = False, latency_target: bool = False, params_target: bool = False) -> str:
    """The allocation when none is named: ``global`` with ``--global`` or a latency target (importance per
    millisecond), ``lamp`` for a parameter target, else ``uniform`` (``--ratio``: every group's fraction; a MAC
    target).

    Why LAMP for a parameter target: where groups may lose different fractions, LAMP's layer-adaptive budgets beat
    the uniform fraction in every row measured, with no measurement of its own (CIFAR-10 ResNet20, 91.73%, all
    10,000 test images, 20% of the parameters removed: l1 no repair 63.5 -> 75.1%, l2 + bias 72.7 -> 83.9%,
    l2 + seq 90.0 -> 90.6%; obs + seq at 40%: 85.8 -> 87.3%, and as good as the measured knapsack or better on
    ResNet20/44, PP-OCRv4 rec and EfficientNet-Lite0 calibrated: `bench/accuracy_real_results.txt`). Not for a
    MAC target: LAMP's budgets come from the weights' magnitudes and spend the removal where parameters are
    cheap to lose, not MACs (ResNet20 keeping 80% of the MACs: l1 69.1 -> 53.3%, l2 + bias 75.1 -> 67.8%,
    obs + seq 89.9 -> 87.9% with LAMP instead of uniform).
    """
    if global_ranking or latency_target:
        return "global"
    return "lamp" if params_target else "uniform"


@dataclass(frozen=True)
class Unit:
    group: int
    channels: np.ndarray
    key: float


def parse_target(text: str | None, total: int, what: str) -> int | None:
    """'N' (absolute count to keep) or 'P%' (percent of the original to keep) -> count to keep."""
    if text is None:
        return None
    t = str(text).strip()
    try:
        if t.endswith("%"):
            pct = float(t[:-1])
            if not 0 < pct <= 100:
                raise UsageError(f"target-{what} percentage must be in (0, 100], got {t}")
            return int(math.floor(total * pct / 100.0))
        value = float(t)
    except ValueError:
        raise UsageError(f"target-{what} must be a count or a percentage like 80%, got {t!r}") from None
    if value <= 0 or value != int(value):
        raise UsageError(f"target-{what} must be a positive integer count, got {t!r}")
    return int(value)


def met_target_notice(text: str | None, total: int, what: str) -> str | None:
    """A notice when a count target (not a percentage) is not below the model's `total`: nothing is removed,
    and the user should hear why rather than read an unchanged model."""
    if text is None or str(text).strip().endswith("%"):
        return None
    target = parse_target(text, total, what)
    if target is None or target < total:
        return None
    return f"target {what} {text} is not below the model's {total}: nothing to remove"


def group_steps(
    analysis: ChannelAnalysis, round_to: int, keep_counts: KeepCounts | None, max_group_ratio: float
) -> dict[int, np.ndarray]:
    """Group id -> the kept counts its removal units pass through, descending from its size to the fewest it
    may keep (`plan.floor_keep`, snapped up to the grid); a group that may lose nothing has just its size."""
    if keep_counts is None and round_to > 1:
        keep_counts = multiples_grid(analysis, round_to)
    steps = {}
    for g in analysis.groups:
        allowed = allowed_counts(g, keep_counts)
        lowest = snap_keep(floor_keep(g, allowed, max_group_ratio, round_to), allowed)
        steps[g.id] = allowed[allowed >= lowest][::-1]
    return steps


def removal_order(
    analysis: ChannelAnalysis,
    scores: dict[int, np.ndarray],
    allocation: str = "uniform",
    *,
    round_to: int = 1,
    max_group_ratio: float = 0.9,
    comparable: bool = False,
    budget_scores: dict[int, np.ndarray] | None = None,
    keep_counts: KeepCounts | None = None,
) -> list[Unit]:
    """All removal units of all groups in the order they are removed.

    `keep_counts` (allowed kept counts per group) replaces `round_to` when given.

    With `budget_scores`, *how many* channels each group loses at every point of the order follows those
    scores (the ordering keys of the j-th unit of a group come from the j-th lowest budget scores), while
    *which* channels go follows `scores`. `PrunePass` passes channel magnitudes here for the LAMP
    allocation, so every criterion is compared on the same layer-adaptive budgets.
    """
    from onnxprune.criteria import lamp_transform

    if allocation not in ALLOCATIONS:
        raise UsageError(f"unknown allocation {allocation!r} (choose from {', '.join(ALLOCATIONS)})")
    units: list[Unit] = []
    steps = group_steps(analysis, round_to, keep_counts, max_group_ratio)
    for g in analysis.groups:
        s = np.asarray(scores[g.id], dtype=np.float64)
        order = np.argsort(s, kind="stable")
        b = s if budget_scores is None else np.asarray(budget_scores[g.id], dtype=np.float64)
        if allocation == "lamp":
            key_of = lamp_transform(b)
        elif allocation == "global" and not (comparable and budget_scores is None):
            key_of = b / (np.mean(np.abs(b)) + 1e-12)
        else:
            key_of = b
        key_sorted = np.sort(key_of) if budget_scores is not None else None
        for before, after in itertools.pairwise(steps[g.id]):
            chunk = order[g.size - before : g.size - after]
            if allocation == "uniform":
                key = (g.size - after) / g.size
            elif key_sorted is not None:
                key = float(key_sorted[g.size - after - 1])
            else:
                key = float(key_of[chunk].max())
            units.append(Unit(g.id, chunk, key))
    units.sort(key=lambda u: (u.key, u.group))
    return units


def sensitivity_order(
    analysis: ChannelAnalysis,
    scores: dict[int, np.ndarray],
    rows,
    ratios: list[float],
    *,
    round_to: int = 1,
    max_group_ratio: float = 0.9,
    keep_counts: KeepCounts | None = None,
) -> list[Unit]:
    """Removal order from measured per-group sensitivity (`onnxprune.sensitivity.sensitivity` rows).

    The key of a group's unit is the output error measured when that group alone loses that fraction of
    its channels (interpolated between the measured ratios, made non-decreasing), so the order removes
    channels wherever the end-to-end error stays lowest; no group loses more than the largest measured
    ratio. Within a group the criterion's lowest scores go first.
    """
    by_group = {r.group: r for r in rows}
    grid = np.array([0.0] + list(ratios))
    units: list[Unit] = []
    steps = group_steps(analysis, round_to, keep_counts, max_group_ratio)
    for g in analysis.groups:
        row = by_group.get(g.id)
        if row is None:
            continue
        errs = np.array([0.0] + [0.0 if not np.isfinite(e) else e for e in row.errors])
        errs = np.maximum.accumulate(errs)
        order = np.argsort(np.asarray(scores[g.id], dtype=np.float64), kind="stable")
        counts = steps[g.id]
        counts = counts[g.size - counts <= int(math.floor(max(ratios) * g.size + 1e-9))]
        for before, after in itertools.pairwise(counts):
            frac = (g.size - after) / g.size
            units.append(Unit(g.id, order[g.size - before : g.size - after], float(np.interp(frac, grid, errs))))
    units.sort(key=lambda u: (u.key, u.group))
    return units


def plan_from_units(units: list[Unit]) -> PruningPlan:
    chosen: dict[int, list[np.ndarray]] = {}
    for u in units:
        chosen.setdefault(u.group, []).append(u.channels)
    return PruningPlan({gid: np.sort(np.concatenate(parts)) for gid, parts in chosen.items()})


class _PrunedView:
    """Duck-typed ModelGraph whose shapes are those after a plan (for `metrics.count_macs`)."""

    def __init__(self, analysis: ChannelAnalysis, plan: PruningPlan):
        self.graph = analysis.graph
        self.nodes = self.graph.nodes
        self.cut: dict[DimRef, int] = {}
        for gid, idx in plan.removed.items():
            if not len(idx):
                continue
            for m in analysis.groups[gid].members:
                n = int(np.isin(m.channel_of, idx).sum())
                ref = DimRef(m.tensor, m.axis)
                self.cut[ref] = self.cut.get(ref, 0) + n

    def shape(self, name: str):
        s = self.graph.shape(name)
        if s is None:
            return None
        return tuple(d - self.cut.get(DimRef(name, i), 0) if isinstance(d, int) else d for i, d in enumerate(s))

    def params(self) -> int:
        total = 0
        for name in self.graph.initializers:
            if is_parameter(self.graph, name):  # floats, and quantized weights: what `metrics.count_params` counts
                total += int(np.prod(self.shape(name), dtype=np.int64))
        return total

    def macs(self) -> int:
        return count_macs(self)  # type: ignore[arg-type]


def predicted(analysis: ChannelAnalysis, plan: PruningPlan) -> tuple[int, int]:
    """(parameters, MACs) the model will have after `plan`, without rewriting it (a model with If/Loop/Scan
    bodies is rewritten and counted: their layers' shapes live in the bodies, which the view cannot cut)."""
    from onnxprune.subgraphs import DESCENDED_OPS

    if any(n.op_type in DESCENDED_OPS for n in analysis.graph.nodes):
        from onnxprune.graph import ModelGraph
        from onnxprune.metrics import count_params
        from onnxprune.rewrite import apply_plan
        from onnxprune.shape_inference import infer_shapes

        pruned = ModelGraph(infer_shapes(apply_plan(analysis, plan.labels(analysis))))
        return count_params(pruned), count_macs(pruned)
    view = _PrunedView(analysis, plan)
    return view.params(), view.macs()


def plan_for_ratio(units: list[Unit], analysis: ChannelAnalysis, ratio: float) -> PruningPlan:
    """Prefix of the order removing about `ratio` of all channels."""
    budget = int(math.floor(ratio * sum(g.size for g in analysis.groups) + 1e-9))
    taken, count = [], 0
    for u in units:
        if count >= budget:
            break
        taken.append(u)
        count += len(u.channels)
    return plan_from_units(taken)


def plan_for_target(
    units: list[Unit], analysis: ChannelAnalysis, target: int, metric: str, *, tight: bool = False
) -> PruningPlan:
    """Shortest prefix of the order whose predicted `metric` ("params"/"macs") is <= target.

    With `tight`, the prefix's last unit may be swapped for the next unit of another group that meets
    the target by less (units of very different sizes, e.g. one channel of a wide residual stream and one
    of a narrow inner conv, otherwise overshoot by up to one large unit); the order within every group
    is kept.

    Raises:
        UsageError: the target is below what removing every removable unit reaches.
    """
    index = 0 if metric == "params" else 1

    def value(k: int) -> int:
        return predicted(analysis, plan_from_units(units[:k]))[index]

    if value(0) <= target:
        return PruningPlan()
    lo, hi = 0, len(units)
    best = value(hi)
    if best > target:
        raise UsageError(f"target {metric} {target} is unreachable: the smallest this model can get is {best}")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if value(mid) <= target:
            hi = mid
        else:
            lo = mid
    return _tightest(units, hi, analysis, target, index) if tight else plan_from_units(units[:hi])


def _tightest(units: list[Unit], k: int, analysis: ChannelAnalysis, target: int, index: int) -> PruningPlan:
    """`units[:k]` meets the target and `units[:k-1]` misses it: of the units that may follow
    `units[:k-1]` (each group's next one), the one meeting the target closest (earliest on ties)."""
    base = units[: k - 1]
    nxt: dict[int, Unit] = {}
    for u in units[k - 1 :]:
        nxt.setdefault(u.group, u)
    best, best_value = units[k - 1], predicted(analysis, plan_from_units(units[:k]))[index]
    for u in nxt.values():
        v = predicted(analysis, plan_from_units([*base, u]))[index]
        if best_value < v <= target:
            best, best_value = u, v
    return plan_from_units([*base, best])
