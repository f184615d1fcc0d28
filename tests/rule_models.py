"""The tiny models `test_rules.py` checks every channel rule on: a `Builder`, the `sandwich` around one
operator (``x -> Conv(3->C) -> t -> [op] -> u -> Conv(->2) -> y``), one body per operator family, and the
models of the operators that need a graph of their own (layout, gather, recurrent, control flow)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.verify import run

C = 4  # channels of the tensor every row's operator reads
FLOAT, DOUBLE, INT32, INT64, UINT8 = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT32, TensorProto.INT64,
                                      TensorProto.UINT8)  # fmt: skip


class Builder:
    """Nodes and seeded weights of one small graph."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.k = 0

    def fresh(self, prefix: str) -> str:
        self.k += 1
        return f"{prefix}{self.k}"

    def const(self, value, prefix: str = "c") -> str:
        name = self.fresh(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def normal(self, shape) -> str:
        return self.const(self.rng.standard_normal(shape).astype(np.float32), "w")

    def positive(self, shape, lo: float = 0.5, hi: float = 1.5) -> str:
        return self.const(self.rng.uniform(lo, hi, shape).astype(np.float32), "p")

    def ints(self, values, dtype=np.int64) -> str:
        return self.const(np.array(values, dtype=dtype), "i")

    def scalar(self, value, dtype=np.float32) -> str:
        return self.const(np.array([value], dtype=dtype), "s")

    def __call__(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str:
        outs = [self.fresh(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.fresh(f"{op}_"), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, cin: int, cout: int, rank: int = 4) -> str:
        w = self.normal((cout, cin) + (1,) * (rank - 2))
        return self("Conv", [x, w, self.normal((cout,))])

    def model(self, inputs: list[tuple[str, int, list]], outputs: list[str], opset: int,
              domains: tuple[str, ...] = ()) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "rule_row", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
            [helper.make_tensor_value_info(o, FLOAT, None) for o in outputs], self.inits,
        )
        opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
        model = helper.make_model(graph, opset_imports=opsets)
        inferred = onnx.shape_inference.infer_shapes(model)
        del model.graph.output[:]
        model.graph.output.extend(inferred.graph.output)
        return model


Body = Callable[[Builder, str, str], tuple[str, int]]  # (builder, op, t) -> (u, channels of u)


def sandwich(body: Body, rank: int = 4, spatial: int | str = 3, cin: int = C) -> Callable[[str, int], onnx.ModelProto]:
    """``x -> Conv(3->cin) -> t -> body -> u -> Conv(->2) -> y`` (convolutions 1x1, `rank`-D)."""

    def build(op: str, opset: int) -> onnx.ModelProto:
        b = Builder()
        t = b.conv("x", 3, cin, rank)
        u, channels = body(b, op, t)
        y = b.conv(u, channels, 2, rank)
        return b.model([("x", FLOAT, [1, 3] + [spatial] * (rank - 2))], [y], opset)

    return build


# ---- bodies -----------------------------------------------------------------------------------------
# Inputs some unary ops need in their domain (a silenced channel must not turn into NaN or inf either).
_UNARY_PRE = {
    "Log": ["Exp"], "Reciprocal": ["Exp"], "Sqrt": ["Abs"], "Acos": ["Tanh"], "Asin": ["Tanh"],
    "Atanh": ["Tanh", "half"], "Acosh": ["Exp", "plus1"],
}  # fmt: skip


def unary(b: Builder, op: str, t: str) -> tuple[str, int]:
    for pre in _UNARY_PRE.get(op, []):
        if pre == "half":
            t = b("Mul", [t, b.scalar(0.5)])
        elif pre == "plus1":
            t = b("Add", [t, b.scalar(1.0)])
        else:
            t = b(pre, [t])
    if op == "Not":
        return b("Cast", [b("Not", [b("Greater", [t, b.scalar(0.0)])])], to=FLOAT), C
    if op in ("IsNaN", "IsInf"):
        return b("Cast", [b(op, [t])], to=FLOAT), C
    if op == "BitwiseNot":
        return b("Cast", [b(op, [b("Cast", [t], to=INT32)])], to=FLOAT), C
    if op == "Cast":
        return b("Cast", [b(op, [t], to=DOUBLE)], to=FLOAT), C
    if op == "CastLike":
        return b("Cast", [b(op, [t, b.scalar(0.0, np.float64)])], to=FLOAT), C
    return b(op, [t]), C


def broadcasting(b: Builder, op: str, t: str) -> tuple[str, int]:
    per_channel = (1, C, 1, 1)
    if op in ("Add", "Sub", "Mul", "Max", "Min", "Mean", "Sum"):
        return b(op, [t, b.normal(per_channel)]), C
    if op == "Div":
        return b(op, [t, b.positive(per_channel)]), C
    if op == "Pow":
        return b(op, [b("Abs", [t]), b.positive(per_channel)]), C
    if op == "PRelu":
        return b(op, [t, b.positive((C, 1, 1), 0.1, 0.3)]), C
    if op == "Mod":
        return b(op, [t, b.scalar(1.5)], fmod=1), C
    if op in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"):
        return b("Cast", [b(op, [t, b.normal(per_channel)])], to=FLOAT), C
    if op in ("And", "Or", "Xor"):
        return b("Cast", [b(op, [b("Greater", [t, b.scalar(0.0)]), b("Less", [t, b.scalar(0.5)])])], to=FLOAT), C
    if op == "Where":
        return b(op, [b("Greater", [t, b.scalar(0.0)]), t, b.normal(per_channel)]), C
    if op == "BitShift":
        return b("Cast", [b(op, [b("Cast", [t], to=UINT8), b.ints([1], np.uint8)], direction="LEFT")], to=FLOAT), C
    if op in ("BitwiseAnd", "BitwiseOr", "BitwiseXor"):
        ints = b.ints(np.arange(C).reshape(per_channel) + 1, np.int32)
        return b("Cast", [b(op, [b("Cast", [t], to=INT32), ints])], to=FLOAT), C
    raise AssertionError(op)


def passthrough(b: Builder, op: str, t: str) -> tuple[str, int]:
    return b(op, [t]), C


def clip(b: Builder, op: str, t: str) -> tuple[str, int]:
    return b(op, [t, b.const(np.float32(-0.5)), b.const(np.float32(0.7))]), C


def resize(b: Builder, op: str, t: str) -> tuple[str, int]:
    scales = b.const(np.array([1, 1, 2, 2], np.float32))
    return b(op, [t, "", scales] if op == "Resize" else [t, scales]), C


def resize_to_run_time_sizes(b: Builder, op: str, t: str) -> tuple[str, int]:
    """``F.interpolate(t, size=...)`` as torch exports it with a dynamic image size: the sizes vector is
    ``Concat(Shape(t)[:2], 2 * Shape(t)[2:])``, read at run time; its channel element follows t's channels."""
    shape = b("Shape", [t])
    spatial = b("Mul", [b("Slice", [shape, b.ints([2]), b.ints([4])]), b.ints([2])])
    sizes = b("Concat", [b("Slice", [shape, b.ints([0]), b.ints([2])]), spatial], axis=0)
    return b(op, [t, "", "", sizes], mode="linear"), C


def pad(b: Builder, op: str, t: str) -> tuple[str, int]:
    return b(op, [t, b.ints([0, 0, 1, 1, 0, 0, 1, 1])]), C


def pad_channels(b: Builder, op: str, t: str) -> tuple[str, int]:
    """Zero-pads the channel axis (1 before, 2 after) as option-A ResNet shortcuts do; the padded positions
    are channels of the consumer alone."""
    return b(op, [t, b.ints([0, 1, 0, 0, 0, 2, 0, 0])]), C + 3


def pad_channels_attribute(b: Builder, op: str, t: str) -> tuple[str, int]:
    """`pad_channels` before opset 11 (pads as an attribute)."""
    return b(op, [t], pads=[0, 1, 0, 0, 0, 2, 0, 0]), C + 3


def crop_channels(b: Builder, op: str, t: str) -> tuple[str, int]:
    """A negative pad crops channels 0 and 1: they stay (dead) channels of the producer alone."""
    return b(op, [t, b.ints([0, -2, 1, 0, 0, 0, 1, 0])]), C - 2


def pad_residual(b: Builder, op: str, t: str) -> tuple[str, int]:
    """Option-A shortcut: the padded stream is added to a wider branch (one group across the pad, one of the
    padded positions shared with the branch)."""
    return b("Add", [b(op, [t, b.ints([0, 2, 0, 0, 0, 2, 0, 0])]), b.conv(t, C, 2 * C)]), 2 * C


def arg_reduce(b: Builder, op: str, t: str) -> tuple[str, int]:
    return b("Cast", [b(op, [t], axis=2)], to=FLOAT), C


def top_k(axis: int, read_indices: bool = True) -> Body:
    """``TopK(t, k=2)`` along `axis`: the values go on, and with `read_indices` the indices too (cast to float and
    scaled by 0: the rule must keep whatever channel reaches them)."""

    def body(b: Builder, op: str, t: str) -> tuple[str, int]:
        values, indices = b(op, [t, b.ints([2])], n_out=2, axis=axis)
        if read_indices:
            values = b("Add", [values, b("Mul", [b("Cast", [indices], to=FLOAT), b.scalar(0.0)])])
        return values, (2 if axis == 1 else C)

    return body


def _plus_nothing(b: Builder, t: str, indices: str) -> str:
    """``t + 0 * size(indices)``: the index list is read, the channels pass on."""
    return b("Add", [t, b("Mul", [b("Cast", [b("Size", [indices])], to=FLOAT), b.scalar(0.0)])])


def nonzero(b: Builder, op: str, t: str) -> tuple[str, int]:
    """``NonZero(t)`` beside the channels (a detector's score filter): its indices address every axis of t, so the
    channels stay (no group), and it is no barrier."""
    return _plus_nothing(b, t, b(op, [t])), C


def non_max_suppression(b: Builder, op: str, t: str) -> tuple[str, int]:
    """t read as the scores of C classes over 9 boxes (``Reshape [1, C, 9]``): the indices NonMaxSuppression
    returns number the classes, so the channels stay (no group), and it is no barrier."""
    corner = np.arange(9, dtype=np.float32)[:, None] * 0.5  # boxes 1x1 along the diagonal, overlapping
    boxes = b.const(np.concatenate([corner, corner, corner + 1, corner + 1], axis=1)[None])
    scores = b("Reshape", [t, b.ints([1, C, 9])])
    selected = b(op, [boxes, scores, b.ints([2]), b.const(np.array([0.5], np.float32))])
    return _plus_nothing(b, t, selected), C


def roi_align(b: Builder, op: str, t: str) -> tuple[str, int]:
    """Two regions of interest pooled to 2x2 from t [1, C, 4, 4] (Faster R-CNN's box head input): [2, C, 2, 2]."""
    rois = b.const(np.array([[0.0, 0.0, 2.5, 2.0], [1.0, 0.5, 3.5, 3.5]], np.float32))
    return b(op, [t, rois, b.ints([0, 0])], output_height=2, output_width=2, sampling_ratio=2), C


def reduce_channels(b: Builder, op: str, t: str) -> tuple[str, int]:
    return b(op, [t, b.ints([1])], keepdims=1), 1


def along(axis: int) -> Body:
    return lambda b, op, t: (b(op, [t], axis=axis), C)


def pool(b: Builder, op: str, t: str) -> tuple[str, int]:
    if op.startswith("Global"):
        return b(op, [t]), C
    if op == "MaxRoiPool":
        return b(op, [t, b.const(np.array([[0, 0, 0, 2, 2]], np.float32))], pooled_shape=[2, 2]), C
    return b(op, [t], kernel_shape=[2, 2]), C


def reduce(b: Builder, op: str, t: str) -> tuple[str, int]:
    if op == "ReduceLogSum":
        t = b("Exp", [t])
    return b(op, [t, b.ints([2, 3])], keepdims=1), C


def conv_variant(kind: str) -> Callable[[str, int], onnx.ModelProto]:
    """Regular, depthwise (multiplier 2) and grouped (2 groups) Conv; ConvTranspose."""

    def build(op: str, opset: int) -> onnx.ModelProto:
        b = Builder()
        t = b.conv("x", 3, C)
        if op == "ConvTranspose":
            u, cu = b(op, [t, b.normal((C, 3, 1, 1)), b.normal((3,))]), 3
        elif kind == "depthwise":
            u, cu = b(op, [t, b.normal((2 * C, 1, 1, 1)), b.normal((2 * C,))], group=C), 2 * C
        elif kind == "grouped":
            u, cu = b(op, [t, b.normal((C, C // 2, 1, 1)), b.normal((C,))], group=2), C
        else:
            u, cu = b("Relu", [t]), C
        y = b.conv(u, cu, 2)
        return b.model([("x", FLOAT, [1, 3, 3, 3])], [y], opset)

    return build


def linear(op: str, opset: int) -> onnx.ModelProto:
    """Gemm: ``[2, 6] -> Gemm(6->C) -> Relu -> Gemm(C->2, transB)``; MatMul: ``[1, 5, 6] -> MatMul -> Add -> MatMul``."""
    b = Builder()
    if op == "Gemm":
        h = b("Relu", [b(op, ["x", b.normal((6, C)), b.normal((C,))])])
        return b.model([("x", FLOAT, [2, 6])], [b(op, [h, b.normal((2, C))], transB=1)], opset)
    h = b("Add", [b(op, ["x", b.normal((6, C))]), b.normal((C,))])
    return b.model([("x", FLOAT, [1, 5, 6])], [b(op, [h, b.normal((C, 3))])], opset)


def einsum(op: str, opset: int) -> onnx.ModelProto:
    """Dense layers and attention as Einsums (TensorFlow and MaxViT exports): ``x [1, 5, 6] -> q, k, v
    (bsi,ic->bsc) -> scores (bic,bjc->bij) -> (bij,bjc->bic) -> (bic,cd->bid)``: one group of the query and key
    channels the scores contract, one of the value channels the output projection reads."""
    b = Builder()
    q, k, v = (b(op, ["x", b.normal((6, C))], equation="bsi,ic->bsc") for _ in range(3))
    scores = b(op, [q, k], equation="bic, bjc -> bij")
    out = b(op, [b("Softmax", [scores], axis=-1), b("Add", [v, b.normal((C,))])], equation="bij,bjc->bic")
    return b.model([("x", FLOAT, [1, 5, 6])], [b(op, [out, b.normal((C, 3))], equation="bic,cd->bid")], opset)


def norm(b: Builder, op: str, t: str) -> tuple[str, int]:
    if op == "BatchNormalization":
        return b(op, [t, b.normal((C,)), b.normal((C,)), b.normal((C,)), b.positive((C,))]), C
    if op == "InstanceNormalization":
        return b(op, [t, b.normal((C,)), b.normal((C,))]), C
    if op == "GroupNormalization":
        return b(op, [t, b.normal((C,)), b.normal((C,))], num_groups=2), C
    return b(op, [t, b.normal((5,)), b.normal((5,))] if op == "LayerNormalization" else [t, b.normal((5,))], axis=-1), C


def group_norm_torch(b: Builder, op: str, t: str) -> tuple[str, int]:
    """GroupNorm(2, C) as torch exports it at opset <= 17: Reshape [N, 2, -1], InstanceNormalization, Reshape
    back, per-channel Mul and Add. Both reshapes regroup the channel axis: a norm group is one channel."""
    g = b(op, [t, b.ints([0, 2, -1])])
    g = b("InstanceNormalization", [g, b.const(np.ones(2, np.float32)), b.const(np.zeros(2, np.float32))])
    g = b(op, [g, b.ints([1, C, 3, 3])])
    return b("Add", [b("Mul", [g, b.positive((C, 1, 1))]), b.normal((C, 1, 1))]), C


def to_matrix(b: Builder, t: str, features: int) -> str:
    """A [1, features] tensor times a weight matrix: the channels' consumer after a flattening op."""
    return b("MatMul", [t, b.normal((features, 2))])


def layout(op: str, opset: int) -> onnx.ModelProto:
    b = Builder()
    t = b.conv("x", 3, C)
    if op == "Reshape":
        y = to_matrix(b, b(op, [t, b.ints([1, C * 9])]), C * 9)
    elif op == "Flatten":
        y = to_matrix(b, b(op, [t], axis=1), C * 9)
    elif op == "Transpose":
        y = to_matrix(b, b(op, [t], perm=[0, 2, 3, 1]), C)
    elif op == "Squeeze":
        y = to_matrix(b, b(op, [b("GlobalAveragePool", [t]), b.ints([2, 3])]), C)
    elif op == "Expand":
        y = b.conv(b(op, [b("GlobalAveragePool", [t]), b.ints([1, C, 3, 3])]), C, 2)
    elif op == "Tile":
        y = b.conv(b(op, [t, b.ints([1, 1, 2, 1])]), C, 2)
    elif op == "Slice":  # channels 1..C of C+2: the two cut ones form a group of their own
        t = b.conv("x", 3, C + 2)
        y = b.conv(b(op, [t, b.ints([1]), b.ints([C + 1]), b.ints([1])]), C, 2)
    elif op == "Concat":
        y = b.conv(b(op, [t, b.conv("x", 3, C)], axis=1), 2 * C, 2)
    elif op == "Split":
        left, right = b(op, [t, b.ints([C // 2, C // 2])], n_out=2, axis=1)
        y = b("Add", [b.conv(left, C // 2, 2), b.conv(right, C // 2, 2)])
    else:
        raise AssertionError(op)
    return b.model([("x", FLOAT, [1, 3, 3, 3])], [y], opset)


def unsqueeze(op: str, opset: int) -> onnx.ModelProto:
    b = Builder()
    h = b("MatMul", ["x", b.normal((6, C))])
    y = b.conv(b(op, [h, b.ints([2, 3])]), C, 2)
    return b.model([("x", FLOAT, [1, 6])], [y], opset)


def gather(op: str, opset: int) -> onnx.ModelProto:
    """An embedding lookup: ``ids [1, 5] -> Gather(E [16, C]) -> MatMul(C->3)``."""
    b = Builder()
    y = b("MatMul", [b(op, [b.normal((16, C)), "x"]), b.normal((C, 3))])
    return b.model([("x", INT64, [1, 5])], [y], opset)


def gather_sizes(op: str, opset: int) -> onnx.ModelProto:
    """A Gather read only for its sizes (BART's encoder takes its length from ``inputs_embeds[:, :, -1]``):
    ``Conv(3->C) -> t -> Conv(C->2)``, plus ``Gather(t, C - 1, axis=1) -> Shape`` times 0. The channels pass: the
    gathered axis is in no size read; index C - 1, out of range once channels go, is rewritten."""
    b = Builder()
    t = b.conv("x", 3, C)
    picked = b(op, [t, b.const(np.array(C - 1, np.int64))], axis=1)
    size = b("ReduceSum", [b("Shape", [picked])], keepdims=0)
    zero = b("Mul", [b("Cast", [size], to=FLOAT), b.scalar(0.0)])
    y = b("Add", [b.conv(t, C, 2), zero])
    return b.model([("x", FLOAT, [1, 3, "H", 3])], [y], opset)


def gather_elements(op: str, opset: int) -> onnx.ModelProto:
    """Positions reordered along the width by an index of the data's shape (DeBERTa's relative-position
    gathers): ``Conv(3->C) -> GatherElements(axis=3, index [1, C, 3, 3]) -> Conv(C->2)``; the channels pass."""
    b = Builder()
    index = b.ints(np.random.default_rng(1).integers(0, 3, (1, C, 3, 3)))
    y = b.conv(b(op, [b.conv("x", 3, C), index], axis=3), C, 2)
    return b.model([("x", FLOAT, [1, 3, 3, 3])], [y], opset)


def scatter_levels(runtime_target: bool) -> Callable[[str, int], onnx.ModelProto]:
    """torchvision's MultiScaleRoIAlign merging pooled levels: ``x [N, 3, 3, 3] -> Conv(3->C) -> t``, then
    ``ScatterElements(zeros [N, C, 3, 3], Expand(slot [N, 1, 1, 1], sizes), t, axis=0) -> Conv(C->2)``. The
    Expand broadcasts each row's slot over the channels; its channel size is a constant of the sizes vector
    (`runtime_target` False: the export folds it) or read from ``Shape(t)``. The channels pass through both."""

    def build(op: str, opset: int) -> onnx.ModelProto:
        b = Builder()
        t = b.conv("x", 3, C)
        rows = b("Slice", [b("Shape", [t]), b.ints([0]), b.ints([1])])
        rest = b("Slice", [b("Shape", [t]), b.ints([1]), b.ints([4])]) if runtime_target else b.ints([C, 3, 3])
        sizes = b("Concat", [rows, rest], axis=0)
        zeros = b("ConstantOfShape", [b("Concat", [rows, b.ints([C, 3, 3])], axis=0)],
                  value=numpy_helper.from_array(np.zeros(1, np.float32)))  # fmt: skip
        count = b("Squeeze", [rows, b.ints([0])])
        slots = b("Reshape", [b("Range", [b.const(np.array(0, np.int64)), count, b.const(np.array(1, np.int64))]),
                              b.ints([-1, 1, 1, 1])])  # fmt: skip
        merged = b("ScatterElements", [zeros, b("Expand", [slots, sizes]), t], axis=0)  # one model for both ops
        return b.model([("x", FLOAT, ["N", 3, 3, 3])], [b.conv(merged, C, 2)], opset)

    return build


def gather_nd(op: str, opset: int) -> onnx.ModelProto:
    """Last-token pooling: ``x [2, 5, 3] -> MatMul(3->C) -> GatherND(indices [2, 1], batch_dims=1) -> [2, C]
    -> MatMul(C->3)``; the hidden axis passes through the gather."""
    b = Builder()
    t = b("MatMul", ["x", b.normal((3, C))])
    y = b("MatMul", [b(op, [t, b.ints([[4], [2]])], batch_dims=1), b.normal((C, 3))])
    return b.model([("x", FLOAT, [2, 5, 3])], [y], opset)


def shape_reader(op: str, opset: int) -> onnx.ModelProto:
    """Shape/Size read the sizes of t (dynamic H, so they are not folded); the value is multiplied by 0."""
    b = Builder()
    t = b.conv("x", 3, C)
    size = b(op, [t])
    if op == "Shape":
        size = b("ReduceSum", [size], keepdims=0)
    zero = b("Mul", [b("Cast", [size], to=FLOAT), b.scalar(0.0)])
    y = b("Add", [b.conv(b("Relu", [t]), C, 2), zero])
    return b.model([("x", FLOAT, [1, 3, "H", 3])], [y], opset)


def depth_space(op: str, opset: int) -> onnx.ModelProto:
    b = Builder()
    if op == "DepthToSpace":
        y = b.conv(b(op, [b.conv("x", 3, 4 * C)], blocksize=2), C, 2)
    else:
        y = b.conv(b(op, [b.conv("x", 3, C)], blocksize=2), 4 * C, 2)
    return b.model([("x", FLOAT, [1, 3, 4, 4])], [y], opset)


def depth_space_zero_check(op: str, opset: int) -> None:
    """DCR order: output channel c of DepthToSpace reads input channels c, C+c, 2C+c, 3C+c (and the
    reverse for SpaceToDepth): zeroing those inputs must zero that output."""
    c = 1
    if op == "DepthToSpace":
        shape, zeroed, out_channels = [1, 4 * C, 2, 2], [c + k * C for k in range(4)], [c]
    else:
        shape, zeroed, out_channels = [1, C, 4, 4], [c], [c + k * C for k in range(4)]
    node = helper.make_node(op, ["x"], ["y"], blocksize=2)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("x", FLOAT, shape)],
                              [helper.make_tensor_value_info("y", FLOAT, None)])  # fmt: skip
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    x[:, zeroed] = 0
    y = run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), {"x": x})[0]
    assert np.all(y[:, out_channels] == 0) and np.any(y != 0)


def recurrent(op: str, opset: int) -> onnx.ModelProto:
    """A bidirectional layer with initial states (hidden 3) between MatMuls over its input and hidden sizes:
    ``x [5, 1, 6] -> MatMul(6->C) -> op -> Y [5, 2, 1, 3] -> MatMul(3->2)``."""
    b = Builder()
    gates, hidden = {"LSTM": 4, "GRU": 3, "RNN": 1}[op], 3
    x = b("MatMul", ["x", b.normal((6, C))])
    inputs = [x, b.normal((2, gates * hidden, C)), b.normal((2, gates * hidden, hidden)),
              b.normal((2, 2 * gates * hidden)), "", b.normal((2, 1, hidden))]  # fmt: skip
    if op == "LSTM":
        inputs += [b.normal((2, 1, hidden)), b.normal((2, 3 * hidden))]  # initial_c, peepholes
    y, _ = b(op, inputs, n_out=2, hidden_size=hidden, direction="bidirectional")
    return b.model([("x", FLOAT, [5, 1, 6])], [b("MatMul", [y, b.normal((hidden, 2))])], opset)


def fill_like(value: float) -> Body:
    """``t + fill_like(t)``: ConstantOfShape(Shape(t)) holding `value`; t's spatial size is dynamic (no folding)."""

    def body(b: Builder, op: str, t: str) -> tuple[str, int]:
        fill = b(op, [b("Shape", [t])], value=numpy_helper.from_array(np.full(1, value, np.float32)))
        return b("Add", [t, fill]), C

    return body


def zero_channels(b: Builder, op: str, t: str) -> tuple[str, int]:
    """``Concat(t, zeros(1, 2, H, W))`` on the channels: the fill's channel count is a constant element of its
    shape vector, its spatial sizes are read from t at run time."""
    spatial = b("Slice", [b("Shape", [t]), b.ints([2]), b.ints([4])])
    shape = b("Concat", [b.ints([1, 2]), spatial], axis=0)
    fill = b(op, [shape], value=numpy_helper.from_array(np.zeros(1, np.float32)))
    return b("Concat", [t, fill], axis=1), C + 2


def zero_state(op: str, opset: int) -> onnx.ModelProto:
    """A zero initial state of the run-time batch size, as exporters build it, for a forward LSTM (hidden 3):
    ``ConstantOfShape(Concat([1], batch of X, [3])) -> initial_h, initial_c``; x [5, N, 6]."""
    b = Builder()
    hidden = 3
    x = b("MatMul", ["x", b.normal((6, C))])
    batch = b("Unsqueeze", [b("Gather", [b("Shape", [x]), b.const(np.array(1, np.int64))], axis=0), b.ints([0])])
    shape = b("Concat", [b.ints([1]), batch, b.ints([hidden])], axis=0)
    state = b(op, [shape], value=numpy_helper.from_array(np.zeros(1, np.float32)))
    w, r = b.normal((1, 4 * hidden, C)), b.normal((1, 4 * hidden, hidden))
    y, _ = b("LSTM", [x, w, r, "", "", state, state], n_out=2, hidden_size=hidden)
    return b.model([("x", FLOAT, [5, "N", 6])], [b("MatMul", [y, b.normal((hidden, 2))])], opset)


def if_branches(op: str, opset: int) -> onnx.ModelProto:
    """``x -> Conv(3->C) -> t -> If(cond: Relu(t) | Conv(t, w) with w inside the branch) -> u -> Conv(->2)``."""
    b = Builder()
    t = b.conv("x", 3, C)
    w = numpy_helper.from_array(b.rng.standard_normal((C, C, 1, 1)).astype(np.float32), "if_else_w")
    shape = [1, C, 3, 3]
    then = helper.make_graph([helper.make_node("Relu", [t], ["if_then_u"], name="if_then_relu")], "then", [],
                             [helper.make_tensor_value_info("if_then_u", FLOAT, shape)])
    other = helper.make_graph([helper.make_node("Conv", [t, "if_else_w"], ["if_else_u"], name="if_else_conv")],
                              "else", [], [helper.make_tensor_value_info("if_else_u", FLOAT, shape)], [w])
    u = b(op, ["cond"], then_branch=then, else_branch=other)
    y = b.conv(u, C, 2)
    # cond of shape [1]: for shape [] `verify.random_inputs` gives a numpy scalar, which onnxruntime refuses
    return b.model([("cond", TensorProto.BOOL, [1]), ("x", FLOAT, [1, 3, 3, 3])], [y], opset)


def if_constant_branch(op: str, opset: int) -> onnx.ModelProto:
    """``x -> Conv(3->C) -> t -> If(cond: a Constant [1, C, 3, 3] | Conv(t, w)) -> u -> Conv(->2)``: a branch whose
    output is a Constant node (an initializer cannot be a branch's output; torchvision's batched NMS returns an
    empty index list so). Its sizes are fixed, so u's channels stay; t's still prune through the other branch."""
    b = Builder()
    t = b.conv("x", 3, C)
    w = numpy_helper.from_array(b.rng.standard_normal((C, C, 1, 1)).astype(np.float32), "ifc_else_w")
    shape = [1, C, 3, 3]
    fill = numpy_helper.from_array(np.full(shape, 0.5, np.float32), "ifc_fill")
    then = helper.make_graph([helper.make_node("Constant", [], ["ifc_then_u"], name="ifc_then_const", value=fill)],
                             "then", [], [helper.make_tensor_value_info("ifc_then_u", FLOAT, shape)])
    other = helper.make_graph([helper.make_node("Conv", [t, "ifc_else_w"], ["ifc_else_u"], name="ifc_else_conv")],
                              "else", [], [helper.make_tensor_value_info("ifc_else_u", FLOAT, shape)], [w])
    u = b("If", ["cond"], then_branch=then, else_branch=other)  # the row covers If and the branch's Constant
    return b.model([("cond", TensorProto.BOOL, [1]), ("x", FLOAT, [1, 3, 3, 3])], [b.conv(u, C, 2)], opset)


def loop_carry(op: str, opset: int) -> onnx.ModelProto:
    """``x -> Conv(3->C) -> t -> Loop(2 iterations carrying t through Relu(Conv(s, w)), w in the body) -> u ->
    Conv(->2)``: the carried channels are one channel (the body conv's inputs and outputs)."""
    b = Builder()
    t = b.conv("x", 3, C)
    w = numpy_helper.from_array(b.rng.standard_normal((C, C, 1, 1)).astype(np.float32), "loop_w")
    state = [helper.make_tensor_value_info(n, FLOAT, [1, C, 3, 3]) for n in ("loop_s_in", "loop_s_out")]
    body = helper.make_graph(
        [helper.make_node("Identity", ["loop_c_in"], ["loop_c_out"], name="loop_cond"),
         helper.make_node("Conv", ["loop_s_in", "loop_w"], ["loop_h"], name="loop_conv"),
         helper.make_node("Relu", ["loop_h"], ["loop_s_out"], name="loop_relu")],
        "body",
        [helper.make_tensor_value_info("loop_i", INT64, []), helper.make_tensor_value_info("loop_c_in", TensorProto.BOOL, []),
         state[0]],
        [helper.make_tensor_value_info("loop_c_out", TensorProto.BOOL, []), state[1]], [w],
    )  # fmt: skip
    keep = b.const(np.array(True), "keep")
    u = b(op, [b.const(np.array(2, np.int64), "trip"), keep, t], body=body)
    return b.model([("x", FLOAT, [1, 3, 3, 3])], [b.conv(u, C, 2)], opset)


def scan_rows(op: str, opset: int) -> onnx.ModelProto:
    """``x -> Conv(3->C) -> t -> Scan(rows of t along axis 2 through Relu, stacked back along axis 2) -> u ->
    Conv(->2)``: a row's channels are the scanned tensor's channels."""
    b = Builder()
    t = b.conv("x", 3, C)
    body = helper.make_graph(
        [helper.make_node("Relu", ["scan_row"], ["scan_y"], name="scan_relu")], "body",
        [helper.make_tensor_value_info("scan_row", FLOAT, [1, C, 3])],
        [helper.make_tensor_value_info("scan_y", FLOAT, [1, C, 3])],
    )  # fmt: skip
    u = b(op, [t], body=body, num_scan_inputs=1, scan_input_axes=[2], scan_output_axes=[2])
    return b.model([("x", FLOAT, [1, 3, 3, 3])], [b.conv(u, C, 2)], opset)


def quantized(per_channel: bool) -> Callable[[str, int], onnx.ModelProto]:
    """The QDQ format: ``x -> Conv(DQ(W1 uint8, per tensor, zero point 5)) -> t -> QuantizeLinear ->
    DequantizeLinear (uint8; per tensor, zero point 128, or per channel, zero points 100-130) -> u ->
    Conv(DQ(W2 int8, per output channel)) -> y``: W1's output axis, the activation's per-channel scale and zero
    point and W2's input axis are one group. With per-tensor activations a silenced row of W1 is silent only
    when set to its zero point (5): 0 dequantizes to -0.5."""

    def build(op: str, opset: int) -> onnx.ModelProto:
        b = Builder()
        w1 = b.const(b.rng.integers(0, 12, (C, 3, 1, 1)).astype(np.uint8), "w1q")
        w1 = b("DequantizeLinear", [w1, b.const(np.array(0.1, np.float32), "s"), b.const(np.array(5, np.uint8), "zp")])
        t = b("Conv", ["x", w1, b.normal((C,))])
        if per_channel:
            scale, zero = b.positive((C,), 0.02, 0.04), b.const(np.arange(100, 100 + 10 * C, 10).astype(np.uint8), "zp")
        else:
            scale, zero = b.const(np.array(0.03, np.float32), "s"), b.const(np.array(128, np.uint8), "zp")
        u = b("DequantizeLinear", [b("QuantizeLinear", [t, scale, zero], axis=1), scale, zero], axis=1)
        w2 = b.const(b.rng.integers(-127, 128, (2, C, 1, 1)).astype(np.int8), "w2q")
        w2 = b("DequantizeLinear", [w2, b.positive((2,), 0.01, 0.02), b.const(np.array([-3, 2], np.int8), "zp")],
               axis=0)  # fmt: skip
        return b.model([("x", FLOAT, [1, 3, 3, 3])], [b("Conv", [u, w2])], opset)

    return build


def integer_operator(op: str, opset: int) -> onnx.ModelProto:
    """``x -> Conv(3->C) -> t -> QuantizeLinear -> [integer op] -> u -> Conv(->2) -> y`` with the QOperator /
    integer forms of a 1x1 conv or a matrix product (C -> C) between the float convolutions."""
    b = Builder()
    t = b.conv("x", 3, C)
    s, zp = b.const(np.array(0.05, np.float32), "s"), b.const(np.array(128, np.uint8), "zp")
    tq = b("QuantizeLinear", [t, s, zp])
    conv = op in ("QLinearConv", "ConvInteger")
    w = b.const(b.rng.integers(0, 255, (C, C, 1, 1) if conv else (C, C)).astype(np.uint8), "wq")
    if op in ("QLinearConv", "QLinearMatMul"):
        x = tq if conv else b("Transpose", [tq], perm=[0, 2, 3, 1])  # channels last for the matrix product
        q = b(op, [x, s, zp, w, s, zp, s, zp])
        u = b("DequantizeLinear", [q, s, zp])
    else:
        x = tq if conv else b("Transpose", [tq], perm=[0, 2, 3, 1])
        u = b("Cast", [b(op, [x, w, zp, zp])], to=FLOAT)
    if not conv:
        u = b("Transpose", [u], perm=[0, 3, 1, 2])
    return b.model([("x", FLOAT, [1, 3, 3, 3])], [b.conv(u, C, 2)], opset)


def attention(variant: str) -> Callable[[str, int], onnx.ModelProto]:
    """Fused attention (opset 23) between projections from ``x [1, 5, 6]`` and an output projection.

    ``3d``: ``[1, 5, heads * size]`` operands, 4 query heads sharing 2 key/value heads (q / k size 3, v size 2) and a
    mask with a head axis: one group of the 2 KV heads, each with its 2 query heads. ``4d``: the heads of
    ``MatMul -> Reshape [1, 5, H, d] -> Transpose`` operands (the head size is frozen by the split), GQA in the
    operator: one group of 2. ``4d-features``: a single head ``Unsqueeze``d from the projections, so the query/key
    and value features are the channels (the rewrite pins the default scale): groups of 2 and 3."""

    def build(op: str, opset: int) -> onnx.ModelProto:
        b = Builder()
        x = "x"
        if variant == "3d":
            q, k, v = (b("MatMul", [x, b.normal((6, n))]) for n in (4 * 3, 2 * 3, 2 * 2))
            mask = b.normal((1, 4, 5, 5))
            y = b(op, [q, k, v, mask], q_num_heads=4, kv_num_heads=2)
            out = b("MatMul", [y, b.normal((4 * 2, 3))])
        elif variant == "4d":
            def heads(n: int, size: int) -> str:
                t = b("Reshape", [b("MatMul", [x, b.normal((6, n * size))]), b.ints([1, 5, n, size])])
                return b("Transpose", [t], perm=[0, 2, 1, 3])
            y = b(op, [heads(4, 3), heads(2, 3), heads(2, 2)], is_causal=1)
            flat = b("Reshape", [b("Transpose", [y], perm=[0, 2, 1, 3]), b.ints([1, 5, 4 * 2])])
            out = b("MatMul", [flat, b.normal((4 * 2, 3))])
        else:
            q, k, v = (b("Unsqueeze", [b("MatMul", [x, b.normal((6, n))]), b.ints([1])]) for n in (3, 3, 2))
            y = b(op, [q, k, v])
            out = b("MatMul", [b("Squeeze", [y, b.ints([1])]), b.normal((2, 3))])
        return b.model([(x, FLOAT, [1, 5, 6])], [out], opset)

    return build


def rotary(variant: str) -> Callable[[str, int], onnx.ModelProto]:
    """RotaryEmbedding between projections: 3 heads of size 4 of ``x [1, 5, 6]``, 3-D (``num_heads``) or 4-D
    (``Reshape -> Transpose`` heads): one group of the 3 heads (features within a head are rotated in pairs)."""

    def build(op: str, opset: int) -> onnx.ModelProto:
        b = Builder()
        angles = np.arange(5)[:, None] * np.array([1.0, 0.1])[None]
        cos, sin = b.const(np.cos(angles).astype(np.float32)), b.const(np.sin(angles).astype(np.float32))
        positions = b.ints([[0, 1, 2, 3, 4]])
        t = b("MatMul", ["x", b.normal((6, 12))])
        if variant == "3d":
            u = b(op, [t, cos, sin, positions], num_heads=3)
        else:
            t = b("Transpose", [b("Reshape", [t, b.ints([1, 5, 3, 4])])], perm=[0, 2, 1, 3])
            u = b("Reshape", [b("Transpose", [b(op, [t, cos, sin, positions])], perm=[0, 2, 1, 3]), b.ints([1, 5, 12])])
        return b.model([("x", FLOAT, [1, 5, 6])], [b("MatMul", [u, b.normal((12, 3))])], opset)

    return build


def norm_over_channels(op: str, opset: int) -> onnx.ModelProto:
    """``x [1, 5, 6] -> MatMul (+ bias) -> [op] over the last axis (the channels) -> MatMul``: exact, the pruned node
    keeping the statistics of the original width."""
    b = Builder()
    t = b("Add", [b("MatMul", ["x", b.normal((6, C))]), b.normal((C,))])
    u = b(op, [t, b.positive((C,))], axis=-1, epsilon=0.5)
    return b.model([("x", FLOAT, [1, 5, 6])], [b("MatMul", [u, b.normal((C, 3))])], opset)


def cumsum(b: Builder, op: str, t: str) -> tuple[str, int]:
    """A running sum along the last spatial axis: the channels pass."""
    return b(op, [t, b.const(np.array(3, np.int64))]), C


def range_positions(b: Builder, op: str, t: str) -> tuple[str, int]:
    """Positions 0..W-1 of a run-time width (Range of a Shape element) added along the last axis: off the
    channels' path, and no barrier."""
    width = b("Squeeze", [b("Gather", [b("Shape", [t]), b.ints([3])]), b.ints([0])])
    positions = b("Cast", [b(op, [b.const(np.array(0, np.int64)), width, b.const(np.array(1, np.int64))])], to=FLOAT)
    return b("Add", [t, positions]), C


def contrib(op: str, opset: int) -> onnx.ModelProto:
    """onnxruntime's contrib ops (`rules.contrib`) between projections. Packed Attention: its 2 heads and the 6 input
    features it contracts. The Gelu family on ``MatMul(x [1, 5, 6])``
    (a bias along the channels where the op takes one); the skip norms as the op over the length axis of
    ``[1, C, 5]``, the skip from a second convolution (the channel axis passes, exactly)."""
    b = Builder()
    ms = {"domain": "com.microsoft"}
    if op == "Attention":  # packed q / k / v of 2 heads (values narrower: qkv_hidden_sizes) from MatMul(x)
        t = b("MatMul", ["x", b.normal((6, 6))])
        u = b(op, [t, b.normal((6, 8 + 8 + 4)), b.normal((20,))], num_heads=2, qkv_hidden_sizes=[8, 8, 4], **ms)
        return b.model([("x", FLOAT, [1, 5, 6])], [b("MatMul", [u, b.normal((4, 3))])], opset, ("com.microsoft",))
    if op in ("Gelu", "QuickGelu", "FastGelu", "BiasGelu"):
        t = b("MatMul", ["x", b.normal((6, C))])
        u = b(op, [t, b.normal((C,))] if op in ("FastGelu", "BiasGelu") else [t], **ms)
        return b.model([("x", FLOAT, [1, 5, 6])], [b("MatMul", [u, b.normal((C, 3))])], opset, ("com.microsoft",))
    t, skip = b.conv("x", 3, C, rank=3), b.conv("x", 3, C, rank=3)
    params = [b.positive((5,)), b.normal((5,)), b.normal((5,))][: 3 if op == "SkipLayerNormalization" else 2]
    u = b(op, [t, skip, *params], **ms)
    return b.model([("x", FLOAT, [1, 3, 5])], [b.conv(u, C, 2, rank=3)], opset, ("com.microsoft",))
