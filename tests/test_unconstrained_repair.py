"""Unconstrained plans with per-group allocation, parameter targets, allowed kept counts and calibrated
least-squares repair (``ls``, ``seq``): exact against the repaired masked original in onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import canonical, unconstrained_exact

from models.testmodels import TEST_MODELS
from onnxprune.channels import analyze
from onnxprune.cli import main
from onnxprune.errors import UsageError
from onnxprune.graph import ModelGraph
from onnxprune.metrics import count_params
from onnxprune.passes.config import PruneConfig
from onnxprune.passes.pruning import PrunePass
from onnxprune.passes.unconstrained import UnconstrainedPass
from onnxprune.upscale.allocate import plan_params, split_group_ids
from onnxprune.upscale.config import UnconstrainedConfig
from onnxprune.verify import random_inputs, run


def test_ls_and_seq_repair_beat_mean_on_a_real_model(fashion):
    """On the trained ResNet (three residual streams, three writers each), held-out logits end closer to
    the original's after least-squares repair than after mean repair, and every export is exact."""
    model, calib, held_out = fashion
    reference = run(model, held_out)[0]
    errors = {}
    for repair in ("mean", "ls", "seq"):
        config = UnconstrainedConfig(ratio=0.3, criterion="l1", drive="reader", repair=repair)
        result = UnconstrainedPass(config, calib=calib).run(model)
        unconstrained_exact(model, result, held_out)
        errors[repair] = float(np.linalg.norm(run(result.model, held_out)[0] - reference))
    assert errors["seq"] < 0.8 * errors["mean"], errors
    assert errors["ls"] < errors["mean"], errors


@pytest.mark.parametrize("drive", ["free", "reader"])
def test_target_params_is_met_like_constrained(fashion, drive):
    """A parameter target: the plan has at most that many (nonzero) parameters, within one step of one
    group of it; with share=1 it is exactly constrained pruning's plan for the same target."""
    model, _, held_out = fashion
    total = count_params(ModelGraph(model))
    target = int(total * 0.7)
    config = UnconstrainedConfig(criterion="l1", drive=drive, group_budget=True, target_params="70%")
    result = UnconstrainedPass(config).run(model)
    summary = result.info["summary"]
    planned = plan_params(result.info["plan"])
    assert 0.97 * target <= planned <= target
    # The export's nonzero count adds only the variances of silenced BatchNorm channels (filled with 1).
    assert planned <= summary["effective_params_after"] <= planned * 1.001
    unconstrained_exact(model, result, held_out)
    same = UnconstrainedPass(UnconstrainedConfig(criterion="l1", share=1.0, target_params=target)).run(model)
    constrained = PrunePass(PruneConfig(criterion="l1", target_params=str(target))).run(model)
    assert same.info["summary"]["params_after"] == count_params(ModelGraph(constrained.model))
    # both modes allocate a parameter target by LAMP when no allocation is named, and record it
    assert same.info["summary"]["config"]["allocation"] == constrained.info["summary"]["config"]["allocation"] == "lamp"


@pytest.mark.parametrize("allocation", ["global", "lamp"])
def test_allocations_give_groups_different_counts(fashion, allocation):
    model, _, held_out = fashion
    config = UnconstrainedConfig(criterion="l1", drive="reader", group_budget=True, allocation=allocation,
                                 target_params="60%")  # fmt: skip
    result = UnconstrainedPass(config).run(model)
    plan = result.info["plan"]
    fractions = {round(float(pc.kept.mean()), 3) for gp in plan.groups for pc in gp.pieces if pc.is_unit}
    assert len(fractions) > 3  # layer-adaptive: not one kept fraction everywhere
    assert result.info["summary"]["effective_params_after"] <= int(count_params(ModelGraph(model)) * 0.6)
    unconstrained_exact(model, result, held_out)


def test_knapsack_allocation_follows_measured_curves(fashion):
    """``allocation="knapsack"``: the groups' kept counts come from the measured cost curves (the greedy
    knapsack of constrained pruning on the same curves gives the same counts), the target is met and the
    export is exact; without calibration inputs it is a usage error."""
    from onnxprune.upscale.allocate import counts_of, knapsack_curves, removal_steps
    from onnxprune.upscale.plan import prepare

    model, calib, held_out = fashion
    config = UnconstrainedConfig(criterion="l2", drive="coupled", repair="seq", allocation="knapsack",
                                 target_params="60%")  # fmt: skip
    result = UnconstrainedPass(config, calib=calib).run(model)
    assert result.info["summary"]["effective_params_after"] <= int(count_params(ModelGraph(model)) * 0.6)
    plan = result.info["plan"]
    kept = {round(float(pc.kept.mean()), 3) for gp in plan.groups for pc in gp.pieces if pc.is_unit}
    assert len(kept) >= 3  # layer-adaptive: groups keep different fractions
    prep = prepare(model, config)
    curves = knapsack_curves(model, prep, config, calib)
    assert {r.group for r in curves} <= {pg.group.id for pg in prep.groups} and len(curves) >= len(prep.groups) - 1
    steps = removal_steps(prep, "knapsack", curves=curves)
    keys = [u.key for u in steps]
    assert keys == sorted(keys)  # cheapest measured error per parameter first
    counts = counts_of(prep, steps[: len(steps) // 2])
    assert len(set(counts.values())) > 2
    unconstrained_exact(model, result, held_out)
    with pytest.raises(UsageError, match="calibration"):
        UnconstrainedPass(UnconstrainedConfig(allocation="knapsack", target_params="60%")).run(model)


@pytest.mark.parametrize("drive", ["free", "writer", "reader"])
@pytest.mark.parametrize("name", ["residual", "concat"])
def test_keep_counts_are_honoured(name, drive):
    """Every unit keeps an allowed count of its group (multiples of 4 here, as ``--round-to 4``)."""
    model = canonical(TEST_MODELS[name]())
    original = analyze(ModelGraph(model))
    grid = {g.id: tuple(sorted({*range(4, g.size + 1, 4), g.size})) for g in original.groups}
    config = UnconstrainedConfig(ratio=0.4, drive=drive, keep_counts=grid, stream_multiple=1)
    result = UnconstrainedPass(config).run(model)
    plan = result.info["plan"]
    ids = {v: k for k, v in split_group_ids(original, plan.analysis).items()}
    checked = 0
    for gp in plan.groups:
        allowed = grid[ids[gp.group.id]]
        for pc in gp.pieces:
            if pc.is_unit:
                assert int(pc.kept.sum()) in allowed, (gp.group.id, int(pc.kept.sum()), allowed)
                checked += 1
    assert checked > 0 and any(int(pc.kept.sum()) < gp.group.size for gp in plan.groups for pc in gp.pieces if pc.is_unit)
    unconstrained_exact(model, result, random_inputs(model, seed=2))


@pytest.mark.parametrize("repair", ["ls", "seq"])
def test_nothing_removed_reproduces_the_original(repair):
    model = canonical(TEST_MODELS["residual"]())
    inputs = random_inputs(model, seed=4)
    calib = {k: np.concatenate([random_inputs(model, seed=i)[k] for i in range(4)]) for k in inputs}
    result = UnconstrainedPass(UnconstrainedConfig(ratio=0.0, repair=repair), calib=calib).run(model)
    assert not result.modified
    full = UnconstrainedPass(UnconstrainedConfig(target_params="100%", repair=repair), calib=calib).run(model)
    assert full.info["summary"]["effective_params_after"] == count_params(ModelGraph(model))
    for a, b in zip(run(model, inputs), run(full.model, inputs)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * float(np.abs(a).max()))


def test_config_and_cli_checks(tmp_model, tmp_path, capsys):
    with pytest.raises(UsageError, match="allocation"):
        UnconstrainedConfig(allocation="sensitivity")
    with pytest.raises(UsageError, match="keep_counts"):
        UnconstrainedConfig(keep_counts={0: (8, 4)})
    with pytest.raises(UsageError, match="calibration"):
        UnconstrainedPass(UnconstrainedConfig(repair="seq"))
    model = canonical(TEST_MODELS["residual"]())
    src = tmp_model(model)
    calib = tmp_path / "calib.npz"
    inputs = random_inputs(model, seed=0)
    np.savez(calib, **{k: np.concatenate([random_inputs(model, seed=i)[k] for i in range(4)]) for k in inputs})
    base = ["prune", str(src), "-o", str(tmp_path / "u.onnx"), "--mode", "unconstrained", "--json"]
    args = ["--target-params", "70%", "--allocation", "lamp", "--drive", "reader", "--group-budget",
            "--repair", "seq", "--calib", str(calib)]  # fmt: skip
    assert main(base + args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["config"]["repair"] == "seq" and summary["config"]["allocation"] == "lamp"
    assert summary["effective_params_after"] <= int(summary["params_before"] * 0.7)
    assert summary["verification"]["passed"]
    assert main(base + ["--allocation", "sensitivity"]) == 2
    assert main(base + ["--target-macs", "50%"]) == 2
    assert main(base + ["--repair", "seq"]) == 2  # needs --calib


def test_readers_score_by_measured_input_energy():
    """With calibration inputs a reader's column norms are weighted by E[x_c^2] of its input, measured in
    onnxruntime (`scores.measured_energy`): checked against the activations themselves."""
    from onnx import helper

    from onnxprune.upscale.plan import prepare
    from onnxprune.upscale.scores import measured_energy

    model = canonical(TEST_MODELS["residual"]())
    inputs = random_inputs(model, seed=0)
    calib = {k: np.concatenate([random_inputs(model, seed=i)[k] for i in range(6)]) for k in inputs}
    prep = prepare(model, UnconstrainedConfig(criterion="l1"), calib)
    pieces = [pc for pg in prep.groups for pc in pg.pieces]
    measured = measured_energy(prep.split.model, pieces, calib)
    assert measured
    probe = onnx.ModelProto()
    probe.CopyFrom(prep.split.model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in measured)
    import onnxruntime as ort

    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    for name, got in measured.items():  # the model's batch is 1: one sample at a time, averaged
        xs = [sess.run([name], {i.name: calib[i.name][j : j + 1] for i in sess.get_inputs()})[0] for j in range(6)]
        want = np.mean([(x.astype(np.float64) ** 2).mean(axis=(0, *range(2, x.ndim))) for x in xs], axis=0)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    plain = prepare(model, UnconstrainedConfig(criterion="l1"))
    readers = [(pg.group.id, pc.id) for pg in prep.groups for pc in pg.units if not pc.has_producer]
    own = {(pg.group.id, k): v for pg in prep.groups for k, v in pg.own.items()}
    base = {(pg.group.id, k): v for pg in plain.groups for k, v in pg.own.items()}
    assert any(not np.allclose(own[r], base[r]) for r in readers)  # the measurement changed a ranking input
