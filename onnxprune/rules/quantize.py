"""QuantizeLinear and DequantizeLinear: the QDQ format of quantized models.

Both are element-wise on their data (every axis maps to the same output axis). Their scale and zero point
are a scalar (per tensor: independent of the channels) or a vector along ``axis`` (per channel: position c
is channel c's scale, removed with it). Blocked quantization (``block_size``, opset 21) scales blocks of an
axis together, not channels: a barrier.

Neither is zero-preserving alone (QuantizeLinear maps 0 to the zero point, DequantizeLinear maps 0 to
``-zero_point * scale``); the pair maps 0 to 0, and a quantized weight silenced to its zero point
dequantizes to 0 (``quantized.zero_point_fill``), so masked and pruned QDQ models agree exactly.
"""

from __future__ import annotations

from onnxprune.graph import attrs
from onnxprune.rules.base import ChannelRule, register
from onnxprune.rules.protocols import RuleBarrier


@register("QuantizeLinear", "DequantizeLinear", since=10)
class Quantization(ChannelRule):
    def couple(self, node, ctx):
        x, y = node.input[0], node.output[0]
        if attrs(node).get("block_size", 0):
            raise RuleBarrier("blocked quantization (block_size): blocks, not channels, share a scale")
        ctx.link_all(x, y)
        rank = ctx.rank(x)
        axis = int(attrs(node).get("axis", 1))  # read only with per-axis parameters (a bias' default 1 is moot)
        # QuantizeLinear divides by its scale (masked to 1: 0 / 1 quantizes to the zero point); a dequantization
        # scale is masked to 0 and is no BatchNorm gamma (the `bn` criterion reads role "scale")
        ctx.set_role(node.input[1], "divisor" if node.op_type == "QuantizeLinear" else "dequantization scale")
        for param in node.input[1:3]:
            if not param:
                continue
            prank = ctx.rank(param)
            if prank == 0 or ctx.shape(param) == (1,):
                ctx.independent_tensor(param)
            elif prank == 1 and rank is not None:
                if not -rank <= axis < rank:
                    raise RuleBarrier(f"per-axis {node.op_type} along axis {axis} of a rank-{rank} tensor")
                ctx.link(param, 0, x, axis % rank)
            else:
                raise RuleBarrier(f"{node.op_type} parameter {param!r} of rank {prank}")


@register("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", since=10)
class IntegerOperator(ChannelRule):
    """Facts only: the QOperator / integer formats fold scales and zero points into one operator (and
    ``quantize_dynamic`` computes them at run time); no rule maps their channels, so they are barriers, with
    the way out as the reason."""

    couples = False
    barrier_reason = (
        "integer operator (QOperator format): prune the float model, or its QDQ export "
        "(onnxruntime quantize_static with quant_format=QuantFormat.QDQ)"
    )

    def couple(self, node, ctx):
        raise RuleBarrier(self.barrier_reason)
