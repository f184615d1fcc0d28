"""Control flow: an ``If`` passes channels from its branches' outputs to its own.

Output k of an ``If`` is output k of whichever branch runs, so both branches' output k and the ``If``
output k are one channel per position: a channel removed from one is removed from all three. The analysis
couples the branches' nodes themselves (`onnxprune.subgraphs`); this rule only joins the scopes.
``Loop`` and ``Scan`` have no rule: their bodies stay barriers.
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
