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
