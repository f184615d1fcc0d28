"""Shape inference: onnx's (with data propagation), onnxruntime's symbolic inference where sizes stay
unknown, and completions of our own.

Start reading at `infer_shapes`. Inference runs on a light copy of the model (`onnx_utils.light_copy`:
weights are never serialised) and the inferred value_info is grafted back. Where onnx gives up, an
operator whose rule declares ``same_shape`` (`rules.facts.op_facts`) gets its input's shape, Reshape
outputs get the sizes their target names (`_fill_reshape_dims`; a -1 over symbolic sizes becomes a
product symbol), Slice outputs keep the sizes of the axes they do not cut (`_fill_slice_dims`) and
Expand outputs the input's sizes broadcast against the target (`_fill_expand_dims`). These keep
dynamic-size models (run-time Shape -> Slice -> Concat -> Reshape arithmetic) analysable when
onnxruntime's symbolic inference is unavailable (it needs sympy, which onnxruntime no longer
installs). After each completion round, placeholder types downstream are dropped and re-inferred
(`_forget_placeholders_after`), since onnx keeps an existing ``unk__N`` over a newly inferred size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from onnxprune.graph import ModelGraph
from onnxprune.onnx_utils import gather_list, light_copy, opset_of
from onnxprune.rules.facts import op_facts, output_shape


def infer_shapes(model: onnx.ModelProto, symbolic: bool = True) -> onnx.ModelProto:
    """Shape inference with data propagation, completed from the rule registry where onnx cannot infer (same-shape
    ops, contrib ops whose rule declares the output shape).

    Updates `model.graph.value_info` in place and returns the model.
    """
    model = _infer_once(model, symbolic)
    for _ in range(8):
        filled = _fill_shapes_from_rules(model)
        if not filled:
            break
        _forget_placeholders_after(model, filled)
        model = _infer_once(model, False)
    return model


def _forget_placeholders_after(model: onnx.ModelProto, filled: set[str]) -> None:
    """Drop the inferred types downstream of completed tensors that hold placeholders (``unk__N``) or no
    shape: onnx keeps an existing symbol over a newly inferred one, so they would never pick up the
    completed sizes."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    after: set[str] = set()
    todo = list(filled)
    while todo:
        for node in consumers.get(todo.pop(), []):
            for out in node.output:
                if out and out not in after:
                    after.add(out)
                    todo.append(out)
    after -= filled
    keep = [
        vi for vi in model.graph.value_info
        if vi.name not in after or (_has_shape(vi) and all(_settled(d) for d in vi.type.tensor_type.shape.dim))
    ]  # fmt: skip
    if len(keep) != len(model.graph.value_info):
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep)


def _fill_shapes_from_rules(model: onnx.ModelProto) -> set[str]:
    """Give the output of a same-shape operator its input's type where onnx's inference gave up (function
    ops such as GroupNormalization-21, onnxruntime's contrib ops: `rules.contrib`), and a contrib op whose rule
    computes its output's shape (`ChannelRule.output_shape`) that shape. Looked up in the node's
    domain, then by op type in the default domain: a contrib op named like a standard one keeps the standard
    op's shape contract. Returns the names of the tensors given (more of) a shape."""
    g = model.graph
    known = {vi.name: vi for vi in list(g.input) + list(g.value_info) + list(g.output) if _has_shape(vi)}
    opset = opset_of(model) or None

    def same_shape(node: onnx.NodeProto) -> bool:
        own = node.domain not in ("", "ai.onnx") and op_facts(node.op_type, node.domain, None).same_shape
        return own or op_facts(node.op_type, "", opset).same_shape

    weights = {t.name: tuple(t.dims) for t in g.initializer}

    def dims(name: str) -> tuple | None:
        vi = known.get(name)
        if vi is None:
            return weights.get(name)
        return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim)

    filled: set[str] = set()
    for node in g.node:
        if not node.output or node.output[0] in known:
            continue
        src = known.get(node.input[0]) if node.input else None
        if src is None:
            continue
        vi = onnx.ValueInfoProto()
        if same_shape(node):
            vi.CopyFrom(src)
        elif node.domain not in ("", "ai.onnx") and (shape := output_shape(node, dims)) is not None:
            vi.CopyFrom(onnx.helper.make_tensor_value_info("", src.type.tensor_type.elem_type, list(shape)))
        else:
            continue
        vi.name = node.output[0]
        outputs = {o.name: o for o in g.output}
        if vi.name in outputs:
            outputs[vi.name].type.CopyFrom(src.type)
        else:
            g.value_info.append(vi)
        known[vi.name] = vi
        filled.add(vi.name)
    filled |= _fill_reshape_dims(model, known)
    filled |= _fill_slice_dims(model, known)
    filled |= _fill_expand_dims(model, known)
    return filled


def _fill_reshape_dims(model: onnx.ModelProto, known: dict) -> set[str]:
    """Complete Reshape output dims that onnx left unknown though the target names them.

    Dynamic-size exports build targets as Concat(Shape(x)[k], ..., const heads, const head_dim) or
    Concat(Shape(x)[:2], -1): each piece is a constant, a copy (0), a size of another tensor or the
    rest (-1); onnx gives up on the mix, often dropping even the output's rank, and everything after it
    loses its shape. A -1 over symbolic sizes becomes their product (``"unk__3*unk__4"``), one symbol
    that later reshapes of the same tensor name again, so sizes stay comparable without sympy.
    """
    graph = ModelGraph(model)
    filled: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        vi = known.get(node.output[0])
        if vi is not None and all(_settled(d) for d in vi.type.tensor_type.shape.dim):
            continue
        elements = _target_elements(graph, node.input[1])
        if elements is None:
            continue
        dims = _output_dims(model, known, filled, node, graph.dtype(node.input[0]), len(elements))
        if dims is None:
            continue
        in_shape = graph.shape(node.input[0])
        copies = not _attr(node, "allowzero", 0)
        elements = [
            (in_shape[k] if in_shape and k < len(in_shape) else None) if e == 0 and copies else e
            for k, e in enumerate(elements)
        ]
        if elements.count(-1) == 1:
            rest = [e for e in elements if e != -1]
            elements[elements.index(-1)] = _infer_minus_one(list(in_shape), rest) if in_shape is not None else None
        for d, e in zip(dims, elements):
            if _settled(d):
                continue
            if isinstance(e, (int, np.integer)) and not isinstance(e, bool) and e > 0:
                d.Clear()
                d.dim_value = int(e)
                filled.add(node.output[0])
            elif isinstance(e, str) and e and e != d.dim_param:
                d.Clear()
                d.dim_param = e
                filled.add(node.output[0])
    return filled


def _fill_slice_dims(model: onnx.ModelProto, known: dict) -> set[str]:
    """Give a Slice's output the input's sizes on the axes it does not slice.

    onnx drops every output size when a bound is computed at run time (a crop to another tensor's
    width), though the axes it does not touch, the channels among them, keep their sizes.
    """
    graph = ModelGraph(model)
    filled: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "Slice" or not node.output or not node.output[0]:
            continue
        in_shape = graph.shape(node.input[0])
        vi = known.get(node.output[0])
        if in_shape is None or (vi is not None and all(_settled(d) for d in vi.type.tensor_type.shape.dim)):
            continue
        axes = _slice_axes(graph, node, len(in_shape))
        if axes is None:
            continue
        dims = _output_dims(model, known, filled, node, graph.dtype(node.input[0]), len(in_shape))
        if dims is None:
            continue
        for k, (d, size) in enumerate(zip(dims, in_shape)):
            if k not in axes and not _settled(d) and _set_dim(d, size):
                filled.add(node.output[0])
    return filled


def _fill_expand_dims(model: onnx.ModelProto, known: dict) -> set[str]:
    """Complete Expand output dims from the input's sizes broadcast against the target's elements.

    Exports repeat key/value heads (grouped-query attention) with Expand to a target assembled at run
    time; onnx then loses every output size, the head axes among them.
    """
    graph = ModelGraph(model)
    filled: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "Expand" or len(node.input) < 2 or node.output[0] not in known:
            continue
        dims = known[node.output[0]].type.tensor_type.shape.dim
        in_shape = graph.shape(node.input[0])
        if in_shape is None or all(_settled(d) for d in dims):
            continue
        target = _target_elements(graph, node.input[1])
        if target is None or len(dims) != max(len(in_shape), len(target)):
            continue
        sizes = [1] * (len(dims) - len(in_shape)) + list(in_shape)
        wanted = [1] * (len(dims) - len(target)) + list(target)
        for d, size, want in zip(dims, sizes, wanted):
            out = size if want == 1 or (size != 1 and size is not None) else (want if size == 1 else None)
            if not _settled(d) and _set_dim(d, out):
                filled.add(node.output[0])
    return filled


def _slice_axes(graph: ModelGraph, node: onnx.NodeProto, rank: int) -> set[int] | None:
    """The axes a Slice cuts (normalised), None when they are computed at run time."""
    axes = _attr(node, "axes", None)
    starts = _attr(node, "starts", None)
    if starts is not None:  # opset < 10
        listed = list(axes) if axes is not None else list(range(len(starts)))
    elif len(node.input) > 3 and node.input[3]:
        value = graph.const(node.input[3])
        if value is None:
            return None
        listed = [int(a) for a in value.reshape(-1)]
    else:
        count = graph.size(node.input[1], 0) if len(node.input) > 1 and graph.rank(node.input[1]) == 1 else None
        if not isinstance(count, int):
            return None
        listed = list(range(count))
    if any(not -rank <= a < rank for a in listed):
        return None
    return {a % rank for a in listed}


def _settled(d: onnx.TensorShapeProto.Dimension) -> bool:
    """A static size or a named symbol: nothing to complete (onnx's ``unk__N`` placeholders are not)."""
    return d.HasField("dim_value") or (d.HasField("dim_param") and not d.dim_param.startswith("unk__"))


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _value_info_for(model: onnx.ModelProto, name: str, dtype: int | None, rank: int) -> onnx.ValueInfoProto | None:
    """A ranked, unsized type for `name`: the existing unshaped entry (value_info or output) or a new one."""
    g = model.graph
    for vi in list(g.value_info) + list(g.output):
        if vi.name == name:
            if not vi.type.HasField("tensor_type"):
                return None
            break
    else:
        if not dtype:
            return None
        vi = g.value_info.add()
        vi.name = name
        vi.type.tensor_type.elem_type = dtype
    shape = vi.type.tensor_type.shape
    del shape.dim[:]
    for _ in range(rank):
        shape.dim.add()
    return vi


def _infer_minus_one(in_dims: list, out_dims: list):
    """The size a -1 in a Reshape target stands for, cancelling symbols on both sides; None if unknown.

    Symbols left on the input side make a symbolic product (``"2*h*w"``): the number of elements
    is then known only at run time, but it has a name.
    """
    in_dims, out_dims = list(in_dims), list(out_dims)
    for d in list(out_dims):
        if isinstance(d, str) and d in in_dims:
            in_dims.remove(d)
            out_dims.remove(d)
    if not all(isinstance(d, int) and d > 0 for d in out_dims):
        return None
    if not all((isinstance(d, int) and d > 0) or (isinstance(d, str) and d) for d in in_dims):
        return None
    num = int(np.prod([d for d in in_dims if isinstance(d, int)], dtype=np.int64))
    den = int(np.prod(out_dims, dtype=np.int64))
    if not den or num % den:
        return None
    symbols = [d for d in in_dims if isinstance(d, str)]
    if not symbols:
        return num // den
    return "*".join(([str(num // den)] if num // den != 1 else []) + symbols)


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
        return gather_list(_target_elements(graph, node.input[0]), graph.const(node.input[1]))
    if node.op_type == "Slice":
        return _slice_list(graph, node, _target_elements(graph, node.input[0]))
    if node.op_type == "Reshape" and graph.rank(node.input[0]) == 1 and graph.rank(name) == 1:
        return _target_elements(graph, node.input[0])  # a vector flattened to itself
    if node.op_type == "Where" and _is_minus_one_guard(graph, node):
        # torch exports expand(*sizes) as Where(Equal(s, -1), fill, s): each -1 of s becomes fill
        inner, fill = _target_elements(graph, node.input[2]), graph.const(node.input[1])
        if inner is None or fill is None or fill.size not in (1, len(inner)):
            return None
        fills = np.broadcast_to(fill.reshape(-1), (len(inner),))
        return [int(f) if e == -1 else e for e, f in zip(inner, fills)]
    return None


def _is_minus_one_guard(graph: ModelGraph, where: onnx.NodeProto) -> bool:
    cond = graph.producer.get(where.input[0])
    if cond is None or cond.op_type != "Equal" or where.input[2] not in cond.input:
        return False
    other = cond.input[1] if cond.input[0] == where.input[2] else cond.input[0]
    value = graph.const(other)
    return value is not None and bool(np.all(value == -1))


def _slice_list(graph, node: onnx.NodeProto, source: list | None) -> list | None:
    """``source[start:end:step]`` for a Slice of a 1-D shape vector with constant bounds; None otherwise."""
    if source is None:
        return None
    if _attr(node, "starts", None) is not None:  # opset < 10
        bounds = [_attr(node, "starts", None), _attr(node, "ends", None), _attr(node, "axes", None), None]
    else:
        bounds = [graph.const(n) if n else None for n in list(node.input[1:5]) + [""] * (5 - len(node.input))]
        if any(n and b is None for n, b in zip(list(node.input[1:5]), bounds)):
            return None  # a bound computed at run time
    starts, ends, axes, steps = (None if b is None else [int(v) for v in np.asarray(b).reshape(-1)] for b in bounds)
    if starts is None or ends is None or len(starts) != 1 or (axes is not None and axes[0] not in (0, -1)):
        return None
    step = steps[0] if steps else 1
    return source[starts[0] : ends[0] : step] if step else None


def _has_shape(vi: onnx.ValueInfoProto) -> bool:
    return vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")


def has_unknown_dims(model: onnx.ModelProto) -> bool:
    """Is any inferred size missing or a placeholder symbol (``unk__N``)?"""
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
    _follow_reduce_prod(module)
    sys.modules[name] = module
    return module


def _follow_reduce_prod(module) -> None:
    """Teach the symbolic engine ``ReduceProd(keepdims=1)`` of a 1-D shape vector.

    It only follows ``keepdims=0, axes=[0]``; tf2onnx computes every dynamic Einsum reshape (Keras'
    MultiHeadAttention with a dynamic batch) as ``Concat(ReduceProd(Gather(Shape(x))), ...)`` with
    the default keepdims=1, and without the product the attention's sizes were lost (its heads frozen).
    """
    engine = module.SymbolicShapeInference
    original = engine._infer_ReduceProd

    def infer(self, node):
        original(self, node)
        keep = module.get_attribute(node, "keepdims", 1)
        axes = module.get_attribute(node, "axes")
        if keep == 1 and axes in (None, [0], [-1]) and len(node.input) == 1:
            data = self._get_int_or_float_values(node)[0]
            if isinstance(data, list) and data:
                self.sympy_data_[node.output[0]] = [module.sympy_reduce_product(data)]

    engine._infer_ReduceProd = infer


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
    if symbolic and has_unknown_dims(inferred):  # slow (sympy): at most once per import
        inferred = _symbolic_infer(light) or inferred
    del model.graph.value_info[:]
    inits = {t.name for t in model.graph.initializer}
    model.graph.value_info.extend(vi for vi in inferred.graph.value_info if vi.name not in inits)
    outputs = {o.name: o for o in inferred.graph.output}
    for o in model.graph.output:
        if o.name in outputs and not _has_shape(o):
            o.type.CopyFrom(outputs[o.name].type)
    return model


def _output_dims(model: onnx.ModelProto, known: dict, filled: set[str], node: onnx.NodeProto, dtype: int | None,
                 rank: int):
    """The dims of `node`'s first output to complete in place: its value info (created with `rank` unknown
    dims when it has none, and recorded in `known` and `filled`), or None when its rank is not `rank`."""
    name = node.output[0]
    vi = known.get(name)
    if vi is None:
        vi = _value_info_for(model, name, dtype, rank)
        if vi is None:
            return None
        known[vi.name] = vi
        filled.add(name)
    dims = vi.type.tensor_type.shape.dim
    return dims if len(dims) == rank else None


def _set_dim(d: onnx.TensorShapeProto.Dimension, size: int | str | None) -> bool:
    """Write a known size (a positive int or a symbol) into `d`; True when `d` changed."""
    if isinstance(size, int) and size > 0:
        d.Clear()
        d.dim_value = size
        return True
    if isinstance(size, str) and size and size != d.dim_param:
        d.Clear()
        d.dim_param = size
        return True
    return False
