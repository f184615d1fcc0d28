"""Channel analysis inside ``If`` branches and ``Loop``/``Scan`` bodies: which subgraphs are descended into.

Start reading at `scoped_graph`. An ``If``, ``Loop`` or ``Scan`` whose subgraphs (*branches*, bodies
included) are *descendable* is analysed like inlined code: the branch nodes are coupled by the same rules
as the main graph's nodes, a tensor of the outer scope read inside a branch is the same tensor (the same
name, so the same atoms), the operator's rule (`rules.control`) joins the scopes (output k of an ``If``
with output k of both branches; the values a ``Loop`` or ``Scan`` carries with the body's inputs and outputs
for them, scanned inputs and outputs with the body's slices), and weights that live in a branch's
initializers are pruned like outer ones.

Names are the bookkeeping keys of the analysis (atoms are keyed by tensor name, rewrites by node name), so
a node is descended only when every value name its branches define (inputs, initializers, node outputs,
in any nesting depth) is defined by no other scope, and every node name in its branches is non-empty and
unique in the whole model. Otherwise (e.g. both branches of an ``If`` are one and the same graph) it stays
a barrier with that reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import onnx

from onnxprune.graph import ModelGraph, _dim
from onnxprune.onnx_utils import all_graphs, light_copy, node_subgraphs

DESCENDED_OPS = ("If", "Loop", "Scan")


class ScopedGraph(ModelGraph):
    """A `ModelGraph` that also knows the shapes and initializers of the descendable branches.

    Attributes:
        scoped_nodes: the main graph's nodes followed, after each descended node, by its branches' nodes.
        descended: names of the ``If``/``Loop``/``Scan`` nodes whose branches are analysed.
        refusals: ``If``/``Loop``/``Scan`` node name -> why its branches are not analysed.
    """

    def __init__(self, model: onnx.ModelProto):
        super().__init__(model)
        defined: Counter[str] = Counter()
        node_names: Counter[str] = Counter()
        for g in all_graphs(model.graph):
            names = {i.name for i in g.input} | {t.name for t in g.initializer}
            names.update(o for n in g.node for o in n.output if o)
            defined.update(names)
            node_names.update(n.name for n in g.node)
        self.descended: set[str] = set()
        self.refusals: dict[str, str] = {}
        self.scoped_nodes: list[onnx.NodeProto] = []
        self._walk(model.graph, defined, node_names)
        if self.descended:
            self._add_inferred_branch_shapes(model)

    def _add_inferred_branch_shapes(self, model: onnx.ModelProto) -> None:
        # The importer keeps the main graph's inferred value_info only: infer the branches' shapes here.
        try:
            inferred = onnx.shape_inference.infer_shapes(
                light_copy(model), check_type=False, strict_mode=False, data_prop=True
            )
        except Exception:  # onnx raises several types; without the shapes, the branches' dims stay frozen
            return
        for sub in descended_graphs(inferred.graph, self.descended):
            self._add_tensors(sub)

    def _walk(self, g: onnx.GraphProto, defined: Counter[str], node_names: Counter[str]) -> None:
        for node in g.node:
            self.scoped_nodes.append(node)
            if node.domain not in ("", "ai.onnx") or node.op_type not in DESCENDED_OPS:
                continue
            reason = _refusal(node, defined, node_names)
            if reason:
                self.refusals[node.name] = reason
                continue
            self.descended.add(node.name)
            for sub in node_subgraphs(node):
                self._add_tensors(sub)
                self._walk(sub, defined, node_names)

    def _add_tensors(self, g: onnx.GraphProto) -> None:
        # Names of a descended branch are unique in the model (`_refusal`): nothing here shadows the main graph.
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and tt.HasField("shape"):
                self._shapes.setdefault(vi.name, tuple(_dim(d) for d in tt.shape.dim))
            if vi.type.HasField("tensor_type"):
                self._dtypes.setdefault(vi.name, tt.elem_type)
        for t in g.initializer:
            self.initializers.setdefault(t.name, t)
            self._shapes[t.name] = tuple(int(d) for d in t.dims)
            self._dtypes[t.name] = t.data_type


def _refusal(node: onnx.NodeProto, defined: Counter[str], node_names: Counter[str]) -> str | None:
    for sub in node_subgraphs(node):
        for g in all_graphs(sub):
            names = {i.name for i in g.input} | {t.name for t in g.initializer}
            names.update(o for n in g.node for o in n.output if o)
            if any(defined[name] > 1 for name in names):
                return f"{node.op_type} branches define value names another scope defines too"
            if any(not n.name or node_names[n.name] > 1 for n in g.node):
                return f"{node.op_type} branches hold unnamed or duplicate node names"
            if g.sparse_initializer:
                return f"{node.op_type} branches hold sparse initializers"
    return None


def scoped_graph(graph: ModelGraph) -> ModelGraph:
    """`graph` itself when it has no ``If``, ``Loop`` or ``Scan``; else a `ScopedGraph` of the same model."""
    if isinstance(graph, ScopedGraph) or not any(n.op_type in DESCENDED_OPS for n in graph.nodes):
        return graph
    return ScopedGraph(graph.model)


def analysed_nodes(graph: ModelGraph) -> list[onnx.NodeProto]:
    """The nodes a channel analysis couples: the main graph's, plus those of descended branches."""
    return graph.scoped_nodes if isinstance(graph, ScopedGraph) else graph.nodes


def descended(graph: ModelGraph) -> set[str]:
    """Names of the ``If``/``Loop``/``Scan`` nodes whose branches the analysis of `graph` descends into."""
    return graph.descended if isinstance(graph, ScopedGraph) else set()


def refusal(graph: ModelGraph, node: onnx.NodeProto) -> str | None:
    """Why the analysis does not descend into `node`'s subgraphs (None: it does)."""
    if node.name in descended(graph):
        return None
    if isinstance(graph, ScopedGraph) and node.name in graph.refusals:
        return graph.refusals[node.name]
    return body_reason(node) or f"{node.op_type} has subgraphs"


_BODY_REASONS = {
    "Scan": "Scan before opset 9 (sequence lengths, batch axis) is not analysed",
}


def body_reason(node: onnx.NodeProto) -> str | None:
    """Why an operator with a body but no rule at the model's opset is a barrier (None: not such an operator)."""
    return _BODY_REASONS.get(node.op_type) if node.domain in ("", "ai.onnx") else None


def descended_graphs(g: onnx.GraphProto, names: set[str]) -> Iterator[onnx.GraphProto]:
    """The branches (nested too) of the ``If``/``Loop``/``Scan`` nodes of `g` named in `names`, in a model (or its copy)."""
    for node in g.node:
        if node.name in names and node.op_type in DESCENDED_OPS:
            for sub in node_subgraphs(node):
                yield sub
                yield from descended_graphs(sub, names)


def descended_nodes(g: onnx.GraphProto, names: set[str]) -> list[onnx.NodeProto]:
    """The nodes of the branches `descended_graphs` yields."""
    return [n for sub in descended_graphs(g, names) for n in sub.node]


def replace_branch_initializers(
    g: onnx.GraphProto, names: set[str], replace: Callable[[onnx.TensorProto], onnx.TensorProto | None]
) -> None:
    """Replace, in place, each initializer of a descended branch for which `replace` returns a tensor."""
    for sub in descended_graphs(g, names):
        for i, t in enumerate(sub.initializer):
            new = replace(t)
            if new is not None:
                sub.initializer[i].CopyFrom(new)


def fix_branch_types(g: onnx.GraphProto, names: set[str], new_size: Callable[[str, int], int | None]) -> None:
    """Set the static sizes of the branches' declared inputs, outputs and value_info after removal.

    Args:
        new_size: ``(tensor, axis) -> size`` after removal, None where the axis did not change.
    """
    for sub in descended_graphs(g, names):
        for vi in list(sub.input) + list(sub.output) + list(sub.value_info):
            tt = vi.type.tensor_type
            if not (vi.type.HasField("tensor_type") and tt.HasField("shape")):
                continue
            for axis, d in enumerate(tt.shape.dim):
                size = new_size(vi.name, axis)
                if size is not None:
                    d.dim_value = size
