"""Parameter gradients: d loss / d weight and bias of Conv, Gemm, MatMul, bias Add and BatchNormalization, as ONNX.

Start reading at `parameter_backward`. It runs the reverse-mode engine of `onnxprune.autodiff` with the
parameters as the sources (the tensors to differentiate with respect to), so every node between a parameter
and the loss gets differentiated, and with two rules that replace the input-only ones of
`onnxprune.gradients`:

* **Conv** (any group, strides, pads, dilations, 1-3 spatial dims). The weight gradient
  ``dW[co, ci, k] = sum_{n, o} g[n, co, o] * x_pad[n, ci, o * stride + k * dilation]`` is itself a convolution:
  of the input with the batch and channel axes swapped (``[Cin/G, G*N, *S]``: the batch becomes the channels)
  by the output gradient as a kernel (``[G*Cout/G, N, *O]``), with the forward pads, *stride = the forward
  dilation and dilation = the forward stride*, ``group = G``; its output ``[Cin/G, Cout, *K']`` is sliced to the
  kernel size (``K' > K`` when the forward stride skipped trailing rows) and transposed to ``[Cout, Cin/G, *K]``.
  The input gradient uses the *live* weight tensor (the forward rule bakes the weight's value into a
  constant, which would go stale while the weight trains): a stride-1 Conv with the weight flipped in the graph
  (Reshape / Transpose / Slice with step -1), else ConvTranspose. The bias gradient sums over batch and space.
* **BatchNormalization** (inference form, running statistics constant): ``d scale = sum g * x_hat``,
  ``d bias = sum g`` over batch and space, ``dx = g * scale / sqrt(var + eps)`` with the live scale.

Gemm, MatMul and the elementwise Add / Mul already differentiate whichever operand is active (a parameter
is active here), so the forward rules serve them. `trainable_parameters` picks the float initializers that are
weights or biases of these ops. torch is not used at run time; tests/test_refine.py checks every rule
against torch autograd.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx

from onnxprune.autodiff import backward
from onnxprune.errors import UnsupportedModelError
from onnxprune.gradients import RULES, Context, Emitter, Rule, explicit_pads, transpose_conv
from onnxprune.graph import attrs

__all__ = ["PARAM_RULES", "conv_weight_gradient", "parameter_backward", "trainable_parameters"]

_FLOAT = onnx.TensorProto.FLOAT
# op type -> input indices that are parameters when they are float initializers
_PARAM_INPUTS = {"Conv": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1), "BatchNormalization": (1, 2)}
_INT_MAX = np.iinfo(np.int64).max


def trainable_parameters(model: onnx.ModelProto) -> list[str]:
    """The float32 initializers that are weights or biases: Conv / Gemm weight and bias, a MatMul's constant
    operand (rank >= 2), BatchNormalization scale and bias, and the constant operand of an Add that follows a
    MatMul (a linear layer's bias). An initializer that any other node also reads is left alone."""
    g = model.graph
    inits = {t.name: t for t in g.initializer if t.data_type == _FLOAT}
    producer = {o: n for n in g.node for o in n.output}
    wanted: set[str] = set()
    other: set[str] = set()
    for node in g.node:
        for i, name in enumerate(node.input):
            if name not in inits:
                continue
            ok = i in _PARAM_INPUTS.get(node.op_type, ())
            if node.op_type == "MatMul":
                ok = ok and len(inits[name].dims) >= 2
            if node.op_type == "Add" and len(node.input) == 2:
                peer = producer.get(node.input[1 - i])
                ok = peer is not None and peer.op_type == "MatMul" and node.input[1 - i] not in inits
            (wanted if ok else other).add(name)
    return [t.name for t in g.initializer if t.name in wanted - other]


def parameter_backward(model: onnx.ModelProto, params: Collection[str], seeds: dict[str, str], em: Emitter,
                       shapes: dict[str, tuple[int, ...]], float_tensors: set[str]) -> dict[str, str | None]:
    """Append the nodes computing d loss / d each parameter; returns parameter -> gradient tensor (None when no
    seed depends on it). Arguments as in `onnxprune.autodiff.backward`; the parameters may stay initializers."""
    return backward(model, list(params), seeds, em, shapes, float_tensors, rules=PARAM_RULES)


def _flip_live_weight(em: Emitter, w: str, wshape: tuple[int, ...], group: int) -> str:
    """In-graph `gradients._flipped_weight`: per group, swap in/out channels and rotate the kernel 180 degrees."""
    cout, cin_g, *kernel = wshape
    nd = len(kernel)
    t = w
    if group > 1:
        t = em.reshape(t, [group, cout // group, cin_g, *kernel])
        t = em.op("Transpose", [t], perm=[0, 2, 1, *range(3, 3 + nd)])
        t = em.reshape(t, [group * cin_g, cout // group, *kernel])
    else:
        t = em.op("Transpose", [t], perm=[1, 0, *range(2, 2 + nd)])
    axes = list(range(2, 2 + nd))
    return em.slice(t, [-1] * nd, [-_INT_MAX] * nd, axes, [-1] * nd)


def _conv_input_gradient(em: Emitter, g: str, w: str, node: onnx.NodeProto, xs: tuple[int, ...],
                         ys: tuple[int, ...], wshape: tuple[int, ...], group: int) -> str:
    """d loss / d x of a Conv whose weight is a live (trainable) tensor: `transpose_conv` with the weight
    flipped by graph ops (a Conv runs in onnxruntime's blocked kernels; ConvTranspose through col2im, 1.5x
    slower for 3x3)."""
    return transpose_conv(em, g, w, node, xs, ys, list(wshape[2:]), group, who="refine",
                          flipped=lambda: _flip_live_weight(em, w, wshape, group))


def conv_weight_gradient(em: Emitter, x: str, g: str, node: onnx.NodeProto, xs: tuple[int, ...],
                         ys: tuple[int, ...], wshape: tuple[int, ...]) -> str:
    """d loss / d W of a Conv: a Conv of the channel-major input by the channel-major output gradient
    (geometry in the module docstring). `g` is d loss / d output."""
    cout, cin_g, *kernel = wshape
    nd = len(kernel)
    a = attrs(node)
    group = int(a.get("group", 1))
    strides = list(a.get("strides") or [1] * nd)
    dilations = list(a.get("dilations") or [1] * nd)
    pads = explicit_pads(node, xs[2:], ys[2:], kernel, strides, dilations)
    n = xs[0]
    space = list(range(3, 3 + nd))
    if group == 1 and nd == 2:
        return _weight_gradient_im2col(em, x, g, xs, ys, wshape, pads, strides, dilations)
    if group == 1:
        xt = em.op("Transpose", [x], perm=[1, 0, *range(2, 2 + nd)])  # [Cin, N, *S]
        gt = em.op("Transpose", [g], perm=[1, 0, *range(2, 2 + nd)])  # [Cout, N, *O]
    else:
        xt = em.reshape(em.op("Transpose", [em.reshape(x, [n, group, cin_g, *xs[2:]])], perm=[2, 1, 0, *space]),
                        [cin_g, group * n, *xs[2:]])
        gt = em.reshape(em.op("Transpose", [em.reshape(g, [n, group, cout // group, *ys[2:]])], perm=[1, 2, 0, *space]),
                        [cout, n, *ys[2:]])
    dw = em.op("Conv", [xt, gt], pads=pads, strides=dilations, dilations=strides, group=group,
               kernel_shape=list(ys[2:]))  # [Cin/G, Cout, *K']
    got = [(xs[2 + i] + pads[i] + pads[nd + i] - (ys[2 + i] - 1) * strides[i] - 1) // dilations[i] + 1
           for i in range(nd)]
    if got != kernel:
        dw = em.slice(dw, [0] * nd, kernel, list(range(2, 2 + nd)))
    return em.op("Transpose", [dw], perm=[1, 0, *range(2, 2 + nd)])


def _weight_gradient_im2col(em: Emitter, x: str, g: str, xs: tuple[int, ...], ys: tuple[int, ...],
                            wshape: tuple[int, ...], pads: list[int], strides: list[int], dilations: list[int]) -> str:
    """d loss / d W of a 2-D group-1 Conv as one GEMM: ``g [Cout, N*OH*OW] x cols^T``, where the columns stack
    the padded input's strided windows per kernel offset (``[KH*KW*Cin, N*OH*OW]``). onnxruntime's Conv with an
    OHxOW kernel (the swapped-axes form) was 4x the forward pass of a CIFAR ResNet20 batch; this is ~1x."""
    cout, cin, kh, kw = wshape
    oh, ow = ys[2], ys[3]
    # channel-major first ([Cin, N, H, W]): the windows then stack along axis 0 and reshape for free
    xt = em.op("Transpose", [x], perm=[1, 0, 2, 3])
    xp = em.pad(xt, [0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]]) if any(pads) else xt
    windows = [em.slice(xp, [i * dilations[0], j * dilations[1]],
                        [i * dilations[0] + (oh - 1) * strides[0] + 1, j * dilations[1] + (ow - 1) * strides[1] + 1],
                        [2, 3], [strides[0], strides[1]])
               if (kh, kw, oh, ow) != (1, 1, xs[2], xs[3]) else xp
               for i in range(kh) for j in range(kw)]
    cols = windows[0] if len(windows) == 1 else em.op("Concat", windows, axis=0)  # [KH*KW*Cin, N, OH, OW]
    cols = em.reshape(cols, [kh * kw * cin, -1])
    gt = em.reshape(em.op("Transpose", [g], perm=[1, 0, 2, 3]), [cout, -1])
    dw = em.op("Gemm", [gt, cols], transB=1)  # [Cout, KH*KW*Cin]
    return em.op("Transpose", [em.reshape(dw, [cout, kh, kw, cin])], perm=[0, 3, 1, 2])


def _conv(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    g = gys[0]
    assert g is not None
    x, w = node.input[0], node.input[1]
    wshape = cx.shape(w)
    xs, ys = cx.shape(x), cx.shape(node.output[0])
    group = int(attrs(node).get("group", 1))
    out: dict[int, str] = {}
    if x in cx.active:
        out[0] = (_conv_input_gradient(em, g, w, node, xs, ys, wshape, group) if w in cx.active
                  else RULES["Conv"](em, cx, node, gys)[0])
    if w in cx.active:
        if cx.value(w) is None and w not in cx.shapes:
            raise UnsupportedModelError(f"refine: Conv node {node.name!r} has a weight without a static shape")
        out[1] = conv_weight_gradient(em, x, g, node, xs, ys, wshape)
    if len(node.input) > 2 and node.input[2] in cx.active:
        out[2] = em.reduce("ReduceSum", g, [0, *range(2, len(ys))], keepdims=False)
    return out


def _batchnorm(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    g = gys[0]
    assert g is not None
    a = attrs(node)
    if a.get("training_mode", 0) or any(node.output[1:]):
        raise UnsupportedModelError(f"refine: BatchNormalization node {node.name!r} in training mode")
    x, scale, bias = node.input[0], node.input[1], node.input[2]
    if scale not in cx.active and bias not in cx.active:
        return RULES["BatchNormalization"](em, cx, node, gys)
    mean, var = cx.need(node, node.input[3]), cx.need(node, node.input[4])
    rank = len(cx.shape(x))
    per_channel = (-1,) + (1,) * (rank - 2)
    inv_std = 1.0 / np.sqrt(var.astype(np.float64) + float(a.get("epsilon", 1e-5)))
    axes = [0, *range(2, rank)]
    out: dict[int, str] = {}
    if x in cx.active:
        if scale in cx.active:
            k = em.reshape(em.mul(scale, em.const(inv_std.astype(np.float32), "inv_std")), per_channel)
            out[0] = em.mul(g, k)
        else:
            out[0] = RULES["BatchNormalization"](em, cx, node, gys)[0]
    if scale in cx.active:
        x_hat = em.mul(em.op("Sub", [x, em.const(mean.astype(np.float32).reshape(per_channel), "mean")]),
                       em.const(inv_std.astype(np.float32).reshape(per_channel), "inv_std"))
        out[1] = em.reduce("ReduceSum", em.mul(g, x_hat), axes, keepdims=False)
    if bias in cx.active:
        out[2] = em.reduce("ReduceSum", g, axes, keepdims=False)
    return out


PARAM_RULES: dict[str, Rule] = {"Conv": _conv, "BatchNormalization": _batchnorm}
