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


def torch_export(net, shape: tuple[int, ...]):
    """`net` (a torch module, seeded by the caller) with trained-looking BatchNorms (moved statistics, affine
    parameters off 1 / 0), exported by the TorchScript exporter at input `shape` (input "x", output "y"; batch
    as given: a fixed batch), BatchNorm kept as nodes. Not canonicalised."""
    import io

    import onnx
    import torch

    net = net.eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    buf = io.BytesIO()
    torch.onnx.export(net, (torch.randn(*shape),), buf, dynamo=False, opset_version=17, do_constant_folding=False,
                      input_names=["x"], output_names=["y"])  # fmt: skip
    return onnx.load_from_string(buf.getvalue())


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


def unconstrained_exact(model, result, inputs: dict) -> None:
    """An unconstrained export computes its oracle: the (repaired) original with every unit's own mask."""
    import numpy as np

    from onnxprune.upscale.oracle import mask_model
    from onnxprune.verify import run

    expected = run(mask_model(model, result.info["plan"]), inputs)
    got = run(result.model, inputs)
    scale = max(float(np.abs(e).max()) for e in expected)
    assert max(float(np.abs(e - g).max()) for e, g in zip(expected, got)) <= 1e-5 * scale


@pytest.fixture(scope="module")
def fashion():
    """The trained Fashion-MNIST ResNet, 64 calibration images (train) and 250 held-out images (test)."""
    from models import fashion_mnist
    from onnxprune.importer import import_model

    resnet = ROOT / "models" / "fashion_mnist_resnet.onnx"
    if not resnet.is_file():
        pytest.skip("models/fashion_mnist_resnet.onnx not built")
    if not fashion_mnist.is_available():
        pytest.skip(f"Fashion-MNIST not installed: apt-get install -y {fashion_mnist.DEBIAN_PACKAGE}")
    train, _ = fashion_mnist.load_fashion_mnist("train")
    test, _ = fashion_mnist.load_fashion_mnist("test")
    return import_model(resnet), {"image": train[:64]}, {"image": test[::40]}
