"""Normalisations.

BatchNormalization and InstanceNormalization are per channel: exact. GroupNormalization computes
statistics per group of channels, so a whole norm group is one channel (removing it leaves the other
groups' statistics untouched). LayerNormalization / RMSNormalization average over their normalised axes:
removing channels there changes every statistic, so those dims are *inexact* (prunable only on request) —
except a LayerNormalization over the last axis whose input's removed channels have a computable value
(`onnxprune.statistics`): it is rewritten to keep the statistics of its original width, exactly; and an
RMSNormalization over the last axis whose removed channels are zero, rewritten by its epsilon and scale.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.graph import attrs, set_attr
from onnxprune.rules.base import ChannelRule, register
from onnxprune.rules.protocols import RuleBarrier
from onnxprune.statistics import NodeBuilder, layer_norm_nodes, phantom_chain


@register("BatchNormalization")
class BatchNorm(ChannelRule):
    zero_preserving = ("BatchNormalization",)
    same_shape = ("BatchNormalization",)

    def couple(self, node, ctx):
        if attrs(node).get("training_mode", 0) or sum(1 for o in node.output if o) > 1:
            raise RuleBarrier("BatchNormalization in training mode")
        x, y = node.input[0], node.output[0]
        ctx.link_all(x, y)
        for name, role in zip(node.input[1:5], ("scale", "bias", "bias", "variance")):
            ctx.link(name, 0, x, 1)
            ctx.set_role(name, role)


@register("InstanceNormalization")
class InstanceNorm(ChannelRule):
    same_shape = ("InstanceNormalization",)

    def couple(self, node, ctx):
        x, y = node.input[0], node.output[0]
        ctx.link(x, 0, y, 0)
        ctx.link(x, 1, y, 1)
        for name, role in zip(node.input[1:3], ("scale", "bias")):
            ctx.link(name, 0, x, 1)
            ctx.set_role(name, role)


@register("GroupNormalization")
class GroupNorm(ChannelRule):
    same_shape = ("GroupNormalization",)

    def couple(self, node, ctx):
        x, y = node.input[0], node.output[0]
        c = ctx.size(x, 1)
        groups = attrs(node)["num_groups"]
        if not isinstance(c, int):
            raise RuleBarrier("channel count unknown")
        per = c // groups
        ctx.link(x, 0, y, 0)
        ctx.link(x, 1, y, 1)
        ctx.link(x, 1, x, 1, np.arange(c), (np.arange(c) // per) * per)
        for name, role in zip(node.input[1:3], ("scale", "bias")):
            ctx.set_role(name, role)
            if ctx.size(name, 0) == c:
                ctx.link(name, 0, x, 1)
            else:  # opset 18: one scale per group
                ctx.link(name, 0, x, 1, np.arange(groups), np.arange(groups) * per)

    def rewrite(self, node, ctx):
        x = node.input[0]
        old, new = ctx.old_size(x, 1), ctx.new_size(x, 1)
        if old != new:
            set_attr(node, "num_groups", attrs(node)["num_groups"] * new // old)


class _NormOverTrailingAxes(ChannelRule):
    """Statistics over axes >= `axis`: those dims are inexact; scale/bias broadcast onto them."""

    exact_statistics = False  # LayerNormalization: rewritten with the original width's statistics

    def correctable(self, node, ctx) -> bool:
        """One normalised axis (the last), no Mean/InvStdDev outputs, and a computable phantom."""
        x = node.input[0]
        rank = ctx.rank(x)
        return (
            self.exact_statistics
            and rank is not None
            and attrs(node).get("axis", -1) % rank == rank - 1
            and not any(node.output[1:])
            and phantom_chain(ctx.graph, x, rank - 1) is not None
        )

    def couple(self, node, ctx):
        x, y = node.input[0], node.output[0]
        rank = ctx.rank(x)
        if rank is None:
            raise RuleBarrier("rank unknown")
        axis = attrs(node).get("axis", -1) % rank
        ctx.link_all(x, y)
        if not self.correctable(node, ctx):
            for ax in range(axis, rank):
                ctx.mark_inexact(x, ax, f"{node.op_type} normalises over this axis")
        for name, role in zip(node.input[1:3], ("scale", "bias")):
            if name:
                ctx.link_all(name, x)
                ctx.set_role(name, role)
        for extra in node.output[1:]:  # Mean / InvStdDev: shape of x with normalised axes = 1
            if extra:
                ctx.link_all(x, extra)


@register("LayerNormalization")
class LayerNorm(_NormOverTrailingAxes):
    same_shape = ("LayerNormalization",)
    exact_statistics = True

    def rewrite(self, node, ctx):
        x = node.input[0]
        rank = ctx.rank(x)
        if rank is None or not len(ctx.removed(x, rank - 1)) or not self.correctable(node, ctx):
            return
        b = NodeBuilder(ctx.fresh_name, ctx.graph.dtype(x) or onnx.TensorProto.FLOAT, ctx.opset())
        layer_norm_nodes(b, ctx.graph, node, len(ctx.removed(x, rank - 1)), attrs(node).get("epsilon", 1e-5))
        ctx.replace_node(node, b.nodes, b.constants)


@register("RMSNormalization")
class RMSNorm(_NormOverTrailingAxes):
    """Exact over the last axis when the removed channels are zero in the oracle (their writers are zeroed): the
    sum of squares is then the kept channels' alone, and only the divisor changes, ``N_old -> N_new``. Since
    ``sqrt(S / N_new + eps * N_old / N_new) = sqrt(N_old / N_new) * sqrt(S / N_old + eps)``, the pruned node keeps
    the original statistics with ``epsilon * N_old / N_new`` and its scale times ``sqrt(N_old / N_new)``: no new
    node (a transformers Llama exported at opset 23 normalises its hidden size this way)."""

    same_shape = ("RMSNormalization",)
    exact_statistics = True

    def correctable(self, node, ctx) -> bool:
        x = node.input[0]
        rank = ctx.rank(x)
        return (
            rank is not None
            and attrs(node).get("axis", -1) % rank == rank - 1
            and ctx.const(node.input[1]) is not None
            and phantom_chain(ctx.graph, x, rank - 1) == []
        )

    def rewrite(self, node, ctx):
        x, scale = node.input[0], node.input[1]
        rank = ctx.rank(x)
        if rank is None or not len(ctx.removed(x, rank - 1)) or not self.correctable(node, ctx):
            return
        old, new = ctx.old_size(x, rank - 1), ctx.new_size(x, rank - 1)
        value = np.asarray(ctx.const(scale))
        if value.ndim and value.shape[-1] == old:
            value = np.delete(value, ctx.removed(x, rank - 1), axis=-1)
        ratio = old / new
        ctx.replace_input(node, 1, (value * np.sqrt(ratio)).astype(value.dtype))
        set_attr(node, "epsilon", float(attrs(node).get("epsilon", 1e-5)) * ratio)
