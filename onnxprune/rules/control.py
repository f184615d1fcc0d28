"""Control flow: an ``If`` passes channels from its branches' outputs to its own, a ``Loop`` through its body.

Output k of an ``If`` is output k of whichever branch runs, so both branches' output k and the ``If``
output k are one channel per position: a channel removed from one is removed from all three. The analysis
couples the branches' nodes themselves (`onnxprune.subgraphs`); this rule only joins the scopes.
A ``Loop`` (`LoopRule`) joins the values it carries across iterations and its scan outputs with the body's.
``Scan`` has no rule: its body stays a barrier.
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
