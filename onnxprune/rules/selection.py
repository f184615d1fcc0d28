"""Operators that return positions of their input: NonZero and NonMaxSuppression (a detector's post-processing).

Their outputs are indices, so every axis of the inputs they select from is addressed by value: removing a
position would renumber what comes out. They freeze those axes, with that reason, and are no barriers: their
outputs (index lists sized at run time) carry no channel either, and the layers before them prune as far as
their channels do not reach a selected axis (SSDlite's heads reach its 180 NonZero score filters and its NMS
only as anchors and classes, frozen anyway: a barrier per NonZero listed nothing more than that).
"""

from __future__ import annotations

from onnxprune.rules.base import ChannelRule, register


@register("NonZero", since=9)
class NonZero(ChannelRule):
    def couple(self, node, ctx):
        ctx.freeze_tensor(node.input[0], "positions returned as indices by NonZero")


@register("NonMaxSuppression", since=10)
class NonMaxSuppression(ChannelRule):
    def static_inputs(self, node):
        return {2, 3, 4}  # max boxes per class, IoU and score thresholds

    def couple(self, node, ctx):
        for name in node.input[:2]:  # boxes [B, N, 4], scores [B, classes, N]
            ctx.freeze_tensor(name, "boxes and scores whose positions NonMaxSuppression returns as indices")
