"""ONNX rewrites before TVM's importer: operators it cannot convert, and spellings it mis-handles.

:func:`expand_functions` replaces operators TVM's importer cannot convert by the ONNX standard's own function
bodies (the common Attention and RotaryEmbedding in direct forms the CPU schedules and the fused attention kernel
take); :func:`expand_contrib` writes onnxruntime's contrib ops (its transformer optimizer's SkipLayerNormalization and
Gelu family) in standard ops; :func:`positive_axes` spells Squeeze / Unsqueeze axes as non-negative numbers.

Many newer ONNX operators are *functions*: the standard defines each as a graph of older ops (onnx ships the body,
built for the node's attributes and input types). Exports at opset >= 23 use some that TVM 0.27's importer
lacks or converts as another operator: ``Attention`` (its converter is the com.microsoft contrib ``Attention``,
which fails on the standard one with ``KeyError: 'num_heads'``) and ``RotaryEmbedding`` (no converter). Before
the import, :func:`expand_functions` inlines those nodes' bodies (``onnx.inliner``), so the model TVM sees is the
same function in ops it knows: a LLaMA, BERT or ViT exported at opset 23 compiles.

The bodies compute what the operator computes (measured on the zoo's opset-23 LLaMA, BERT and ViT in
onnxruntime: at most 5e-7 from the fused node); they carry ``Shape`` arithmetic that the backend's
shape folding then turns into constants. The common ``Attention`` (4-D, one KV head per query head, a constant
mask or none) is written directly as the five ops ``tvm_attention`` fuses into one kernel instead: through the
standard's body (Q and K scaled apart, fully masked rows guarded) the opset-23 BERT tiny bundle took 0.196 ms
against the opset-17 export's 0.158-0.181 ms; directly, 0.180 ms, the fused kernel in both.

TVM 0.27's ``ConvertLayout`` (the NHWC pass) dies with ``std::bad_alloc`` on a ``squeeze`` whose axis is negative
(``Squeeze(axes=[-2])`` of a 5-D tensor: torchvision's ViT attention through the torch.export-based exporter);
the same axis counted from the front compiles.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx
from onnx import defs, helper, inliner, numpy_helper, shape_inference

from onnxprune.gradients_attention import scores_bias

__all__ = ["UNSUPPORTED_CONVERTERS", "expand_contrib", "expand_functions", "positive_axes"]

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


def _static_shape(types: dict[str, onnx.TypeProto], name: str) -> list[int] | None:
    t = types.get(name)
    if t is None or not t.tensor_type.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim]
    return None if None in dims else dims  # type: ignore[return-value]


def _direct_attention(
    node: onnx.NodeProto, types: dict[str, onnx.TypeProto], consts: dict[str, np.ndarray], producers: dict
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None:
    """``softmax(Q K^T * scale + bias) V`` as five nodes, for the common case of a 4-D float32 ``Attention`` with
    as many query as key/value heads, no caches, scores output, softcap or window, and a constant (or no) mask
    that masks no whole row: the ops ``tvm_attention.fuse_attention`` turns into one kernel (the standard's body
    scales Q and K separately and guards fully masked rows, which that pattern does not take). The causal mask
    (upper-left, as the standard's body: query i sees keys j <= i) is folded into the constant bias. K's
    transpose is merged with the Transpose that made it. None when the node is not that case."""
    at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    q, k, v = node.input[:3]
    shapes = [_static_shape(types, n) for n in (q, k, v)]
    if (any(s is None or len(s) != 4 for s in shapes) or len(node.input) > 4 or any(node.output[1:])
            or at.get("softcap", 0.0) or at.get("left_window_size", -1) != -1 or at.get("right_window_size", -1) != -1
            or types[q].tensor_type.elem_type != onnx.TensorProto.FLOAT):  # fmt: skip
        return None
    (_, heads, t, d), (_, kv_heads, length, d_k), _ = shapes  # type: ignore[misc]
    if heads != kv_heads or d != d_k:
        return None
    mask_name = node.input[3] if len(node.input) > 3 else ""
    if mask_name and mask_name not in consts:
        return None
    try:
        bias = scores_bias(consts[mask_name] if mask_name else None, bool(at.get("is_causal", 0)), t, length)
    except ValueError:  # a fully masked row, or a mask that does not broadcast: left to the body
        return None
    scale = at.get("scale") or 1.0 / np.sqrt(d)
    name = node.name or node.output[0]
    made = [f"{name}/{part}" for part in ("kt", "scores", "scaled", "biased", "probs", "scale", "bias")]
    source, perm = k, [0, 1, 3, 2]
    transpose = producers.get(k)
    if transpose is not None and transpose.op_type == "Transpose" and transpose.domain in ("", "ai.onnx"):
        inner = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        if inner is not None and len(inner) == 4:
            source, perm = transpose.input[0], [inner[i] for i in perm]
    inits = [numpy_helper.from_array(np.array(scale, np.float32), made[5])]
    nodes = [
        helper.make_node("Transpose", [source], [made[0]], perm=perm, name=made[0]),
        helper.make_node("MatMul", [q, made[0]], [made[1]], name=made[1]),
        helper.make_node("Mul", [made[1], made[5]], [made[2]], name=made[2]),
    ]
    scores = made[2]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, made[6]))
        nodes.append(helper.make_node("Add", [scores, made[6]], [made[3]], name=made[3]))
        scores = made[3]
    nodes += [
        helper.make_node("Softmax", [scores], [made[4]], axis=-1, name=made[4]),
        helper.make_node("MatMul", [made[4], v], [node.output[0]], name=f"{name}/output"),
    ]
    return nodes, inits


def _direct_rotary(
    node: onnx.NodeProto, types: dict[str, onnx.TypeProto], consts: dict[str, np.ndarray], producers: dict
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None:
    """A 4-D, non-interleaved ``RotaryEmbedding`` as Slice / Mul / Sub / Add / Concat (the rotate-half form the
    opset-17 exports write, which the CPU schedules take; the standard's body splits into kernels they leave as
    naive loop nests). Rows of the caches are gathered by the position ids (a constant gather when both are
    constants). None when the node is not that case."""
    at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    x = node.input[0]
    shape = _static_shape(types, x)
    if shape is None or len(shape) != 4 or at.get("interleaved", 0) or types[x].tensor_type.elem_type != onnx.TensorProto.FLOAT:
        return None
    b, _, length, size = shape
    rot = int(at.get("rotary_embedding_dim", 0) or size)
    half = rot // 2
    prefix = node.name or node.output[0]
    positions = node.input[3] if len(node.input) > 3 else ""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def made(part: str) -> str:
        return f"{prefix}/{part}"

    def const(part: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, made(part)))
        return made(part)

    def op(op_type: str, inputs: list[str], part: str, **kwargs) -> str:
        nodes.append(helper.make_node(op_type, inputs, [made(part)], name=made(part), **kwargs))
        return made(part)

    tables = []
    for cache, part in ((node.input[1], "cos"), (node.input[2], "sin")):
        value = consts.get(cache)
        if value is not None and (not positions or positions in consts):  # [B, S, half], constant
            table = value[consts[positions]] if positions else value
            tables.append(const(part, table.reshape(b, 1, length, half).astype(np.float32)))
        else:
            rows = op("Gather", [cache, positions], f"{part}_rows") if positions else cache
            tables.append(op("Reshape", [rows, const(f"{part}_shape", np.array([b, 1, length, half], np.int64))], part))
    cos, sin = tables
    ends = {"x1": (0, half), "x2": (half, rot), "rest": (rot, size)}
    parts = {p: op("Slice", [x, const(f"{p}_lo", np.array([lo], np.int64)), const(f"{p}_hi", np.array([hi], np.int64)),
                             const(f"{p}_axis", np.array([-1], np.int64))], p)
             for p, (lo, hi) in ends.items() if hi > lo}  # fmt: skip
    real = op("Sub", [op("Mul", [parts["x1"], cos], "x1_cos"), op("Mul", [parts["x2"], sin], "x2_sin")], "real")
    imag = op("Add", [op("Mul", [parts["x1"], sin], "x1_sin"), op("Mul", [parts["x2"], cos], "x2_cos")], "imag")
    nodes.append(helper.make_node("Concat", [real, imag, *([parts["rest"]] if "rest" in parts else [])],
                                  [node.output[0]], axis=-1, name=made("output")))  # fmt: skip
    return nodes, inits


def expand_functions(model: onnx.ModelProto, convertible: Collection[str]) -> tuple[onnx.ModelProto, list[str]]:
    """`model` with every default-domain node whose op is not in `convertible` (or is in
    `UNSUPPORTED_CONVERTERS`) replaced by the standard's function body (the common Attention by its direct form,
    `_direct_attention`), and the op types expanded. Nodes without a body stay (the importer's own check names
    them). The input model is not modified."""
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
    consts = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer if np.prod(t.dims) <= 1 << 22}
    producers = {o: n for n in out.graph.node for o in n.output}
    functions, expanded, originals = [], [], {}
    nodes: list[onnx.NodeProto] = []
    for k, node in enumerate(out.graph.node):
        nodes.append(node)
        if node.domain not in ("", "ai.onnx") or not (
            node.op_type not in convertible or node.op_type in UNSUPPORTED_CONVERTERS
        ):
            continue
        direct = {"Attention": _direct_attention, "RotaryEmbedding": _direct_rotary}.get(node.op_type)
        direct = direct(node, types, consts, producers) if direct is not None else None
        if direct is not None:
            nodes[-1:] = direct[0]
            out.graph.initializer.extend(direct[1])
            expanded.append(node.op_type)
            continue
        body = _function_of(node, opset, types)
        if body is None:
            continue
        body.name, body.domain = f"{node.op_type}_{k}", _DOMAIN
        originals[body.name] = onnx.NodeProto()
        originals[body.name].CopyFrom(node)
        node.op_type, node.domain = body.name, _DOMAIN  # its attributes bind the body's attribute references
        functions.append(body)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    if not functions:
        return (out, sorted(set(expanded))) if expanded else (model, [])
    out.functions.extend(functions)
    out.opset_import.append(helper.make_opsetid(_DOMAIN, 1))
    out = inliner.inline_local_functions(out)
    kept = set()
    for node in out.graph.node:  # a body the inliner would not take (its opsets differ): the node as it was
        if node.domain == _DOMAIN:
            kept.add(node.op_type)
            node.CopyFrom(originals[node.op_type])
    expanded += [n.op_type for name, n in originals.items() if name not in kept]
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


_SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))


def _contrib_nodes(node: onnx.NodeProto, opset: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None:
    """`node`, an onnxruntime contrib op (com.microsoft) of its transformer optimizer, in standard ops; None for
    another op (or a LayerNorm below opset 17)."""
    at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    prefix = node.name or node.output[0]
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def op(op_type: str, inputs: list[str], part: str, out: str | None = None, n_out: int = 1, **kwargs) -> str:
        outs = [out or f"{prefix}/{part}"] + [f"{prefix}/{part}_{k}" for k in range(1, n_out)]
        nodes.append(helper.make_node(op_type, inputs, outs, name=f"{prefix}/{part}", **kwargs))
        return outs[0]

    def const(part: str, value: float) -> str:
        inits.append(numpy_helper.from_array(np.array(value, np.float32), f"{prefix}/{part}"))
        return f"{prefix}/{part}"

    x, y = node.input[0], node.output[0]
    kind = node.op_type
    if kind in ("Gelu", "BiasGelu", "FastGelu", "QuickGelu"):
        if len(node.input) > 1 and node.input[1]:
            x = op("Add", [x, node.input[1]], "biased")
        if kind == "QuickGelu":  # x * sigmoid(alpha x)
            op("Mul", [x, op("Sigmoid", [op("Mul", [x, const("alpha", at.get("alpha", 1.702))], "ax")], "s")], "y", y)
        elif kind == "FastGelu":  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
            cube = op("Mul", [op("Mul", [x, x], "x2"), x], "x3")
            inner = op("Mul", [op("Add", [x, op("Mul", [cube, const("c", 0.044715)], "cx3")], "poly"),
                               const("k", _SQRT_2_OVER_PI)], "inner")  # fmt: skip
            half = op("Mul", [x, const("half", 0.5)], "half_x")
            op("Mul", [half, op("Add", [op("Tanh", [inner], "t"), const("one", 1.0)], "t1")], "y", y)
        else:  # 0.5 x (1 + erf(x / sqrt 2))
            erf = op("Erf", [op("Mul", [x, const("r", float(1 / np.sqrt(2.0)))], "xr")], "erf")
            half = op("Mul", [x, const("half", 0.5)], "half_x")
            op("Mul", [half, op("Add", [erf, const("one", 1.0)], "e1")], "y", y)
        return nodes, inits
    if kind in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"):
        skip, gamma = node.input[1], node.input[2]
        simplified = kind == "SkipSimplifiedLayerNormalization"
        beta = "" if simplified else (node.input[3] if len(node.input) > 3 else "")
        bias = node.input[3 if simplified else 4] if len(node.input) > (3 if simplified else 4) else ""
        total = node.output[3] if len(node.output) > 3 and node.output[3] else None
        summed = op("Add", [x, skip], "sum", None if bias else total)
        if bias:
            summed = op("Add", [summed, bias], "sum_bias", total)
        eps = float(at.get("epsilon", 1e-12))  # onnxruntime's default for both
        extra = list(node.output[1:3])
        if any(extra) and simplified:
            return None
        if simplified:  # x * gamma / sqrt(mean(x^2) + eps)
            sq = op("Mul", [summed, summed], "sq")
            if opset < 18:
                mean = op("ReduceMean", [sq], "ms", axes=[-1], keepdims=1)
            else:
                mean = op("ReduceMean", [sq, _axes(inits, prefix)], "ms", keepdims=1)
            rms = op("Sqrt", [op("Add", [mean, const("eps", eps)], "mse")], "rms")
            op("Mul", [op("Div", [summed, rms], "norm"), gamma], "y", y)
            return nodes, inits
        if opset < 17:
            return None
        outs = [y, *(o or "" for o in extra)]
        while outs and not outs[-1]:
            outs.pop()
        nodes.append(helper.make_node("LayerNormalization", [summed, gamma, *([beta] if beta else [])], outs,
                                      name=f"{prefix}/layer_norm", axis=-1, epsilon=eps))  # fmt: skip
        return nodes, inits
    return None


def _axes(inits: list[onnx.TensorProto], prefix: str) -> str:
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), f"{prefix}/axes"))
    return f"{prefix}/axes"


def expand_contrib(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """`model` with the onnxruntime contrib ops of its transformer optimizer (Gelu family, skip norms) written in
    standard ops (exact; TVM's own converters refuse a SkipLayerNormalization without beta and bias), and the op
    types rewritten. The input model is not modified."""
    opset = _opset(model)
    if not any(n.domain == "com.microsoft" for n in model.graph.node):
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    expanded: list[str] = []
    for node in out.graph.node:
        made = _contrib_nodes(node, opset) if node.domain == "com.microsoft" else None
        if made is None:
            nodes.append(node)
            continue
        nodes += made[0]
        out.graph.initializer.extend(made[1])
        expanded.append(node.op_type)
    if not expanded:
        return model, []
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    if not any(n.domain == "com.microsoft" for n in nodes):
        keep = [o for o in out.opset_import if o.domain != "com.microsoft"]
        del out.opset_import[:]
        out.opset_import.extend(keep)
    return out, sorted(set(expanded))
