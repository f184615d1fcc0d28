"""A last layer holding a large share of the weights is pruned with the others (`LayerRules.dense_last_share`).

PP-OCRv4 rec's 6625-character classifier holds 31% of the prunable weights: kept dense, 50% of the model's
parameters meant 75% of every other layer. Here a small MLP whose classifier holds 76% of the candidate
weights: the classifier becomes a pruned layer, its masks keep the pattern, the model equals the masked
original in onnxruntime bit for bit, and at an equal number of zeroed weights the repaired model's output
error is lower than with the classifier kept dense (the old rule, ``dense_last_share=1``).
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.calibration import CalibrationData
from onnxprune.graph import ModelGraph
from onnxprune.sparsity import LayerRules, SparsityConfig, sparse_layers, sparsify_model
from onnxprune.sparsity.patterns import check_mask, mask_for
from onnxprune.verify import session

SIZES = (32, 64, 64, 64, 512)  # input, three hidden layers, classes: the classifier holds 32768 of 43008 weights


def _mlp(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i, (a, b) in enumerate(pairwise(SIZES)):
        w = (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32)
        bias = (0.1 * rng.normal(size=b)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        y = f"h{i}" if i < len(SIZES) - 2 else "logits"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [y if y == "logits" else f"g{i}"], name=f"fc{i}"))
        if y != "logits":
            nodes.append(helper.make_node("Relu", [f"g{i}"], [y]))
        x = y
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", SIZES[0]])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", SIZES[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _inputs(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).normal(size=(SIZES[0], SIZES[0]))  # correlated features, same for every draw
    return (rng.normal(size=(n, SIZES[0])) @ mix / np.sqrt(SIZES[0])).astype(np.float32)


def test_large_classifier_is_pruned_small_one_stays_dense():
    graph = ModelGraph(_mlp())
    by_name = {layer.name: layer for layer in sparse_layers(graph)}
    assert by_name["fc3"].skip == ""  # 76% of the candidate weights: pruned
    assert by_name["fc0"].skip.startswith("first layer")
    old = {layer.name: layer for layer in sparse_layers(graph, LayerRules(dense_last_share=1.0))}
    assert old["fc3"].skip == "last layer (no pruned layer after it)"
    # the share is what decides: a classifier with 20% or less of the weights stays dense
    share = by_name["fc3"].size / sum(layer.size for layer in by_name.values())
    tight = {layer.name: layer for layer in sparse_layers(graph, LayerRules(dense_last_share=share))}
    assert tight["fc3"].skip == "last layer (no pruned layer after it)"


@pytest.mark.parametrize("pattern", ["unstructured", "group:1x4", "nm:2:4", "block:4x4"])
def test_pruned_classifier_keeps_pattern_and_equals_masked_original(pattern):
    model = _mlp()
    config = SparsityConfig(sparsity=0.5, pattern=pattern)
    out, report = sparsify_model(model, config)
    assert "fc3" in report.layers and report.layers["fc3"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    graph, new = ModelGraph(model), ModelGraph(out)
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    inits = {t.name: t for t in expected.graph.initializer}
    for layer in sparse_layers(graph):
        if layer.skip:
            continue
        m = layer.matrix(graph.initializer_value(layer.weight))
        keep = mask_for(np.abs(m.astype(np.float64)), config.parsed, 0.5)
        assert check_mask(layer.matrix(new.initializer_value(layer.weight)) != 0, config.parsed)
        inits[layer.weight].CopyFrom(numpy_helper.from_array(layer.from_matrix(m * keep), layer.weight))
    feed = {"x": _inputs(16, 5)}
    assert np.array_equal(session(out).run(None, feed)[0], session(expected).run(None, feed)[0])


@pytest.mark.parametrize("repair", ["ls", "seq"])
def test_pruning_the_classifier_lowers_error_at_equal_zeros(repair):
    model = _mlp()
    calib = CalibrationData({"x": _inputs(512, 1)})
    test = {"x": _inputs(256, 2)}
    ref = session(model).run(None, test)[0]
    zeros = 6000  # 14.6% of all candidate weights; 73% of the hidden layers alone
    errors, zeroed = {}, {}
    for name, rules in (("classifier pruned", LayerRules()), ("classifier dense", LayerRules(dense_last_share=1.0))):
        prunable = sum(layer.size for layer in sparse_layers(ModelGraph(model), rules) if not layer.skip)
        config = SparsityConfig(sparsity=zeros / prunable, pattern="group:1x4", repair=repair, rules=rules)
        out, report = sparsify_model(model, config, calib=calib)
        zeroed[name] = report.zeroed
        got = session(out).run(None, test)[0]
        errors[name] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert abs(zeroed["classifier pruned"] - zeroed["classifier dense"]) <= 8  # within two 1x4 tiles
    assert errors["classifier pruned"] < 0.5 * errors["classifier dense"], errors


def test_seq_refits_the_dense_classifier_to_the_sparsified_features():
    """``seq`` refits a classifier kept dense (``dense_last_share=1``) to the sparsified layers' outputs: its
    weights change but gain no zeros, the stem (no pruned layer upstream) stays bit for bit, the zero count
    is the same, and the output error drops against the same run without the refit (``refit_dense=False``)."""
    model = _mlp()
    calib = CalibrationData({"x": _inputs(512, 1)})
    test = {"x": _inputs(256, 2)}
    ref = session(model).run(None, test)[0]
    rules = LayerRules(dense_last_share=1.0)
    graph = ModelGraph(model)
    results = {}
    for refit in (True, False):
        config = SparsityConfig(sparsity=0.6, pattern="group:8x1", repair="seq", rules=rules, refit_dense=refit)
        out, report = sparsify_model(model, config, calib=calib)
        got = session(out).run(None, test)[0]
        results[refit] = (ModelGraph(out), report, float(np.linalg.norm(got - ref) / np.linalg.norm(ref)))
    (new, report, err), (plain, plain_report, plain_err) = results[True], results[False]
    assert report.refitted_dense == ["fc3"] and plain_report.refitted_dense == []
    assert report.zeroed == plain_report.zeroed and "fc3" not in report.layers
    w3, b3 = (graph.initializer_value(n) for n in ("w3", "b3"))
    assert np.count_nonzero(new.initializer_value("w3")) == np.count_nonzero(w3)
    assert not np.allclose(new.initializer_value("w3"), w3) and not np.allclose(new.initializer_value("b3"), b3)
    assert np.array_equal(plain.initializer_value("w3"), w3)
    for name in ("w0", "b0"):
        assert np.array_equal(new.initializer_value(name), graph.initializer_value(name))
    assert err < 0.95 * plain_err, (err, plain_err)  # measured 0.312 vs 0.337
    # `ls` fits every layer on the original inputs: nothing upstream changes what the classifier sees there
    _, ls_report = sparsify_model(model, SparsityConfig(sparsity=0.6, pattern="group:8x1", repair="ls", rules=rules),
                                  calib=calib)
    assert ls_report.refitted_dense == []
