"""NormalizePass: canonical form for every later pass (see `onnxprune.importer`)."""

from __future__ import annotations

from onnxprune.importer import infer_shapes, normalize
from onnxprune.passmanager import Pass, PassResult


class NormalizePass(Pass):
    def call(self, model):
        out, changed = normalize(model)
        return PassResult(infer_shapes(out), changed)
