"""Routing by index values: a TopK whose indices choose slices of stacked weights (a mixture-of-experts router).

In an exported MoE layer (Mixtral, Qwen-MoE in the stacked form) the router's scores ``[tokens, E]`` are ranked by
``TopK(k)`` and its indices, reshaped, pick the chosen experts' weights out of tensors stacked on one axis
(``Gather(experts [E, ...], indices, axis=0)``). Position e of the scores' axis and slice e of every stacked
tensor are then one unit, an expert, even though no shape links them: the indices carry it by value. Removing
expert e everywhere keeps the graph consistent (the ranking over the remaining scores yields indices into the
remaining slices), `TopK`'s k stays, so at least k experts must be kept; what the model computes changes for the
tokens that chose e (they choose their next-best expert): inexact, the oracle is a router score of -inf.

`expert_routes` recognises the pattern; the TopK rule (`rules.pool.TopK`) links the axes and the Gather rule
(`rules.shape.Gather`) leaves such a gathered axis unfrozen. Anything else reading the indices (arithmetic, a
graph output, a Gather of another size) keeps the ranked axis frozen, as before.
"""

from __future__ import annotations

import onnx

from onnxprune.graph import attrs
from onnxprune.rules.protocols import ShapeView

__all__ = ["VALUE_KEEPING", "expert_routes", "topk_count", "topk_of_indices"]

# Operators that move index values without changing them (input 0 is the values).
VALUE_KEEPING = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Identity"})


def topk_of_indices(ctx: ShapeView, name: str) -> onnx.NodeProto | None:
    """The TopK whose indices output `name` carries unchanged (through `VALUE_KEEPING` operators), else None."""
    for _ in range(16):
        node = ctx.graph.producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "TopK":
            return node if len(node.output) > 1 and node.output[1] == name else None
        if node.op_type not in VALUE_KEEPING:
            return None
        name = node.input[0]
    return None


def topk_count(ctx: ShapeView, node: onnx.NodeProto) -> int | None:
    """TopK's k: the attribute (opset < 10) or the constant input, else None."""
    if len(node.input) > 1 and node.input[1]:
        k = ctx.const(node.input[1])
        return int(k.reshape(-1)[0]) if k is not None and k.size == 1 else None
    k = attrs(node).get("k")
    return int(k) if k is not None else None


def expert_routes(ctx: ShapeView, node: onnx.NodeProto) -> list[tuple[onnx.NodeProto, str, int]] | None:
    """For a TopK over axis A of x: the Gathers its indices choose slices with, as ``(gather, data, axis)``, when
    every reader of the indices (through `VALUE_KEEPING` operators) is such a Gather and each gathered axis has
    x's size along A; None otherwise (or when k is not a constant)."""
    x = node.input[0]
    rank = ctx.rank(x)
    if rank is None or len(node.output) < 2 or not node.output[1] or topk_count(ctx, node) is None:
        return None
    size = ctx.size(x, attrs(node).get("axis", -1) % rank)
    if not isinstance(size, int):
        return None
    routes: list[tuple[onnx.NodeProto, str, int]] = []
    pending, seen = [node.output[1]], set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        if ctx.graph.is_graph_io(name):
            return None
        seen.add(name)
        readers = ctx.graph.consumers.get(name, [])
        if not readers:
            return None
        for use in readers:
            reader = use.node
            if reader.domain not in ("", "ai.onnx"):
                return None
            if reader.op_type in VALUE_KEEPING and use.index == 0:
                pending.extend(o for o in reader.output if o)
            elif reader.op_type == "Gather" and use.index == 1:
                data = reader.input[0]
                data_rank = ctx.rank(data)
                if data_rank is None:
                    return None
                axis = attrs(reader).get("axis", 0) % data_rank
                if ctx.size(data, axis) != size:
                    return None
                routes.append((reader, data, axis))
            else:
                return None
    return routes or None
