"""The ONNX objective of synthetic calibration: BatchNorm-statistics loss and its input gradient in one model.

Start reading at `build_objective`. It copies the model, fixes the input to ``[batch, *dims]`` (dims may be a
lower resolution than the model's own for fully convolutional nets, see `onnxprune.synthetic`), and appends:

* at every inference BatchNormalization whose input depends on the model input (a *tap*), the loss
  ``w_l * (||mean_batch - running_mean||_2 + ||var_batch - running_var||_2)`` and its analytic gradient
  (`_emit_bn_loss`); `w_l` is `first_weight` for the first tap and 1 for the others (DeepInversion weighs the
  first BN layer more: it is the one that sees colour and edge statistics);
* optionally a cross-entropy toward one-hot targets fed as the input ``TARGETS`` (`_emit_class_loss`);
* the backward pass of the forward graph (`autodiff.append_backward`), seeded by those gradients,

so one onnxruntime run returns (loss, d loss / d input). Only ops between the input and the last tap (or the
logits) need a gradient rule; an op without one raises `UnsupportedModelError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxprune.autodiff import append_backward, differentiated_nodes, float_tensor_names, static_shapes
from onnxprune.canonical import remove_dead_code
from onnxprune.errors import DataError, UnsupportedModelError
from onnxprune.external import tensor_array
from onnxprune.gradients import Emitter
from onnxprune.graph import ModelGraph
from onnxprune.importer import canonicalize, fix_input_shapes
from onnxprune.metrics import count_macs
from onnxprune.onnx_utils import opset_of, softmax_logits
from onnxprune.shape_inference import infer_shapes
from onnxprune.synthetic_plan import forward_cost, step_seconds
from onnxprune.verify import session

__all__ = ["TARGETS", "Objective", "build_objective", "model_input"]

TARGETS = "synthetic/targets"


@dataclass
class Objective:
    """An onnxruntime session returning (loss, d loss / d input) for one batch, and what it was built for."""

    session: object
    input_name: str
    shape: tuple[int, ...]  # with the batch
    taps: int
    macs: int  # one forward pass of the batch
    classes: int = 0
    step_seconds: float = 0.0  # modelled seconds of one step per sample (`onnxprune.synthetic_plan`)
    activations: int = 0  # forward activation elements per sample
    positions: int = 0  # > 0: TARGETS are [batch, positions, classes] (a sequence output), else [batch, classes]


def model_input(model: onnx.ModelProto) -> tuple[onnx.ValueInfoProto, tuple[int, ...]]:
    inits = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    if len(inputs) != 1:
        raise UnsupportedModelError(f"synthetic calibration supports models with one input (this one has {len(inputs)}: "
                                    f"{', '.join(vi.name for vi in inputs)})")
    vi = inputs[0]
    if vi.type.tensor_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        raise UnsupportedModelError(f"synthetic calibration: input {vi.name!r} is not floating point "
                                    "(token ids cannot be optimised by gradient)")
    dims = []
    for i, d in enumerate(vi.type.tensor_type.shape.dim):
        if i and not (d.HasField("dim_value") and d.dim_value > 0):
            raise DataError(f"synthetic calibration: input {vi.name!r} has a dynamic size on axis {i}; "
                            f"fix it with --shape {vi.name}=...")
        dims.append(d.dim_value if d.HasField("dim_value") else 0)
    return vi, tuple(dims[1:])


def _bn_taps(model: onnx.ModelProto, name: str, floats: set[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(BN input, running mean, running var) of every inference BN whose input depends on the model input."""
    inits = {t.name: t for t in model.graph.initializer}
    _, active = differentiated_nodes(model.graph, name, set(), floats)
    taps = []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or node.input[0] not in active:
            continue
        if node.input[3] in inits and node.input[4] in inits:
            taps.append((node.input[0], tensor_array(inits[node.input[3]]), tensor_array(inits[node.input[4]])))
    return taps


def _emit_bn_loss(em: Emitter, x: str, shape: tuple[int, ...], mean: np.ndarray, var: np.ndarray,
                  weight: float = 1.0) -> tuple[str, str]:
    """Nodes computing ``weight * (||mean_b - mean|| + ||var_b - var||)`` at `x` and its gradient (analytic)."""
    rank = len(shape)
    axes = [0, *range(2, rank)]
    count = float(np.prod([shape[i] for i in axes]))
    stat_shape = (1, -1) + (1,) * (rank - 2)
    # two passes over x (mean, mean square about the running mean: no cancellation when |mean| >> std) and two
    # for the gradient: the activations are the largest tensors of a step (EfficientNet-Lite0: 6 passes -> 4)
    shift = em.const(mean.astype(np.float32).reshape(stat_shape), "target")
    mu = em.reduce("ReduceMean", x, axes)
    centred = em.op("Sub", [mu, shift])  # mean_b - running_mean
    var_b = em.op("Sub", [em.scale(em.reduce("ReduceSumSquare", em.op("Sub", [x, shift]), axes), 1.0 / count),
                          em.mul(centred, centred)])
    parts, grads = [], []
    for err in (centred, em.op("Sub", [var_b, em.const(var.astype(np.float32).reshape(stat_shape), "target")])):
        norm = em.op("Sqrt", [em.op("Add", [em.reduce("ReduceSum", em.mul(err, err), list(range(rank)), False),
                                            em.const(1e-12)])])
        parts.append(norm)
        grads.append(em.op("Div", [err, norm]))
    # d||mu - m||/dx = g_mu / count (every element moves the mean); d var_b/dx = 2 (x - mu) / count: together
    # a per-channel affine map of x, a * x + b with a = 2 g_var / count and b = g_mu / count - a * mu
    a = em.scale(grads[1], 2.0 * weight / count)
    b = em.op("Sub", [em.scale(grads[0], weight / count), em.mul(a, mu)])
    gx = em.op("Add", [em.mul(x, a), b])
    loss = em.op("Add", parts)
    return (em.scale(loss, weight) if weight != 1.0 else loss), gx


def _classifier_output(m: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                       batch: int) -> tuple[str, tuple[int, ...]] | None:
    """The model's logits and their shape without the batch, else None: its first output when shaped
    [batch, classes], or the input of a last-axis Softmax making a [batch, positions, classes] output
    (sequence recognisers, e.g. CTC text lines: one target class per position)."""
    out = m.graph.output[0].name
    shape = shapes.get(out)
    if shape is None or shape[0] != batch or shape[-1] < 2:
        return None
    if len(shape) == 2:
        return out, shape[1:]
    logits = softmax_logits(m, out, 3) if len(shape) == 3 else None
    if logits is not None and logits in shapes:
        return logits, shape[1:]
    return None


def _emit_class_loss(em: Emitter, logits: str, batch: int, weight: float) -> tuple[str, str]:
    """Cross-entropy toward the one-hot TARGETS input (summed over positions), and its gradient
    ``(softmax - targets) / batch``."""
    p = em.op("Softmax", [logits], axis=-1)
    loss = em.scale(em.op("ReduceSum", [em.mul(em.op("Log", [em.op("Add", [p, em.const(1e-12)])]), TARGETS)],
                          keepdims=0), -weight / batch)
    return loss, em.scale(em.op("Sub", [p, TARGETS]), weight / batch)


def build_objective(model: onnx.ModelProto, batch: int, class_weight: float = 0.0, first_weight: float = 1.0,
                    dims: tuple[int, ...] | None = None, threads: int | None = None) -> Objective | None:
    """The ONNX model returning (BN statistics loss, d loss / d input) for a batch; None without BN taps.

    Args:
        model: the model as loaded.
        batch: samples per run.
        class_weight: > 0 adds the cross-entropy toward one-hot ``TARGETS`` (classifier outputs only).
        first_weight: weight of the first tap's statistics loss (the others weigh 1).
        dims: the input sizes without the batch (default: the model's own; smaller spatial sizes for
            low-resolution generation).
        threads: onnxruntime intra-op threads (None: its default).
    """
    vi, own = model_input(model)
    dims = dims or own
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for graph_input in m.graph.input:  # the batch axis is ours, even when --shape fixed it (to 1, usually)
        if graph_input.name == vi.name:  # ... and so are the spatial sizes of low-resolution generation
            for axis in range(len(dims) + 1 if dims != own else 1):
                graph_input.type.tensor_type.shape.dim[axis].Clear()
    fix_input_shapes(m, {vi.name: [batch, *dims]})
    for graph_output in m.graph.output:  # declared outputs keep a symbolic batch: let inference fill them
        graph_output.type.tensor_type.ClearField("shape")
    m, _ = canonicalize(m, inplace=True)  # sizes computed from Shape (dynamo's reshapes) fold at this batch
    m = infer_shapes(m, symbolic=False)
    macs = count_macs(ModelGraph(m))  # the forward pass at this batch, before the backward nodes join
    floats = float_tensor_names(m)
    shapes = static_shapes(m)
    taps = _bn_taps(m, vi.name, floats)
    if not taps:
        return None
    em = Emitter(m.graph, opset_of(m), prefix="synthetic")
    losses: list[str] = []
    seeds: dict[str, str] = {}
    for i, (x, mean, var) in enumerate(taps):
        if x not in shapes:
            raise UnsupportedModelError(f"synthetic calibration: BatchNormalization input {x!r} has no static shape")
        loss, gx = _emit_bn_loss(em, x, shapes[x], mean, var, first_weight if i == 0 else 1.0)
        losses.append(loss)
        seeds[x] = gx if x not in seeds else em.op("Add", [seeds[x], gx])
    classes = positions = 0
    head = _classifier_output(m, shapes, batch) if class_weight else None
    if head is not None:
        logits, rest = head
        classes, positions = rest[-1], (rest[0] if len(rest) == 2 else 0)
        m.graph.input.append(helper.make_tensor_value_info(TARGETS, onnx.TensorProto.FLOAT, [batch, *rest]))
        loss, gl = _emit_class_loss(em, logits, batch, class_weight)
        losses.append(loss)
        seeds[logits] = gl if logits not in seeds else em.op("Add", [seeds[logits], gl])
    path, _ = differentiated_nodes(m.graph, vi.name, set(seeds), floats)
    dense, layer, other = forward_cost(path, shapes)  # before the backward nodes join
    grad = append_backward(m, vi.name, seeds, em, shapes, floats)
    total = losses[0] if len(losses) == 1 else em.op("Sum", losses)
    del m.graph.output[:]
    m.graph.output.extend([helper.make_tensor_value_info(total, onnx.TensorProto.FLOAT, []),
                           helper.make_tensor_value_info(grad, onnx.TensorProto.FLOAT, [batch, *dims])])
    del m.graph.value_info[:]
    remove_dead_code(m.graph)
    # no memory pattern: `synthetic` runs batches in two threads at once, which then share the arena's freed blocks
    # (EfficientNet-Lite0, batch 5, two at once: peak 1.40 GB against 2.19 with the pattern; one at a time 0.78
    # against 1.17, as fast within 8%)
    sess = session(m, optimize=True, threads=threads, mem_pattern=False)
    return Objective(sess, vi.name, (batch, *dims), len(taps), macs, classes,
                     step_seconds(dense / batch, layer / batch, other / batch), (layer + other) // batch, positions)
