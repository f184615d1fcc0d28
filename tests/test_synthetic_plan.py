"""Synthetic calibration: the time-budget plan, augmentation, low-resolution generation, data-free accuracy."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.synthetic import (
    AUTO_SAMPLES,
    DEFAULT_SAMPLES,
    MACS_PER_SECOND,
    SynthesisConfig,
    _augment,
    _resize_matrix,
    _upsample,
    _views,
    bn_loss,
    plan,
    synthesize,
)

ROOT = Path(__file__).resolve().parents[1]
FASHION_RESNET = ROOT / "models" / "fashion_mnist_resnet.onnx"


def test_plan_fits_the_budget_and_respects_floors():
    cfg = SynthesisConfig(budget=90.0)
    small = plan(cfg, AUTO_SAMPLES, 41e6, 4)  # CIFAR ResNet20: the budget affords the cap, optimised
    assert small.samples == small.optimised == DEFAULT_SAMPLES and small.steps == cfg.steps
    assert small.seconds <= cfg.budget
    mid = plan(cfg, AUTO_SAMPLES, 0.1e9, 4)  # fewer optimised samples at full steps, views fill up
    assert cfg.min_samples <= mid.optimised < DEFAULT_SAMPLES and 0.8 * cfg.steps <= mid.steps <= cfg.steps
    assert mid.samples == DEFAULT_SAMPLES and mid.seconds <= cfg.budget
    ocr = plan(cfg, AUTO_SAMPLES, 0.7e9, 4)  # PP-OCRv4 rec: min_samples optimised at fewer steps, 4x views
    assert ocr.optimised == cfg.min_samples and cfg.min_steps <= ocr.steps < cfg.steps
    assert ocr.samples == DEFAULT_SAMPLES and ocr.seconds <= cfg.budget
    big = plan(cfg, AUTO_SAMPLES, 4.1e9, 4)  # ResNet-50 at 224: fewer steps, then fewer samples
    assert 4 <= big.optimised < cfg.min_samples and cfg.min_steps <= big.steps < cfg.steps
    assert big.samples == 4 * big.optimised and big.seconds <= cfg.budget
    assert big.seconds == pytest.approx(big.optimised * big.steps * 3 * 4.1e9 / MACS_PER_SECOND)
    huge = plan(cfg, AUTO_SAMPLES, 40e9, 4)  # the floors: 4 samples x min_steps, over the budget
    assert huge.optimised == 4 and huge.steps == cfg.min_steps
    forced = plan(cfg, 400, 41e6, 4)  # synthetic:N forces N; what the budget does not afford are views
    assert forced.samples == 400 and forced.optimised == 256 and forced.seconds <= cfg.budget
    slow = plan(cfg, 2000, 41e6, 4)  # a quarter is optimised even over the budget: the steps shrink
    assert slow.optimised == 500 and cfg.min_steps <= slow.steps < cfg.steps
    forced_big = plan(cfg, 64, 4.1e9, 4)  # at least a quarter is optimised, the rest are views
    assert forced_big.samples == 64 and forced_big.optimised == 16
    assert plan(cfg, AUTO_SAMPLES, 4.1e9, 1).samples == big.optimised  # no views for non-images


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
    """Interleaved wall times on a small model: 4x the budget costs ~4x the time, and a run stays within its
    budget with a margin for a loaded machine (the plan is in reference-machine seconds)."""
    model = onnx.load(FASHION_RESNET)
    small, large = SynthesisConfig(budget=0.5, min_steps=5), SynthesisConfig(budget=2.0, min_steps=5)
    times: dict[float, list[float]] = {0.5: [], 2.0: []}
    for _ in range(2):
        for cfg in (small, large):
            t = time.perf_counter()
            synthesize(model, AUTO_SAMPLES, 0, cfg)
            times[cfg.budget].append(time.perf_counter() - t)
    t_small, t_large = min(times[0.5]), min(times[2.0])
    assert 1.8 < t_large / t_small < 8.0, times
    assert t_large < 2.0 * 8 + 5, times  # load up to 8x the reference machine's


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
