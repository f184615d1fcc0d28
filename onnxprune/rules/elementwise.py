"""Element-wise operators: every axis of every input maps to the same axis of the output (broadcasting
from the right; a size-1 axis facing a larger one is independent)."""

from __future__ import annotations

from onnxprune.rules.base import ChannelRule, register

UNARY = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Softplus",
    "Softsign", "Elu", "Selu", "Celu", "Mish", "ThresholdedRelu", "Abs", "Neg", "Exp", "Log", "Sqrt",
    "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh",
    "Cosh", "Asinh", "Acosh", "Atanh", "Not", "IsNaN", "IsInf", "Identity", "Cast", "CastLike",
    "Shrink", "BitwiseNot",
)  # fmt: skip

BINARY = (
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Mod", "Equal", "Less", "LessOrEqual",
    "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Where", "PRelu", "BitShift", "BitwiseAnd",
    "BitwiseOr", "BitwiseXor",
)  # fmt: skip

# Role of a constant operand, deciding how `rewrite.apply_mask` silences a channel in it.
_OPERAND_ROLE = {"Add": "bias", "Sub": "bias", "Mul": "scale", "Div": "divisor", "PRelu": "scale"}


@register(*UNARY)
class Unary(ChannelRule):
    def static_inputs(self, node):
        return {1} if node.op_type == "CastLike" else set()

    def couple(self, node, ctx):
        ctx.link_all(node.input[0], node.output[0])
        if node.op_type == "CastLike":
            ctx.independent_tensor(node.input[1])


@register("Dropout")
class Dropout(ChannelRule):
    def static_inputs(self, node):
        return {1, 2}

    def couple(self, node, ctx):
        for out in node.output:
            if out:
                ctx.link_all(node.input[0], out)


@register("Clip")
class Clip(ChannelRule):
    def static_inputs(self, node):
        return {1, 2}  # scalar min / max

    def couple(self, node, ctx):
        ctx.link_all(node.input[0], node.output[0])


@register(*BINARY)
class Broadcasting(ChannelRule):
    def couple(self, node, ctx):
        out = node.output[0]
        for i, name in enumerate(node.input):
            if not name:
                continue
            ctx.link_all(name, out)
            role = _OPERAND_ROLE.get(node.op_type, "bias")
            ctx.set_role(name, "scale" if role == "divisor" and i == 0 else role)
