"""The direct block-sparse matmul kernel (targets/tvm_sparse_matmul.py) against numpy: row tiles, accumulator
chains with a remainder, ``bk > 1`` blocks, bias and ReLU6 bounds; and the epilogue fusion of a bias added
on the left (``bias + x``, as Hugging Face exports write it). Small shapes: compiled in seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.targets.sparse_formats import to_bsr
from tests.tvm_helpers import needs_tvm


def _zero_blocks(rng: np.random.Generator, k: int, n: int, block: tuple[int, int], keep: float) -> np.ndarray:
    bk, bn = block
    mask = rng.random((k // bk, n // bn)) < keep
    return (rng.standard_normal((k, n)) * np.kron(mask, np.ones(block))).astype(np.float32)


@needs_tvm
@pytest.mark.parametrize(("m", "block", "keep"), [(1, (1, 16), 0.3), (3, (2, 16), 0.5), (32, (1, 32), 0.2)])
def test_block_matmul_kernel_matches_numpy(m, block, keep):
    import tvm

    from onnxprune.targets import tvm_backend as tb
    from onnxprune.targets.table import get_target
    from onnxprune.targets.tvm_sparse_matmul import cpu_block_matmul_kernel

    rng = np.random.default_rng(m)
    k, n = 64, 96 if block[1] == 16 else 64
    w = _zero_blocks(rng, k, n, block, keep)
    bsr = to_bsr(w, block)
    bias = rng.standard_normal(n).astype(np.float32)
    f = cpu_block_matmul_kernel(m, bsr, 16, 32, lo=-1.0, hi=6.0)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                      target=tb.build_target(get_target("x86")))  # fmt: skip
    x = rng.standard_normal((1, 1, m, k)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((1, 1, m, n), np.float32))
    args = [x, bsr.data, bsr.indices, bsr.indptr, bias]
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    ref = np.clip(x[0, 0].astype(np.float64) @ w + bias, -1.0, 6.0)
    np.testing.assert_allclose(out.numpy()[0, 0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@needs_tvm
def test_left_bias_is_fused_into_the_sparse_kernel():
    import tvm
    from tvm import relax

    from onnxprune.targets.tvm_sparse import Decision, sparsify

    rng = np.random.default_rng(0)
    w = _zero_blocks(rng, 32, 32, (1, 16), 0.3)
    bias = rng.standard_normal(32).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 32), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            mm = bb.emit(relax.op.matmul(x, relax.const(w)))
            out = bb.emit_output(relax.op.nn.relu(bb.emit(relax.op.add(relax.const(bias), mm))))
        bb.emit_func_output(out)
    mod = sparsify(lambda _layer, _f: Decision((1, 16)), 16, 32)(bb.get())
    text = str(mod["main"])
    assert "R.add" not in text and "R.nn.relu" not in text, text
    assert len([gv for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]) == 1
