"""Gradient rule of the fused ``Attention`` operator (opset 23): ``Y = softmax(Q K^T * scale + bias) V`` per head.

A BatchNorm network with attention blocks exported at opset 23 (torch.onnx writes ``scaled_dot_product_attention``
as one ``Attention`` node) has it on the path ``--calib synthetic`` differentiates. The rule recomputes the
probabilities P from Q and K (nothing of the forward pass but its inputs is kept) and returns

    dV = P^T dY,   dS = P * (dP - sum_j dP * P),  dP = dY V^T,   dQ = dS K * scale,   dK = dS^T Q * scale

with the key/value heads repeated for the query heads that share them (grouped-query attention) and their
gradients summed back over each group; 3-D operands ``[B, T, heads * size]`` are viewed as 4-D heads and back.
The bias is the constant mask (additive, or boolean as 0 / -inf) plus the causal mask (query i sees keys j <= i,
as the standard's function body). Refused in one line: caches, a computed mask, softcap, a qk output or
cache output that the loss reads, a constant mask that masks a whole row.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.errors import UnsupportedModelError
from onnxprune.gradients import Context, Emitter, rule
from onnxprune.graph import attrs


def _refuse(node: onnx.NodeProto, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"synthetic calibration: Attention node {node.name!r}: {why}")


def scores_bias(mask: np.ndarray | None, causal: bool, t: int, s: int) -> np.ndarray | None:
    """The constant additive bias of an Attention node's [t, s] scores: the mask (additive, or boolean as 0 /
    -inf) plus the causal mask (query i sees keys j <= i, as the standard's body); None without either.

    Raises:
        ValueError: a mask that does not broadcast to the scores, or one that masks a whole row (the standard
            gives such a row zeros, a plain softmax NaNs).
    """
    bias = None
    if mask is not None:
        bias = np.where(mask, 0.0, -np.inf) if mask.dtype == np.bool_ else mask.astype(np.float64)
    if causal:
        rule = np.where(np.arange(s)[None, :] <= np.arange(t)[:, None], 0.0, -np.inf)
        bias = rule if bias is None else bias + rule
    if bias is not None and np.isneginf(np.broadcast_to(bias, (*bias.shape[:-2], t, s))).all(axis=-1).any():
        raise ValueError("a mask that masks a whole row")
    return None if bias is None else bias.astype(np.float32)


def _bias(cx: Context, node: onnx.NodeProto, t: int, s: int) -> np.ndarray | None:
    mask = None
    if len(node.input) > 3 and node.input[3]:
        if node.input[3] in cx.active:
            raise _refuse(node, "a computed attention mask")
        mask = cx.need(node, node.input[3])
    try:
        return scores_bias(mask, bool(attrs(node).get("is_causal", 0)), t, s)
    except ValueError as exc:
        raise _refuse(node, str(exc)) from None


@rule("Attention")
def _attention(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    a = attrs(node)
    if any(n for n in node.input[4:]):
        raise _refuse(node, "key/value caches")
    if any(g is not None for g in gys[1:]):
        raise _refuse(node, "its cache or score outputs are differentiated")
    if a.get("softcap", 0.0):
        raise _refuse(node, "softcap")
    q, k, v = node.input[:3]
    shapes = [cx.shape(n) for n in (q, k, v)]
    rank = len(shapes[0])
    if rank == 3:
        hq, hkv = int(a["q_num_heads"]), int(a["kv_num_heads"])
        (b, t, wq), (_, s, _), (_, _, wv) = shapes
        d, dv = wq // hq, wv // hkv

        def heads(x: str, n: int, size: int, length: int) -> str:
            return em.op("Transpose", [em.reshape(x, [b, length, n, size])], perm=[0, 2, 1, 3])

        q4, k4, v4 = heads(q, hq, d, t), heads(k, hkv, d, s), heads(v, hkv, dv, s)
        gy = heads(gys[0], hq, dv, t)
    else:
        (b, hq, t, d), (_, hkv, s, _), (_, _, _, dv) = shapes
        q4, k4, v4, gy = q, k, v, gys[0]
    group = hq // hkv
    scale = float(a.get("scale") or 1.0 / np.sqrt(d))

    def repeat(x: str, size: int) -> str:  # [b, hkv, s, size] -> [b, hq, s, size]
        if group == 1:
            return x
        wide = em.op("Expand", [em.reshape(x, [b, hkv, 1, s, size]), em.const([b, hkv, group, s, size], "shape", np.int64)])
        return em.reshape(wide, [b, hq, s, size])

    def fold(g: str, size: int) -> str:  # the gradient of `repeat`
        if group == 1:
            return g
        return em.reduce("ReduceSum", em.reshape(g, [b, hkv, group, s, size]), [2], keepdims=False)

    kr, vr = repeat(k4, d), repeat(v4, dv)
    scores = em.scale(em.op("MatMul", [q4, em.op("Transpose", [kr], perm=[0, 1, 3, 2])]), scale)
    bias = _bias(cx, node, t, s)
    if bias is not None:
        scores = em.op("Add", [scores, em.const(bias, "bias")])
    p = em.op("Softmax", [scores], axis=-1)
    dp = em.op("MatMul", [gy, em.op("Transpose", [vr], perm=[0, 1, 3, 2])])
    ds = em.mul(p, em.op("Sub", [dp, em.reduce("ReduceSum", em.mul(dp, p), [3], keepdims=True)]))
    grads = {
        0: em.scale(em.op("MatMul", [ds, kr]), scale),
        1: fold(em.scale(em.op("MatMul", [em.op("Transpose", [ds], perm=[0, 1, 3, 2]), q4]), scale), d),
        2: fold(em.op("MatMul", [em.op("Transpose", [p], perm=[0, 1, 3, 2]), gy]), dv),
    }
    if rank == 3:
        sizes = {0: (t, hq * d), 1: (s, hkv * d), 2: (s, hkv * dv)}
        grads = {i: em.reshape(em.op("Transpose", [g], perm=[0, 2, 1, 3]), [b, *sizes[i]]) for i, g in grads.items()}
    return {i: g for i, g in grads.items() if node.input[i] in cx.active}
