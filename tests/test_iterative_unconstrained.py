"""Gradual unconstrained pruning, `onnxprune.passes.iterative_unconstrained`: steps=1 is `UnconstrainedPass`
exactly, N steps land the one-shot plan's parameters with an exact export that runs in onnxruntime, and every
repair (intermediate and final) fits towards the dense model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import unconstrained_exact

from onnxprune.errors import UsageError
from onnxprune.graph import ModelGraph
from onnxprune.metrics import count_params
from onnxprune.passes.iterative_unconstrained import IterativeUnconstrainedPass, step_keep_counts
from onnxprune.passes.unconstrained import UnconstrainedPass
from onnxprune.upscale.config import UnconstrainedConfig
from onnxprune.verify import run

# The bench's best configuration (`bench/accuracy_real.UNCONSTRAINED_BEST`) at a parameter target.
BEST = {"criterion": "l2", "repair": "seq", "drive": "coupled", "reader_choice": "ls", "stream_repair": True,
        "relu_refit": True, "allocation": "lamp"}


def _summary(result) -> dict:
    record = dict(result.info["summary"])
    record.pop("seconds")
    return record


def test_step_keep_counts_reach_the_final_counts():
    assert step_keep_counts({0: 16, 1: 8, 2: 5}, {0: 9, 1: 8, 2: 2}, 3) == [
        {0: 14, 1: 8, 2: 4}, {0: 11, 1: 8, 2: 3}, {0: 9, 1: 8, 2: 2}]
    assert step_keep_counts({4: 10}, {4: 3}, 1) == [{4: 3}]


def test_steps_must_be_positive():
    with pytest.raises(UsageError):
        IterativeUnconstrainedPass(UnconstrainedConfig(), 0)


@pytest.mark.parametrize("target", ["70%", None])
def test_one_step_is_the_unconstrained_pass_exactly(fashion, target):
    # the bundled CNN (a residual Add and a Concat): equality needs no more (the ResNet: 24 s of the suite)
    from onnxprune.importer import import_model

    model = import_model(Path(__file__).resolve().parents[1] / "models" / "fashion_mnist_cnn.onnx")
    calib = {"image": fashion[1]["image"][:16]}
    config = UnconstrainedConfig(**BEST, target_params=target, ratio=0.3 if target else 0.0)
    ours = IterativeUnconstrainedPass(config, 1, calib=calib).run(model)
    today = UnconstrainedPass(config, calib=calib).run(model)
    assert ours.model.graph.SerializeToString() == today.model.graph.SerializeToString()
    assert _summary(ours) == _summary(today)


def test_ratio_zero_with_steps_returns_the_model(fashion):
    model, calib, _ = fashion
    config = UnconstrainedConfig(**BEST, ratio=0.0)
    result = IterativeUnconstrainedPass(config, 3, calib=calib).run(model)
    assert result.model.graph.SerializeToString() == model.graph.SerializeToString()


@pytest.fixture(scope="module")
def three_steps(fashion):
    """A 3-step run at 60% of parameters kept, recording which model every repair fitted towards."""
    import onnxprune.passes.iterative_unconstrained as gradual
    import onnxprune.passes.unconstrained as one_shot

    model, calib, _ = fashion
    teachers: list[bytes] = []

    def recording(original):
        def repair(teacher, plan, method, data, **kw):
            teachers.append(teacher.graph.SerializeToString())
            return original(teacher, plan, method, data, **kw)
        return repair

    config = UnconstrainedConfig(**BEST, target_params="60%")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gradual, "repair_plan", recording(gradual.repair_plan))
        mp.setattr(one_shot, "repair_plan", recording(one_shot.repair_plan))
        result = IterativeUnconstrainedPass(config, 3, calib=calib).run(model)
    return model, config, result, teachers


def test_every_repair_fits_towards_the_dense_model(three_steps):
    model, _, result, teachers = three_steps
    assert len(teachers) == 3  # steps 1 and 2, then the pass's own final repair
    assert all(t == model.graph.SerializeToString() for t in teachers)
    assert result.info["steps"] == 3


def test_steps_land_the_target_with_an_exact_export(fashion, three_steps):
    model, config, result, _ = three_steps
    _, calib, held_out = fashion
    unconstrained_exact(model, result, held_out)  # the export computes the repaired, masked model
    assert result.info["summary"]["repair"]["relu_refit"]["refitted"] > 0  # the last step's repair is refitted too
    dense = count_params(ModelGraph(model))
    one_shot = UnconstrainedPass(config, calib=calib).run(model)
    kept, kept_one_shot = (r.info["summary"]["effective_params_after"] for r in (result, one_shot))
    # the same final counts: within 1% of the dense model's parameters of what one-shot keeps, near the target
    assert abs(kept - kept_one_shot) <= 0.01 * dense, (kept, kept_one_shot)
    assert kept <= 0.61 * dense, kept / dense
    # the pruned model runs in onnxruntime with the dense model's output shape, and stays close to it
    ref, got = run(model, held_out)[0], run(result.model, held_out)[0]
    assert got.shape == ref.shape
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    assert agree >= 0.8, agree
    # the gradual plan is its own: some unit keeps other channels than one-shot's
    keeps = {k: pc.kept for gp in result.info["plan"].groups for pc in gp.pieces if pc.is_unit
             for k in [tuple(sorted({(m.tensor, m.axis) for m in pc.weights}))]}
    keeps_one = {k: pc.kept for gp in one_shot.info["plan"].groups for pc in gp.pieces if pc.is_unit
                 for k in [tuple(sorted({(m.tensor, m.axis) for m in pc.weights}))]}
    assert keeps.keys() == keeps_one.keys()
    assert any(not np.array_equal(keeps[k], keeps_one[k]) for k in keeps)
