"""Control flow: an ``If`` passes channels from its branches' outputs to its own, a ``Loop``/``Scan`` through its body.

Output k of an ``If`` is output k of whichever branch runs, so both branches' output k and the ``If``
output k are one channel per position: a channel removed from one is removed from all three. The analysis
couples the branches' nodes themselves (`onnxprune.subgraphs`); this rule only joins the scopes.
A ``Loop`` (`LoopRule`) joins the values it carries across iterations and its scan outputs with the body's;
a ``Scan`` (`ScanRule`) its state variables, sliced inputs and stacked outputs.
"""

from __future__ import annotations

import onnx

from onnxprune.rules.base import ChannelRule, register
from onnxprune.rules.protocols import CouplingContext, RuleBarrier


@register("If")
class IfRule(ChannelRule):
    def static_inputs(self, node: onnx.NodeProto) -> set[int]:
        return {0}  # the condition

    def couple(self, node: onnx.NodeProto, ctx: CouplingContext) -> None:
        branches = [a.g for a in node.attribute if a.name in ("then_branch", "else_branch")]
        if len(branches) != 2:
            raise RuleBarrier("If without both branches")
        for branch in branches:
            if len(branch.output) != len(node.output):
                raise RuleBarrier("If branch output count differs from the If's")
            for out, inner in zip(node.output, branch.output):
                if not out:
                    continue
                ra, rb = ctx.rank(out), ctx.rank(inner.name)
                if ra is None or rb is None or ra != rb:
                    raise RuleBarrier("If output rank differs from (or is unknown in) a branch")
                for axis in range(ra):
                    ctx.link(out, axis, inner.name, axis)


@register("Loop")
class LoopRule(ChannelRule):
    """A channel carried across iterations is one channel: the Loop's initial value i, the body's input and
    output for it, and the Loop's final value i. A scan output stacks the body's per-iteration output along a
    new axis 0: body axis a is Loop output axis a + 1."""

    def static_inputs(self, node: onnx.NodeProto) -> set[int]:
        return {0, 1}  # trip count and condition

    def couple(self, node: onnx.NodeProto, ctx: CouplingContext) -> None:
        body = next((a.g for a in node.attribute if a.name == "body"), None)
        carried = len(node.input) - 2
        if body is None or carried < 0 or len(body.input) != carried + 2 or len(body.output) < carried + 1:
            raise RuleBarrier("Loop body inputs/outputs do not match the Loop's")
        if len(node.output) > len(body.output) - 1:
            raise RuleBarrier("Loop has more outputs than its body")
        for i in range(carried):
            names = [node.input[2 + i], body.input[2 + i].name, body.output[1 + i].name]
            if i < len(node.output):
                names.append(node.output[i])
            names = [n for n in names if n]
            ranks = {ctx.rank(n) for n in names}
            if len(ranks) != 1 or None in ranks:
                raise RuleBarrier("Loop-carried value with unknown or changing rank")
            for other in names[1:]:
                for axis in range(ctx.rank(names[0]) or 0):
                    ctx.link(names[0], axis, other, axis)
        for j in range(carried, len(node.output)):
            out, inner = node.output[j], body.output[1 + j].name
            if not out:
                continue
            ra, rb = ctx.rank(out), ctx.rank(inner)
            if ra is None or rb is None or ra != rb + 1:
                raise RuleBarrier("Loop scan output rank is not its body output's rank + 1")
            ctx.freeze(out, 0, "iteration axis of a Loop scan output")
            for axis in range(rb):
                ctx.link(out, axis + 1, inner, axis)


def _axis(value: int, rank: int) -> int:
    if not -rank <= value < rank:
        raise RuleBarrier("Scan axis out of range")
    return value % rank


@register("Scan", since=9)
class ScanRule(ChannelRule):
    """A Scan's state variables are carried like a Loop's; a scan input is sliced along its scan axis (input
    axis a is body axis a, or a - 1 past the scan axis), a scan output stacks along its output axis."""

    def couple(self, node: onnx.NodeProto, ctx: CouplingContext) -> None:
        attrs = {a.name: a for a in node.attribute}
        body = attrs["body"].g if "body" in attrs else None
        n_scan = attrs["num_scan_inputs"].i if "num_scan_inputs" in attrs else -1
        states = len(node.input) - n_scan
        if body is None or n_scan < 1 or states < 0 or len(body.input) != len(node.input):
            raise RuleBarrier("Scan body inputs do not match the Scan's")
        if len(body.output) != len(node.output):
            raise RuleBarrier("Scan body outputs do not match the Scan's")
        in_axes = list(attrs["scan_input_axes"].ints) if "scan_input_axes" in attrs else [0] * n_scan
        out_axes = list(attrs["scan_output_axes"].ints) if "scan_output_axes" in attrs else []
        out_axes += [0] * (len(node.output) - states - len(out_axes))
        for i in range(states):
            names = [n for n in (node.input[i], body.input[i].name, body.output[i].name, node.output[i]) if n]
            ranks = {ctx.rank(n) for n in names}
            if len(ranks) != 1 or None in ranks:
                raise RuleBarrier("Scan state with unknown or changing rank")
            for other in names[1:]:
                for axis in range(ctx.rank(names[0]) or 0):
                    ctx.link(names[0], axis, other, axis)
        sliced = [(node.input[states + j], body.input[states + j].name, in_axes[j]) for j in range(n_scan)]
        stacked = [(node.output[k], body.output[k].name, out_axes[k - states]) for k in range(states, len(node.output))]
        for outer, inner, axis in sliced + stacked:
            if not outer:
                continue
            ro, ri = ctx.rank(outer), ctx.rank(inner)
            if ro is None or ri is None or ro != ri + 1:
                raise RuleBarrier("Scan input/output rank is not its body slice's rank + 1")
            scan_axis = _axis(axis, ro)
            ctx.freeze(outer, scan_axis, "scan axis of a Scan")
            for b in range(ri):
                ctx.link(outer, b if b < scan_axis else b + 1, inner, b)
