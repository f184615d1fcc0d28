"""Stream-aware sequential repair and held-out ridge damping (`onnxprune.repair_stream`)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import canonical
from onnx import TensorProto, helper, numpy_helper

from models.testmodels import TEST_MODELS
from onnxprune.calibration import CalibrationData, consumers, hessian_rows, output_rows
from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.repair import reanalyze, repair_sequential
from onnxprune.repair_stream import choose_damp, ridge_fit, stream_writes
from onnxprune.rewrite import apply_mask, apply_plan
from onnxprune.shape_inference import infer_shapes
from onnxprune.verify import max_rel_error, random_inputs, run


def _calib(model, n, seed=0) -> CalibrationData:
    samples = [random_inputs(model, seed=seed + i) for i in range(n)]
    return CalibrationData({k: np.concatenate([s[k] for s in samples]) for k in samples[0]})


def test_stream_writes_are_the_residual_adds_writers_with_their_batchnorm_scale():
    model = canonical(TEST_MODELS["residual"]())
    graph = ModelGraph(model)
    writes = stream_writes(graph, consumers(graph))
    adds = {n.name: n for n in graph.nodes if n.op_type == "Add"}
    assert writes and {w.add for w in writes.values()} == set(adds)
    for name, w in writes.items():
        conv = next(n for n in graph.nodes if n.name == name)
        bn = graph.consumers[conv.output[0]][0].node
        assert bn.op_type == "BatchNormalization"
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        expected = graph.const(bn.input[1]) / np.sqrt(graph.const(bn.input[4]) + eps)
        assert np.allclose(w.scale, expected, rtol=1e-6)
        assert w.other in adds[w.add].input and bn.output[0] in adds[w.add].input
    chain = ModelGraph(canonical(TEST_MODELS["chain"]()))
    assert not stream_writes(chain, consumers(chain))


def test_output_rows_line_up_with_hessian_rows():
    """im2col rows at the drawn positions times the weight equal the conv output (onnxruntime) there."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 0, 1, 0], strides=[2, 1])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 9, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    graph = ModelGraph(model)
    (c,) = consumers(graph)
    x = rng.standard_normal((2, 3, 9, 7)).astype(np.float32)
    (y,) = run(model, {"x": x})
    for per_sample in (7, 1000):  # drawn positions, and every position
        picks: list = []
        rows = hessian_rows(x, c, w.shape, per_sample, np.random.default_rng(1), picks)
        assert len(picks) == 2 and (picks[0] is None) == (per_sample >= y[0, 0].size)
        assert np.allclose(rows @ c.weight_matrix(w).T, output_rows(y, c, picks), atol=1e-4)


def test_ridge_fit_with_a_stream_target_is_least_squares_on_the_shifted_target():
    """Near-zero damp: the closed form equals lstsq of (W x + r) on x~ (bias feature included)."""
    rng = np.random.default_rng(0)
    n, f, out = 400, 6, 3
    x = rng.standard_normal((n, f))
    xt = x + 0.3 * rng.standard_normal((n, f))  # the pruned model's input
    r = xt[:, :2] @ rng.standard_normal((2, out)) + 0.1 * rng.standard_normal((n, out))  # the stream's error
    W = rng.standard_normal((out, f))
    xo, xto = np.c_[x, np.ones(n)], np.c_[xt, np.ones(n)]
    H, C, D = xto.T @ xto / n, xo.T @ xto / n, xto.T @ r / n
    keep = np.array([0, 1, 3, 4, f])  # features 2 and 5 removed, the constant kept
    wa = np.c_[W, np.zeros(out)]
    got = ridge_fit(wa, H.copy(), wa @ C, D, keep, 1e-12)
    want = np.linalg.lstsq(xto[:, keep], xo @ wa.T + r, rcond=None)[0].T
    assert np.allclose(got, want, atol=1e-6)
    without = ridge_fit(wa, H.copy(), wa @ C, None, keep, 1e-12)
    assert np.allclose(without, np.linalg.lstsq(xto[:, keep], xo @ wa.T, rcond=None)[0].T, atol=1e-6)


def test_choose_damp_prefers_small_damping_on_clean_data_and_large_on_noise():
    """Removed inputs that copy kept ones: the least-squares fit must move far from the original weights, so
    the held-out error is lowest at the smallest damp. A target that is only noise, fitted on few samples:
    the original weights are the best answer, so a strong pull towards them wins."""
    rng = np.random.default_rng(0)
    f, out = 20, 4
    W = rng.standard_normal((out, f))
    keep = np.arange(f - 3)

    def stats(n, copies, noise):
        x = rng.standard_normal((n, f))
        if copies:
            x[:, f - 3 :] = 2.0 * x[:, :3] + 0.01 * rng.standard_normal((n, 3))
        xt = x.copy()
        xt[:, f - 3 :] = 0.0  # the removed inputs read zero in the pruned model
        r = noise * rng.standard_normal((n, out))  # a stream "error" nothing can predict
        return xt.T @ xt / n, x.T @ xt / n, xt.T @ r / n

    assert choose_damp(W, stats(4000, True, 0.0), stats(4000, True, 0.0), keep) == 0.003
    assert choose_damp(W, stats(25, False, 10.0), stats(25, False, 10.0), keep) >= 0.1


@pytest.mark.parametrize("holdout", [0, 4])
def test_stream_repair_keeps_dead_channel_semantics_and_lowers_the_stream_error(holdout):
    """pruned == masked after the stream-aware repair (onnxruntime), and on the calibration samples the
    residual stream (every Add output) is closer to the original's than with the own-output repair."""
    model = canonical(TEST_MODELS["residual"]())
    calib = _calib(model, 24)
    analysis = analyze(ModelGraph(model))
    labels = PrunePass(PruneConfig(ratio=0.4)).plan(analysis).labels(analysis)
    inputs = random_inputs(model, seed=99)
    adds = [n.output[0] for n in model.graph.node if n.op_type == "Add"]

    def stream_error(m: onnx.ModelProto) -> float:
        probe = onnx.ModelProto()
        probe.CopyFrom(m)
        probe.graph.output.extend(helper.make_empty_tensor_value_info(a) for a in adds)
        ref = onnx.ModelProto()
        ref.CopyFrom(model)
        ref.graph.output.extend(helper.make_empty_tensor_value_info(a) for a in adds)
        total = 0.0
        for i in range(calib.n):  # the model's batch is 1
            got, want = run(probe, calib.sample(i))[1:], run(ref, calib.sample(i))[1:]
            total += sum(float(np.sum((g - w) ** 2) / np.sum(w**2)) for g, w in zip(got, want))
        return total

    errors = {}
    for stream in (False, True):
        repaired, report = repair_sequential(analysis, labels, calib, stream=stream, holdout=holdout)
        assert bool(report.stream_targets) == stream
        assert bool(report.damps) == (holdout > 0)
        work, work_labels = reanalyze(analysis, labels, repaired, False)
        pruned = infer_shapes(apply_plan(work, work_labels))
        assert max_rel_error(run(apply_mask(work, work_labels), inputs), run(pruned, inputs)) <= 1e-5
        errors[stream] = stream_error(apply_mask(work, work_labels))
    assert errors[True] < errors[False], errors


def test_symmetric_solve_matches_numpy_in_place_and_raises_when_singular():
    from onnxprune.repair_stream import symmetric_solve

    rng = np.random.default_rng(3)
    a = rng.standard_normal((80, 60))
    A = a.T @ a / 80 + 0.1 * np.eye(60)
    B = rng.standard_normal((60, 7))
    want = np.linalg.solve(A, B)
    work = A.copy()
    got = symmetric_solve(work, B.copy())
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert not np.array_equal(work, A)  # factored in place: no copy of a (possibly 170 MB) Hessian
    singular = np.zeros((4, 4))
    with pytest.raises(np.linalg.LinAlgError):
        symmetric_solve(singular, np.ones((4, 1)))
