"""Cleanup and checking passes: shape re-inference, dead-code removal, the ONNX checker."""

from __future__ import annotations

import onnx

from onnxprune.importer import _remove_dead_code, check_model, infer_shapes
from onnxprune.passmanager import Pass, PassResult


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
        changed = _remove_dead_code(out.graph)
        return PassResult(out if changed else model, changed)


class CheckPass(Pass):
    """Full ONNX checker; raises ModelError with one line on failure."""

    def call(self, model):
        check_model(model)
        return PassResult(model, False)
