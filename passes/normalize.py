"""NormalizePass: canonical form for every later pass (see `onnxprune.importer`)."""

from __future__ import annotations

from onnxprune.importer import canonicalize
from onnxprune.passmanager import Pass, PassResult


class NormalizePass(Pass):
    def call(self, model):
        out, changed = canonicalize(model)
        return PassResult(out, changed)
