"""Conv and ConvTranspose: regular, depthwise (with multiplier) and grouped.

A regular conv couples its input channels with the weight's input axis and its output channels with the
weight's output axis and the bias. A depthwise conv ties input channel c to output channels
``c*m .. c*m+m-1``. A grouped conv can only lose whole conv groups, so all input and output channels of
one conv group are linked into one channel.
"""

from __future__ import annotations

import numpy as np

from onnxprune.graph import attrs, set_attr
from onnxprune.rules.base import ChannelRule, register
from onnxprune.rules.protocols import RuleBarrier


def _sizes(node, ctx, transpose: bool):
    x, w = node.input[0], node.input[1]
    c_in = ctx.size(x, 1)
    wshape = ctx.shape(w)
    if not isinstance(c_in, int) or wshape is None or not all(isinstance(d, int) for d in wshape[:2]):
        raise RuleBarrier("channel sizes unknown")
    if len(wshape) < 2 or len(wshape) != ctx.rank(x):
        raise RuleBarrier(f"weight rank {len(wshape)} does not match input rank {ctx.rank(x)}")
    group = attrs(node).get("group", 1)
    if not isinstance(group, int) or group < 1:
        raise RuleBarrier(f"invalid group {group!r}")
    if transpose:
        c_out = wshape[1] * group
        cin_g, cout_g = wshape[0] // group, wshape[1]
    else:
        c_out = wshape[0]
        cin_g, cout_g = wshape[1], wshape[0] // group
    return c_in, c_out, group, cin_g, cout_g


def _couple(node, ctx, transpose: bool) -> None:
    x, w, y = node.input[0], node.input[1], node.output[0]
    b = node.input[2] if len(node.input) > 2 else ""
    c_in, c_out, group, cin_g, cout_g = _sizes(node, ctx, transpose)
    w_in, w_out = (0, 1) if transpose else (1, 0)
    ctx.set_role(w, "weight")
    ctx.set_role(b, "bias")
    ctx.link(x, 0, y, 0)
    if b:
        ctx.link(b, 0, y, 1)
    if group == 1:
        ctx.link(x, 1, w, w_in)
        ctx.link(w, w_out, y, 1)
        return
    if transpose:
        # weight [C_in, C_out/g, ...]: axis 0 follows input channels, axis 1 is within a group.
        ctx.link(w, 0, x, 1)
    else:
        ctx.link(w, 0, y, 1)
    if cin_g == 1 and group == c_in:
        # Depthwise (multiplier m): output channels c*m..c*m+m-1 come from input channel c.
        m = c_out // c_in
        ctx.link(x, 1, y, 1, np.repeat(np.arange(c_in), m), np.arange(c_out))
        ctx.freeze(w, w_out if transpose else w_in, "depthwise multiplier axis")
        return
    # Grouped: one channel per conv group (all its inputs and outputs together).
    ctx.link(y, 1, y, 1, np.arange(c_out), (np.arange(c_out) // cout_g) * cout_g)
    ctx.link(x, 1, y, 1, np.arange(c_in), (np.arange(c_in) // cin_g) * cout_g)
    ctx.freeze(w, 1, "channels inside a conv group")  # the within-group axis, for both layouts


def _rewrite(node, ctx, transpose: bool) -> None:
    group = attrs(node).get("group", 1)
    if group == 1:
        return
    x = node.input[0]
    old_in = ctx.old_size(x, 1)
    new_in = ctx.new_size(x, 1)
    if new_in != old_in:
        set_attr(node, "group", group * new_in // old_in)


@register("Conv")
class Conv(ChannelRule):
    zero_preserving = ("Conv",)

    def linear_axes(self, node, graph):
        return (1, 0) if len(node.input) >= 2 else None

    def couple(self, node, ctx):
        _couple(node, ctx, transpose=False)

    def rewrite(self, node, ctx):
        _rewrite(node, ctx, transpose=False)


@register("ConvTranspose")
class ConvTranspose(ChannelRule):
    zero_preserving = ("ConvTranspose",)

    def couple(self, node, ctx):
        _couple(node, ctx, transpose=True)

    def rewrite(self, node, ctx):
        _rewrite(node, ctx, transpose=True)
