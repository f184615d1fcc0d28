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
    # f(0) == 0; Sigmoid, Exp, Cos, Log, ... map a silenced channel to a constant that is not zero.
    zero_preserving = (
        "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "HardSwish", "Mish", "Tanh", "Erf", "Neg", "Abs",
        "Softsign", "Sin", "Atan", "Asin", "Sinh", "Asinh", "Atanh", "Tan", "Sqrt", "Identity", "Cast", "Sign",
        "Round", "Floor", "Ceil",
    )  # fmt: skip
    same_shape = (
        "Relu", "Sigmoid", "Tanh", "Gelu", "HardSwish", "HardSigmoid", "LeakyRelu", "Identity", "Erf", "Mish",
        "Softplus", "Elu", "Selu",
    )  # fmt: skip

    def static_inputs(self, node):
        return {1} if node.op_type == "CastLike" else set()

    def couple(self, node, ctx):
        ctx.link_all(node.input[0], node.output[0])
        if node.op_type == "CastLike":
            ctx.independent_tensor(node.input[1])


@register("Dropout")
class Dropout(ChannelRule):
    zero_preserving = ("Dropout",)
    same_shape = ("Dropout",)

    def static_inputs(self, node):
        return {1, 2}

    def couple(self, node, ctx):
        for out in node.output:
            if out:
                ctx.link_all(node.input[0], out)


@register("Clip")
class Clip(ChannelRule):
    same_shape = ("Clip",)  # zero-preserving only when 0 lies in [min, max]: not a fact of the operator

    def static_inputs(self, node):
        return {1, 2}  # scalar min / max

    def couple(self, node, ctx):
        ctx.link_all(node.input[0], node.output[0])


@register(*BINARY)
class Broadcasting(ChannelRule):
    # With the silenced operand (bias 0, scale 0, divisor 1): 0 + 0, 0 - 0, 0 * s, 0 / 1, PRelu(0).
    zero_preserving = ("Add", "Sub", "Mul", "Div", "PRelu")
    same_shape = ("PRelu",)

    def couple(self, node, ctx):
        out = node.output[0]
        for i, name in enumerate(node.input):
            if not name:
                continue
            ctx.link_all(name, out)
            role = _OPERAND_ROLE.get(node.op_type, "bias")
            ctx.set_role(name, "scale" if role == "divisor" and i == 0 else role)
