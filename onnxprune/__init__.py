"""onnxprune: ONNX graph-level structured pruner and deployment compiler.

The public API: import, analyse, score, plan, rewrite, and the pass infrastructure.
"""

from __future__ import annotations

__version__ = "0.1.0"

from onnxprune.canonical import normalize
from onnxprune.channels import ChannelAnalysis, ChannelGroup, ChannelSlice, analyze
from onnxprune.criteria import CRITERIA, Criterion, Magnitude, Random
from onnxprune.errors import ModelError, OnnxPruneError, PreconditionError, UnsupportedModelError, UsageError
from onnxprune.graph import ModelGraph
from onnxprune.importer import import_model, load_model
from onnxprune.io import save_model
from onnxprune.passes.cleanup import CheckPass, DeadCodeEliminationPass, ShapeInferencePass
from onnxprune.passes.config import PruneConfig
from onnxprune.passes.fold import FoldBatchNormPass
from onnxprune.passes.normalize import NormalizePass
from onnxprune.passes.pruning import PrunePass
from onnxprune.passes.remove import PruneSummary, RemoveChannelsPass
from onnxprune.passes.repair import RepairChannelsPass
from onnxprune.passes.select import AnalyzeChannelsPass, ChannelSelection, SelectChannelsPass
from onnxprune.passmanager import (
    AnalysisCache,
    DumpInstrument,
    Instrument,
    Pass,
    PassManager,
    PassResult,
    ProgressInstrument,
    StampInstrument,
    Summary,
    TimingInstrument,
)
from onnxprune.plan import PruningPlan, make_plan
from onnxprune.rewrite import apply_mask, apply_plan
from onnxprune.rules import RULES, ChannelRule
from onnxprune.shape_inference import infer_shapes

__all__ = [
    "CRITERIA",
    "RULES",
    "AnalysisCache",
    "AnalyzeChannelsPass",
    "ChannelAnalysis",
    "ChannelGroup",
    "ChannelRule",
    "ChannelSelection",
    "ChannelSlice",
    "CheckPass",
    "Criterion",
    "DeadCodeEliminationPass",
    "DumpInstrument",
    "FoldBatchNormPass",
    "Instrument",
    "Magnitude",
    "ModelError",
    "ModelGraph",
    "NormalizePass",
    "OnnxPruneError",
    "Pass",
    "PassManager",
    "PassResult",
    "PreconditionError",
    "ProgressInstrument",
    "PruneConfig",
    "PrunePass",
    "PruneSummary",
    "PruningPlan",
    "Random",
    "RemoveChannelsPass",
    "RepairChannelsPass",
    "SelectChannelsPass",
    "ShapeInferencePass",
    "StampInstrument",
    "Summary",
    "TimingInstrument",
    "UnsupportedModelError",
    "UsageError",
    "analyze",
    "apply_mask",
    "apply_plan",
    "import_model",
    "infer_shapes",
    "load_model",
    "make_plan",
    "normalize",
    "save_model",
]  # fmt: skip
