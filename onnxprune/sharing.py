"""Shared initializers: one parameter the model reads several times, or equal values an exporter deduplicated.

A tensor read by several nodes is either a *tie* (a tied embedding, ALBERT's layers, RetinaNet's heads over the
pyramid levels, RAFT's update block over its iterations): one parameter, whose readers' channels must go together
and which is stored once; or a *coincidence*: exporters store equal initializers once (a fresh BatchNorm's all-ones
scale, an all-zero bias), which would couple unrelated layers. `_coincidental` tells them apart by value (every value
the same); `unshare_small_initializers` and `unshare_dequantized_constants` give each reader of a coincidence its
own copy, and `genuine_ties` names the tensors no fold in `onnxprune.canonical` may copy per reader. torch's
exporter also deduplicates equal *parameters* through Identity nodes (a projection shortcut's BatchNorm bias equals
the block's last one: the same gradient trained both from zero); `canonical` gives those their own copy back, so
only a tensor read directly by several nodes can be a tie. Measured on the zoo and 46 more exports (session 35):
RetinaNet-R50-FPN counted 53.4 M parameters for the 34.0 M it stores, RAFT-small 3.7 M for 1.0 M, ALBERT 339 k
for 208 k; now 34.1 M, 1.09 M, 208 k, and their pruned files are smaller than the originals.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune import external as ext
from onnxprune.graph import subgraph_reads
from onnxprune.onnx_utils import numel

__all__ = ["FLOAT_TYPES", "UNSHARE_LIMIT", "genuine_ties", "unshare_dequantized_constants",
           "unshare_small_initializers", "uses"]


# Exporters deduplicate identical initializers (freshly initialised BatchNorm scales are all ones), which
# would couple unrelated layers: such shared tensors (`_coincidental`) up to this size get one copy per use.
UNSHARE_LIMIT = 1 << 20


def uses(g: onnx.GraphProto) -> dict[str, int]:
    """Reads of each name: node inputs, subgraph reads and graph outputs."""
    reads: dict[str, int] = {}
    for node in g.node:
        for name in list(node.input) + sorted(subgraph_reads(node)):
            reads[name] = reads.get(name, 0) + 1
    for o in g.output:
        reads[o.name] = reads.get(o.name, 0) + 1
    return reads


def genuine_ties(g: onnx.GraphProto, inits: dict[str, onnx.TensorProto], reads: dict[str, int]) -> set[str]:
    """Float initializers the model reads several times (`reads`: from `uses`) that no fold may copy per reader:
    not `_coincidental`,
    and not read by Slice nodes only (slices of a tensor store it once either way: torch's LSTM gate blocks)."""
    slicers: dict[str, int] = {}
    for node in g.node:
        if node.op_type == "Slice" and node.input:
            slicers[node.input[0]] = slicers.get(node.input[0], 0) + 1
    return {
        name for name, k in reads.items()
        if k > 1 and name in inits and inits[name].data_type in FLOAT_TYPES and slicers.get(name, 0) != k
        and not _coincidental(inits[name])
    }  # fmt: skip


FLOAT_TYPES = (1, 10, 11, 16)  # float, float16, double, bfloat16: weights, not shape constants


def _coincidental(t: onnx.TensorProto) -> bool:
    """Whether a shared initializer is shared by an exporter's deduplication of equal values, not by the model:
    every value the same (fresh BatchNorm scales are all ones, biases zeros, layer scales 1e-6) and at most
    `UNSHARE_LIMIT` of them. A shared tensor of varied values is one parameter read several times (a tied
    embedding, ALBERT's layers, RetinaNet's heads over the pyramid levels, RAFT's update block over its
    iterations): it stays shared, so its readers' channels couple and it is stored once. (Every reader got its
    own copy below 1 M values before: a "pruned" RAFT-small wrote 3.7 M parameters for the original's 1.0 M.)"""
    if numel(t) > UNSHARE_LIMIT:
        return False
    try:
        a = ext.tensor_array(t)
    except (ValueError, TypeError, KeyError, OSError):
        return False
    return a.size <= 1 or bool(np.all(a == a.flat[0]))


def _fresh_name(name: str, taken: set[str], start: int = 2) -> str:
    """``name__k`` with the first k >= `start` not in `taken` (which it joins): a copy's name."""
    k = start
    while f"{name}__{k}" in taken:
        k += 1
    taken.add(f"{name}__{k}")
    return f"{name}__{k}"


def unshare_small_initializers(g: onnx.GraphProto) -> bool:
    """Each reader of a coincidentally shared float initializer gets its own copy (``name__k``)."""
    inits = {t.name: t for t in g.initializer}
    reads: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            if name in inits:
                reads[name] = reads.get(name, 0) + 1
    outputs = {o.name for o in g.output}
    shared = {n for n, k in reads.items() if k > 1 and n not in outputs}
    shared = {n for n in shared if inits[n].data_type in FLOAT_TYPES}  # weights, not shape constants
    shared = {n for n in shared if _coincidental(inits[n])}
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
            new = _fresh_name(name, taken, seen[name])
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[name])
            copy.name = new
            g.initializer.append(copy)
            node.input[i] = new
    return True


def unshare_dequantized_constants(g: onnx.GraphProto) -> bool:
    """The same for quantized models: a small constant DequantizeLinear read by several nodes (quantizers
    dequantize a deduplicated all-zero bias once for every layer) gets one copy per reader, its integers,
    scale and zero point copied too, so that each reader's channels stay its own."""
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in g.output}
    taken = set(inits) | {o for n in g.node for o in n.output}
    changed = False
    nodes = list(g.node)
    for dq in nodes:
        if dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx") or dq.output[0] in outputs:
            continue
        params = [n for n in dq.input if n]
        if readers.get(dq.output[0], 0) < 2 or not all(n in inits for n in params):
            continue
        if not _coincidental(inits[dq.input[0]]) or any(readers[n] > 1 for n in params):
            continue
        first = True
        for node in nodes:
            for i, name in enumerate(node.input):
                if name != dq.output[0]:
                    continue
                if first:
                    first = False
                    continue
                copies = {}
                for n in params:
                    copy = onnx.TensorProto()
                    copy.CopyFrom(inits[n])
                    copy.name = copies[n] = _fresh_name(n, taken)
                    g.initializer.append(copy)
                clone = onnx.NodeProto()
                clone.CopyFrom(dq)
                clone.name = _fresh_name(dq.name or dq.output[0], taken)
                clone.input[:] = [copies.get(n, n) for n in dq.input]
                clone.output[:] = [_fresh_name(dq.output[0], taken)]
                g.node.insert(list(g.node).index(dq) + 1, clone)
                node.input[i] = clone.output[0]
                changed = True
    return changed
