"""RemoveChannelsPass: delete the selected channels, re-infer shapes, and summarise the pruning.

The last pass of constrained pruning (select -> repair -> remove). It reads the pending `ChannelSelection`,
deletes its channels with `onnxprune.rewrite.apply_plan` (weights sliced, every node whose attributes or
shape constants depend on a changed size fixed) and re-infers shapes, so the output is ready for the
checker (`CheckPass`) and for MAC counting. Its artifact is the `PruneSummary` of the whole selection:
sizes before and after, the plan, barriers, the repair, notices; `StampInstrument` writes it into the
model's metadata, the CLI prints it. With nothing selected the model is returned unchanged.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from onnxprune.graph import ModelGraph
from onnxprune.metrics import count_macs, count_params
from onnxprune.passes.select import ChannelSelection, pending_selection
from onnxprune.passmanager import Pass, PassResult, Summary
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

    @classmethod
    def of(cls, selection: ChannelSelection, pruned_graph: ModelGraph) -> PruneSummary:
        source, plan = selection.source, selection.plan
        return cls(
            tool=f"onnxprune {__version__}",
            config=asdict(selection.config),
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
            notices=list(selection.notices),
            seconds=round(time.perf_counter() - selection.started, 3),
        )

    def as_dict(self) -> dict:
        return asdict(self)


class RemoveChannelsPass(Pass):
    """Remove the pending selection's channels and re-infer shapes; the artifact is a `PruneSummary`."""

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
        return PassResult(pruned, pruned is not model, artifacts=(PruneSummary.of(selection, graph),))
