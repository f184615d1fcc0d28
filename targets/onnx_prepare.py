"""ONNX rewrites before TVM's importer: operators it cannot convert, and spellings it mis-handles.

:func:`expand_functions` replaces operators TVM's importer cannot convert by the ONNX standard's own function
bodies; :func:`positive_axes` spells Squeeze / Unsqueeze axes as non-negative numbers.

Many newer ONNX operators are *functions*: the standard defines each as a graph of older ops (onnx ships the body,
built for the node's attributes and input types). Exports at opset >= 23 use some that TVM 0.27's importer
lacks or converts as another operator: ``Attention`` (its converter is the com.microsoft contrib ``Attention``,
which fails on the standard one with ``KeyError: 'num_heads'``) and ``RotaryEmbedding`` (no converter). Before
the import, :func:`expand_functions` inlines those nodes' bodies (``onnx.inliner``), so the model TVM sees is the
same function in ops it knows: a LLaMA, BERT or ViT exported at opset 23 compiles.

The bodies compute what the operator computes (measured on the zoo's opset-23 LLaMA, BERT and ViT in
onnxruntime: at most 5e-7 from the fused node); they carry ``Shape`` arithmetic that the backend's
shape folding then turns into constants.

TVM 0.27's ``ConvertLayout`` (the NHWC pass) dies with ``std::bad_alloc`` on a ``squeeze`` whose axis is negative
(``Squeeze(axes=[-2])`` of a 5-D tensor: torchvision's ViT attention through the torch.export-based exporter);
the same axis counted from the front compiles.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx
from onnx import defs, helper, inliner, numpy_helper, shape_inference

__all__ = ["UNSUPPORTED_CONVERTERS", "expand_functions", "positive_axes"]

# Standard ops whose TVM converter implements a different operator of the same name.
UNSUPPORTED_CONVERTERS = frozenset({"Attention"})
_DOMAIN = "onnxprune.expanded"


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _function_of(node: onnx.NodeProto, opset: int, types: dict[str, onnx.TypeProto]) -> onnx.FunctionProto | None:
    """The standard's body of `node` at `opset`, built for its attributes and input types; None without one."""
    try:
        schema = defs.get_schema(node.op_type, opset)
    except defs.SchemaError:
        return None
    body = onnx.FunctionProto()
    if schema.has_context_dependent_function:
        missing = [name for name in node.input if name and name not in types]
        if missing:
            return None
        inputs = [(types[name] if name else onnx.TypeProto()).SerializeToString() for name in node.input]
        try:
            body.ParseFromString(schema.get_context_dependent_function(node.SerializeToString(), inputs))
        except Exception:  # onnx raises plain RuntimeErrors for bodies it cannot build
            return None
    elif schema.has_function:
        body.CopyFrom(schema.function_body)
    else:
        return None
    return body if body.node else None


def expand_functions(model: onnx.ModelProto, convertible: Collection[str]) -> tuple[onnx.ModelProto, list[str]]:
    """`model` with every default-domain node whose op is not in `convertible` (or is in
    `UNSUPPORTED_CONVERTERS`) replaced by the standard's function body, and the op types expanded. Nodes without
    a body stay (the importer's own check names them). The input model is not modified."""
    opset = _opset(model)
    wanted = [
        n for n in model.graph.node
        if n.domain in ("", "ai.onnx") and (n.op_type not in convertible or n.op_type in UNSUPPORTED_CONVERTERS)
    ]
    if not wanted:
        return model, []
    out = shape_inference.infer_shapes(model)
    types = {v.name: v.type for v in [*out.graph.input, *out.graph.value_info, *out.graph.output]}
    types.update(
        {t.name: helper.make_tensor_type_proto(t.data_type, list(t.dims)) for t in out.graph.initializer}
    )
    functions, expanded, originals = [], [], {}
    for k, node in enumerate(out.graph.node):
        if node.domain not in ("", "ai.onnx") or not (
            node.op_type not in convertible or node.op_type in UNSUPPORTED_CONVERTERS
        ):
            continue
        body = _function_of(node, opset, types)
        if body is None:
            continue
        body.name, body.domain = f"{node.op_type}_{k}", _DOMAIN
        originals[body.name] = onnx.NodeProto()
        originals[body.name].CopyFrom(node)
        node.op_type, node.domain = body.name, _DOMAIN  # its attributes bind the body's attribute references
        functions.append(body)
    if not functions:
        return model, []
    out.functions.extend(functions)
    out.opset_import.append(helper.make_opsetid(_DOMAIN, 1))
    out = inliner.inline_local_functions(out)
    kept = set()
    for node in out.graph.node:  # a body the inliner would not take (its opsets differ): the node as it was
        if node.domain == _DOMAIN:
            kept.add(node.op_type)
            node.CopyFrom(originals[node.op_type])
    expanded = [n.op_type for name, n in originals.items() if name not in kept]
    del out.functions[:]
    del out.opset_import[:]
    out.opset_import.extend(o for o in model.opset_import if o.domain != _DOMAIN)
    return out, sorted(set(expanded))


def positive_axes(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the negative axes of its Squeeze / Unsqueeze nodes (constant axes input, or attribute before
    opset 13) counted from the front (Squeeze: the input's rank; Unsqueeze: the output's). The input model is
    not modified; a model without such axes is returned as it is."""
    inits = {t.name: t for t in model.graph.initializer}

    def axes_of(node: onnx.NodeProto) -> np.ndarray | None:
        if len(node.input) > 1 and node.input[1] in inits:
            return numpy_helper.to_array(inits[node.input[1]])
        for a in node.attribute:
            if a.name == "axes":
                return np.array(a.ints, dtype=np.int64)
        return None

    def negative(node: onnx.NodeProto) -> bool:
        axes = axes_of(node) if node.op_type in ("Squeeze", "Unsqueeze") and node.domain in ("", "ai.onnx") else None
        return axes is not None and bool((axes < 0).any())

    todo = [k for k, n in enumerate(model.graph.node) if negative(n)]
    if not todo:
        return model
    out = shape_inference.infer_shapes(model)
    values = [*out.graph.input, *out.graph.value_info, *out.graph.output]
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in values if v.type.tensor_type.HasField("shape")}
    names = {t.name for t in out.graph.initializer}
    for k in todo:
        node = out.graph.node[k]
        rank = ranks.get(node.input[0] if node.op_type == "Squeeze" else node.output[0])
        if rank is None:
            continue
        axes = np.asarray(axes_of(node)) % rank
        if len(node.input) > 1 and node.input[1]:
            name, j = f"{node.input[1]}_positive", 0
            while name in names:
                j += 1
                name = f"{node.input[1]}_positive{j}"
            names.add(name)
            out.graph.initializer.append(numpy_helper.from_array(axes.astype(np.int64), name))
            node.input[1] = name
        else:
            next(a for a in node.attribute if a.name == "axes").ints[:] = [int(v) for v in axes]
    return out
