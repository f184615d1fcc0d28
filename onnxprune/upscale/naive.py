"""Step 6 of UPSCALE: the copies of non-contiguous channel sets, as the naive export writes them.

The naive export (``reorder=False``) keeps the original channel order, so a reader's subset is *gathered*
(`gather_copy`, what ``x[:, idx]`` exports to) and a writer's channels are *scattered* into a zero stream
(`scatter_nd_copy`, ``out = zeros(...); out[:, idx] = y``: `ConstantOfShape` + `ScatterND`).
`pad_gather_copy` is the partly optimised scatter (one zero channel appended by `Pad`, then one `Gather`
places every channel); the reordered export uses it, and `gather_copy`, where no order makes a set
contiguous.

Every function takes `idx`, the input slot of each output position (-1: a new, zero channel; see
`copies.source_slots`), and returns the ops and the tensor holding the result.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.upscale.copies import CopyWriter, Ops, pads


def gather_copy(w: CopyWriter, x: str, axis: int, idx: np.ndarray) -> Ops:
    """Narrowing (or reordering) to the input slots `idx`."""
    n = w.name("Gather")
    return [helper.make_node("Gather", [x, w.const(idx, n)], [n], name=n, axis=axis)], n


def pad_gather_copy(w: CopyWriter, x: str, rank: int, axis: int, idx: np.ndarray, k: int) -> Ops:
    """Scatter: one zero channel appended to the `k` input channels, then every output slot gathers its
    source (or the zero)."""
    p = w.name("Pad")
    ops = [helper.make_node("Pad", [x, w.const(pads(rank, axis, 0, 1), p)], [p], name=p, mode="constant")]
    n = w.name("Gather")
    ops.append(helper.make_node("Gather", [p, w.const(np.where(idx >= 0, idx, k), n)], [n], name=n, axis=axis))
    return ops, n


def scatter_nd_copy(w: CopyWriter, x: str, shape: list, axis: int, idx: np.ndarray, k: int, dtype: int) -> Ops:
    """UPSCALE's naive scatter: a zero stream, the `k` input channels written at their slots by ScatterND.

    `shape` is the output's shape; the dims up to `axis` must be static (the indices address every
    (leading dims, channel) pair: shape lead + [k, axis + 1]); later dims may be dynamic.
    """
    rank = len(shape)
    present = idx >= 0
    n = w.name("ScatterND")
    out_shape = [d if isinstance(d, int) else -1 for d in shape]
    zeros = w.name("ConstantOfShape")
    ops: list[onnx.NodeProto] = []
    if all(d >= 0 for d in out_shape):
        shape_in = w.const(np.array(out_shape, np.int64), zeros)
    else:  # dynamic trailing dims: the input's shape with the axis widened
        sh = w.name("Shape")
        ops.append(helper.make_node("Shape", [x], [sh], name=sh))
        onehot = np.zeros(rank, np.int64)
        onehot[axis] = 1
        mul, add = w.name("Mul"), w.name("Add")
        ops.append(helper.make_node("Mul", [sh, w.const(1 - onehot, mul)], [mul], name=mul))
        ops.append(helper.make_node("Add", [mul, w.const(onehot * len(idx), add)], [add], name=add))
        shape_in = add
    zero = numpy_helper.from_array(np.zeros(1, helper.tensor_dtype_to_np_dtype(dtype)))
    ops.append(helper.make_node("ConstantOfShape", [shape_in], [zeros], name=zeros, value=zero))
    slots = np.flatnonzero(present)  # the output slots that receive an input channel
    src = idx[present]  # ... and which input channel each receives
    if not np.array_equal(src, np.arange(k)):  # some input channels dropped or out of order
        gname = w.name("Gather")
        ops.append(helper.make_node("Gather", [x, w.const(src, gname)], [gname], name=gname, axis=axis))
        x = gname
    lead = [int(d) for d in shape[:axis]]
    grids = np.meshgrid(*[np.arange(d) for d in lead], np.arange(len(slots)), indexing="ij")
    indices = np.stack([*grids[:-1], slots[grids[-1]]], axis=-1).astype(np.int64)
    ops.append(helper.make_node("ScatterND", [zeros, w.const(indices, n), x], [n], name=n))
    return ops, n
