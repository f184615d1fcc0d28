"""The group-sparse kernel (targets/tvm_sparse_group.py: runs of ``bk`` along the reduction axis, pixels
vectorised) against numpy: a matmul whose rows are not a whole number of tiles, a strided 1x1 convolution,
bias and ReLU bounds. Small shapes: compiled in seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.targets.sparse_formats import to_bsr
from tests.tvm_helpers import needs_tvm


@needs_tvm
@pytest.mark.parametrize(
    ("x_shape", "out_shape", "strides", "keep"),
    [((1, 1, 40, 32), (1, 1, 40, 48), (1, 1), 0.4), ((2, 9, 9, 16), (2, 5, 5, 32), (2, 2), 0.7),
     ((1, 1, 16, 8), (1, 1, 16, 16), (1, 1), 0.0)],
)  # fmt: skip
def test_group_kernel_matches_numpy(x_shape, out_shape, strides, keep):
    import tvm

    from onnxprune.targets import tvm_backend as tb
    from onnxprune.targets.table import get_target
    from onnxprune.targets.tvm_sparse_group import cpu_group_kernel, group_kernel_applies

    rng = np.random.default_rng(len(x_shape) + x_shape[2])
    k, n = x_shape[-1], out_shape[-1]
    mask = rng.random((k // 4, n)) < keep
    w = (rng.standard_normal((k, n)) * np.repeat(mask, 4, axis=0)).astype(np.float32)
    bsr = to_bsr(w, (4, 1))
    pixels = int(np.prod(out_shape[:-1]))
    assert group_kernel_applies(bsr, pixels, 16, (1, 1))
    bias = rng.standard_normal(n).astype(np.float32)
    f = cpu_group_kernel(x_shape, out_shape, strides, bsr, 16, lo=0.0)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                      target=tb.build_target(get_target("x86")))  # fmt: skip
    x = rng.standard_normal(x_shape).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, bsr.data, bsr.indices, bsr.indptr, bias)], out)
    sh, sw = strides
    xs = x[:, ::sh, ::sw, :][:, : out_shape[1], : out_shape[2], :].astype(np.float64)
    ref = np.maximum(xs @ w + bias, 0.0)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(ref).max()))


@needs_tvm
@pytest.mark.parametrize(
    ("batch", "hw", "c", "n", "strides", "padding", "dilation"),
    [(1, (9, 7), 16, 24, (2, 1), (1, 1, 1, 1), (1, 2)), (2, (8, 8), 8, 16, (1, 1), (1, 1, 1, 1), (1, 1)),
     (1, (12, 11), 8, 8, (2, 2), (0, 1, 1, 0), (1, 1))],
)  # fmt: skip
def test_planes_kernel_matches_numpy(batch, hw, c, n, strides, padding, dilation):
    """The KxK group kernel over phase planes (targets/tvm_sparse_planes.py): strides, dilation, asymmetric
    padding and a batch of 2, against a numpy convolution, with the Relax input rearrangement it needs."""
    from dataclasses import replace

    import tvm
    from tvm import relax

    from onnxprune.targets import tvm_backend as tb
    from onnxprune.targets.table import get_target
    from onnxprune.targets.tvm_sparse_planes import Planes, cpu_planes_kernel, plane_offsets, planes_input

    rng = np.random.default_rng(c + n)
    (h, w), (kh, kw) = hw, (3, 3)
    keep = rng.random((kh * kw * c // 4, n)) < 0.5
    wt = (rng.standard_normal((kh * kw * c, n)) * np.repeat(keep, 4, axis=0)).astype(np.float32)
    x = rng.standard_normal((batch, h, w, c)).astype(np.float32)
    top, left, bottom, right = padding
    xpad = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0))).astype(np.float64)
    (sh, sw), (dh, dw) = strides, dilation
    oh, ow = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1, (w + left + right - dw * (kw - 1) - 1) // sw + 1
    g = Planes(batch, c, (kh, kw), strides, dilation, padding, (h, w), (oh, ow))
    bsr = to_bsr(wt, (4, 1))
    bsr = replace(bsr, indices=plane_offsets(bsr, g))
    bias = rng.standard_normal(n).astype(np.float32)
    w4 = wt.reshape(kh, kw, c, n).astype(np.float64)
    ref = bias.astype(np.float64) + sum(
        xpad[:, r * dh :: sh, s * dw :: sw, :][:, :oh, :ow, :] @ w4[r, s] for r in range(kh) for s in range(kw))
    ref = np.maximum(ref, 0.0)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            xp = planes_input(bb, xv, g)
            gv = bb.add_func(cpu_planes_kernel(g, bsr, 16, 32, lo=0.0).with_attr("tirx.is_scheduled", True), "k")
            args = [xp] + [relax.const(a) for a in (bsr.data, bsr.indices, bsr.indptr, bias)]
            out = bb.emit_output(relax.call_tir(gv, args, relax.TensorType((batch, oh, ow, n), "float32")))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=tb.build_target(get_target("x86"))), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(ref).max()))
