"""Latency-aware allocation: meet ``--target-latency`` (0.6x or 12ms) with the least importance lost,
checked by measuring the whole pruned model.

Start at `solve_latency_target`. Three steps:

1. `latency_order` - a knapsack solved greedily: the removal units of every group (one unit takes a group
   from one allowed kept count to the next, `allocation.group_steps`, never below ``1 - max_group_ratio`` of
   the group) ordered by *importance lost per predicted millisecond saved*. Importance is a per-group cost
   curve of the channels removed (`_removed_costs`): with ``--allocation knapsack`` / ``sensitivity`` the
   measured end-to-end output error (`allocation_knapsack.measure_curves`) squared, as the knapsack
   allocation uses it per parameter; otherwise (data-free) the share of the group's squared criterion scores
   removed times the parameter tensors the group runs through (a residual stream errs in every block it
   couples), and every group keeps at least `DATA_FREE_MIN_KEEP` (a data-free cost cannot see a layer
   collapse; the measured curves stop at their largest measured fraction). The milliseconds come from the latency table (`latency.table`). A group's units must go in order
   (lowest scores first), so each unit is keyed by the slope of the lower convex hull of its group's
   cost-vs-milliseconds-saved curve (`allocation_knapsack.lower_hull_slopes`: a unit that saves nothing on
   its own takes the chord's slope with the next step, which saves a lot); sorting all units by key is the
   greedy knapsack order; every prefix is a plan.

   Why not the normalised scores every other allocation uses: a channel's score divided by its group's mean
   is ~1 in every group, so removing 16 channels cost the same whether they were half of a 32-channel layer
   or an eighth of a 128-channel one, and per millisecond saved the narrow full-resolution layers always
   won. Measured on the Fashion-MNIST CNN (no repair), ``--target-latency 0.65x`` halved groups 0, 1 and 4
   (32 channels each): their measured output errors (squared, summed) 2.54 against 1.68 for the
   FLOPs-based plan of the same latency, and top-1 fell to chance (10%, `bench/latency_accuracy.py`).
   Without the member weight and the floor the squared-score share cut the CIFAR ResNet20's first-stage
   residual stream (one group, 60 parameter tensors) from 16 to 4 channels: l2 + bias at 0.83x measured
   10.5% top-1; with them 0.77x measured 59.4% (2,000 test images; Fashion-MNIST ResNet at 0.67x: 87.9%
   against 60.7% at 0.65x). `bench/latency_accuracy.py` (session 24: CIFAR ResNet20, Fashion ResNet/CNN,
   PP-OCRv4 rec; K back-to-back runs per timed sample, McNemar per comparison): against FLOPs-based allocation
   at equal measured latency, obs + seq calibrated is at least as accurate (within 0.1 pt) in 23 of 27
   comparisons, none of its 4 losses significant (worst -0.46 pt), mean +2.0 pt on the small models; on
   synthetic (data-free) inputs 18 of 27, with losses on CIFAR ResNet20 (-0.57 to -1.50 pt, p <= 0.001)
   and PP-OCRv4 at 0.94x (-4.2 pt). Session 25 re-ran CIFAR ResNet20 at this code on a fresh latency table:
   twice 7/7 PASS data-free (mean +6.8 / +7.9 pt) and 7/7 calibrated. The synthetic curves rank the groups as
   their true errors do (Kendall tau 0.97 against the same channels and repair measured on real images, as close
   as a second real sample is) and the order is the same under the true curves; the plans of both allocations
   follow the latency table (grid and milliseconds), which moves between builds (a residual-stream step priced
   at 1.9-3.7% of the latency by three builds within minutes; `bench/latency_accuracy_results.txt`, session 25).
2. `plan_for_latency` - the shortest prefix whose *predicted* latency (`latency.predict.Predictor`: layers
   touched by two pruned groups scale by the product of their ratios) meets a predicted budget.
3. `solve_latency_target` - verify and iterate: measure the pruned model against the dense one
   (interleaved), and when the measured ratio misses the target, correct the predicted budget: the first
   correction assumes the measured saving is a fixed fraction of the predicted one (what the table cannot
   see, layers outside any group and the runtime's overhead, scales the saving, not the latency); later ones
   interpolate between the two latest (predicted, measured) points (secant); a correction finer than the
   grid (it asks for a plan already measured) steps one unit of the order instead. At most `max_iterations`
   measurements; the closest plan within `tolerance` of the target wins. When every plan measured is too
   slow, the smallest model the caps allow is measured too (one more measurement): a target below it is
   unreachable, `LatencyOutcome.reached` is False and `message` says so with the number.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from onnxprune.allocation import Unit, group_steps, plan_from_units
from onnxprune.channels import ChannelAnalysis
from onnxprune.errors import UsageError
from onnxprune.plan import KeepCounts, PruningPlan

if TYPE_CHECKING:
    from onnxprune.latency.table import LatencyTable


@dataclass(frozen=True)
class LatencyTarget:
    """A parsed ``--target-latency``: a fraction of the dense latency ("0.6x") or milliseconds ("12ms")."""

    text: str
    fraction: float | None = None
    ms: float | None = None

    def fraction_of(self, dense_ms: float) -> float:
        """The target as a fraction of a dense latency of `dense_ms` milliseconds."""
        return self.fraction if self.fraction is not None else float(self.ms or 0.0) / dense_ms


def parse_latency_target(text: str) -> LatencyTarget:
    """'0.6x' (a fraction in (0, 1] of the dense latency) or '12ms' (milliseconds) -> `LatencyTarget`.

    Raises:
        UsageError: anything else.
    """
    t = str(text).strip().lower()
    try:
        if t.endswith("ms"):
            ms = float(t[:-2])
            if ms > 0 and math.isfinite(ms):
                return LatencyTarget(str(text), ms=ms)
        elif t.endswith("x"):
            fraction = float(t[:-1])
            if 0 < fraction <= 1:
                return LatencyTarget(str(text), fraction=fraction)
    except ValueError:
        pass
    raise UsageError(f"target-latency must be a fraction of the dense latency like 0.6x (in (0, 1]) or "
                     f"milliseconds like 12ms, got {text!r}")


#: the least share of every group the data-free latency allocation keeps (measured curves stop at their own
#: largest fraction)
DATA_FREE_MIN_KEEP = 0.25


def _removed_costs(
    analysis: ChannelAnalysis,
    scores: Mapping[int, np.ndarray],
    budget_scores: Mapping[int, np.ndarray] | None,
    sensitivity: tuple[list, list[float]] | None,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Group id -> (its channel removal order, cost of removing the first n channels for n = 0..size).

    Measured rows (`sensitivity`): ``error ** POWER`` at the measured fractions (made non-decreasing,
    interpolated linearly between them, infinite beyond the largest); a group without a row is absent (kept).
    Data-free: the share of the group's squared scores removed (the squared relative error of the group's
    output if its channels were orthogonal), so halving a 32-channel layer costs what it removes of that
    layer, not what 16 channels of any layer would cost; times the group's parameter tensors, since a
    coupled group (a residual stream) makes that error in every layer it runs through.
    """
    from onnxprune.allocation_knapsack import POWER

    rows = {r.group: r for r in sensitivity[0]} if sensitivity is not None else {}
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for g in analysis.groups:
        s = np.asarray(scores[g.id], dtype=np.float64)
        order = np.argsort(s, kind="stable")
        fractions = np.arange(g.size + 1) / g.size
        if sensitivity is not None:
            row = rows.get(g.id)
            if row is None:
                continue
            measured = np.array([0.0] + list(sensitivity[1]))
            errs = np.array([0.0] + [e if np.isfinite(e) else 0.0 for e in row.errors])
            cost = np.interp(fractions, measured, np.maximum.accumulate(errs) ** POWER, right=np.inf)
        else:
            b = s if budget_scores is None else np.asarray(budget_scores[g.id], dtype=np.float64)
            mass = np.sort(b * b) if budget_scores is not None else (b * b)[order]  # amounts follow the budget
            cost = np.concatenate([[0.0], np.cumsum(mass)]) / max(float(mass.sum()), 1e-300)
            cost *= max(1, len(g.param_members))  # a coupled group errs in every layer it runs through
        out[g.id] = (order, cost)
    return out


def latency_order(
    analysis: ChannelAnalysis,
    scores: Mapping[int, np.ndarray],
    table: LatencyTable,
    allocation: str = "global",
    *,
    round_to: int = 1,
    keep_counts: KeepCounts | None = None,
    max_group_ratio: float = 0.9,
    comparable: bool = False,
    budget_scores: Mapping[int, np.ndarray] | None = None,
    sensitivity: tuple[list, list[float]] | None = None,
) -> list[Unit]:
    """Every removal unit, ordered by importance lost per predicted millisecond saved (the greedy knapsack).

    Each group's units are keyed by the slope of the lower convex hull of its cost (`_removed_costs`)
    against the milliseconds it saves (`LatencyTable.at`) at its allowed kept counts (`allocation.group_steps`:
    never below ``1 - max_group_ratio`` of the group); units past the group's largest saving are dropped
    (they would cost accuracy for no time).

    Args:
        allocation: "global", "lamp", "sensitivity" or "knapsack" (the last two need `sensitivity`).
        comparable: unused (kept for the callers' signature): every cost is relative to its own group.
        sensitivity: (`sensitivity.SensitivityRow`s, their ratios): measured end-to-end error curves
            (`allocation_knapsack.measure_curves` for knapsack); None: the data-free cost.
        Others: as `allocation.removal_order`.
    """
    from onnxprune.allocation_knapsack import lower_hull_slopes

    del allocation, comparable  # the cost curve is the importance; the allocation chose which curve
    if sensitivity is None:  # a data-free cost cannot see a group collapse: keep DATA_FREE_MIN_KEEP of each
        max_group_ratio = min(max_group_ratio, 1 - DATA_FREE_MIN_KEEP)
    steps = group_steps(analysis, round_to, keep_counts, max_group_ratio)
    units: list[Unit] = []
    for gid, (order, cost) in _removed_costs(analysis, scores, budget_scores, sensitivity).items():
        size = analysis.groups[gid].size
        counts = [int(c) for c in steps[gid] if np.isfinite(cost[size - int(c)])]
        if len(counts) < 2:
            continue
        saved = np.maximum.accumulate([_ms(table, gid, size) - _ms(table, gid, c) for c in counts])
        last = int(np.argmax(saved))  # the first count reaching the group's largest saving
        if saved[last] <= 1e-12:
            continue
        counts, saved = counts[: last + 1], saved[: last + 1]
        slopes = lower_hull_slopes(saved, np.array([cost[size - c] for c in counts]))
        for (before, after), key in zip(itertools.pairwise(counts), slopes):
            units.append(Unit(gid, order[size - before : size - after], float(key)))
    units.sort(key=lambda u: (u.key, u.group))  # stable: a group's units keep their order on equal keys
    return units


def _ms(table: LatencyTable, group: int, kept: int) -> float:
    return table.at(group, kept) if group in table.curves else 0.0


@dataclass(frozen=True)
class LatencyPlan:
    """A prefix of a removal order with the latency the table predicts for it (`plan_for_latency`)."""

    plan: PruningPlan
    units: int
    predicted_ms: float
    dense_ms: float  # the table's dense total (the predicted ratio's denominator)

    @property
    def predicted_ratio(self) -> float:
        return self.predicted_ms / self.dense_ms if self.dense_ms > 0 else 1.0


def _prefix_predictions(units: list[Unit], analysis: ChannelAnalysis, table: LatencyTable) -> np.ndarray:
    """Predicted milliseconds after each prefix of `units` (index k: the first k units removed), by
    `latency.predict.Predictor` (a layer two pruned groups touch scales by the product of their ratios)."""
    from onnxprune.latency.predict import Predictor

    predictor = Predictor(table)
    kept = {g.id: g.size for g in analysis.groups}
    out = [table.dense_ms]
    for u in units:
        kept[u.group] -= len(u.channels)
        out.append(predictor.set(u.group, kept[u.group]))
    return np.asarray(out)


def plan_for_latency(units: list[Unit], analysis: ChannelAnalysis, table: LatencyTable, budget_ms: float) -> LatencyPlan:
    """The shortest prefix of `units` whose predicted latency is <= `budget_ms` (all units when none is)."""
    predictions = _prefix_predictions(units, analysis, table)
    meets = np.flatnonzero(predictions <= budget_ms + 1e-12)
    k = int(meets[0]) if len(meets) else _smallest_prefix(predictions)
    return LatencyPlan(plan_from_units(units[:k]), k, float(predictions[k]), table.dense_ms)


def _smallest_prefix(predictions: np.ndarray) -> int:
    """The shortest prefix reaching the lowest prediction (units after it only remove channels)."""
    return int(np.argmin(predictions))


@dataclass(frozen=True)
class Attempt:
    """One verified plan: its predicted and measured latency ratios (pruned / dense)."""

    plan: LatencyPlan
    measured_ratio: float
    dense_ms: float
    pruned_ms: float

    @property
    def speedup(self) -> float:
        return 1.0 / self.measured_ratio if self.measured_ratio > 0 else math.inf


@dataclass(frozen=True)
class LatencyOutcome:
    """What `solve_latency_target` found: the chosen attempt, every attempt, and whether it is on target."""

    target: float  # the target as a fraction of the dense latency
    chosen: Attempt
    attempts: tuple[Attempt, ...] = field(default_factory=tuple)
    reached: bool = False
    message: str = ""

    @property
    def plan(self) -> PruningPlan:
        return self.chosen.plan.plan


Measure = Callable[[PruningPlan], tuple[float, float]]  # plan -> (dense ms, pruned ms), measured interleaved


def solve_latency_target(
    units: list[Unit],
    analysis: ChannelAnalysis,
    table: LatencyTable,
    target: float,
    measure: Measure,
    *,
    max_iterations: int = 4,
    tolerance: float = 0.10,
    stop_within: float = 0.04,
    max_group_ratio: float = 0.9,
) -> LatencyOutcome:
    """Find the prefix of `units` whose *measured* latency ratio is nearest `target` (module docstring).

    Args:
        target: wanted pruned / dense latency, in (0, 1].
        measure: measures a plan's pruned model against the dense model (interleaved).
        tolerance: a plan is on target when its measured ratio is at most ``target * (1 + tolerance)``
            and at least ``target * (1 - tolerance)``, or faster than asked when nothing slower is within.
        stop_within: stop measuring once a plan is this close to the target.
        max_group_ratio: the cap the units were made with (named when the target is out of reach).
    """
    predictions = _prefix_predictions(units, analysis, table)
    if target >= 1:  # the dense model meets it: nothing to remove (measured once for the report; noise on a
        # loaded machine once made a 1.0x target "correct" itself into pruning)
        plan = LatencyPlan(plan_from_units([]), 0, float(predictions[0]), table.dense_ms)
        dense_ms, pruned_ms = measure(plan.plan)
        attempt = Attempt(plan, pruned_ms / dense_ms, dense_ms, pruned_ms)
        return LatencyOutcome(target, attempt, (attempt,), True)
    lowest = predictions[_smallest_prefix(predictions)] / table.dense_ms if table.dense_ms > 0 else 1.0
    attempts: list[Attempt] = []
    asked = target  # the predicted ratio asked of the table this round
    for _ in range(max_iterations):
        candidate = plan_for_latency(units, analysis, table, max(asked, lowest) * table.dense_ms)
        if attempts and any(a.plan.units == candidate.units for a in attempts):
            # The correction is finer than the grid: step one unit towards the target from the nearest
            # measured plan on the wrong side, unless that plan was measured too.
            step = _neighbour(attempts, target, units, predictions, table.dense_ms)
            if step is None:
                break
            candidate = step
        dense_ms, pruned_ms = measure(candidate.plan)
        attempts.append(Attempt(candidate, pruned_ms / dense_ms, dense_ms, pruned_ms))
        measured = attempts[-1].measured_ratio
        if abs(measured / target - 1) <= stop_within:
            break
        if candidate.units == _smallest_prefix(predictions) and measured > target:
            break  # the smallest model allowed is measured and still too slow
        asked = _next_ask(attempts, target)
    smallest = len(units)  # every unit removed: the smallest model the caps allow
    measured_smallest = any(a.plan.units == smallest for a in attempts)
    if not measured_smallest and min(a.measured_ratio for a in attempts) > target * (1 + tolerance):
        # Out of reach so far: measure the smallest model allowed, so the answer says why for certain.
        plan = LatencyPlan(plan_from_units(units[:smallest]), smallest, float(predictions[smallest]), table.dense_ms)
        dense_ms, pruned_ms = measure(plan.plan)
        attempts.append(Attempt(plan, pruned_ms / dense_ms, dense_ms, pruned_ms))
    return _choose(attempts, target, tolerance, smallest, max_group_ratio)


def _neighbour(
    attempts: list[Attempt], target: float, units: list[Unit], predictions: np.ndarray, dense_ms: float
) -> LatencyPlan | None:
    """The prefix one unit beyond the measured plan closest to `target` (longer when it measured too slow,
    shorter when too fast), or None when that prefix was measured already or does not exist."""
    closest = min(attempts, key=lambda a: abs(a.measured_ratio / target - 1))
    k = closest.plan.units + (1 if closest.measured_ratio > target else -1)
    if not 0 <= k <= len(units) or any(a.plan.units == k for a in attempts):
        return None
    return LatencyPlan(plan_from_units(units[:k]), k, float(predictions[k]), dense_ms)


def _next_ask(attempts: list[Attempt], target: float) -> float:
    """The predicted ratio to ask for next (module docstring: saving-proportional, then secant)."""
    last = attempts[-1]
    p, m = last.plan.predicted_ratio, last.measured_ratio
    if len(attempts) >= 2:
        prev = attempts[-2]
        p0, m0 = prev.plan.predicted_ratio, prev.measured_ratio
        if abs(p - p0) > 1e-6 and (m - m0) / (p - p0) > 0:
            return float(np.clip(p + (target - m) * (p - p0) / (m - m0), 0.0, 1.0))
    saved_predicted, saved_measured = 1 - p, 1 - m
    if saved_measured <= 1e-3 or saved_predicted <= 1e-3:
        return float(np.clip(p - (m - target), 0.0, 1.0))  # no saving to scale: step by the miss
    return float(np.clip(1 - (1 - target) * saved_predicted / saved_measured, 0.0, 1.0))


def _choose(
    attempts: list[Attempt], target: float, tolerance: float, smallest_units: int, max_group_ratio: float
) -> LatencyOutcome:
    within = [a for a in attempts if abs(a.measured_ratio / target - 1) <= tolerance]
    faster = [a for a in attempts if a.measured_ratio < target * (1 - tolerance)]
    if within:
        chosen = min(within, key=lambda a: abs(a.measured_ratio / target - 1))
        return LatencyOutcome(target, chosen, tuple(attempts), True)
    if faster:  # the grid steps over the target: the slowest plan that is still faster than asked
        chosen = max(faster, key=lambda a: a.measured_ratio)
        return LatencyOutcome(target, chosen, tuple(attempts), True,
                              f"the nearest allowed channel counts give {chosen.measured_ratio:.2f}x, faster than "
                              f"the {target:.2f}x asked")
    full = next((a for a in attempts if a.plan.units == smallest_units), None)
    chosen = full or min(attempts, key=lambda a: a.measured_ratio)
    keeps = 1 - max_group_ratio
    why = (f"the smallest model the caps allow (every group keeps at least {keeps:.0%} of its channels, on its "
           f"channel grid) measures {chosen.measured_ratio:.2f}x" if full is not None else
           f"after {len(attempts)} measurements the closest measures {chosen.measured_ratio:.2f}x (the table "
           f"predicted {max(0.0, chosen.plan.predicted_ratio):.2f}x)")
    return LatencyOutcome(target, chosen, tuple(attempts), False,
                          f"cannot reach {target:.2f}x of the dense latency: {why}")
