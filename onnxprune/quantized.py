"""Quantized (QDQ) weights: integer initializers read through DequantizeLinear.

A QDQ model (onnxruntime's ``quantize_static`` in QDQ format, PyTorch / TensorFlow quantization-aware exports,
TensorRT's explicit quantization) keeps each weight as an integer initializer ``W_q`` read by
``DequantizeLinear(W_q, scale, zero_point, axis)``: the float weight a Conv / Gemm / MatMul sees is
``(W_q - zero_point) * scale``, per tensor or per channel along ``axis``. The channel rule of
QuantizeLinear / DequantizeLinear (``rules/quantize.py``) couples ``W_q``'s axes through the dequantization,
so a group slices ``W_q``, its per-channel scale and zero point like any parameter, and the pruned model
stays quantized (same integers, same scales). Three places need the quantized view, and ask here:

- roles: the weight / bias role a Conv gives its input belongs to ``W_q`` (:func:`source_initializer`);
- scoring: criteria score the dequantized values (:func:`effective_value`), not the raw integers, whose
  per-channel scales differ;
- the masking oracle: a silenced quantized weight is set to its zero point (:func:`zero_point_fill`), the
  integer that dequantizes to exactly 0.

Calibration statistics (the OBS / activation / APoZ criteria, the ``ls`` repair) are collected on a float view of
the model whose layers read the dequantized weights directly, and every repair (``bias``, ``ls``, ``seq``) and the
fine-grained sparsity refit or zero on that view and write the weights back as integers on their own grid
(`quantized_repair`). What still reads float weights at the layers without that view (the data criteria's
data-free surrogates, unconstrained mode) does not handle quantized ones: :func:`check_float_weights` and
:func:`check_no_quantized_weights` refuse it in one line rather than skip those layers without a word.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import UsageError
from onnxprune.graph import ModelGraph, attrs

__all__ = [
    "FLOAT_WEIGHT_CRITERIA",
    "check_float_weights",
    "check_no_quantized_weights",
    "dequantizer",
    "effective_value",
    "fake_quantized_value",
    "fake_quantized_weights",
    "is_parameter",
    "is_quantized_weight",
    "quantization_grid",
    "quantized_initializers",
    "source_initializer",
    "without_activation_quantization",
    "zero_point_fill",
]

#: Criteria whose data-free surrogates read float weight matrices at `calibration.consumers` (no QDQ layer there).
FLOAT_WEIGHT_CRITERIA = frozenset({"obs", "activation", "apoz"})


def dequantizer(graph: ModelGraph, name: str) -> onnx.NodeProto | None:
    """The DequantizeLinear that reads the integer initializer `name` as its data, with constant scale and
    zero point, when that is its only reader; else None."""
    t = graph.initializers.get(name)
    if t is None or t.data_type in _FLOAT_TYPES:
        return None
    uses = graph.consumers.get(name, [])
    if len(uses) != 1:
        return None
    node, slot = uses[0].node, uses[0].index
    if node.op_type != "DequantizeLinear" or slot != 0 or node.domain not in ("", "ai.onnx"):
        return None
    params = [n for n in node.input[1:3] if n]
    if not all(graph.is_initializer(p) for p in params) or attrs(node).get("block_size", 0):
        return None
    rank, axis = len(t.dims), int(attrs(node).get("axis", 1))
    for p in params:  # per tensor, or one value per position of an axis the data has
        shape = graph.shape(p)
        if shape not in ((), (1,)) and (shape is None or len(shape) != 1 or not -rank <= axis < rank
                                        or shape[0] != t.dims[axis]):  # fmt: skip
            return None
    return node


def source_initializer(graph: ModelGraph, name: str) -> str | None:
    """The initializer a weight `name` stands for when it is dequantized: the integers behind a constant
    DequantizeLinear, or the float weight of a fake-quantized ``DequantizeLinear(QuantizeLinear(W))`` (what
    quantization-aware exports write); None otherwise."""
    node = graph.producer.get(name)
    if node is None or node.op_type != "DequantizeLinear" or not node.input:
        return None
    source = node.input[0]
    if dequantizer(graph, source) is node:
        return source
    quantize = graph.producer.get(source)
    if quantize is None or quantize.op_type != "QuantizeLinear" or not quantize.input:
        return None
    weight = quantize.input[0]
    only_reader = len(graph.consumers.get(weight, [])) == 1 and len(graph.consumers.get(source, [])) == 1
    return weight if graph.is_initializer(weight) and graph.dtype(weight) in _FLOAT_TYPES and only_reader else None


def is_quantized_weight(graph: ModelGraph, name: str) -> bool:
    """True for an initializer a layer reads through quantization: integers behind DequantizeLinear, or a
    float weight fake-quantized by ``DequantizeLinear(QuantizeLinear(W))``."""
    if dequantizer(graph, name) is not None:
        return True
    uses = graph.consumers.get(name, [])
    if len(uses) != 1 or uses[0].node.op_type != "QuantizeLinear" or uses[0].index != 0:
        return False
    return any(source_initializer(graph, o) == name for o in _dequantized_outputs(graph, uses[0].node))


def _dequantized_outputs(graph: ModelGraph, quantize: onnx.NodeProto) -> list[str]:
    return [u.node.output[0] for u in graph.consumers.get(quantize.output[0], []) if u.node.op_type == "DequantizeLinear"]


def fake_quantized_weights(graph: ModelGraph) -> dict[str, tuple[onnx.NodeProto, onnx.NodeProto]]:
    """Float initializers a layer reads fake-quantized, ``DequantizeLinear(QuantizeLinear(W))`` (quantization-aware
    exports), by name: their (QuantizeLinear, DequantizeLinear), when both share the grid (the same constant scale
    and zero point values, per tensor or along the same axis) and the integer type is known (a zero point's)."""
    out = {}
    for node in graph.nodes:
        if node.op_type != "DequantizeLinear" or not node.output:
            continue
        weight = source_initializer(graph, node.output[0])
        quantize = graph.producer.get(node.input[0])
        if weight is None or quantize is None or quantize.op_type != "QuantizeLinear" or dequantizer(graph, weight):
            continue
        q_params, dq_params = list(quantize.input[1:3]), list(node.input[1:3])
        if len(q_params) != 2 or len(dq_params) != 2 or not all(q_params + dq_params) \
                or attrs(quantize).get("block_size", 0) or attrs(node).get("block_size", 0):  # fmt: skip
            continue
        found = [graph.const(p) for p in q_params + dq_params]
        values = [v for v in found if v is not None]
        if len(values) != 4 or values[1].dtype.kind not in "iu":
            continue
        same_axis = values[0].size == 1 or attrs(quantize).get("axis", 1) == attrs(node).get("axis", 1)
        if same_axis and np.array_equal(values[0], values[2]) and np.array_equal(values[1], values[3]):
            out[weight] = (quantize, node)
    return out


def fake_quantized_value(graph: ModelGraph, name: str, nodes: tuple[onnx.NodeProto, onnx.NodeProto]) -> np.ndarray:
    """What the layer reads of a fake-quantized weight: ``(clip(round(W / scale) + zero) - zero) * scale``."""
    quantize, dequantize = nodes
    value = np.asarray(graph.const(name), dtype=np.float64)
    scale, zero = quantization_grid(graph, dequantize, value.ndim)
    info = np.iinfo(np.asarray(graph.const(quantize.input[2])).dtype)
    ints = np.clip(np.round(value / scale) + zero, info.min, info.max)
    return ((ints - zero) * scale).astype(np.asarray(graph.const(name)).dtype)


def without_activation_quantization(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """`model` with every run-time ``QuantizeLinear -> DequantizeLinear`` pair (per-tensor activation
    quantization) replaced by a Clip to the range it represents, ``[(qmin - zero) scale, (qmax - zero) scale]``:
    the saturation stays (a quantizer with zero point 0 is the ReLU onnxruntime's quantizer folded into it), the
    rounding goes; None when there is no such pair.

    What the certificate compares for a QDQ model: masked original and pruned model differ in float32 round-off,
    and an activation quantizer turns a round-off at a rounding boundary into a whole step (ResNet-18 quantized by
    onnxruntime, pruned exactly: up to 6% relative in the outputs at 224x224); without the rounding the round-off
    stays round-off. Quantized weights (constant DequantizeLinear) and fake-quantized ones stay as they are.
    """
    graph = ModelGraph(model)
    ranges: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}  # DequantizeLinear output -> (input, low, high)
    for node in graph.nodes:
        quantize = graph.producer.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        if quantize is None or quantize.op_type != "QuantizeLinear" or len(quantize.input) < 2:
            continue
        source = quantize.input[0]
        if graph.const(source) is not None or (graph.producer.get(source) is None and source not in graph.graph_inputs):
            continue  # a constant: a fake-quantized weight
        scale = graph.const(quantize.input[1])
        zero = graph.const(quantize.input[2]) if len(quantize.input) > 2 and quantize.input[2] else None
        if scale is None or scale.size != 1 or (zero is not None and zero.size != 1) or "output_dtype" in attrs(quantize):
            continue  # per-axis activations, a computed scale, an explicit output type: left as they are
        info = np.iinfo(zero.dtype if zero is not None else np.uint8)
        z, step = float(zero.reshape(-1)[0]) if zero is not None else 0.0, float(scale.reshape(-1)[0])
        ranges[node.output[0]] = (source, np.array((info.min - z) * step, scale.dtype),  # the input's float type
                                  np.array((info.max - z) * step, scale.dtype))
    if not ranges:
        return None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in ranges:
            source, low, high = ranges[node.output[0]]
            bounds = [f"{node.output[0]}__low", f"{node.output[0]}__high"]
            out.graph.initializer.extend(numpy_helper.from_array(v, n) for v, n in zip((low, high), bounds))
            nodes.append(onnx.helper.make_node("Clip", [source, *bounds], [node.output[0]]))
        else:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)  # the QuantizeLinear nodes stay, unread unless something else reads them
    return out


def is_parameter(graph: ModelGraph, name: str) -> bool:
    """A float initializer, or integers dequantized into a weight or bias: what parameter counts count (shape
    constants, indices and zero points do not)."""
    t = graph.initializers.get(name)
    return t is not None and (t.data_type in _FLOAT_TYPES or dequantizer(graph, name) is not None)


def quantized_initializers(graph: ModelGraph) -> list[str]:
    """Integer initializers that are dequantized weights or biases (counted as parameters)."""
    return [name for name in graph.initializers if dequantizer(graph, name) is not None]


def _along_axis(node: onnx.NodeProto, value: np.ndarray, rank: int) -> np.ndarray:
    """A per-tensor or per-axis scale / zero point shaped to broadcast against the rank-`rank` data."""
    value = np.asarray(value)
    if value.ndim == 0 or value.size == 1:
        return value.reshape(())
    axis = int(attrs(node).get("axis", 1)) % rank
    shape = [1] * rank
    shape[axis] = value.shape[0]
    return value.reshape(shape)


def effective_value(graph: ModelGraph, name: str) -> np.ndarray | None:
    """The value a parameter stands for: ``(W_q - zero_point) * scale`` (float32) for a quantized one, the
    initializer itself otherwise (None for run-time tensors)."""
    node = dequantizer(graph, name)
    value = graph.const(name)
    if node is None or value is None:
        return value
    scale, zero = quantization_grid(graph, node, value.ndim)
    return ((value.astype(np.float64) - zero) * scale).astype(np.float32)


def quantization_grid(graph: ModelGraph, node: onnx.NodeProto, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The scale and zero point of a DequantizeLinear `node` (float64), shaped to broadcast against its
    rank-`rank` data."""
    scale = _along_axis(node, graph.initializer_value(node.input[1]), rank).astype(np.float64)
    zero = np.zeros((), np.float64)
    if len(node.input) > 2 and node.input[2]:
        zero = _along_axis(node, graph.initializer_value(node.input[2]), rank).astype(np.float64)
    return scale, zero


def zero_point_fill(graph: ModelGraph, name: str) -> np.ndarray | None:
    """For a quantized parameter: its zero point broadcast to its shape and dtype (what a silenced position
    holds so that it dequantizes to 0); None for anything else."""
    node = dequantizer(graph, name)
    value = graph.const(name)
    if node is None or value is None:
        return None
    if len(node.input) > 2 and node.input[2]:
        zero = _along_axis(node, graph.initializer_value(node.input[2]), value.ndim)
    else:
        zero = np.zeros((), value.dtype)
    return np.broadcast_to(zero.astype(value.dtype), value.shape)


def check_float_weights(graph: ModelGraph, params: Iterable[str], what: list[str]) -> None:
    """Refuse, in one line, options that need float weights when the parameters to prune hold quantized ones.

    Args:
        graph: the model's graph.
        params: the parameters the channel groups slice (``ChannelSlice.tensor`` of their param members).
        what: the options in use that read or write float weights (``--repair seq``, ...); empty: nothing to check.

    Raises:
        UsageError: some of `params` are quantized (QDQ) and `what` is not empty.
    """
    if what:
        _refuse({name for name in params if is_quantized_weight(graph, name)}, what)


def check_no_quantized_weights(graph: ModelGraph, what: str) -> None:
    """Refuse, in one line, a whole-model mode (`what`: ``--mode unconstrained``, ``--sparsity``) that reads and
    writes plain float weights only, on a model with quantized ones: it would leave them untouched without a
    word."""
    _refuse({name for name in graph.initializers if is_quantized_weight(graph, name)}, [what])


def _refuse(quantized: set[str], what: list[str]) -> None:
    if quantized:
        raise UsageError(
            f"{len(quantized)} parameters are quantized (QDQ: read through DequantizeLinear) and {', '.join(what)} "
            "reads float weights at the layers: prune the quantized model with --calib (statistics on the dequantized "
            "weights) or a weight criterion (l1, l2, fpgm, lamp, random), or prune the float model and quantize it after"
        )


_FLOAT_TYPES = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
)
