"""Repairing quantized (QDQ) weights: refit them as floats, then quantize them again on their own grid.

The sequential repair (`repair.repair_sequential`, and `repair_relu.refit_relu` after it) reads and writes float
initializers at the layers. For a QDQ model, `float_view` replaces every constant DequantizeLinear of a weight or
bias by a float initializer holding its dequantized value *under the integer tensor's own name*, so the selection's
positions carry over (`repair.reanalyze`); the repair runs on that view; `requantize` writes the repaired values
back as integers behind the same DequantizeLinear nodes, ``clip(round(w / scale) + zero_point)`` with the model's
own scales and zero points, and the model is QDQ again, with its structure unchanged. A bias the repair adds to a
layer that had none stays a float input (onnxruntime then runs that layer unfused).

Rounding to the existing grid is the quantization the model already had; a channel whose repaired values no
longer fit gets a scale just large enough (its bias's scale follows), and anything still outside is clipped and
counted (`RequantizeReport`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.graph import ModelGraph, Use, attrs
from onnxprune.quantized import (
    dequantizer,
    effective_value,
    fake_quantized_value,
    fake_quantized_weights,
    quantization_grid,
    quantized_initializers,
)
from onnxprune.rules.facts import linear_axes

__all__ = ["RequantizeReport", "float_view", "requantize"]


@dataclass
class RequantizeReport:
    """What `requantize` did: tensors written back as integers, values clipped to their type's range."""

    tensors: int = 0
    values: int = 0
    clipped: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"tensors": self.tensors, "values": self.values, "clipped": self.clipped}


def float_view(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.NodeProto]]:
    """A copy of `model` whose quantized weights and biases are float initializers under their integer names,
    read directly by their layers; and the removed DequantizeLinear nodes by that name (for `requantize`).
    A fake-quantized float weight, ``DequantizeLinear(QuantizeLinear(W))``, is read as its rounded value under
    W's name, both nodes removed (the DequantizeLinear is what `removed` names). A model without quantized
    weights comes back as it is, with nothing removed."""
    graph = ModelGraph(model)
    outputs = {o.name for o in model.graph.output}
    removed: dict[str, onnx.NodeProto] = {}
    values: dict[str, np.ndarray] = {}
    for name in quantized_initializers(graph):
        node = dequantizer(graph, name)
        value = effective_value(graph, name)
        if node is None or value is None or node.output[0] in outputs:
            continue
        removed[name] = node
        values[name] = value
    quantizers = set()
    for name, (quantize, node) in fake_quantized_weights(graph).items():
        if node.output[0] not in outputs and quantize.output[0] not in outputs:
            removed[name] = node
            values[name] = fake_quantized_value(graph, name, (quantize, node))
            quantizers.add(quantize.output[0])
    if not removed:
        return model, removed  # nothing quantized: the model itself (no copy, no new analysis)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rename = {node.output[0]: name for name, node in removed.items()}
    kept = [n for n in out.graph.node if not (n.op_type == "DequantizeLinear" and n.output[0] in rename)
            and not (n.op_type == "QuantizeLinear" and n.output[0] in quantizers)]
    for n in kept:
        n.input[:] = [rename.get(i, i) for i in n.input]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    for t in out.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(values[t.name], t.name))
    return out, removed


def requantize(
    model: onnx.ModelProto, removed: dict[str, onnx.NodeProto], original: onnx.ModelProto
) -> tuple[onnx.ModelProto, RequantizeReport]:
    """`model` (a repaired `float_view`) with every weight `float_view` dequantized written back as integers of
    its original type on its original zero point and scale (read from `original`), behind its DequantizeLinear.

    Where a repaired weight no longer fits its channel's range, that channel's scale grows just enough (and so
    does the scale of the layer's quantized bias, which onnxruntime wants to equal input scale x weight scale
    to fuse an integer kernel); what still falls outside (nothing, barring a zero point at the range's end) is
    clipped and counted."""
    source = ModelGraph(original)
    view = ModelGraph(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    report = RequantizeReport()
    present = {t.name for t in out.graph.initializer}
    for node in removed.values():  # the scales and zero points, should the repair have dropped them unused
        quantize = source.producer.get(node.input[0])
        for param in [*node.input[1:], *(quantize.input[1:] if quantize is not None else ())]:
            if param and param not in present:
                out.graph.initializer.append(source.initializers[param])
                present.add(param)
    inits = {t.name: t for t in out.graph.initializer}
    growth: dict[str, np.ndarray] = {}  # layer -> per-output-channel (or scalar) factor its weight's scale grew by
    uses: dict[str, Use | None] = {}
    for name in removed:
        readers = view.consumers.get(name, [])
        uses[name] = readers[0] if len(readers) == 1 else None
    biases = {n for n, use in uses.items() if use is not None and use.index == 2}
    restored: list[onnx.NodeProto] = []
    for name in sorted(removed, key=lambda n: n in biases):  # weights first: a bias's scale follows its weight's
        node, use = removed[name], uses[name]
        if name not in inits:
            continue
        value = numpy_helper.to_array(inits[name]).astype(np.float64)
        dtype = numpy_helper.to_array(source.initializers[name]).dtype
        quantize = source.producer.get(node.input[0]) if dtype.kind == "f" else None  # fake-quantized float W
        info = np.iinfo(dtype if quantize is None else source.initializer_value(quantize.input[2]).dtype)
        scale, zero = quantization_grid(source, node, value.ndim)
        factor = np.ones(())
        if use is not None and use.index == 2 and use.node.name in growth:
            factor = growth[use.node.name].reshape(-1) if growth[use.node.name].ndim else growth[use.node.name]
        elif use is not None and use.index == 1 and value.ndim:  # a weight (a scalar constant is no layer's)
            factor = _growth(value, scale, zero, info)
            out_axis = (linear_axes(use.node, view) or (None, None))[1]
            axis = int(attrs(node).get("axis", 1)) % value.ndim
            if factor.ndim == 0 or axis == out_axis:
                growth[use.node.name] = factor.reshape(-1) if factor.ndim else factor
        if np.any(factor != 1):
            scale = scale * (factor.reshape(scale.shape) if factor.size == scale.size else factor.max())
            stored = source.initializer_value(node.input[1])
            for param in {node.input[1], *(quantize.input[1:2] if quantize is not None else ())}:
                inits[param].CopyFrom(numpy_helper.from_array(scale.reshape(stored.shape).astype(stored.dtype), param))
        ints = np.round(value / scale) + zero
        clipped = int(((ints < info.min) | (ints > info.max)).sum())
        if quantize is None:
            inits[name].CopyFrom(numpy_helper.from_array(np.clip(ints, info.min, info.max).astype(dtype), name))
        else:  # the float weight itself, behind its QuantizeLinear again (it rounds at run time); untouched: as it was
            same = np.array_equal(value.astype(dtype), fake_quantized_value(source, name, (quantize, node)))
            inits[name].CopyFrom(source.initializers[name] if same and not np.any(factor != 1)
                                 else numpy_helper.from_array(value.astype(dtype), name))
            restored.append(quantize)
        restored.append(node)
        report.tensors += 1
        report.values += int(value.size)
        report.clipped += clipped
    back = {name: node.output[0] for name, node in removed.items()}
    nodes = list(out.graph.node)
    for n in nodes:
        n.input[:] = [back.get(i, i) for i in n.input]
    del out.graph.node[:]
    out.graph.node.extend([*restored, *nodes])
    return out, report


def _growth(value: np.ndarray, scale: np.ndarray, zero: np.ndarray, info: np.iinfo) -> np.ndarray:
    """By how much each channel's scale (the axis where `scale` is not 1, or the whole tensor) must grow, >= 1,
    for `value` to fit between the type's ends around the zero point."""
    top, bottom = info.max - zero, info.min - zero  # positive and negative integer headroom around the zero point
    need = np.maximum(np.where(value > 0, value / np.maximum(top, 1e-12), 0.0),
                      np.where(value < 0, value / np.minimum(bottom, -1e-12), 0.0))  # fmt: skip
    axes = tuple(i for i in range(value.ndim) if scale.ndim == 0 or scale.shape[i] == 1)
    factor = np.maximum(need.max(axis=axes, keepdims=True) / scale, 1.0)
    return factor.reshape(()) if factor.size == 1 and scale.size == 1 else factor
