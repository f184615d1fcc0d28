"""Read-only view of an ONNX model: producers, consumers, shapes, constants and a networkx graph.

`ModelGraph` is an analysis of a model, rebuilt after every change; it is never edited as if it were the
model. Its networkx graph (`ModelGraph.nx`, built on first use) is the operator/tensor dependency graph:
bipartite, with operator nodes keyed ``("op", index)`` (the node's position in ``graph.node``: ONNX allows
empty and duplicated node names, so the name is only an attribute) and tensor nodes keyed
``("tensor", name)``; edges run in data-flow direction, including the outer-scope tensors a node's
subgraphs read. The queries passes use sit beside it: `ancestors`, `reachable_from`, and run-time
dominance (`dominates`), where a virtual source feeds every run-time root tensor so that
"``a`` dominates ``b``" means every computation of ``b`` from the graph inputs goes through ``a``
(constants never count as a way around).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.external import is_lazy, tensor_array

if TYPE_CHECKING:  # networkx costs ~0.3 s to import; only the graph queries below need it
    import networkx as nx

Dim = int | str | None  # static size, symbolic name, or unknown
Key = tuple[str, int | str]  # a node of `ModelGraph.nx`: ("op", node index) or ("tensor", name)
SOURCE: Key = ("source", "")  # virtual root of the dominator tree: feeds every run-time input


@dataclass(frozen=True)
class Use:
    node: onnx.NodeProto
    index: int


class ModelGraph:
    """Lookup tables over one ModelProto's main graph."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.nodes: list[onnx.NodeProto] = list(g.node)
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        self.graph_inputs: list[str] = [i.name for i in g.input if i.name not in self.initializers]
        self.graph_outputs: list[str] = [o.name for o in g.output]
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[Use]] = {}
        for node in self.nodes:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for i, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append(Use(node, i))
        self._shapes: dict[str, tuple[Dim, ...]] = {}
        self._dtypes: dict[str, int] = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and tt.HasField("shape"):
                self._shapes[vi.name] = tuple(_dim(d) for d in tt.shape.dim)
            if vi.type.HasField("tensor_type"):
                self._dtypes[vi.name] = tt.elem_type
        for t in g.initializer:
            self._shapes[t.name] = tuple(int(d) for d in t.dims)
            self._dtypes[t.name] = t.data_type
        self._consts: dict[str, np.ndarray] = {}

    def forget_values(self) -> None:
        """Drop the initializer values `const` cached; a later read converts them again. For a graph that stays
        referenced through long work that no longer reads them (the selection's analysis through the repair)."""
        self._consts.clear()

    # ---- tensors ------------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[Dim, ...] | None:
        return self._shapes.get(name)

    def rank(self, name: str) -> int | None:
        s = self._shapes.get(name)
        return None if s is None else len(s)

    def size(self, name: str, axis: int) -> Dim:
        s = self._shapes.get(name)
        if s is None or not -len(s) <= axis < len(s):
            return None
        return s[axis]

    def static_size(self, name: str, axis: int) -> int:
        """Size of a dim the caller knows is static (every dim of a channel analysis is).

        Raises:
            ValueError: the dim's size is symbolic or unknown (a broken invariant, not a model problem).
        """
        size = self.size(name, axis)
        if not isinstance(size, int):
            raise ValueError(f"axis {axis} of {name!r} has no static size ({size!r})")
        return size

    def dtype(self, name: str) -> int | None:
        return self._dtypes.get(name)

    def is_initializer(self, name: str) -> bool:
        return name in self.initializers

    def const(self, name: str) -> np.ndarray | None:
        """Value of an initializer (cached), or None for run-time tensors."""
        if name in self._consts:
            return self._consts[name]
        t = self.initializers.get(name)
        if t is None:
            return None
        if is_lazy(t):  # external data: a fresh read-only memory map, not cached (pages stay reclaimable)
            return tensor_array(t)
        value = numpy_helper.to_array(t)
        self._consts[name] = value
        return value

    def initializer_value(self, name: str) -> np.ndarray:
        """Value of `name`, which the caller knows is an initializer (e.g. a weight a channel analysis found).

        Raises:
            KeyError: `name` is not an initializer of this graph (a broken invariant, not a model problem).
        """
        value = self.const(name)
        if value is None:
            raise KeyError(f"{name!r} is not an initializer of the graph")
        return value

    def is_graph_io(self, name: str) -> bool:
        return name in self._io

    @cached_property
    def _io(self) -> set[str]:
        return set(self.graph_inputs) | set(self.graph_outputs)

    # ---- networkx view ------------------------------------------------------------------------
    @cached_property
    def nx(self) -> nx.DiGraph:
        """The operator/tensor dependency graph (see the module docstring), built once on first use.

        Attributes only, never tensor data: op nodes carry ``kind="op"``, ``name``, ``op_type``,
        ``domain``; tensor nodes carry ``kind="tensor"``, ``name``, ``shape`` (tuple or None), ``dtype``
        (ONNX element type or None), ``initializer``, ``graph_input``, ``graph_output``. Each edge's
        ``slots`` are the input (tensor -> op) or output (op -> tensor) positions it stands for; an
        outer-scope tensor read inside a node's subgraph has ``slots=()``.
        """
        import networkx as nx

        graph = nx.DiGraph()
        inputs, outputs = set(self.graph_inputs), set(self.graph_outputs)

        def tensor(name: str) -> Key:
            key = ("tensor", name)
            if key not in graph:
                graph.add_node(
                    key, kind="tensor", name=name, shape=self._shapes.get(name), dtype=self._dtypes.get(name),
                    initializer=name in self.initializers, graph_input=name in inputs, graph_output=name in outputs,
                )  # fmt: skip
            return key

        def connect(a: Key, b: Key, slot: int | None) -> None:
            if graph.has_edge(a, b):  # one tensor in several slots of one node (e.g. Mul(x, x))
                if slot is not None:
                    graph.edges[a, b]["slots"] += (slot,)
            else:
                graph.add_edge(a, b, slots=() if slot is None else (slot,))

        for name in self.graph_inputs:
            tensor(name)
        outer_scope = self.producer.keys() | self.initializers.keys() | inputs
        for index, node in enumerate(self.nodes):
            op = ("op", index)
            graph.add_node(op, kind="op", name=node.name, op_type=node.op_type, domain=node.domain)
            for slot, name in enumerate(node.input):
                if name:
                    connect(tensor(name), op, slot)
            for slot, name in enumerate(node.output):
                if name:
                    connect(op, tensor(name), slot)
            for name in sorted(subgraph_reads(node) & outer_scope):
                connect(tensor(name), op, None)
        for name in self.graph_outputs:
            tensor(name)
        return graph

    def op(self, key: Key) -> onnx.NodeProto:
        """The node behind an op key of `nx`."""
        index = key[1]
        assert isinstance(index, int), key
        return self.nodes[index]

    def topological_nodes(self) -> list[onnx.NodeProto]:
        import networkx as nx

        return [self.op(key) for key in nx.topological_sort(self.nx) if key[0] == "op"]

    def has_cycle(self) -> bool:
        import networkx as nx

        return not nx.is_directed_acyclic_graph(self.nx)

    def reachable_from(self, tensor: str) -> set[Key]:
        """Every op and tensor computed (transitively) from `tensor`: its readers, their outputs, and so on."""
        import networkx as nx

        return nx.descendants(self.nx, ("tensor", tensor))

    def ancestors(self, tensor: str, stop: Collection[str] = ()) -> set[Key]:
        """Every op and tensor `tensor` is computed from, walking back no further than the `stop` tensors.

        Stop tensors that are reached are included, their own producers are not.
        """
        start = ("tensor", tensor)
        stops = {("tensor", name) for name in stop}
        seen: set[Key] = set()
        frontier = [start]
        pred = self.nx.pred
        while frontier:
            key = frontier.pop()
            for p in pred[key]:
                if p not in seen:
                    seen.add(p)
                    if p not in stops:
                        frontier.append(p)
        seen.discard(start)
        return seen

    @cached_property
    def immediate_dominators(self) -> dict[Key, Key]:
        """Immediate run-time dominator of every node computed from the graph inputs.

        A virtual `SOURCE` feeds every tensor that is neither produced by a node nor an initializer (the
        graph inputs, and names nothing defines). Nodes computed from constants alone are not reachable from
        it and are absent; `SOURCE` itself is absent too.
        """
        import networkx as nx

        flow = nx.DiGraph()
        flow.add_edges_from(self.nx.edges)
        flow.add_edges_from(
            (SOURCE, key) for key, data in self.nx.nodes(data=True)
            if data["kind"] == "tensor" and not data["initializer"] and self.nx.in_degree(key) == 0
        )  # fmt: skip
        flow.add_node(SOURCE)
        idom = nx.immediate_dominators(flow, SOURCE)
        idom.pop(SOURCE, None)  # networkx < 3.5 maps the start to itself
        return idom

    @cached_property
    def _dominator_intervals(self) -> dict[Key, tuple[int, int]]:
        # Pre/post DFS numbers in the dominator tree: a dominates b iff b's interval nests in a's.
        children: dict[Key, list[Key]] = {}
        for key, parent in self.immediate_dominators.items():
            children.setdefault(parent, []).append(key)
        intervals: dict[Key, tuple[int, int]] = {}
        clock = 0
        stack: list[tuple[Key, int]] = [(SOURCE, 0)]
        enter: dict[Key, int] = {}
        while stack:
            key, child = stack.pop()
            if child == 0:
                enter[key] = clock
                clock += 1
            kids = children.get(key, ())
            if child < len(kids):
                stack.append((key, child + 1))
                stack.append((kids[child], 0))
            else:
                intervals[key] = (enter[key], clock)
                clock += 1
        return intervals

    def dominates(self, a: str | Key, b: str | Key) -> bool:
        """Whether every run-time path from the graph inputs to `b` passes through `a` (tensor names or keys).

        Every node dominates itself. False when either is computed from constants alone.
        """
        a = ("tensor", a) if isinstance(a, str) else a
        b = ("tensor", b) if isinstance(b, str) else b
        ia, ib = self._dominator_intervals.get(a), self._dominator_intervals.get(b)
        if ia is None or ib is None:
            return False
        return ia[0] <= ib[0] and ib[1] <= ia[1]


def _dim(d: onnx.TensorShapeProto.Dimension) -> Dim:
    if d.HasField("dim_value"):
        return int(d.dim_value)
    if d.HasField("dim_param"):
        return d.dim_param
    return None


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs use (conservatively every name; intersect with the outer scope's names)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        for sub in graphs:
            for n in sub.node:
                names.update(i for i in n.input if i)
                names.update(subgraph_reads(n))
            names.update(o.name for o in sub.output)
    return names


def attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes as plain Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))
