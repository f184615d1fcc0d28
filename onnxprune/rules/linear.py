"""Gemm, MatMul and Einsum: the contraction axis couples the operands, the free axes map to the output.

Removing a contracted channel from both operands drops only terms that the masked model multiplies by
zero, so a MatMul between two activations (attention scores) is exact as well.
"""

from __future__ import annotations

from onnxprune.graph import attrs
from onnxprune.rules.base import ChannelRule, register
from onnxprune.rules.protocols import RuleBarrier


@register("Gemm")
class Gemm(ChannelRule):
    zero_preserving = ("Gemm",)

    def linear_axes(self, node, graph):
        if len(node.input) < 2:
            return None
        return (1, 0) if attrs(node).get("transB", 0) else (0, 1)

    def couple(self, node, ctx):
        a, b, y = node.input[0], node.input[1], node.output[0]
        at = attrs(node)
        a_m, a_k = (1, 0) if at.get("transA", 0) else (0, 1)
        b_k, b_n = (1, 0) if at.get("transB", 0) else (0, 1)
        ctx.link(a, a_k, b, b_k)
        ctx.link(a, a_m, y, 0)
        ctx.link(b, b_n, y, 1)
        ctx.set_role(b, "weight")
        ctx.set_role(a, "weight")
        if len(node.input) > 2 and node.input[2]:
            ctx.link_all(node.input[2], y)
            ctx.set_role(node.input[2], "bias")


@register("MatMul")
class MatMul(ChannelRule):
    zero_preserving = ("MatMul",)

    def linear_axes(self, node, graph):
        """The weight's last two axes (in, out); a weight of unknown rank counts as a matrix."""
        if len(node.input) < 2:
            return None
        rank = graph.rank(node.input[1]) or 2
        return rank - 2, rank - 1

    def couple(self, node, ctx):
        a, b, y = node.input[0], node.input[1], node.output[0]
        ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
        if ra is None or rb is None or ry is None:
            raise RuleBarrier("operand ranks unknown")
        ctx.set_role(a, "weight")
        ctx.set_role(b, "weight")
        b_k = rb - 2 if rb >= 2 else 0
        ctx.link(a, ra - 1, b, b_k)
        if ra >= 2 and rb >= 2:
            ctx.link(a, ra - 2, y, ry - 2)
            ctx.link(b, rb - 1, y, ry - 1)
            batch_a, batch_b, batch_y = ra - 2, rb - 2, ry - 2
        elif ra == 1 and rb >= 2:
            ctx.link(b, rb - 1, y, ry - 1)
            batch_a, batch_b, batch_y = 0, rb - 2, ry - 1
        elif rb == 1 and ra >= 2:
            ctx.link(a, ra - 2, y, ry - 1)
            batch_a, batch_b, batch_y = ra - 2, 0, ry - 1
        else:
            return
        # Batch axes broadcast from the right.
        for k in range(1, batch_y + 1):
            if batch_a - k >= 0:
                ctx.link(a, batch_a - k, y, batch_y - k)
            if batch_b - k >= 0:
                ctx.link(b, batch_b - k, y, batch_y - k)


def einsum_terms(equation: str, operands: int) -> tuple[list[str], str]:
    """The letters of each operand's term and of the output (implicit output: the letters used once, sorted).

    Raises:
        RuleBarrier: an ellipsis, a letter repeated within one term (a diagonal), or a term count that is not
            the operand count.
    """
    eq = equation.replace(" ", "")
    if "..." in eq:
        raise RuleBarrier("Einsum with an ellipsis (broadcast axes)")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != operands:
        raise RuleBarrier(f"Einsum equation {equation!r} has {len(terms)} terms for {operands} operands")
    if not arrow:
        counts: dict[str, int] = {}
        for letter in "".join(terms):
            counts[letter] = counts.get(letter, 0) + 1
        out = "".join(sorted(letter for letter, k in counts.items() if k == 1))
    if any(len(set(term)) != len(term) for term in [*terms, out]):
        raise RuleBarrier("Einsum with a repeated index within one term (a diagonal)")
    return terms, out


@register("Einsum", since=12)
class Einsum(ChannelRule):
    """Every axis labelled by one letter is one index: its channels are the same in every operand and in the
    output. A letter summed over (absent from the output) is a contraction, like MatMul's inner axis: removing
    its channels from every operand drops only terms the masked model multiplies by zero; a letter kept is a
    free or batch axis, each output channel computed from the operands' same channel. (MaxViT's attention,
    ``BGHID,BGHJD->BGHIJ``, and TensorFlow's dense layers are Einsums.)"""

    zero_preserving = ("Einsum",)

    def couple(self, node, ctx):
        equation = attrs(node).get("equation", b"")
        terms, out = einsum_terms(equation.decode() if isinstance(equation, bytes) else str(equation), len(node.input))
        places: dict[str, list[tuple[str, int]]] = {}
        for name, term in zip([*node.input, node.output[0]], [*terms, out]):
            if ctx.rank(name) is None:
                raise RuleBarrier("operand ranks unknown")
            if ctx.rank(name) != len(term):
                raise RuleBarrier(f"Einsum term {term!r} does not match the rank of {name!r}")
            for axis, letter in enumerate(term):
                places.setdefault(letter, []).append((name, axis))
        for name in node.input:
            ctx.set_role(name, "weight")
        for where in places.values():  # every pair: a size-1 (broadcast) place links to none of them
            for i, (a, axis_a) in enumerate(where):
                for b, axis_b in where[i + 1:]:
                    ctx.link(a, axis_a, b, axis_b)
