"""Reshape and Flatten: how channels cross a change of shape.

Reshape is decomposed into segments of input and output axes with equal products (`reshape_segments`). A
1:1 segment is an identity. When axes merge (``[C, H, W] -> [C*H*W]``) the major input axis owns blocks of
the merged axis: channel c becomes positions ``c*H*W .. (c+1)*H*W-1``. When an axis splits
(``[C] -> [heads, head_dim]``) the major output axis (heads) owns blocks of the input axis, so a head is
one channel. The minor axes of a merge or split cannot lose positions independently and are frozen. When
both sides have several axes and one major size is k times the other (``[C, H, W] -> [G, C/G*H*W]``: torch's
GroupNorm at opset <= 17), k positions of the larger major axis are one of the smaller (`_couple_regroup`).

Which axis carries the channels (`_carrier`) has three exceptions to "the major one": a small leading
axis later taken apart (fused Q/K/V ``3*E -> [3, E]``) is a stack, so the axis after it carries; an
RNN's direction axis merged with its hidden axis is a stack too (`ChannelRule.stacked_axes`); and the
batch axis merged with or split off the head axis (the torch.export-based exporter's
``[B, heads, S, D] -> [B*heads, S, D]`` around a transpose, at a static batch > 1) is never the
carrier: the axis after it is. Start reading at `_couple_reshape`.

Reshape targets are rewritten in place when a dim shrinks; a dim whose target value is computed at run
time is frozen instead.
"""

from __future__ import annotations

import numpy as np

from onnxprune.graph import Dim, attrs
from onnxprune.onnx_utils import opset_of
from onnxprune.rules.base import RULES, ChannelRule, register
from onnxprune.rules.protocols import RuleBarrier
from onnxprune.rules.shape_inputs import read_axes, shape_elements

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
        elif (k := _product_run(in_shape[i], out_shape, j, j_end)) is not None:
            segs.append(([i], list(range(j, j + k))))  # [B*T, C] -> [B, T, ...] with symbolic B, T
            i, j = i + 1, j + k
        elif (k := _product_run(out_shape[j], in_shape, i, i_end)) is not None:
            segs.append((list(range(i, i + k)), [j]))
            i, j = i + k, j + 1
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


def _product_run(merged: Dim, shape: tuple[Dim, ...], k: int, end: int) -> int | None:
    """How many sizes of `shape` from `k` a symbolic product ``"a*b"`` spans (onnxruntime's symbolic
    inference names a merged dynamic size that way), or None."""
    if not isinstance(merged, str) or "*" not in merged:
        return None
    factors = merged.split("*")
    if k + len(factors) > end:
        return None
    run = [str(shape[k + t]) for t in range(len(factors))]
    return len(factors) if sorted(run) == sorted(factors) else None  # "64*B" spans [B, 64] too


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


def _batch_sizes(ctx) -> set[int]:
    """Static sizes (> 1) of axis 0 of the graph's inputs: the batch sizes a model was exported at."""
    g = ctx.graph
    sizes = set()
    for vi in g.model.graph.input:
        if g.is_initializer(vi.name) or not g.rank(vi.name):
            continue
        size = g.size(vi.name, 0)
        if isinstance(size, int) and size > 1:
            sizes.add(size)
    return sizes


def _leads_with_batch(ctx, name: str, axes: list[int]) -> bool:
    """Is the first of `axes` (merged or split by a reshape) the batch axis of an activation?

    Axis 0 of a tensor computed from the inputs, with the inputs' static batch size: it never carries
    channels, so the axis after it does (``[B, heads, S, D] -> [B*heads, S, D]`` keeps heads).
    """
    if len(axes) < 2 or axes[0] != 0 or ctx.const(name) is not None:
        return False
    return ctx.size(name, 0) in _batch_sizes(ctx)


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
            stacked = _is_stacked(ctx, x, big_in[0]) or _leads_with_batch(ctx, x, big_in)
            c = 1 if stacked else _carrier(sizes)  # [dirs, H] -> dirs*H, [B, heads] -> B*heads: H, heads carry
            n = out_shape[b]
            ctx.link(x, big_in[c], y, b, _carrier_index(n, sizes, c), np.arange(n))
            for a in big_in:
                if a != big_in[c]:
                    ctx.freeze(x, a, "merged into a larger axis by reshape")
            continue
        if len(big_in) == 1 and all(rewritable(b) for b in big_out):  # split: one output axis owns it
            a = big_in[0]
            sizes = [out_shape[b] for b in big_out]
            if _leads_with_batch(ctx, y, big_out):
                c = 1
            else:
                c = _carrier(sizes, stacked=_is_unstacked(ctx, y, big_out[0]))
            n = in_shape[a]
            ctx.link(x, a, y, big_out[c], np.arange(n), _carrier_index(n, sizes, c))
            for b in big_out:
                if b != big_out[c]:
                    ctx.freeze(y, b, "split off a larger axis by reshape")
            continue
        if _couple_regroup(ctx, x, y, ii, big_in, big_out, targets):
            continue
        for a in ii:
            ctx.freeze(x, a, "reshape regroups axes")
        for b in jj:
            ctx.freeze(y, b, "reshape regroups axes")


def _couple_regroup(ctx, x: str, y: str, ii: list[int], big_in: list[int], big_out: list[int], targets) -> bool:
    """Couple a reshape that regroups its major axis: ``[C, H, W] -> [G, C/G*H*W]`` (torch's GroupNorm at opset
    <= 17: Reshape, InstanceNormalization, Reshape back) or back, ``[G, C/G*H*W] -> [C, H, W]``.

    When the larger of the two major sizes is k times the smaller (and the segment's products agree), flat
    position ``c*R + r`` of the major axis with k times more positions lands at ``c // k`` of the other: k
    channels of one side are one position of the other (a GroupNorm group is one channel), and removing
    whole units keeps every other element where it was. The minor axes keep their sizes (frozen). Returns
    False (the caller freezes) when the sizes do not divide or a target could not follow.
    """
    if not big_in or not big_out or len(big_in) + len(big_out) < 3:
        return False
    in_shape, out_shape = ctx.shape(x), ctx.shape(y)
    a0, b0 = big_in[0], big_out[0]
    n_in, n_out = in_shape[a0], out_shape[b0]
    small, large = min(n_in, n_out), max(n_in, n_out)
    if large % small:
        return False
    if targets is not None:  # Flatten has none: its output sizes follow the input
        if targets is False or b0 >= len(targets) or len(targets) != len(out_shape):
            return False
        value, loc = targets[b0]
        if not ((loc is not None and value != 0) or value == -1):
            return False  # the major target is rewritten in place or inferred; a copy (0) could not follow
        for b in big_out[1:]:  # minors keep their sizes: a literal, -1, or a copy (0) of a minor input axis
            value, loc = targets[b]
            literal = loc is not None and value not in (0, -1)
            if not (literal or value == -1 or (value == 0 and b in ii and b != a0)):
                return False
    k = large // small
    if n_in >= n_out:
        ctx.link(x, a0, y, b0, np.arange(n_in), np.arange(n_in) // k)
    else:
        ctx.link(x, a0, y, b0, np.arange(n_out) // k, np.arange(n_out))
    for a in big_in[1:]:
        ctx.freeze(x, a, "regrouped with a larger axis by reshape")
    for b in big_out[1:]:
        ctx.freeze(y, b, "regrouped with a larger axis by reshape")
    return True


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
