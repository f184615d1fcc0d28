"""Read-only view of an ONNX model: producers, consumers, shapes, constants and a networkx graph.

`ModelGraph` is an analysis of a model, rebuilt after every change; it is never edited as if it were the
model. The networkx graph is bipartite: operator nodes (keyed ``("op", node_name)``) and tensor nodes
(keyed ``("tensor", name)``), with edges in data-flow direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import networkx as nx
import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.external import is_lazy, tensor_array

Dim = int | str | None  # static size, symbolic name, or unknown


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

    def is_graph_io(self, name: str) -> bool:
        return name in self._io

    @cached_property
    def _io(self) -> set[str]:
        return set(self.graph_inputs) | set(self.graph_outputs)

    # ---- networkx view ------------------------------------------------------------------------
    @cached_property
    def nx(self) -> nx.DiGraph:
        graph = nx.DiGraph()
        for node in self.nodes:
            op = ("op", node.name)
            graph.add_node(op, op_type=node.op_type, domain=node.domain)
            for name in node.input:
                if name:
                    graph.add_node(("tensor", name), initializer=name in self.initializers)
                    graph.add_edge(("tensor", name), op)
            for name in node.output:
                if name:
                    graph.add_node(("tensor", name), initializer=False)
                    graph.add_edge(op, ("tensor", name))
        return graph

    def topological_nodes(self) -> list[onnx.NodeProto]:
        by_name = {n.name: n for n in self.nodes}
        order = [key[1] for key in nx.topological_sort(self.nx) if key[0] == "op"]
        return [by_name[n] for n in order]

    def has_cycle(self) -> bool:
        return not nx.is_directed_acyclic_graph(self.nx)


def _dim(d: onnx.TensorShapeProto.Dimension) -> Dim:
    if d.HasField("dim_value"):
        return int(d.dim_value)
    if d.HasField("dim_param"):
        return d.dim_param
    return None


def attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes as plain Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))
