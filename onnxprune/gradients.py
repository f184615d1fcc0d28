"""Gradient rules: how each ONNX op turns its output gradient into input gradients, as ONNX nodes.

The registry `RULES` (op type -> rule) is what `autodiff.append_backward` walks; `Emitter` writes the nodes and
constants with fresh names and the opset's spelling (axes as attributes or inputs). Add an op with a
function decorated ``@rule("OpType")`` and a case in ``tests/test_synthetic.py`` (a test fails for a rule
without one). The geometry of every rule is explained next to it; the summary is in `onnxprune.autodiff`.
The upsampling ops (Resize, ConvTranspose) have their rules in `onnxprune.gradients_upsample`, which
`onnxprune.autodiff` imports so the registry is whole wherever it is walked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.errors import UnsupportedModelError
from onnxprune.external import tensor_array
from onnxprune.graph import attrs

__all__ = ["RULES", "Context", "Emitter", "Rule", "explicit_pads", "rule", "supported_ops", "transpose_conv"]


@dataclass
class Emitter:
    """Appends nodes and constant initializers to a graph, with fresh names and opset-correct spellings."""

    graph: onnx.GraphProto
    opset: int
    prefix: str = "grad"
    _count: int = 0
    _const_cache: dict[bytes, str] = field(default_factory=dict)

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def const(self, value: np.ndarray | float | list, hint: str = "c", dtype: type = np.float32) -> str:
        arr: np.ndarray = np.asarray(value, dtype=dtype)
        key = arr.dtype.str.encode() + str(arr.shape).encode() + arr.tobytes()
        if len(key) < 4096 and key in self._const_cache:
            return self._const_cache[key]
        name = self.fresh(hint)
        self.graph.initializer.append(numpy_helper.from_array(arr, name))
        if len(key) < 4096:
            self._const_cache[key] = name
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **kwargs: Any) -> str:
        outputs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.graph.node.append(helper.make_node(op_type, inputs, outputs, name=self.fresh(op_type), **kwargs))
        return outputs[0]

    # opset-dependent spellings -------------------------------------------------------------------------
    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: bool = True) -> str:
        as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if as_input:
            return self.op(op_type, [x, self.const(axes, "axes", np.int64)], keepdims=int(keepdims))
        return self.op(op_type, [x], axes=list(axes), keepdims=int(keepdims))

    def reshape(self, x: str, shape: tuple[int, ...] | list[int]) -> str:
        return self.op("Reshape", [x, self.const(list(shape), "shape", np.int64)])

    def slice(self, x: str, starts: list[int], ends: list[int], axes: list[int], steps: list[int] | None = None) -> str:
        args = [x, self.const(starts, "starts", np.int64), self.const(ends, "ends", np.int64),
                self.const(axes, "axes", np.int64)]
        if steps is not None:
            args.append(self.const(steps, "steps", np.int64))
        return self.op("Slice", args)

    def pad(self, x: str, pads: list[int]) -> str:
        return self.op("Pad", [x, self.const(pads, "pads", np.int64)])

    def mul(self, x: str, y: str) -> str:
        return self.op("Mul", [x, y])

    def scale(self, x: str, factor: float | np.ndarray) -> str:
        return self.op("Mul", [x, self.const(factor, "k")])

    def mask(self, cond: str, g: str) -> str:
        """`g` where `cond`, else 0: a multiply by the condition as 0/1 (onnxruntime's Where with a broadcast
        scalar was 7x slower than Cast + Mul and 30% of an EfficientNet-Lite0 step)."""
        return self.mul(g, self.op("Cast", [cond], to=onnx.TensorProto.FLOAT))

    def unbroadcast(self, g: str, g_shape: tuple[int, ...], shape: tuple[int, ...]) -> str:
        """Sum `g` (shaped like a broadcast result) back to an operand's `shape`."""
        if tuple(g_shape) == tuple(shape):
            return g
        padded = (1,) * (len(g_shape) - len(shape)) + tuple(shape)
        axes = [i for i, (a, b) in enumerate(zip(g_shape, padded)) if b == 1 and a != 1]
        if axes:
            g = self.reduce("ReduceSum", g, axes, keepdims=True)
        if len(padded) != len(shape) or not axes:
            g = self.reshape(g, shape)
        return g


@dataclass
class Context:
    """What a rule may ask about the forward graph: static shapes, constant values, activity, the graph."""

    shapes: dict[str, tuple[int, ...]]
    constants: dict[str, onnx.TensorProto]
    active: set[str]
    opset: int

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            raise UnsupportedModelError(f"synthetic calibration: tensor {name!r} has no static shape")
        return self.shapes[name]

    def value(self, name: str) -> np.ndarray | None:
        t = self.constants.get(name)
        return None if t is None else tensor_array(t)

    def weight(self, node: onnx.NodeProto) -> np.ndarray:
        """The constant weight (input 1) of a convolution-like node; a computed one is refused."""
        if node.input[1] in self.active:
            raise UnsupportedModelError(f"synthetic calibration: {node.op_type} node {node.name!r} has a computed weight")
        return self.need(node, node.input[1])

    def need(self, node: onnx.NodeProto, name: str) -> np.ndarray:
        v = self.value(name)
        if v is None:
            raise UnsupportedModelError(f"synthetic calibration: {node.op_type} node {node.name!r} needs a constant "
                                        f"{name!r} to be differentiated")
        return v


# A rule: (emitter, context, node, output gradients) -> {input index: gradient tensor name}
Rule = Callable[[Emitter, Context, onnx.NodeProto, list[str | None]], dict[int, str]]
RULES: dict[str, Rule] = {}


def rule(*ops: str) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for o in ops:
            RULES[o] = fn
        return fn
    return deco


def supported_ops() -> list[str]:
    """The op types `append_backward` can differentiate, sorted."""
    return sorted(RULES)


@rule("Identity", "Dropout", "Cast")
def _identity(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    return {0: gys[0]}


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    return {0: em.reshape(gys[0], cx.shape(node.input[0]))}


@rule("Transpose")
def _transpose(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    rank = len(cx.shape(node.input[0]))
    perm = attrs(node).get("perm") or list(range(rank))[::-1]
    return {0: em.op("Transpose", [gys[0]], perm=[int(i) for i in np.argsort(perm)])}


@rule("Relu")
def _relu(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    return {0: em.mask(em.op("Greater", [node.output[0], em.const(0.0)]), gys[0])}


@rule("LeakyRelu")
def _leaky(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    alpha = float(attrs(node).get("alpha", 0.01))
    cond = em.op("Greater", [node.input[0], em.const(0.0)])
    return {0: em.op("Where", [cond, gys[0], em.scale(gys[0], alpha)])}


@rule("Clip")
def _clip(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    if not any(node.input[1:]):
        return {0: gys[0]}
    # inside the bounds the output equals the input: one comparison instead of Greater, Less and And
    return {0: em.mask(em.op("Equal", [node.input[0], node.output[0]]), gys[0])}


@rule("Sigmoid")
def _sigmoid(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    y = node.output[0]
    dy = em.mul(y, em.op("Sub", [em.const(1.0), y]))
    return {0: em.mul(gys[0], dy)}


@rule("Tanh")
def _tanh(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    y = node.output[0]
    return {0: em.mul(gys[0], em.op("Sub", [em.const(1.0), em.mul(y, y)]))}


@rule("Erf")
def _erf(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    """``2 / sqrt(pi) * exp(-x^2)``: the exact GELU of torch's exports is ``x * (1 + erf(x / sqrt 2)) / 2``."""
    assert gys[0] is not None
    x = node.input[0]
    bell = em.op("Exp", [em.op("Neg", [em.mul(x, x)])])
    return {0: em.mul(gys[0], em.scale(bell, 2.0 / float(np.sqrt(np.pi))))}


@rule("HardSigmoid", "HardSwish")
def _hard(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    a = attrs(node)
    alpha, beta = (1 / 6, 0.5) if node.op_type == "HardSwish" else (float(a.get("alpha", 0.2)), float(a.get("beta", 0.5)))
    x = node.input[0]
    lin = em.op("Add", [em.scale(x, alpha), em.const(beta)])
    inside = em.op("And", [em.op("Greater", [lin, em.const(0.0)]), em.op("Less", [lin, em.const(1.0)])])
    if node.op_type == "HardSigmoid":
        return {0: em.mask(inside, em.scale(gys[0], alpha))}
    # HardSwish y = x * hs(x): dy/dx = hs(x) + x * alpha inside the linear part
    hs = em.op("HardSigmoid", [x], alpha=alpha, beta=beta)
    d = em.op("Add", [hs, em.mask(inside, em.scale(x, alpha))])
    return {0: em.mul(gys[0], d)}


@rule("Sqrt")
def _sqrt(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    return {0: em.op("Div", [em.scale(gys[0], 0.5), node.output[0]])}


@rule("Pow")
def _pow(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    p = cx.need(node, node.input[1]).astype(np.float64)
    if p.size != 1:
        raise UnsupportedModelError(f"synthetic calibration: Pow node {node.name!r} with a non-scalar exponent")
    e = float(p.reshape(-1)[0])
    xp = em.op("Pow", [node.input[0], em.const(e - 1.0)]) if e != 2.0 else node.input[0]
    return {0: em.mul(gys[0], em.scale(xp, e))}


@rule("Add", "Sub", "Mul", "Div")
def _binary(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    g = gys[0]
    assert g is not None
    a, b = node.input[0], node.input[1]
    ys = cx.shape(node.output[0])
    out: dict[int, str] = {}
    for i, name in enumerate((a, b)):
        if name not in cx.active:
            continue
        if node.op_type == "Add" or (node.op_type == "Sub" and i == 0):
            gi = g
        elif node.op_type == "Sub":
            gi = em.op("Neg", [g])
        elif node.op_type == "Mul":
            gi = em.mul(g, b if i == 0 else a)
        elif i == 0:  # Div: d(a/b)/da = 1/b
            gi = em.op("Div", [g, b])
        else:  # d(a/b)/db = -y/b
            gi = em.op("Neg", [em.op("Div", [em.mul(g, node.output[0]), b])])
        out[i] = em.unbroadcast(gi, ys, cx.shape(name))
    return out


def explicit_pads(node: onnx.NodeProto, xs: tuple[int, ...], ys: tuple[int, ...], kernel: list[int],
                   strides: list[int], dilations: list[int]) -> list[int]:
    a = attrs(node)
    nd = len(kernel)
    auto = a.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(nd):
            total = max((ys[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - xs[i], 0)
            small = total // 2
            begins.append(small if auto == "SAME_UPPER" else total - small)
            ends.append(total - begins[-1])
        return begins + ends
    if auto == "VALID":
        return [0] * (2 * nd)
    return list(a.get("pads") or [0] * (2 * nd))


def _flipped_weight(w: np.ndarray, group: int) -> np.ndarray:
    """The weight of the Conv computing a stride-1 ConvTranspose: per group, input and output channels swapped,
    the kernel rotated by 180 degrees ([Cout, Cin/G, *k] -> [Cin, Cout/G, *k])."""
    cout, cin_g, *kernel = w.shape
    per_group = w.reshape(group, cout // group, cin_g, *kernel).swapaxes(1, 2)
    flipped = np.flip(per_group, axis=tuple(range(3, 3 + len(kernel))))
    return np.ascontiguousarray(flipped.reshape(group * cin_g, cout // group, *kernel)).astype(np.float32)


def transpose_conv(em: Emitter, g: str, w: str, node: onnx.NodeProto, xs: tuple[int, ...], ys: tuple[int, ...],
                   kernel: list[int], group: int, weight: np.ndarray | None = None,
                   flipped: Callable[[], str] | None = None, who: str = "synthetic calibration") -> str:
    """The input gradient of a convolution-like op: ConvTranspose with the forward geometry.

    With stride 1, a kernel larger than 1x1 and the weight's value known, the same gradient is a plain Conv
    with the flipped weight (`_flipped_weight`) and pads ``dilation * (k - 1) - pad``: onnxruntime runs Conv
    in its blocked (NCHWc) kernels and ConvTranspose through col2im, so the Conv is 1.5x faster for dense 3x3
    layers and up to ~25x for depthwise 5x5 ones (EfficientNet-Lite0, batch 4, one thread). A weight that is
    itself computed (refinement trains it) gives `flipped`, which emits the flipped tensor, instead of `weight`;
    `who` names the caller in the error.
    """
    a = attrs(node)
    nd = len(kernel)
    strides = list(a.get("strides") or [1] * nd)
    dilations = list(a.get("dilations") or [1] * nd)
    pads = explicit_pads(node, xs[2:], ys[2:], kernel, strides, dilations)
    extra = [xs[2 + i] - ((ys[2 + i] - 1) * strides[i] - pads[i] - pads[nd + i] + (kernel[i] - 1) * dilations[i] + 1)
             for i in range(nd)]
    if any(e < 0 or e >= max(strides[i], dilations[i]) for i, e in enumerate(extra)):
        raise UnsupportedModelError(f"{who}: {node.op_type} node {node.name!r} has a geometry "
                                    "ConvTranspose cannot invert")
    conv_pads = [(kernel[i % nd] - 1) * dilations[i % nd] - pads[i] + (extra[i - nd] if i >= nd else 0)
                 for i in range(2 * nd)]
    if weight is not None and any(k > 1 for k in kernel):
        known = weight

        def flipped() -> str:
            return em.const(_flipped_weight(known, group), "wflip")

    if flipped is not None and all(s == 1 for s in strides) and min(conv_pads) >= 0:
        return em.op("Conv", [g, flipped()], pads=conv_pads, dilations=dilations, group=group, kernel_shape=kernel)
    return em.op("ConvTranspose", [g, w], strides=strides, pads=pads, dilations=dilations, group=group,
                 kernel_shape=kernel, output_padding=extra)


@rule("Conv")
def _conv(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    w = cx.weight(node)
    group = int(attrs(node).get("group", 1))
    g = transpose_conv(em, gys[0], node.input[1], node, cx.shape(node.input[0]), cx.shape(node.output[0]),
                        list(w.shape[2:]), group, w)
    return {0: g}


@rule("BatchNormalization")
def _batchnorm(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    a = attrs(node)
    if a.get("training_mode", 0) or any(node.output[1:]):
        raise UnsupportedModelError(f"synthetic calibration: BatchNormalization node {node.name!r} in training mode")
    gamma, var = cx.need(node, node.input[1]), cx.need(node, node.input[4])
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + float(a.get("epsilon", 1e-5)))
    rank = len(cx.shape(node.input[0]))
    return {0: em.scale(gys[0], scale.reshape((-1,) + (1,) * (rank - 2)))}


@rule("GlobalAveragePool")
def _gap(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    xs = cx.shape(node.input[0])
    g = em.scale(gys[0], 1.0 / float(np.prod(xs[2:])))
    return {0: em.op("Expand", [g, em.const(list(xs), "shape", np.int64)])}


@rule("AveragePool")
def _avgpool(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    a = attrs(node)
    xs, ys = cx.shape(node.input[0]), cx.shape(node.output[0])
    kernel = list(a["kernel_shape"])
    nd = len(kernel)
    strides = list(a.get("strides") or [1] * nd)
    pads = explicit_pads(node, xs[2:], ys[2:], kernel, strides, [1] * nd)
    counts = np.ones(ys[2:], dtype=np.float64) * float(np.prod(kernel))
    if not a.get("count_include_pad", 0) and any(pads):
        for idx in np.ndindex(*ys[2:]):  # windows clipped to the unpadded input
            counts[idx] = np.prod([min(idx[i] * strides[i] - pads[i] + kernel[i], xs[2 + i]) - max(idx[i] * strides[i]
                                   - pads[i], 0) for i in range(nd)])
    g = em.scale(gys[0], 1.0 / np.maximum(counts, 1.0))
    ones = np.ones((xs[1], 1, *kernel), np.float32)
    return {0: transpose_conv(em, g, em.const(ones, "ones"), node, xs, ys, kernel, xs[1], ones)}


@rule("MaxPool")
def _maxpool(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    if attrs(node).get("storage_order", 0):
        raise UnsupportedModelError(f"synthetic calibration: MaxPool node {node.name!r} with storage_order=1")
    if len(node.output) < 2 or not node.output[1]:  # ask the forward node for its argmax positions
        del node.output[1:]
        node.output.append(em.fresh("maxpool_indices"))
    xs = cx.shape(node.input[0])
    flat_g = em.reshape(gys[0], [-1])
    flat_i = em.reshape(node.output[1], [-1])
    if em.opset >= 16:  # overlapping windows may pick one input twice: accumulate
        zeros = em.op("ConstantOfShape", [em.const([int(np.prod(xs))], "n", np.int64)],
                      value=numpy_helper.from_array(np.zeros(1, np.float32)))
        scattered = em.op("ScatterElements", [zeros, flat_i, flat_g], axis=0, reduction="add")
        return {0: em.reshape(scattered, xs)}
    # before opset 16 there is no accumulating scatter: MaxUnpool keeps one of the duplicates
    return {0: em.op("MaxUnpool", [gys[0], node.output[1], em.const(list(xs), "shape", np.int64)],
                     kernel_shape=list(attrs(node)["kernel_shape"]), strides=list(attrs(node).get("strides") or []) or None)}


@rule("Pad")
def _pad(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    mode = attrs(node).get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = [int(p) for p in cx.need(node, node.input[1]).reshape(-1)]
    xs = cx.shape(node.input[0])
    rank = len(xs)
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        axes = [int(i) % rank for i in cx.need(node, node.input[3]).reshape(-1)]
    if mode != "constant" or any(p < 0 for p in pads):
        raise UnsupportedModelError(f"synthetic calibration: Pad node {node.name!r} (mode {mode}, negative pads)")
    k = len(axes)
    starts = [pads[i] for i in range(k)]
    ends = [pads[i] + xs[axes[i]] for i in range(k)]
    return {0: em.slice(gys[0], starts, ends, axes)}


@rule("Slice")
def _slice(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    xs = cx.shape(node.input[0])
    rank = len(xs)
    starts = cx.need(node, node.input[1]).reshape(-1)
    ends = cx.need(node, node.input[2]).reshape(-1)
    axes = (cx.need(node, node.input[3]).reshape(-1) if len(node.input) > 3 and node.input[3]
            else np.arange(len(starts)))
    steps = (cx.need(node, node.input[4]).reshape(-1) if len(node.input) > 4 and node.input[4]
             else np.ones(len(starts), np.int64))
    index: list[slice] = [slice(None)] * rank
    for s, e, ax, st in zip(starts, ends, axes, steps):
        index[int(ax) % rank] = slice(int(s), int(e), int(st))
    if all(int(st) == 1 for st in steps):  # a box: pad the gradient back with zeros
        pads = [0] * (2 * rank)
        for ax in range(rank):
            b, e, _ = index[ax].indices(xs[ax])
            pads[ax], pads[rank + ax] = b, xs[ax] - max(e, b)
        return {0: em.pad(gys[0], pads)}
    source = np.arange(int(np.prod(xs)), dtype=np.int64).reshape(xs)[tuple(index)]
    zeros = em.op("ConstantOfShape", [em.const([int(np.prod(xs))], "n", np.int64)],
                  value=numpy_helper.from_array(np.zeros(1, np.float32)))
    flat = em.op("ScatterElements", [zeros, em.const(source.reshape(-1), "idx", np.int64),
                                     em.reshape(gys[0], [-1])], axis=0)
    return {0: em.reshape(flat, xs)}


@rule("Concat")
def _concat(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    rank = len(cx.shape(node.output[0]))
    axis = int(attrs(node)["axis"]) % rank
    out, at = {}, 0
    for i, name in enumerate(node.input):
        size = cx.shape(name)[axis]
        if name in cx.active:
            out[i] = em.slice(gys[0], [at], [at + size], [axis])
        at += size
    return out


@rule("ReduceMean", "ReduceSum")
def _reduce(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    xs = cx.shape(node.input[0])
    a = attrs(node)
    axes = a.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = [int(i) for i in cx.need(node, node.input[1]).reshape(-1)]
    axes = [int(i) % len(xs) for i in axes] if axes else list(range(len(xs)))
    kept = [1 if i in axes else d for i, d in enumerate(xs)]
    g = em.reshape(gys[0], kept)
    if node.op_type == "ReduceMean":
        g = em.scale(g, 1.0 / float(np.prod([xs[i] for i in axes])))
    return {0: em.op("Expand", [g, em.const(list(xs), "shape", np.int64)])}


@rule("LayerNormalization")
def _layernorm(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    """``dx = rstd * (d - mean(d) - xhat * mean(d * xhat))`` with ``d = dy * scale``, the means over the
    normalised axes (from `axis` to the last) and ``xhat``, ``rstd`` recomputed from x. Scale and bias are
    constants here: synthesis differentiates with respect to the inputs only."""
    assert gys[0] is not None
    if any(n in cx.active for n in node.input[1:] if n):
        raise UnsupportedModelError(f"synthetic calibration: LayerNormalization node {node.name!r} with a computed "
                                    "scale or bias")
    x = node.input[0]
    rank = len(cx.shape(x))
    a = attrs(node)
    axes = list(range(int(a.get("axis", -1)) % rank, rank))
    mean = em.reduce("ReduceMean", x, axes)
    xc = em.op("Sub", [x, mean])
    var = em.reduce("ReduceMean", em.mul(xc, xc), axes)
    rstd = em.op("Reciprocal", [em.op("Sqrt", [em.op("Add", [var, em.const(float(a.get("epsilon", 1e-5)), "eps")])])])
    xhat = em.mul(xc, rstd)
    d = em.mul(gys[0], node.input[1])
    centred = em.op("Sub", [d, em.reduce("ReduceMean", d, axes)])
    return {0: em.mul(rstd, em.op("Sub", [centred, em.mul(xhat, em.reduce("ReduceMean", em.mul(d, xhat), axes))]))}


@rule("Softmax")
def _softmax(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    rank = len(cx.shape(node.input[0]))
    axis = int(attrs(node).get("axis", -1 if cx.opset >= 13 else 1)) % rank
    axes = [axis] if cx.opset >= 13 else list(range(axis, rank))
    y = node.output[0]
    dot = em.reduce("ReduceSum", em.mul(gys[0], y), axes, keepdims=True)
    return {0: em.mul(y, em.op("Sub", [gys[0], dot]))}


def _swap_last(em: Emitter, cx: Context, name: str) -> str:
    v = cx.value(name)
    if v is not None and name not in cx.active:
        return em.const(np.swapaxes(v, -1, -2).astype(np.float32), "wT")
    rank = len(cx.shape(name))
    return em.op("Transpose", [name], perm=list(range(rank - 2)) + [rank - 1, rank - 2])


@rule("MatMul")
def _matmul(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    g = gys[0]
    assert g is not None
    a, b = node.input[0], node.input[1]
    if len(cx.shape(a)) < 2 or len(cx.shape(b)) < 2:
        raise UnsupportedModelError(f"synthetic calibration: MatMul node {node.name!r} with a 1-D operand")
    ys = cx.shape(node.output[0])
    out = {}
    if a in cx.active:
        ga = em.op("MatMul", [g, _swap_last(em, cx, b)])
        out[0] = em.unbroadcast(ga, ys[:-2] + cx.shape(a)[-2:], cx.shape(a))
    if b in cx.active:
        gb = em.op("MatMul", [_swap_last(em, cx, a), g])
        out[1] = em.unbroadcast(gb, ys[:-2] + cx.shape(b)[-2:], cx.shape(b))
    return out


@rule("Gemm")
def _gemm(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    g = gys[0]
    assert g is not None
    at = attrs(node)
    alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
    ta, tb = int(at.get("transA", 0)), int(at.get("transB", 0))
    a, b = node.input[0], node.input[1]
    out = {}
    g_alpha = em.scale(g, alpha) if alpha != 1.0 else g
    if a in cx.active:  # d(A' B')/dA' = g B'^T, with B'^T = B if transB else B^T
        bv = cx.value(b)
        if bv is not None and b not in cx.active:
            bt = em.const((bv if tb else bv.T).astype(np.float32), "wT")
        else:
            bt = b if tb else em.op("Transpose", [b], perm=[1, 0])
        ga = em.op("MatMul", [g_alpha, bt])
        out[0] = em.op("Transpose", [ga], perm=[1, 0]) if ta else ga
    if b in cx.active:
        at_ = a if ta else em.op("Transpose", [a], perm=[1, 0])
        gb = em.op("MatMul", [at_, g_alpha])
        out[1] = em.op("Transpose", [gb], perm=[1, 0]) if tb else gb
    if len(node.input) > 2 and node.input[2] in cx.active:
        out[2] = em.unbroadcast(em.scale(g, beta), cx.shape(node.output[0]), cx.shape(node.input[2]))
    return out
