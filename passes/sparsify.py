"""SparsifyPass: fine-grained pruning (weights zeroed in a pattern) as one pass after the channel passes.

A thin pass over `onnxprune.sparsity.sparsify_model`: composed after `RemoveChannelsPass` it zeroes
`SparsityConfig.sparsity` of what channel pruning left (``--ratio`` then ``--sparsity``). The graph keeps its
structure (a repair may add a bias input to a Conv/Gemm), so the output is plain ONNX that runs anywhere. A QDQ
model is sparsified on its float view and quantized again (`quantized_repair`): it stays QDQ, each zeroed weight its
zero point.

Contract:
    requires: calibration samples when the criterion or repair needs them (`SparsityConfig.check_data`).
    ensures: for an N:M pattern, every run of M weights along the reduction axis of a prunable layer
        (`sparsity.sparse_layers`) holds at most N non-zeros; for the others, the prunable layers hold at
        least the requested share of zeros in whole zero tiles, up to `UNIT_SLACK`.
Artifact: the `SparsityReport` (not a `passmanager.Summary`: the channel summary stays the model's
``onnxprune.summary`` record, and the CLI adds the report to it under ``sparsity``).
"""

from __future__ import annotations

import onnx

from onnxprune.calibration import CalibrationStats
from onnxprune.calibration_data import CalibLike, as_calibration
from onnxprune.errors import PreconditionError
from onnxprune.graph import ModelGraph
from onnxprune.passmanager import Pass, PassResult
from onnxprune.quantized_repair import float_view, requantize
from onnxprune.sparsity import SparsityConfig, sparse_layers, sparsify_model
from onnxprune.sparsity.patterns import check_mask, zero_tiles

__all__ = ["SparsifyPass"]

UNIT_SLACK = 0.01  # allocations round to whole tiles: the achieved share may fall this far below the request


class SparsifyPass(Pass):
    """Zero weights in a pattern and repair, as `config` says.

    Args:
        config: the fine-grained pruning settings.
        calib: calibration samples (Wanda / OBS scores, ``ls`` / ``seq`` repairs).
        stats: precomputed calibration statistics of the pass's input model (benchmarks reuse them).
    """

    def __init__(self, config: SparsityConfig, calib: CalibLike | None = None,
                 stats: CalibrationStats | None = None) -> None:
        self.config = config
        self.calib = as_calibration(calib)
        self.stats = stats

    def requires(self, model: onnx.ModelProto) -> None:
        self.config.check_data(self.calib is not None or (self.stats is not None and self.config.repair != "seq"))

    def call(self, model: onnx.ModelProto) -> PassResult:
        # QDQ: zeroed and repaired as floats on the float view, then quantized again on the weights' own grids (a
        # zero is its zero point exactly; `quantized_repair`)
        view, dequantized = float_view(model)
        out, report = sparsify_model(view, self.config, self.calib, self.stats)
        if out is view:
            return PassResult(model, False, artifacts=(report,))
        if dequantized:
            out, requantized = requantize(out, dequantized, model)
            report.requantized = requantized.as_dict()
        return PassResult(out, True, artifacts=(report,))

    def ensures(self, model: onnx.ModelProto) -> None:
        if self.config.sparsity == 0:
            return
        pattern = self.config.parsed
        graph = ModelGraph(float_view(model)[0])  # QDQ: the dequantized weights, where a zero point reads 0
        layers = [layer for layer in sparse_layers(graph, self.config.rules) if not layer.skip]
        total = sum(layer.size for layer in layers)
        zeroed = 0
        for layer in layers:
            m = layer.matrix(graph.initializer_value(layer.weight))
            if pattern.kind == "nm" and not check_mask(m != 0, pattern):
                raise PreconditionError(f"SparsifyPass: {layer.name} breaks the {pattern.text} pattern")
            zeroed += zero_tiles(m, pattern)
        if pattern.kind != "nm" and total and zeroed / total < self.config.sparsity - UNIT_SLACK:
            raise PreconditionError(f"SparsifyPass: {zeroed / total:.3f} of the prunable weights are zero, "
                                    f"{self.config.sparsity} were requested")
