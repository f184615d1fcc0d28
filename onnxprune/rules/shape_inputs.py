"""Reading a node's shape-like inputs (axes, shape vectors) the way every rule needs it.

`read_axes` takes the axes of Squeeze/Unsqueeze/Reduce/Pad from the attribute (old opsets) or the constant
input (new opsets). `shape_elements` says, per element of a 1-D shape input (Reshape target, Expand shape,
Resize sizes), whether it is a constant that can be rewritten in place, a size read at run time from a
tensor (it follows that tensor after pruning by itself), or unknown.
"""

from __future__ import annotations

from typing import Any, TypeGuard, overload

import numpy as np
import onnx

from onnxprune.graph import attrs
from onnxprune.onnx_utils import gather_list
from onnxprune.rules.protocols import RuleBarrier, ShapeView


@overload
def read_axes(node: onnx.NodeProto, ctx: ShapeView, index: int, default: list[int]) -> list[int]: ...


@overload
def read_axes(node: onnx.NodeProto, ctx: ShapeView, index: int, default: None = None) -> list[int] | None: ...


def read_axes(node: onnx.NodeProto, ctx: ShapeView, index: int, default: list[int] | None = None) -> list[int] | None:
    """Axes from the attribute (old opsets) or the constant input `index` (new opsets), else `default`.

    Raises:
        RuleBarrier: the axes input is computed at run time.
    """
    at = attrs(node)
    if "axes" in at:
        return list(at["axes"])
    if index < len(node.input) and node.input[index]:
        value = ctx.const(node.input[index])
        if value is None:
            raise RuleBarrier("axes computed at run time")
        return [int(v) for v in value.reshape(-1)]
    return default


def shape_elements(ctx: ShapeView, node: onnx.NodeProto, index: int) -> list[tuple[Any, Any]] | None:
    """Where each element of a 1-D shape input comes from.

    Returns a list with, per element, ``(value, (node, input_index, element_index))`` when the element is
    a constant that can be rewritten, ``(("size", tensor, axis), None)`` when it is read at run time from
    a tensor's size (``x.size(-1)``: it follows that size after pruning by itself), or ``(None, None)``
    when it is computed otherwise; or None when even the length is unknown.
    """
    name = node.input[index] if index < len(node.input) else ""
    if not name:
        return None
    value = ctx.const(name)
    if value is not None:
        return [(int(v), (node, index, k)) for k, v in enumerate(value.reshape(-1))]
    producer = ctx.graph.producer.get(name)
    if producer is not None and producer.op_type in ("Identity", "Cast", "Reshape") and ctx.rank(name) == 1:
        return shape_elements(ctx, producer, 0)
    if producer is not None and producer.op_type == "Where" and _is_minus_one_guard(ctx, producer):
        # torch exports expand(*sizes) as Where(Equal(s, -1), 1, s): with no -1 left, it is s.
        inner = shape_elements(ctx, producer, 2)
        if inner is not None and all(v != -1 for v, _ in inner):
            return inner
        return None
    if producer is not None and producer.op_type == "Concat":
        out: list[tuple[Any, Any]] = []
        for j, piece in enumerate(producer.input):
            pv = ctx.const(piece)
            if pv is not None:
                out += [(int(v), (producer, j, k)) for k, v in enumerate(pv.reshape(-1))]
                continue
            sizes = runtime_sizes(ctx, piece)
            if sizes is not None:
                out += [(sz, None) for sz in sizes]
                continue
            n = ctx.size(piece, 0) if ctx.rank(piece) == 1 else (1 if ctx.rank(piece) == 0 else None)
            if not isinstance(n, int):
                return None
            out += [(None, None)] * n
        return out
    n = ctx.size(name, 0)
    return [(None, None)] * n if isinstance(n, int) else None


def _is_minus_one_guard(ctx: ShapeView, where: onnx.NodeProto) -> bool:
    cond = ctx.graph.producer.get(where.input[0])
    if cond is None or cond.op_type != "Equal" or where.input[2] not in cond.input:
        return False
    other = cond.input[1] if cond.input[0] == where.input[2] else cond.input[0]
    value = ctx.const(other)
    return value is not None and bool(np.all(value == -1))


def is_runtime_size(value: Any) -> TypeGuard[tuple[str, str, int]]:
    """Is a `shape_elements` / `runtime_sizes` value ``("size", tensor, axis)``: read from a tensor's size at run time?"""
    return isinstance(value, tuple) and len(value) == 3 and value[0] == "size"


def runtime_sizes(ctx: ShapeView, name: str, depth: int = 4) -> list[Any] | None:
    """``[("size", tensor, axis), ...]`` if `name` is read from tensor sizes (Shape, Gather of Shape)."""
    node = ctx.graph.producer.get(name)
    while node is not None and depth and node.op_type in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
        node, depth = ctx.graph.producer.get(node.input[0]), depth - 1
    if node is None:
        return None
    if node.op_type == "Shape":
        rank = ctx.rank(node.input[0])
        at = attrs(node)
        if rank is None:
            return None
        start, end = at.get("start", 0), at.get("end", rank)
        return [("size", node.input[0], k) for k in range(rank)[start:end]]
    if node.op_type == "Slice" and len(node.input) >= 3:
        src = runtime_sizes(ctx, node.input[0], depth - 1)
        bounds = [ctx.const(n) if n else None for n in list(node.input[1:5]) + [""] * (5 - len(node.input))]
        if src is None or bounds[0] is None or bounds[1] is None:
            return None
        step = int(bounds[3].reshape(-1)[0]) if bounds[3] is not None else 1
        return src[int(bounds[0].reshape(-1)[0]) : int(bounds[1].reshape(-1)[0]) : step]
    if node.op_type == "Gather":
        return gather_list(runtime_sizes(ctx, node.input[0], depth - 1), ctx.const(node.input[1]))
    return None
