"""Pooling, resizing, padding, reductions and softmax: channel axes pass straight through; spatial axes
change size and are left unmapped (frozen). Reducing or normalising over a channel axis makes that dim
inexact: removing zeros from a mean, max or softmax changes its value."""

from __future__ import annotations

import onnx

from onnxprune.graph import attrs
from onnxprune.rules.base import ChannelRule, register
from onnxprune.rules.protocols import RuleBarrier
from onnxprune.rules.shape_inputs import read_axes, shape_elements


@register(
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "MaxRoiPool",
)
class Pool(ChannelRule):
    zero_preserving = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")

    def couple(self, node, ctx):
        if len(node.output) > 1 and node.output[1]:
            raise RuleBarrier("MaxPool indices encode channel offsets")
        x, y = node.input[0], node.output[0]
        ctx.link(x, 0, y, 0)
        ctx.link(x, 1, y, 1)


class _SameSizeAxes(ChannelRule):
    """Axes whose size does not change are identities; for Resize the `sizes` vector is rewritten."""

    sizes_input: int | None = None

    def couple(self, node, ctx, skip: frozenset[int] = frozenset()):
        x, y = node.input[0], node.output[0]
        sx, sy = ctx.shape(x), ctx.shape(y)
        if sx is None or sy is None or len(sx) != len(sy):
            raise RuleBarrier("shapes unknown")
        sizes = shape_elements(ctx, node, self.sizes_input) if self.sizes_input is not None else None
        for ax, (a, b) in enumerate(zip(sx, sy)):
            if a == b and a is not None and ax not in skip:
                if sizes and (ax >= len(sizes) or sizes[ax][1] is None):
                    continue  # a run-time sizes vector would not follow
                ctx.link(x, ax, y, ax)

    def rewrite(self, node, ctx):
        if self.sizes_input is None:
            return
        y = node.output[0]
        for ax, (_value, loc) in enumerate(shape_elements(ctx, node, self.sizes_input) or []):
            if loc is not None and ctx.new_size(y, ax) != ctx.old_size(y, ax):
                ctx.set_element(loc, ctx.new_size(y, ax))


@register("Resize")
class Resize(_SameSizeAxes):
    sizes_input = 3
    zero_preserving = ("Resize",)

    def static_inputs(self, node):
        return {1, 2, 3}

    def couple(self, node, ctx):
        if attrs(node).get("axes") is not None:
            raise RuleBarrier("Resize with axes")
        super().couple(node, ctx)


@register("Upsample")
class Upsample(_SameSizeAxes):
    zero_preserving = ("Upsample",)

    def static_inputs(self, node):
        return {1}


@register("Pad")
class Pad(_SameSizeAxes):
    def static_inputs(self, node):
        return {1, 2, 3}

    def couple(self, node, ctx):
        pads = attrs(node).get("pads")
        if pads is None:
            value = ctx.const(node.input[1]) if len(node.input) > 1 else None
            if value is None:
                raise RuleBarrier("pads computed at run time")
            pads = [int(v) for v in value]
        rank = ctx.rank(node.input[0])
        axes = read_axes(node, ctx, 3, list(range(rank or 0)))
        padded = {a % rank for a, lo, hi in zip(axes, pads[: len(axes)], pads[len(axes) :]) if lo or hi}
        super().couple(node, ctx, frozenset(padded))


_EXACT_REDUCTIONS = {"ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2"}


@register(
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
)
class Reduce(ChannelRule):
    zero_preserving = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")

    def static_inputs(self, node):
        return {1}

    def couple(self, node, ctx):
        x, y = node.input[0], node.output[0]
        rank = ctx.rank(x)
        if rank is None:
            raise RuleBarrier("rank unknown")
        at = attrs(node)
        axes = read_axes(node, ctx, 1, None)
        if not axes:
            if at.get("noop_with_empty_axes", 0):
                return ctx.link_all(x, y)
            axes = list(range(rank))
        reduced = {a % rank for a in axes}
        keepdims = at.get("keepdims", 1)
        out_axis = 0
        for ax in range(rank):
            if ax in reduced:
                if node.op_type in _EXACT_REDUCTIONS:
                    ctx.independent(x, ax)
                else:
                    ctx.mark_inexact(x, ax, f"{node.op_type} over this axis")
                if keepdims:
                    out_axis += 1
                continue
            ctx.link(x, ax, y, out_axis)
            out_axis += 1


@register("ArgMax", "ArgMin")
class ArgReduce(ChannelRule):
    def couple(self, node, ctx):
        x, y = node.input[0], node.output[0]
        rank = ctx.rank(x)
        if rank is None:
            raise RuleBarrier("rank unknown")
        at = attrs(node)
        axis = at.get("axis", 0) % rank
        keepdims = at.get("keepdims", 1)
        ctx.freeze(x, axis, "arg-reduction returns positions along this axis")
        for ax in range(rank):
            if ax != axis:
                ctx.link(x, ax, y, ax if (keepdims or ax < axis) else ax - 1)


class _SoftmaxFamily(ChannelRule):
    """Softmax-like normalisation over `normalised_axes`: those dims are inexact, the rest pass through."""

    same_shape = ("Softmax", "LogSoftmax")

    def normalised_axes(self, node: onnx.NodeProto, rank: int) -> list[int]:
        raise NotImplementedError

    def couple(self, node, ctx):
        x, y = node.input[0], node.output[0]
        rank = ctx.rank(x)
        if rank is None:
            raise RuleBarrier("rank unknown")
        ctx.link_all(x, y)
        for ax in self.normalised_axes(node, rank):
            ctx.mark_inexact(x, ax, f"{node.op_type} over this axis")


@register("Softmax", "LogSoftmax", "Hardmax", until=12)
class SoftmaxCoerced(_SoftmaxFamily):
    """Opsets < 13 flatten the input to 2-D at `axis` (default 1): every axis from `axis` on is normalised."""

    def normalised_axes(self, node, rank):
        return list(range(attrs(node).get("axis", 1) % rank, rank))


@register("Softmax", "LogSoftmax", "Hardmax", since=13)
class Softmax(_SoftmaxFamily):
    """Opset 13 on: normalised along `axis` alone (default -1)."""

    def normalised_axes(self, node, rank):
        return [attrs(node).get("axis", -1) % rank]
