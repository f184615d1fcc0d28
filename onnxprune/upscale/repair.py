"""Calibrated least-squares repair of an unconstrained plan (``repair="ls"`` and ``"seq"``).

Start reading at `repair_plan`. Constrained repair (`onnxprune.repair`) rewrites every consumer that loses
input columns, given the positions the removal deletes (`ChannelAnalysis.removed_positions`). An
unconstrained plan deletes per *parameter*, not per group channel: each unit silences its own positions
(`oracle.silenced_positions`), and a reader of a stream loses the columns it does not keep while the
stream channels it still reads carry only the writers that kept them. Both are exactly "positions of
parameter axes that become zero", so the same maths applies unchanged once the plan's silenced positions
stand in for the removed ones: `PlanRemovals` is a `ChannelAnalysis` whose ``removed_positions`` are the
plan's (whatever labels are asked for), and whose masked model (`rewrite.apply_mask`) is the oracle.

* ``ls``: ridge least squares of every consumer's kept columns on the original model's calibration
  Hessian (`repair.repair_weights`), the Optimal Brain Surgeon update; one forward pass.
* ``seq``: the same fitted wave by wave on the *masked and already repaired* model's own inputs
  (`repair.repair_sequential`): a reader of a residual stream sees the stream as the writers that kept
  each channel leave it, so the error of every earlier layer is compensated where it lands.
* ``relu_refit`` (after ``seq``): constrained mode's ReLU-aware refit (`repair_relu.refit_relu`) with the plan's
  silenced positions, taken once the readers have chosen: every layer feeding a ReLU is refitted on the error
  after the activation. Pretrained CIFAR-10 ResNets, the best configuration (l2, coupled, reader ls, stream
  repair, lamp), 2,000 calibration images, all 10,000 test images, 20% / 40% of the parameters removed: R20
  90.72 / 88.27 -> 90.85 / 88.90 (row-sampling seeds 1 / 2: 90.86 / 88.75, 90.87 / 88.80), R44 92.60 / 90.70
  -> 92.60 / 90.88; data-free on ``synthetic:512`` R20 at synthesis seeds 0 / 1 / 2 90.50 / 90.50 / 90.49 ->
  90.63 / 90.61 / 90.53 and 86.34 / 86.56 / 86.87 -> 86.51 / 86.60 / 86.80, R44 92.47 / 90.17 -> 92.55 / 90.36
  (`bench/accuracy_real_results.txt`, session 51; with the stream statistics in float32 BLAS blocks since
  session 52: R20 90.85 / 88.88, R44 92.60 / 90.89, data-free seed 0 90.64 / 86.51 and 92.54 / 90.36). +15-25 s
  on R20.

The result is the original model with new values (same shapes, possibly a new bias input); masking it with
the same kept sets (`plan.build_plan` with the units' keeps) gives the oracle the export must equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import onnx

from onnxprune.calibration import CalibrationData, collect_stats
from onnxprune.calibration_data import as_calibration
from onnxprune.channels import ChannelAnalysis, DimRef
from onnxprune.errors import UsageError
from onnxprune.graph import ModelGraph
from onnxprune.repair import RepairReport, repair_sequential, repair_weights
from onnxprune.repair_relu import refit_relu
from onnxprune.upscale.config import REPAIRS
from onnxprune.upscale.oracle import mean_repair, silenced_positions
from onnxprune.upscale.records import Piece, UnconstrainedPlan
from onnxprune.upscale.stream_repair import ColumnChoice, repair_stream

# A removal label that stands for "the plan's silenced positions" (`PlanRemovals` ignores the labels, but
# the repair functions treat an empty label array as "nothing removed").
_ALL = np.zeros(1, dtype=np.int64)


@dataclass
class PlanRemovals(ChannelAnalysis):
    """A `ChannelAnalysis` of the model to repair whose removed positions are an unconstrained plan's
    silenced ones (``silenced``), for every label asked: what constrained repair reads of an analysis is
    the graph, the roles (which fill a silenced position takes) and the removed positions."""

    silenced: dict[DimRef, np.ndarray] = field(default_factory=dict)

    def removed_positions(self, removed_labels: np.ndarray) -> dict[DimRef, np.ndarray]:
        return dict(self.silenced) if len(removed_labels) else {}


def plan_removals(model: onnx.ModelProto, plan: UnconstrainedPlan) -> PlanRemovals:
    """The plan's silenced parameter positions as removed positions over `model` (the unsplit original:
    the split model only adds Identity nodes, so parameter names and shapes are the same)."""
    silenced: dict[DimRef, np.ndarray] = {}
    for name, s in silenced_positions(plan).items():
        for axis, positions in s.cuts:
            ref = DimRef(name, axis)
            old = silenced.get(ref)
            silenced[ref] = np.unique(positions if old is None else np.concatenate([old, positions]))
    base = plan.analysis
    values = {f.name: getattr(base, f.name) for f in fields(ChannelAnalysis)}
    values.update(graph=ModelGraph(model), groups=[], barriers=[], dims={}, labels=np.zeros(0, dtype=np.int64),
                  frozen_reasons={}, frozen_nodes={})
    return PlanRemovals(**values, silenced=silenced)


def repair_plan(model: onnx.ModelProto, plan: UnconstrainedPlan, method: str, calib: dict[str, np.ndarray],
                *, damp: float = 0.01, seed: int = 0, stream: bool = False, choose_readers: bool = False,
                relu_refit: bool = False) -> tuple[onnx.ModelProto, RepairReport]:  # fmt: skip
    """`model` (the unsplit original) with its layers refitted for `plan` on calibration inputs `calib`.

    Args:
        method: "mean" (`oracle.mean_repair`), "ls" or "seq" (see the module docstring); "none": unchanged.
        calib: calibration inputs ``{input name: array}``, samples on axis 0.
        damp: ridge term, relative to the mean diagonal of each consumer's Hessian block.
        stream: with "seq", writers into a residual stream refit toward the original stream minus what the
            other Add input carries now (`stream_repair.repair_stream`).
        choose_readers: with "seq", the readers of streams with several writers re-choose their input
            channels (as many as they keep) when they are fitted, on the pruned model's own inputs
            (`stream_repair.choose_columns`); their units' ``keep`` in `plan` is updated in place.
        relu_refit: with "seq", then every layer that feeds a ReLU is refitted on the error after the ReLU
            (`repair_relu.refit_relu`, on the plan's silenced positions once the readers have chosen).
    """
    if method not in REPAIRS:
        raise UsageError(f"unconstrained repair must be one of {', '.join(REPAIRS)}, got {method!r}")
    if method == "none":
        return model, RepairReport()
    if method == "mean":
        return mean_repair(model, plan, calib), RepairReport()
    removals = plan_removals(model, plan)
    data = as_calibration(calib)
    if method == "seq":
        repaired, report = _sequential(model, plan, removals, data, damp, seed, stream, choose_readers)
        if relu_refit:
            repaired, relu = refit_relu(plan_removals(model, plan), _ALL, plan_removals(repaired, plan), _ALL, data,
                                        seed=seed)
            report.relu_refit = relu.as_dict()
        return repaired, report
    stats = collect_stats(model, data, seed=seed)
    return repair_weights(removals, _ALL, "ls", stats, damp=damp)


def _sequential(model: onnx.ModelProto, plan: UnconstrainedPlan, removals: PlanRemovals, data: CalibrationData,
                damp: float, seed: int, stream: bool, choose_readers: bool) -> tuple[onnx.ModelProto, RepairReport]:
    """The ``seq`` repair of `repair_plan`: stream-aware (`stream_repair.repair_stream`) when asked, else
    `repair.repair_sequential` on the plan's silenced positions."""
    if stream or choose_readers:
        choices = reader_choices(plan) if choose_readers else {}
        by_weight: dict[str, list[ColumnChoice]] = {}
        for _, choice in choices:
            by_weight.setdefault(choice.weight, []).append(choice)
        repaired, report = repair_stream(removals, data, damp=damp, seed=seed, stream=stream, choices=by_weight)
        for pc, choice in choices:
            if choice.kept is not None:
                keep = np.zeros_like(pc.kept)
                keep[choice.channel_of[choice.kept]] = True
                pc.keep = keep
        return repaired, report
    return repair_sequential(removals, _ALL, data, damp=damp, seed=seed)


def reader_choices(plan: UnconstrainedPlan) -> list[tuple[Piece, ColumnChoice]]:
    """The reader units (one weight member) of groups with two or more writer units: the readers whose
    input channels `repair_stream` re-chooses (a single writer's readers see zeros exactly where it dropped
    channels, so their choice cannot change). One weight may read several groups (behind a channel Pad)."""
    out: list[tuple[Piece, ColumnChoice]] = []
    for gp in plan.groups:
        if sum(pc.is_unit and pc.has_producer for pc in gp.pieces) < 2:
            continue
        for pc in gp.pieces:
            if pc.is_unit and not pc.has_producer and len(pc.weights) == 1:
                m = pc.weights[0]
                out.append((pc, ColumnChoice(m.tensor, m.axis, np.asarray(m.positions), np.asarray(m.channel_of),
                                             int(pc.kept.sum()))))  # fmt: skip
    return out
