"""onnxruntime's contrib operators (domain ``com.microsoft``) that its transformer optimizer writes.

A BERT run through ``onnxruntime.transformers.optimizer`` (as many published "optimized" models are) holds
``SkipLayerNormalization`` (residual add + bias + LayerNorm in one node) and ``Gelu`` / ``FastGelu`` / ``BiasGelu``
(an MLP's activation, with the first projection's bias folded in); LLaMA-style models
``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm). Without rules each was a barrier, and every MLP channel
and every head next to them was frozen. Measured on the zoo's BERT-tiny optimised at opt_level 1: 6 barriers and 0
groups -> no barrier, the 2 head groups and 2 MLP groups of the plain export.

* The Gelu family is element-wise; a bias input runs along the last axis.
* The skip LayerNorms add their inputs (and bias) and normalise the last axis: every axis passes, the last one
  is *inexact* (its statistics change when channels go), like an uncorrected LayerNorm; gamma / beta / bias
  follow it. The optional mean / inverse-std outputs keep the leading axes; the sum output is the added input.

(``SimplifiedLayerNormalization``, the plain RMSNorm, is registered by onnxruntime in the ONNX domain, where the ONNX
checker refuses it: such a model does not load.)
"""

from __future__ import annotations

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
