"""Pretrained CIFAR-10 ResNets (models/cifar_resnet.py): the export, the data loader, the option-A coupling.

Skips when torch or the shared datasets folder (../shared/datasets) is absent.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.importer import import_model
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.verify import dead_channel_check, run

cifar = pytest.importorskip("models.cifar_resnet")
zoo = pytest.importorskip("models.zoo")


def _needs_data() -> None:
    try:
        cifar._data_file("cifar10", "test.npz")
    except cifar.DatasetMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def test_subset():
    _needs_data()
    return cifar.load_cifar10("test", n=1000)


def _path(arch: str):
    _needs_data()
    try:
        return zoo.zoo_model(f"cifar_{arch}")
    except zoo.ZooError as exc:
        pytest.skip(str(exc))


def test_stratified_subset_is_balanced_and_seeded():
    labels = np.repeat(np.arange(10), 100)  # sorted by class, as the test file is
    pick = cifar.stratified(labels, 55, seed=1)
    counts = np.bincount(labels[pick], minlength=10)
    assert counts.sum() == 55 and counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(pick, cifar.stratified(labels, 55, seed=1))
    assert not np.array_equal(pick, cifar.stratified(labels, 55, seed=2))
    with pytest.raises(ValueError):
        cifar.stratified(labels, 1001)


def test_preprocessing_matches_readme():
    pixels = np.array([[[[0, 128, 255]]]], dtype=np.uint8)  # one RGB pixel, NHWC
    got = cifar.preprocess(pixels)
    assert got.shape == (1, 3, 1, 1) and got.dtype == np.float32
    want = (np.array([0, 128, 255]) / 255.0 - cifar.MEAN) / cifar.STD
    np.testing.assert_allclose(got.reshape(3), want, rtol=1e-6)


def test_loader_splits(test_subset):
    x, y = test_subset
    assert x.shape == (1000, 3, 32, 32) and x.dtype == np.float32
    assert np.bincount(y, minlength=10).tolist() == [100] * 10
    cx, cy = cifar.load_cifar10("calib", n=256)
    assert cx.shape == (256, 3, 32, 32) and np.bincount(cy, minlength=10).min() >= 25


@pytest.mark.parametrize("arch", sorted(cifar.ARCHS))
def test_export_matches_torch_and_readme_top1(arch, test_subset):
    torch = pytest.importorskip("torch")
    path = _path(arch)
    x, y = test_subset
    with torch.no_grad():
        expected = cifar.torch_model(arch)(torch.from_numpy(x[:64])).numpy()
    got = run(import_model(path), {"input": x[:64]})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert abs(cifar.top1(path, x, y) - cifar.README_TOP1[arch]) <= 1.0


def test_option_a_shortcut_couples_the_padded_stream():
    """The stem's 16 channels run through both zero-pads (16 -> 32 -> 64): one group of 16; each pad adds
    a group of its padded positions (16 at the first pad, 32 at the second), so every residual stream is
    prunable and the pruned model is exact on the silenced channels."""
    model = import_model(_path("resnet20"))
    analysis = analyze(ModelGraph(model))
    assert not analysis.barriers
    streams = [g for g in analysis.groups if any(m.tensor == "linear.weight" for m in g.members)]
    assert sorted(g.size for g in streams) == [16, 16, 32]
    stem = next(g for g in streams if any(m.tensor == "conv1.weight" for m in g.members))
    assert stem.size == 16
    linear = next(m for m in stem.members if m.tensor == "linear.weight")
    np.testing.assert_array_equal(np.sort(linear.positions), np.arange(24, 40))  # padded by 8, then by 16
    rng = np.random.default_rng(0)
    inputs = {"input": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)}
    for group in analysis.groups:
        assert dead_channel_check(analysis, group, inputs).error <= 1e-5, [str(m) for m in group.members][:4]
    result = PrunePass(PruneConfig(target_params="60%")).run(model)
    summary = result.info["summary"]
    assert summary["params_after"] <= 0.61 * summary["params_before"]
    out = run(result.model, inputs)[0]
    assert out.shape == (2, 10) and np.isfinite(out).all()


def test_a_parameter_budget_defaults_to_lamp_which_keeps_more_accuracy(test_subset):
    """With `--target-params` and no `--allocation`, the groups share the removal by LAMP (layer-adaptive), not
    one fraction each: on the pretrained ResNet20, data-free l2 + bias at 20% of the parameters removed keeps far
    more of its top-1 (all 10,000 test images: 83.9% against 72.7%; original 91.73%)."""
    model = import_model(_path("resnet20"))
    x, y = test_subset
    top1, plans = {}, {}
    for allocation in (None, "uniform"):
        config = PruneConfig(criterion="l2", repair="bias", target_params="80%", allocation=allocation)
        result = PrunePass(config).run(model)
        summary = result.info["summary"]
        assert summary["params_after"] <= 0.8 * summary["params_before"]
        top1[allocation], plans[allocation] = cifar.top1(result.model, x, y), summary
    assert plans[None]["config"]["allocation"] == "lamp" and plans["uniform"]["config"]["allocation"] == "uniform"
    assert top1[None] >= top1["uniform"] + 5, top1
