"""Layout operators: Transpose, Squeeze/Unsqueeze, Concat, Split, Slice, Expand, Tile, Gather, Shape, and the
fills whose shape is an input (ConstantOfShape); Reshape and Flatten live in `reshape`, GatherND in `gather`.

Each maps axes one to one, by offset (Concat, Split, Slice) or not at all (a gathered axis). Shape
constants (Split sizes, Slice bounds, Expand shapes) are rewritten in place when a dim shrinks; a dim whose
target value is computed at run time is frozen instead.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.graph import attrs, set_attr, subgraph_reads
from onnxprune.onnx_utils import has_subgraph
from onnxprune.rules.base import ChannelRule, register
from onnxprune.rules.protocols import RuleBarrier
from onnxprune.rules.routing import expert_routes, topk_of_indices
from onnxprune.rules.shape_inputs import is_runtime_size, read_axes, runtime_sizes, shape_elements

INT_MAX = 2**62


@register("Transpose")
class Transpose(ChannelRule):
    zero_preserving = ("Transpose",)

    def couple(self, node, ctx):
        x, y = node.input[0], node.output[0]
        rank = ctx.rank(x)
        if rank is None:
            raise RuleBarrier("rank unknown")
        perm = attrs(node).get("perm", list(reversed(range(rank))))
        for out_axis, in_axis in enumerate(perm):
            ctx.link(x, in_axis, y, out_axis)


@register("Squeeze")
class Squeeze(ChannelRule):
    zero_preserving = ("Squeeze",)

    def static_inputs(self, node):
        return {1}

    def couple(self, node, ctx):
        x, y = node.input[0], node.output[0]
        shape = ctx.shape(x)
        if shape is None:
            raise RuleBarrier("rank unknown")
        axes = read_axes(node, ctx, 1)
        if axes is None:
            axes = [a for a, d in enumerate(shape) if d == 1]
        axes = {a % len(shape) for a in axes}
        kept = [a for a in range(len(shape)) if a not in axes]
        for out_axis, in_axis in enumerate(kept):
            ctx.link(x, in_axis, y, out_axis)


@register("Unsqueeze")
class Unsqueeze(ChannelRule):
    zero_preserving = ("Unsqueeze",)

    def static_inputs(self, node):
        return {1}

    def couple(self, node, ctx):
        x, y = node.input[0], node.output[0]
        ry = ctx.rank(y)
        if ry is None:
            raise RuleBarrier("rank unknown")
        axes = {a % ry for a in read_axes(node, ctx, 1, [])}
        kept = [a for a in range(ry) if a not in axes]
        for in_axis, out_axis in enumerate(kept):
            ctx.link(x, in_axis, y, out_axis)


@register("Concat")
class Concat(ChannelRule):
    zero_preserving = ("Concat",)

    def couple(self, node, ctx):
        y = node.output[0]
        rank = ctx.rank(y)
        if rank is None:
            raise RuleBarrier("rank unknown")
        axis = attrs(node)["axis"] % rank
        offset = 0
        for x in node.input:
            if not x:
                continue
            for ax in range(rank):
                if ax != axis:
                    ctx.link(x, ax, y, ax)
            n = ctx.size(x, axis)
            if not isinstance(n, int):
                ctx.freeze(y, axis, "concat of an input with unknown size")
                ctx.freeze(x, axis, "concat input with unknown size")
                offset = None
                continue
            if offset is not None:
                if n > 0:
                    ctx.link(x, axis, y, axis, np.arange(n), offset + np.arange(n))
                offset += n


@register("Split")
class Split(ChannelRule):
    zero_preserving = ("Split",)

    def static_inputs(self, node):
        return {1}

    def couple(self, node, ctx):
        x = node.input[0]
        rank = ctx.rank(x)
        if rank is None:
            raise RuleBarrier("rank unknown")
        axis = attrs(node).get("axis", 0) % rank
        offset = 0
        for y in node.output:
            n = ctx.size(y, axis) if y else None
            for ax in range(rank):
                if ax != axis and y:
                    ctx.link(x, ax, y, ax)
            if not isinstance(n, int):
                raise RuleBarrier("split sizes unknown")
            if n > 0 and y:
                ctx.link(x, axis, y, axis, offset + np.arange(n), np.arange(n))
            offset += n

    def rewrite(self, node, ctx):
        x = node.input[0]
        axis = attrs(node).get("axis", 0) % len(ctx.graph.shape(x))
        if ctx.new_size(x, axis) == ctx.old_size(x, axis):
            return
        sizes = np.array([ctx.new_size(y, axis) for y in node.output], dtype=np.int64)
        if "split" in attrs(node):
            set_attr(node, "split", [int(s) for s in sizes])
        elif len(node.input) > 1 and node.input[1]:
            ctx.replace_input(node, 1, sizes)
        else:  # equal split (num_outputs / implicit): make the sizes explicit
            for i, a in enumerate(node.attribute):
                if a.name == "num_outputs":
                    del node.attribute[i]
                    break
            ctx.replace_input(node, 1, sizes)


@register("Slice")
class Slice(ChannelRule):
    zero_preserving = ("Slice",)

    def static_inputs(self, node):
        return {1, 2, 3, 4}

    def _params(self, node, ctx):
        """``(shape, axes, starts, ends, steps)``; a bound computed at run time is None (its axes are
        frozen, the others still map one to one)."""
        x = node.input[0]
        shape = ctx.shape(x)
        if shape is None:  # onnx's inference gave up upstream (run-time shapes): nothing to map
            raise RuleBarrier("rank unknown")
        at = attrs(node)
        if "starts" in at:  # opset < 10
            starts, ends = list(at["starts"]), list(at["ends"])
            axes = list(at.get("axes", range(len(starts))))
            return shape, [a % len(shape) for a in axes], starts, ends, [1] * len(starts)
        given = [i < len(node.input) and bool(node.input[i]) for i in range(5)]
        vals = [ctx.const(node.input[i]) if given[i] else None for i in range(5)]
        if given[3] and vals[3] is None:
            raise RuleBarrier("slice axes computed at run time")
        if vals[3] is not None:
            axes = [int(v) for v in vals[3].reshape(-1)]
        else:
            count = ctx.size(node.input[1], 0) if ctx.rank(node.input[1]) == 1 else None
            if not isinstance(count, int):
                raise RuleBarrier("slice bounds computed at run time")
            axes = list(range(count))

        def bound(i: int, default: int | None = None) -> list:
            if not given[i]:
                return [default] * len(axes)
            return [None] * len(axes) if vals[i] is None else [int(v) for v in vals[i].reshape(-1)]

        return shape, [a % len(shape) for a in axes], bound(1), bound(2), bound(4, 1)

    def couple(self, node, ctx):
        x, y = node.input[0], node.output[0]
        shape, axes, starts, ends, steps = self._params(node, ctx)
        sliced = dict(zip(axes, zip(starts, ends, steps)))
        for ax in range(len(shape)):
            if ax not in sliced:
                ctx.link(x, ax, y, ax)
                continue
            s, e, step = sliced[ax]
            n = shape[ax]
            if s is None or e is None or step is None:
                ctx.freeze(x, ax, "slice bounds computed at run time")
                ctx.freeze(y, ax, "slice bounds computed at run time")
                continue
            if step != 1 or not isinstance(n, int):
                ctx.freeze(x, ax, "strided or unsized slice")
                ctx.freeze(y, ax, "strided or unsized slice")
                continue
            s, e = _clamp(s, n), _clamp(e, n)
            if e - s > 0:
                ctx.link(x, ax, y, ax, np.arange(s, e), np.arange(e - s))
            ctx.independent(x, ax)  # positions outside [s, e) only move the bounds

    def rewrite(self, node, ctx):
        x = node.input[0]
        shape, axes, starts, ends, _steps = self._params(node, ctx)
        new_starts, new_ends = list(starts), list(ends)
        changed = False
        for k, ax in enumerate(axes):
            removed = ctx.removed(x, ax)
            if len(removed) == 0:
                continue  # run-time bounds only slice frozen axes, which lose nothing
            n = shape[ax]
            s, e = _clamp(starts[k], n), _clamp(ends[k], n)
            new_starts[k] = s - int(np.sum(removed < s))
            new_ends[k] = INT_MAX if ends[k] >= n else e - int(np.sum(removed < e))
            changed = True
        if not changed:
            return
        if "starts" in attrs(node):
            set_attr(node, "starts", new_starts)
            set_attr(node, "ends", new_ends)
        else:
            ctx.replace_input(node, 1, np.array(new_starts, dtype=ctx.const(node.input[1]).dtype))
            ctx.replace_input(node, 2, np.array(new_ends, dtype=ctx.const(node.input[2]).dtype))


def _clamp(v: int, n: int) -> int:
    if v < 0:
        v += n
    return max(0, min(v, n))


@register("Expand")
class Expand(ChannelRule):
    zero_preserving = ("Expand",)

    def static_inputs(self, node):
        return {1}

    def couple(self, node, ctx):
        x, y = node.input[0], node.output[0]
        rx, ry = ctx.rank(x), ctx.rank(y)
        if rx is None or ry is None:
            raise RuleBarrier("rank unknown")
        targets = shape_elements(ctx, node, 1)
        offset = ry - (len(targets) if targets else ry)
        for k in range(1, ry + 1):
            out_axis = ry - k
            in_axis = rx - k
            sx = ctx.size(x, in_axis) if in_axis >= 0 else 1
            value, loc = targets[out_axis - offset] if targets and out_axis - offset >= 0 else (1, None)
            if sx != 1 and (value == 1 or loc is not None or value == ("size", x, in_axis)):
                ctx.link(x, in_axis, y, out_axis)
            elif sx != 1:
                ctx.freeze(x, in_axis, "expand target computed at run time")
                ctx.freeze(y, out_axis, "expand target computed at run time")
            elif (loc is not None or is_runtime_size(value)) and _index_broadcast(ctx.graph, y, out_axis):
                # One index repeated along an axis its readers do not index (torchvision's MultiScaleRoIAlign
                # expands each RoI's slot over [R, C, h, w] for ScatterElements): no value along the axis is
                # read as data, so the readers couple it; a constant target is rewritten, a run-time one follows.
                ctx.independent(y, out_axis)
                if is_runtime_size(value):
                    ctx.link(value[1], value[2], y, out_axis)
            # otherwise (sx == 1) the output size is created by the target shape: left unmapped, hence frozen

    def rewrite(self, node, ctx):
        y = node.output[0]
        targets = shape_elements(ctx, node, 1) or []
        offset = ctx.graph.rank(y) - len(targets)
        for k, (value, loc) in enumerate(targets):
            ax = k + offset
            if ax >= 0 and value not in (1, None) and loc is not None and ctx.new_size(y, ax) != ctx.old_size(y, ax):
                ctx.set_element(loc, ctx.new_size(y, ax))


def _index_broadcast(graph, name: str, axis: int) -> bool:
    """Is `name` read only as the indices of ScatterElements / GatherElements along another axis than `axis`?
    Then its positions along `axis` address nothing: the reader keeps index, data and output aligned there."""
    uses = graph.consumers.get(name, [])
    if not uses or graph.is_graph_io(name) or any(has_subgraph(n) and name in subgraph_reads(n) for n in graph.nodes):
        return False
    for use in uses:
        node, rank = use.node, graph.rank(name)
        if node.op_type not in ("ScatterElements", "GatherElements") or use.index != 1 or rank is None:
            return False
        if list(node.input).count(name) != 1 or attrs(node).get("axis", 0) % rank == axis:
            return False
    return True


@register("Tile")
class Tile(ChannelRule):
    zero_preserving = ("Tile",)

    def static_inputs(self, node):
        return {1}

    def couple(self, node, ctx):
        repeats = ctx.const(node.input[1])
        if repeats is None:
            raise RuleBarrier("tile repeats computed at run time")
        for ax, r in enumerate(repeats.reshape(-1)):
            if int(r) == 1:
                ctx.link(node.input[0], ax, node.output[0], ax)


@register("Gather")
class Gather(ChannelRule):
    def couple(self, node, ctx):
        data, idx, y = node.input[0], node.input[1], node.output[0]
        rd, ri = ctx.rank(data), ctx.rank(idx)
        if rd is None or ri is None:
            raise RuleBarrier("rank unknown")
        axis = attrs(node).get("axis", 0) % rd
        for ax in range(rd):
            if ax < axis:
                ctx.link(data, ax, y, ax)
            elif ax > axis:
                ctx.link(data, ax, y, ax + ri - 1)
        for ax in range(ri):
            ctx.link(idx, ax, y, axis + ax)
        topk = topk_of_indices(ctx, idx)
        routes = expert_routes(ctx, topk) if topk is not None else None
        if routes and any(gather is node for gather, _, _ in routes):
            ctx.independent(data, axis)  # stacked experts: the TopK rule links this axis (`rules.routing`)
        elif ctx.const(idx) is not None and _sizes_only(ctx.graph, y):
            # Only the output's sizes are read, and the gathered axis is not one of them (BART's encoder takes
            # the length of ``inputs_embeds[:, :, -1]``): the axis is free; `rewrite` keeps the indices in range.
            ctx.independent(data, axis)
        else:
            ctx.freeze(data, axis, "gathered axis")
        ctx.set_role(data, "weight")

    def rewrite(self, node, ctx):
        data, idx = node.input[0], node.input[1]
        value, rank = ctx.const(idx), ctx.rank(data)
        if value is None or rank is None or not _sizes_only(ctx.graph, node.output[0]):
            return
        axis = attrs(node).get("axis", 0) % rank
        new = ctx.new_size(data, axis)
        if isinstance(new, int) and new != ctx.old_size(data, axis) and np.any((value >= new) | (value < -new)):
            ctx.replace_input(node, 1, np.zeros_like(value))  # any index in range gives the same sizes


def _sizes_only(graph, name: str) -> bool:
    """Is `name` read only by Shape / Size nodes (not a graph output, not read inside a subgraph)?"""
    uses = graph.consumers.get(name, [])
    if not uses or graph.is_graph_io(name) or any(u.node.op_type not in ("Shape", "Size") for u in uses):
        return False
    return not any(has_subgraph(n) and name in subgraph_reads(n) for n in graph.nodes)


@register("Range", since=11)
class Range(ChannelRule):
    """Scalars in, positions out (a dynamic-length transformer's position ids): no channel anywhere; its output
    axis is frozen like every axis a rule leaves unmapped, and the node is not a barrier."""

    def couple(self, node, ctx):
        pass


@register("Constant")
class ConstantNode(ChannelRule):
    """A Constant left as a node: canonicalisation makes every other one an initializer, but a subgraph's output
    cannot be one (torchvision's batched NMS returns an empty index list from an If branch). No inputs, sizes
    fixed by its value: its axes are frozen like every axis a rule leaves unmapped, and it is not a barrier."""

    def couple(self, node, ctx):
        pass


@register("CumSum", since=11)
class CumSum(ChannelRule):
    """A running sum along one axis (constant `axis` input): positions along it mix, every other axis maps to
    the output's (RoBERTa's position ids are a CumSum of its padding mask)."""

    def static_inputs(self, node):
        return {1}

    def couple(self, node, ctx):
        x, y = node.input[0], node.output[0]
        axis, rank = ctx.const(node.input[1]), ctx.rank(x)
        if axis is None or axis.size != 1 or rank is None:
            raise RuleBarrier("CumSum axis or rank unknown")
        axis = int(axis.reshape(-1)[0]) % rank
        for ax in range(rank):
            if ax == axis:
                ctx.freeze(x, ax, "cumulative axis")
                ctx.freeze(y, ax, "cumulative axis")
            else:
                ctx.link(x, ax, y, ax)


@register("Shape", "Size")
class ShapeOf(ChannelRule):
    """Reads only sizes; shape arithmetic that feeds a Reshape/Expand is checked by that rule."""

    def couple(self, node, ctx):
        ctx.independent_tensor(node.input[0])


@register("DepthToSpace", "SpaceToDepth")
class DepthSpace(ChannelRule):
    """Facts only: channels interleave with spatial blocks and no rule maps them yet, so the analysis
    treats these operators as barriers ("no channel rule"); what they guarantee is still known."""

    couples = False
    zero_preserving = ("DepthToSpace", "SpaceToDepth")

    def couple(self, node, ctx):
        raise RuleBarrier(f"no channel rule for {node.op_type}")


@register("ConstantOfShape", since=9)
class Fill(ChannelRule):
    """ConstantOfShape: one value repeated over a shape read from input 0 (a recurrent layer's zero initial
    state ``zeros(dirs, batch, H)``, ``zeros_like`` / ``ones_like``, attention-mask buffers).

    Every position of a fill holds the same value, so a *zero* fill can lose positions on any axis: an axis
    whose size is a constant element of the shape input is left to the fill's readers (they couple it) and
    that element is rewritten; an axis sized at run time from another tensor's size follows that size (linked
    to it); an axis sized otherwise is frozen. A nonzero fill is not coupled: a removed channel must read zero
    in the model the pruned one equals (its producers silenced), and ``x + ones_like(x)`` would put a one
    back there; its axes are frozen, with the tensor axes its sizes are read from (they would resize it). Its
    shape vector carries no channels: a fill is a barrier only when that vector cannot be read.
    """

    def static_inputs(self, node: onnx.NodeProto) -> set[int]:
        return {0}

    def couple(self, node, ctx):
        y = node.output[0]
        value = attrs(node).get("value")
        fill = numpy_helper.to_array(value) if value is not None else np.zeros(1)
        targets = _fill_sizes(ctx, node)
        if targets is None or len(targets) != ctx.rank(y):
            raise RuleBarrier("fill shape unknown")
        zero = not np.any(fill != 0)
        for axis, (size, location) in enumerate(targets):
            runtime = is_runtime_size(size)
            if not zero:
                ctx.freeze(y, axis, "a nonzero fill (ConstantOfShape) cannot lose channels")
                if runtime:
                    ctx.freeze(size[1], size[2], "sizes a nonzero fill (ConstantOfShape)")
            elif location is not None:
                ctx.independent(y, axis)
            elif runtime:
                ctx.link(y, axis, size[1], size[2])
            else:
                ctx.freeze(y, axis, "fill size computed at run time")

    def rewrite(self, node, ctx):
        y = node.output[0]
        for axis, (_, location) in enumerate(_fill_sizes(ctx, node) or []):
            new = ctx.new_size(y, axis)
            if location is not None and isinstance(new, int) and new != ctx.old_size(y, axis):
                ctx.set_element(location, new)


def _fill_sizes(ctx, node: onnx.NodeProto) -> list | None:
    """`shape_elements` of a fill's shape vector; a vector read whole from tensor sizes (``Shape(x)``, slices
    and gathers of it) gives each element's size source."""
    targets = shape_elements(ctx, node, 0)
    if targets is not None and all(v is None and loc is None for v, loc in targets):
        sizes = runtime_sizes(ctx, node.input[0])
        if sizes is not None and len(sizes) == len(targets):
            return [(size, None) for size in sizes]
    return targets
