"""The plan of a plain ``--ratio`` under auto rounding: never predicted slower than the unrounded plan.

Start reading at `choose_ratio_plan`. ``--ratio R`` promises to remove the fraction R of the channels (README:
of every group with a uniform ratio; auto rounding may weight each group's share by the time its channels
buy, `latency.weighted`, and still removes R of all channels). Within that promise there are many plans, so
the default builds a few and lets the latency table choose:

* the *reference*: the uniform ratio at any count, what ``--round-to 1`` gives;
* the uniform ratio on the latency grid (`plan.make_plan` with the grid, the default where a uniform ratio
  can track the MACs, `latency.predict.uniform_bound` >= 0.9: ResNet-50);
* latency-weighted plans (`latency.weighted.weighted_plan`) for both price sources (the micro-model prices,
  ``table.alone``, and the in-model ones, `latency.calibrate`), weight exponents `ALPHAS`, each also
  blended halfway with the uniform ratio (`BLENDS`: every blend removes R of the channels too).

Every candidate is priced by the in-model table with grid-aware pricing of off-grid counts
(`latency.predict.predicted_ms` with ``grids``), so the reference pays what an unrounded count costs.
A candidate is *eligible* when it is predicted no slower than the reference: the uniform grid plan at
equal prediction (its counts are the reference's snapped to step bottoms), a weighted or blended plan only
with `SAFETY` to spare (its prediction errs more: it moves channels between groups). Among the eligible the
highest ``efficiency ** EFFICIENCY_WEIGHT * speedup`` wins (predicted speedup over the predicted MACs
reduction, as `latency.weighted.best_weighted_plan` scored its two candidates); the reference itself only
when nothing else is eligible. Where the uniform bound reaches 0.9 only the two uniform plans compete.
The table's choice is then *measured* (`passes.latency_select.confirmed`): it and the next best by predicted
score (`RatioChoice.by_score`) are applied to the model and timed with the reference and the dense model; the
table's choice stands unless another plan no slower than the reference measures clearly better (efficiency
first), and a plan measured slower than the reference is never taken. The table prices layers alone and a
whole model can disagree by more than the candidates differ (CIFAR ResNet20 at 0.5: the table priced its first
residual stream slower at 8 channels than at 16, the model with 8 ran 2.06x faster than dense against 1.71x
with 16; MobileNetV2 at 0.7: 3.56-3.62x predicted for candidates measured 3.91-4.26x).

Why: measured before this module (onnxruntime 1 thread; quiet machine), the latency-weighted plan won the
efficiency bar on the depthwise networks but could be slower than ``--round-to 1`` at the same ratio: CIFAR
ResNet20 at 0.5 kept its three residual-stream groups whole (MACs /1.82 against /3.22 uniform), 0.807x
of the dense latency against 0.621x unrounded; the bundled Fashion-MNIST CNN likewise. The table orders
such pairs correctly (five of five measured weighted-vs-uniform pairs), so the eligibility test removes them
before scoring. Weight exponent 4 (`ALPHAS`) joins 2 because on MobileNetV2 and EfficientNet-B0 at 0.7 it
is predicted more efficient (0.77 against 0.72, 0.81 against 0.74), where the measured efficiency of
exponent 2 was 0.85 and 0.80 on the quiet machine; diminishing beyond 4 (6: 0.77, 0.82).

Measured (onnxruntime 1 thread, thread CPU time, fastest of 40 interleaved runs, load average 18 on 2
cores; the same canonical model, plans applied by the library; speedup (efficiency); before =
`latency.weighted.best_weighted_plan`, the default until this module):

===============  =====  ==============  ==============  ==============
model            ratio  before          this choice     --round-to 1
===============  =====  ==============  ==============  ==============
MobileNetV2      0.3    1.72x (0.97)    1.86x (1.06)    0.80x (0.42)
MobileNetV2      0.5    2.36x (0.96)    2.43x (0.99)    2.26x (0.63)
MobileNetV2      0.7    3.20x (0.87)    3.35x (1.02)    2.00x (0.23)
EfficientNet-B0  0.5    2.19x (1.00)    2.34x (1.05)    2.15x (0.60)
EfficientNet-B0  0.7    3.48x (0.88)    3.30x (0.95)    1.93x (0.23)
===============  =====  ==============  ==============  ==============

EfficientNet-B0 at 0.3 first took a plan predicted 0.06 more efficient and 9% slower (measured 1.68x
(1.10) against 1.97x (1.11)); `EFFICIENCY_CAP` keeps the faster one (the plan before this module). The
whole-CLI rows, both bars and the small nets: `bench/latency_results.txt` (2026-12-03 20:10 block).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from onnxprune.channels import ChannelAnalysis
from onnxprune.latency.predict import macs_reduction, predicted_ms
from onnxprune.latency.table import LatencyTable
from onnxprune.latency.weighted import EFFICIENCY_WEIGHT, weighted_plan
from onnxprune.plan import KeepCounts, PruningPlan, make_plan

__all__ = ["ALPHAS", "BLENDS", "EFFICIENCY_CAP", "SAFETY", "Candidate", "RatioChoice", "choose_ratio_plan"]

#: weight exponents of the latency-weighted candidates (`weighted.weighted_fractions`)
ALPHAS = (2.0, 4.0)
#: shares of the uniform ratio blended into each weighted candidate (0: purely weighted)
BLENDS = (0.0, 0.5)
#: a weighted candidate must be predicted this much faster than the reference (its prediction errs more)
SAFETY = 0.03
#: predicted efficiency above this earns no more score: among plans that already get as much faster as
#: they get smaller, the faster one wins (EfficientNet-B0 at 0.3, below)
EFFICIENCY_CAP = 1.0


@dataclass(frozen=True)
class Candidate:
    """One plan of the ratio, priced by the table.

    Attributes:
        name: what it is ("uniform, any count", "uniform, on the grid", "weighted a=4 in-model blend 0.5", ...).
        plan: the plan.
        predicted_ms: the table's prediction of the priced layers (grid-aware).
        dense_ms: the table's dense total.
        macs_reduction: MACs before / after (`predict.macs_reduction`).
    """

    name: str
    plan: PruningPlan
    predicted_ms: float
    dense_ms: float
    macs_reduction: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.predicted_ms if self.predicted_ms > 0 else 1.0

    @property
    def efficiency(self) -> float:
        return self.speedup / self.macs_reduction if self.macs_reduction > 0 else 0.0

    @property
    def score(self) -> float:
        """``min(efficiency, EFFICIENCY_CAP) ** EFFICIENCY_WEIGHT * speedup``."""
        return min(self.efficiency, EFFICIENCY_CAP) ** EFFICIENCY_WEIGHT * self.speedup


@dataclass(frozen=True)
class RatioChoice:
    """What `choose_ratio_plan` found: the chosen candidate, the reference and every candidate."""

    chosen: Candidate
    reference: Candidate
    candidates: tuple[Candidate, ...]

    @property
    def plan(self) -> PruningPlan:
        return self.chosen.plan

    def by_score(self) -> list[Candidate]:
        """Every candidate but the reference, the chosen one first, then by predicted score (highest first)."""
        rest = sorted((c for c in self.candidates if c is not self.reference and c is not self.chosen),
                      key=lambda c: -c.score)
        return ([self.chosen] if self.chosen is not self.reference else []) + rest

    def describe(self) -> str:
        """One line: the choice, its predicted speedup and efficiency against the reference's."""
        c, r = self.chosen, self.reference
        return (f"ratio plan: {c.name}, predicted {c.speedup:.2f}x (efficiency {c.efficiency:.2f}) against "
                f"{r.speedup:.2f}x ({r.efficiency:.2f}) at any count")


UNIFORM_ANY, UNIFORM_GRID = "uniform, any count", "uniform, on the grid"


def choose_ratio_plan(
    analysis: ChannelAnalysis,
    scores: Mapping[int, np.ndarray],
    table: LatencyTable,
    ratio: float,
    *,
    keep_counts: KeepCounts | None,
    weighted: bool = True,
    max_group_ratio: float = 0.9,
) -> RatioChoice:
    """The best eligible plan removing `ratio` of the channels (module docstring).

    Args:
        table: the table to predict with (calibrated in-model where possible; its ``alone`` gives the
            micro-model weights).
        keep_counts: the auto grid (also prices off-grid counts).
        weighted: also build latency-weighted candidates (False: only the two uniform plans).
    """

    def priced(name: str, plan: PruningPlan) -> Candidate:
        kept = plan.kept(analysis)
        return Candidate(name, plan, predicted_ms(table, kept, grids=keep_counts), table.dense_ms,
                         macs_reduction(table, analysis, kept))

    reference = priced(UNIFORM_ANY, make_plan(analysis, dict(scores), ratio))
    grid_plan = priced(UNIFORM_GRID, make_plan(analysis, dict(scores), ratio, keep_counts=keep_counts, top="nearest"))
    candidates = [reference, grid_plan]
    if weighted:
        sources = [("micro-model", table.alone), ("in-model", table)] if table.alone is not None else [("table", table)]
        for label, source in sources:
            for alpha in ALPHAS:
                for blend in BLENDS:
                    plan = weighted_plan(analysis, scores, source, ratio, keep_counts=keep_counts, alpha=alpha,
                                         max_group_ratio=max_group_ratio, blend=blend)
                    name = f"weighted a={alpha:g} {label}" + (f" blend {blend:g}" if blend else "")
                    candidates.append(priced(name, plan))
    limit = reference.predicted_ms * (1 + 1e-9)
    eligible = [c for c in candidates[1:] if c.predicted_ms <= (limit if c is grid_plan else limit * (1 - SAFETY))]
    chosen = max(eligible, key=lambda c: c.score) if eligible else reference
    return RatioChoice(chosen, reference, tuple(candidates))
