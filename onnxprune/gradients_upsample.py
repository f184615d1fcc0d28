"""Gradient rules of the upsampling ops: Resize (its per-axis interpolation matrices, transposed) and ConvTranspose.

Every Resize mode (nearest with any rounding, linear, cubic; every coordinate transformation but
tf_crop_and_resize; antialias) interpolates each resized axis independently with weights that do not depend on
the values: along axis a the output is ``y = R_a x`` for a fixed matrix R_a [out, in], so the input gradient is
``g_x = R_a^T g_y`` on each resized axis: one MatMul per axis (the axis moved last and back by Transposes).

R_a is not re-derived from the coordinate rules here (seven transformations, three rounding modes, cubic
coefficients, antialias filters): it is read off onnxruntime by running the node itself on one-hot probes,
basis vectors along axis a held constant along the other resized axes (interpolation weights sum to 1 in every
mode, so a constant stays constant), one run holding a probe at every position of the axes the node leaves
alone (a slab of them where constant scales allow a smaller input). The matrices are then checked on a random
input against the node's own output; a node they do not reproduce is refused in one line.

ConvTranspose's input gradient is the plain convolution with the same weight (its adjoint): the output gradient
is placed back into the uncropped output (``pads`` crop it; ``output_padding`` rows received no input) and
convolved with the forward strides, dilations and groups; a ConvTranspose weight [C_in, C_out / G, *k] is already
a Conv weight [C_in, C_out / G, *k] mapping C_out channels to C_in.

Measured: PP-OCRv4's text detector (DBNet: nearest upsamplings in its FPN, a ConvTranspose head) synthesises
inputs with ``--calib synthetic`` (it stopped at "no gradient for Resize", then at ConvTranspose).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.errors import UnsupportedModelError
from onnxprune.gradients import Context, Emitter, rule
from onnxprune.graph import attrs

__all__ = ["resize_matrices"]


@rule("Resize")
def _resize(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    g = gys[0]
    rank = len(cx.shape(node.input[0]))
    for axis, R in resize_matrices(node, cx).items():
        if axis == rank - 1:
            g = em.op("MatMul", [g, em.const(R, "resize")])  # [..., out] @ [out, in]
            continue
        perm = list(range(rank))
        perm[axis], perm[-1] = perm[-1], perm[axis]
        g = em.op("Transpose", [g], perm=perm)
        g = em.op("Transpose", [em.op("MatMul", [g, em.const(R, "resize")])], perm=perm)
    return {0: g}


@rule("ConvTranspose")
def _conv_transpose(em: Emitter, cx: Context, node: onnx.NodeProto, gys: list[str | None]) -> dict[int, str]:
    assert gys[0] is not None
    w = cx.weight(node)
    a = attrs(node)
    auto = a.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto not in ("NOTSET", "VALID") or a.get("output_shape"):
        raise UnsupportedModelError(f"synthetic calibration: ConvTranspose node {node.name!r} (auto_pad {auto} / "
                                    "output_shape: give its pads explicitly)")
    xs, ys = cx.shape(node.input[0]), cx.shape(node.output[0])
    kernel = [int(k) for k in w.shape[2:]]
    nd = len(kernel)
    strides = list(a.get("strides") or [1] * nd)
    dilations = list(a.get("dilations") or [1] * nd)
    begin = list(a.get("pads") or [0] * (2 * nd))[:nd] if auto == "NOTSET" else [0] * nd
    full = [(xs[2 + i] - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1 for i in range(nd)]
    g = gys[0]
    ends = [max(0, full[i] - begin[i] - ys[2 + i]) for i in range(nd)]
    if any(begin) or any(ends):
        g = em.pad(g, [0, 0, *begin, 0, 0, *ends])
    if any(begin[i] + ys[2 + i] > full[i] for i in range(nd)):  # output_padding past the uncropped output
        g = em.slice(g, [0] * nd, full, list(range(2, 2 + nd)))
    return {0: em.op("Conv", [g, node.input[1]], strides=strides, dilations=dilations,
                     group=int(a.get("group", 1)), kernel_shape=kernel)}


def resize_matrices(node: onnx.NodeProto, cx: Context) -> dict[int, np.ndarray]:
    """Axis -> R [out, in] with ``y = R x`` along that axis, for every axis the node resizes (checked)."""
    from onnxprune.verify import session

    mode = attrs(node).get("coordinate_transformation_mode", "half_pixel")
    if (mode.decode() if isinstance(mode, bytes) else mode) == "tf_crop_and_resize":
        raise UnsupportedModelError(f"synthetic calibration: Resize node {node.name!r} (tf_crop_and_resize: values "
                                    "outside the box are a constant, not an interpolation)")
    xs, ys = cx.shape(node.input[0]), cx.shape(node.output[0])
    scales = cx.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scales is not None and scales.size:  # sizes follow the input: probe one small slab of the unresized axes
        kept_axes = [a for a in range(len(xs)) if xs[a] == ys[a]]
        small = list(xs)
        for n, a in enumerate(kept_axes):
            small[a] = min(xs[a], max(xs)) if n == 0 else 1
        ys = tuple(small[a] if a in kept_axes else ys[a] for a in range(len(xs)))
        xs = tuple(small)
    sess = session(_probe_model(node, cx, xs, ys))
    run = lambda x: sess.run(None, {"x": x})[0]
    resized = [a for a in range(len(xs)) if xs[a] != ys[a]]
    kept = [a for a in range(len(xs)) if xs[a] == ys[a]]
    carriers = [np.unravel_index(j, [xs[a] for a in kept]) for j in range(int(np.prod([xs[a] for a in kept])))]
    matrices = {}
    for axis in resized:
        R = np.zeros((ys[axis], xs[axis]), dtype=np.float32)
        for start in range(0, xs[axis], len(carriers)):
            probe = np.zeros(xs, dtype=np.float32)
            reads = []
            for k, carrier in zip(range(start, xs[axis]), carriers):
                at: list = [slice(None)] * len(xs)
                for a, i in zip(kept, carrier):
                    at[a] = int(i)
                at[axis] = k
                probe[tuple(at)] = 1.0
                for a in resized:
                    at[a] = slice(None) if a == axis else 0
                reads.append((k, tuple(at)))
            y = run(probe)
            for k, read in reads:
                R[:, k] = y[read]
        matrices[axis] = R
    x = np.random.default_rng(0).standard_normal(xs).astype(np.float32)
    y = x
    for axis, R in matrices.items():
        y = np.moveaxis(np.tensordot(R, y, axes=([1], [axis])), 0, axis)
    expected = run(x)
    if not np.allclose(y, expected, rtol=1e-4, atol=1e-4 * (float(np.abs(expected).max()) + 1.0)):
        raise UnsupportedModelError(f"synthetic calibration: Resize node {node.name!r} is not a per-axis "
                                    "interpolation (no gradient)")
    return matrices


def _probe_model(node: onnx.NodeProto, cx: Context, xs: tuple[int, ...], ys: tuple[int, ...]) -> onnx.ModelProto:
    """The node alone on a static input "x" of shape `xs`, its other inputs as constants: their values, or, where
    the graph computes them, the static output size `ys` (as ``sizes``, or as ``scales`` where only those exist)."""

    def const(i: int) -> np.ndarray | None:
        return cx.value(node.input[i]) if len(node.input) > i and node.input[i] else None

    # x, roi, scales, sizes (opset >= 11, which synthesis needs); empty tensors stand for absent ones
    roi, scales, sizes = const(1), const(2), const(3)
    if scales is None or scales.size == 0:
        scales = np.zeros(0, np.float32)
        sizes = sizes if sizes is not None and sizes.size else np.asarray(ys, np.int64)
    else:
        sizes = None
    values = [np.zeros(0, np.float32) if roi is None else roi, scales] + ([] if sizes is None else [sizes])
    names = [f"in{i}" for i in range(1, len(values) + 1)]
    probe = onnx.NodeProto()
    probe.CopyFrom(node)
    del probe.input[:]
    probe.input.extend(["x", *names])
    del probe.output[:]
    probe.output.append("y")
    graph = helper.make_graph([probe], "resize_probe",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(xs))],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, list(ys))],
                              [numpy_helper.from_array(np.asarray(v), n) for n, v in zip(names, values)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", cx.opset)])
