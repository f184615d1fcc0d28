"""onnxprune: ONNX graph-level structured pruner and deployment compiler.

The public API: import, analyse, score, plan, rewrite, and the pass infrastructure.
"""

from __future__ import annotations

__version__ = "0.1.0"

from onnxprune.canonical import normalize  # noqa: E402
from onnxprune.channels import ChannelAnalysis, ChannelGroup, ChannelSlice, analyze  # noqa: E402
from onnxprune.criteria import CRITERIA, Criterion, Magnitude, Random  # noqa: E402
from onnxprune.errors import ModelError, OnnxPruneError, PreconditionError, UnsupportedModelError, UsageError  # noqa: E402
from onnxprune.graph import ModelGraph  # noqa: E402
from onnxprune.importer import import_model, load_model  # noqa: E402
from onnxprune.io import save_model  # noqa: E402
from onnxprune.passes.cleanup import CheckPass, DeadCodeEliminationPass, ShapeInferencePass  # noqa: E402
from onnxprune.passes.config import PruneConfig  # noqa: E402
from onnxprune.passes.fold import FoldBatchNormPass  # noqa: E402
from onnxprune.passes.normalize import NormalizePass  # noqa: E402
from onnxprune.passes.pruning import PrunePass  # noqa: E402
from onnxprune.passes.remove import PruneSummary, RemoveChannelsPass  # noqa: E402
from onnxprune.passes.repair import RepairChannelsPass  # noqa: E402
from onnxprune.passes.select import AnalyzeChannelsPass, ChannelSelection, SelectChannelsPass  # noqa: E402
from onnxprune.passmanager import (  # noqa: E402
    AnalysisCache, DumpInstrument, Instrument, Pass, PassManager, PassResult, ProgressInstrument, StampInstrument,
    Summary, TimingInstrument,
)
from onnxprune.plan import PruningPlan, make_plan  # noqa: E402
from onnxprune.rewrite import apply_mask, apply_plan  # noqa: E402
from onnxprune.rules import RULES, ChannelRule  # noqa: E402
from onnxprune.shape_inference import infer_shapes  # noqa: E402

__all__ = [
    "CRITERIA", "AnalysisCache", "AnalyzeChannelsPass", "ChannelAnalysis", "ChannelGroup", "ChannelRule",
    "ChannelSelection", "ChannelSlice", "CheckPass", "Criterion", "DeadCodeEliminationPass", "DumpInstrument",
    "FoldBatchNormPass", "Instrument", "Magnitude", "ModelError", "ModelGraph", "NormalizePass", "OnnxPruneError",
    "Pass", "PassManager", "PassResult", "PreconditionError", "ProgressInstrument", "PruneConfig", "PrunePass",
    "PruneSummary", "PruningPlan", "RULES", "Random", "RemoveChannelsPass", "RepairChannelsPass",
    "SelectChannelsPass", "ShapeInferencePass", "StampInstrument", "Summary", "TimingInstrument",
    "UnsupportedModelError", "UsageError", "analyze", "apply_mask", "apply_plan", "import_model", "infer_shapes",
    "load_model", "make_plan", "normalize", "save_model",
]  # fmt: skip
