"""onnxruntime's contrib ops (its transformer optimizer's output) through the TVM backend: written in standard ops
before the import (`targets.onnx_prepare.expand_contrib`; TVM's own SkipLayerNormalization converter refuses one
without beta and bias), checked against the contrib node in onnxruntime, then an optimised BERT end to end."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from tvm_helpers import assert_matches, needs_tvm, ort_reference, skip_unless_tools

from onnxprune.targets.onnx_prepare import expand_contrib

X, H = [2, 5, 4], [4]
CASES = {  # case -> (op, inputs, their shapes, attributes, outputs)
    "Gelu": ("Gelu", ["x"], [X], {}, 1),
    "QuickGelu": ("QuickGelu", ["x"], [X], {"alpha": 1.5}, 1),
    "FastGelu, bias": ("FastGelu", ["x", "b"], [X, H], {}, 1),
    "FastGelu": ("FastGelu", ["x"], [X], {}, 1),
    "BiasGelu": ("BiasGelu", ["x", "b"], [X, H], {}, 1),
    "SkipLayerNormalization, all outputs": ("SkipLayerNormalization", ["x", "s", "g", "b", "bb"], [X, X, H, H, H], {}, 4),
    "SkipLayerNormalization, no beta": ("SkipLayerNormalization", ["x", "s", "g", "", "bb"], [X, X, H, H, H], {}, 1),
    "SkipLayerNormalization, epsilon": ("SkipLayerNormalization", ["x", "s", "g"], [X, X, H], {"epsilon": 1e-5}, 1),
    "SkipSimplifiedLayerNormalization": ("SkipSimplifiedLayerNormalization", ["x", "s", "g", "bb"], [X, X, H, H], {}, 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_contrib_op_in_standard_ops_computes_the_same(case):
    """Small inputs (std 1e-3): the normalisations' default epsilon (1e-12) shows."""
    op, inputs, shapes, attributes, outputs = CASES[case]
    values = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in zip(inputs, shapes) if n]
    names = [f"y{k}" for k in range(outputs)]
    node = helper.make_node(op, inputs, names, domain="com.microsoft", **attributes)
    graph = helper.make_graph([node], "contrib", values, [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                                          for n in names])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    before = model.SerializeToString()
    expanded, ops = expand_contrib(model)
    assert model.SerializeToString() == before and ops == [op]
    assert all(n.domain == "" for n in expanded.graph.node) and {o.domain for o in expanded.opset_import} == {""}
    rng = np.random.default_rng(0)
    feeds = {v.name: (rng.standard_normal([d.dim_value for d in v.type.tensor_type.shape.dim]) * 1e-3).astype(np.float32)
             for v in values}  # fmt: skip
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for want, got in zip(run(model), run(expanded), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(np.abs(want).max()))


@needs_tvm
def test_optimized_bert_compiles_and_matches_onnxruntime(tmp_path):
    from onnxprune.targets import compile_bundle, read_manifest, run_bundle

    zoo = pytest.importorskip("models.zoo")
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    skip_unless_tools("g++", package_hint="apt-get install g++")
    try:
        plain = zoo.zoo_model("bert_tiny")
    except zoo.ZooError as exc:
        pytest.skip(str(exc))
    path = tmp_path / "bert_opt.onnx"
    optimizer.optimize_model(str(plain), model_type="bert", num_heads=4, hidden_size=128, opt_level=2).save_model_to_file(
        str(path))
    assert {"SkipLayerNormalization", "BiasGelu"} <= {n.op_type for n in onnx.load(path).graph.node if n.domain}
    bundle = compile_bundle(path, "x86", tmp_path / "bundle")
    assert read_manifest(bundle)["unscheduled_kernels"] == []
    inputs = {"input_ids": np.random.default_rng(0).integers(0, 1000, (1, 16)).astype(np.int64)}
    assert_matches(run_bundle(bundle, inputs), ort_reference(path, inputs))
