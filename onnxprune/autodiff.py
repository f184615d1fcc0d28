"""Reverse-mode gradients of an ONNX graph, written as more ONNX nodes so onnxruntime runs them.

Start reading at `append_backward` (the op rules live in `onnxprune.gradients`). Given a model whose tensors all have static shapes (fix the batch first)
and *seeds* (forward tensor -> the name of a tensor holding d loss / d that tensor, computed by nodes the
caller added), it appends the nodes of the backward pass to the graph and returns the name of
d loss / d input. Only the nodes on a path from the input to a seed are differentiated, so an op that sits
after the last seed (a classifier head, a decoder) never needs a rule.

Each supported op has a rule in `RULES` that turns the output gradient(s) into input gradients with standard
ONNX ops: a Conv's input gradient is a ConvTranspose with the same weight, strides, pads, dilations and group;
inference BatchNorm multiplies by ``scale / sqrt(var + eps)``; Relu / Clip / LeakyRelu / HardSigmoid mask with
``Where``; broadcasting binary ops reduce their gradient back to the operand's shape; AveragePool is a
depthwise ConvTranspose with a ``1/count`` kernel, MaxPool scatters through its ``Indices`` output; a
strided Slice scatters through a constant index map, a unit-step Slice pads, a Pad slices; Gemm and MatMul
multiply by the transposed other operand. Gradients reaching one tensor from several consumers are summed.

Why ONNX and not numpy: the backward graph runs in onnxruntime's kernels (im2col + BLAS, threaded), about as
fast as the forward pass; a numpy im2col backward of a CIFAR ResNet20 batch was ~6x slower. torch stays a
test-only dependency (tests compare these gradients with torch autograd and finite differences).

An op without a rule on the path stops the build with `UnsupportedModelError` naming the op and node.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune import gradients_attention, gradients_upsample  # noqa: F401  (register Attention, Resize, ConvTranspose)
from onnxprune.errors import UnsupportedModelError
from onnxprune.gradients import RULES, Context, Emitter, Rule
from onnxprune.onnx_utils import opset_of

__all__ = ["MIN_OPSET", "append_backward", "backward", "differentiated_nodes", "float_tensor_names", "static_shapes"]

#: ScatterElements, Clip's min/max inputs and Pad's pads input need opset 11.
MIN_OPSET = 11
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


# ---------------------------------------------------------------------------------------------------
def differentiated_nodes(graph: onnx.GraphProto, wrt: str | Collection[str], targets: set[str],
                         float_tensors: set[str]) -> tuple[list[onnx.NodeProto], set[str]]:
    """The nodes on a path from `wrt` (one tensor or several) to any of `targets` (graph order), and the
    active (`wrt`-dependent, floating-point) tensors."""
    active = {wrt} if isinstance(wrt, str) else set(wrt)
    for node in graph.node:
        if any(i in active for i in node.input):
            active.update(o for o in node.output if o in float_tensors)
    needed = set(targets)
    path: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output) and any(i in active for i in node.input):
            path.append(node)
            needed.update(i for i in node.input if i in active)
    return path[::-1], active


def append_backward(model: onnx.ModelProto, wrt: str, seeds: dict[str, str], em: Emitter,
                    shapes: dict[str, tuple[int, ...]], float_tensors: set[str]) -> str:
    """Append to `model` the nodes computing d loss / d `wrt`, given the gradient of every seed tensor.

    Args:
        model: the forward graph plus the nodes producing the seeds' gradients; static shapes in `shapes`.
        wrt: the input to differentiate with respect to.
        seeds: forward tensor -> name of the tensor holding d loss / d it.
        em: the emitter (holds the graph and opset); `float_tensors`: names of floating-point tensors.

    Returns:
        The name of the gradient tensor of `wrt` (a zero constant when no seed depends on it).

    Raises:
        UnsupportedModelError: a node on the path has an op without a rule (one line naming op and node).
    """
    result = backward(model, [wrt], seeds, em, shapes, float_tensors)[wrt]
    if result is None:
        return em.op("ConstantOfShape", [em.const(list(shapes[wrt]), "shape", np.int64)],
                     value=numpy_helper.from_array(np.zeros(1, np.float32)))
    return result


def backward(model: onnx.ModelProto, sources: Collection[str], seeds: dict[str, str], em: Emitter,
             shapes: dict[str, tuple[int, ...]], float_tensors: set[str],
             rules: Mapping[str, Rule] | None = None) -> dict[str, str | None]:
    """Append the nodes computing d loss / d each of `sources` (inputs or parameters); the engine of
    `append_backward`. `rules` override `RULES` per op type (`onnxprune.param_gradients` passes rules that
    also differentiate weights). Returns source -> gradient tensor name (None: no seed depends on it)."""
    g = model.graph
    opset = opset_of(model)
    if opset < MIN_OPSET:
        raise UnsupportedModelError(f"synthetic calibration needs opset >= {MIN_OPSET} (model: {opset})")
    table = {**RULES, **(rules or {})}
    path, active = differentiated_nodes(g, sources, set(seeds), float_tensors)
    for node in path:
        if node.domain not in ("", "ai.onnx") or node.op_type not in table:
            raise UnsupportedModelError(f"synthetic calibration: no gradient for {node.op_type} (node {node.name!r}); "
                                        f"supported: {', '.join(sorted(table))}")
    constants = {t.name: t for t in g.initializer}
    cx = Context(shapes, constants, active, opset)
    grads: dict[str, list[str]] = {k: [v] for k, v in seeds.items()}

    def total(name: str) -> str | None:
        parts = grads.get(name)
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else em.op("Sum", parts)

    for node in reversed(path):
        gys = [total(o) for o in node.output]
        if all(gy is None for gy in gys):
            continue
        if gys[0] is None:  # a rule differentiates through output 0 (others: indices, masks)
            continue
        for i, gi in table[node.op_type](em, cx, node, gys).items():
            if node.input[i] in active:
                grads.setdefault(node.input[i], []).append(gi)
    return {s: total(s) for s in sources}


def float_tensor_names(model: onnx.ModelProto) -> set[str]:
    """Names of the floating-point tensors of the main graph (inputs, value_info, outputs, initializers)."""
    g = model.graph
    names = {vi.name for vi in [*g.input, *g.value_info, *g.output] if vi.type.tensor_type.elem_type in _FLOATS}
    names.update(t.name for t in g.initializer if t.data_type in _FLOATS)
    return names


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every tensor of the main graph whose shape is fully static (value_info after shape inference, initializers)."""
    g = model.graph
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(int(d.dim_value) for d in dims)
    for t in g.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
    return shapes
