"""FoldBatchNormPass: inference BatchNormalization folded into the preceding Conv (see `onnxprune.fold`)."""

from __future__ import annotations

import onnx

from onnxprune.fold import fold_batchnorm
from onnxprune.importer import check_model
from onnxprune.passmanager import Pass, PassResult


class FoldBatchNormPass(Pass):
    """Fold every foldable Conv -> BatchNormalization pair; ``info["folded_batchnorms"]`` counts them.

    Reports ``modified=False`` (and returns the input model) when nothing was foldable, so a second run
    is a no-op.
    """

    def call(self, model: onnx.ModelProto) -> PassResult:
        folded = fold_batchnorm(model)
        if folded is model:
            return PassResult(model, False, {"folded_batchnorms": 0})
        count = _batchnorms(model) - _batchnorms(folded)
        return PassResult(folded, True, {"folded_batchnorms": count})

    def ensures(self, model: onnx.ModelProto) -> None:
        """The folded model passes the full ONNX checker (raises ModelError otherwise)."""
        check_model(model)


def _batchnorms(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)
