"""Shared fixtures: seeded test models, canonicalised the way the CLI does it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
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


class SuiteLock:
    """Lets a test that times code run alone while the suite runs on several pytest-xdist workers.

    Every test holds the lock shared; a test marked ``exclusive`` holds it exclusively, so it starts once the
    other workers' tests have ended and they wait until it is done. A gate (held briefly by every test, and by
    an exclusive test until it ends) keeps the shared holders from starving an exclusive one: `flock` itself
    would grant a new shared lock while an exclusive request waits.
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.gate = open(folder / "gate.lock", "a+")  # noqa: SIM115 - held for the worker's life
        self.tests = open(folder / "tests.lock", "a+")  # noqa: SIM115

    @contextlib.contextmanager
    def hold(self, exclusive: bool) -> Iterator[None]:
        fcntl.flock(self.gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(self.tests, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(self.gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(self.tests, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(self.gate, fcntl.LOCK_UN)


_LOCK_KEY = pytest.StashKey[SuiteLock]()


def _run_folder(config) -> Path | None:
    """The folder every worker of this pytest-xdist run shares: the run's base temporary folder, whose
    subfolders are the workers' (pytest removes old runs' folders). None when the suite runs in one process."""
    if not hasattr(config, "workerinput") or not config.option.basetemp:
        return None
    return Path(config.option.basetemp).parent


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Set-up, call and tear-down of each test under the run's `SuiteLock` (pytest-xdist workers only)."""
    folder = _run_folder(item.config)
    if folder is None:
        yield
        return
    lock = item.config.stash.get(_LOCK_KEY, None)
    if lock is None:
        lock = item.config.stash[_LOCK_KEY] = SuiteLock(folder)
    with lock.hold(item.get_closest_marker("exclusive") is not None):
        yield


@pytest.fixture(scope="session", autouse=True)
def _latency_cache(tmp_path_factory, pytestconfig):
    """Latency tables (``--round-to auto``, the CLI's default) go to one temporary folder per test run, never
    to ~/.cache: every test of the run shares the tables measured so far (every worker's: the tables are
    written atomically)."""
    before = os.environ.get("ONNXPRUNE_LATENCY_CACHE")
    shared = _run_folder(pytestconfig)
    folder = shared / "latency-cache" if shared is not None else tmp_path_factory.mktemp("latency-cache")
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["ONNXPRUNE_LATENCY_CACHE"] = str(folder)
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
