"""Step 4 of UPSCALE: the pruned model, computing exactly the oracle (`oracle.mask_model`).

Start reading at `export`. Every dim of a pruned group takes the positions of its width (`GroupPlan.width`:
a narrowed unit's own kept set, else the stream) in the group's channel order; parameters are silenced
(`oracle.masked_arrays`) and then taken, and the rules fix every node (`rewrite.apply_takes`). Each boundary
Identity of the split model is then lowered (`_lower_boundaries`): bypassed where both sides take the same
positions, else replaced by the copy `copy_ops` chooses (Slice / Pad when the positions are contiguous and
``contiguous_ops`` allows them, else a Gather or a scatter from `naive`).
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.channels import ChannelSlice, DimRef
from onnxprune.errors import UsageError
from onnxprune.graph import ModelGraph
from onnxprune.ordering import dim_takes
from onnxprune.rewrite import apply_takes
from onnxprune.upscale.boundaries import SplitModel
from onnxprune.upscale.copies import CopyWriter, Ops, pad_copy, slice_copy, source_slots
from onnxprune.upscale.naive import gather_copy, pad_gather_copy, scatter_nd_copy
from onnxprune.upscale.oracle import masked_arrays
from onnxprune.upscale.records import UnconstrainedPlan


def export(plan: UnconstrainedPlan, contiguous_ops: bool = True, scatter: str = "pad_gather") -> onnx.ModelProto:
    """The pruned model: parameters masked and taken, boundaries turned into copies (or bypassed).

    Args:
        contiguous_ops: contiguous ranges become Slice / Pad (the reordered export); else every copy is
            a Gather / scatter (the naive export).
        scatter: how a non-contiguous widening is written: "scatter" (ScatterND into a zero stream) or
            "pad_gather" (Pad one zero channel, then Gather).
    """
    takes = _takes(plan)
    model = apply_takes(plan.analysis.graph, takes, masked_arrays(plan))
    _lower_boundaries(model.graph, plan.analysis.graph, plan.split, takes, contiguous_ops, scatter)
    return model


def _takes(plan: UnconstrainedPlan) -> dict[DimRef, np.ndarray]:
    by_id = {gp.group.id: gp for gp in plan.groups}
    orders = {gp.group.id: gp.order for gp in plan.groups}

    def keeps(gid: int, m: ChannelSlice) -> np.ndarray | None:
        gp = by_id.get(gid)
        return None if gp is None else gp.width(DimRef(m.tensor, m.axis))

    return dim_takes(plan.analysis, orders, keeps)


def _lower_boundaries(g: onnx.GraphProto, graph: ModelGraph, split: SplitModel, takes: dict[DimRef, np.ndarray],
                      contiguous_ops: bool, scatter: str) -> None:  # fmt: skip
    """Replace every boundary Identity of `g` by its copies (or bypass it), renaming its readers' inputs."""
    sources = {n.output[0]: n.input[0] for n in graph.nodes if split.is_boundary(n)}  # the unrenamed input
    writer = CopyWriter(g)
    new_nodes: list[onnx.NodeProto] = []
    rename: dict[str, str] = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        if not split.is_boundary(node):
            new_nodes.append(node)
            continue
        dst = node.output[0]
        src, cur = sources[dst], node.input[0]
        rank = graph.rank(dst) or 0
        for axis in range(rank):
            n = graph.size(dst, axis)
            full = np.arange(n) if isinstance(n, int) else None
            t_in = takes.get(DimRef(src, axis), full)
            t_out = takes.get(DimRef(dst, axis), full)
            if t_in is None or t_out is None or np.array_equal(t_in, t_out):
                continue
            shape = list(graph.shape(dst) or [None] * rank)
            shape[axis] = len(t_out)
            dtype = graph.dtype(dst) or onnx.TensorProto.FLOAT
            ops, cur = copy_ops(writer, cur, shape, axis, t_in, t_out, contiguous_ops, scatter, dtype)
            new_nodes.extend(ops)
        rename[dst] = cur
    for o in g.output:
        if o.name in rename:
            raise UsageError(f"boundary on graph output {o.name}")
    del g.node[:]
    g.node.extend(new_nodes)


def copy_ops(w: CopyWriter, x: str, shape: list, axis: int, t_in: np.ndarray, t_out: np.ndarray,
             contiguous_ops: bool, scatter: str = "pad_gather", dtype: int = onnx.TensorProto.FLOAT) -> Ops:  # fmt: skip
    """Ops turning `x` (positions `t_in` of the original axis) into positions `t_out` (zeros where new).

    `shape` is the output's shape (ints where static).
    """
    idx = source_slots(t_in, t_out)
    k = len(t_in)
    present = idx >= 0
    if present.all():  # narrowing (or reordering)
        if contiguous_ops and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))):
            return slice_copy(w, x, axis, int(idx[0]), int(idx[0] + len(idx)))
        return gather_copy(w, x, axis, idx)
    first = int(np.argmax(present))
    if contiguous_ops and np.array_equal(idx[present], np.arange(k)) and present[first : first + k].all():
        return pad_copy(w, x, len(shape), axis, first, len(idx) - first - k)
    if scatter == "scatter" and all(isinstance(d, int) for d in shape[: axis + 1]):
        return scatter_nd_copy(w, x, shape, axis, idx, k, dtype)
    return pad_gather_copy(w, x, len(shape), axis, idx, k)
