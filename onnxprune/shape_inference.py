"""Shape inference: onnx's (with data propagation), onnxruntime's symbolic inference where sizes stay
unknown, and two completions of our own.

Start reading at `infer_shapes`. Inference runs on a light copy of the model (`onnx_utils.light_copy`:
weights are never serialised) and the inferred value_info is grafted back. Where onnx gives up, an
operator whose rule declares ``same_shape`` (`rules.facts.op_facts`) gets its input's shape, and Reshape
outputs get the sizes their target names (`_fill_reshape_dims`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from onnxprune.graph import ModelGraph
from onnxprune.onnx_utils import gather_list, light_copy, opset_of
from onnxprune.rules.facts import op_facts


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
    """Give the output of a same-shape operator its input's type where onnx's inference gave up (function
    ops such as GroupNormalization-21). Looked up by op type in the default domain: a contrib op named
    like a standard one (com.microsoft Gelu) keeps the standard op's shape contract."""
    g = model.graph
    known = {vi.name: vi for vi in list(g.input) + list(g.value_info) + list(g.output) if _has_shape(vi)}
    opset = opset_of(model) or None
    filled = False
    for node in g.node:
        if not op_facts(node.op_type, "", opset).same_shape or not node.output or node.output[0] in known:
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
    graph = ModelGraph(model)
    filled = False
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.output[0] not in known:
            continue
        vi = known[node.output[0]]
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") or (d.HasField("dim_param") and not d.dim_param.startswith("unk__")) for d in dims):
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
        return gather_list(_target_elements(graph, node.input[0]), graph.const(node.input[1]))
    return None


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

