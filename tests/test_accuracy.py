"""Criteria, calibration statistics, repair and allocation targets (issue 4)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT, canonical

from models.testmodels import TEST_MODELS
from onnxprune.allocation import plan_for_target, plan_from_units, predicted, removal_order
from onnxprune.calibration import CalibrationData, collect_stats, consumers
from onnxprune.channels import analyze
from onnxprune.cli import main
from onnxprune.criteria import CRITERIA, get_criterion
from onnxprune.errors import UsageError
from onnxprune.graph import ModelGraph
from onnxprune.importer import import_model
from onnxprune.metrics import count_macs, count_params
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.plan import PruningPlan
from onnxprune.repair import reanalyze, repair_sequential, repair_weights
from onnxprune.rewrite import apply_mask, apply_plan
from onnxprune.shape_inference import infer_shapes
from onnxprune.verify import max_rel_error, random_inputs, run

FMNIST = ROOT / "models" / "fashion_mnist_cnn.onnx"
SMALL = ("chain", "residual", "concat", "depthwise", "gemm_head")


def _calib(model, n=16, seed=0) -> CalibrationData:
    samples = [random_inputs(model, seed=seed + i) for i in range(n)]
    return CalibrationData({k: np.concatenate([s[k] for s in samples]) for k in samples[0]})


@pytest.mark.parametrize("name", SMALL)
def test_every_criterion_scores_every_group(name):
    model = canonical(TEST_MODELS[name]())
    analysis = analyze(ModelGraph(model))
    stats = collect_stats(model, _calib(model, 4))
    for crit in sorted(CRITERIA):
        c = get_criterion(crit, 0, stats if crit in ("activation", "apoz", "obs") else None)
        for g in analysis.groups:
            s = c.score(g, analysis)
            assert s.shape == (g.size,), crit
            assert np.all(np.isfinite(s)), (crit, g.id)


def test_data_criteria_need_calibration():
    with pytest.raises(UsageError, match="calibration"):
        get_criterion("activation")
    with pytest.raises(UsageError, match="calibration"):
        PrunePass(PruneConfig(criterion="apoz")).run(canonical(TEST_MODELS["chain"]()))
    with pytest.raises(UsageError, match="calibration"):
        PrunePass(PruneConfig(repair="ls")).run(canonical(TEST_MODELS["chain"]()))
    p = PrunePass(PruneConfig(criterion="obs"))
    p.run(canonical(TEST_MODELS["chain"]()))
    assert p.notices and "data-free" in p.notices[0]


def test_lamp_and_bn_and_fpgm_rank_sensibly():
    model = canonical(TEST_MODELS["chain"]())
    analysis = analyze(ModelGraph(model))
    g = analysis.groups[0]
    lamp = get_criterion("lamp").score(g, analysis)
    assert np.isclose(lamp.max(), 1.0) and np.all(lamp > 0)
    l2 = get_criterion("l2").score(g, analysis)
    assert np.array_equal(np.argsort(lamp), np.argsort(l2))  # LAMP is monotone in the magnitude


def test_hessian_matches_im2col_definition():
    """H from streamed im2col equals X^T X built by hand from the conv's unfolded input (stride 1, pad 1)."""
    model = canonical(TEST_MODELS["chain"]())
    graph = ModelGraph(model)
    data = _calib(model, 2)
    convs = [c for c in consumers(graph) if c.kind == "conv"]
    stats = collect_stats(model, data, convs[:1], max_rows=10**9)
    c = convs[0]
    x = data.arrays[c.x]
    w = graph.const(c.weight)
    kh, kw = w.shape[2:]
    rows = []
    pads = [a for a in c.node.attribute if a.name == "pads"]
    p = next(iter(pads[0].ints)) if pads else 0
    for i in range(len(x)):
        xp = np.pad(x[i], ((0, 0), (p, p), (p, p)))
        for r in range(xp.shape[1] - kh + 1):
            for s in range(xp.shape[2] - kw + 1):
                rows.append(np.append(xp[:, r : r + kh, s : s + kw].reshape(-1), 1.0))
    rows = np.array(rows, dtype=np.float64)
    # rows are float32 (products accumulated in float64): float32 rounding tolerance
    np.testing.assert_allclose(stats.stats[c.name].H, rows.T @ rows / len(rows), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("repair", ["bias", "ls"])
@pytest.mark.parametrize("name", ["chain", "residual", "gemm_head"])
def test_repair_at_ratio_zero_is_a_noop(name, repair):
    model = canonical(TEST_MODELS[name]())
    calib = _calib(model, 4)
    result = PrunePass(PruneConfig(ratio=0.0, repair=repair, criterion="obs"), calib=calib).run(model)
    assert result.modified is False
    inputs = random_inputs(model)
    assert max_rel_error(run(model, inputs), run(result.model, inputs)) == 0.0
    analysis = analyze(ModelGraph(model))
    stats = collect_stats(model, calib)
    repaired, report = repair_weights(analysis, np.zeros(0, dtype=np.int64), repair, stats)
    assert repaired is model and not report.repaired


@pytest.mark.parametrize("repair", ["bias", "ls"])
@pytest.mark.parametrize("name", ["chain", "residual", "concat", "gemm_head"])
def test_repaired_pruned_equals_repaired_masked(name, repair):
    """Repair changes weights, never the dead-channel semantics of the removal that follows."""
    model = canonical(TEST_MODELS[name]())
    calib = _calib(model, 4)
    analysis = analyze(ModelGraph(model))
    stats = collect_stats(model, calib)
    labels = PrunePass(PruneConfig(ratio=0.4)).plan(analysis).labels(analysis)
    assert len(labels)
    repaired, report = repair_weights(analysis, labels, repair, stats)
    if repair == "ls":
        assert report.repaired
    work, work_labels = reanalyze(analysis, labels, repaired, False)
    pruned = infer_shapes(apply_plan(work, work_labels))
    masked = apply_mask(work, work_labels)
    inputs = random_inputs(model, seed=3)
    assert max_rel_error(run(masked, inputs), run(pruned, inputs)) <= 1e-5


@pytest.mark.parametrize("name", ["chain", "residual", "concat", "gemm_head"])
def test_sequential_repair_keeps_dead_channel_semantics_and_is_a_noop_at_zero(name):
    """seq: pruned == masked after repair; nothing removed -> the very same model, nothing run."""
    model = canonical(TEST_MODELS[name]())
    calib = _calib(model, 6)
    analysis = analyze(ModelGraph(model))
    same, report = repair_sequential(analysis, np.zeros(0, dtype=np.int64), calib)
    assert same is model and not report.repaired
    result = PrunePass(PruneConfig(ratio=0.0, repair="seq"), calib=calib).run(model)
    inputs = random_inputs(model, seed=3)
    assert result.modified is False and max_rel_error(run(model, inputs), run(result.model, inputs)) == 0.0
    labels = PrunePass(PruneConfig(ratio=0.4)).plan(analysis).labels(analysis)
    repaired, report = repair_sequential(analysis, labels, calib)
    assert report.repaired
    work, work_labels = reanalyze(analysis, labels, repaired, False)
    pruned = infer_shapes(apply_plan(work, work_labels))
    assert max_rel_error(run(apply_mask(work, work_labels), inputs), run(pruned, inputs)) <= 1e-5


def test_sequential_repair_leaves_unaffected_consumers_alone():
    """Only consumers downstream of a removal are refitted; the ridge pulls towards the original weights,
    so a consumer whose input is unchanged and loses nothing would be kept exactly."""
    model = canonical(TEST_MODELS["chain"]())
    calib = _calib(model, 6)
    analysis = analyze(ModelGraph(model))
    last = max(analysis.groups, key=lambda g: g.id)
    labels = PruningPlan({last.id: np.array([0, 1])}).labels(analysis)
    repaired, report = repair_sequential(analysis, labels, calib)
    graph = ModelGraph(model)
    changed = {t.name for t in repaired.graph.initializer
               if graph.const(t.name) is not None and not np.array_equal(graph.const(t.name), _array(t))}
    upstream = [c for c in consumers(graph) if c.name not in report.repaired]
    assert report.repaired and upstream
    assert not changed & {c.weight for c in upstream}


def test_sensitivity_with_sequential_repair_is_below_no_repair():
    from onnxprune.sensitivity import sensitivity

    model = canonical(TEST_MODELS["residual"]())
    calib = _calib(model, 8)
    stats = collect_stats(model, calib)
    none = sensitivity(model, calib, [0.5], "l2", "none", stats)
    seq = sensitivity(model, calib, [0.5], "l2", "seq", stats)
    errs = [(a.errors[0], b.errors[0]) for a, b in zip(none, seq) if np.isfinite(a.errors[0])]
    assert errs and all(np.isfinite(b) for _, b in errs)
    assert sum(b for _, b in errs) < sum(a for a, _ in errs), errs


def _array(t):
    from onnx import numpy_helper

    return numpy_helper.to_array(t)


def test_ls_repair_is_exact_when_removed_inputs_are_linear_in_kept_ones():
    """A Gemm whose removed inputs are copies of kept ones is reconstructed exactly by LS repair."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 4)).astype(np.float32)
    w1 = np.concatenate([w1, w1[:, :2] * 2], axis=1)  # hidden 4, 5 = 2 * hidden 0, 1 (linear)
    w2 = rng.standard_normal((6, 3)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = canonical(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    onnx.checker.check_model(model)
    analysis = analyze(ModelGraph(model))
    (group,) = analysis.groups
    labels = group.labels[[4, 5]]
    data = CalibrationData({"x": rng.standard_normal((64, 8)).astype(np.float32)})
    stats = collect_stats(model, data)
    inputs = {"x": rng.standard_normal((1, 8)).astype(np.float32)}
    plain = infer_shapes(apply_plan(analysis, labels))
    repaired, _ = repair_weights(analysis, labels, "ls", stats, damp=1e-9)
    work, wl = reanalyze(analysis, labels, repaired, False)
    fixed = infer_shapes(apply_plan(work, wl))
    ref = run(model, inputs)
    assert max_rel_error(ref, run(plain, inputs)) > 0.05
    assert max_rel_error(ref, run(fixed, inputs)) < 1e-3


def test_bias_repair_restores_mean_through_batchnorm_relu():
    """Data-free: the removed channel's BN/Relu expectation moves into the consumer (BN mean or bias)."""
    model = canonical(TEST_MODELS["chain"]())
    analysis = analyze(ModelGraph(model))
    labels = PrunePass(PruneConfig(ratio=0.25)).plan(analysis).labels(analysis)
    repaired, report = repair_weights(analysis, labels, "bias")
    assert report.repaired
    before = {t.name: t.raw_data for t in model.graph.initializer}
    changed = [t.name for t in repaired.graph.initializer if t.name in before and before[t.name] != t.raw_data]
    assert changed  # a bias or a running mean moved


def _fmnist():
    from models.fashion_mnist import is_available, load_fashion_mnist

    if not is_available():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return load_fashion_mnist("train")[0], load_fashion_mnist("test")[0]


def _output_error(model, pruned, x):
    from onnxprune.verify import session

    ref = session(model).run(None, {"image": x})[0]
    got = session(pruned).run(None, {"image": x})[0]
    return float(np.linalg.norm(ref - got) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def fmnist_setup():
    train, test = _fmnist()
    model = import_model(str(FMNIST))
    calib = CalibrationData({"image": train[np.random.default_rng(0).choice(len(train), 128, replace=False)]})
    return model, calib, test[:300]


def test_repair_reduces_output_error_on_fashion_mnist(fmnist_setup):
    model, calib, test = fmnist_setup
    errors = {}
    for repair, ratio in (("none", 0.3), ("ls", 0.3), ("none", 0.1), ("bias", 0.1)):
        cfg = PruneConfig(ratio=ratio, criterion="l1", repair=repair)
        pruned = PrunePass(cfg, calib=calib).run(model).model
        errors[repair, ratio] = _output_error(model, pruned, test)
    assert errors["ls", 0.3] < 0.5 * errors["none", 0.3], errors
    assert errors["bias", 0.1] < errors["none", 0.1], errors


def test_sequential_repair_beats_ls_on_fashion_mnist(fmnist_setup):
    """Fitting each layer on the pruned model's own activations leaves less output error than fitting it on
    the original's (errors no longer compound through depth)."""
    model, calib, test = fmnist_setup
    stats = collect_stats(model, calib)
    err = {}
    for repair in ("ls", "seq"):
        cfg = PruneConfig(ratio=0.4, criterion="l1", repair=repair)
        err[repair] = _output_error(model, PrunePass(cfg, calib=calib, stats=stats).run(model).model, test)
    assert err["seq"] < err["ls"], err


def test_obs_beats_l1_without_repair_on_fashion_mnist(fmnist_setup):
    model, calib, test = fmnist_setup
    err = {}
    for crit in ("l1", "obs"):
        pruned = PrunePass(PruneConfig(ratio=0.2, criterion=crit), calib=calib).run(model).model
        err[crit] = _output_error(model, pruned, test)
    assert err["obs"] < err["l1"], err


@pytest.mark.parametrize("metric", ["params", "macs"])
@pytest.mark.parametrize("allocation", ["uniform", "global", "lamp"])
def test_targets_met_within_one_unit(metric, allocation):
    model = canonical(TEST_MODELS["residual"]())
    graph = ModelGraph(model)
    analysis = analyze(graph)
    scores = get_criterion("l2").score_all(analysis)
    units = removal_order(analysis, scores, allocation)
    total = count_params(graph) if metric == "params" else count_macs(graph)
    target = int(total * 0.7)
    plan = plan_for_target(units, analysis, target, metric)
    pruned = ModelGraph(infer_shapes(apply_plan(analysis, plan.labels(analysis))))
    actual = count_params(pruned) if metric == "params" else count_macs(pruned)
    assert actual == predicted(analysis, plan)[0 if metric == "params" else 1]
    assert actual <= target
    k = plan.channels_removed  # units are single channels here
    one_less = predicted(analysis, plan_from_units(units[: k - 1]))[0 if metric == "params" else 1]
    assert one_less > target


def test_target_percentage_through_the_pass():
    model = canonical(TEST_MODELS["concat"]())
    result = PrunePass(PruneConfig(target_params="80%", allocation="lamp")).run(model)
    s = result.info["summary"]
    assert s["params_after"] <= 0.8 * s["params_before"]
    assert s["params_after"] > 0.6 * s["params_before"]
    with pytest.raises(UsageError):
        PrunePass(PruneConfig(target_params="150%")).run(model)
    with pytest.raises(UsageError):
        PruneConfig(target_params="50%", target_macs="50%")


def test_cli_calibrated_prune_and_sensitivity(tmp_path, tmp_model, capsys):
    model = canonical(TEST_MODELS["chain"]())
    path = tmp_model(model)
    calib = _calib(model, 6)
    npz = tmp_path / "calib.npz"
    np.savez(npz, **calib.arrays)
    out = tmp_path / "out.onnx"
    rc = main(["prune", str(path), "-o", str(out), "--criterion", "activation", "--repair", "ls", "--calib",
               str(npz), "--calib-samples", "4", "--target-params", "75%", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["params_after"] <= 0.75 * summary["params_before"]
    assert summary["repair"]["repaired"] >= 1
    rc = main(["prune", str(path), "-o", str(out), "--repair", "seq", "--calib", str(npz), "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["repair"]["repaired"] >= 1
    rc = main(["prune", str(path), "-o", str(out), "--repair", "seq"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--calib" in err
    rc = main(["prune", str(path), "-o", str(out), "--criterion", "apoz"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--calib" in err
    bad = tmp_path / "bad.npz"
    np.savez(bad, wrong=np.zeros((2, 3)))
    rc = main(["prune", str(path), "-o", str(out), "--repair", "ls", "--calib", str(bad)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and str(bad) in err  # a data problem, not usage: exit 1
    png = tmp_path / "sens.png"
    rc = main(["sensitivity", str(path), "--calib", str(npz), "--ratios", "0.25,0.5", "--plot", str(png), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert all(len(g["errors"]) == 2 for g in result["groups"])
    assert any(g["errors"][1] is not None and g["errors"][1] > 0 for g in result["groups"])


def test_apoz_reads_the_activation_map_not_pooled_features():
    """The Fashion-MNIST head reads Flatten(GlobalAveragePool(relu)): APoZ comes from the relu map."""
    from onnxprune.calibration import activation_source

    model = import_model(str(FMNIST))
    graph = ModelGraph(model)
    fc = next(c for c in consumers(graph) if c.kind == "gemm")
    src = activation_source(graph, fc.x, fc.x_axis)
    assert graph.producer[src].op_type == "Relu"
    stats = collect_stats(model, CalibrationData({"image": np.random.default_rng(0).random((4, 1, 28, 28), np.float32)}),
                          [fc], hessian=False)
    assert stats.stats[fc.name].apoz.max() > 0.05  # pooled features are never exactly zero; the map is


def test_obs_saliency_follows_the_repair():
    """Without repair the OBS/OBD cost of a channel is its whole (uncentred) contribution; with bias repair
    the centred one (never larger); with ls the optimal-update cost (never larger than the bias one)."""
    model = canonical(TEST_MODELS["chain"]())
    analysis = analyze(ModelGraph(model))
    stats = collect_stats(model, _calib(model, 8))
    g = analysis.groups[0]
    s = {r: get_criterion("obs", 0, stats, r).score(g, analysis) for r in ("none", "bias", "ls")}
    assert np.all(s["bias"] <= s["none"] + 1e-9)
    assert np.all(s["ls"] <= s["bias"] * (1 + 1e-3) + 1e-9)


def test_lamp_allocation_budgets_do_not_depend_on_the_criterion():
    model = import_model(str(FMNIST))
    counts = {}
    for crit in ("l1", "random", "bn"):
        res = PrunePass(PruneConfig(criterion=crit, allocation="lamp", target_params="70%")).run(model)
        counts[crit] = res.info["summary"]["plan"]
    assert counts["l1"] == counts["random"] == counts["bn"]


def test_the_default_allocation_is_lamp_for_a_parameter_target_and_uniform_otherwise(tmp_path, capsys):
    """A parameter target lets groups lose different fractions: LAMP by default (its plan exactly the explicit
    one's); a ratio is every group's fraction, and so is a MAC target (LAMP's magnitude budgets lose accuracy
    there); --global and a latency target rank globally. The record names the allocation that ran."""
    assert PruneConfig(ratio=0.3).allocation_name == "uniform"
    assert PruneConfig(target_params="70%").allocation_name == "lamp"
    assert PruneConfig(target_macs="70%").allocation_name == "uniform"
    assert PruneConfig(target_params="70%", global_ranking=True).allocation_name == "global"
    assert PruneConfig(target_latency="0.6x").allocation_name == "global"
    assert PruneConfig(target_params="70%", allocation="uniform").allocation_name == "uniform"
    model = import_model(str(FMNIST))
    for target, named in (({"target_params": "70%"}, "lamp"), ({"target_macs": "60%"}, "uniform")):
        default = PrunePass(PruneConfig(**target)).run(model).info["summary"]
        lamp = PrunePass(PruneConfig(allocation="lamp", **target)).run(model).info["summary"]
        uniform = PrunePass(PruneConfig(allocation="uniform", **target)).run(model).info["summary"]
        assert lamp["plan"] != uniform["plan"]
        assert default["plan"] == (lamp if named == "lamp" else uniform)["plan"]
        assert default["config"]["allocation"] == named and uniform["config"]["allocation"] == "uniform"
    assert main(["prune", str(FMNIST), "--target-params", "70%", "--round-to", "1", "--no-verify", "--json",
                 "-o", str(tmp_path / "p.onnx")]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["allocation"] == "lamp"
    assert main(["prune", str(FMNIST), "--ratio", "0.3", "--round-to", "1", "--no-verify", "--json",
                 "-o", str(tmp_path / "r.onnx")]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["allocation"] == "uniform"


def test_sensitivity_allocation_meets_target_and_needs_data():
    model = canonical(TEST_MODELS["residual"]())
    with pytest.raises(UsageError, match="calibration"):
        PrunePass(PruneConfig(allocation="sensitivity", target_params="80%")).run(model)
    res = PrunePass(PruneConfig(allocation="sensitivity", target_params="80%"), calib=_calib(model, 4)).run(model)
    s = res.info["summary"]
    assert s["params_after"] <= 0.8 * s["params_before"] and s["channels_removed"] > 0
