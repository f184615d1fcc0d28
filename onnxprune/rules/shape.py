"""Layout operators: Reshape/Flatten, Transpose, Squeeze/Unsqueeze, Concat, Split, Slice, Expand, Tile,
Gather, Shape.

Reshape is decomposed into segments of input and output axes with equal products. A 1:1 segment is an
identity. When axes merge (``[C, H, W] -> [C*H*W]``) the major input axis owns blocks of the merged axis:
channel c becomes positions ``c*H*W .. (c+1)*H*W-1``. When an axis splits (``[C] -> [heads, head_dim]``)
the major output axis (heads) owns blocks of the input axis, so a head is one channel. The minor axes of
a merge or split cannot lose positions independently and are frozen.

Shape constants (Reshape targets, Split sizes, Slice bounds, Expand shapes) are rewritten in place when a
dim shrinks; a dim whose target value is computed at run time is frozen instead.
"""

from __future__ import annotations

import numpy as np

from onnxprune.graph import Dim, attrs, set_attr
from onnxprune.onnx_utils import opset_of
from onnxprune.rules.base import RULES, ChannelRule, register
from onnxprune.rules.protocols import RuleBarrier
from onnxprune.rules.shape_inputs import read_axes, shape_elements

INT_MAX = 2**62


Segments = list[tuple[list[int], list[int]]]  # aligned (input axes, output axes) of a reshape


def _same(a: Dim, b: Dim) -> bool:
    return a is not None and a == b


def reshape_segments(in_shape: tuple[Dim, ...], out_shape: tuple[Dim, ...]) -> Segments:
    """Split two shapes into aligned segments ``(in_axes, out_axes)`` with equal element counts.

    Equal leading and trailing sizes (static or the same symbol) match one to one; the middle is
    factored by products of static sizes. A middle that cannot be factored (unknown sizes) becomes one
    segment, which the caller freezes, so the matched prefix and suffix still carry channels.
    """
    ri, ro = len(in_shape), len(out_shape)
    head = 0
    while head < min(ri, ro) and _same(in_shape[head], out_shape[head]):
        head += 1
    tail = 0
    while tail < min(ri, ro) - head and _same(in_shape[ri - 1 - tail], out_shape[ro - 1 - tail]):
        tail += 1
    segs = [([k], [k]) for k in range(head)]
    middle = _factor(in_shape, out_shape, head, ri - tail, head, ro - tail)
    if middle is None:
        middle = [(list(range(head, ri - tail)), list(range(head, ro - tail)))]
    segs += middle
    segs += [([ri - tail + k], [ro - tail + k]) for k in range(tail)]
    return segs


def _factor(
    in_shape: tuple[Dim, ...], out_shape: tuple[Dim, ...], i: int, i_end: int, j: int, j_end: int
) -> Segments | None:
    segs: Segments = []
    while i < i_end or j < j_end:
        if i < i_end and j < j_end and _same(in_shape[i], out_shape[j]):
            segs.append(([i], [j]))
            i, j = i + 1, j + 1
        elif i < i_end and in_shape[i] == 1:
            segs.append(([i], []))
            i += 1
        elif j < j_end and out_shape[j] == 1:
            segs.append(([], [j]))
            j += 1
        else:
            pi, pj = _static_at(in_shape, i, i_end), _static_at(out_shape, j, j_end)
            if pi is None or pj is None:
                return None
            ii, jj = [i], [j]
            i, j = i + 1, j + 1
            while pi != pj:
                if pi < pj:
                    size = _static_at(in_shape, i, i_end)
                    if size is None:
                        return None
                    pi *= size
                    ii.append(i)
                    i += 1
                else:
                    size = _static_at(out_shape, j, j_end)
                    if size is None:
                        return None
                    pj *= size
                    jj.append(j)
                    j += 1
            segs.append((ii, jj))
    return segs


def _static_at(shape: tuple[Dim, ...], k: int, end: int) -> int | None:
    """``shape[k]`` when `k` is before `end` and that size is static, else None."""
    if k >= end:
        return None
    size = shape[k]
    return size if isinstance(size, int) else None


def _carrier(sizes: list[int], stacked: bool = False) -> int:
    """Which of the axes a flat axis splits into carries its channels.

    The major axis by default (``C -> [heads, head_dim]``: a head is a channel). A small leading axis
    that is later taken apart (Gather/Split/Slice: fused Q/K/V ``3*E -> [3, E]`` or
    ``[3, heads, head_dim]``) is a stack of tensors instead: then the axis after it carries the
    channels, and channel j of each stacked tensor is removed together.
    """
    if stacked and len(sizes) >= 2 and sizes[0] <= 4 and int(np.prod(sizes[1:])) >= 4 * sizes[0]:
        return 1
    return 0


_LAYOUT_OPS = {"Transpose", "Squeeze", "Unsqueeze", "Identity"}


def _is_unstacked(ctx, name: str, axis: int, depth: int = 4) -> bool:
    """Is `axis` of `name` taken apart (indexed, split or sliced) after only layout ops?"""
    for use in ctx.graph.consumers.get(name, []):
        node, at = use.node, attrs(use.node)
        if use.index != 0:
            continue
        rank = ctx.rank(name) or 0
        if node.op_type in ("Gather", "Split") and at.get("axis", 0) % max(rank, 1) == axis:
            return True
        if node.op_type == "Slice" and len(node.input) > 3:
            axes = ctx.const(node.input[3])
            if axes is not None and axis in [int(a) % max(rank, 1) for a in axes.reshape(-1)]:
                return True
        if depth and node.op_type in _LAYOUT_OPS:
            moved = _follow_axis(ctx, node, name, axis)
            if moved is not None and _is_unstacked(ctx, node.output[0], moved, depth - 1):
                return True
    return False


def _follow_axis(ctx, node, name: str, axis: int) -> int | None:
    """Where `axis` of the input lands in the output of a layout op (None if it disappears)."""
    y = node.output[0]
    if node.op_type == "Identity":
        return axis
    if node.op_type == "Transpose":
        perm = attrs(node).get("perm", list(reversed(range(ctx.rank(name) or 0))))
        return list(perm).index(axis)
    try:
        if node.op_type == "Unsqueeze":
            ry = ctx.rank(y)
            inserted = {a % ry for a in read_axes(node, ctx, 1, [])}
            return [a for a in range(ry) if a not in inserted][axis]
        if node.op_type == "Squeeze":
            rx = ctx.rank(name)
            removed = {a % rx for a in (read_axes(node, ctx, 1, None) or [])}
            if axis in removed:
                return None
            return [a for a in range(rx) if a not in removed].index(axis)
    except (RuleBarrier, IndexError, TypeError, ZeroDivisionError):
        return None
    return None


def _is_stacked(ctx, name: str, axis: int, depth: int = 4) -> bool:
    """Is `axis` of `name` a stack of separate tensors (`ChannelRule.stacked_axes`: an RNN's directions),
    reached back through layout ops only?"""
    node = ctx.graph.producer.get(name)
    if node is None or (node.op_type in _LAYOUT_OPS and not depth):
        return False
    if node.op_type in _LAYOUT_OPS:
        x = node.input[0]
        back = next((a for a in range(ctx.rank(x) or 0) if _follow_axis(ctx, node, x, a) == axis), None)
        return back is not None and _is_stacked(ctx, x, back, depth - 1)
    rule = RULES.get(node.domain, node.op_type, opset_of(ctx.graph.model, node.domain) or None)
    return rule is not None and axis in rule.stacked_axes(node, list(node.output).index(name))


def _carrier_index(n: int, sizes: list[int], c: int) -> np.ndarray:
    """For each flat position 0..n-1, its index along axis `c` of the split `sizes`."""
    inner = int(np.prod(sizes[c + 1 :], dtype=np.int64))
    return (np.arange(n) // inner) % sizes[c]


def _couple_reshape(ctx, x: str, y: str, targets=None) -> None:
    """Couple a reshape from x to y. `targets` (from `shape_elements`) says which output sizes can be
    rewritten; without it (Flatten) every output size follows the input automatically."""
    in_shape, out_shape = ctx.shape(x), ctx.shape(y)
    if in_shape is None or out_shape is None:
        raise RuleBarrier("reshape shapes unknown")
    segs = reshape_segments(in_shape, out_shape)

    def rewritable(j: int, a: int | None = None) -> bool:
        if targets is None:
            return True
        if targets is False or j >= len(targets):
            return False
        value, loc = targets[j]
        return loc is not None or value in (0, -1) or (a is not None and value == ("size", x, a))

    for ii, jj in segs:
        if not ii or not jj:
            continue
        big_in = [a for a in ii if in_shape[a] != 1]
        big_out = [b for b in jj if out_shape[b] != 1]
        if not all(isinstance(in_shape[a], int) for a in big_in) or not all(
            isinstance(out_shape[b], int) for b in big_out
        ):
            if len(big_in) == 1 and len(big_out) == 1 and _same(in_shape[big_in[0]], out_shape[big_out[0]]):
                ctx.link(x, big_in[0], y, big_out[0])
                continue
            for a in ii:
                ctx.freeze(x, a, "reshape of sizes unknown before run time")
            for b in jj:
                ctx.freeze(y, b, "reshape of sizes unknown before run time")
            continue
        if len(big_in) == 1 and len(big_out) == 1:
            a, b = big_in[0], big_out[0]
            if rewritable(b, a):
                ctx.link(x, a, y, b)
            else:
                ctx.freeze(x, a, "reshape target computed at run time")
                ctx.freeze(y, b, "reshape target computed at run time")
            continue
        if len(big_out) == 1 and rewritable(big_out[0]):  # merge: one input axis owns the merged axis
            b = big_out[0]
            sizes = [in_shape[a] for a in big_in]
            c = 1 if _is_stacked(ctx, x, big_in[0]) else _carrier(sizes)  # [dirs, H] -> dirs*H: H carries
            n = out_shape[b]
            ctx.link(x, big_in[c], y, b, _carrier_index(n, sizes, c), np.arange(n))
            for a in big_in:
                if a != big_in[c]:
                    ctx.freeze(x, a, "merged into a larger axis by reshape")
            continue
        if len(big_in) == 1 and all(rewritable(b) for b in big_out):  # split: one output axis owns it
            a = big_in[0]
            sizes = [out_shape[b] for b in big_out]
            c = _carrier(sizes, stacked=_is_unstacked(ctx, y, big_out[0]))
            n = in_shape[a]
            ctx.link(x, a, y, big_out[c], np.arange(n), _carrier_index(n, sizes, c))
            for b in big_out:
                if b != big_out[c]:
                    ctx.freeze(y, b, "split off a larger axis by reshape")
            continue
        for a in ii:
            ctx.freeze(x, a, "reshape regroups axes")
        for b in jj:
            ctx.freeze(y, b, "reshape regroups axes")


@register("Reshape")
class Reshape(ChannelRule):
    zero_preserving = ("Reshape",)

    def static_inputs(self, node):
        return {1}

    def couple(self, node, ctx):
        targets = shape_elements(ctx, node, 1)
        _couple_reshape(ctx, node.input[0], node.output[0], targets if targets is not None else False)

    def rewrite(self, node, ctx):
        y = node.output[0]
        targets = shape_elements(ctx, node, 1)
        for j, (value, loc) in enumerate(targets or []):
            if ctx.new_size(y, j) != ctx.old_size(y, j) and value not in (0, -1) and loc is not None:
                ctx.set_element(loc, ctx.new_size(y, j))


@register("Flatten")
class Flatten(ChannelRule):
    zero_preserving = ("Flatten",)

    def couple(self, node, ctx):
        _couple_reshape(ctx, node.input[0], node.output[0])


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
            # sx == 1: the output size is created by the target shape: left unmapped, hence frozen

    def rewrite(self, node, ctx):
        y = node.output[0]
        targets = shape_elements(ctx, node, 1) or []
        offset = ctx.graph.rank(y) - len(targets)
        for k, (value, loc) in enumerate(targets):
            ax = k + offset
            if ax >= 0 and value not in (1, None) and loc is not None and ctx.new_size(y, ax) != ctx.old_size(y, ax):
                ctx.set_element(loc, ctx.new_size(y, ax))


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
        ctx.freeze(data, axis, "gathered axis")
        ctx.set_role(data, "weight")


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
