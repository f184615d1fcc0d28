"""Stream-aware sequential repair of unconstrained plans (`upscale.stream_repair`): row alignment of the
stream correction, writer detection, equality with plain sequential repair where there is no stream, and
exact exports that bring a real model's outputs closer to the original's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import canonical, unconstrained_exact
from onnx import helper, numpy_helper

from models.testmodels import TEST_MODELS
from onnxprune.calibration import CalibrationData, consumers, hessian_rows
from onnxprune.graph import ModelGraph
from onnxprune.passes.unconstrained import UnconstrainedPass
from onnxprune.repair import repair_sequential
from onnxprune.upscale.config import UnconstrainedConfig
from onnxprune.upscale.plan import build_plan, unit_key
from onnxprune.upscale.repair import plan_removals
from onnxprune.upscale.stream_repair import (
    ColumnChoice,
    choose_columns,
    output_rows,
    repair_stream,
    stream_writer,
)
from onnxprune.verify import random_inputs, run


def _conv_model(stride: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((5, 3, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1], strides=[stride, stride])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 9, 9])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [w])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("stride", [1, 2])
def test_output_rows_are_the_positions_hessian_rows_draws(stride):
    """im2col rows times the weight equal the conv output at the rows `output_rows` draws with the same
    generator: the stream correction lines up with the input rows it is regressed on."""
    model = _conv_model(stride)
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 9)).astype(np.float32)
    y = run(model, {"x": x})[0]
    graph = ModelGraph(model)
    (c,) = consumers(graph)
    w = graph.initializer_value("w")
    for per_sample in (7, 10_000):  # drawn positions, then every position
        rows = hessian_rows(x, c, w.shape, per_sample, np.random.default_rng(3))
        out = output_rows(y, per_sample, np.random.default_rng(3))
        assert len(rows) == len(out) == 2 * min(per_sample, y.shape[2] * y.shape[3])
        np.testing.assert_allclose(rows @ c.weight_matrix(w).T, out, rtol=1e-4, atol=1e-4)


def _objective(Ht: np.ndarray, rhs: np.ndarray, lam: float, kept: np.ndarray) -> float:
    """The fit's minimum over the kept features, up to a constant: -tr(rhs_K Hd_KK^-1 rhs_K^T)."""
    k = np.flatnonzero(kept)
    Hk = Ht[np.ix_(k, k)] + lam * np.eye(len(k))
    return -float(np.trace(rhs[:, k] @ np.linalg.solve(Hk, rhs[:, k].T)))


def test_choose_columns_is_near_the_best_subset_and_respects_counts():
    """Greedy OBS removal: within 2% of the best subset (exhaustive), better than every other subset but a
    few; two choices on one weight keep their own counts; a cut position outside every choice stays cut."""
    from itertools import combinations

    rng = np.random.default_rng(0)
    r, positions = 2, 7  # 7 input positions of 2 features each, + the constant
    x = rng.standard_normal((400, positions * r)) @ rng.standard_normal((positions * r, positions * r))
    x = np.concatenate([x, np.ones((400, 1))], axis=1)
    Ht = x.T @ x / len(x)
    rhs = rng.standard_normal((3, positions * r + 1)) @ Ht
    fp = np.repeat(np.arange(positions), r)
    first = ColumnChoice("w", 1, np.arange(5), np.arange(5), keep=3)
    kept = choose_columns(Ht, rhs, 0.01, fp, [first], cut=np.array([6]))
    assert kept[-1] and not kept[12:14].any() and kept[10:12].all()  # constant, cut 6, untouched 5
    assert first.kept is not None and first.kept.sum() == 3
    np.testing.assert_array_equal(kept[:10], np.repeat(first.kept, r))
    objectives = []
    for subset in combinations(range(5), 3):
        mask = np.zeros(len(Ht), bool)
        mask[-1] = mask[10:12] = True
        for p in subset:
            mask[p * r : p * r + r] = True
        objectives.append(_objective(Ht, rhs, 0.01, mask))
    ours, best = _objective(Ht, rhs, 0.01, kept), min(objectives)
    assert ours <= best + 0.02 * abs(best)
    assert sum(o < ours - 1e-9 for o in objectives) <= 2
    a = ColumnChoice("w", 1, np.arange(3), np.arange(3), keep=1)
    b = ColumnChoice("w", 1, np.arange(3, 7), np.array([5, 6, 7, 8]), keep=3)
    choose_columns(Ht, rhs, 0.01, fp, [a, b], cut=None)
    assert a.kept.sum() == 1 and b.kept.sum() == 3


def test_writers_are_the_convs_feeding_a_residual_add(fashion):
    model, _, _ = fashion
    graph = ModelGraph(model)
    found = {c.name: stream_writer(graph, c) for c in consumers(graph)}
    writers = {name for name, w in found.items() if w is not None}
    assert writers  # the trained ResNet has residual blocks
    for c in consumers(graph):
        if c.name not in writers:
            continue
        skip, scale = found[c.name]
        bn = graph.consumers[c.node.output[0]][0].node
        assert bn.op_type == "BatchNormalization"
        add = graph.consumers[bn.output[0]][0].node
        assert add.op_type == "Add" and skip in add.input and skip != bn.output[0]
        gamma, var = graph.const(bn.input[1]), graph.const(bn.input[4])
        np.testing.assert_allclose(scale, gamma / np.sqrt(var + 1e-5), rtol=1e-4)


def _chain_calib(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inputs = random_inputs(model, seed=0)
    return {k: np.concatenate([random_inputs(model, seed=i)[k] for i in range(6)]) for k in inputs}


def test_without_a_stream_it_is_sequential_repair():
    """A chain has no residual Add: the stream-aware repair computes what `repair_sequential` does."""
    model = canonical(TEST_MODELS["chain"]())
    calib = _chain_calib(model)
    plan = build_plan(model, UnconstrainedConfig(ratio=0.4, criterion="l2"))
    removals = plan_removals(model, plan)
    assert not any(stream_writer(removals.graph, c) for c in consumers(removals.graph))
    data = CalibrationData(calib)
    ours, _ = repair_stream(removals, data)
    theirs, _ = repair_sequential(removals, np.zeros(1, dtype=np.int64), data)
    a = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in theirs.graph.initializer}
    assert a.keys() == b.keys()
    # the sequential repair accumulates [W b] E[x x~^T] in float32 where the stream-aware one forms it from
    # E[x x~^T]: the same solution, rounded differently (2 of 320 weights 2.3e-5 apart)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(b[name]).max())))


def test_stream_repair_is_exact_and_closer_to_the_original(fashion):
    """On the trained ResNet at 40% of channels removed (coupled drive), the stream-aware repair's export
    is exact, and the repaired streams end closer to the original's on the calibration images than with
    writers fitted to their own outputs only."""
    model, calib, held_out = fashion
    adds = [n.output[0] for n in model.graph.node if n.op_type == "Add"]
    streams = {}
    for stream in (False, True):
        config = UnconstrainedConfig(ratio=0.4, criterion="l2", drive="coupled", repair="seq", stream_repair=stream)
        result = UnconstrainedPass(config, calib=calib).run(model)
        unconstrained_exact(model, result, held_out)
        from onnxprune.upscale.oracle import mask_model

        masked = mask_model(model, result.info["plan"])
        streams[stream] = _tensors(masked, adds, calib)
    reference = _tensors(model, adds, calib)
    err = {s: sum(float(np.sum((v[t] - reference[t]) ** 2)) for t in adds) for s, v in streams.items()}
    assert err[True] < 0.95 * err[False], err


def _tensors(model: onnx.ModelProto, names: list[str], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from onnxprune.layer_inputs import truncated

    return dict(zip(names, run(truncated(model, names), inputs)))


def test_readers_choosing_during_the_repair_keep_their_counts_and_stay_exact(fashion):
    """``reader_choice="seq"``: readers of multi-writer streams re-choose their columns during the repair;
    every unit keeps as many channels as with the ``ls`` choice (equal parameters), some readers change
    their choice, and the export is exact."""
    model, calib, held_out = fashion
    plans = {}
    for choice in ("ls", "seq"):
        config = UnconstrainedConfig(ratio=0.4, criterion="l2", drive="coupled", repair="seq", reader_choice=choice)
        result = UnconstrainedPass(config, calib=calib).run(model)
        unconstrained_exact(model, result, held_out)
        plans[choice] = result
    keeps = {c: {unit_key(pc): pc.kept.copy() for gp in r.info["plan"].groups for pc in gp.pieces if pc.is_unit}
             for c, r in plans.items()}  # fmt: skip
    assert keeps["ls"].keys() == keeps["seq"].keys()
    assert all(keeps["ls"][k].sum() == keeps["seq"][k].sum() for k in keeps["ls"])
    assert any(not np.array_equal(keeps["ls"][k], keeps["seq"][k]) for k in keeps["ls"])
    summaries = [r.info["summary"]["effective_params_after"] for r in plans.values()]
    assert summaries[0] == summaries[1]


def test_stream_statistics_are_the_per_sample_float64_sums(fashion):
    """`_stream_stats` multiplies the rows of many samples at once, in float32 (`gram`): it equals the plain
    per-sample float64 sums of E[x~ x~^T], E[x x~^T] and the writers' E[d x~^T] to float32 rounding."""
    from onnxprune.layer_inputs import FrontierRunner
    from onnxprune.upscale.stream_repair import _safe, _stream_stats

    model, calib, _ = fashion
    graph = ModelGraph(model)
    wave = consumers(graph)
    writers = {c.name: w for c in wave if (w := stream_writer(graph, c)) is not None}
    assert writers
    current = onnx.ModelProto()
    current.CopyFrom(model)
    for t in current.graph.initializer:  # a "pruned" model: other weights, the same graph
        if t.dims and len(t.dims) == 4:
            v = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array((v * 0.9).astype(v.dtype), t.name))
    data = CalibrationData(calib)
    assert data.batch == 1  # one sample a run: the reference below slices one at a time
    got = _stream_stats(graph, current, wave, writers, data, 4096, 11, (FrontierRunner(data), FrontierRunner(data)))
    from onnxprune.calibration import rows_per_input
    from onnxprune.layer_inputs import truncated

    names = sorted({c.x for c in wave} | {s for s, _ in writers.values()})
    xo_all = dict(zip(names, run(truncated(model, names), calib)))
    xc_all = dict(zip(names, run(truncated(current, names), calib)))
    for j, c in enumerate(wave):
        shape = c.weight_shape(graph)
        per = rows_per_input(c.feature_count(shape), 4096, data)
        H = C = S = 0.0
        n = 0
        for i in range(data.n):
            ro, rc = (hessian_rows(a[c.x][i : i + 1], c, shape, per, np.random.default_rng([11, i, j]))
                      for a in (xo_all, xc_all))
            ro = np.concatenate([ro, np.ones((len(ro), 1))], axis=1)
            rc = np.concatenate([rc, np.ones((len(rc), 1))], axis=1).astype(np.float64)
            H, C, n = H + rc.T @ rc, C + ro.T @ rc, n + len(rc)
            if c.name in writers:
                skip, scale = writers[c.name]
                d = xo_all[skip][i : i + 1].astype(np.float64) - xc_all[skip][i : i + 1]
                d /= _safe(scale).reshape((1, -1) + (1,) * (d.ndim - 2))
                S = S + output_rows(d, per, np.random.default_rng([11, i, j])).T @ rc
        for ours, ref in zip(got[c.name], (H / n, C / n, None if c.name not in writers else S / n)):
            assert ours.dtype == np.float64
            if ref is None:
                assert not ours.any()  # not a writer: no stream correction
            else:
                np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-5 * float(np.abs(ref).max()))
