"""onnxprune: ONNX graph-level structured pruner and deployment compiler.

The public API: import, analyse, score, plan, rewrite, and the pass infrastructure.
"""

from __future__ import annotations

__version__ = "0.1.0"

from onnxprune.channels import ChannelAnalysis, ChannelGroup, ChannelSlice, analyze  # noqa: E402
from onnxprune.errors import ModelError, OnnxPruneError, UnsupportedModelError, UsageError  # noqa: E402
from onnxprune.graph import ModelGraph  # noqa: E402
from onnxprune.importer import import_model, infer_shapes, load_model, normalize  # noqa: E402
from onnxprune.io import save_model  # noqa: E402
from onnxprune.passes.cleanup import CheckPass, DeadCodeEliminationPass, ShapeInferencePass  # noqa: E402
from onnxprune.passes.normalize import NormalizePass  # noqa: E402
from onnxprune.passes.pruning import PruneConfig, PrunePass  # noqa: E402
from onnxprune.criteria import CRITERIA, Criterion, Magnitude, Random  # noqa: E402
from onnxprune.passmanager import (  # noqa: E402
    DumpInstrument, Instrument, Pass, PassManager, PassResult, TimingInstrument,
)
from onnxprune.plan import PruningPlan, make_plan  # noqa: E402
from onnxprune.rewrite import apply_mask, apply_plan  # noqa: E402
from onnxprune.rules import RULES, ChannelRule  # noqa: E402

__all__ = [
    "CRITERIA", "ChannelAnalysis", "ChannelGroup", "ChannelRule", "ChannelSlice", "CheckPass", "Criterion",
    "DeadCodeEliminationPass", "DumpInstrument", "Instrument", "Magnitude", "ModelError", "ModelGraph",
    "NormalizePass", "OnnxPruneError", "Pass", "PassManager", "PassResult", "PruneConfig", "PrunePass",
    "PruningPlan", "RULES", "Random", "ShapeInferencePass", "TimingInstrument", "UnsupportedModelError",
    "UsageError", "analyze", "apply_mask", "apply_plan", "import_model", "infer_shapes", "load_model",
    "make_plan", "normalize", "save_model",
]  # fmt: skip
