"""The fused attention kernel (targets/tvm_attention.py): the TIR kernel against numpy (batch, broadcast and
per-row masks, a sequence that is not a multiple of the row tile), the Relax pattern it replaces, and a
BERT-style attention block (ONNX, as Hugging Face exports it) against onnxruntime through a bundle.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.tvm_helpers import needs_tvm

_NEG = -3.4028234663852886e38  # the mask value Hugging Face exports (float32 min)


@needs_tvm
@pytest.mark.parametrize(("batch", "seq", "heads", "dim", "mask_shape"),
                         [(1, 128, 12, 32, (1, 1, 1, 128)), (2, 48, 3, 16, (2, 1, 48, 48)),
                          (1, 32, 2, 64, (1, 1, 32, 32))])  # fmt: skip
def test_attention_kernel_matches_numpy(batch, seq, heads, dim, mask_shape):
    import tvm

    from onnxprune.targets import tvm_backend as tb
    from onnxprune.targets import tvm_fastmath
    from onnxprune.targets.table import get_target
    from onnxprune.targets.tvm_attention import attention_kernel, reference

    tvm_fastmath.install()
    rng = np.random.default_rng(seq)
    scale = 1 / np.sqrt(dim)
    mask = np.where(rng.random(mask_shape) < 0.2, _NEG, 0).astype(np.float32)
    mask[..., 0] = 0  # at least one key per row
    f = attention_kernel(batch, seq, heads, dim, scale, mask_shape, 16)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                      target=tb.build_target(get_target("x86")))  # fmt: skip
    q, k, v = (rng.standard_normal((batch, seq, heads * dim)).astype(np.float32) * 2 for _ in range(3))
    out = tvm.runtime.tensor(np.zeros((batch, seq, heads * dim), np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in (q, k, v, mask)], out)
    ref = reference(q, k, v, mask, heads, scale)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _attention_model(path, seq: int, heads: int, dim: int, seed: int = 0):
    """Q/K/V projections, per-head reshape/transpose, scaled scores + additive mask from an int mask input,
    softmax, @ V, transpose back: the MiniLM export's op sequence."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    width = heads * dim
    inits = [numpy_helper.from_array((rng.standard_normal((width, width)) * 0.2).astype(np.float32), n)
             for n in ("wq", "wk", "wv")]  # fmt: skip
    inits += [
        numpy_helper.from_array(np.array([1, seq, heads, dim], np.int64), "split"),
        numpy_helper.from_array(np.array([1, seq, width], np.int64), "merge"),
        numpy_helper.from_array(np.array(1 / np.sqrt(dim), np.float32), "scale"),
        numpy_helper.from_array(np.array(_NEG, np.float32), "neg"),
        numpy_helper.from_array(np.array(0, np.float32), "zero"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
    ]
    nodes = []
    for n in ("q", "k", "v"):
        nodes.append(helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}p"]))
        nodes.append(helper.make_node("Reshape", [f"{n}p", "split"], [f"{n}4"]))
    nodes += [
        helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qt", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["ss"]),
        helper.make_node("Cast", ["mask"], ["mb"], to=TensorProto.BOOL),
        helper.make_node("Unsqueeze", ["mb", "axes"], ["m4"]),
        helper.make_node("Where", ["m4", "zero", "neg"], ["madd"]),
        helper.make_node("Add", ["ss", "madd"], ["sm"]),
        helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "vt"], ["o"]),
        helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ot", "merge"], ["y"]),
    ]
    g = helper.make_graph(nodes, "attention",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, width]),
                           helper.make_tensor_value_info("mask", TensorProto.INT64, [1, seq])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, width])], inits)  # fmt: skip
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@needs_tvm
def test_attention_block_is_one_kernel_and_matches_onnxruntime(tmp_path):
    import onnx
    from tvm import relax

    from onnxprune.targets import bundle as B
    from onnxprune.targets import compile_bundle, run_bundle
    from onnxprune.targets import tvm_backend as tb
    from onnxprune.targets.tvm_attention import fuse_attention
    from tests.tvm_helpers import assert_matches, ort_reference

    seq, heads, dim = 32, 4, 16
    path = _attention_model(tmp_path / "att.onnx", seq, heads, dim)
    specs = [B.TensorSpec("x", (1, seq, heads * dim), "float32"), B.TensorSpec("mask", (1, seq), "int64")]
    mod = relax.transform.FoldConstant()(tb.import_onnx(onnx.load(path), specs))
    text = str(fuse_attention(16)(mod)["main"])
    for op in ("R.nn.softmax", "R.permute_dims", "R.multiply"):
        assert op not in text, text
    assert text.count("R.call_tir(attention") == 1
    bundle = compile_bundle(path, "x86", tmp_path / "b")
    rng = np.random.default_rng(1)
    mask = np.ones((1, seq), np.int64)
    mask[0, seq - 5 :] = 0
    feed = {"x": rng.standard_normal((1, seq, heads * dim)).astype(np.float32), "mask": mask}
    assert_matches(run_bundle(bundle, feed), ort_reference(path, feed))
