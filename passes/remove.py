"""RemoveChannelsPass: delete the selected channels, re-infer shapes, and summarise the pruning.

The last pass of constrained pruning (select -> repair -> remove). It reads the pending `ChannelSelection`,
deletes its channels with `onnxprune.rewrite.apply_plan` (weights sliced, every node whose attributes or
shape constants depend on a changed size fixed) and re-infers shapes, so the output is ready for the
checker (`CheckPass`) and for MAC counting. Its artifact is the `PruneSummary` of the whole selection:
sizes before and after, the plan, barriers, the repair, notices; `StampInstrument` writes it into the
model's metadata, the CLI prints it. Its second artifact, `RemovedChannels`, says what the pruned model was
cut from (the analysis and labels of the REPAIRED model when a repair ran): what `certificate.certify` masks
to check the result. With nothing selected the model is returned unchanged.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from onnxprune.channels import ChannelAnalysis
from onnxprune.graph import ModelGraph
from onnxprune.metrics import count_macs, count_params
from onnxprune.passes.select import ChannelSelection, pending_selection
from onnxprune.passmanager import Pass, PassResult, Summary
from onnxprune.repair import NO_STATISTICS
from onnxprune.rewrite import apply_plan
from onnxprune.shape_inference import infer_shapes
from onnxprune.version import __version__


@dataclass(frozen=True)
class PruneSummary(Summary):
    """What constrained pruning did; `as_dict()` is the ``onnxprune.summary`` record and the CLI's JSON."""

    tool: str
    config: dict
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    groups: int
    groups_pruned: int
    channels_removed: int
    plan: dict[str, int]  # group id -> channels removed, for groups that lose any
    barriers: list[dict]
    repair: dict | None
    notices: list[str]
    seconds: float
    group_sizes: dict[str, int]  # group id -> channels before pruning, for every group
    sensitivity: dict | None  # the measured rows when the sensitivity allocation ran (`SensitivityReport`)

    @classmethod
    def of(cls, selection: ChannelSelection, pruned_graph: ModelGraph) -> PruneSummary:
        source, plan = selection.source, selection.plan
        return cls(
            tool=f"onnxprune {__version__}",
            # the allocation as run (a default resolved: `PruneConfig.allocation_name`), so the record says it
            config={**asdict(selection.config), "allocation": selection.config.allocation_name},
            params_before=count_params(source.graph),
            params_after=count_params(pruned_graph),
            macs_before=count_macs(source.graph),
            macs_after=count_macs(pruned_graph),
            groups=len(source.groups),
            groups_pruned=plan.groups_pruned,
            channels_removed=plan.channels_removed,
            plan={str(gid): len(idx) for gid, idx in plan.removed.items() if len(idx)},
            barriers=[b.as_dict() for b in source.barriers],
            repair=selection.repair.as_dict() if selection.repair is not None else None,
            notices=[*selection.notices, *_repair_notice(selection)],
            seconds=round(time.perf_counter() - selection.started, 3),
            group_sizes={str(g.id): g.size for g in source.groups},
            sensitivity=selection.sensitivity.as_dict() if selection.sensitivity is not None else None,
        )

    def as_dict(self) -> dict:
        return asdict(self)


def _repair_notice(selection: ChannelSelection) -> list[str]:
    """One notice when the data-free bias repair found no BatchNorm statistics for any layer it was to repair; a model
    with convolutions and no BatchNorm at all had them folded by its exporter (torch.onnx.export's default)."""
    report = selection.repair
    if report is None or report.repaired or not report.skipped or set(report.skipped.values()) != {NO_STATISTICS}:
        return []
    ops = {n.op_type for n in selection.source.graph.model.graph.node}
    if "BatchNormalization" not in ops and ops & {"Conv", "ConvTranspose"}:
        return ["repair bias repaired nothing: the exporter folded the BatchNorms into the convolutions "
                "(torch.onnx.export's default graph optimisation); export with optimize=False (or dynamo=False) to "
                "keep the statistics it uses, or calibrate (--calib FILE or --calib synthetic, --repair seq)"]
    return ["repair bias repaired nothing: no BatchNorm statistics upstream of the pruned layers; calibrate instead "
            "(--calib FILE or --calib synthetic, --repair seq)"]


@dataclass(frozen=True, eq=False)  # holds an analysis and arrays: compared by identity
class RemovedChannels:
    """What a pruned model was cut from: `rewrite.apply_plan(analysis, labels)` is the pruned model.

    Attributes:
        analysis: channel analysis of the model the channels were removed from (the repaired model when a
            repair ran, else the selection's source); masking it (`rewrite.apply_mask`) gives the model the
            pruned one must compute exactly.
        labels: component labels, in `analysis`, of the removed channels.
    """

    analysis: ChannelAnalysis
    labels: np.ndarray


class RemoveChannelsPass(Pass):
    """Remove the pending selection's channels and re-infer shapes.

    Artifacts: the `PruneSummary` and the `RemovedChannels` (what the pruned model was cut from).
    """

    def requires(self, model):
        pending_selection(model)

    def call(self, model):
        selection = pending_selection(model)
        if selection.empty:
            pruned = model
            graph = selection.source.graph if selection.source.graph.model is model else ModelGraph(model)
        else:
            pruned = infer_shapes(apply_plan(selection.analysis, selection.labels))
            graph = ModelGraph(pruned)
        removed = RemovedChannels(selection.analysis, selection.labels)
        return PassResult(pruned, pruned is not model, artifacts=(PruneSummary.of(selection, graph), removed))
