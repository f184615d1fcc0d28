"""Iterative (gradual) selection, `onnxprune.passes.iterative`: steps=1 is today's pruning exactly, N steps land the
same parameter count, every repair fits towards the dense model, and pruned channels map back onto dense ones."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune.calibration import CalibrationData
from onnxprune.certificate import certify
from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.passes.config import PruneConfig
from onnxprune.passes.iterative import IterativePrunePass, IterativeSelectPass, dense_channels_of, step_counts
from onnxprune.passes.pruning import PrunePass
from onnxprune.passes.remove import PruneSummary, RemovedChannels
from onnxprune.passes.select import ChannelSelection, SelectChannelsPass
from onnxprune.passmanager import PassManager
from onnxprune.rewrite import apply_plan
from onnxprune.shape_inference import infer_shapes
from onnxprune.verify import run

CONFIG = PruneConfig(criterion="obs", repair="seq", target_params="70%", round_to=1, allocation="uniform")


@pytest.fixture(scope="module")
def small(fashion):
    model, calib, test = fashion
    return model, CalibrationData({"image": calib["image"][:16]}), test


def _summary(result) -> dict:
    record = result.get(PruneSummary).as_dict()
    record.pop("seconds")
    return record


def test_step_counts_reach_the_final_counts():
    assert step_counts({0: 7, 1: 0, 2: 3}, 3) == [{0: 2, 1: 0, 2: 1}, {0: 5, 1: 0, 2: 2}, {0: 7, 1: 0, 2: 3}]
    assert step_counts({4: 5}, 1) == [{4: 5}]


def test_steps_must_be_positive():
    from onnxprune.errors import UsageError

    with pytest.raises(UsageError):
        IterativeSelectPass(CONFIG, 0)


@pytest.mark.parametrize("target", ["70%", "100%"])
def test_one_step_is_prune_pass_exactly(small, target):
    model, calib, _ = small
    config = PruneConfig(criterion="obs", repair="seq", target_params=target, round_to=1, allocation="uniform")
    assert isinstance(IterativePrunePass(config, 1, calib=calib).passes[0], SelectChannelsPass)
    ours = IterativePrunePass(config, 1, calib=calib).run(model)
    today = PrunePass(config, calib=calib).run(model)
    assert ours.model.graph.SerializeToString() == today.model.graph.SerializeToString()
    assert _summary(ours) == _summary(today)
    # the selection pass alone, with one step, answers what SelectChannelsPass answers (also at ratio 0)
    assert IterativeSelectPass(config, 1, calib=calib).name == SelectChannelsPass(config, calib=calib).name


@pytest.fixture(scope="module")
def three_steps(small):
    """A 3-step run, recording every sequential repair's teacher (the intermediate ones and the pipeline's)."""
    import onnxprune.passes.iterative as iterative
    import onnxprune.passes.repair as repair_pass

    model, calib, _ = small
    seen = []

    def recording(original):
        def repair(analysis, labels, data, **kw):
            seen.append((analysis.graph.model, len(labels)))
            return original(analysis, labels, data, **kw)
        return repair

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(iterative, "repair_sequential", recording(iterative.repair_sequential))
        mp.setattr(repair_pass, "repair_sequential", recording(repair_pass.repair_sequential))
        result = IterativePrunePass(CONFIG, 3, calib=calib).run(model)
    return result, seen


def test_three_steps_land_the_same_params_and_run(small, three_steps):
    model, calib, test = small
    three, _ = three_steps
    one_shot = PassManager([SelectChannelsPass(CONFIG, calib=calib)]).run(model).get(ChannelSelection)
    s3 = three.get(PruneSummary)
    assert s3.plan == {str(g): len(idx) for g, idx in one_shot.plan.removed.items() if len(idx)}
    assert s3.params_after < s3.params_before  # equal to steps=1's: the next test
    assert any("3 steps" in n for n in s3.notices)
    onnx.checker.check_model(three.model, full_check=True)
    dense_out = run(model, test)[0]
    got = run(three.model, test)[0]
    assert got.shape == dense_out.shape and np.isfinite(got).all()
    # the pruned model computes exactly the (repaired) dense model with the removed channels silenced
    removed = three.get(RemovedChannels)
    cert = certify(model, three.model, removed.analysis, removed.labels, inputs=[{"image": test["image"][:4]}])
    assert cert.passed, cert.as_dict()
    # and it still classifies: top-1 agreement with the dense model on held-out images
    assert (got.argmax(1) == dense_out.argmax(1)).mean() >= 0.8


def test_three_steps_params_equal_one_step(small, three_steps):
    model, calib, _ = small
    one = IterativePrunePass(CONFIG, 1, calib=calib).run(model)
    assert three_steps[0].get(PruneSummary).params_after == one.get(PruneSummary).params_after


def test_every_repair_fits_towards_the_dense_model(small, three_steps):
    model, _, _ = small
    result, seen = three_steps
    assert len(seen) == 3  # two intermediate repairs and the pipeline's final one
    assert all(teacher is model for teacher, _ in seen)  # the dense teacher, never a pruned step's model
    counts = [n for _, n in seen]
    assert counts[0] < counts[1] < counts[2] == len(result.get(ChannelSelection).labels)


def test_pruned_channels_map_onto_dense_channels(small):
    model, _, _ = small
    dense = analyze(ModelGraph(model))
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    checked = 0
    for g in dense.groups:
        if g.size < 4:
            continue
        cut = g.labels[[0, g.size // 2]]  # one group at a time: the member's other axes keep their sizes
        pruned = infer_shapes(apply_plan(dense, cut))
        where = dense_channels_of(dense, cut, analyze(ModelGraph(pruned)))
        there, dense_of = where[g.id]
        assert sorted(dense_of) == sorted(set(range(g.size)) - {0, g.size // 2})
        pruned_values = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
        group = analyze(ModelGraph(pruned)).groups[there]
        for m in g.param_members:
            mp = next(x for x in group.members if (x.tensor, x.axis) == (m.tensor, m.axis))
            for j, k in enumerate(dense_of):
                a = np.take(values[m.tensor], m.positions[m.channel_of == k], axis=m.axis)
                b = np.take(pruned_values[m.tensor], mp.positions[mp.channel_of == j], axis=m.axis)
                np.testing.assert_array_equal(a, b)
            checked += 1
    assert checked > 0


def test_cli_steps(tmp_path, capsys):
    import json
    from pathlib import Path

    from onnxprune.cli import main

    model = Path(__file__).resolve().parents[1] / "models" / "fashion_mnist_resnet.onnx"
    if not model.is_file():
        pytest.skip("models/fashion_mnist_resnet.onnx not built")
    records = {}
    for steps in ("1", "3"):
        out = tmp_path / f"steps{steps}.onnx"
        assert main(["prune", str(model), "--criterion", "l2", "--round-to", "1", "--target-params", "70%",
                     "--steps", steps, "--no-verify", "-o", str(out), "--json"]) == 0
        records[steps] = json.loads(capsys.readouterr().out)
    assert records["3"]["params_after"] == records["1"]["params_after"] < records["1"]["params_before"]
    assert records["3"]["plan"] == records["1"]["plan"]
    assert any("3 steps" in n for n in records["3"]["notices"])
    assert main(["prune", str(model), "--mode", "unconstrained", "--steps", "2", "-o", str(tmp_path / "u.onnx")]) == 2
    assert "--steps applies to constrained pruning only" in capsys.readouterr().err


def test_reallocated_steps_meet_the_target(small):
    from onnxprune.errors import UsageError

    model, calib, test = small
    config = PruneConfig(criterion="l2", repair="bias", target_params="70%", round_to=1, allocation="knapsack")
    with pytest.raises(UsageError):
        IterativeSelectPass(PruneConfig(criterion="l2", ratio=0.3), 2, calib=calib, reallocate=True)
    few = CalibrationData({"image": calib.arrays["image"][:8]})  # the knapsack's curves are measured twice
    result = IterativePrunePass(config, 2, calib=few, reallocate=True).run(model)
    two = result.get(PruneSummary)
    target = int(two.params_before * 0.7)
    assert two.params_after <= target
    # met as one step meets it (`allocation.plan_for_target`): within one channel of the widest group
    assert target - two.params_after <= max(int(g.params_per_channel.max()) for g in
                                            analyze(ModelGraph(model)).groups)
    assert any("re-allocated" in n for n in two.notices)
    removed = result.get(RemovedChannels)
    cert = certify(model, result.model, removed.analysis, removed.labels, inputs=[{"image": test["image"][:4]}])
    assert cert.passed, cert.as_dict()


def test_plan_of_the_gradual_pass_is_the_plan_its_run_carries_out(small, three_steps):
    model, calib, _ = small
    result, _ = three_steps
    analysis = analyze(ModelGraph(model))
    planned = IterativePrunePass(CONFIG, 3, calib=calib).plan(analysis)
    ran = result.get(ChannelSelection).plan
    assert {g: list(v) for g, v in planned.removed.items()} == {g: list(v) for g, v in ran.removed.items()}
