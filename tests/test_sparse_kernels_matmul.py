"""The direct block-sparse matmul kernel (targets/tvm_sparse_matmul.py) against numpy: row tiles, accumulator
chains with a remainder, ``bk > 1`` blocks, bias and ReLU6 bounds; and the epilogue fusion of a bias added
on the left (``bias + x``, as Hugging Face exports write it); the residual and GELU epilogues, their fusion
from a BERT feed-forward block, and that block against onnxruntime. Small shapes: compiled in seconds.
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


@needs_tvm
@pytest.mark.parametrize(("residual", "act"), [(True, ""), (False, "gelu"), (True, "gelu")])
def test_block_matmul_residual_and_gelu_epilogues_match_numpy(residual, act):
    import tvm
    from scipy.special import erf

    from onnxprune.targets import tvm_backend as tb
    from onnxprune.targets.table import get_target
    from onnxprune.targets.tvm_sparse_matmul import cpu_block_matmul_kernel

    rng = np.random.default_rng(7)
    m, k, n = 24, 64, 96
    w = _zero_blocks(rng, k, n, (1, 16), 0.3)
    bsr = to_bsr(w, (1, 16))
    bias = rng.standard_normal(n).astype(np.float32)
    f = cpu_block_matmul_kernel(m, bsr, 16, 32, residual=residual, act=act)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                      target=tb.build_target(get_target("x86")))  # fmt: skip
    x = rng.standard_normal((1, 1, m, k)).astype(np.float32)
    res = rng.standard_normal((1, 1, m, n)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((1, 1, m, n), np.float32))
    args = [x, bsr.data, bsr.indices, bsr.indptr, bias, *([res] if residual else [])]
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    ref = x[0, 0].astype(np.float64) @ w + bias + (res[0, 0] if residual else 0)
    if act == "gelu":
        ref = ref * (erf(ref / np.sqrt(2)) + 1) * 0.5
    np.testing.assert_allclose(out.numpy()[0, 0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@needs_tvm
def test_bert_ffn_bias_gelu_and_residual_fuse_into_the_sparse_kernels(tmp_path):
    """A BERT feed-forward block (bias on the left, erf GELU, residual) as ONNX: after sparsify only the two
    sparse calls (and reshapes) remain in Relax, and the compiled bundle matches onnxruntime."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnxprune.targets import compile_bundle, read_manifest, run_bundle
    from tests.tvm_helpers import assert_matches, ort_reference

    rng = np.random.default_rng(3)
    d, h, seq = 64, 128, 16
    w1, w2 = _zero_blocks(rng, d, h, (1, 16), 0.2), _zero_blocks(rng, h, d, (1, 16), 0.2)
    inits = [numpy_helper.from_array(a, name) for a, name in (
        (w1, "w1"), (rng.standard_normal(h).astype(np.float32), "b1"), (w2, "w2"),
        (rng.standard_normal(d).astype(np.float32), "b2"), (np.array(np.sqrt(2), np.float32), "sqrt2"),
        (np.array(1, np.float32), "one"), (np.array(0.5, np.float32), "half"))]  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["b1", "m1"], ["a1"]),
        helper.make_node("Div", ["a1", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["a1", "e1"], ["g"]),
        helper.make_node("Mul", ["g", "half"], ["gelu"]), helper.make_node("MatMul", ["gelu", "w2"], ["m2"]),
        helper.make_node("Add", ["b2", "m2"], ["a2"]), helper.make_node("Add", ["a2", "x"], ["y"]),
    ]  # fmt: skip
    g = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, d])], inits)  # fmt: skip
    path = tmp_path / "ffn.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    bundle = compile_bundle(path, "x86", tmp_path / "b", sparse="force")
    manifest = read_manifest(bundle)
    assert manifest["sparse"]["sparse_layer_count"] == 2
    x = {"x": rng.standard_normal((1, seq, d)).astype(np.float32)}
    assert_matches(run_bundle(bundle, x), ort_reference(path, x))


@needs_tvm
def test_gelu_chain_and_residual_leave_no_elementwise_ops():
    from tvm import relax

    from onnxprune.targets.tvm_sparse import Decision, sparsify

    rng = np.random.default_rng(1)
    w1, w2 = _zero_blocks(rng, 32, 64, (1, 16), 0.3), _zero_blocks(rng, 64, 32, (1, 16), 0.3)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 32), "float32"))

    def c(v: float) -> relax.Constant:
        return relax.const(v, "float32")

    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.add(relax.const(rng.standard_normal(64).astype(np.float32)),
                                     bb.emit(relax.op.matmul(x, relax.const(w1)))))  # fmt: skip
            e = bb.emit(
                relax.op.add(bb.emit(relax.op.erf(bb.emit(relax.op.divide(a, c(1.4142135))))), c(1.0))
            )
            gelu = bb.emit(relax.op.multiply(bb.emit(relax.op.multiply(a, e)), c(0.5)))
            m2 = bb.emit(relax.op.matmul(gelu, relax.const(w2)))
            out = bb.emit_output(relax.op.add(x, m2))  # residual on the left
        bb.emit_func_output(out)
    mod = sparsify(lambda _layer, _f: Decision((1, 16)), 16, 32)(bb.get())
    text = str(mod["main"])
    for op in ("R.add", "R.erf", "R.multiply", "R.divide", "R.matmul"):
        assert op not in text, text
    assert text.count("R.call_tir") == 2
