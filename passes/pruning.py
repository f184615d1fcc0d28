"""PrunePass: constrained channel pruning as one pass, composed of the small passes that do the work.

    SelectChannelsPass -> RepairChannelsPass -> RemoveChannelsPass -> CheckPass

(`select.py`: analyse, score, allocate; `repair.py`: refit consumers before removal; `remove.py`: delete
channels, re-infer shapes, summarise; `cleanup.py`: the ONNX checker). `PrunePass` is a `PassManager` over
exactly these passes, built from one `PruneConfig`, so it can stand anywhere a pass can and its result is
that of the pipeline: the `PruneSummary` artifact, and the same record (plus the plan and the analysis) in
`info` for callers of the untyped API. A modified model is stamped with the summary (``onnxprune.summary``
metadata) by a `StampInstrument`; compose the small passes yourself to choose other instruments.
"""

from __future__ import annotations

import onnx

from onnxprune.calibration import CalibrationStats
from onnxprune.calibration_data import CalibLike, as_calibration
from onnxprune.channels import ChannelAnalysis
from onnxprune.criteria import Criterion
from onnxprune.passes.cleanup import CheckPass
from onnxprune.passes.config import PruneConfig
from onnxprune.passes.remove import PruneSummary, RemoveChannelsPass
from onnxprune.passes.repair import RepairChannelsPass
from onnxprune.passes.select import ChannelSelection, SelectChannelsPass
from onnxprune.passmanager import PassManager, PassResult, StampInstrument
from onnxprune.plan import PruningPlan

__all__ = ["PruneConfig", "PrunePass"]


class PrunePass(PassManager):
    """Analyse, score, allocate, (repair,) remove, check; stamps the summary into a modified model.

    The arguments are `SelectChannelsPass`'s (`calib` also feeds the `seq` repair); the positional order is
    kept for callers that predate the split into select / repair / remove passes.
    """

    def __init__(self, config: PruneConfig | None = None, criterion: Criterion | None = None,
                 calib: CalibLike | None = None, stats: CalibrationStats | None = None) -> None:
        self.config = config or PruneConfig()
        calib = as_calibration(calib)  # a plain {input name: array} is welcome too
        self.select = SelectChannelsPass(self.config, criterion=criterion, calib=calib, stats=stats)
        super().__init__([self.select, RepairChannelsPass(calib), RemoveChannelsPass(), CheckPass()],
                         instruments=[StampInstrument()])

    def check_data(self) -> list[str]:
        """Raise UsageError when data is required but missing; one-line notices for data-free fallbacks."""
        return self.select.check_data()

    @property
    def notices(self) -> list[str]:
        """The notices a run reports (data-free fallbacks); they follow from the constructor's inputs."""
        return self.select.check_data()

    def plan(self, analysis: ChannelAnalysis, stats: CalibrationStats | None = None) -> PruningPlan:
        """The plan this pass would carry out on an analysed model."""
        return self.select.plan(analysis, stats)

    def call(self, model: onnx.ModelProto) -> PassResult:
        result = super().call(model)
        summary = result.get(PruneSummary)
        selection = result.get(ChannelSelection)
        assert summary is not None and selection is not None  # the remove and select passes' artifacts
        record = summary.as_dict()
        if selection.latency is not None:  # a latency target: its verified measurement
            record["latency"] = selection.latency.as_dict()
        info = {"summary": record, "analysis": selection.source, "plan": selection.plan}
        return PassResult(result.model, result.modified, info, result.artifacts, result.steps)
