"""Weight parametrizations computed in the graph from constants are folded into the weight they compute.

Training-time reparametrizations survive export as arithmetic on initializers: torch's weight norm
(``weight_norm`` / ``parametrizations.weight_norm``: wav2vec2 and HuBERT's positional convolution, HiFi-GAN,
EnCodec) becomes ``W = g * v / ReduceL2(v)``, evaluated at every run. Pruning the arithmetic instead of the
weight is wrong in a way no oracle sees: ``ReduceL2`` over the output channels of ``v`` includes every
channel, so removing channels rescales all the kept ones (by ~sqrt(2) at half of them removed), and a pruned
model equal to the "silenced" original (rows of ``v`` zeroed) is still not the original minus those channels.
Folding first makes ``W`` an initializer: a plain convolution that loses rows and nothing else, and one
division fewer at run time.

`fold_parametrizations` evaluates a constant subgraph only when it is safe to replace by its value:

* every node is a standard size-keeping arithmetic, reduction or layout op (`_PARAMETRIZATION_OPS`, no
  quantization: a QDQ model's weights stay quantized), outside subgraphs, none of its outputs a graph output;
* its leaves are initializers (in memory or lazily mapped external data) that nothing else reads (a tied weight is not copied), and its
  intermediate values are read only inside it;
* the folded value takes no more bytes than the leaves it replaces (a Cast of fp16 weights to fp32 stays).

Small constant arithmetic is already folded by `canonical` (`_fold_constant_shape_ops`, up to 65,536
elements); this pass is for weights of any size. wav2vec2-base's positional convolution (768 x 48 x 128 =
4.7 M elements) folds in ~0.1 s.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune import external as ext
from onnxprune.graph import subgraph_reads
from onnxprune.onnx_utils import has_subgraph

__all__ = ["fold_parametrizations"]

_PARAMETRIZATION_OPS = frozenset({
    "ReduceL2", "ReduceSumSquare", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "Div", "Mul", "Add",
    "Sub", "Sqrt", "Pow", "Reciprocal", "Abs", "Neg", "Exp", "Cast", "Transpose", "Reshape", "Squeeze",
    "Unsqueeze", "Identity",
})


def fold_parametrizations(g: onnx.GraphProto, opset: int = 17) -> bool:
    """Fold every weight parametrization of the main graph `g` in place (see the module doc); True if any."""
    inits = {t.name: t for t in g.initializer  # lazy external weights are read through a memory map
             if t.data_location != onnx.TensorProto.EXTERNAL or ext.is_lazy(t)}
    graph_outputs = {o.name for o in g.output}
    readers: dict[str, list[int]] = {}
    for k, node in enumerate(g.node):
        for name in {*node.input, *subgraph_reads(node)}:
            if name:
                readers.setdefault(name, []).append(k)

    producer: dict[str, int] = {}
    constant: set[int] = set()
    for k, node in enumerate(g.node):
        if (node.domain in ("", "ai.onnx") and node.op_type in _PARAMETRIZATION_OPS and node.input
                and not has_subgraph(node) and not any(o in graph_outputs for o in node.output)
                and all(not n or n in inits or producer.get(n) in constant for n in node.input)):
            constant.add(k)
        for o in node.output:
            producer[o] = k

    folded: dict[str, np.ndarray] = {}
    drop: set[int] = set()
    for k in sorted(constant):
        for out in g.node[k].output:
            if out and any(r not in constant for r in readers.get(out, [])):  # a weight some layer reads
                nodes = _ancestors(out, producer, constant, g)
                value = _fold_one(g, out, nodes, inits, readers, opset)
                if value is not None:
                    folded[out] = value
                    drop |= nodes
    if not folded:
        return False
    keep = [n for k, n in enumerate(g.node) if k not in drop]
    del g.node[:]
    g.node.extend(keep)
    for name, value in folded.items():
        g.initializer.append(numpy_helper.from_array(value, name))
    still_read = {n for node in g.node for n in (*node.input, *subgraph_reads(node))} | graph_outputs
    kept_inits = [t for t in g.initializer if t.name in still_read]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    return True


def _ancestors(name: str, producer: dict[str, int], constant: set[int], g: onnx.GraphProto) -> set[int]:
    nodes: set[int] = set()
    stack = [name]
    while stack:
        k = producer.get(stack.pop())
        if k is None or k in nodes or k not in constant:
            continue
        nodes.add(k)
        stack.extend(n for n in g.node[k].input if n)
    return nodes


def _fold_one(g: onnx.GraphProto, out: str, nodes: set[int], inits: dict[str, onnx.TensorProto],
              readers: dict[str, list[int]], opset: int) -> np.ndarray | None:
    """The value of `out` when its constant subgraph `nodes` may be replaced by it, else None."""
    leaves = {n for k in nodes for n in g.node[k].input if n and n in inits}
    if any(any(r not in nodes for r in readers.get(leaf, [])) for leaf in leaves):
        return None  # a leaf read elsewhere too (a tied weight) would be stored twice
    for k in nodes:
        if any(o != out and any(r not in nodes for r in readers.get(o, [])) for o in g.node[k].output if o):
            return None  # an intermediate value is read outside: not one parametrization
    if not any(g.node[k].op_type not in ("Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze") for k in nodes):
        return None  # layout only: `canonical` folds those, keeping the payload as it is
    value = _evaluate([g.node[k] for k in sorted(nodes)], [inits[n] for n in sorted(leaves)], out, opset)
    leaf_bytes = sum(int(np.prod(inits[n].dims, dtype=np.int64)) * _itemsize(inits[n]) for n in leaves)
    if value is None or value.nbytes > leaf_bytes:
        return None
    return value


def _itemsize(t: onnx.TensorProto) -> int:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def _evaluate(nodes: list[onnx.NodeProto], leaves: list[onnx.TensorProto], out: str, opset: int) -> np.ndarray | None:
    from onnx.reference import ReferenceEvaluator

    inputs = [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in leaves]
    graph = onnx.helper.make_graph(nodes, "parametrization", inputs,
                                   [onnx.helper.make_tensor_value_info(out, 0, None)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        (value,) = ReferenceEvaluator(model).run(None, {t.name: np.asarray(ext.tensor_array(t)) for t in leaves})
    except Exception:  # an op the reference evaluator cannot run: leave it to the run time
        return None
    return np.asarray(value)
