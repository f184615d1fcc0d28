"""Iterative (gradual) channel selection: reach the final removal in N steps, re-scoring after each repair.

Start reading at `IterativeSelectPass.call`. One-shot pruning scores every channel once on the dense model,
allocates once (the knapsack measures each group's error curve ALONE on the dense model) and repairs once.
Gradual pruning, as in gradual OBS / OBC, takes the removal in N steps so later decisions see earlier ones:

1. the one-shot selection (`SelectChannelsPass`) on the dense model fixes each group's FINAL removed count
   c_g (the allocation and the parameter / MAC / latency target land exactly as one-shot: parameters
   depend only on how many channels each group keeps);
2. step k = 1..N removes, in every group, the channels that bring it to round(c_g * k / N) removed: the
   lowest-scoring channels of the model of step k-1 (the dense model pruned by steps 1..k-1 AND repaired),
   so the criterion (OBS saliencies with their Hessians) is recomputed after the earlier removals and the
   repair's update;
3. the model of step k is the DENSE model repaired for the cumulative removal of steps 1..k and cut: every
   repair, intermediate or final, fits towards the dense model's activations (the teacher), never the
   previous step's pruned model, so errors do not compound; the last step's repair is the pipeline's own
   `RepairChannelsPass`, which runs after this pass on the selection it leaves pending on the dense model.

The pass is a drop-in replacement of `SelectChannelsPass` (select -> repair -> remove): it returns the dense
model unchanged with a `ChannelSelection` pending on it, whose labels are the union of the N steps'. With
``steps=1`` it is exactly `SelectChannelsPass`.

With ``reallocate=True`` each step instead re-solves the allocation (the knapsack's curves re-measured) on the
model of the step before, for its share of the parameter / MAC target (`IterativeSelectPass.reallocated`).

Measured (`bench/accuracy_real.py`, obs + seq, knapsack, 2,000 CIFAR-10 training images, all 10,000 test
images; top-1, one-shot in brackets): ResNet20 20% removed 90.40 (90.25) with 3 steps; 40% 87.62 (86.99) with 3
steps, 87.40 with 5, 87.23 with 3 re-allocated steps; ResNet44 40% 90.39 (90.67); data-free ResNet20 40%
(planned synthetic inputs) 84.88 (85.04, seed spread 0.8). A small, model-dependent gain at N times the repair
cost: opt-in (CLI ``--steps N``), not a default.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx

from onnxprune.allocation import parse_target
from onnxprune.calibration import CalibrationData, CalibrationStats, check_calib
from onnxprune.calibration_data import CalibLike
from onnxprune.channels import ChannelAnalysis, DimRef, analyze
from onnxprune.criteria import Criterion
from onnxprune.errors import PreconditionError, UsageError
from onnxprune.graph import ModelGraph
from onnxprune.metrics import count_macs, count_params
from onnxprune.passes.config import PruneConfig
from onnxprune.passes.pruning import PrunePass
from onnxprune.passes.select import (
    ChannelSelection,
    SelectChannelsPass,
    calibration_statistics,
    criterion_for,
)
from onnxprune.passmanager import Pass, PassResult, analyses
from onnxprune.plan import PruningPlan
from onnxprune.progress import task
from onnxprune.quantized_repair import float_view, requantize
from onnxprune.repair import reanalyze, repair_sequential, repair_weights
from onnxprune.rewrite import apply_plan
from onnxprune.shape_inference import infer_shapes

__all__ = ["IterativePrunePass", "IterativeSelectPass", "step_counts"]


def step_counts(final: dict[int, int], steps: int) -> list[dict[int, int]]:
    """Cumulative removed count per group after each of `steps` steps: round(c * k / steps), the last = `final`."""
    return [{gid: int(round(c * k / steps)) for gid, c in final.items()} for k in range(1, steps + 1)]


def dense_channels_of(dense: ChannelAnalysis, removed: np.ndarray, current: ChannelAnalysis) -> dict[int, tuple[int, np.ndarray]]:
    """Where each dense group's surviving channels are in the pruned model `current`.

    Args:
        dense: analysis of the dense model.
        removed: component labels (in `dense`) of the channels cut from it to give `current`'s model.
        current: analysis of the pruned (and repaired) model; cutting channels keeps tensor names.

    Returns:
        dense group id -> (group id in `current`, dense channel index of each of that group's channels).

    Raises:
        PreconditionError: a group has no counterpart of the expected size (the cut changed the coupling); a
            group left with no more than its `min_keep` channels has none and is left out (nothing more to cut).
    """
    slices = {(m.tensor, m.axis): (g, m) for g in current.groups for m in g.members}
    cut = dense.removed_positions(removed)
    out: dict[int, tuple[int, np.ndarray]] = {}
    for g in dense.groups:
        gone = np.isin(g.labels, removed)
        members = sorted(g.members, key=lambda m: not m.is_param)  # initializers first: their names are stable
        member = next((m for m in members if (m.tensor, m.axis) in slices), None)
        if member is None:
            if g.size - int(gone.sum()) <= g.min_keep:
                continue  # too few channels left to be a group (2 heads -> 1): its removal is complete
            raise PreconditionError(f"channel group {g.id} ({g.members[0]}) has no counterpart in the pruned model")
        found, there = slices[(member.tensor, member.axis)]
        if found.size != g.size - int(gone.sum()):
            raise PreconditionError(f"channel group {g.id}: {found.size} channels in the pruned model, "
                                    f"expected {g.size - int(gone.sum())}")
        cut_here = np.sort(cut.get(DimRef(member.tensor, member.axis), np.zeros(0, np.int64)))
        dense_of = np.full(found.size, -1, dtype=np.int64)
        for channel in np.flatnonzero(~gone):
            position = int(member.positions[member.channel_of == channel][0])
            moved = position - int(np.searchsorted(cut_here, position))  # positions before it that were cut
            at = int(np.searchsorted(there.positions, moved))
            dense_of[there.channel_of[at]] = channel
        if (dense_of < 0).any():
            raise PreconditionError(f"channel group {g.id}: pruned channels do not map onto dense ones")
        out[g.id] = (found.id, dense_of)
    return out


def cut_and_repair(
    config: PruneConfig,
    dense: ChannelAnalysis,
    removed: np.ndarray,
    calib: CalibrationData | None,
    stats: CalibrationStats | None,
) -> onnx.ModelProto:
    """The dense model repaired for removing `removed` (towards the dense model's own activations) and cut:
    what `RepairChannelsPass` + `RemoveChannelsPass` give for that selection."""
    c = config
    model = dense.graph.model
    if c.repair == "none":
        repaired = model
    else:
        view, dequantized = float_view(model)  # quantized weights: refitted as floats (`quantized_repair`)
        base, base_removed = reanalyze(dense, removed, view, c.allow_inexact)
        if c.repair == "seq":
            assert calib is not None  # SelectChannelsPass.check_data: seq needs samples
            repaired, _ = repair_sequential(base, base_removed, check_calib(calib, model, c.calib_samples), seed=c.seed)
        else:  # bias, ls: `stats` come from the same float view (`select.calibration_statistics`)
            repaired, _ = repair_weights(base, base_removed, c.repair, stats)
        if dequantized:
            repaired, _ = requantize(repaired, dequantized, model)
    analysis, labels = reanalyze(dense, removed, repaired, c.allow_inexact)
    return infer_shapes(apply_plan(analysis, labels))


class IterativeSelectPass(Pass):
    """`SelectChannelsPass` in `steps` steps, re-scoring on the repaired model after each (module docstring).

    Args:
        config: what to remove and how (the final target; the repair method of every step).
        steps: number of steps (1: exactly `SelectChannelsPass`).
        criterion: a `Criterion` instance overriding `config.criterion` (re-scored at every step).
        calib: calibration samples (the criterion's statistics, the allocation, the intermediate repairs).
        stats: precomputed `calibration.collect_stats` of the DENSE model (the first step's scores).
        reallocate: re-solve the allocation at every step on the model of the step before (the knapsack's
            curves re-measured there) for that step's share of a parameter or MAC target, instead of
            approaching the dense model's final counts; the last step meets the target as one-shot does
            (within one removal unit), not with the same counts. Needs ``target_params`` or ``target_macs``.
    """

    def __init__(
        self,
        config: PruneConfig | None = None,
        steps: int = 1,
        *,
        criterion: Criterion | None = None,
        calib: CalibLike | None = None,
        stats: CalibrationStats | None = None,
        reallocate: bool = False,
    ) -> None:
        if steps < 1:
            raise UsageError(f"steps must be >= 1, got {steps}")
        self.first = SelectChannelsPass(config, criterion=criterion, calib=calib, stats=stats)
        self.config = self.first.config
        if reallocate and self.config.target_params is None and self.config.target_macs is None:
            raise UsageError("re-allocating at every step needs a parameter or MAC target")
        self.reallocate = reallocate
        self.steps = steps
        self.criterion = criterion
        self.calib = self.first.calib  # as CalibrationData
        self.stats = stats

    @property
    def name(self) -> str:
        return "IterativeSelectChannelsPass" if self.steps > 1 else self.first.name

    def check_data(self) -> list[str]:
        return self.first.check_data()

    def requires(self, model):
        self.first.requires(model)

    def plan(self, analysis: ChannelAnalysis, stats: CalibrationStats | None = None) -> PruningPlan:
        """The plan of the whole gradual selection on an analysed model (`PrunePass.plan`): with more than one
        step this runs the intermediate repairs; `stats` serves one step only (the pass's own are used)."""
        if self.steps == 1:
            return self.first.plan(analysis, stats)
        selection = self.call(analysis.graph.model).artifacts[0]
        assert isinstance(selection, ChannelSelection)
        return selection.plan

    def scores(self, model: onnx.ModelProto, analysis: ChannelAnalysis, dense_stats: bool) -> dict[int, np.ndarray]:
        """The criterion's channel scores on `model` (statistics of that model, re-collected after step 1)."""
        stats = self.stats if dense_stats and self.stats is not None else calibration_statistics(
            self.config, model, self.calib, self.criterion is not None)
        criterion = self.criterion or criterion_for(self.config, stats)
        return criterion.score_all(analysis)

    def call(self, model):
        one_shot = self.first.call(model)
        if self.steps == 1:
            return one_shot
        selection = one_shot.artifacts[0]
        assert isinstance(selection, ChannelSelection)
        dense = selection.analysis
        final = {g.id: int(np.isin(g.labels, selection.labels).sum()) for g in dense.groups}
        removed = np.zeros(0, dtype=np.int64)
        current, current_analysis = model, dense
        with task("iterative selection", total=self.steps) as progress:
            for k, counts in enumerate(step_counts(final, self.steps), 1):
                progress.update(f"iterative selection: step {k}/{self.steps}")
                where = dense_channels_of(dense, removed, current_analysis)
                if self.reallocate:
                    more = self.reallocated(k, current, dense, where, selection)
                else:
                    more = self.rescored(counts, current, current_analysis, dense, where, removed, first=k == 1)
                removed = np.union1d(removed, more)
                if k < self.steps:
                    current = cut_and_repair(self.config, dense, removed, self.calib, selection.stats)
                    current_analysis = analyze(ModelGraph(current), allow_inexact=self.config.allow_inexact)
                progress.advance()
        plan = PruningPlan({g.id: np.flatnonzero(np.isin(g.labels, removed)) for g in dense.groups
                            if np.isin(g.labels, removed).any()})
        note = (f"iterative selection: {self.steps} steps, "
                + ("re-allocated" if self.reallocate else "re-scored") + " on the repaired model after each")
        after = replace(selection, labels=plan.labels(dense), plan=plan, notices=(*selection.notices, note))
        analyses().put(model, ChannelSelection, after)
        return PassResult(model, False, artifacts=(after,))

    def rescored(
        self,
        counts: dict[int, int],
        current: onnx.ModelProto,
        analysis: ChannelAnalysis,
        dense: ChannelAnalysis,
        where: dict[int, tuple[int, np.ndarray]],
        removed: np.ndarray,
        first: bool,
    ) -> np.ndarray:
        """Dense labels of the channels that bring every group to `counts` removed: each group's lowest
        scores on `current` (the dense model pruned by `removed` and repaired; the dense model itself first)."""
        scores = self.scores(current, analysis, dense_stats=first)
        chosen = [np.zeros(0, dtype=np.int64)]
        for g in dense.groups:
            more = counts[g.id] - int(np.isin(g.labels, removed).sum())
            if more > 0:
                there, dense_of = where[g.id]
                chosen.append(g.labels[dense_of[np.argsort(scores[there], kind="stable")[:more]]])
        return np.concatenate(chosen)

    def reallocated(
        self,
        k: int,
        current: onnx.ModelProto,
        dense: ChannelAnalysis,
        where: dict[int, tuple[int, np.ndarray]],
        one_shot: ChannelSelection,
    ) -> np.ndarray:
        """Dense labels of the channels step `k`'s own allocation removes from `current` (the dense model
        pruned and repaired by steps 1..k-1) to reach ``k / steps`` of the way to the final target."""
        c = self.config
        metric = "params" if c.target_params is not None else "macs"
        total = count_params(dense.graph) if metric == "params" else count_macs(dense.graph)
        final = parse_target(c.target_params if metric == "params" else c.target_macs, total, metric)
        assert final is not None
        goal = str(final if k == self.steps else int(round(total - (total - final) * k / self.steps)))
        config = replace(c, **{f"target_{metric}": goal})
        select = SelectChannelsPass(config, criterion=self.criterion, calib=self.calib,
                                    stats=self.stats if k == 1 else None)
        if k == 1:  # the dense model: the one-shot selection's measured curves serve again
            plan = select.choose(dense, self.stats or calibration_statistics(
                config, current, self.calib, self.criterion is not None), one_shot.sensitivity)[0]
        else:
            plan = select.call(current).artifacts[0].plan
        back = {there: (gid, dense_of) for gid, (there, dense_of) in where.items()}
        parts = [dense.groups[back[there][0]].labels[back[there][1][idx]] for there, idx in plan.removed.items()]
        return np.concatenate([np.zeros(0, dtype=np.int64), *parts])


class IterativePrunePass(PrunePass):
    """`PrunePass` with `IterativeSelectPass` as its selection: select in `steps` steps -> repair -> remove ->
    check (the final repair runs from the dense model on the union of the steps' channels). ``steps=1`` is
    `PrunePass` exactly."""

    def __init__(self, config: PruneConfig | None = None, steps: int = 1, criterion: Criterion | None = None,
                 calib: CalibLike | None = None, stats: CalibrationStats | None = None,
                 reallocate: bool = False) -> None:
        super().__init__(config, criterion, calib, stats)
        if steps > 1:
            self.select = IterativeSelectPass(self.config, steps, criterion=criterion, calib=calib, stats=stats,
                                              reallocate=reallocate)
            self.passes = (self.select, *self.passes[1:])
