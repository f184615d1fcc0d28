"""Attention (opset 23) and RotaryEmbedding (opset 23): the fused operators of exports at opset >= 23.

torch.onnx's exporter writes ``F.scaled_dot_product_attention`` as one ``Attention`` node from opset 23 on
(a transformers Llama at ``opset_version=23``: one per layer, 4-D inputs, GQA already expanded), and
``RMSNormalization`` for the norms; without a rule every head of such a model was frozen behind a barrier.

``Attention(Q, K, V, mask?, past_key?, past_value?)`` computes, per head, ``softmax(Q K^T * scale + mask) V``.
Inputs are 4-D ``[B, heads, T, head_size]`` or 3-D ``[B, T, heads * head_size]`` (``q_num_heads`` and
``kv_num_heads`` attributes say how the last axis splits). What may go:

* a **head**: query head i, its output head, and the key / value head ``i // (Hq / Hkv)`` it reads (grouped-query
  attention: a KV head goes with all the query heads that share it, as one channel). In 3-D, all positions of a
  head are one channel and the rewrite sets ``q_num_heads`` / ``kv_num_heads`` to the new counts;
* 4-D only: a **query/key feature** (axis 3 of Q and K, contracted as in MatMul: removing it from both drops
  terms the masked model multiplies by zero) - exact because the rewrite writes the original
  ``1 / sqrt(head_size)`` into ``scale`` when the attribute was left to its default; and a **value feature**
  (axis 3 of V and of the output: each output feature is a mix of that value feature only).

Key positions (axis 2 of K and V) are never channels: a zeroed key still takes part in the softmax. The past /
present key and value caches (always 4-D ``[B, Hkv, S, head_size]``) follow the KV heads and features; the mask
and the ``qk_matmul_output`` follow the query heads where they have a head axis.

``RotaryEmbedding(X, cos, sin, position_ids?)`` rotates pairs of features within a head: heads pass through,
features within a head cannot be removed (frozen); in 3-D (``num_heads``) a head is one channel, as above.
"""

from __future__ import annotations

import math

import numpy as np

from onnxprune.graph import attrs, set_attr
from onnxprune.rules.base import ChannelRule, register
from onnxprune.rules.protocols import RuleBarrier


def _static(ctx, name: str, axis: int, what: str) -> int:
    size = ctx.size(name, axis)
    if not isinstance(size, int):
        raise RuleBarrier(f"{what} unknown")
    return size


def _input(node, k: int) -> str:
    return node.input[k] if len(node.input) > k else ""


def _output(node, k: int) -> str:
    return node.output[k] if len(node.output) > k else ""


def _heads_3d(node, ctx, name: str, attribute: str) -> tuple[int, int]:
    """(heads, head size) of a 3-D ``[B, T, heads * head_size]`` operand, from the node's attribute."""
    heads = attrs(node).get(attribute, 0)
    width = _static(ctx, name, 2, f"{attribute} * head size of {name!r}")
    if not isinstance(heads, int) or heads < 1 or width % heads:
        raise RuleBarrier(f"3-D attention input {name!r} of width {width} does not split into {attribute}={heads!r}")
    return heads, width // heads


def _head_blocks(ctx, a: str, axis_a: int, size_a: int, b: str, axis_b: int, size_b: int, head_of_b=None) -> None:
    """Link the heads of two head-major axes (`size_a` / `size_b` positions per head): every position of a's head
    h with the first position of b's head ``head_of_b(h)`` and every position of b's head with the first of a's
    head it serves, so each head (with all its positions) is one channel. `head_of_b` maps a's heads to b's
    (grouped-query attention); identity when None."""
    n_a = ctx.size(a, axis_a) // size_a
    heads_a = np.arange(n_a)
    heads_b = heads_a if head_of_b is None else head_of_b(heads_a)
    pos_a = np.arange(n_a * size_a)
    ctx.link(a, axis_a, b, axis_b, pos_a, heads_b[pos_a // size_a] * size_b)
    n_b = ctx.size(b, axis_b) // size_b
    first_a = np.full(n_b, -1)
    first_a[heads_b[::-1]] = heads_a[::-1] * size_a  # b's head -> the first of a's heads it serves
    if (first_a < 0).any():
        raise RuleBarrier(f"heads of {b!r} that no head of {a!r} reads")
    pos_b = np.arange(n_b * size_b)
    ctx.link(b, axis_b, a, axis_a, pos_b, first_a[pos_b // size_b])


@register("Attention", since=23)
class Attention(ChannelRule):
    def couple(self, node, ctx):
        q, k, v, y = node.input[0], node.input[1], node.input[2], node.output[0]
        if any(ctx.rank(t) is None for t in (q, k, v, y)):
            raise RuleBarrier("operand ranks unknown")
        rank = ctx.rank(q)
        if rank not in (3, 4) or ctx.rank(k) != rank or ctx.rank(v) != rank or ctx.rank(y) != rank:
            raise RuleBarrier(f"attention operands of ranks {[ctx.rank(t) for t in (q, k, v, y)]} (3-D or 4-D expected)")
        for t in (k, v, y):
            ctx.link(q, 0, t, 0)  # batch
        ctx.link(q, rank - 2, y, rank - 2)  # query positions
        mask, past_k, past_v = _input(node, 3), _input(node, 4), _input(node, 5)
        present_k, present_v, scores = _output(node, 1), _output(node, 2), _output(node, 3)
        if rank == 4:
            self._couple_4d(node, ctx, mask, past_k, past_v, present_k, present_v, scores)
        else:
            self._couple_3d(node, ctx, mask, past_k, past_v, present_k, present_v, scores)

    @staticmethod
    def _group_of(hq: int, hkv: int):
        if hkv < 1 or hq % hkv:
            raise RuleBarrier(f"{hq} query heads do not share {hkv} key/value heads evenly")
        group = hq // hkv
        return lambda heads: heads // group

    def _couple_4d(self, node, ctx, mask, past_k, past_v, present_k, present_v, scores):
        q, k, v, y = node.input[0], node.input[1], node.input[2], node.output[0]
        ctx.link(q, 1, y, 1)
        ctx.link(k, 1, v, 1)
        hq, hkv = ctx.size(q, 1), ctx.size(k, 1)
        if hq == hkv:
            ctx.link(q, 1, k, 1)
        elif isinstance(hq, int) and isinstance(hkv, int):
            _head_blocks(ctx, q, 1, 1, k, 1, 1, self._group_of(hq, hkv))
        else:
            ctx.freeze(q, 1, "query and key/value head counts unknown")
            ctx.freeze(k, 1, "query and key/value head counts unknown")
        ctx.link(q, 3, k, 3)  # query/key features: contracted (the rewrite pins the scale)
        ctx.link(v, 3, y, 3)  # value features: passed through
        for cache, source in ((past_k, k), (present_k, k), (past_v, v), (present_v, v)):
            if cache:
                ctx.link(cache, 0, source, 0)
                ctx.link(cache, 1, source, 1)
                ctx.link(cache, 3, source, 3)
        self._couple_head_axis(ctx, q, mask, scores, lambda t, axis: ctx.link(t, axis, q, 1))

    def _couple_3d(self, node, ctx, mask, past_k, past_v, present_k, present_v, scores):
        q, k, v, y = node.input[0], node.input[1], node.input[2], node.output[0]
        hq, dq = _heads_3d(node, ctx, q, "q_num_heads")
        hkv, dk = _heads_3d(node, ctx, k, "kv_num_heads")
        _, dv = _heads_3d(node, ctx, v, "kv_num_heads")
        if dq != dk:
            raise RuleBarrier(f"query head size {dq} differs from key head size {dk}")
        if _static(ctx, y, 2, "output width") != hq * dv:
            raise RuleBarrier("output width is not q_num_heads * value head size")
        _head_blocks(ctx, q, 2, dq, y, 2, dv)
        _head_blocks(ctx, k, 2, dk, v, 2, dv)
        _head_blocks(ctx, q, 2, dq, k, 2, dk, self._group_of(hq, hkv))
        for cache, source, size in ((past_k, k, dk), (present_k, k, dk), (past_v, v, dv), (present_v, v, dv)):
            if cache:
                ctx.link(cache, 0, source, 0)
                n = _static(ctx, cache, 1, f"heads of {cache!r}")
                ctx.link(cache, 1, source, 2, np.arange(n), np.arange(n) * size)
        self._couple_head_axis(
            ctx, q, mask, scores, lambda t, axis: ctx.link(t, axis, q, 2, np.arange(hq), np.arange(hq) * dq)
        )

    @staticmethod
    def _couple_head_axis(ctx, q, mask, scores, link_heads) -> None:
        """The mask (broadcast to ``[B, Hq, T, S]``) and the scores output follow the query heads and positions."""
        rank_q = ctx.rank(q)
        if scores:
            if ctx.rank(scores) != 4:
                raise RuleBarrier("qk_matmul_output is not 4-D")
            ctx.link(scores, 0, q, 0)
            link_heads(scores, 1)
            ctx.link(scores, 2, q, rank_q - 2)
        if mask:
            rank = ctx.rank(mask)
            if rank is None:
                raise RuleBarrier("attention mask rank unknown")
            if rank >= 3 and ctx.size(mask, rank - 3) != 1:
                link_heads(mask, rank - 3)
            if rank >= 2:
                ctx.link(mask, rank - 2, q, rank_q - 2)

    def rewrite(self, node, ctx):
        q, k = node.input[0], node.input[1]
        if ctx.rank(q) == 3:
            for name, attribute in ((q, "q_num_heads"), (k, "kv_num_heads")):
                heads = attrs(node)[attribute]
                old, new = ctx.old_size(name, 2), ctx.new_size(name, 2)
                if new != old:
                    set_attr(node, attribute, heads * new // old)
            return
        old, new = ctx.old_size(q, 3), ctx.new_size(q, 3)
        if new != old and not attrs(node).get("scale"):
            set_attr(node, "scale", 1.0 / math.sqrt(old))
        for name, attribute in ((q, "q_num_heads"), (k, "kv_num_heads")):
            if attrs(node).get(attribute) and ctx.new_size(name, 1) != ctx.old_size(name, 1):
                set_attr(node, attribute, ctx.new_size(name, 1))


@register("RotaryEmbedding", since=23)
class RotaryEmbedding(ChannelRule):
    same_shape = ("RotaryEmbedding",)

    def couple(self, node, ctx):
        x, y = node.input[0], node.output[0]
        rank = ctx.rank(x)
        if rank not in (3, 4) or ctx.rank(y) != rank:
            raise RuleBarrier(f"rotary embedding of a rank-{rank} input (3-D or 4-D expected)")
        for axis in range(rank - 1):
            ctx.link(x, axis, y, axis)  # batch, heads (4-D) and positions
        if rank == 3:
            _, size = _heads_3d(node, ctx, x, "num_heads")
            ctx.link(x, 2, y, 2)
            _head_blocks(ctx, x, 2, size, y, 2, size)
        else:
            ctx.freeze(x, 3, "features within a head are rotated in pairs")
            ctx.freeze(y, 3, "features within a head are rotated in pairs")

    def rewrite(self, node, ctx):
        x = node.input[0]
        if ctx.rank(x) == 3 and ctx.new_size(x, 2) != ctx.old_size(x, 2):
            set_attr(node, "num_heads", attrs(node)["num_heads"] * ctx.new_size(x, 2) // ctx.old_size(x, 2))
