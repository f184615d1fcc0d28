"""Per-operator facts that passes and analyses ask about, answered from the one rule registry.

`op_facts(op_type, domain, opset)` says whether an operator maps an all-silenced channel to zero (what
unconstrained pruning needs to narrow a producer), whether its first output has its first input's shape
(what shape inference falls back on), and `linear_axes(node, graph)` which weight axes of a linear layer
read input channels and write output channels.

TRANSITIONAL: the answers still come from the tables below; they move onto the rules themselves (one
declaration per rule, with an opset range), after which this module only looks them up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx

if TYPE_CHECKING:
    from onnxprune.graph import ModelGraph


@dataclass(frozen=True)
class OpFacts:
    """What an operator guarantees, independent of its channel coupling.

    Attributes:
        zero_preserving: an all-zero input channel (parameters silenced as `rewrite.apply_mask` does: zero,
            1 for variances and divisors) gives an all-zero output channel.
        same_shape: output 0 has input 0's shape and element type.
    """

    zero_preserving: bool = False
    same_shape: bool = False


_ZERO_PRESERVING = {
    "Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Relu", "LeakyRelu", "PRelu", "Elu",
    "Selu", "Celu", "Gelu", "HardSwish", "Mish", "Tanh", "Erf", "Neg", "Abs", "Softsign", "Sin", "Atan",
    "Asin", "Sinh", "Asinh", "Atanh", "Tan", "Sqrt", "Identity", "Dropout", "Add", "Sub", "Mul", "Div",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "Reshape",
    "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice", "Resize", "Upsample",
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "Expand", "Tile", "Cast", "DepthToSpace",
    "SpaceToDepth", "Sign", "Round", "Floor", "Ceil",
}  # fmt: skip

_SAME_SHAPE = {
    "GroupNormalization", "LayerNormalization", "InstanceNormalization", "BatchNormalization",
    "RMSNormalization", "Relu", "Sigmoid", "Tanh", "Gelu", "HardSwish", "HardSigmoid", "LeakyRelu",
    "Softmax", "LogSoftmax", "Dropout", "Identity", "Clip", "Erf", "Mish", "Softplus", "Elu", "Selu", "PRelu",
}  # fmt: skip


def op_facts(op_type: str, domain: str = "", opset: int | None = None) -> OpFacts:
    """The facts of one operator (all False for an unknown operator or a custom domain)."""
    if domain not in ("", "ai.onnx"):
        return OpFacts()
    return OpFacts(zero_preserving=op_type in _ZERO_PRESERVING, same_shape=op_type in _SAME_SHAPE)


def linear_axes(node: onnx.NodeProto, graph: ModelGraph) -> tuple[int, int] | None:
    """(input-channel axis, output-channel axis) of the weight (input 1) of a linear layer, else None.

    Conv: (1, 0); Gemm: by ``transB``; MatMul: the weight's last two axes.
    """
    from onnxprune.graph import attrs

    if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    if node.op_type == "Conv":
        return 1, 0
    if node.op_type == "Gemm":
        return (1, 0) if attrs(node).get("transB", 0) else (0, 1)
    if node.op_type == "MatMul":
        rank = graph.rank(node.input[1]) or 2
        return rank - 2, rank - 1
    return None
