"""onnxprune: ONNX graph-level structured pruner and deployment compiler.

The public API: import, analyse, score, plan, rewrite, and the pass infrastructure. Names are imported on
first use (PEP 562), so `import onnxprune` and `onnxprune --version` stay fast: onnx, onnxruntime, scipy
and the passes load only when a command or a caller needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from onnxprune.version import __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "normalize": "onnxprune.canonical",
    "Certificate": "onnxprune.certificate",
    "certify": "onnxprune.certificate",
    "ChannelAnalysis": "onnxprune.channels",
    "ChannelGroup": "onnxprune.channels",
    "ChannelSlice": "onnxprune.channels",
    "analyze": "onnxprune.channels",
    "CRITERIA": "onnxprune.criteria",
    "Criterion": "onnxprune.criteria",
    "Magnitude": "onnxprune.criteria",
    "Random": "onnxprune.criteria",
    "dependency_graph": "onnxprune.depgraph",
    "write_graph": "onnxprune.depgraph",
    "DataError": "onnxprune.errors",
    "ModelError": "onnxprune.errors",
    "OnnxPruneError": "onnxprune.errors",
    "PreconditionError": "onnxprune.errors",
    "UnsupportedModelError": "onnxprune.errors",
    "UsageError": "onnxprune.errors",
    "fold_batchnorm": "onnxprune.fold",
    "ModelGraph": "onnxprune.graph",
    "import_model": "onnxprune.importer",
    "load_model": "onnxprune.importer",
    "save_model": "onnxprune.io",
    "BlockRemovalConfig": "onnxprune.passes.block_removal",
    "BlockRemovalPass": "onnxprune.passes.block_removal",
    "CheckPass": "onnxprune.passes.cleanup",
    "DeadCodeEliminationPass": "onnxprune.passes.cleanup",
    "ShapeInferencePass": "onnxprune.passes.cleanup",
    "PruneConfig": "onnxprune.passes.config",
    "FoldBatchNormPass": "onnxprune.passes.fold",
    "NormalizePass": "onnxprune.passes.normalize",
    "PrunePass": "onnxprune.passes.pruning",
    "PruneSummary": "onnxprune.passes.remove",
    "RemoveChannelsPass": "onnxprune.passes.remove",
    "ReorderPass": "onnxprune.passes.reorder",
    "RepairChannelsPass": "onnxprune.passes.repair",
    "AnalyzeChannelsPass": "onnxprune.passes.select",
    "ChannelSelection": "onnxprune.passes.select",
    "SelectChannelsPass": "onnxprune.passes.select",
    "UnconstrainedPass": "onnxprune.passes.unconstrained",
    "AnalysisCache": "onnxprune.passmanager",
    "DumpInstrument": "onnxprune.passmanager",
    "Instrument": "onnxprune.passmanager",
    "Pass": "onnxprune.passmanager",
    "PassManager": "onnxprune.passmanager",
    "PassResult": "onnxprune.passmanager",
    "ProgressInstrument": "onnxprune.passmanager",
    "StampInstrument": "onnxprune.passmanager",
    "Summary": "onnxprune.passmanager",
    "TimingInstrument": "onnxprune.passmanager",
    "PruningPlan": "onnxprune.plan",
    "make_plan": "onnxprune.plan",
    "apply_mask": "onnxprune.rewrite",
    "apply_plan": "onnxprune.rewrite",
    "ChannelRule": "onnxprune.rules",
    "RULES": "onnxprune.rules",
    "infer_shapes": "onnxprune.shape_inference",
    "UnconstrainedConfig": "onnxprune.upscale.config",
}

__all__ = [
    "CRITERIA",
    "RULES",
    "AnalysisCache",
    "AnalyzeChannelsPass",
    "BlockRemovalConfig",
    "BlockRemovalPass",
    "Certificate",
    "ChannelAnalysis",
    "ChannelGroup",
    "ChannelRule",
    "ChannelSelection",
    "ChannelSlice",
    "CheckPass",
    "Criterion",
    "DataError",
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
    "ReorderPass",
    "RepairChannelsPass",
    "SelectChannelsPass",
    "ShapeInferencePass",
    "StampInstrument",
    "Summary",
    "TimingInstrument",
    "UnconstrainedConfig",
    "UnconstrainedPass",
    "UnsupportedModelError",
    "UsageError",
    "__version__",
    "analyze",
    "apply_mask",
    "apply_plan",
    "certify",
    "dependency_graph",
    "fold_batchnorm",
    "import_model",
    "infer_shapes",
    "load_model",
    "make_plan",
    "normalize",
    "save_model",
    "write_graph",
]



def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'onnxprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    # the public names (what tab completion offers), not this module's own helpers (importlib, Any, ...)
    return sorted(set(__all__) | {"__version__"})


if TYPE_CHECKING:  # what static type checkers and IDEs see
    from onnxprune.canonical import normalize
    from onnxprune.certificate import Certificate, certify
    from onnxprune.channels import ChannelAnalysis, ChannelGroup, ChannelSlice, analyze
    from onnxprune.criteria import CRITERIA, Criterion, Magnitude, Random
    from onnxprune.depgraph import dependency_graph, write_graph
    from onnxprune.errors import (
        DataError,
        ModelError,
        OnnxPruneError,
        PreconditionError,
        UnsupportedModelError,
        UsageError,
    )
    from onnxprune.fold import fold_batchnorm
    from onnxprune.graph import ModelGraph
    from onnxprune.importer import import_model, load_model
    from onnxprune.io import save_model
    from onnxprune.passes.block_removal import BlockRemovalConfig, BlockRemovalPass
    from onnxprune.passes.cleanup import CheckPass, DeadCodeEliminationPass, ShapeInferencePass
    from onnxprune.passes.config import PruneConfig
    from onnxprune.passes.fold import FoldBatchNormPass
    from onnxprune.passes.normalize import NormalizePass
    from onnxprune.passes.pruning import PrunePass
    from onnxprune.passes.remove import PruneSummary, RemoveChannelsPass
    from onnxprune.passes.reorder import ReorderPass
    from onnxprune.passes.repair import RepairChannelsPass
    from onnxprune.passes.select import AnalyzeChannelsPass, ChannelSelection, SelectChannelsPass
    from onnxprune.passes.unconstrained import UnconstrainedPass
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
    from onnxprune.upscale.config import UnconstrainedConfig
