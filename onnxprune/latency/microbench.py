"""Single-operator micro-models: the compute-heavy layer a channel group touches, at any kept count.

Start reading at `touched_ops`. For one `ChannelGroup` it finds every Conv, ConvTranspose, Gemm and
MatMul whose weight the group slices and records, per such node, an `OpSpec` (the node with its real
attributes and static input shapes: the *op signature*, shared by every node that computes the same thing,
which ResNet-50 repeats many times) and the dims of its inputs the group owns. `variant` gives the input
shapes (and the ``group`` attribute of a grouped or depthwise convolution, which changes with the count) at
a kept count, and `micro_model` builds the one-node model that a backend times: the real attributes, random
weights as initializers (so the runtime pre-packs them as it does in the real model), one graph input.

Shapes come from the analysis' `ModelGraph`: a symbolic first axis of the activation input is taken as
batch 1; a node with any other unknown size is skipped, with a notice.

In a quantized (QDQ) model a layer reads DequantizeLinear outputs and feeds QuantizeLinear: its micro-model
keeps that pattern (`OpSpec.qdq`: integer weights behind DequantizeLinear, the activation quantized and
dequantized, the output quantized and dequantized again), because onnxruntime fuses it into an integer kernel
(QLinearConv, NHWC) whose steps are not the float kernel's. Timed as float convs, the table saw none of them:
auto rounding on a QDQ MobileNetV2 at ratio 0.3 sped it up 1.02x (``--round-to 16``: 1.33x); with the
pattern, 1.58-1.66x in two runs (efficiency 0.85-0.90; 1 thread, ``bench/qdq_latency_results.txt``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxprune.channels import ChannelAnalysis, ChannelGroup
from onnxprune.graph import ModelGraph, Use, attrs
from onnxprune.latency.backend import random_array
from onnxprune.latency.measure import MAX_MEASURED_ELEMENTS
from onnxprune.onnx_utils import opset_of
from onnxprune.quantized import source_initializer

__all__ = [
    "HEAVY_OPS",
    "LIGHT_OPS",
    "OpSpec",
    "Touch",
    "Variant",
    "dense_variant",
    "light_nodes",
    "micro_model",
    "touched_ops",
    "variant",
    "variant_macs",
]

HEAVY_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: memory-bound ops priced when a group slices their activations (`light_nodes`)
LIGHT_OPS = (
    "Add", "Sub", "Mul", "Div", "Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Erf",
    "BatchNormalization", "GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool", "Resize", "Concat",
    "ReduceMean",
)
#: ops fused into the convolution or matrix product that feeds them (onnxruntime and TVM alike)
_EPILOGUE_OPS = ("Relu", "Clip", "LeakyRelu", "HardSigmoid", "Sigmoid", "Tanh", "BatchNormalization", "Add")
# Which input holds the weight: Conv/ConvTranspose/Gemm read it at input 1; MatMul at 1 (or 0: x @ W vs W @ x).
_WEIGHT_INPUTS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (1, 0), "MatMul": (1, 0)}


@dataclass(frozen=True)
class OpSpec:
    """One compute-heavy node as a micro-benchmark: op type, attributes and dense input shapes."""

    op_type: str
    attrs: tuple[tuple[str, object], ...]  # (name, JSON-able value), sorted; ``group`` included
    shapes: tuple[tuple[int, ...], ...]  # static shape of every input used, in input order
    dtypes: tuple[int, ...]  # onnx element type of every input
    params: tuple[bool, ...]  # which inputs are initializers (constants in the micro-model)
    opset: int
    ir_version: int
    # QDQ: the integer type each input is dequantized from and, last, the type the output is quantized to
    # (0: float); empty for a float node. onnxruntime fuses such a node into an integer kernel (QLinearConv).
    qdq: tuple[int, ...] = ()

    @property
    def signature(self) -> str:
        """A stable text naming what this node computes (nodes with equal signatures share timings)."""
        fields: dict[str, object] = {"op": self.op_type, "attrs": self.attrs, "shapes": self.shapes,
                                     "dtypes": self.dtypes, "params": self.params, "opset": self.opset}  # fmt: skip
        if self.qdq:  # only then: the signatures (and cache keys) of float nodes stay as they were
            fields["qdq"] = self.qdq
        return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=list)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.signature.encode()).hexdigest()[:24]

    def attr(self, name: str, default: object = None) -> object:
        return dict(self.attrs).get(name, default)

    @property
    def macs(self) -> int:
        """Approximate multiply-accumulates at the dense size (input spatial size; for choosing repetitions)."""
        return _macs(self.op_type, self.shapes, self.attr("group", 1))


@dataclass(frozen=True)
class Touch:
    """A group's hold on one node: the node, its spec and the input dims the group owns."""

    node: str
    spec: OpSpec
    dims: tuple[tuple[int, int, int], ...]  # (input index, axis, positions of the group on that axis)


@dataclass(frozen=True)
class Variant:
    """A node's inputs at one kept count: shapes and the conv ``group`` attribute (None: unchanged)."""

    shapes: tuple[tuple[int, ...], ...]
    group: int | None = None

    @property
    def key(self) -> str:
        return json.dumps({"shapes": self.shapes, "group": self.group}, separators=(",", ":"), default=list)


def touched_ops(
    analysis: ChannelAnalysis, group: ChannelGroup, *, light: bool = True
) -> tuple[list[Touch], list[tuple[str, str]]]:
    """The compute-heavy nodes whose weight `group` slices (and with `light`, the memory-bound nodes whose
    activations it slices: `light_nodes`), and the skipped ones as ``(node, reason)`` (reasons name no
    tensor, so that nodes skipped for the same reason can be reported together)."""
    graph = analysis.graph
    members: dict[tuple[str, int], int] = {(m.tensor, m.axis): len(m.positions) for m in group.members}
    touches: list[Touch] = []
    notices: list[tuple[str, str]] = []
    seen: set[int] = set()
    candidates: list[onnx.NodeProto] = []
    for m in group.param_members:
        for use in _weight_uses(graph, m.tensor):
            node = use.node
            if node.op_type not in HEAVY_OPS or node.domain not in ("", "ai.onnx") or id(node) in seen:
                continue
            if use.index not in _WEIGHT_INPUTS[node.op_type]:
                continue
            seen.add(id(node))
            candidates.append(node)
    if light:
        for node in light_nodes(graph, group):
            if id(node) not in seen:
                seen.add(id(node))
                candidates.append(node)
    for node in candidates:
        spec, why = _spec(graph, node)
        if spec is None:
            notices.append((f"{node.op_type} {node.name or node.output[0]!r}", why))
            continue
        dims = tuple(
            (i, axis, members[(name, axis)])
            for i, name in enumerate(node.input[: len(spec.shapes)])
            for axis in range(len(spec.shapes[i]))
            if (name, axis) in members
        )
        touches.append(Touch(node.name or node.output[0], spec, dims))
    return touches, notices


def light_nodes(graph: ModelGraph, group: ChannelGroup) -> list[onnx.NodeProto]:
    """The memory-bound nodes whose channels `group` slices and which a backend runs as kernels of their own.

    A node of `LIGHT_OPS` counts when one of its inputs is an activation member of the group, unless it is
    an *epilogue*: an activation, batch norm or add whose input comes from a convolution or matrix product
    (or from another epilogue) that has no other consumer. onnxruntime folds those into the convolution
    (Conv+BatchNorm, Conv+Relu/Clip/Sigmoid, the NCHWc Conv+Add "Sum" input) and TVM fuses them, so pricing
    them as kernels of their own would count time that the real model does not spend. What stays priced:
    SiLU's sigmoid and product (EfficientNet: onnxruntime runs them as one QuickGelu kernel between two
    layout conversions), squeeze-excitation products and pools, pooling, Resize, Concat, and adds that
    follow no convolution. Only feature maps (4-D activations) are priced: the elementwise chains of
    transformers are fused by pattern (Gelu, LayerNorm, attention), which single nodes cannot stand for.
    """
    members = {m.tensor for m in group.members if not m.is_param and _rank(graph, m.tensor) == 4}
    out: list[onnx.NodeProto] = []
    seen: set[int] = set()
    for tensor in members:
        for use in graph.consumers.get(tensor, []):
            node = use.node
            if id(node) in seen or node.op_type not in LIGHT_OPS or node.domain not in ("", "ai.onnx"):
                continue
            seen.add(id(node))
            if not _is_epilogue(graph, node):
                out.append(node)
    return out


def _rank(graph: ModelGraph, name: str) -> int | None:
    shape = graph.shape(name)
    return None if shape is None else len(shape)


def _is_epilogue(graph: ModelGraph, node: onnx.NodeProto, depth: int = 0) -> bool:
    """`node` is fused into the kernel that produces its input (see `light_nodes`)."""
    if node.op_type not in _EPILOGUE_OPS or depth > 4:
        return False
    for name in node.input[:2] if node.op_type == "Add" else node.input[:1]:
        producer = graph.producer.get(name)
        if producer is None or len(graph.consumers.get(name, [])) != 1:
            continue
        if producer.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") or _is_epilogue(graph, producer, depth + 1):
            return True
    return False


def variant(touch: Touch, size: int, kept: int) -> Variant | None:
    """The inputs of `touch`'s node when its group keeps `kept` of `size` channels (None: not expressible,
    e.g. a conv group count that would not divide)."""
    shapes = [list(s) for s in touch.spec.shapes]
    for i, axis, positions in touch.dims:
        kept_positions = int(round(positions * kept / size))
        shapes[i][axis] = shapes[i][axis] - positions + kept_positions
        if shapes[i][axis] < 1:
            return None
    spec = touch.spec
    group = None
    g = int(spec.attr("group", 1))  # type: ignore[call-overload]
    if spec.op_type == "Conv" and g > 1:
        x_channels, w_per_group = shapes[0][1], shapes[1][1]
        if x_channels % w_per_group or shapes[1][0] % (x_channels // w_per_group):
            return None
        group = x_channels // w_per_group
    elif spec.op_type == "ConvTranspose" and g > 1:
        dense_x = spec.shapes[0][1]
        if (g * shapes[0][1]) % dense_x:
            return None
        group = g * shapes[0][1] // dense_x
    if group == g:
        group = None  # unchanged: the same key as the dense node
    return Variant(tuple(tuple(s) for s in shapes), group)


def _weight_uses(graph: ModelGraph, name: str) -> list[Use]:
    """The uses of a parameter, seen through the DequantizeLinear of a quantized (QDQ) weight."""
    uses = []
    for use in graph.consumers.get(name, []):
        if use.node.op_type == "DequantizeLinear" and source_initializer(graph, use.node.output[0]) == name:
            uses += graph.consumers.get(use.node.output[0], [])
        else:
            uses.append(use)
    return uses


def dense_variant(spec: OpSpec) -> Variant:
    return Variant(spec.shapes, None)


def micro_model(spec: OpSpec, var: Variant, seed: int = 0) -> onnx.ModelProto:
    """The one-node model of `spec` with the inputs of `var`: random initializers, one graph input."""
    rng = np.random.default_rng(seed)
    inputs, inits, names, nodes = [], [], [], []
    qdq = spec.qdq or (0,) * (len(spec.shapes) + 1)
    for i, (shape, dtype, is_param) in enumerate(zip(var.shapes, spec.dtypes, spec.params)):
        name = f"in{i}"
        if is_param:
            inits.append(onnx.numpy_helper.from_array(random_array(rng, shape, dtype), name))
        elif qdq[i]:  # a float input quantized in the micro-model (the runtime fuses no integer kernel whose
            # quantized input is a graph input, nor one whose quantized output is a graph output)
            inputs.append(helper.make_tensor_value_info(f"{name}_float", onnx.TensorProto.FLOAT, list(shape)))
            inits += _quantization(f"q{i}", dtype)
            nodes.append(helper.make_node("QuantizeLinear", [f"{name}_float", f"q{i}_scale", f"q{i}_zero"], [name]))
        else:
            inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        if qdq[i]:  # dequantized as in the model, so that the runtime fuses the same integer kernel
            inits += [] if not is_param else _quantization(f"q{i}", dtype)
            nodes.append(helper.make_node("DequantizeLinear", [name, f"q{i}_scale", f"q{i}_zero"], [f"{name}_dq"]))
            name = f"{name}_dq"
        names.append(name)
    attrs: dict[str, Any] = dict(spec.attrs)
    if var.group is not None:
        attrs["group"] = var.group
    nodes.append(helper.make_node(spec.op_type, names, ["out_float" if qdq[-1] else "out"], **attrs))
    if qdq[-1]:
        inits += _quantization("qout", qdq[-1])
        nodes += [helper.make_node("QuantizeLinear", ["out_float", "qout_scale", "qout_zero"], ["out_q"]),
                  helper.make_node("DequantizeLinear", ["out_q", "qout_scale", "qout_zero"], ["out"])]  # fmt: skip
    out = helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT if any(qdq) else spec.dtypes[0], None)
    graph = helper.make_graph(nodes, f"micro_{spec.op_type}", inputs, [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)], ir_version=spec.ir_version)


def _quantization(prefix: str, dtype: int) -> list[onnx.TensorProto]:
    """A per-tensor scale (0.01) and zero point (0) of an integer type; an int32 bias gets the product of its
    input's and weight's scales, without which onnxruntime fuses no integer kernel."""
    zero = np.zeros((), helper.tensor_dtype_to_np_dtype(dtype))
    scale = 1e-4 if dtype == onnx.TensorProto.INT32 else 0.01
    return [onnx.numpy_helper.from_array(np.array(scale, np.float32), f"{prefix}_scale"),
            onnx.numpy_helper.from_array(zero, f"{prefix}_zero")]  # fmt: skip


def variant_macs(spec: OpSpec, var: Variant) -> int:
    """Approximate multiply-accumulates of `spec` with the inputs of `var`."""
    return _macs(spec.op_type, var.shapes, var.group or spec.attr("group", 1))


# ---- specs --------------------------------------------------------------------------------------

def _spec(graph: ModelGraph, node: onnx.NodeProto) -> tuple[OpSpec | None, str]:
    n_inputs = len(node.input)
    while n_inputs and not node.input[n_inputs - 1]:
        n_inputs -= 1
    shapes: list[tuple[int, ...]] = []
    dtypes: list[int] = []
    params: list[bool] = []
    qdq: list[int] = []
    for i, name in enumerate(node.input[:n_inputs]):
        if not name:
            return None, f"input {i} is omitted"
        name, quantized = _dequantized_from(graph, name)
        qdq.append(quantized)
        shape = graph.shape(name)
        if shape is None:
            return None, f"the shape of input {i} is unknown"
        is_param = graph.is_initializer(name)
        static = []
        for axis, d in enumerate(shape):
            if isinstance(d, int) and d > 0:
                static.append(d)
            elif axis == 0 and not is_param:
                static.append(1)  # a symbolic leading axis is the batch: measure batch 1
            else:
                return None, "sizes other than the batch are dynamic (give the model's input sizes with --shape)"
        dtype = graph.dtype(name)
        if dtype is None:
            return None, f"the element type of input {i} is unknown"
        shapes.append(tuple(static))
        dtypes.append(dtype)
        params.append(is_param)
    if node.op_type == "MatMul" and (len(shapes) != 2 or all(params) or not any(params)):
        return None, "not an activation times a weight"
    if max(math.prod(s) for s in shapes) > MAX_MEASURED_ELEMENTS:
        return None, "an input too large to time"
    attrs = []
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, (int, float, str)) or (isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)):
            attrs.append((a.name, value))
        else:
            return None, f"attribute {a.name!r} is not a plain value"
    opset = opset_of(graph.model)
    qdq.append(_quantized_to(graph, node.output[0]))
    return OpSpec(node.op_type, tuple(sorted(attrs, key=lambda kv: kv[0])), tuple(shapes), tuple(dtypes),
                  tuple(params), opset, graph.model.ir_version, tuple(qdq) if any(qdq) else ()), ""


def _dequantized_from(graph: ModelGraph, name: str) -> tuple[str, int]:
    """(the tensor a micro-model input stands for, its integer type) for an input produced by a
    DequantizeLinear with per-tensor or per-channel parameters: the integers (a quantized weight's initializer,
    or the quantized activation); (`name`, 0) for a float input."""
    node = graph.producer.get(name)
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return name, 0
    if attrs(node).get("block_size", 0):
        return name, 0
    source = node.input[0]
    dtype = graph.dtype(source)
    return (source, dtype) if dtype is not None else (name, 0)


def _quantized_to(graph: ModelGraph, name: str) -> int:
    """The integer type every reader of `name` quantizes it to (all QuantizeLinear of one type), else 0."""
    uses = graph.consumers.get(name, [])
    if not uses or any(u.node.op_type != "QuantizeLinear" for u in uses):
        return 0
    types = {graph.dtype(u.node.output[0]) for u in uses}
    return int(types.pop() or 0) if len(types) == 1 else 0


def _macs(op_type: str, shapes: tuple[tuple[int, ...], ...], group: object) -> int:
    if op_type not in HEAVY_OPS:  # memory-bound: one operation per element of the first input
        return int(np.prod(shapes[0], dtype=np.int64)) if shapes else 0
    if op_type in ("Conv", "ConvTranspose") and len(shapes) >= 2:
        x, w = shapes[0], shapes[1]
        spatial = int(np.prod(x[2:], dtype=np.int64)) if len(x) > 2 else 1
        return int(x[0] * spatial * int(np.prod(w, dtype=np.int64)))
    if len(shapes) >= 2:
        a, b = shapes[0], shapes[1]
        return int(np.prod(a, dtype=np.int64) * (b[-1] if op_type == "MatMul" else max(b)))
    return 0
