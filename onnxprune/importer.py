"""Framework-agnostic importer: load, validate and normalise an ONNX model.

Exporters differ in ways that do not matter to pruning but would otherwise leak into every rule:
weights held in ``Constant`` nodes (Paddle) or behind ``Identity`` (TensorFlow, some torch paths),
weights stored in another layout behind a ``Transpose``/``Reshape`` (transformer exports keep Linear
weights as [out, in] and transpose them in the graph), initializers also listed as graph inputs
(IR < 4), unnamed nodes, and small shape computations made of constants (torch's legacy exporter
builds Reshape targets with Unsqueeze/Concat of constants). The
importer turns all of these into one canonical form: weights are initializers in the layout their
consumer reads, every node has a unique name, constant shape arithmetic is folded, and shapes are inferred.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import ModelError, UnsupportedModelError

# Models whose protobuf would exceed this are saved with external data.
PROTOBUF_LIMIT = 2**31 - 1
MIN_OPSET = 7


def load_model(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Load a model file with its external data, refusing anything that is not a valid ONNX model.

    Raises:
        ModelError: missing, empty, truncated or non-ONNX file; a model that fails the checker.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a directory, not an ONNX file")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: file is empty")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ValueError...
        raise ModelError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{path}: not an ONNX model (no graph)")
    _load_external_data(model, path.parent)
    if check:
        check_model(model, path)
    return model


def _load_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Validate external data references (refusing paths outside the folder); large tensors stay lazy."""
    from onnxprune.external import attach

    attach(model, base_dir)


def check_model(model: onnx.ModelProto, path: Path | None = None) -> None:
    """Run the ONNX checker with shape checking; raise ModelError with one line on failure.

    The checker runs on a copy whose large weights are replaced by typed graph inputs (fast for any
    size, and possible beyond the 2 GB protobuf limit); weight byte counts are checked here.
    """
    where = f"{path}: " if path else ""
    try:
        _check_weight_sizes(model)
        onnx.checker.check_model(light_copy(model), full_check=True)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{where}model fails the ONNX checker: {_first_line(exc)}") from None


def _check_weight_sizes(model: onnx.ModelProto) -> None:
    from onnx.helper import tensor_dtype_to_np_dtype

    for t in model.graph.initializer:
        if t.raw_data and t.data_location != onnx.TensorProto.EXTERNAL:
            try:
                itemsize = np.dtype(tensor_dtype_to_np_dtype(t.data_type)).itemsize
            except Exception:
                continue
            if t.data_type in (onnx.TensorProto.STRING,) or itemsize == 0:
                continue
            if len(t.raw_data) != _numel(t) * itemsize and t.data_type not in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
                raise ModelError(f"initializer {t.name!r} holds {len(t.raw_data)} bytes for shape {list(t.dims)}")


LIGHT_LIMIT = 1 << 16  # initializers up to this many elements stay in light copies (shape constants)


def light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every large initializer replaced by a typed graph input of the same shape."""
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
        if _numel(t) <= LIGHT_LIMIT and t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)
        elif t.name not in names:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    if light.ir_version < 4:
        light.ir_version = 4
    return light


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# --------------------------------------------------------------------------------------------------
# Normalisation


def opset_of(model: onnx.ModelProto, domain: str = "") -> int:
    for imp in model.opset_import:
        if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
            return imp.version
    return 0


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
    changed |= _fold_constant_shape_ops(g, opset or 17)
    changed |= _fold_weight_layout_ops(g, opset or 17)
    changed |= _remove_dead_code(g)
    changed |= _unshare_small_initializers(g)
    return out, changed


# Exporters deduplicate identical initializers (freshly initialised BatchNorm scales are all ones), which
# would couple unrelated layers. Shared tensors up to this size get one copy per use; larger ones are
# genuine ties (embeddings) and stay shared, so their coupling is real.
UNSHARE_LIMIT = 1 << 20


def _unshare_small_initializers(g: onnx.GraphProto) -> bool:
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            if name in inits:
                uses[name] = uses.get(name, 0) + 1
    outputs = {o.name for o in g.output}
    shared = {n for n, k in uses.items() if k > 1 and _numel(inits[n]) <= UNSHARE_LIMIT and n not in outputs}
    shared = {n for n in shared if inits[n].data_type in (1, 10, 11, 16)}  # weights, not shape constants
    if not shared:
        return False
    taken = set(inits) | {o for n in g.node for o in n.output}
    seen: dict[str, int] = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            if name not in shared:
                continue
            seen[name] = seen.get(name, 0) + 1
            if seen[name] == 1:
                continue  # the first use keeps the original
            new, k = f"{name}__{seen[name]}", seen[name]
            while new in taken:
                k += 1
                new = f"{name}__{k}"
            taken.add(new)
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[name])
            copy.name = new
            g.initializer.append(copy)
            node.input[i] = new
    return True


def _negative_dims_to_symbols(g: onnx.GraphProto) -> bool:
    """Some exporters (Paddle) declare dynamic sizes as -1; ONNX wants a symbol or nothing."""
    changed = False
    for k, vi in enumerate(list(g.input) + list(g.output) + list(g.value_info)):
        if not vi.type.HasField("tensor_type"):
            continue
        for j, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value < 0:
                d.Clear()
                d.dim_param = f"{vi.name}_dim{j}"
                changed = True
    return changed


def _name_nodes(g: onnx.GraphProto) -> bool:
    seen: set[str] = set()
    changed = False
    for i, node in enumerate(g.node):
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


def _constants_to_initializers(g: onnx.GraphProto) -> bool:
    """Constant nodes become initializers; Identity of an initializer is bypassed."""
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
            node.op_type == "Identity"
            and node.domain in ("", "ai.onnx")
            and rename.get(node.input[0], node.input[0]) in inits
            and node.output[0] not in outputs
        ):
            rename[node.output[0]] = rename.get(node.input[0], node.input[0])
            changed = True
            continue
        keep.append(node)
    if changed:
        for node in keep:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
        del g.node[:]
        g.node.extend(keep)
    return changed


# Constant folding: nodes whose inputs are all constants are evaluated once (onnx's reference
# evaluator), but only for small tensors — shape arithmetic, masks, index vectors — never to rewrite
# large weights (folding a Cast of fp16 weights would double the model).
_FOLD_LIMIT = 1 << 16  # elements, inputs and output
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
            "Bernoulli", "Constant", "If", "Loop", "Scan", "SequenceConstruct"}  # fmt: skip


def _evaluate(node: onnx.NodeProto, args: list[np.ndarray], opset: int) -> list[np.ndarray] | None:
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
    return ReferenceEvaluator(model).run(None, {})


def _fold_constant_shape_ops(g: onnx.GraphProto, opset: int = 17) -> bool:
    outputs = {o.name for o in g.output}
    inits = {t.name: t for t in g.initializer}
    values: dict[str, np.ndarray] = {}

    def value(name: str) -> np.ndarray | None:
        if name in values:
            return values[name]
        t = inits.get(name)
        if t is None or _numel(t) > _FOLD_LIMIT or t.data_location == onnx.TensorProto.EXTERNAL:
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
            if all(a is not None for a in args):
                try:
                    results = _evaluate(node, args, opset)
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
        del g.node[:]
        g.node.extend(keep)
    return changed


# Layout ops applied to a weight (any size): the export stores a Linear weight as [out, in] and feeds
# MatMul through Transpose(W), or reshapes a weight in the graph. Folding them makes the consumer read an
# initializer, which the channel rules, calibration statistics and repairs need. Transpose moves data (a
# new array; lazy external weights are read once); Reshape/Squeeze/Unsqueeze/Flatten only change dims,
# so the folded tensor keeps the payload as it is (raw bytes, typed fields or the external reference).
_LAYOUT_OPS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}


def _fold_weight_layout_ops(g: onnx.GraphProto, opset: int = 17) -> bool:
    """Replace layout ops whose data input is an initializer by the re-laid-out initializer.

    A weight that is also read elsewhere and larger than `UNSHARE_LIMIT` is a genuine tie (a tied
    embedding feeding Gather and, transposed, the output projection): it stays as it is rather than
    being stored twice.
    """
    from onnxprune import external as ext

    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for node in g.node:
        for name in list(node.input) + sorted(_subgraph_inputs(node)):
            uses[name] = uses.get(name, 0) + 1
    outputs = {o.name for o in g.output}
    for name in outputs:
        uses[name] = uses.get(name, 0) + 1
    keep: list[onnx.NodeProto] = []
    changed = False
    for node in g.node:
        src = inits.get(node.input[0]) if node.input else None
        folded = None
        if (
            src is not None
            and node.op_type in _LAYOUT_OPS
            and node.domain in ("", "ai.onnx")
            and node.output[0] not in outputs
            and (uses.get(src.name, 0) == 1 or _numel(src) <= UNSHARE_LIMIT)
        ):
            folded = _fold_layout(node, src, inits, opset, ext)
        if folded is None:
            keep.append(node)
            continue
        g.initializer.append(folded)
        inits[folded.name] = folded
        uses[src.name] -= 1
        changed = True
    if changed:
        del g.node[:]
        g.node.extend(keep)
    return changed


def _fold_layout(node, src: onnx.TensorProto, inits: dict, opset: int, ext) -> onnx.TensorProto | None:
    """The tensor `node` computes from initializer `src`, or None when it cannot be folded safely."""
    at = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    dims = [int(d) for d in src.dims]
    if node.op_type == "Transpose":
        dtype = ext._MMAP_TYPES.get(src.data_type)
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
        if name and (t is None or _numel(t) > _FOLD_LIMIT or t.data_location == onnx.TensorProto.EXTERNAL):
            return None
        args.append(numpy_helper.to_array(t).astype(np.int64).reshape(-1).tolist() if t is not None else None)
    new = _layout_dims(node.op_type, dims, at, args, opset)
    if new is None or any(d < 0 for d in new) or int(np.prod(new, dtype=np.int64)) != _numel(src):
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


def _numel(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def _remove_dead_code(g: onnx.GraphProto) -> bool:
    """Drop nodes and initializers that no graph output depends on (subgraph references count)."""
    needed = {o.name for o in g.output}
    live: list[onnx.NodeProto] = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output if o):
            live.append(node)
            needed.update(i for i in node.input if i)
            needed.update(_subgraph_inputs(node))
    live.reverse()
    changed = len(live) != len(g.node)
    if changed:
        del g.node[:]
        g.node.extend(live)
    keep_inits = [t for t in g.initializer if t.name in needed]
    if len(keep_inits) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep_inits)
        changed = True
    return changed


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the outer scope (conservatively: every name they use)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        for sub in graphs:
            for n in sub.node:
                names.update(i for i in n.input if i)
                names.update(_subgraph_inputs(n))
            names.update(o.name for o in sub.output)
    return names


# Ops whose first output has the first input's shape and type; used where onnx's inference gives up
# (e.g. function ops such as GroupNormalization-21).
SAME_SHAPE_OPS = {
    "GroupNormalization", "LayerNormalization", "InstanceNormalization", "BatchNormalization",
    "RMSNormalization", "Relu", "Sigmoid", "Tanh", "Gelu", "HardSwish", "HardSigmoid", "LeakyRelu",
    "Softmax", "LogSoftmax", "Dropout", "Identity", "Clip", "Erf", "Mish", "Softplus", "Elu", "Selu", "PRelu",
}  # fmt: skip


def infer_shapes(model: onnx.ModelProto, symbolic: bool = True) -> onnx.ModelProto:
    """Shape inference with data propagation, completed for same-shape ops onnx cannot infer.

    Updates `model.graph.value_info` in place and returns the model.
    """
    model = _infer_once(model, symbolic)
    for _ in range(8):
        if not _fill_same_shape(model):
            break
        model = _infer_once(model, False)
    return model


def _fill_same_shape(model: onnx.ModelProto) -> bool:
    g = model.graph
    known = {vi.name: vi for vi in list(g.input) + list(g.value_info) + list(g.output) if _has_shape(vi)}
    filled = False
    for node in g.node:
        if node.op_type not in SAME_SHAPE_OPS or not node.output or node.output[0] in known:
            continue
        src = known.get(node.input[0]) if node.input else None
        if src is None:
            continue
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(src)
        vi.name = node.output[0]
        outputs = {o.name: o for o in g.output}
        if vi.name in outputs:
            outputs[vi.name].type.CopyFrom(src.type)
        else:
            g.value_info.append(vi)
        known[vi.name] = vi
        filled = True
    filled |= _fill_reshape_dims(model, known)
    return filled


def _fill_reshape_dims(model: onnx.ModelProto, known: dict) -> bool:
    """Complete Reshape output dims that onnx left unknown though the target names them.

    Dynamic-length exports build targets as Concat(Shape(x)[k], ..., const heads, const head_dim): each
    piece is a constant, a copy (0), or a size of another tensor; onnx gives up on the mix.
    """
    from onnxprune.graph import ModelGraph

    graph = ModelGraph(model)
    filled = False
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.output[0] not in known:
            continue
        vi = known[node.output[0]]
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") or d.HasField("dim_param") and not d.dim_param.startswith("unk__") for d in dims):
            continue
        elements = _target_elements(graph, node.input[1])
        in_shape = graph.shape(node.input[0])
        if elements is None or len(elements) != len(dims):
            continue
        elements = [in_shape[k] if e == 0 and in_shape and k < len(in_shape) else e for k, e in enumerate(elements)]
        if elements.count(-1) == 1 and in_shape is not None:
            elements[elements.index(-1)] = _infer_minus_one(list(in_shape), [e for e in elements if e != -1])
        for k, (d, e) in enumerate(zip(dims, elements)):
            if d.HasField("dim_value") or (d.HasField("dim_param") and not d.dim_param.startswith("unk__")):
                continue
            if e == 0 and in_shape is not None and k < len(in_shape):
                e = in_shape[k]
            if isinstance(e, int) and e > 0:
                d.Clear()
                d.dim_value = e
                filled = True
            elif isinstance(e, str) and e != d.dim_param and not e.startswith("unk__"):
                d.Clear()
                d.dim_param = e
                filled = True
    return filled


def _infer_minus_one(in_dims: list, out_dims: list):
    """The size a -1 in a Reshape target stands for, cancelling symbols on both sides; None if unknown."""
    in_dims, out_dims = list(in_dims), list(out_dims)
    for d in list(out_dims):
        if isinstance(d, str) and d in in_dims:
            in_dims.remove(d)
            out_dims.remove(d)
    if not all(isinstance(d, int) and d > 0 for d in in_dims + out_dims):
        return None
    num, den = int(np.prod(in_dims, dtype=np.int64)), int(np.prod(out_dims, dtype=np.int64))
    return num // den if den and num % den == 0 else None


def _target_elements(graph, name: str):
    """Per element of a 1-D shape tensor: an int, a dim symbol (str), or None when unknown."""
    value = graph.const(name)
    if value is not None:
        return [int(v) for v in value.reshape(-1)]
    node = graph.producer.get(name)
    if node is None:
        return None
    if node.op_type == "Concat":
        out = []
        for piece in node.input:
            part = _target_elements(graph, piece)
            if part is None:
                n = graph.size(piece, 0) if graph.rank(piece) == 1 else None
                if not isinstance(n, int):
                    return None
                part = [None] * n
            out += part
        return out
    if node.op_type in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
        return _target_elements(graph, node.input[0])
    if node.op_type == "Shape":
        shape = graph.shape(node.input[0])
        if shape is None:
            return None
        at = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        return [d if d else None for d in shape[at.get("start", 0) : at.get("end", len(shape))]]
    if node.op_type == "Gather":
        src = _target_elements(graph, node.input[0])
        idx = graph.const(node.input[1])
        if src is None or idx is None:
            return None
        try:
            return [src[int(i)] for i in idx.reshape(-1)]
        except IndexError:
            return None
    return None


def _has_shape(vi: onnx.ValueInfoProto) -> bool:
    return vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")


def _has_unknown_dims(model: onnx.ModelProto) -> bool:
    for vi in model.graph.value_info:
        if not _has_shape(vi):
            return True
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value") and (not d.HasField("dim_param") or d.dim_param.startswith("unk__")):
                return True
    return False


def _symbolic_module():
    """onnxruntime/tools/symbolic_shape_infer.py loaded by path: importing it through its package
    would import torch when torch is installed (seconds), for nothing."""
    import importlib.util
    import sys

    name = "_onnxprune_symbolic_shape_infer"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("onnxruntime")
    path = Path(spec.origin).parent / "tools" / "symbolic_shape_infer.py"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def _symbolic_infer(light: onnx.ModelProto) -> onnx.ModelProto | None:
    """onnxruntime's symbolic shape inference: follows shape arithmetic that onnx's inference drops
    (dynamic-length transformers: masks, run-time Reshape targets).

    Driven step by step rather than through `SymbolicShapeInference.infer_shapes`, which saves the
    model into the working directory when inference is incomplete; a partial result is still useful.
    """
    import contextlib
    import io

    try:
        SymbolicShapeInference = _symbolic_module().SymbolicShapeInference
    except Exception:
        return None
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            engine = SymbolicShapeInference(2**31 - 1, True, False, 0)
            engine._preprocess(light)
            while engine.run_:
                engine._infer_impl()
            engine._update_output_from_vi()
            return engine.out_mp_
    except Exception:
        return None


def _infer_once(model: onnx.ModelProto, symbolic: bool = True) -> onnx.ModelProto:
    """Infer on the light copy and graft the inferred value_info back (weights are never serialised)."""
    light = light_copy(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        return model
    if symbolic and _has_unknown_dims(inferred):  # slow (sympy): at most once per import
        inferred = _symbolic_infer(light) or inferred
    del model.graph.value_info[:]
    inits = {t.name for t in model.graph.initializer}
    model.graph.value_info.extend(vi for vi in inferred.graph.value_info if vi.name not in inits)
    outputs = {o.name: o for o in inferred.graph.output}
    for o in model.graph.output:
        if o.name in outputs and not _has_shape(o):
            o.type.CopyFrom(outputs[o.name].type)
    return model


def fold_static_shapes(model: onnx.ModelProto) -> bool:
    """Replace `Shape(x)` (and `Gather(Shape(x), k)`) by constants where x's inferred sizes are static.

    Exporters compute sizes at run time even for static models (torch's `chunk` becomes
    Shape/Gather/Div/Slice); folding them lets the channel rules see constant bounds.
    """
    from onnxprune.graph import ModelGraph

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
        del g.node[:]
        g.node.extend(keep)
        _fold_constant_shape_ops(g, opset_of(model) or 17)
        _remove_dead_code(g)
    return changed


def canonicalize(model: onnx.ModelProto, inplace: bool = False) -> tuple[onnx.ModelProto, bool]:
    """`normalize`, infer shapes, and fold sizes that became static; returns (model, changed).

    onnx's own inference runs first and between folding rounds (fast); onnxruntime's symbolic
    inference (slow) runs once at the end, only if sizes are still unknown.
    """
    model, changed = normalize(model, inplace)
    model = infer_shapes(model, symbolic=False)
    for _ in range(32):  # each round can make more sizes static
        if not fold_static_shapes(model):
            break
        changed = True
        del model.graph.value_info[:]
        model = infer_shapes(model, symbolic=False)
    if _has_unknown_dims(model):
        model = infer_shapes(model, symbolic=True)
    return model, changed


def fix_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """Set graph input sizes (e.g. a dynamic sequence length or image size) to static values in place.

    Static sizes let constant folding resolve run-time shape arithmetic, so more channels are prunable;
    the pruned model then accepts exactly these shapes.
    """
    inputs = {i.name: i for i in model.graph.input}
    for name, dims in shapes.items():
        if name not in inputs:
            raise UnsupportedModelError(f"--shape names {name!r}, which is not a model input ({', '.join(inputs)})")
        tt = inputs[name].type.tensor_type
        if len(tt.shape.dim) != len(dims):
            raise UnsupportedModelError(f"--shape {name}: model input has rank {len(tt.shape.dim)}, got {len(dims)} sizes")
        for d, v in zip(tt.shape.dim, dims):
            if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != v:
                raise UnsupportedModelError(f"--shape {name}: size {v} conflicts with the model's {d.dim_value}")
            d.Clear()
            d.dim_value = int(v)
    del model.graph.value_info[:]
    return model


def parse_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """`name=1,3,224,224` strings to a dict; raises UsageError on bad syntax."""
    from onnxprune.errors import UsageError

    out: dict[str, list[int]] = {}
    for spec in specs or []:
        name, _, dims = spec.partition("=")
        try:
            values = [int(v) for v in dims.replace("x", ",").split(",") if v.strip()]
        except ValueError:
            values = []
        if not name or not values or any(v <= 0 for v in values):
            raise UsageError(f"bad --shape {spec!r}: expected NAME=D1,D2,... with positive sizes")
        out[name] = values
    return out


def import_model(path: str | os.PathLike, shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """Load, check and canonicalize a model: the one entry point the CLI uses."""
    model = load_model(path)
    if shapes:
        fix_input_shapes(model, shapes)
    return canonicalize(model, inplace=True)[0]
