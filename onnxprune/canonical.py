"""Canonical form: the normalisation steps every model goes through before analysis.

Exporters differ in ways that do not matter to pruning but would otherwise leak into every rule:
weights held in ``Constant`` nodes (Paddle) or behind ``Identity`` (TensorFlow, some torch paths),
weights stored in another layout behind a ``Transpose``/``Reshape`` (transformer exports keep Linear
weights as [out, in] and transpose them in the graph), initializers also listed as graph inputs
(IR < 4), unnamed nodes, and small shape computations made of constants (torch's legacy exporter
builds Reshape targets with Unsqueeze/Concat of constants). `normalize` turns all of these into one
canonical form: weights are initializers in the layout their consumer reads, every node has a unique
name, constant shape arithmetic is folded, and weight parametrizations (weight norm) become the weight
they compute (`parametrizations`). `fold_static_shapes` folds sizes that shape inference made
static; `importer.canonicalize` alternates it with `shape_inference.infer_shapes`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune import external as ext
from onnxprune.errors import UnsupportedModelError
from onnxprune.graph import ModelGraph, subgraph_reads
from onnxprune.onnx_utils import all_graphs, node_subgraphs, numel, opset_of
from onnxprune.parametrizations import fold_parametrizations
from onnxprune.sharing import (
    FLOAT_TYPES,
    genuine_ties,
    unshare_dequantized_constants,
    unshare_small_initializers,
    uses,
)

MIN_OPSET = 7


def normalize(model: onnx.ModelProto, inplace: bool = False) -> tuple[onnx.ModelProto, bool]:
    """Return an equivalent model in canonical form, and whether anything changed.

    The input proto is not modified unless `inplace` (the importer owns a freshly loaded model and
    saves copying every weight).
    """
    out = model
    if not inplace:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    g = out.graph
    opset = opset_of(out)
    if opset and opset < MIN_OPSET:
        raise UnsupportedModelError(f"opset {opset} is too old (need >= {MIN_OPSET})")
    changed = False
    changed |= _name_nodes(g)
    changed |= _negative_dims_to_symbols(g)
    changed |= _drop_initializer_inputs(out)
    if out.ir_version < 4:  # the canonical form keeps initializers out of the inputs (IR >= 4)
        out.ir_version = 4
        changed = True
    changed |= _constants_to_initializers(g)
    changed |= _branch_constants_to_initializers(g)
    changed |= _fold_constant_shape_ops(g, opset or 17)
    changed |= _fold_weight_layout_ops(g, opset or 17)
    changed |= fold_parametrizations(g, opset or 17)
    changed |= remove_dead_code(g)
    changed |= unshare_dequantized_constants(g)
    changed |= unshare_small_initializers(g)
    return out, changed


def _negative_dims_to_symbols(g: onnx.GraphProto) -> bool:
    """Some exporters (Paddle) declare dynamic sizes as -1; ONNX wants a symbol or nothing."""
    changed = False
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if not vi.type.HasField("tensor_type"):
            continue
        for j, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value < 0:
                d.Clear()
                d.dim_param = f"{vi.name}_dim{j}"
                changed = True
    return changed


def _name_nodes(g: onnx.GraphProto) -> bool:
    """Give every node, in the main graph and in every If/Loop/Scan body, a name unique in the model.

    Reports and the analysis address nodes by name; exporters often leave branch nodes unnamed or reuse
    a name in each branch (silero-vad's If on the sample rate), which kept whole models frozen.
    """
    seen: set[str] = set()
    changed = False
    for sub in all_graphs(g):
        for i, node in enumerate(sub.node):
            if not node.name or node.name in seen:
                base = node.name or f"{node.op_type}_{i}"
                name, k = base, 0
                while name in seen:
                    k += 1
                    name = f"{base}_{k}"
                node.name = name
                changed = True
            seen.add(node.name)
    return changed


def _drop_initializer_inputs(model: onnx.ModelProto) -> bool:
    g = model.graph
    inits = {t.name for t in g.initializer}
    keep = [i for i in g.input if i.name not in inits]
    if len(keep) == len(g.input):
        return False
    del g.input[:]
    g.input.extend(keep)
    if model.ir_version < 4:
        model.ir_version = 4
    return True


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None  # sparse_value / string values stay as nodes


def _constants_to_initializers(g: onnx.GraphProto, bypass_identity: bool = True) -> bool:
    """Constant nodes become initializers; Identity of an initializer is bypassed (`bypass_identity`:
    off in If/Loop/Scan bodies, whose nested bodies may read the Identity's output by name)."""
    outputs = {o.name for o in g.output}
    inits = {t.name: t for t in g.initializer}
    keep: list[onnx.NodeProto] = []
    rename: dict[str, str] = {}
    changed = False
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            value = _constant_value(node)
            if value is not None:
                t = numpy_helper.from_array(value, node.output[0])
                g.initializer.append(t)
                inits[t.name] = t
                changed = True
                continue
        if (
            bypass_identity
            and node.op_type == "Identity"
            and node.domain in ("", "ai.onnx")
            and rename.get(node.input[0], node.input[0]) in inits
            and node.output[0] not in outputs
        ):
            src = inits[rename.get(node.input[0], node.input[0])]
            if src.data_type in FLOAT_TYPES:
                # torch's exporter stores parameters of equal values once and names the others through an
                # Identity: each is its own parameter again (a projection shortcut's BatchNorm bias equals the
                # block's last one, both trained by the same gradient from zero), not a tie (`sharing`)
                copy = onnx.TensorProto()
                copy.CopyFrom(src)
                copy.name = node.output[0]
                g.initializer.append(copy)
                inits[copy.name] = copy
            else:
                rename[node.output[0]] = src.name
            changed = True
            continue
        keep.append(node)
    if changed:
        for node in keep:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
        _set_nodes(g, keep)
    return changed


def _branch_constants_to_initializers(g: onnx.GraphProto) -> bool:
    """Constant nodes of every If/Loop/Scan body (any depth) become that body's initializers: rules read
    Slice/Pad/Reshape arguments there as they do in the main graph (silero-vad's branches hold ~60)."""
    changed = False
    for node in g.node:
        for sub in node_subgraphs(node):  # walked after the parent's rewrite: nodes may have been copied
            changed |= _constants_to_initializers(sub, bypass_identity=False)
            changed |= _branch_constants_to_initializers(sub)
    return changed


# Constant folding: nodes whose inputs are all constants are evaluated once (onnx's reference
# evaluator), but only for small tensors — shape arithmetic, masks, index vectors — never to rewrite
# large weights (folding a Cast of fp16 weights would double the model). Quantization is never folded:
# a QDQ model's small weights would come back as floats (`quantized`).
_FOLD_LIMIT = 1 << 16  # elements, inputs and output
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
            "Bernoulli", "Constant", "If", "Loop", "Scan", "SequenceConstruct", "QuantizeLinear",
            "DequantizeLinear", "DynamicQuantizeLinear"}  # fmt: skip


def _evaluate(node: onnx.NodeProto, args: list[np.ndarray], opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    inputs = [numpy_helper.from_array(a, f"i{k}") for k, a in enumerate(args)]
    single = onnx.helper.make_node(
        node.op_type, [f"i{k}" if n else "" for k, n in enumerate(node.input)],
        [f"o{k}" for k in range(len(node.output))], domain=node.domain,
    )
    single.attribute.extend(node.attribute)
    graph = onnx.helper.make_graph(
        [single], "fold", [], [onnx.helper.make_tensor_value_info(f"o{k}", 0, None) for k in range(len(node.output))],
        [t for t, n in zip(inputs, node.input) if n],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    results = ReferenceEvaluator(model).run(None, {})
    if not isinstance(results, list):  # a dict only when intermediate results are asked for
        raise TypeError(f"ReferenceEvaluator returned {type(results).__name__}, not a list of outputs")
    return results


def _fold_constant_shape_ops(g: onnx.GraphProto, opset: int = 17, outer: dict | None = None) -> bool:
    """Fold small constant arithmetic of `g`; then of its If/Loop/Scan bodies, where the enclosing graphs'
    integer initializers (`outer`) are constants too (torchvision's batched NMS slices with axes Unsqueezed from
    one)."""
    outputs = {o.name for o in g.output}
    local = {t.name: t for t in g.initializer}
    inits = {**(outer or {}), **local}
    ties = genuine_ties(g, local, uses(g))  # a tied weight folded per reader would be stored once per reader
    values: dict[str, np.ndarray] = {}

    def value(name: str) -> np.ndarray | None:
        if name in values:
            return values[name]
        t = inits.get(name)
        if t is None or numel(t) > _FOLD_LIMIT or t.data_location == onnx.TensorProto.EXTERNAL or name in ties:
            return None
        values[name] = numpy_helper.to_array(t)
        return values[name]

    keep: list[onnx.NodeProto] = []
    changed = False
    for node in g.node:
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.op_type not in _NO_FOLD
            and node.input
            and not any(o in outputs for o in node.output)
            and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        )
        if foldable:
            args = [value(name) if name else np.zeros(0) for name in node.input]
            known = [a for a in args if a is not None]
            if len(known) == len(args):
                results: list[np.ndarray] | None
                try:
                    results = _evaluate(node, known, opset)
                except Exception:
                    results = None
                if results is not None and all(np.asarray(r).size <= _FOLD_LIMIT for r in results):
                    for name, r in zip(node.output, results):
                        if name:
                            t = numpy_helper.from_array(np.asarray(r), name)
                            g.initializer.append(t)
                            inits[name] = t
                            values[name] = np.asarray(r)
                    changed = True
                    continue
        keep.append(node)
    if changed:
        _set_nodes(g, keep)
    # Integer constants only: a float weight folded into a body would be a second copy there (silero-vad's LSTM
    # weights Unsqueezed inside its branches), which no group could shrink.
    sizes = {name: t for name, t in inits.items() if t.data_type in _SIZE_TYPES}
    for node in g.node:
        for sub in node_subgraphs(node):
            changed |= _fold_constant_shape_ops(sub, opset, sizes)
    return changed


_SIZE_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


# Layout ops applied to a weight (any size): the export stores a Linear weight as [out, in] and feeds
# MatMul through Transpose(W), or reshapes a weight in the graph. Folding them makes the consumer read an
# initializer, which the channel rules, calibration statistics and repairs need. Transpose moves data (a
# new array; lazy external weights are read once); Reshape/Squeeze/Unsqueeze/Flatten only change dims,
# so the folded tensor keeps the payload as it is (raw bytes, typed fields or the external reference).
_LAYOUT_OPS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}


def _fold_weight_layout_ops(g: onnx.GraphProto, opset: int = 17) -> bool:
    """Replace layout ops whose data input is an initializer by the re-laid-out initializer.

    A weight that is also read elsewhere and not a coincidence (`onnxprune.sharing`) is a genuine tie (a tied
    embedding feeding Gather and, transposed, the output projection): it stays as it is rather than being
    stored twice.
    """
    inits = {t.name: t for t in g.initializer}
    ties = genuine_ties(g, inits, uses(g))
    outputs = {o.name for o in g.output}

    keep: list[onnx.NodeProto] = []
    changed = False
    for node in g.node:
        src = inits.get(node.input[0]) if node.input else None
        folded = None
        plain = node.domain in ("", "ai.onnx") and bool(node.output) and node.output[0] not in outputs
        if src is not None and node.op_type in _LAYOUT_OPS and plain and src.name not in ties:
            folded = _fold_layout(node, src, inits, opset)
        elif plain and node.op_type in ("Slice", "Concat"):
            data = [n for n in (node.input[:1] if node.op_type == "Slice" else node.input) if n]
            if data and all(n in inits and n not in ties for n in data):  # no second copy of a tie
                folded = _fold_select(node, inits, opset)
        if folded is None:
            keep.append(node)
            continue
        g.initializer.append(folded)
        inits[folded.name] = folded
        changed = True
    if changed:
        _set_nodes(g, keep)
    return changed


def _fold_select(node: onnx.NodeProto, inits: dict, opset: int) -> onnx.TensorProto | None:
    """A constant `Slice` of an initializer or `Concat` of initializers, computed; None when unsafe.

    Exports without constant folding assemble weights this way (torch's LSTM reorders its gate blocks by
    slicing the weight into gates and concatenating them back): folded, the weight is an initializer the
    layer reads directly, so its channels couple with the layer instead of with pieces of a copy.
    """
    at = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    data = node.input[:1] if node.op_type == "Slice" else [n for n in node.input if n]
    tensors = [inits[n] for n in data]
    if any(ext.MMAP_TYPES.get(t.data_type) is None or t.data_type != tensors[0].data_type for t in tensors):
        return None  # packed / string / bfloat16 / mixed types: left to onnxruntime
    if any(t.data_location == onnx.TensorProto.EXTERNAL and not ext.is_lazy(t) for t in tensors):
        return None
    arrays = [ext.tensor_array(t) for t in tensors]
    if node.op_type == "Concat":
        if "axis" not in at or any(a.ndim != arrays[0].ndim for a in arrays):
            return None
        value = np.concatenate(arrays, axis=int(at["axis"]))
    else:
        if opset < 10:
            bounds = [at.get("starts"), at.get("ends"), at.get("axes"), None]
        else:
            bounds = []
            for name in list(node.input[1:5]) + [""] * (5 - len(node.input)):
                t = inits.get(name) if name else None
                if name and (t is None or numel(t) > _FOLD_LIMIT):
                    return None
                bounds.append(numpy_helper.to_array(t).reshape(-1).tolist() if t is not None else None)
        starts, ends, axes, steps = bounds
        if starts is None or ends is None:
            return None
        rank = arrays[0].ndim
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        index = [slice(None)] * rank
        for start, end, axis, step in zip(starts, ends, axes, steps):
            if step == 0:
                return None
            index[int(axis) % rank] = slice(int(start), int(end), int(step))
        value = arrays[0][tuple(index)]
    out = numpy_helper.from_array(np.ascontiguousarray(value), node.output[0])
    return out if out.data_type == tensors[0].data_type else None


def _fold_layout(node: onnx.NodeProto, src: onnx.TensorProto, inits: dict, opset: int) -> onnx.TensorProto | None:
    """The tensor `node` computes from initializer `src`, or None when it cannot be folded safely."""
    at = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    dims = [int(d) for d in src.dims]
    if node.op_type == "Transpose":
        dtype = ext.MMAP_TYPES.get(src.data_type)
        if dtype is None or (src.data_location == onnx.TensorProto.EXTERNAL and not ext.is_lazy(src)):
            return None  # packed / string / bfloat16 types: left to onnxruntime
        perm = [int(p) for p in at.get("perm", range(len(dims) - 1, -1, -1))]
        if sorted(perm) != list(range(len(dims))):
            return None
        value = np.ascontiguousarray(np.transpose(ext.tensor_array(src), perm))
        out = numpy_helper.from_array(value, node.output[0])
        if out.data_type != src.data_type:
            return None
        return out
    # The rest only change dims: the payload is kept, in whatever form it is stored.
    args = []
    for name in node.input[1:]:
        t = inits.get(name) if name else None
        if name and (t is None or numel(t) > _FOLD_LIMIT or t.data_location == onnx.TensorProto.EXTERNAL):
            return None
        args.append(numpy_helper.to_array(t).astype(np.int64).reshape(-1).tolist() if t is not None else None)
    new = _layout_dims(node.op_type, dims, at, args, opset)
    if new is None or any(d < 0 for d in new) or int(np.prod(new, dtype=np.int64)) != numel(src):
        return None
    out = onnx.TensorProto()
    out.CopyFrom(src)
    out.name = node.output[0]
    del out.dims[:]
    out.dims.extend(new)
    return out


def _layout_dims(op: str, dims: list[int], at: dict, args: list, opset: int) -> list[int] | None:
    """Output dims of a dims-only layout op on a tensor of `dims`, None if not foldable."""
    rank = len(dims)
    if op == "Reshape":
        shape = args[0] if args else None
        if shape is None or shape.count(-1) > 1:
            return None
        if not at.get("allowzero", 0):
            if any(s == 0 and k >= rank for k, s in enumerate(shape)):
                return None
            shape = [dims[k] if s == 0 else s for k, s in enumerate(shape)]
        if -1 in shape:
            rest = int(np.prod([s for s in shape if s != -1], dtype=np.int64))
            total = int(np.prod(dims, dtype=np.int64))
            if rest == 0 or total % rest:
                return None
            shape = [total // rest if s == -1 else s for s in shape]
        return shape
    if op == "Flatten":
        axis = int(at.get("axis", 1))
        axis += rank if axis < 0 else 0
        if not 0 <= axis <= rank:
            return None
        return [int(np.prod(dims[:axis], dtype=np.int64)), int(np.prod(dims[axis:], dtype=np.int64))]
    axes = at.get("axes") if opset < 13 else (args[0] if args else None)
    if op == "Unsqueeze":
        if axes is None:
            return None
        out_rank = rank + len(axes)
        axes = sorted(a + out_rank if a < 0 else a for a in axes)
        if len(set(axes)) != len(axes) or any(not 0 <= a < out_rank for a in axes):
            return None
        it = iter(dims)
        return [1 if k in axes else next(it) for k in range(out_rank)]
    if op == "Squeeze":
        if axes is None:
            return [d for d in dims if d != 1]
        axes = {a + rank if a < 0 else a for a in axes}
        if any(not 0 <= a < rank or dims[a] != 1 for a in axes):
            return None
        return [d for k, d in enumerate(dims) if k not in axes]
    return None


def remove_dead_code(g: onnx.GraphProto) -> bool:
    """Drop nodes and initializers that no graph output depends on (subgraph references count)."""
    needed = {o.name for o in g.output}
    live: list[onnx.NodeProto] = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output if o):
            live.append(node)
            needed.update(i for i in node.input if i)
            needed.update(subgraph_reads(node))
    live.reverse()
    changed = len(live) != len(g.node)
    if changed:
        _set_nodes(g, live)
    keep_inits = [t for t in g.initializer if t.name in needed]
    if len(keep_inits) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep_inits)
        changed = True
    return changed


def fold_static_shapes(model: onnx.ModelProto) -> bool:
    """Replace `Shape(x)` (and `Gather(Shape(x), k)`) by constants where x's inferred sizes are static.

    Exporters compute sizes at run time even for static models (torch's `chunk` becomes
    Shape/Gather/Div/Slice); folding them lets the channel rules see constant bounds.
    """
    graph = ModelGraph(model)
    g = model.graph
    outputs = {o.name for o in g.output}
    keep, changed = [], False
    for node in g.node:
        value = None
        if node.op_type == "Shape" and node.output[0] not in outputs:
            shape = graph.shape(node.input[0])
            at = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if shape is not None:
                part = shape[at.get("start", 0) : at.get("end", len(shape))] if at else shape
                if all(isinstance(d, int) for d in part):
                    value = np.array(part, dtype=np.int64)
        elif node.op_type == "Gather" and node.output[0] not in outputs:
            src = graph.producer.get(node.input[0])
            idx = graph.const(node.input[1])
            if src is not None and src.op_type == "Shape" and idx is not None and not src.attribute:
                shape = graph.shape(src.input[0])
                if shape is not None:
                    picked = [shape[int(i)] for i in idx.reshape(-1)]
                    if all(isinstance(d, int) for d in picked):
                        value = np.array(picked, dtype=np.int64).reshape(idx.shape)
        if value is not None:
            g.initializer.append(numpy_helper.from_array(value, node.output[0]))
            changed = True
            continue
        keep.append(node)
    if changed:
        _set_nodes(g, keep)
        _fold_constant_shape_ops(g, opset_of(model) or 17)
        remove_dead_code(g)
    return changed


def _set_nodes(g: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Replace `g`'s node list (the passes above filter it and rebuild it only when something changed)."""
    del g.node[:]
    g.node.extend(nodes)
