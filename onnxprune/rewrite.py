"""Physical pruning: delete the positions of removed channels from initializers and fix every node whose
attributes or shape constants depend on the sizes that changed. Also `apply_mask`, the oracle: the same
channels silenced (set to zero) in the original model, which a pruned model must reproduce exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.channels import ChannelAnalysis, DimRef
from onnxprune.external import MMAP_TYPES
from onnxprune.graph import Dim, ModelGraph, subgraph_reads
from onnxprune.onnx_utils import all_graphs, opset_of, value_names
from onnxprune.quantized import zero_point_fill
from onnxprune.rules import RULES
from onnxprune.subgraphs import (
    analysed_nodes,
    descended,
    descended_nodes,
    fix_branch_types,
    replace_branch_initializers,
)


class RewriteContext:
    """What a rule's `rewrite` sees (`rules.protocols.RewriteContext`): old and new sizes, removed
    positions, and constant edits."""

    def __init__(self, graph: ModelGraph, removed: dict[DimRef, np.ndarray]):
        self.graph = graph
        self._removed = removed
        self.element_edits: dict[tuple[str, int], dict[int, int]] = {}
        self.input_replacements: dict[tuple[str, int], np.ndarray] = {}
        self.node_replacements: dict[str, tuple[list[onnx.NodeProto], dict[str, np.ndarray]]] = {}
        self._nodes: dict[str, onnx.NodeProto] = {}
        self._issued: set[str] = set()
        self._taken: set[str] | None = None

    # What rules read
    def removed(self, tensor: str, axis: int) -> np.ndarray:
        rank = self.graph.rank(tensor) or 1
        return self._removed.get(DimRef(tensor, axis % rank), np.zeros(0, dtype=np.int64))

    def old_size(self, tensor: str, axis: int) -> Dim:
        return self.graph.size(tensor, axis)

    def new_size(self, tensor: str, axis: int) -> Dim:
        old = self.old_size(tensor, axis)
        return old - len(self.removed(tensor, axis)) if isinstance(old, int) else old

    def const(self, name: str) -> np.ndarray | None:
        return self.graph.const(name)

    def shape(self, name: str) -> tuple[Dim, ...] | None:
        return self.graph.shape(name)

    def size(self, name: str, axis: int) -> Dim:
        return self.graph.size(name, axis)

    def rank(self, name: str) -> int | None:
        return self.graph.rank(name)

    # What rules write (applied after all rules ran, so shared constants are never edited in place)
    def set_element(self, location: tuple[onnx.NodeProto, int, int], value: int) -> None:
        node, index, element = location
        self._nodes[node.name] = node
        self.element_edits.setdefault((node.name, index), {})[element] = int(value)

    def replace_input(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
        self._nodes[node.name] = node
        self.input_replacements[(node.name, index)] = np.asarray(value)

    def fresh_name(self, base: str) -> str:
        """A value/node name no tensor of the model uses (``__stat`` names never meet `_materialize_edits`'
        ``_pruned`` names)."""
        if self._taken is None:
            self._taken = value_names(self.graph.model.graph) | {n.name for n in analysed_nodes(self.graph)}
        name, k = f"{base}__stat", 0
        while name in self._taken or name in self._issued:
            k += 1
            name = f"{base}__stat{k}"
        self._issued.add(name)
        return name

    def opset(self) -> int:
        return opset_of(self.graph.model) or 17

    def replace_node(self, node: onnx.NodeProto, nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray]) -> None:
        """Replace `node` (same outputs) by `nodes` reading `constants` (new initializers)."""
        self.node_replacements[node.name] = (nodes, constants)


def apply_plan(analysis: ChannelAnalysis, removed_labels: np.ndarray) -> onnx.ModelProto:
    """Return a new model without the channels whose component labels are `removed_labels`."""
    graph = analysis.graph
    removed = analysis.removed_positions(removed_labels)
    model = _copy_without_weights(graph.model)
    g = model.graph
    by_tensor: dict[str, list[tuple[int, np.ndarray]]] = {}
    for ref, pos in removed.items():
        by_tensor.setdefault(ref.tensor, []).append((ref.axis, pos))
    for t in graph.model.graph.initializer:
        cuts = by_tensor.get(t.name)
        if not cuts:
            g.initializer.append(t)
            continue
        array = graph.initializer_value(t.name)
        for axis, pos in cuts:
            array = np.delete(array, pos, axis=axis)
        _append_array(g, t, array)

    def cut(t: onnx.TensorProto) -> onnx.TensorProto | None:
        array = graph.initializer_value(t.name)
        for axis, pos in by_tensor.get(t.name, ()):
            array = np.delete(array, pos, axis=axis)
        return numpy_helper.from_array(np.ascontiguousarray(array), t.name) if t.name in by_tensor else None

    replace_branch_initializers(g, descended(graph), cut)
    _rewrite_nodes(g, graph, removed)
    return model


def _changed_size(ctx: RewriteContext, name: str, axis: int) -> int | None:
    size = ctx.new_size(name, axis) if len(ctx.removed(name, axis)) else None
    return size if isinstance(size, int) else None


def _append_array(g: onnx.GraphProto, old: onnx.TensorProto, array: np.ndarray) -> None:
    """Add a sliced copy of `old` holding `array`, built in place (one copy of the bytes, not three)."""
    if MMAP_TYPES.get(old.data_type) != array.dtype.type or array.dtype.byteorder == ">":
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), old.name))
        return
    t = g.initializer.add()
    t.name = old.name
    t.data_type = old.data_type
    t.dims.extend(array.shape)
    t.raw_data = np.ascontiguousarray(array).tobytes()


def _touches_changed(node: onnx.NodeProto, ctx: RewriteContext) -> bool:
    tensors = set(node.input) | set(node.output)
    return any(ref.tensor in tensors for ref in ctx._removed)


def _materialize_edits(
    g: onnx.GraphProto,
    nodes: dict[str, onnx.NodeProto],
    originals: dict[str, onnx.NodeProto],
    ctx: RewriteContext,
) -> None:
    # Every value name (node outputs, graph inputs/outputs, subgraph names too), not just initializers:
    # a new constant named like an existing activation would make an invalid graph.
    existing = value_names(g)

    def fresh(base: str) -> str:
        name, k = f"{base}_pruned", 0
        while name in existing:
            k += 1
            name = f"{base}_pruned{k}"
        existing.add(name)
        return name

    for (node_name, index), value in ctx.input_replacements.items():
        node = nodes[node_name]
        old = node.input[index] if index < len(node.input) else ""
        name = fresh(old or f"{node_name}_in{index}")
        g.initializer.append(numpy_helper.from_array(value, name))
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name
    for (node_name, index), edits in ctx.element_edits.items():
        node = nodes[node_name]
        old = originals[node_name].input[index]
        value = ctx.graph.initializer_value(old).copy()
        flat = value.reshape(-1)
        for element, v in edits.items():
            flat[element] = v
        name = fresh(old)
        g.initializer.append(numpy_helper.from_array(value, name))
        node.input[index] = name


def _copy_without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    _copy_fields(model, out, skip=("graph",))
    _copy_fields(model.graph, out.graph, skip=("initializer", "value_info"))
    return out


def _copy_fields(src, dst, skip: tuple[str, ...]) -> None:
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        if hasattr(value, "extend"):  # repeated field
            getattr(dst, field.name).extend(value)
        elif hasattr(value, "CopyFrom"):
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _remove_unused_initializers(g: onnx.GraphProto) -> None:
    used = {o.name for o in g.output}
    for node in g.node:
        used.update(node.input)
        used.update(subgraph_reads(node))
    # Delete in place: rebuilding the list would copy every (possibly GB-sized) tensor once more.
    for i in reversed(range(len(g.initializer))):
        if g.initializer[i].name not in used:
            del g.initializer[i]


# Roles whose silenced value is 1, not 0 (a zero variance or divisor would make inf, not silence).
_ONE_ROLES = {"variance", "divisor"}


def apply_mask(analysis: ChannelAnalysis, removed_labels: np.ndarray) -> onnx.ModelProto:
    """The original model with the removed channels' weights set to zero: the pruning oracle."""
    graph = analysis.graph
    removed = analysis.removed_positions(removed_labels)
    model = _copy_without_weights(graph.model)
    by_tensor: dict[str, list[tuple[int, np.ndarray]]] = {}
    for ref, pos in removed.items():
        by_tensor.setdefault(ref.tensor, []).append((ref.axis, pos))
    for t in graph.model.graph.initializer:
        cuts = by_tensor.get(t.name)
        array = graph.initializer_value(t.name)
        zero = zero_point_fill(graph, t.name) if cuts else None
        if not cuts or (array.dtype.kind != "f" and zero is None):
            model.graph.initializer.append(t)  # zero points stay: the quantized data they serve is silenced
            continue
        model.graph.initializer.append(
            numpy_helper.from_array(silence(array, cuts, analysis.roles.get(t.name), zero), t.name)
        )

    def mask(t: onnx.TensorProto) -> onnx.TensorProto | None:
        array = graph.initializer_value(t.name)
        if t.name not in by_tensor or array.dtype.kind != "f":
            return None
        return numpy_helper.from_array(silence(array, by_tensor[t.name], analysis.roles.get(t.name)), t.name)

    replace_branch_initializers(model.graph, descended(graph), mask)
    return model


def silence(
    array: np.ndarray, cuts: list[tuple[int, np.ndarray]], role: str | None = None, zero: np.ndarray | None = None
) -> np.ndarray:
    """A copy of `array` with each cut's positions silenced the way `apply_mask` silences channels.

    Args:
        array: a parameter's values.
        cuts: ``(axis, positions)`` pairs to silence.
        role: the parameter's role in the channel analysis; variances and divisors get 1 (a zero would make
            inf, not silence), everything else 0.
        zero: for a quantized parameter, its zero point broadcast to its shape (`quantized.zero_point_fill`):
            the integer that dequantizes to 0.
    """
    out = array.copy()
    fill = 1 if role in _ONE_ROLES else 0
    for axis, positions in cuts:
        index: list[slice | np.ndarray] = [slice(None)] * out.ndim
        index[axis] = positions
        out[tuple(index)] = fill if zero is None else zero[tuple(index)]
    return out


def apply_takes(
    graph: ModelGraph, takes: dict[DimRef, np.ndarray], values: dict[str, np.ndarray] | None = None
) -> onnx.ModelProto:
    """A new model keeping, on every dim in `takes`, the positions listed there in that order.

    The general form of `apply_plan`: a take may narrow a dim, reorder it, or both, and each dim has its own
    (unconstrained pruning gives coupled dims different widths). Initializers are taken from `values` where
    given (e.g. silenced copies), else from the model; rules fix every node touching a narrowed dim.
    """
    values = values or {}
    removed: dict[DimRef, np.ndarray] = {}
    by_tensor: dict[str, list[tuple[int, np.ndarray]]] = {}
    for ref, take in takes.items():
        gone = np.setdiff1d(np.arange(graph.static_size(ref.tensor, ref.axis)), take)
        if len(gone):
            removed[ref] = gone
        by_tensor.setdefault(ref.tensor, []).append((ref.axis, take))
    model = _copy_without_weights(graph.model)
    g = model.graph
    for t in graph.model.graph.initializer:
        if t.name not in by_tensor and t.name not in values:
            g.initializer.append(t)
            continue
        array = values.get(t.name)
        array = graph.initializer_value(t.name) if array is None else array
        for axis, take in by_tensor.get(t.name, []):
            array = np.take(array, take, axis=axis)
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), t.name))

    def take_branch(t: onnx.TensorProto) -> onnx.TensorProto | None:
        if t.name not in by_tensor and t.name not in values:
            return None
        array = values.get(t.name)
        array = graph.initializer_value(t.name) if array is None else array
        for axis, kept in by_tensor.get(t.name, []):
            array = np.take(array, kept, axis=axis)
        return numpy_helper.from_array(np.ascontiguousarray(array), t.name)

    replace_branch_initializers(g, descended(graph), take_branch)
    _rewrite_nodes(g, graph, removed)
    return model


def _rewrite_nodes(g: onnx.GraphProto, graph: ModelGraph, removed: dict[DimRef, np.ndarray]) -> None:
    """Let each rule fix the attributes and shape constants of the nodes whose channels changed, then drop
    initializers nothing reads any more. Rules read the original nodes (attributes, shape sources) and
    edit the copies in `g`."""
    ctx = RewriteContext(graph, removed)
    nodes = {n.name: n for n in g.node}
    originals = {n.name: n for n in graph.nodes}
    # Nodes of descended If branches have names unique in the model (`subgraphs`): one namespace serves all.
    inner = descended(graph)
    for n in descended_nodes(g, inner):
        nodes.setdefault(n.name, n)
    for n in analysed_nodes(graph):
        originals.setdefault(n.name, n)
    fix_branch_types(g, inner, lambda name, axis: _changed_size(ctx, name, axis))
    for node in nodes.values():
        rule = RULES.get(node.domain, node.op_type, opset_of(graph.model, node.domain) or None)
        if rule is not None and _touches_changed(node, ctx):
            rule.rewrite(node, ctx)
    _materialize_edits(g, nodes, originals, ctx)
    _replace_nodes(g, ctx.node_replacements)
    _remove_unused_initializers(g)


def _replace_nodes(g: onnx.GraphProto, replacements: dict[str, tuple[list[onnx.NodeProto], dict]]) -> None:
    """Splice each replaced node's nodes in at its position, in whichever (branch) graph holds it."""
    if not replacements:
        return
    for graph in list(all_graphs(g)):
        if not any(n.name in replacements for n in graph.node):
            continue
        spliced: list[onnx.NodeProto] = []
        for node in graph.node:
            if node.name not in replacements:
                spliced.append(node)
                continue
            new_nodes, constants = replacements[node.name]
            spliced.extend(new_nodes)
            graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
        kept = [onnx.NodeProto() for _ in spliced]
        for dst, src in zip(kept, spliced):
            dst.CopyFrom(src)
        del graph.node[:]
        graph.node.extend(kept)
