"""Small facts about ONNX protos that every layer reads: opsets, subgraphs, value names, light copies.

A leaf module (it imports only onnx): the importer, the channel analysis, the rewrite, the rules and the
external-data code all build on it, so none of them has to import another for these helpers.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

import numpy as np
import onnx

# Initializers up to this many elements stay in light copies (shape constants).
LIGHT_LIMIT = 1 << 16

_SUBGRAPH_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def opset_of(model: onnx.ModelProto, domain: str = "") -> int:
    """The model's opset version for `domain` ("" and "ai.onnx" are the same), 0 if not imported."""
    for imp in model.opset_import:
        if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
            return imp.version
    return 0


def numel(t: onnx.TensorProto) -> int:
    """Number of elements of a tensor, from its dims."""
    n = 1
    for d in t.dims:
        n *= d
    return n


def has_subgraph(node: onnx.NodeProto) -> bool:
    """Does the node carry a graph attribute (If, Loop, Scan, custom ops with bodies)?"""
    return any(a.type in _SUBGRAPH_TYPES for a in node.attribute)


def node_subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held directly in a node's attributes (GRAPH and GRAPHS)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph nested in its nodes' attributes, depth first."""
    yield graph
    for node in graph.node:
        for sub in node_subgraphs(node):
            yield from all_graphs(sub)


def value_names(graph: onnx.GraphProto) -> set[str]:
    """Every value name used in `graph` and its subgraphs: inputs, outputs, value_info, (sparse)
    initializers, node inputs and outputs. A new name outside this set cannot collide with any value."""
    names: set[str] = set()
    for g in all_graphs(graph):
        names.update(v.name for v in g.input)
        names.update(v.name for v in g.output)
        names.update(v.name for v in g.value_info)
        names.update(t.name for t in g.initializer)
        names.update(s.values.name for s in g.sparse_initializer)
        for node in g.node:
            names.update(node.input)
            names.update(node.output)
    names.discard("")
    return names


def upstream_nodes(
    nodes: list[onnx.NodeProto],
    producer: dict[str, int],
    targets: Iterator[str] | Collection[str],
    stop: Collection[str] = (),
    within: Collection[int] | None = None,
) -> set[int]:
    """Indices of the nodes that compute `targets`, walking back from them and stopping at tensors in `stop`,
    tensors no node produces (graph inputs, initializers) and, when given, nodes outside `within`.
    `producer` maps a tensor to the index of the node writing it."""
    needed: set[int] = set()
    stack = [t for t in targets if t and t not in stop]
    while stack:
        i = producer.get(stack.pop(), -1)
        if i < 0 or i in needed or (within is not None and i not in within):
            continue
        needed.add(i)
        stack.extend(t for t in nodes[i].input if t and t not in stop)
    return needed


def light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every large initializer replaced by a typed graph input of the same shape.

    What the checker and shape inference need, fast for any size and possible beyond the 2 GB protobuf
    limit: weights are never serialised.
    """
    light = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name == "graph":
            continue
        if hasattr(value, "extend"):
            getattr(light, field.name).extend(value)
        elif hasattr(value, "CopyFrom"):
            getattr(light, field.name).CopyFrom(value)
        else:
            setattr(light, field.name, value)
    g, src = light.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    names = {i.name for i in src.input}
    for t in src.initializer:
        if numel(t) <= LIGHT_LIMIT and t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)
        elif t.name not in names:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    if light.ir_version < 4:
        light.ir_version = 4
    return light


def gather_list(source: list | None, indices: np.ndarray | None) -> list | None:
    """``source[indices]`` for a Python list of (possibly symbolic) sizes, as ONNX ``Gather`` on a shape
    computes it; None when either side is unknown or an index is out of range."""
    if source is None or indices is None:
        return None
    try:
        return [source[int(i)] for i in indices.reshape(-1)]
    except IndexError:
        return None


def softmax_logits(model: onnx.ModelProto, output: str, rank: int) -> str | None:
    """The input of the Softmax over the last axis that produces `output` (a tensor of `rank` dims), else None:
    the logits behind a probability output (classifiers, CTC text recognisers), where distillation and
    inversion losses are seeded. Before opset 13 a Softmax's default axis is 1 (flattening the rest)."""
    node = next((n for n in model.graph.node if output in n.output), None)
    if node is None or node.op_type != "Softmax":
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset_of(model) >= 13 else 1)
    return node.input[0] if axis in (-1, rank - 1) else None
