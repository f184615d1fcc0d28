"""Step 5 of UPSCALE: the reordered export's layout — each group's channel order, and per unit a copy or
zero rows/columns.

Start reading at `optimize_layout`. For every group with narrowable units that touch a boundary, the
channel order (`ordering.choose_order`) makes the narrowed units' kept sets contiguous runs of the stream,
weighted by what their copies would cost; then each unit compares its copy (`_copy_cost`: Slice/Pad/Gather
bytes, per-op overhead and the layout conversions around a copy) with absorbing it (`_absorb_cost`: the
extra MACs of its zero rows/columns and the extra element-wise traffic of its piece) under the
`costmodel.CostModel`, and the two steps repeat until no unit changes its mind (at most three rounds).
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.channels import ChannelAnalysis, ChannelGroup, ChannelSlice, DimRef
from onnxprune.graph import ModelGraph
from onnxprune.metrics import node_macs
from onnxprune.ordering import choose_order
from onnxprune.upscale.config import UnconstrainedConfig
from onnxprune.upscale.costmodel import CostModel
from onnxprune.upscale.records import GroupPlan, Piece, UnconstrainedPlan
from onnxprune.upscale.report import itemsize


def _share_of_axis(graph: ModelGraph, ref: DimRef, group: ChannelGroup) -> float:
    """The fraction of the dim's positions one channel of `group` holds (1 / width for a plain stream;
    smaller where the group is one input of a Concat, e.g. a DenseNet layer's growth channels)."""
    n = graph.size(ref.tensor, ref.axis)
    members = _members_by_dim(group)
    m = members.get(ref)
    if not isinstance(n, int) or n <= 0 or m is None:
        return 1.0 / max(1, group.size)
    return len(m.positions) / max(1, group.size) / n


def _members_by_dim(group: ChannelGroup) -> dict[DimRef, ChannelSlice]:
    return {DimRef(m.tensor, m.axis): m for m in group.members}


def _bytes_per_channel(graph: ModelGraph, ref: DimRef, group: ChannelGroup) -> float:
    shape = graph.shape(ref.tensor) or ()
    numel = int(np.prod([d if isinstance(d, int) else 1 for d in shape], dtype=np.int64))
    return numel * itemsize(graph.dtype(ref.tensor)) * _share_of_axis(graph, ref, group)


def _contiguous(keep: np.ndarray, union: np.ndarray, order: np.ndarray) -> bool:
    seq = [c for c in order.tolist() if union[c]]
    where = [i for i, c in enumerate(seq) if keep[c]]
    return bool(where) and where[-1] - where[0] + 1 == len(where)


def _copy_cost(gp: GroupPlan, pc: Piece, graph: ModelGraph, boundary_tensors: frozenset[str], cost: CostModel,
               contiguous: bool) -> float:  # fmt: skip
    """Seconds the unit's copies cost per inference (0 when it keeps the whole stream)."""
    k, u = int(pc.kept.sum()), int(gp.union.sum())
    if k == u:
        return 0.0
    total = 0.0
    for ref in pc.dims:
        if not graph.is_initializer(ref.tensor) and ref.tensor in boundary_tensors:
            bpc = _bytes_per_channel(graph, ref, gp.group)
            # Layout conversions around the copy: about `layout_break` extra copies of the wider side.
            total += cost.layout_break * u * bpc / cost.copy_bytes_per_s
            if pc.in_boundaries:  # narrowing: Slice or Gather writes k channels
                bw = cost.copy_bytes_per_s if contiguous else cost.gather_bytes_per_s
                total += cost.op_overhead_s + k * bpc / bw
            else:  # widening: Pad writes u channels; naive: Pad (k+1) then Gather u
                total += cost.op_overhead_s + u * bpc / cost.copy_bytes_per_s
                if not contiguous:
                    total += cost.op_overhead_s + (k + 1) * bpc / cost.copy_bytes_per_s + u * bpc / cost.gather_bytes_per_s
                    total -= u * bpc / cost.copy_bytes_per_s
    return total


def _absorb_cost(gp: GroupPlan, pc: Piece, analysis: ChannelAnalysis, cost: CostModel, ratio: float) -> float:
    """Seconds absorbing the unit costs per inference: the MACs of its zero rows/columns and the extra
    element-wise traffic of its piece at the stream's width."""
    graph = analysis.graph
    extra = int(gp.union.sum() - pc.kept.sum())
    if extra == 0:
        return 0.0
    nodes = {n.name: n for n in graph.nodes}
    weight_nodes: dict[str, float] = {}  # node -> fraction of its MACs the extra channels add
    for m in pc.weights:
        frac = extra * _share_of_axis(graph, DimRef(m.tensor, m.axis), gp.group)
        for use in graph.consumers.get(m.tensor, []):
            weight_nodes[use.node.name] = frac
    total = 0.0
    for name in pc.nodes:
        node = nodes[name]
        if name in weight_nodes:
            total += node_macs(graph, node) * weight_nodes[name] * (1 - ratio) / cost.macs_per_s
        else:
            for o in node.output:
                refs = [DimRef(o, ax) for ax in range(graph.rank(o) or 0) if DimRef(o, ax) in gp.piece_of]
                if refs:
                    shape = graph.shape(o) or ()
                    numel = int(np.prod([d if isinstance(d, int) else 1 for d in shape], dtype=np.int64))
                    frac = extra * _share_of_axis(graph, refs[0], gp.group)
                    total += 2 * numel * frac * 4 / cost.elementwise_bytes_per_s
    return total


def _reorderable(group: ChannelGroup, graph: ModelGraph) -> bool:
    """Relabelling needs every channel to hold the same number of positions in each dim, and no dim whose
    channel axis a Pad or Slice resizes: there channels sit at fixed places (the padded sides, the slice
    window; CIFAR ResNets' option-A shortcut pads a stream into the middle of a wider one), and moving a
    channel across them is not something the op's attributes can say."""
    for m in group.members:
        counts = np.bincount(m.channel_of, minlength=group.size)
        if counts.min() != counts.max():
            return False
        ends = [graph.producer.get(m.tensor)] + [u.node for u in graph.consumers.get(m.tensor, [])]
        for node in ends:
            if node is not None and node.op_type in ("Pad", "Slice") and _resizes(graph, node, m.axis):
                return False
    return True


def _resizes(graph: ModelGraph, node: onnx.NodeProto, axis: int) -> bool:
    """Whether `node` changes (or may change: a size unknown) its first input's size along `axis`."""
    before, after = graph.shape(node.input[0]), graph.shape(node.output[0])
    if before is None or after is None or len(before) <= axis or len(after) <= axis:
        return True
    return not (isinstance(before[axis], int) and before[axis] == after[axis])


def optimize_layout(plan: UnconstrainedPlan, config: UnconstrainedConfig) -> dict:
    """Choose each group's channel order and, per narrowable unit, copy or absorb (see the module docstring).

    Sets `GroupPlan.order` and `Piece.narrow` in `plan`; returns how many units were narrowed (with
    contiguous or scattered kept sets) and absorbed.
    """
    graph = plan.analysis.graph
    boundary_tensors = plan.split.tensors
    decisions = {"narrowed": 0, "absorbed": 0, "contiguous": 0, "scattered": 0}
    for gp in plan.groups:
        candidates = [pc for pc in gp.pieces if pc.is_unit and pc.narrowable and (pc.in_boundaries or pc.out_boundaries)]
        if not candidates:
            continue
        if not _reorderable(gp.group, graph):
            continue  # channels with different position counts in some dim: keep the original order
        for _ in range(3):
            narrowed = [pc for pc in candidates if pc.narrow]
            weights = [_copy_cost(gp, pc, graph, boundary_tensors, config.cost, False) + 1e-9 for pc in narrowed]
            gp.order = choose_order(gp.union, [pc.kept for pc in narrowed], weights)
            changed = False
            for pc in candidates:
                contiguous = _contiguous(pc.kept, gp.union, gp.order)
                copy = _copy_cost(gp, pc, graph, boundary_tensors, config.cost, contiguous)
                absorb = _absorb_cost(gp, pc, plan.analysis, config.cost, config.ratio)
                want = not (config.absorb and absorb < copy)
                if want != pc.narrow:
                    pc.narrow, changed = want, True
            if not changed:
                break
        for pc in candidates:
            if pc.narrow:
                decisions["narrowed"] += 1
                key = "contiguous" if _contiguous(pc.kept, gp.union, gp.order) else "scattered"
                decisions[key] += 1
            else:
                decisions["absorbed"] += 1
    return decisions
