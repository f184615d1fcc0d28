"""In-model calibration of latency tables (`onnxprune.latency.calibrate`) and the choice between
micro-model and in-model weights (`onnxprune.latency.weighted.best_weighted_plan`)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.latency import calibrate
from onnxprune.latency.backend import OrtBackend
from onnxprune.latency.grid import keep_counts
from onnxprune.latency.predict import macs_reduction, predicted_ms
from onnxprune.latency.table import GroupCurve, LatencyTable, build_table
from tests.test_latency import FakeBackend, conv_chain


def _silu_model() -> onnx.ModelProto:
    """Conv -> Relu -> Sigmoid/Mul (SiLU) -> Conv, the names onnxruntime's profiler would refer to."""
    w1 = numpy_helper.from_array(np.ones((8, 4, 1, 1), np.float32), "w1")
    w2 = numpy_helper.from_array(np.ones((4, 8, 1, 1), np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="/c1/Conv"),
        helper.make_node("Relu", ["c1"], ["r1"], name="/c1/Relu"),
        helper.make_node("Sigmoid", ["r1"], ["s"], name="/act/Sigmoid"),
        helper.make_node("Mul", ["r1", "s"], ["m"], name="/act/Mul"),
        helper.make_node("Conv", ["m", "w2"], ["y"], name="/c2/Conv"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_profile_kernels_are_attributed_to_the_priced_nodes():
    model = _silu_model()
    priced = {"/c1/Conv": 0.4, "/act/Sigmoid": 0.1, "/act/Mul": 0.3, "/c2/Conv": 0.2}
    profile = {
        "r1_nchwc": 0.2,  # the blocked conv with its fused Relu, named after the Relu's output: walked back
        "/act/Mul/QuickGeluFusion/": 0.08,  # the fused SiLU, named after its Mul: shared with the Sigmoid
        "ReorderOutput": 0.01, "ReorderInput_token_3": 0.03,  # layout conversions: to the memory-bound nodes
        "/c2/Conv": 0.1,
        "Unrelated_fused_thing": 5.0,  # resolves to nothing: ignored
    }
    got = calibrate.attribute(model, profile, priced)
    assert got["/c1/Conv"] == pytest.approx(0.2) and got["/c2/Conv"] == pytest.approx(0.1)
    # SiLU: 0.08 split 1:3 by price, then the 0.04 of reorders split 1:3 as well
    assert got["/act/Sigmoid"] == pytest.approx(0.02 + 0.01)
    assert got["/act/Mul"] == pytest.approx(0.06 + 0.03)
    assert sum(got.values()) == pytest.approx(0.2 + 0.08 + 0.04 + 0.1)


def _table() -> LatencyTable:
    curves = {
        0: GroupCurve(0, (2, 4), (0.3, 0.5), (0.0, 0.0), ("a", "dw"), ((0.1, 0.2), (0.2, 0.3))),
        1: GroupCurve(1, (4, 8), (0.6, 1.0), (0.0, 0.0), ("a",), ((0.1, 0.2),)),
    }
    return LatencyTable("t", 0.5, curves, node_dense_ms={"a": 0.2, "dw": 0.3}, node_ops={"a": "Conv", "dw": "Conv:grouped"},
                        backend_key="k")


def test_calibrated_tables_scale_each_node_net_of_the_call_overhead():
    table = _table()
    factors = calibrate.factors_from(table, {"a": 0.19, "dw": 0.1}, overhead=0.01)
    assert factors == pytest.approx({"a": 1.0, "dw": 0.1 / 0.29})
    cal = calibrate.calibrated(table, factors, overhead=0.01)
    assert cal.node_dense_ms == pytest.approx({"a": 0.19, "dw": 0.1})  # the dense prices are the in-model times
    assert cal.dense_ms == pytest.approx(0.29) and cal.alone is table and cal.in_model == factors
    assert cal.curves[0].node_ms[1] == pytest.approx((0.19 / 0.29 * 0.1, 0.1))  # steps kept, level in-model
    assert cal.curves[0].ms == pytest.approx(tuple(a + b for a, b in zip(*cal.curves[0].node_ms)))
    assert table.node_dense_ms == {"a": 0.2, "dw": 0.3}  # the original is untouched
    # a node the profile does not show takes its op type's factor, else the median of all
    more = LatencyTable("t", 0.6, table.curves, node_dense_ms={"a": 0.2, "dw": 0.3, "dw2": 0.1, "x": 0.1},
                        node_ops={"a": "Conv", "dw": "Conv:grouped", "dw2": "Conv:grouped", "x": "Mul"})
    f = calibrate.factors_from(more, {"a": 0.1, "dw": 0.06})
    assert f["dw2"] == pytest.approx(0.2) and f["x"] == pytest.approx(np.median([0.5, 0.2]))


def test_uncalibratable_tables_are_returned_unchanged(tmp_path, monkeypatch):
    analysis = analyze(ModelGraph(conv_chain()))
    table = build_table(analysis, FakeBackend(), cache_dir=tmp_path)
    assert calibrate.in_model_table(table, analysis, FakeBackend(), cache_dir=tmp_path) is table  # no profiler
    assert calibrate.in_model_table(table, analysis, OrtBackend(), cache_dir=tmp_path) is table  # not its prices
    monkeypatch.setenv(calibrate.ENV_SWITCH, "0")
    assert not calibrate.enabled()


class CountingOrt(OrtBackend):
    profiled = 0

    def profile_nodes(self, model, **kw):
        CountingOrt.profiled += 1
        return super().profile_nodes(model, **kw)


def test_onnxruntime_profile_calibrates_every_priced_node_and_is_cached(tmp_path):
    analysis = analyze(ModelGraph(conv_chain(width=64, hw=32)))
    backend = CountingOrt()
    table = build_table(analysis, backend, cache_dir=tmp_path)
    cal = calibrate.in_model_table(table, analysis, backend, cache_dir=tmp_path)
    assert cal is not table and cal.alone is table and CountingOrt.profiled == 1
    assert set(cal.in_model) == set(table.node_dense_ms)
    assert all(calibrate.MIN_FACTOR <= f <= calibrate.MAX_FACTOR for f in cal.in_model.values())
    assert cal.dense_ms == pytest.approx(sum(cal.node_dense_ms.values()))
    again = calibrate.in_model_table(table, analysis, backend, cache_dir=tmp_path)
    # from the cache, which stores in-model milliseconds to 6 decimals (1 ns: 5e-6 relative on a 4 us node); the
    # first run prices with the rounded values too, so a re-run chooses exactly what it chose
    assert CountingOrt.profiled == 1 and again.node_dense_ms == cal.node_dense_ms and again.curves == cal.curves
    assert keep_counts(cal, analysis) == keep_counts(table, analysis)  # the grid reads the measured steps
    kept = {g.id: g.size // 2 for g in analysis.groups}
    assert 0 < predicted_ms(cal, kept) < cal.dense_ms
    assert macs_reduction(cal, analysis, kept) > 2  # layers between two halved groups keep a quarter


def _three_groups() -> onnx.ModelProto:
    """Conv 3x3 8->64, depthwise 64, Conv 1x1 64->32, Conv 3x3 32->32, pool, Gemm: three prunable groups."""
    from tests.conftest import canonical
    from tests.test_latency import _conv

    nodes, inits = [], []
    for args in (("c1", "x", 8, 64, 3), ("dw", "r_c1", 64, 64, 3, 64), ("c2", "r_dw", 64, 32, 1),
                 ("c3", "r_c2", 32, 32, 3)):
        node, ws = _conv(*args)
        nodes += [node, helper.make_node("Relu", [node.output[0]], [f"r_{args[0]}"])]
        inits += ws
    fc = numpy_helper.from_array(np.random.default_rng(1).standard_normal((32, 10)).astype(np.float32), "fc.w")
    nodes += [helper.make_node("GlobalAveragePool", ["r_c3"], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc.w"], ["out"], name="fc")]
    graph = helper.make_graph(nodes, "three", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 10])], [*inits, fc])
    return canonical(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("dw_factor", [0.05, 30.0])
def test_best_weighted_plan_takes_the_weights_predicted_more_efficient(tmp_path, dw_factor):
    from onnxprune.criteria import Magnitude
    from onnxprune.latency.predict import predicted_speedup
    from onnxprune.latency.weighted import EFFICIENCY_WEIGHT, best_weighted_plan, weighted_plan

    analysis = analyze(ModelGraph(_three_groups()))
    assert len(analysis.groups) >= 3
    table = build_table(analysis, FakeBackend(), cache_dir=tmp_path)
    scores = Magnitude(1).score_all(analysis)
    factors = dict.fromkeys(table.node_dense_ms, 1.0)
    factors["dw"] = dw_factor  # in the model the depthwise conv costs far less, or far more, than alone
    cal = calibrate.calibrated(table, factors)
    kept = [weighted_plan(analysis, scores, t, 0.5).kept(analysis) for t in (table, cal)]
    assert kept[0] != kept[1]  # the two weightings disagree
    speedup = [predicted_speedup(cal, k) for k in kept]
    score = [(s / macs_reduction(cal, analysis, k)) ** EFFICIENCY_WEIGHT * s for s, k in zip(speedup, kept)]
    expected = int(np.argmax(score))
    assert abs(score[0] - score[1]) > 1e-3 * max(score)  # a real choice, not a tie
    assert best_weighted_plan(analysis, scores, cal, 0.5).kept(analysis) == kept[expected]
    assert best_weighted_plan(analysis, scores, table, 0.5).kept(analysis) == kept[0]  # uncalibrated: one candidate
