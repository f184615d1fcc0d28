"""The output-row-blocked group-sparse kernel (targets/tvm_sparse_rows.py: ``group:4x1`` / ``group:8x1``, blocks
of ``bn`` outputs sharing one input channel, pixels vectorised) against numpy and onnxruntime: strided 1x1
convolutions, batch 2, pixel counts that are not a whole number of tiles, a matmul as a 1x1 convolution, bias
and ReLU / ReLU6 bounds, an empty block column. Small shapes: each compiles in a few seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.targets.sparse_formats import to_bsr
from tests.tvm_helpers import needs_tvm


def _group_weight(rng: np.random.Generator, k: int, n: int, bn: int, keep: float) -> np.ndarray:
    """A ``[K, N]`` weight whose zeros come in ``1 x bn`` blocks (``group:{bn}x1``), ``keep`` of them kept."""
    mask = rng.random((k, n // bn)) < keep
    mask[:, 0] = False  # one block column with no stored block at all
    return (rng.standard_normal((k, n)) * np.repeat(mask, bn, axis=1)).astype(np.float32)


def _run(x: np.ndarray, w: np.ndarray, bias: np.ndarray, out_shape, strides, bn: int, lanes: int, lo, hi):
    import tvm

    from onnxprune.targets import tvm_backend as tb
    from onnxprune.targets.table import get_target
    from onnxprune.targets.tvm_sparse_rows import cpu_rows_kernel, rows_kernel_applies

    bsr = to_bsr(w, (1, bn))
    pixels = int(np.prod(out_shape[:-1]))
    assert rows_kernel_applies(bsr, pixels, lanes, (1, 1))
    f = cpu_rows_kernel(x.shape, out_shape, strides, bsr, lanes, 32, lo, hi)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                      target=tb.build_target(get_target("x86")))  # fmt: skip
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, bsr.data, bsr.indices, bsr.indptr, bias)], out)
    return out.numpy()


@needs_tvm
@pytest.mark.parametrize(
    ("x_shape", "out_shape", "strides", "bn", "lanes", "keep", "bounds"),
    [((1, 7, 7, 64), (1, 7, 7, 32), (1, 1), 8, 16, 0.7, (-3e38, 3e38)),  # 49 pixels: the last tile moved back
     ((2, 9, 9, 16), (2, 5, 5, 24), (2, 2), 4, 16, 0.5, (0.0, 3e38)),   # stride 2, batch 2, ReLU
     ((1, 12, 10, 32), (1, 6, 10, 16), (2, 1), 8, 4, 0.3, (0.0, 6.0)),  # wasm-width tiles, ReLU6, sh != sw
     ((1, 1, 40, 48), (1, 1, 40, 64), (1, 1), 4, 16, 1.0, (-3e38, 3e38))],  # a matmul, nothing pruned
)  # fmt: skip
def test_rows_kernel_matches_numpy(x_shape, out_shape, strides, bn, lanes, keep, bounds):
    rng = np.random.default_rng(x_shape[2] * 31 + bn)
    k, n = x_shape[-1], out_shape[-1]
    w = _group_weight(rng, k, n, bn, keep)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal(x_shape).astype(np.float32)
    got = _run(x, w, bias, out_shape, strides, bn, lanes, *bounds)
    sh, sw = strides
    xs = x[:, ::sh, ::sw, :][:, : out_shape[1], : out_shape[2], :].astype(np.float64)
    ref = np.clip(xs @ w + bias, *bounds)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(ref).max()))


@needs_tvm
def test_rows_kernel_matches_onnxruntime_conv():
    """A strided 1x1 Conv with bias, as onnxruntime computes it (NCHW), within 1e-4 relative."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    k, n, h = 32, 64, 11
    w = _group_weight(rng, k, n, 8, 0.6)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((1, k, h, h)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[2, 2])
    inits = [numpy_helper.from_array(np.ascontiguousarray(w.T.reshape(n, k, 1, 1)), "w"),
             numpy_helper.from_array(bias, "b")]  # fmt: skip
    graph = helper.make_graph([node], "pw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k, h, h])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n, 6, 6])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": x})[0].transpose(0, 2, 3, 1)
    got = _run(
        np.ascontiguousarray(x.transpose(0, 2, 3, 1)), w, bias, (1, 6, 6, n), (2, 2), 8, 16, -3e38, 3e38
    )
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
