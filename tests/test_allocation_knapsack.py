"""The knapsack allocation (`onnxprune.allocation_knapsack`): hull slopes, order, exact targets, and that it
beats the uniform allocation on a trained model's output error at equal parameters."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ROOT, canonical

from models.testmodels import TEST_MODELS
from onnxprune.allocation import plan_for_target, plan_from_units, predicted
from onnxprune.allocation_knapsack import knapsack_order, lower_hull_slopes
from onnxprune.calibration import CalibrationData
from onnxprune.channels import analyze
from onnxprune.criteria import Magnitude
from onnxprune.errors import UsageError
from onnxprune.graph import ModelGraph
from onnxprune.importer import import_model
from onnxprune.metrics import count_params
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.sensitivity import SensitivityRow, relative_error
from onnxprune.verify import random_inputs, run

FMNIST = ROOT / "models" / "fashion_mnist_cnn.onnx"


def _calib(model, n=8, seed=0) -> CalibrationData:
    samples = [random_inputs(model, seed=seed + i) for i in range(n)]
    return CalibrationData({k: np.concatenate([s[k] for s in samples]) for k in samples[0]})


def test_lower_hull_slopes_skip_points_above_the_hull():
    x = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    y = np.array([0.0, 3.0, 4.0, 5.0, 9.0])  # (1, 3) lies above the chord (0, 0)-(2, 4)
    np.testing.assert_allclose(lower_hull_slopes(x, y), [5 / 3, 5 / 3, 5 / 3, 4.0])
    convex = np.array([0.0, 1.0, 3.0, 6.0, 10.0])
    np.testing.assert_allclose(lower_hull_slopes(x, convex), [1.0, 2.0, 3.0, 4.0])


def _rows(analysis, errors_of):
    ratios = [0.25, 0.5, 0.75]
    rows = [SensitivityRow(g.id, g.size, g.params, "", [errors_of(g.id) * r for r in ratios]) for g in analysis.groups]
    return rows, ratios


def test_knapsack_takes_cheap_error_per_parameter_first_and_keeps_each_group_in_score_order():
    model = canonical(TEST_MODELS["residual"]())
    analysis = analyze(ModelGraph(model))
    scores = Magnitude(1).score_all(analysis)
    cheap = analysis.groups[0].id
    rows, ratios = _rows(analysis, lambda gid: 0.01 if gid == cheap else 1.0)
    units = knapsack_order(analysis, scores, rows, ratios)
    first = [u.group for u in units[: len([u for u in units if u.group == cheap])]]
    assert set(first) == {cheap}  # every unit of the nearly free group comes before any other
    for g in analysis.groups:  # within a group: lowest criterion scores first, at most 75% removed
        mine = [u for u in units if u.group == g.id]
        taken = np.concatenate([u.channels for u in mine]) if mine else np.array([], int)
        np.testing.assert_array_equal(taken, np.argsort(scores[g.id], kind="stable")[: len(taken)])
        assert len(taken) <= int(0.75 * g.size)
    assert [u.key for u in units] == sorted(u.key for u in units)
    again = knapsack_order(analysis, scores, rows, ratios)
    assert [(u.group, tuple(u.channels)) for u in units] == [(u.group, tuple(u.channels)) for u in again]


def test_knapsack_weight_changes_the_order():
    """Equal error curves (error = fraction removed): the first slope is 0.25 / (size x weight per channel),
    so by parameters the group with the most parameters goes first, by channels the widest group."""
    model = canonical(TEST_MODELS["residual"]())
    analysis = analyze(ModelGraph(model))
    scores = Magnitude(1).score_all(analysis)
    rows, ratios = _rows(analysis, lambda gid: 1.0)
    eligible = [g for g in analysis.groups if g.size >= 4]
    most_params = min(eligible, key=lambda g: (-g.params, g.id)).id
    assert knapsack_order(analysis, scores, rows, ratios)[0].group == most_params
    units = knapsack_order(analysis, scores, rows, ratios, weight={g.id: 1.0 for g in analysis.groups})
    assert units[0].group == min(eligible, key=lambda g: (-g.size, g.id)).id


def test_tight_target_meets_the_params_target_with_the_closest_next_unit():
    model = import_model(str(FMNIST))
    analysis = analyze(ModelGraph(model))
    scores = Magnitude(1).score_all(analysis)
    rows, ratios = _rows(analysis, lambda gid: 1.0 + gid)
    units = knapsack_order(analysis, scores, rows, ratios)
    total = count_params(analysis.graph)

    def params(chosen):
        return predicted(analysis, plan_from_units(chosen))[0]

    for pct in (0.9, 0.75, 0.6):
        target = int(total * pct)
        k = next(i for i in range(len(units) + 1) if params(units[:i]) <= target)  # shortest prefix, by scan
        plain = params(units[:k])
        assert predicted(analysis, plan_for_target(units, analysis, target, "params"))[0] == plain
        followers = {}
        for u in units[k - 1 :]:
            followers.setdefault(u.group, u)
        best = max(v for v in (params([*units[: k - 1], u]) for u in followers.values()) if v <= target)
        tight = predicted(analysis, plan_for_target(units, analysis, target, "params", tight=True))[0]
        assert plain <= tight == best <= target


def test_knapsack_allocation_needs_data_and_meets_the_target():
    model = canonical(TEST_MODELS["residual"]())
    with pytest.raises(UsageError, match="calibration"):
        PrunePass(PruneConfig(allocation="knapsack", target_params="80%")).run(model)
    cfg = PruneConfig(criterion="obs", repair="ls", allocation="knapsack", target_params="80%")
    first = PrunePass(cfg, calib=_calib(model)).run(model)
    s = first.info["summary"]
    assert s["params_after"] <= 0.8 * s["params_before"] and s["channels_removed"] > 0
    assert first.info["summary"]["sensitivity"]["groups"]  # the measured curves are reported
    second = PrunePass(cfg, calib=_calib(model)).run(model)
    assert first.info["plan"].removed.keys() == second.info["plan"].removed.keys()
    for gid, idx in first.info["plan"].removed.items():  # deterministic
        np.testing.assert_array_equal(idx, second.info["plan"].removed[gid])
    ratio = PrunePass(PruneConfig(allocation="knapsack", ratio=0.3), calib=_calib(model)).run(model)
    assert ratio.info["summary"]["channels_removed"] > 0


def test_knapsack_beats_uniform_on_a_trained_models_held_out_output_error():
    """Fashion-MNIST CNN (trained), 50% of the parameters removed with obs + ls on 64 training images: the
    knapsack allocation's relative logit error on 200 held-out test images is below the uniform one's."""
    fashion = pytest.importorskip("models.fashion_mnist")
    try:
        train_x, _ = fashion.load_fashion_mnist("train")
        test_x, _ = fashion.load_fashion_mnist("test")
    except fashion.DatasetMissingError as exc:
        pytest.skip(str(exc))
    model = import_model(str(FMNIST))
    name = model.graph.input[0].name
    calib = CalibrationData({name: train_x[::937][:64]})
    held = test_x[::50][:200]
    reference = run(model, {name: held})
    errors = {}
    for allocation in ("uniform", "knapsack"):
        cfg = PruneConfig(criterion="obs", repair="ls", allocation=allocation, target_params="50%")
        res = PrunePass(cfg, calib=calib).run(model)
        s = res.info["summary"]
        assert s["params_after"] <= 0.5 * s["params_before"]
        errors[allocation] = relative_error(reference, run(res.model, {name: held}))
    assert errors["knapsack"] < 0.9 * errors["uniform"], errors


def test_curves_are_measured_on_the_same_number_of_inputs_whatever_the_fixed_batch(monkeypatch):
    """A model exported with a fixed batch B runs B inputs per calibration sample: the curves take `SAMPLES` inputs
    (SAMPLES / B runs), not SAMPLES runs of B (PP-OCRv4's detector at batch 8: > 25 min for its curves)."""
    import onnxprune.allocation_knapsack as knapsack

    seen = []
    monkeypatch.setattr(knapsack, "sensitivity", lambda model, data, *args, **kw: seen.append((data.n, data.batch)) or [])
    for batch in (1, 8):
        model = canonical(TEST_MODELS["residual"]())
        name = model.graph.input[0].name
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[0].dim_value = batch  # the batch an exporter baked in (the model is not run: l1, no repair)
        x = np.random.default_rng(0).standard_normal((256, *[d.dim_value for d in dims[1:]])).astype(np.float32)
        knapsack.measure_curves(model, CalibrationData({name: x}), "l1", "none")
    assert seen == [(knapsack.SAMPLES, 1), (knapsack.SAMPLES // 8, 8)]
