"""The fast sensitivity scan (`onnxprune.sensitivity_runs`) measures what the physically pruned model measures:
masked weights at the original shapes, only the nodes downstream of the group, original values at the cut."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import canonical, torch_export

import onnxprune.sensitivity_runs as runs
from models.testmodels import TEST_MODELS
from onnxprune.calibration import CalibrationData, collect_stats
from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.plan import PruningPlan
from onnxprune.repair import repair_weights
from onnxprune.sensitivity import sensitivity
from onnxprune.verify import random_inputs

RATIOS = [0.125, 0.25, 0.5, 0.875]


def _calib(model, n=6) -> CalibrationData:
    samples = [random_inputs(model, seed=i) for i in range(n)]
    return CalibrationData({k: np.concatenate([s[k] for s in samples]) for k in samples[0]})


def _both(model, repair, monkeypatch, criterion="l1"):
    """(fast rows, physically pruned rows) of the same scan."""
    data = _calib(model)
    stats = collect_stats(model, data) if repair == "ls" else None
    fast = sensitivity(model, data, RATIOS, criterion, repair, stats)
    with monkeypatch.context() as m:
        m.setattr(runs, "supported", lambda model: False)
        pruned = sensitivity(model, data, RATIOS, criterion, repair, stats)
    return fast, pruned


def _close(fast, pruned) -> None:
    assert [r.group for r in fast] == [r.group for r in pruned]
    for f, p in zip(fast, pruned):
        assert np.array_equal(np.isnan(f.errors), np.isnan(p.errors))
        # float rounding only: the pruned convolutions sum fewer terms than the masked ones
        np.testing.assert_allclose(f.errors, p.errors, rtol=5e-5, atol=1e-6)


def _torch_net(residual: bool):
    """A small trained-looking CNN from torch: BatchNorms with statistics, an inverted residual block
    (expand, depthwise, project, add) when `residual`, else a plain depthwise-separable stack; the head conv
    has neither a bias nor a BatchNorm, so repairing its input adds a bias."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.expand = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
            self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32),
                                    nn.ReLU6())
            self.project = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
            self.head = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.ReLU())  # a repair adds its bias
            self.fc = nn.Linear(24, 10)

        def forward(self, x):
            x = self.stem(x)
            y = self.project(self.dw(self.expand(x)))
            x = x + y if residual else y
            return self.fc(self.head(x).mean(dim=(2, 3)))

    torch.manual_seed(0)
    return canonical(torch_export(Net(), (1, 3, 12, 12)))


@pytest.mark.parametrize("repair", ["none", "bias", "ls"])
@pytest.mark.parametrize("name", ["residual", "depthwise", "concat", "gemm_head"])
def test_fast_scan_equals_the_pruned_models_on_test_models(name, repair, monkeypatch):
    _close(*_both(canonical(TEST_MODELS[name]()), repair, monkeypatch))


@pytest.mark.parametrize("repair", ["none", "bias", "ls"])
@pytest.mark.parametrize("residual", [True, False], ids=["inverted-residual", "depthwise-separable"])
def test_fast_scan_equals_the_pruned_models_on_torch_nets(residual, repair, monkeypatch):
    fast, pruned = _both(_torch_net(residual), repair, monkeypatch, criterion="l2")
    assert len(fast) >= 3 and any(e > 1e-3 for r in fast for e in r.errors)  # something is measured
    _close(fast, pruned)


def test_the_cut_cache_changes_nothing_but_rounding(monkeypatch):
    """Every group run from the graph inputs (budget 0) measures what the cached cuts measure."""
    model = _torch_net(True)
    data = _calib(model)
    analysis = analyze(ModelGraph(model))
    cached, plain = runs.GroupScan(analysis, data), runs.GroupScan(analysis, data, budget=0)
    for g in sorted(analysis.groups, key=lambda g: cached.region(g).first):
        removals = [np.arange(max(1, g.size // 4)), None, np.arange(g.size // 2)]
        a, b = list(cached.errors(g, removals)), list(plain.errors(g, removals))
        assert np.isnan(a[1]) and np.isnan(b[1])
        np.testing.assert_allclose([a[0], a[2]], [b[0], b[2]], rtol=1e-5, atol=1e-7)
        assert not plain.held
    assert cached.held  # some cut was cached


@pytest.mark.parametrize("repair", ["bias", "ls"])
def test_a_repair_writes_only_what_the_region_feeds(repair):
    """The scan feeds the initializers `repair_weights` may write: any other it changed would be missed."""
    model = _torch_net(False)
    data = _calib(model)
    analysis = analyze(ModelGraph(model))
    stats = collect_stats(model, data) if repair == "ls" else None
    scan = runs.GroupScan(analysis, data, repair, stats)
    before = {t.name: t.SerializeToString() for t in model.graph.initializer}
    biases = 0
    for g in analysis.groups:
        region = scan.region(g)
        labels = PruningPlan({g.id: np.arange(g.size // 2)}).labels(analysis)
        repaired, _ = repair_weights(analysis, labels, repair, stats)
        changed = {t.name for t in repaired.graph.initializer if before.get(t.name) != t.SerializeToString()}
        added = {t for t in changed if t not in before}
        assert changed - added <= set(region.fed)
        for i, node in enumerate(repaired.graph.node):
            if len(node.input) > 2 and node.input[2] in added:
                assert i in region.biases
                biases += 1
    assert biases  # the head's


def test_rows_keep_the_analysis_order_and_nan_where_nothing_goes():
    model = canonical(TEST_MODELS["residual"]())
    rows = sensitivity(model, _calib(model), [0.01, 0.5])
    assert [r.group for r in rows] == [g.id for g in analyze(ModelGraph(model)).groups]
    assert all(np.isnan(r.errors[0]) and r.errors[1] > 0 for r in rows)
