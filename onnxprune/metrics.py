"""Parameter and multiply-accumulate counts, from initializers and inferred shapes.

Weights and layers inside ``If``/``Loop``/``Scan`` bodies count too (a Loop body's MACs once, per iteration
unknown); MACs inside a body are counted where the channel analysis can see the body's shapes.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.graph import Dim, ModelGraph, attrs
from onnxprune.onnx_utils import all_graphs
from onnxprune.quantized import quantized_initializers
from onnxprune.subgraphs import analysed_nodes, scoped_graph


def count_params(graph: ModelGraph) -> int:
    """Elements of floating-point initializers and of quantized (QDQ) weights and biases: integer shape
    constants and zero points are not parameters."""
    total = 0
    quantized = set(quantized_initializers(graph))
    for g in all_graphs(graph.model.graph):
        for t in g.initializer:
            if t.data_type in (1, 10, 11, 16) or t.name in quantized:  # float, float16, double, bfloat16
                total += int(np.prod(t.dims, dtype=np.int64))
    return total


def _numel(shape: tuple[Dim, ...] | None) -> int:
    if shape is None:
        return 0
    return int(np.prod([d if isinstance(d, int) else 1 for d in shape], dtype=np.int64))


def node_macs(graph: ModelGraph, node: onnx.NodeProto) -> int:
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        w = graph.shape(node.input[1])
        if w is None:
            return 0
        per_output = _numel(w[1:])  # a run-time weight may have symbolic dims: they count as 1
        if op == "Conv":
            return _numel(graph.shape(node.output[0])) * per_output
        # ConvTranspose: every input element scatters into C_out/g * k outputs.
        return _numel(graph.shape(node.input[0])) * per_output
    if op == "Gemm":
        a = graph.shape(node.input[0])
        if a is None:
            return 0
        k = a[0] if attrs(node).get("transA", 0) else a[-1]
        return _numel(graph.shape(node.output[0])) * (k if isinstance(k, int) else 1)
    if op == "MatMul":
        a = graph.shape(node.input[0])
        if not a:
            return 0
        k = a[-1]
        return _numel(graph.shape(node.output[0])) * (k if isinstance(k, int) else 1)
    return 0


def count_macs(graph: ModelGraph) -> int:
    """MACs of Conv/ConvTranspose/Gemm/MatMul at batch 1 (symbolic dims count as 1)."""
    scoped = scoped_graph(graph)
    return sum(node_macs(scoped, n) for n in analysed_nodes(scoped))
