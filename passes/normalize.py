"""NormalizePass: the canonical form every later pass relies on (see `onnxprune.importer.canonicalize`).

Weights become initializers in the layout their consumer reads, nodes get unique names, constant shape
arithmetic folds and shapes are inferred. Exact (outputs unchanged) and idempotent: a second run reports
`modified=False`.
"""

from __future__ import annotations

from onnxprune.importer import canonicalize
from onnxprune.passmanager import Pass, PassResult


class NormalizePass(Pass):
    """Canonicalise the model.

    Args:
        inplace: canonicalise the input model itself instead of a copy (for a caller that owns a freshly
            loaded model, such as the CLI: a large model's weights are then never copied).
    """

    def __init__(self, inplace: bool = False) -> None:
        self.inplace = inplace

    def call(self, model):
        out, changed = canonicalize(model, inplace=self.inplace)
        return PassResult(out, changed)
