"""Step 3 of UPSCALE: the oracle an export must equal, and the calibrated mean repair.

Start reading at `silenced_positions`: the one description of what a plan silences (every parameter
outside its piece's kept set: zero, or 1 for variances and divisors, `rewrite.silence`). `mask_model` (the
oracle), `masked_arrays` (the export's parameters before they are taken) and `mean_repair` (which measures
the masked model) all silence through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.channels import DimRef
from onnxprune.errors import UsageError
from onnxprune.graph import ModelGraph
from onnxprune.rewrite import silence
from onnxprune.upscale.records import UnconstrainedPlan
from onnxprune.verify import session


@dataclass(frozen=True, eq=False)
class Silenced:
    """The positions a plan silences in one parameter, and the parameter's role (which sets the fill)."""

    cuts: list[tuple[int, np.ndarray]]  # (axis, positions)
    role: str | None

    def apply(self, array: np.ndarray) -> np.ndarray:
        """A silenced copy of `array`."""
        return silence(array, self.cuts, self.role)


def silenced_positions(plan: UnconstrainedPlan) -> dict[str, Silenced]:
    """Parameter name -> what the plan silences in it: positions outside its piece's kept set (units) or
    outside the stream (other pieces)."""
    roles = plan.analysis.roles
    cuts: dict[str, list[tuple[int, np.ndarray]]] = {}
    for gp in plan.groups:
        for m in gp.group.param_members:
            keep = gp.mask_set(DimRef(m.tensor, m.axis))
            positions = m.positions[~keep[m.channel_of]]
            if len(positions):
                cuts.setdefault(m.tensor, []).append((m.axis, positions))
    return {name: Silenced(c, roles.get(name)) for name, c in cuts.items()}


def masked_arrays(plan: UnconstrainedPlan) -> dict[str, np.ndarray]:
    """The silenced values of every floating-point parameter the plan touches (the plan's own values)."""
    graph = plan.analysis.graph
    arrays: dict[str, np.ndarray] = {}
    for name, silenced in silenced_positions(plan).items():
        array = graph.initializer_value(name)
        if array.dtype.kind == "f":
            arrays[name] = silenced.apply(array)
    return arrays


def mask_model(model: onnx.ModelProto, plan: UnconstrainedPlan) -> onnx.ModelProto:
    """The oracle: `model` (the original) with every layer's own mask applied to its parameters."""
    arrays = masked_arrays(plan)
    own = plan.analysis.graph.initializers  # the plan's own values (a repaired model's, after `mean_repair`)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, t in enumerate(out.graph.initializer):
        if t.name in arrays:
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(arrays[t.name], t.name))
        elif t.name in own:
            out.graph.initializer[i].CopyFrom(own[t.name])
    return out


def mean_repair(model: onnx.ModelProto, plan: UnconstrainedPlan, calib: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Calibrated mean repair, for constrained (share=1) and unconstrained plans alike.

    Silencing channels shifts the mean of every later Conv/Gemm output: a consumer loses the inputs it
    dropped, and in an unconstrained plan a stream channel it still reads has lost the contribution of
    each writer that dropped it. Walking the Conv/Gemm nodes in graph order, the mean (over batch and
    space) of each node's output in the masked model is compared with the original's on `calib`, and
    the difference is added to that node's bias (or subtracted from the running mean of the
    BatchNormalization it feeds). Returns the original model with those values changed; masking it with
    the same kept sets (`build_plan(..., keeps)`) gives the oracle the export must equal.
    """
    graph = ModelGraph(model)
    targets = [n for n in graph.nodes if n.op_type in ("Conv", "Gemm") and graph.is_initializer(n.input[1])]
    if not targets:
        return model
    names = [n.output[0] for n in targets]
    reference = _channel_means(model, names, calib)
    values = {t.name: graph.initializer_value(t.name).copy() for t in model.graph.initializer}
    silenced = silenced_positions(plan)

    def masked() -> onnx.ModelProto:
        out = _clone(model)
        for i, t in enumerate(out.graph.initializer):
            array = values[t.name]
            if t.name in silenced and array.dtype.kind == "f":
                array = silenced[t.name].apply(array)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, t.name))
        return out

    for node, name in zip(targets, names):
        delta = reference[name] - _channel_means(masked(), [name], calib)[name]
        uses = graph.consumers.get(name, [])
        if len(node.input) > 2 and node.input[2] and values[node.input[2]].shape == delta.shape:
            values[node.input[2]] = (values[node.input[2]] + delta).astype(values[node.input[2]].dtype)
        elif len(uses) == 1 and uses[0].node.op_type == "BatchNormalization" and uses[0].index == 0:
            mean = uses[0].node.input[3]
            if values[mean].shape == delta.shape:
                values[mean] = (values[mean] - delta).astype(values[mean].dtype)
    repaired = _clone(model)
    for i, t in enumerate(repaired.graph.initializer):
        repaired.graph.initializer[i].CopyFrom(numpy_helper.from_array(values[t.name], t.name))
    return repaired


def _channel_means(model: onnx.ModelProto, wanted: list[str], calib: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) means of the `wanted` tensors over `calib`, batch and space (no optimisations)."""
    probe = _clone(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in wanted if t not in have)
    sess = session(probe)
    feeds = {i.name: calib[i.name] for i in sess.get_inputs()}
    n = min(len(v) for v in feeds.values())
    batch = min((i.shape[0] for i in sess.get_inputs() if i.shape and isinstance(i.shape[0], int)), default=n)
    if n < batch:
        raise UsageError(f"mean repair needs at least {batch} calibration samples (the model's batch), got {n}")
    sums: dict[str, np.ndarray] = {}
    for start in range(0, n - n % batch, batch):  # a static batch dim: in chunks
        outs = sess.run(wanted, {k: v[start : start + batch] for k, v in feeds.items()})
        for t, v in zip(wanted, outs):
            m = v.astype(np.float64).mean(axis=tuple(a for a in range(v.ndim) if a != 1))
            sums[t] = sums.get(t, 0) + m
    chunks = max(1, n // batch)
    return {t: v / chunks for t, v in sums.items()}


def _clone(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
