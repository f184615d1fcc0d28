"""Calibration helpers: the linear layers statistics are collected for, and the single-threaded BLAS block."""

from __future__ import annotations

import numpy as np
import scipy.linalg  # noqa: F401  (loads scipy's own BLAS, so both copies are limited)
from conftest import canonical
from threadpoolctl import threadpool_info

from models.testmodels import TEST_MODELS
from onnxprune.calibration import consumers, single_threaded_blas
from onnxprune.graph import ModelGraph
from onnxprune.rules.facts import linear_axes


def _blas_threads() -> list[int]:
    return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]


def test_single_threaded_blas_limits_every_blas_and_restores_it():
    before = _blas_threads()
    assert before, "numpy links a BLAS"
    with single_threaded_blas():
        assert set(_blas_threads()) == {1}
        np.ones((64, 64)) @ np.ones((64, 64))
    assert _blas_threads() == before


def test_consumers_take_weight_axes_from_the_rules():
    """Conv (1, 0), Gemm by transB, MatMul on a matrix weight (0, 1): what the rules declare."""
    seen = set()
    for name in ("chain", "attention", "gemm_head"):
        graph = ModelGraph(canonical(TEST_MODELS[name]()))
        for c in consumers(graph):
            assert (c.in_axis, c.out_axis) == linear_axes(c.node, graph)
            assert c.kind == c.node.op_type.lower()
            seen.add(c.kind)
    assert seen == {"conv", "gemm", "matmul"}


def test_statistics_without_moments_hold_the_same_hessians_and_no_moments(monkeypatch):
    """`moments=False` (obs, ls: the Hessians alone) leaves the per-position arrays empty, nothing else changes;
    the probe session with onnxruntime's optimisations (`calibration.OPTIMIZE`) agrees with the plain graph
    within float32 rounding."""
    from onnxprune import calibration
    from onnxprune.calibration import CalibrationData, collect_stats

    model = canonical(TEST_MODELS["residual"]())
    vi = model.graph.input[0]
    shape = [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim][1:]
    data = CalibrationData({vi.name: np.random.default_rng(0).standard_normal((6, *shape)).astype(np.float32)})
    full, bare = collect_stats(model, data), collect_stats(model, data, moments=False)
    assert set(full.stats) == set(bare.stats) and full.stats
    for name, st in full.stats.items():
        other = bare.stats[name]
        np.testing.assert_array_equal(st.hessian, other.hessian)
        assert st.rows == other.rows and st.count == other.count == 6 and len(st.abs_sum)
        assert all(len(a) == 0 for a in (other.abs_sum, other.zero_sum, other.sum, other.sq_sum))
    monkeypatch.setattr(calibration, "OPTIMIZE", not calibration.OPTIMIZE)
    other_graph = collect_stats(model, data)
    for name, st in full.stats.items():
        scale = float(np.abs(st.hessian).max())
        np.testing.assert_allclose(other_graph.stats[name].hessian, st.hessian, rtol=1e-4, atol=1e-5 * scale)
        np.testing.assert_allclose(other_graph.stats[name].mean_abs, st.mean_abs, rtol=1e-4, atol=1e-6)
