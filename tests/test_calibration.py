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
