"""Cleanup and checking passes: shape re-inference, dead-code removal, the ONNX checker.

All three keep the model's semantics; only dead-code elimination reports `modified` (when it removed
something), and running any of them again changes nothing.
"""

from __future__ import annotations

import onnx

from onnxprune.canonical import remove_dead_code
from onnxprune.importer import check_model
from onnxprune.passmanager import Pass, PassResult
from onnxprune.shape_inference import infer_shapes


class ShapeInferencePass(Pass):
    """Drop stale value_info and infer shapes again. Reports modified=False: semantics are unchanged."""

    def call(self, model):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        del out.graph.value_info[:]
        return PassResult(infer_shapes(out), False)


class DeadCodeEliminationPass(Pass):
    """Remove nodes and initializers no graph output depends on."""

    def call(self, model):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        changed = remove_dead_code(out.graph)
        return PassResult(out if changed else model, changed)


class CheckPass(Pass):
    """Full ONNX checker; raises ModelError with one line on failure. Changes nothing."""

    def call(self, model):
        check_model(model)
        return PassResult(model, False)
