"""onnxruntime's contrib operators (domain ``com.microsoft``) that its transformer optimizer writes.

A BERT run through ``onnxruntime.transformers.optimizer`` (as many published "optimized" models are) holds
``SkipLayerNormalization`` (residual add + bias + LayerNorm in one node) and ``Gelu`` / ``FastGelu`` / ``BiasGelu``
(an MLP's activation, with the first projection's bias folded in); LLaMA-style models
``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm). Without rules each was a barrier, and every MLP channel
and every head next to them was frozen. Measured on the zoo's BERT-tiny optimised at opt_level 1: 6 barriers and 0
groups -> no barrier, the 2 head groups and 2 MLP groups of the plain export.

* ``Attention`` (com.microsoft: one packed ``[hidden_in, q + k + v]`` weight and bias, ``num_heads``): a head is its
  query, key and value columns with its output features, one channel; ``num_heads`` / ``qkv_hidden_sizes`` are
  rewritten. The input features are contracted with the weight's rows, as in MatMul. Caches, rotary and a
  relative-position bias with a head axis are barriers.
* The Gelu family is element-wise; a bias input runs along the last axis.
* The skip LayerNorms add their inputs (and bias) and normalise the last axis: every axis passes, the last one
  is *inexact* (its statistics change when channels go), like an uncorrected LayerNorm; gamma / beta / bias
  follow it. The optional mean / inverse-std outputs keep the leading axes; the sum output is the added input.

(``SimplifiedLayerNormalization``, the plain RMSNorm, is registered by onnxruntime in the ONNX domain, where the ONNX
checker refuses it: such a model does not load.)
"""

from __future__ import annotations

import numpy as np

from onnxprune.graph import attrs, set_attr
from onnxprune.rules.base import ChannelRule, register
from onnxprune.rules.protocols import RuleBarrier

MS = "com.microsoft"


@register("Gelu", "QuickGelu", "FastGelu", "BiasGelu", domain=MS)
class GeluFamily(ChannelRule):
    zero_preserving = ("Gelu", "QuickGelu")
    same_shape = ("Gelu", "QuickGelu", "FastGelu", "BiasGelu")

    def couple(self, node, ctx):
        x, y = node.input[0], node.output[0]
        ctx.link_all(x, y)
        bias = node.input[1] if len(node.input) > 1 else ""
        if bias:
            rank = ctx.rank(x)
            if rank is None:
                raise RuleBarrier("rank unknown")
            ctx.link(bias, 0, x, rank - 1)
            ctx.set_role(bias, "bias")


@register("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain=MS)
class SkipNorm(ChannelRule):
    same_shape = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")

    def couple(self, node, ctx):
        x, skip, y = node.input[0], node.input[1], node.output[0]
        rank = ctx.rank(x)
        if rank is None:
            raise RuleBarrier("rank unknown")
        ctx.link_all(skip, x)
        ctx.link_all(x, y)
        last = rank - 1
        ctx.mark_inexact(x, last, f"{node.op_type} normalises over this axis")
        params = node.input[2:]
        roles = ("scale", "bias", "bias") if node.op_type == "SkipLayerNormalization" else ("scale", "bias")
        for name, role in zip(params, roles):
            if name:
                ctx.link(name, 0, x, last)
                ctx.set_role(name, role)
        for k, extra in enumerate(node.output[1:4], start=1):  # mean, inverse std, input + skip (+ bias)
            if not extra:
                continue
            if k == 3:
                ctx.link_all(x, extra)  # the residual stream, passed on
            else:
                for axis in range(last):  # the normalised axis reduced
                    ctx.link(x, axis, extra, axis)


@register("Attention", domain=MS)
class PackedAttention(ChannelRule):
    def couple(self, node, ctx):
        a = attrs(node)
        x, w, y = node.input[0], node.input[1], node.output[0]
        if any(node.input[4:]) or any(node.output[1:]) or a.get("do_rotary", 0):
            raise RuleBarrier("contrib Attention with caches, rotary or a position bias")
        heads = a.get("num_heads")
        shape = ctx.shape(w)
        if not isinstance(heads, int) or heads < 1 or shape is None or not all(isinstance(d, int) for d in shape):
            raise RuleBarrier("contrib Attention weight or num_heads unknown")
        sizes = list(a.get("qkv_hidden_sizes") or [shape[1] // 3] * 3)
        if len(sizes) != 3 or sum(sizes) != shape[1] or any(s % heads for s in sizes):
            raise RuleBarrier(f"contrib Attention widths {sizes} do not split into {heads} heads")
        ctx.link(x, 2, w, 0)  # input features: contracted
        ctx.link(x, 0, y, 0)
        ctx.link(x, 1, y, 1)
        ctx.set_role(w, "weight")
        starts = np.cumsum([0, *sizes[:2]])
        columns = np.arange(shape[1])
        part = np.searchsorted(starts, columns, side="right") - 1
        head = (columns - starts[part]) // (np.array(sizes)[part] // heads)
        first = {h: int(columns[(head == h) & (part == 0)][0]) for h in range(heads)}  # the head's first q column
        ctx.link(w, 1, w, 1, columns, [first[h] for h in head])
        dv = sizes[2] // heads
        out = np.arange(heads * dv)
        ctx.link(y, 2, w, 1, out, [first[h] for h in out // dv])
        if len(node.input) > 2 and node.input[2]:
            ctx.link(node.input[2], 0, w, 1)
            ctx.set_role(node.input[2], "bias")

    def output_shape(self, node, shape_of):
        x, w = shape_of(node.input[0]), shape_of(node.input[1])
        if x is None or w is None or len(x) != 3 or len(w) != 2 or not isinstance(w[1], int):
            return None
        sizes = attrs(node).get("qkv_hidden_sizes") or [w[1] // 3] * 3
        return (x[0], x[1], sizes[2])

    def rewrite(self, node, ctx):
        w = node.input[1]
        old, new = ctx.old_size(w, 1), ctx.new_size(w, 1)
        if new == old:
            return
        a = attrs(node)
        heads = a["num_heads"]
        sizes = list(a.get("qkv_hidden_sizes") or [old // 3] * 3)
        kept = heads * new // old  # whole heads go: every part shrinks by the same fraction
        set_attr(node, "num_heads", kept)
        if a.get("qkv_hidden_sizes"):
            set_attr(node, "qkv_hidden_sizes", [s // heads * kept for s in sizes])
