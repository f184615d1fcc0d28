"""Per-operator facts that passes and analyses ask about, answered from the one rule registry.

`op_facts(op_type, domain, opset)` says whether an operator maps an all-silenced channel to zero (what
unconstrained pruning needs to narrow a producer) and whether its first output has its first input's
shape (what shape inference falls back on; `output_shape` where a rule computes another shape);
`linear_axes(node, graph)` says which weight axes of a
linear layer read input channels and write output channels. Each rule declares these for the op types
it registers (`base.ChannelRule`); this module only looks them up.
"""

from __future__ import annotations

import onnx

from onnxprune.graph import ModelGraph
from onnxprune.onnx_utils import opset_of
from onnxprune.rules.base import RULES, OpFacts

__all__ = ["OpFacts", "linear_axes", "op_facts", "output_shape"]


def op_facts(op_type: str, domain: str = "", opset: int | None = None) -> OpFacts:
    """The facts of one operator at `opset` (the newest rule's when None); all False when unknown."""
    reg = RULES.registration(domain, op_type, opset)
    return reg.rule.facts(op_type) if reg is not None else OpFacts()


def linear_axes(node: onnx.NodeProto, graph: ModelGraph) -> tuple[int, int] | None:
    """(input-channel axis, output-channel axis) of the weight (input 1) of a linear layer, else None.

    Conv: (1, 0); Gemm: by ``transB``; MatMul: the weight's last two axes.
    """
    reg = RULES.registration(node.domain, node.op_type, opset_of(graph.model, node.domain) or None)
    return reg.rule.linear_axes(node, graph) if reg is not None else None


def output_shape(node: onnx.NodeProto, shape_of) -> tuple | None:
    """Output 0's shape as the node's rule computes it from its inputs' shapes (`ChannelRule.output_shape`), for
    operators onnx cannot infer; None when the rule does not say."""
    reg = RULES.registration(node.domain, node.op_type, None)
    return reg.rule.output_shape(node, shape_of) if reg is not None else None
