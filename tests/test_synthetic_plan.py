"""Synthetic calibration: the time-budget plan, augmentation, low-resolution generation, data-free accuracy."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.synthetic import (
    SynthesisConfig,
    _augment,
    _resize_matrix,
    _upsample,
    _views,
    bn_loss,
    synthesize,
)
from onnxprune.synthetic_plan import (
    AUTO_SAMPLES,
    BATCH_BYTES,
    DEFAULT_SAMPLES,
    forward_cost,
    plan,
    step_seconds,
)

ROOT = Path(__file__).resolve().parents[1]
FASHION_RESNET = ROOT / "models" / "fashion_mnist_resnet.onnx"


# (dense MACs, layer and other activation elements) per sample of zoo models (`forward_cost` on the path)
R20 = step_seconds(41e6, 0.37e6, 0.30e6)
MID = step_seconds(0.1e9, 2e6, 1e6)
LITE0 = step_seconds(349e6, 13.4e6, 11.1e6)
R50 = step_seconds(4.09e9, 22.3e6, 14.9e6)


def test_plan_fits_the_budget_and_respects_floors():
    cfg = SynthesisConfig(budget=90.0)
    small = plan(cfg, AUTO_SAMPLES, R20, 4, 680_000)  # CIFAR ResNet20: the budget affords the cap, optimised
    assert small.samples == small.optimised == DEFAULT_SAMPLES and small.steps == cfg.steps
    assert small.seconds <= cfg.budget and small.batch == cfg.batch
    mid = plan(cfg, AUTO_SAMPLES, MID, 4)  # fewer optimised samples at full steps, views fill up
    assert cfg.min_samples <= mid.optimised < DEFAULT_SAMPLES and 0.8 * cfg.steps <= mid.steps <= cfg.steps
    assert mid.samples == DEFAULT_SAMPLES and mid.seconds <= cfg.budget
    lite = plan(cfg, AUTO_SAMPLES, LITE0, 4, 24_600_000)  # min_samples optimised at fewer steps, 4x views
    assert cfg.min_samples <= lite.optimised < cfg.min_samples + lite.batch and cfg.min_steps <= lite.steps < cfg.steps
    assert lite.samples == DEFAULT_SAMPLES and lite.seconds <= cfg.budget
    assert lite.batch * 4 * 24_600_000 <= BATCH_BYTES and lite.optimised % lite.batch == 0  # whole batches, capped
    big = plan(cfg, AUTO_SAMPLES, R50, 4)  # ResNet-50 at 224: fewer steps, then fewer samples
    assert 4 <= big.optimised < cfg.min_samples and big.steps == cfg.min_steps
    assert big.samples == 4 * big.optimised and big.seconds <= cfg.budget
    assert big.seconds == pytest.approx(big.optimised * big.steps * R50)
    huge = plan(cfg, AUTO_SAMPLES, 10 * R50, 4)  # the floors: 4 samples x min_steps, over the budget
    assert huge.optimised == 4 and huge.steps == cfg.min_steps
    forced = plan(cfg, 600, R20, 4)  # synthetic:N forces N; what the budget does not afford are views
    assert forced.samples == 600 and 256 <= forced.optimised < 600 and forced.seconds <= cfg.budget
    slow = plan(cfg, 2000, R20, 4)  # a quarter is optimised even over the budget: the steps shrink
    assert slow.optimised == 500 and cfg.min_steps <= slow.steps < cfg.steps
    forced_big = plan(cfg, 64, R50, 4)  # as many optimised as min_steps afford (>= a quarter), the rest views
    assert forced_big.samples == 64 and forced_big.optimised == big.optimised and forced_big.steps == cfg.min_steps
    assert plan(cfg, 64, 10 * R50, 4).optimised == 16  # at least a quarter is optimised, over the budget
    assert plan(cfg, AUTO_SAMPLES, R50, 1).samples == big.optimised  # no views for non-images


def test_cost_model_prices_activations_not_only_macs():
    """Lite0 has 12x fewer MACs than ResNet-50 but costs ~0.4x per step (measured 58 vs 174 ms of CPU per
    sample-step, module docstring of `onnxprune.synthetic_plan`): its activations carry the difference."""
    assert 0.3 < LITE0 / R50 < 0.5
    assert 0.9 < LITE0 / 0.0584 < 1.2 and 0.85 < R50 / 0.174 < 1.15
    ocr = step_seconds(625e6, 5.7e6, 43.8e6)  # PP-OCRv4 rec: elementwise hard-swish, cheap per element
    assert 0.85 < ocr / 0.0459 < 1.15


def test_forward_cost_separates_depthwise_from_dense():
    from onnx import helper

    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], group=1),
             helper.make_node("Conv", ["a", "w2"], ["b"], group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["y"])]
    shapes = {"x": (2, 4, 5, 5), "w1": (8, 4, 1, 1), "a": (2, 8, 5, 5), "w2": (8, 1, 3, 3), "b": (2, 8, 5, 5),
              "y": (2, 8, 5, 5)}
    dense, layer, other = forward_cost(nodes, shapes)
    assert dense == 2 * 8 * 25 * 4  # the 1x1 conv only; the depthwise one is priced by its activations
    assert layer == 2 * 2 * 8 * 25 and other == 2 * 8 * 25


def test_views_are_flips_and_shifts_of_the_optimised_images():
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    v = _views(x, 4, (2, 3), np.random.default_rng(1))
    assert v.shape == (12, 3, 16, 16)
    np.testing.assert_array_equal(v[:3], x)
    np.testing.assert_array_equal(v[3:6], x[..., ::-1])
    for view, source in ((v[6:9], x), (v[9:12], x[..., ::-1])):  # shifted by at most 16 / 8 = 2 pixels
        shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                  if np.array_equal(view[..., 2:-2, 2:-2], source[..., 2 + dy:14 + dy, 2 + dx:14 + dx])]
        assert len(shifts) == 1, shifts


def test_time_budget_scales_the_work_and_is_respected():
    """Interleaved runs on a small model, one onnxruntime thread: 4x the budget costs ~4x the time, and a run's
    CPU time stays within its budget (the plan is in one-thread CPU seconds; wall time on a loaded machine is
    longer by the load, which the plan cannot know: measured 12x at a load of 15 on the 2 cores)."""
    model = onnx.load(FASHION_RESNET)
    small = SynthesisConfig(budget=0.5, min_steps=5, threads=1)
    large = SynthesisConfig(budget=2.0, min_steps=5, threads=1)
    times: dict[float, list[float]] = {0.5: [], 2.0: []}
    for _ in range(2):
        for cfg in (small, large):
            t = time.process_time()
            synthesize(model, AUTO_SAMPLES, 0, cfg)
            times[cfg.budget].append(time.process_time() - t)
    t_small, t_large = min(times[0.5]), min(times[2.0])
    assert 1.8 < t_large / t_small < 8.0, times
    assert t_large < 2.0 * 1.6 + 1.0, times  # the cost model is within 20% (+ building the objective)


def test_augmentation_inverse_is_the_transpose():
    rng = np.random.default_rng(0)
    cfg = SynthesisConfig(jitter=3, flip=True)
    a, b = rng.standard_normal((2, 3, 8, 10)), rng.standard_normal((2, 3, 8, 10))
    for _ in range(5):
        forward, inverse = _augment(rng, cfg, (2, 3))
        np.testing.assert_array_equal(inverse(forward(a)), a)
        assert float((forward(a) * b).sum()) == pytest.approx(float((a * inverse(b)).sum()))


def test_upsample_is_bilinear():
    mat = _resize_matrix(4, 8)
    np.testing.assert_allclose(mat.sum(1), 1.0, rtol=1e-6)
    x = np.ones((1, 1, 4, 4), np.float32) * np.arange(4, dtype=np.float32)[None, None, None, :]
    up = _upsample(x, (2, 3), (8, 8))
    assert up.shape == (1, 1, 8, 8)
    np.testing.assert_allclose(up[0, 0, 0], [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3], atol=1e-6)
    np.testing.assert_allclose(up[0, 0, :, 3], 1.25, atol=1e-6)  # constant along H stays constant


def test_deterministic_with_augmentation_and_low_resolution():
    model = onnx.load(FASHION_RESNET)
    cfg = SynthesisConfig(steps=5, batch=4, jitter=2, flip=True, resolution=0.5)
    a = synthesize(model, 6, seed=3, config=cfg)["image"]
    b = synthesize(model, 6, seed=3, config=cfg)["image"]
    assert a.shape == (6, 1, 28, 28)
    np.testing.assert_array_equal(a, b)


def test_low_resolution_generation_still_matches_statistics_at_full_size():
    model = onnx.load(FASHION_RESNET)
    cfg = SynthesisConfig(steps=60, batch=8, resolution=0.5)
    x = synthesize(model, 8, seed=0, config=cfg)["image"]
    start = _upsample(np.random.default_rng(0).standard_normal((8, 1, 14, 14)).astype(np.float32), (2, 3), (28, 28))
    assert bn_loss(model, x) < 0.5 * bn_loss(model, start)


def test_data_free_prune_beats_the_data_free_baseline():
    """Fashion-MNIST ResNet, 30% of channels: obs + seq on synthetic inputs beats l2 + bias (no data at all)."""
    from models.fashion_mnist import is_available, load_fashion_mnist
    from onnxprune.calibration import CalibrationData, collect_stats
    from onnxprune.passes.pruning import PruneConfig, PrunePass
    from onnxprune.verify import session

    if not is_available():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    from onnxprune.importer import import_model

    model = import_model(str(FASHION_RESNET))
    images, labels = load_fashion_mnist("test")
    pick = np.random.default_rng(0).permutation(len(labels))[:2000]
    images, labels = images[pick], labels[pick]

    def accuracy(m: onnx.ModelProto) -> float:
        return float((session(m).run(None, {"image": images})[0].argmax(1) == labels).mean())

    syn = CalibrationData(synthesize(model, 32, 0, SynthesisConfig(steps=60)))
    data_free = PrunePass(PruneConfig(criterion="obs", repair="seq", ratio=0.3, round_to=1), calib=syn,
                          stats=collect_stats(model, syn)).run(model).model
    baseline = PrunePass(PruneConfig(criterion="l2", repair="bias", ratio=0.3, round_to=1)).run(model).model
    params = sum(t.ByteSize() for t in model.graph.initializer)
    assert sum(t.ByteSize() for t in data_free.graph.initializer) < 0.8 * params
    acc_syn, acc_base, acc_full = accuracy(data_free), accuracy(baseline), accuracy(model)
    assert acc_syn > acc_base + 0.01 and acc_syn <= acc_full + 0.005, (acc_syn, acc_base, acc_full)


@pytest.mark.parametrize("bad", [{"steps": 0}, {"batch": 0}, {"lr": 0.0}, {"budget": -1.0}, {"views": 0},
                                 {"resolution": 1.5}, {"threads": 0}])
def test_synthesis_config_refuses_bad_values(bad):
    from onnxprune.errors import UsageError

    with pytest.raises(UsageError):
        SynthesisConfig(**bad)

