"""The ReLU-aware refit after an unconstrained plan's sequential repair (`UnconstrainedConfig.relu_refit`,
``--relu-refit`` in ``--mode unconstrained``): it changes values only, within what the plan keeps, so the
export stays exact; the post-ReLU error it minimises falls; the option is checked as in constrained mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import canonical, unconstrained_exact

from models.testmodels import TEST_MODELS
from onnxprune.cli import main
from onnxprune.errors import UsageError
from onnxprune.passes.unconstrained import UnconstrainedPass
from onnxprune.report import settings_rows
from onnxprune.upscale.config import UnconstrainedConfig
from onnxprune.upscale.plan import unit_key
from onnxprune.verify import random_inputs, run

# the best documented configuration (README, unconstrained mode) with the refit off
BEST = {"criterion": "l2", "drive": "coupled", "reader_choice": "ls", "repair": "seq", "stream_repair": True}


def _keeps(result) -> dict:
    return {unit_key(pc): pc.kept.tolist() for gp in result.info["plan"].groups for pc in gp.pieces if pc.is_unit}


def test_refit_changes_values_only_and_the_export_stays_exact(fashion):
    """Trained Fashion-MNIST ResNet, 40% of the channels: with and without the refit the plan is the same
    (kept sets, stored parameters), the refitted export computes its oracle, and the refit lowers the
    post-ReLU error of the layers it refits (the report says how much)."""
    model, calib, held_out = fashion
    results = {}
    for relu in (False, True):
        result = UnconstrainedPass(UnconstrainedConfig(ratio=0.4, relu_refit=relu, **BEST), calib=calib).run(model)
        unconstrained_exact(model, result, held_out)
        results[relu] = result
    plain, refit = (results[r].info["summary"] for r in (False, True))
    assert plain["repair"]["repaired"] > 0 and "relu_refit" not in plain["repair"]
    report = refit["repair"]["relu_refit"]
    assert report["refitted"] > 0 and report["error_after"] < report["error_before"]
    assert refit["config"]["relu_refit"] is True
    assert _keeps(results[False]) == _keeps(results[True])
    assert plain["params_after"] == refit["params_after"]
    assert not np.allclose(run(results[False].model, held_out)[0], run(results[True].model, held_out)[0])


def test_nothing_removed_reproduces_the_original():
    model = canonical(TEST_MODELS["residual"]())
    inputs = random_inputs(model, seed=4)
    calib = {k: np.concatenate([random_inputs(model, seed=i)[k] for i in range(4)]) for k in inputs}
    full = UnconstrainedPass(UnconstrainedConfig(target_params="100%", relu_refit=True, **BEST), calib=calib).run(model)
    for a, b in zip(run(model, inputs), run(full.model, inputs)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * float(np.abs(a).max()))


def test_config_and_cli_checks(tmp_model, tmp_path, capsys):
    with pytest.raises(UsageError, match="repair='seq'"):
        UnconstrainedConfig(repair="ls", relu_refit=True)
    model = canonical(TEST_MODELS["residual"]())
    src = tmp_model(model)
    calib = tmp_path / "calib.npz"
    inputs = random_inputs(model, seed=0)
    np.savez(calib, **{k: np.concatenate([random_inputs(model, seed=i)[k] for i in range(8)]) for k in inputs})
    base = ["prune", str(src), "-o", str(tmp_path / "u.onnx"), "--mode", "unconstrained", "--target-params", "70%",
            "--calib", str(calib), "--json"]  # fmt: skip
    assert main([*base, "--repair", "seq", "--stream-repair", "--relu-refit"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["config"]["relu_refit"] is True and record["verification"]["passed"]
    assert record["repair"]["relu_refit"]["refitted"] >= 0
    assert main([*base, "--repair", "seq"]) == 0
    assert json.loads(capsys.readouterr().out)["repair"]["repaired"] > 0  # the repair's record in this mode too
    rows = dict(settings_rows(record))  # what the text report prints of the first record
    assert rows["repair"].startswith("seq + stream targets:") and "; relu refit: " in rows["repair"]
    assert rows["allocation"].startswith("lamp; per layer")
    assert main([*base, "--repair", "ls", "--relu-refit"]) == 2
    assert "--relu-refit refines the sequential repair: it needs --repair seq" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["residual", "concat", "depthwise", "split", "attention", "chain", "gemm_head",
                                  "mixed_ops", "grouped", "norms"])
def test_export_is_exact_on_every_topology(name):
    """Whatever the architecture (residual streams, Concat / Split, depthwise and grouped convs, attention, norms):
    with the refit the export computes its oracle, the refitted layers' post-ReLU error fell, and a model whose
    layers feed no ReLU is left as the sequential repair wrote it."""
    model = canonical(TEST_MODELS[name]())
    inputs = random_inputs(model, seed=1)
    calib = {k: np.concatenate([random_inputs(model, seed=10 + i)[k] for i in range(6)]) for k in inputs}
    config = UnconstrainedConfig(ratio=0.5, relu_refit=True, **{**BEST, "reader_choice": "score"})
    result = UnconstrainedPass(config, calib=calib).run(model)
    unconstrained_exact(model, result, inputs)
    report = result.info["summary"]["repair"]["relu_refit"]
    if report["refitted"]:
        assert report["error_after"] < report["error_before"]
    else:
        plain = UnconstrainedPass(UnconstrainedConfig(ratio=0.5, **{**BEST, "reader_choice": "score"}), calib=calib)
        unchanged = plain.run(model).model
        for a, b in zip(run(unchanged, inputs), run(result.model, inputs)):
            np.testing.assert_array_equal(a, b)
