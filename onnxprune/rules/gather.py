"""GatherND, GatherElements and ScatterElements: index some axes of a tensor, keep the others whole.

``GatherND(data, indices, batch_dims=b)`` with ``k = indices.shape[-1]`` reads, for every index tuple, the
slice ``data[batch..., i_0, .., i_(k-1), :, ..]``; the output is
``data.shape[:b] + indices.shape[b:-1] + data.shape[b+k:]``. The trailing (non-indexed) axes of the data
therefore reach the output unchanged and carry their channels one to one (last-token pooling:
``[B, S, hidden]`` indexed by ``[B, 1]`` with ``b = 1`` gives ``[B, hidden]``, hidden keeps its channels).
The indexed axes are frozen (their positions are addressed by index values, static or computed at run
time), as is the coordinate axis of the indices.
"""

from __future__ import annotations

from onnxprune.graph import attrs
from onnxprune.rules.base import ChannelRule, register
from onnxprune.rules.protocols import RuleBarrier


@register("GatherND")
class GatherND(ChannelRule):
    zero_preserving = ("GatherND",)

    def couple(self, node, ctx):
        data, idx, y = node.input[0], node.input[1], node.output[0]
        rd, ri = ctx.rank(data), ctx.rank(idx)
        if rd is None or ri is None:
            raise RuleBarrier("rank unknown")
        k = ctx.size(idx, ri - 1)
        if not isinstance(k, int):
            raise RuleBarrier("GatherND index depth unknown")
        b = attrs(node).get("batch_dims", 0)
        for ax in range(b):
            ctx.link(data, ax, y, ax)
            ctx.link(idx, ax, y, ax)
        for ax in range(b, ri - 1):
            ctx.link(idx, ax, y, ax)
        for ax in range(b, b + k):
            ctx.freeze(data, ax, "axis indexed by GatherND")
        for ax in range(b + k, rd):
            ctx.link(data, ax, y, ri - 1 + ax - b - k)
        ctx.freeze(idx, ri - 1, "GatherND index coordinates")


@register("GatherElements", since=11)
class GatherElements(ChannelRule):
    """``y[.., j, ..] = data[.., index[.., j, ..], ..]`` along `axis`: on every other axis data, index and output
    line up position by position, so those axes carry their channels (DeBERTa's relative-position gathers keep
    the heads axis); the gathered axis of the data is addressed by index values (frozen), and the index's axis
    maps to the output's."""

    zero_preserving = ("GatherElements",)

    def couple(self, node, ctx):
        data, idx, y = node.input[0], node.input[1], node.output[0]
        rank = ctx.rank(data)
        if rank is None or ctx.rank(idx) != rank or ctx.rank(y) != rank:
            raise RuleBarrier("rank unknown")
        axis = attrs(node).get("axis", 0) % rank
        for ax in range(rank):
            ctx.link(idx, ax, y, ax)
            if ax != axis:
                ctx.link(data, ax, y, ax)
        ctx.freeze(data, axis, "axis indexed by GatherElements")


@register("ScatterElements", since=11)
class ScatterElements(ChannelRule):
    """``y = data`` with ``y[.., index[.., i, ..], ..] = updates[.., i, ..]`` along `axis` (torchvision's
    MultiScaleRoIAlign merges the pyramid levels' pooled features this way, into zeros): on every other axis data,
    index, updates and output line up position by position, so those axes carry their channels; a silenced channel
    scatters zeros into zeros (under any reduction), whatever its index values. Along `axis` positions are
    addressed by index values (frozen)."""

    zero_preserving = ("ScatterElements",)

    def couple(self, node, ctx):
        data, idx, updates, y = node.input[0], node.input[1], node.input[2], node.output[0]
        rank = ctx.rank(data)
        if rank is None or ctx.rank(idx) != rank or ctx.rank(updates) != rank:
            raise RuleBarrier("rank unknown")
        axis = attrs(node).get("axis", 0) % rank
        for ax in range(rank):
            if ax == axis:
                for name in (data, idx, updates, y):
                    ctx.freeze(name, ax, "axis indexed by ScatterElements")
                continue
            ctx.link(data, ax, y, ax)
            ctx.link(updates, ax, y, ax)
            ctx.link(idx, ax, y, ax)
