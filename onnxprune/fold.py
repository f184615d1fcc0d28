"""BatchNormalization folding: an inference BatchNorm after a Conv becomes the Conv's weight and bias.

In inference, ``BN(y) = (y - mean) * gamma / sqrt(var + eps) + beta`` is a per-channel affine map. After
``y = conv(x, W) + b`` it folds into the convolution itself::

    scale = gamma / sqrt(var + eps)
    W'    = W * scale          (per output channel, axis 0 of W)
    b'    = (b - mean) * scale + beta

computed in float64 and stored in the weight's dtype. A runtime then does one bias add per output element
instead of a subtract, divide, multiply and add (TVM's importer decomposes BatchNorm exactly that way).

Start reading at :func:`fold_batchnorm`. A pair is folded only when that is exact:

* the BatchNorm is a plain ONNX inference one (only its first output used, not ``training_mode``, not
  ``spatial=0``);
* the Conv's weight and bias and the BN's four statistics are constants: initializers, or the output of an
  ``Identity`` of an initializer (torch's exporter shares equal tensors that way: ResNet-50's BN statistics);
* the Conv's output is read by nothing but that BatchNorm: no other node, no graph output, and no node
  inside an ``If``/``Loop``/``Scan`` body (those read outer-scope names implicitly).

The folded weight and bias are new initializers. Initializers and ``Identity`` nodes the fold leaves unread
are removed, where "read" includes every name a subgraph uses: a tensor read only inside an ``If`` branch
stays (deleting it made the model fail ``onnx.checker``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.external import tensor_array
from onnxprune.graph import subgraph_reads

__all__ = ["fold_batchnorm"]

_ONNX_DOMAINS = ("", "ai.onnx")
#: Epsilon when a BatchNormalization node does not set one (the ONNX default).
DEFAULT_EPSILON = 1e-5
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold every foldable Conv -> BatchNormalization pair of the main graph (see the module doc).

    Args:
        model: The model; it is never modified.

    Returns:
        A folded copy, or ``model`` itself (the same object) when no pair is foldable.
    """
    pairs = _foldable_pairs(model.graph)
    if not pairs:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    constants = _constants(graph)
    taken = _all_names(graph)
    by_output = {conv_out: bn_index for bn_index, conv_out in pairs}
    folded_bns = set(by_output.values())
    keep: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    replaced: set[str] = set()
    for index, node in enumerate(graph.node):
        if index in folded_bns:
            continue  # its work moves into its conv
        if node.op_type == "Conv" and node.output and node.output[0] in by_output:
            bn = graph.node[by_output[node.output[0]]]
            weight, bias = _folded(node, bn, constants)
            names = [_fresh(f"{node.output[0]}__bnfold_{s}", taken) for s in ("w", "b")]
            new_inits += [numpy_helper.from_array(weight, names[0]), numpy_helper.from_array(bias, names[1])]
            replaced.update(i for i in [*node.input[1:], *bn.input[1:5]] if i)
            inputs = [node.input[0], *names]
            del node.input[:]
            node.input.extend(inputs)
            node.output[0] = bn.output[0]
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(new_inits)
    _drop_unread(graph, replaced)
    return out


def _foldable_pairs(graph: onnx.GraphProto) -> list[tuple[int, str]]:
    """(index of the BatchNormalization, output of its Conv) for every pair :func:`fold_batchnorm` folds."""
    constants = _constants(graph)
    readers = _read_counts(graph)
    producer = {o: n for n in graph.node for o in n.output if o}
    pairs = []
    for index, bn in enumerate(graph.node):
        if not _is_inference_batchnorm(bn):
            continue
        conv = producer.get(bn.input[0])
        if (
            conv is None or conv.op_type != "Conv" or conv.domain not in _ONNX_DOMAINS
            or readers.get(conv.output[0], 0) != 1
            or len(conv.input) < 2
            or not all(i in constants for i in [*conv.input[1:], *bn.input[1:5]] if i)
            or not _shapes_fit(conv, bn, constants)
        ):  # fmt: skip
            continue
        pairs.append((index, conv.output[0]))
    return pairs


def _is_inference_batchnorm(node: onnx.NodeProto) -> bool:
    if node.op_type != "BatchNormalization" or node.domain not in _ONNX_DOMAINS:
        return False
    if len(node.input) != 5 or not node.output[0] or any(node.output[1:]):  # running mean/var: training only
        return False
    attrs = {a.name: a for a in node.attribute}
    training = attrs.get("training_mode")
    spatial = attrs.get("spatial")  # opset < 9: spatial=0 normalises per element, not per channel
    return (training is None or training.i == 0) and (spatial is None or spatial.i == 1)


def _shapes_fit(conv: onnx.NodeProto, bn: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> bool:
    """A float conv weight ``[C, ...]`` with per-channel (``[C]``) bias and statistics: the fold is exact."""
    w = constants[conv.input[1]]
    if w.data_type not in _FLOAT_TYPES or len(w.dims) < 3:
        return False
    vectors = [*bn.input[1:5], *([conv.input[2]] if len(conv.input) > 2 and conv.input[2] else [])]
    return all(list(constants[i].dims) == [w.dims[0]] for i in vectors)


def _folded(
    conv: onnx.NodeProto, bn: onnx.NodeProto, constants: dict[str, onnx.TensorProto]
) -> tuple[np.ndarray, np.ndarray]:
    """The folded (weight, bias) of a pair :func:`_foldable_pairs` accepted."""
    w = tensor_array(constants[conv.input[1]])
    gamma, beta, mean, var = (tensor_array(constants[i]).astype(np.float64) for i in bn.input[1:5])
    if len(conv.input) > 2 and conv.input[2]:
        bias = tensor_array(constants[conv.input[2]]).astype(np.float64)
    else:
        bias = np.zeros(w.shape[0])
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), DEFAULT_EPSILON)
    scale = gamma / np.sqrt(var + eps)
    weight = (w.astype(np.float64) * scale.reshape(-1, *[1] * (w.ndim - 1))).astype(w.dtype)
    return weight, ((bias - mean) * scale + beta).astype(w.dtype)


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers by name, plus the outputs of ``Identity`` nodes reading one."""
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Identity" and node.domain in _ONNX_DOMAINS and node.input[0] in constants:
            constants[node.output[0]] = constants[node.input[0]]
    return constants


def _read_counts(graph: onnx.GraphProto) -> dict[str, int]:
    """How often each name is read: node inputs, graph outputs, and once per node whose subgraphs use it."""
    counts: dict[str, int] = {}
    for node in graph.node:
        for name in [*node.input, *subgraph_reads(node)]:
            if name:
                counts[name] = counts.get(name, 0) + 1
    for o in graph.output:
        counts[o.name] = counts.get(o.name, 0) + 1
    return counts


def _drop_unread(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Remove the ``Identity`` nodes and initializers among ``candidates`` (and the initializers those
    Identities read) that nothing reads any more, subgraphs included."""
    readers = _read_counts(graph)
    dead_identities = [
        n for n in graph.node
        if n.op_type == "Identity" and n.output[0] in candidates and not readers.get(n.output[0])
    ]  # fmt: skip
    for node in dead_identities:
        graph.node.remove(node)
        candidates.add(node.input[0])
    readers = _read_counts(graph)
    dead = {t.name for t in graph.initializer if t.name in candidates and not readers.get(t.name)}
    if not dead:
        return
    kept = [t for t in graph.initializer if t.name not in dead]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    # Old exporters also list initializers as graph inputs; a removed one must not become a required input.
    inputs = [i for i in graph.input if i.name not in dead]
    del graph.input[:]
    graph.input.extend(inputs)


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {v.name for v in [*graph.input, *graph.output]}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.update(subgraph_reads(node))
    return names


def _fresh(name: str, taken: set[str]) -> str:
    """``name``, or ``name_1``, ``name_2`` … if taken; the result is added to ``taken``."""
    candidate, k = name, 0
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    taken.add(candidate)
    return candidate
