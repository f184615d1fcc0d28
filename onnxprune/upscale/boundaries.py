"""Step 1 of UPSCALE: cut every coupled group where a layer's own channels meet the shared stream.

Start reading at `split_boundaries`. In each group, a walk goes forward from every producer weight and
backward from every consumer weight through single-input per-channel ops, and stops where the tensor forks
or meets a merge (past a Concat the cut moves to the Concat, see `_walk_forward` / `_walk_backward`). An
`Identity` is inserted at each stop; re-analysing the split model makes its two sides separate dims that
may have different widths. The inserted nodes are recorded in the returned `SplitModel` (never recognised
by their names), so a model that already holds nodes named like them is not misread.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import onnx
from onnx import helper

from onnxprune.channels import ChannelAnalysis, ChannelGroup, analyze
from onnxprune.graph import ModelGraph
from onnxprune.importer import infer_shapes

BOUNDARY = "upscale_boundary"  # name stem of the inserted Identity nodes (for readers of the model only)


@dataclass(frozen=True, eq=False)
class SplitModel:
    """The model with boundary Identity nodes inserted, and the record of which nodes those are.

    Attributes:
        model: the split model (shapes inferred).
        boundary_outputs: the output tensor of every inserted Identity (tensor names are unique in a
            graph, so this identifies the nodes).
    """

    model: onnx.ModelProto
    boundary_outputs: frozenset[str]

    @property
    def count(self) -> int:
        return len(self.boundary_outputs)

    def is_boundary(self, node: onnx.NodeProto) -> bool:
        return len(node.output) == 1 and node.output[0] in self.boundary_outputs

    @cached_property
    def tensors(self) -> frozenset[str]:
        """Every tensor a boundary reads or writes."""
        return frozenset(t for n in self.model.graph.node if self.is_boundary(n) for t in (*n.input, *n.output))


@dataclass
class Roles:
    """How the nodes touching one group relate to it (`roles`), keyed by node name."""

    acts: set[str]
    weights: set[str]
    g_in: dict[str, list[int]]  # node name -> input indices that are group activations
    g_out: dict[str, list[str]]  # node name -> outputs that are group activations
    has_weight: dict[str, bool]  # node name -> reads a weight member of the group

    def kind(self, node: onnx.NodeProto) -> str:
        """producer (weight in, group activation out), consumer (the reverse), merge (two group
        activations in), chain (one in, one out) or other."""
        gi, go = self.g_in.get(node.name, []), self.g_out.get(node.name, [])
        if self.has_weight.get(node.name) and go and not gi:
            return "producer"
        if self.has_weight.get(node.name) and gi and not go:
            return "consumer"
        if len(gi) >= 2:
            return "merge"
        if len(gi) == 1 and len(go) == 1:
            return "chain"
        return "other"


def roles(graph: ModelGraph, analysis: ChannelAnalysis, group: ChannelGroup) -> Roles:
    acts = {m.tensor for m in group.members if not m.is_param}
    weights = {m.tensor for m in group.param_members if analysis.roles.get(m.tensor) == "weight"}
    r = Roles(acts, weights, {}, {}, {})
    for node in graph.nodes:
        gi = [i for i, n in enumerate(node.input) if n in acts]
        go = [n for n in node.output if n in acts]
        if gi or go:
            r.g_in[node.name] = gi
            r.g_out[node.name] = go
            r.has_weight[node.name] = any(n in weights for n in node.input)
    return r


Edge = tuple[str, str, int]  # (tensor, reading node's name, input index)


def split_boundaries(model: onnx.ModelProto) -> SplitModel:
    """Insert boundary Identity nodes where unit pieces meet the stream (see the module docstring)."""
    graph = ModelGraph(model)
    analysis = analyze(graph)
    tensor_cuts: set[str] = set()
    edge_cuts: set[Edge] = set()
    for group in analysis.groups:
        r = roles(graph, analysis, group)
        for node in graph.nodes:
            kind = r.kind(node)
            if kind == "producer":
                _walk_forward(graph, r, node, tensor_cuts, edge_cuts)
            elif kind == "consumer":
                _walk_backward(graph, r, node, edge_cuts)
    if not tensor_cuts and not edge_cuts:
        return SplitModel(model, frozenset())
    return _insert_identities(model, graph, tensor_cuts, edge_cuts)


def _walk_forward(graph: ModelGraph, r: Roles, node: onnx.NodeProto, tensor_cuts: set[str],
                  edge_cuts: set[Edge]) -> None:  # fmt: skip
    outs = r.g_out[node.name]
    if len(outs) != 1:
        return
    t = outs[0]
    before_concat = None  # the edge into the first Concat on the way: a cheaper place to widen

    def cut(at: str | Edge) -> None:  # a tensor (every reader's copy) or one edge
        if before_concat is not None:
            edge_cuts.add(before_concat)
        elif isinstance(at, str):
            tensor_cuts.add(at)
        else:
            edge_cuts.add(at)

    while True:
        uses = graph.consumers.get(t, [])
        if len(uses) >= 2:
            return cut(t)
        if len(uses) != 1:
            return
        nxt = uses[0].node
        kind = r.kind(nxt)
        if kind == "merge":
            return cut((t, nxt.name, uses[0].index))
        if kind != "chain":
            return  # a consumer (a producer->consumer chain: no boundary) or the group ends
        if nxt.op_type == "Concat" and before_concat is None:
            # Widening before the Concat copies this producer's channels only, not the concatenation.
            before_concat = (t, nxt.name, uses[0].index)
        t = r.g_out[nxt.name][0]


def _walk_backward(graph: ModelGraph, r: Roles, node: onnx.NodeProto, edge_cuts: set[Edge]) -> None:
    ins = r.g_in[node.name]
    if len(ins) != 1:
        return
    cur, index = node, ins[0]
    after_concat = None  # the edge out of the nearest Concat: one gather there serves every input

    def cut(edge: Edge) -> None:
        edge_cuts.add(after_concat if after_concat is not None else edge)

    while True:
        t = cur.input[index]
        if len(graph.consumers.get(t, [])) >= 2:
            return cut((t, cur.name, index))
        prev = graph.producer.get(t)
        if prev is None:
            return
        kind = r.kind(prev)
        if kind == "merge":
            return cut((t, cur.name, index))
        if kind != "chain":
            return
        if prev.op_type == "Concat" and after_concat is None:
            after_concat = (t, cur.name, index)
        cur, index = prev, r.g_in[prev.name][0]


def _insert_identities(model: onnx.ModelProto, graph: ModelGraph, tensor_cuts: set[str],
                       edge_cuts: set[Edge]) -> SplitModel:  # fmt: skip
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    del g.value_info[:]
    nodes = list(g.node)
    by_name = {n.name: n for n in nodes}
    taken = set(by_name) | set(graph.producer) | set(graph.initializers) | set(graph.graph_inputs)
    after: dict[str, list[onnx.NodeProto]] = {}  # tensor -> boundary nodes reading it
    outputs: set[str] = set()
    count = 0

    def identity(src: str) -> str:
        nonlocal count
        count += 1
        while f"{BOUNDARY}_{count}" in taken or f"{src}__{BOUNDARY}{count}" in taken:
            count += 1  # the input model already uses this name: take the next free one
        dst = f"{src}__{BOUNDARY}{count}"
        node = helper.make_node("Identity", [src], [dst], name=f"{BOUNDARY}_{count}")
        after.setdefault(src, []).append(node)
        outputs.add(dst)
        return dst

    renamed: dict[str, str] = {}
    for t in sorted(tensor_cuts):
        dst = identity(t)
        renamed[t] = dst
        for use in graph.consumers.get(t, []):
            by_name[use.node.name].input[use.index] = dst
    for t, node_name, index in sorted(edge_cuts):
        by_name[node_name].input[index] = identity(renamed.get(t, t))
    ordered: list[onnx.NodeProto] = []

    def emit_boundaries(tensor: str) -> None:
        for b in after.pop(tensor, []):
            ordered.append(b)
            emit_boundaries(b.output[0])

    for name in list(graph.graph_inputs) + [t.name for t in g.initializer]:
        emit_boundaries(name)
    for n in nodes:
        ordered.append(n)
        for o in n.output:
            emit_boundaries(o)
    del g.node[:]
    g.node.extend(ordered)
    return SplitModel(infer_shapes(out), frozenset(outputs))
