"""Pooling, resizing, padding, reductions and softmax: channel axes pass straight through; spatial axes
change size and are left unmapped (frozen). Reducing or normalising over a channel axis makes that dim
inexact: removing zeros from a mean, max or softmax changes its value."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.graph import attrs, set_attr
from onnxprune.rules.base import ChannelRule, register
from onnxprune.rules.protocols import RuleBarrier
from onnxprune.rules.routing import expert_routes, topk_count
from onnxprune.rules.shape_inputs import is_runtime_size, read_axes, shape_elements
from onnxprune.statistics import NodeBuilder, phantom_chain, reduce_mean_nodes


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


@register("RoiAlign", since=10)
class RoiAlign(ChannelRule):
    """Pools each region of interest channel by channel: ``X [N, C, H, W] -> Y [R, C, h, w]`` (torchvision's
    MultiScaleRoIAlign on the FPN levels), so the channel axis passes; a silenced channel samples zeros. The
    regions (their boxes and batch indices) are no channels."""

    zero_preserving = ("RoiAlign",)

    def couple(self, node, ctx):
        ctx.link(node.input[0], 1, node.output[0], 1)


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
                    value = sizes[ax][0] if ax < len(sizes) else None
                    if not is_runtime_size(value):
                        ctx.freeze(x, ax, "resize sizes computed at run time")
                        ctx.freeze(y, ax, "resize sizes computed at run time")
                        continue  # a size computed otherwise would not follow a pruned axis
                    # Read from a tensor's size (torch's interpolate(size=...) with dynamic shapes takes
                    # Shape(x)[:2]): it follows that tensor after pruning, so the axis is that tensor's too.
                    ctx.link(value[1], value[2], y, ax)
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
    """Unpadded axes pass through. A constant-mode pad of a channel axis is a Concat with constant blocks
    (the CIFAR ResNets' option-A shortcut zero-pads 16 -> 32 channels): input channel i is output channel
    ``i + begin``; padded positions are channels of their own (their values are constants, so removing one
    only shrinks the pad), cropped inputs (negative pads) only move the bounds. Other modes copy input
    values into the padding, so their padded axes stay unmapped (frozen)."""

    def static_inputs(self, node):
        return {1, 2, 3}

    def _pads(self, node, ctx) -> dict[int, tuple[int, int]]:
        """Padded axis -> (begin, end) pad; raises RuleBarrier when the pads are computed at run time."""
        pads = attrs(node).get("pads")
        if pads is None:
            value = ctx.const(node.input[1]) if len(node.input) > 1 else None
            if value is None:
                raise RuleBarrier("pads computed at run time")
            pads = [int(v) for v in value]
        rank = ctx.rank(node.input[0])
        axes = read_axes(node, ctx, 3, list(range(rank or 0)))
        if rank is None or axes is None:
            raise RuleBarrier("rank or pad axes unknown")
        return {a % rank: (lo, hi) for a, lo, hi in zip(axes, pads[: len(axes)], pads[len(axes) :]) if lo or hi}

    def couple(self, node, ctx):
        padded = self._pads(node, ctx)
        super().couple(node, ctx, frozenset(padded))
        if attrs(node).get("mode", b"constant") not in (b"constant", "constant"):
            return
        x, y = node.input[0], node.output[0]
        for ax, (lo, hi) in padded.items():
            n = ctx.size(x, ax)
            if not isinstance(n, int):
                continue
            kept = np.arange(max(0, -lo), n - max(0, -hi))  # input positions that survive a crop
            if len(kept):
                ctx.link(x, ax, y, ax, kept, kept + lo)
            ctx.independent(x, ax)  # cropped inputs and padded outputs are channels of their own

    def rewrite(self, node, ctx):
        x, y = node.input[0], node.output[0]
        padded = self._pads(node, ctx)
        new = {}
        for ax, (lo, hi) in padded.items():
            rx, ry = ctx.removed(x, ax), ctx.removed(y, ax)
            if not len(rx) and not len(ry):
                continue
            nx, ny = ctx.old_size(x, ax), ctx.old_size(y, ax)
            new_lo = lo - int(np.sum(ry < lo)) if lo >= 0 else lo + int(np.sum(rx < -lo))
            new_hi = hi - int(np.sum(ry >= ny - hi)) if hi >= 0 else hi + int(np.sum(rx >= nx + hi))
            new[ax] = (new_lo, new_hi)
        if not new:
            return
        rank = len(ctx.graph.shape(x))
        axes = [a % rank for a in read_axes(node, ctx, 3, list(range(rank)))]
        begins = [new.get(a, padded.get(a, (0, 0)))[0] for a in axes]
        ends = [new.get(a, padded.get(a, (0, 0)))[1] for a in axes]
        if "pads" in attrs(node):
            set_attr(node, "pads", begins + ends)
        else:
            ctx.replace_input(node, 1, np.array(begins + ends, dtype=ctx.const(node.input[1]).dtype))


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
                if node.op_type in _EXACT_REDUCTIONS or self._correctable_mean(node, ctx, ax, reduced):
                    ctx.independent(x, ax)
                else:
                    ctx.mark_inexact(x, ax, f"{node.op_type} over this axis")
                if keepdims:
                    out_axis += 1
                continue
            ctx.link(x, ax, y, out_axis)
            out_axis += 1


    @staticmethod
    def _correctable_mean(node, ctx, axis: int, reduced: set[int]) -> bool:
        """A mean over one axis whose removed channels have a computable value (`onnxprune.statistics`)."""
        return node.op_type == "ReduceMean" and len(reduced) == 1 and phantom_chain(ctx.graph, node.input[0], axis) is not None

    def rewrite(self, node, ctx):
        if node.op_type != "ReduceMean":
            return
        x = node.input[0]
        rank = ctx.rank(x)
        axes = read_axes(node, ctx, 1, None) or list(range(rank or 0))
        reduced = sorted({a % rank for a in axes}) if rank else []
        changed = [a for a in reduced if len(ctx.removed(x, a))]
        if len(reduced) != 1 or len(changed) != 1 or not self._correctable_mean(node, ctx, changed[0], set(reduced)):
            return
        b = NodeBuilder(ctx.fresh_name, ctx.graph.dtype(x) or onnx.TensorProto.FLOAT, ctx.opset())
        reduce_mean_nodes(b, ctx.graph, node, reduced, changed[0], len(ctx.removed(x, changed[0])),
                          bool(attrs(node).get("keepdims", 1)))
        ctx.replace_node(node, b.nodes, b.constants)


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


@register("TopK")
class TopK(ChannelRule):
    """The k largest (or smallest) along one axis: values and indices, k positions there. Every other axis maps
    the input to the values one to one: each slice is ranked on its own, and a silenced slice's top values
    are its zeros. The indices' axes stay frozen: a silenced slice's indices are 0..k-1, not zeros.

    The ranked axis: its positions are addressed by the indices' values. When they only choose slices of
    stacked weights (an MoE router choosing experts: `rules.routing.expert_routes`), the axis is linked to
    those stacked axes (one channel = one expert), at least k of them stay, and removal is inexact (a token
    that chose a removed expert takes its next-best). Otherwise the ranked axis is frozen."""

    def static_inputs(self, node):
        return {1}  # K (opset >= 10)

    def couple(self, node, ctx):
        x, values = node.input[0], node.output[0]
        rank = ctx.rank(x)
        if rank is None:
            raise RuleBarrier("rank unknown")
        axis = attrs(node).get("axis", -1) % rank
        routes = expert_routes(ctx, node)
        if routes is None:
            ctx.freeze(x, axis, "ranked by TopK: its indices address these positions")
        else:
            ctx.mark_inexact(x, axis, "experts chosen by TopK: a removed one is never chosen")
            ctx.require_kept(x, axis, topk_count(ctx, node) or 1)
            for _, data, data_axis in routes:
                ctx.link(x, axis, data, data_axis)
        for ax in range(rank):
            if ax != axis:
                ctx.link(x, ax, values, ax)


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
