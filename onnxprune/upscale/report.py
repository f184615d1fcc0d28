"""What an unconstrained export costs: the copy ops it inserted (`copy_report`) and its nonzero parameters
(`effective_params`, which leaves out the zero rows/columns of absorbed units)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxprune.graph import ModelGraph
from onnxprune.importer import infer_shapes
from onnxprune.upscale.copies import COPY, COPY_OPS

_GATHER_SCATTER = ("Gather", "GatherElements", "ScatterND", "ScatterElements")
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def copy_report(model: onnx.ModelProto) -> dict:
    """Copy ops the export inserted (by op type) and the bytes they write per inference.

    The copies are found by the name stem every export gives them (`copies.COPY`): the one record a saved
    model keeps.
    """
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    graph = ModelGraph(infer_shapes(clone))
    ops: dict[str, int] = {}
    written = 0
    for node in graph.nodes:
        if not node.name.startswith(COPY) or node.op_type not in COPY_OPS:
            continue
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        shape = graph.shape(node.output[0]) or ()
        numel = int(np.prod([d if isinstance(d, int) else 1 for d in shape], dtype=np.int64))
        written += numel * itemsize(graph.dtype(node.output[0]))
    return {"ops": dict(sorted(ops.items())), "copy_ops": sum(ops.values()), "bytes": written,
            "gather_scatter": sum(ops.get(k, 0) for k in _GATHER_SCATTER)}  # fmt: skip


def effective_params(model: onnx.ModelProto) -> int:
    """Nonzero floating-point parameter elements (zero rows/columns kept for absorption do not count)."""
    graph = ModelGraph(model)
    total = 0
    for t in graph.initializers.values():
        if t.data_type in _FLOAT_TYPES:
            total += int(np.count_nonzero(graph.initializer_value(t.name)))
    return total


def itemsize(elem_type: int | None) -> int:
    """Bytes per element of an ONNX element type (4 when unknown)."""
    if elem_type is None:
        return 4
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
