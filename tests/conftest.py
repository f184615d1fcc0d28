"""Shared fixtures: seeded test models, canonicalised the way the CLI does it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `models/` holds the model builders; it is not an installed package
    sys.path.insert(0, str(ROOT))


def canonical(model):
    from onnxprune.importer import canonicalize

    return canonicalize(model)[0]


@pytest.fixture
def tmp_model(tmp_path):
    """Save a model to a temp file and return the path."""
    import onnx

    def save(model, name="model.onnx"):
        path = tmp_path / name
        onnx.save(model, str(path))
        return path

    return save


@pytest.fixture(scope="session", autouse=True)
def _latency_cache(tmp_path_factory):
    """Latency tables (``--round-to auto``, the CLI's default) go to one temporary folder per test run, never
    to ~/.cache: every test of the run shares the tables measured so far."""
    import os

    before = os.environ.get("ONNXPRUNE_LATENCY_CACHE")
    os.environ["ONNXPRUNE_LATENCY_CACHE"] = str(tmp_path_factory.mktemp("latency-cache"))
    yield
    if before is None:
        os.environ.pop("ONNXPRUNE_LATENCY_CACHE", None)
    else:
        os.environ["ONNXPRUNE_LATENCY_CACHE"] = before
