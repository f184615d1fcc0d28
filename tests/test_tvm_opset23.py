"""Opset-23 exports through the TVM backend (`targets/onnx_prepare.py`).

TVM 0.27's importer converts ``Attention`` as the com.microsoft contrib op (``KeyError: 'num_heads'`` on the
standard one) and has no ``RotaryEmbedding``; its ``ConvertLayout`` dies on a Squeeze with a negative axis. The
backend inlines the ONNX standard's own function bodies for the first two and counts axes from the front:
checked here in onnxruntime against the original nodes, then end to end (a pruned LLaMA and a ViT exported at
opset 23 compile and match onnxruntime).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tvm_helpers import assert_matches, needs_tvm, ort_reference, skip_unless_tools

from onnxprune.targets.onnx_prepare import expand_functions, positive_axes

FLOAT = TensorProto.FLOAT


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _attention(rank: int, attributes: dict, mask: bool = False, past: bool = False) -> onnx.ModelProto:
    """One Attention node: 4 query heads over 2 key/value heads, head size 8 (values 3), 5 queries, 6 keys."""
    hq, hkv = 4, 2
    if rank == 4:
        shapes = [[1, hq, 5, 8], [1, hkv, 6, 8], [1, hkv, 6, 3]]
    else:
        shapes = [[1, 5, hq * 8], [1, 6, hkv * 8], [1, 6, hkv * 3]]
        attributes = {**attributes, "q_num_heads": hq, "kv_num_heads": hkv}
    inputs = [helper.make_tensor_value_info(n, FLOAT, s) for n, s in zip("qkv", shapes)]
    names = ["q", "k", "v", "m" if mask else ""]
    if mask:
        inputs.append(helper.make_tensor_value_info("m", FLOAT, [1, 1, 5, 6 + 2 * past]))
    outputs = ["y"]
    if past:  # onnxruntime wants the present caches whenever past ones are given
        inputs += [helper.make_tensor_value_info("pk", FLOAT, [1, hkv, 2, 8]),
                   helper.make_tensor_value_info("pv", FLOAT, [1, hkv, 2, 3])]  # fmt: skip
        names += ["pk", "pv"]
        outputs += ["present_k", "present_v"]
    node = helper.make_node("Attention", names, outputs, **attributes)
    graph = helper.make_graph([node], "attention", inputs, [helper.make_tensor_value_info(o, FLOAT, None) for o in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def _rotary(rank: int, partial: bool = False, positions_input: bool = False) -> onnx.ModelProto:
    """3 heads of size 4 (8 with `partial`: only the first 4 features rotate) over 5 positions, from constant
    position ids or a graph input."""
    size = 8 if partial else 4
    shape = [1, 3, 5, size] if rank == 4 else [1, 5, 3 * size]
    angles = np.arange(7)[:, None] * np.array([1.0, 0.1])[None]
    inits = [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
             numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]  # fmt: skip
    inputs = [helper.make_tensor_value_info("x", FLOAT, shape)]
    if positions_input:
        inputs.append(helper.make_tensor_value_info("pos", TensorProto.INT64, [1, 5]))
    else:
        inits.append(numpy_helper.from_array(np.arange(5, dtype=np.int64)[None] + 1, "pos"))
    attributes = {"num_heads": 3} if rank == 3 else {}
    if partial:
        attributes["rotary_embedding_dim"] = 4
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "pos"], ["y"], **attributes)
    graph = helper.make_graph([node], "rotary", inputs, [helper.make_tensor_value_info("y", FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


CASES = {
    "4-D, scale": _attention(4, {"scale": 0.7}),
    "4-D, causal": _attention(4, {"is_causal": 1}),
    "4-D, softcap and mask": _attention(4, {"softcap": 2.0, "scale": 0.3}, mask=True),
    "3-D, mask": _attention(3, {"scale": 0.5}, mask=True),
    "3-D, causal with caches": _attention(3, {"is_causal": 1}, past=True),
    "rotary 4-D": _rotary(4),
    "rotary 4-D, partial, positions input": _rotary(4, partial=True, positions_input=True),
    "rotary 3-D": _rotary(3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_function_bodies_compute_what_the_fused_node_does(case):
    model = CASES[case]
    before = model.SerializeToString()
    expanded, ops = expand_functions(model, convertible={"MatMul", "Softmax"})
    assert model.SerializeToString() == before  # the input is not modified
    assert ops == [model.graph.node[0].op_type]
    assert not {n.op_type for n in expanded.graph.node} & {"Attention", "RotaryEmbedding"}
    assert {o.domain for o in expanded.opset_import} == {""} and not expanded.functions
    if case.startswith("rotary 4-D"):  # the direct rotate-half form, not the body's Split (unscheduled in TVM)
        assert "Split" not in {n.op_type for n in expanded.graph.node}
    onnx.checker.check_model(expanded)
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input}  # fmt: skip
    if "pos" in feeds:
        feeds["pos"] = np.array([[3, 0, 6, 2, 2]], np.int64)
    for want, got in zip(_run(model, feeds), _run(expanded, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_ops_the_importer_converts_stay():
    model = CASES["rotary 4-D"]
    same, ops = expand_functions(model, convertible={"RotaryEmbedding"})
    assert same is model and ops == []
    _, ops = expand_functions(CASES["4-D, scale"], convertible={"Attention"})
    assert ops == ["Attention"]  # TVM's "Attention" converter is the com.microsoft operator: expanded anyway


def _plain_attention(attributes: dict, mask: np.ndarray | None, k_transposed: bool = False) -> onnx.ModelProto:
    """4 heads of size 8 over 6 keys, 5 queries; the mask a constant; K made by a Transpose of ``[1, 6, 4, 8]``."""
    inputs = [helper.make_tensor_value_info("q", FLOAT, [1, 4, 5, 8]), helper.make_tensor_value_info("v", FLOAT, [1, 4, 6, 8])]
    nodes, inits = [], []
    if k_transposed:
        inputs.append(helper.make_tensor_value_info("k4", FLOAT, [1, 6, 4, 8]))
        nodes.append(helper.make_node("Transpose", ["k4"], ["k"], perm=[0, 2, 1, 3]))
    else:
        inputs.append(helper.make_tensor_value_info("k", FLOAT, [1, 4, 6, 8]))
    names = ["q", "k", "v"]
    if mask is not None:
        inits.append(numpy_helper.from_array(mask, "m"))
        names.append("m")
    nodes.append(helper.make_node("Attention", names, ["y"], name="att", **attributes))
    graph = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info("y", FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


_MASK = np.random.default_rng(1).standard_normal((1, 1, 5, 6)).astype(np.float32)
_BOOL = np.random.default_rng(2).random((5, 6)) > 0.3
_BOOL[:, 0] = True
_DEAD_ROW = _MASK.copy()
_DEAD_ROW[..., 2, :] = -np.inf
DIRECT = {  # case -> (model, direct form expected)
    "unmasked": (_plain_attention({}, None), True),
    "scale, float mask": (_plain_attention({"scale": 0.3}, _MASK), True),
    "causal": (_plain_attention({"is_causal": 1}, None), True),
    "causal and boolean mask, K transposed": (_plain_attention({"is_causal": 1}, _BOOL, k_transposed=True), True),
    "a fully masked row": (_plain_attention({}, _DEAD_ROW), False),
}


@pytest.mark.parametrize("case", sorted(DIRECT))
def test_plain_attention_becomes_the_five_ops_of_the_fused_kernel(case):
    """The common 4-D case inlines as Transpose / MatMul / Mul / Add / Softmax / MatMul (what `tvm_attention` fuses
    into one kernel); a constant mask with a fully masked row keeps the standard's body (zeros there, not NaN)."""
    model, direct = DIRECT[case]
    expanded, ops = expand_functions(model, convertible={"MatMul"})
    assert ops == ["Attention"]
    kinds = [n.op_type for n in expanded.graph.node]
    if direct:
        biased = case != "unmasked"
        expected = ["Transpose", "MatMul", "Mul", *(["Add"] if biased else []), "Softmax", "MatMul"]
        assert kinds[-len(expected):] == expected and kinds.count("Transpose") == 1 + ("K transposed" in case)
        if "K transposed" in case:  # one transpose of k4 straight to K^T: [0, 2, 1, 3] then [0, 1, 3, 2]
            kt = next(n for n in expanded.graph.node if n.name == "att/kt")
            assert list(kt.input) == ["k4"] and list(kt.attribute[0].ints) == [0, 2, 3, 1]
    else:
        assert "Where" in kinds
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input}  # fmt: skip
    want, got = _run(model, feeds)[0], _run(expanded, feeds)[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", [11, 13])
def test_negative_squeeze_axes_are_counted_from_the_front(opset):
    inits, nodes = [], []
    if opset >= 13:
        inits = [numpy_helper.from_array(np.array([-2], np.int64), "sq"), numpy_helper.from_array(np.array([-1], np.int64), "un")]
        nodes = [helper.make_node("Squeeze", ["x", "sq"], ["s"]), helper.make_node("Unsqueeze", ["s", "un"], ["y"])]
    else:
        nodes = [helper.make_node("Squeeze", ["x"], ["s"], axes=[-2]), helper.make_node("Unsqueeze", ["s"], ["y"], axes=[-1])]
    graph = helper.make_graph(nodes, "axes", [helper.make_tensor_value_info("x", FLOAT, [3, 4, 1, 5])],
                              [helper.make_tensor_value_info("y", FLOAT, None)], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    before = model.SerializeToString()
    fixed = positive_axes(model)
    assert model.SerializeToString() == before
    values = {t.name: numpy_helper.to_array(t) for t in fixed.graph.initializer}
    axes = [list(values[n.input[1]]) if len(n.input) > 1 else list(n.attribute[0].ints) for n in fixed.graph.node]
    assert axes == [[2], [3]]
    x = np.random.default_rng(0).standard_normal((3, 4, 1, 5)).astype(np.float32)
    np.testing.assert_array_equal(_run(fixed, {"x": x})[0], _run(model, {"x": x})[0])
    assert positive_axes(fixed) is fixed


@pytest.fixture(scope="module")
def zoo():
    return pytest.importorskip("models.zoo")


def _zoo_path(zoo, name: str):
    try:
        return zoo.zoo_model(name)
    except zoo.ZooError as exc:
        pytest.skip(str(exc))


@needs_tvm
@pytest.mark.parametrize("name", ["llama_tiny_opset23", "llama_tiny_opset23_dynseq"])
def test_pruned_llama_at_opset_23_compiles_and_matches_onnxruntime(zoo, tmp_path, name):
    """Attention (4-D, its KV heads pruned), RMSNormalization (its hidden size pruned), int64 token input; the
    dynamic-length export also RotaryEmbedding (no TVM converter: the standard's body), compiled at length 16."""
    from onnxprune.importer import import_model
    from onnxprune.passes.pruning import PruneConfig, PrunePass
    from onnxprune.targets import compile_bundle, read_manifest, run_bundle

    skip_unless_tools("g++", package_hint="apt-get install g++")
    model = import_model(_zoo_path(zoo, name))
    pruned = PrunePass(PruneConfig(ratio=0.5, round_to=1)).run(model).model
    fused = {"Attention", "RMSNormalization"} | ({"RotaryEmbedding"} if "dynseq" in name else set())
    assert fused <= {n.op_type for n in pruned.graph.node}
    path = tmp_path / "llama.onnx"
    onnx.save(pruned, path)
    bundle = compile_bundle(path, "x86", tmp_path / "bundle", shapes={"input_ids": [1, 16]})
    assert read_manifest(bundle)["unscheduled_kernels"] == []
    inputs = {"input_ids": np.random.default_rng(0).integers(0, 1000, (1, 16)).astype(np.int64)}
    assert_matches(run_bundle(bundle, inputs), ort_reference(path, inputs))


@needs_tvm
def test_vit_at_opset_23_compiles_and_matches_onnxruntime(zoo, tmp_path):
    """torchvision's ViT through the torch.export-based exporter: Attention ops, a Squeeze(-2) in the attention
    input, Gelu epilogues. Its classifier is initialised to zeros (every output 0): random weights instead."""
    from onnxprune.targets import compile_bundle, run_bundle

    skip_unless_tools("g++", package_hint="apt-get install g++")
    model = onnx.load(_zoo_path(zoo, "vit_tiny_16_opset23"))
    rng = np.random.default_rng(0)
    for t in model.graph.initializer:
        value = numpy_helper.to_array(t)
        if value.size > 1000 and not value.any():
            t.CopyFrom(numpy_helper.from_array((rng.standard_normal(value.shape) * 0.05).astype(value.dtype), t.name))
    path = tmp_path / "vit.onnx"
    onnx.save(model, path)
    bundle = compile_bundle(path, "x86", tmp_path / "bundle")
    inputs = {"input": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)}
    reference = ort_reference(path, inputs)
    assert np.abs(reference[0]).max() > 0.1
    assert_matches(run_bundle(bundle, inputs), reference)


@needs_tvm
def test_bert_at_opset_23_runs_the_fused_attention_kernel(zoo):
    """BERT's Attention (a constant mask once the input shape is fixed) takes the direct form, which
    `tvm_attention.fuse_attention` turns into one kernel per layer, as for the opset-17 export."""
    from tvm import relax

    from onnxprune.targets import bundle as B
    from onnxprune.targets import tvm_backend as tb
    from onnxprune.targets.tvm_attention import fuse_attention

    model = onnx.load(_zoo_path(zoo, "bert_tiny_opset23"))
    mod = relax.transform.FoldConstant()(tb.import_onnx(model, [B.TensorSpec("input_ids", (1, 16), "int64")]))
    text = str(fuse_attention(16)(mod)["main"])
    assert text.count("R.call_tir(attention") == 2 and "R.nn.softmax" not in text
