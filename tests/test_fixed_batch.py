"""Models exported with a fixed batch B > 1 (torch.export bakes the example's batch into every shape) calibrate:
every run feeds B consecutive inputs (`CalibrationData.batch`), and the result equals the batch-1 export's."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import torch_export

from onnxprune.calibration_data import CalibrationData, check_calib, fixed_batch
from onnxprune.errors import DataError, UsageError
from onnxprune.graph import ModelGraph
from onnxprune.verify import session


def _export(batch: int) -> onnx.ModelProto:
    """A small residual CNN with a linear head (seeded weights, moved BatchNorm statistics) exported at `batch`."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.a = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(24, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
            self.head = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU())
            self.fc = nn.Linear(32 * 4, 10)

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(x + self.b(self.a(x)))
            x = nn.functional.adaptive_avg_pool2d(self.head(x), 2)
            return self.fc(torch.flatten(x, 1))

    torch.manual_seed(0)
    return torch_export(Net(), (batch, 3, 8, 8))


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    b = fixed_batch(model)
    sess = session(model)
    return np.concatenate([sess.run(None, {"x": x[i : i + b]})[0] for i in range(0, len(x), b)])


def test_calibration_data_runs_whole_batches():
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    data = CalibrationData({"x": x}, batch=4)
    assert (data.inputs, data.n) == (10, 2)  # the remainder of 2 inputs is not used
    assert data.sample(1)["x"].ravel().tolist() == [4, 5, 6, 7]
    assert data.head(1).sample(0)["x"].ravel().tolist() == [0, 1, 2, 3] and data.head(1).n == 1
    assert data.take([1, 0]).arrays["x"].ravel().tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    assert CalibrationData({"x": x}).sample(3)["x"].ravel().tolist() == [3]  # batch 1: one input a run


def test_fixed_batch_is_read_off_the_inputs():
    b4, b1 = _export(4), _export(1)
    assert fixed_batch(b4) == 4 and fixed_batch(ModelGraph(b4)) == 4 and fixed_batch(b1) == 1
    data = check_calib(CalibrationData({"x": _inputs(10)}), b4)
    assert (data.batch, data.n) == (4, 2)
    assert check_calib(CalibrationData({"x": _inputs(10)}), b4, samples=9).n == 2  # samples count inputs
    with pytest.raises(UsageError, match="below the model's fixed batch of 4"):
        check_calib(CalibrationData({"x": _inputs(10)}), b4, samples=3)
    with pytest.raises(DataError, match=r"fixed batch of 4 .* only 3"):
        check_calib(CalibrationData({"x": _inputs(3)}), b4)
    with pytest.raises(DataError, match="only 3"):
        CalibrationData({"x": _inputs(3)}).for_model(b4)


@pytest.mark.parametrize("flags", [("obs", "seq", "uniform"), ("obs", "ls", "uniform"), ("l2", "seq", "knapsack"),
                                   ("obs", "seq", "relu-refit")])
def test_fixed_batch_prunes_as_the_batch_one_export_does(flags):
    """The same network exported at batch 4 and at batch 1, the same 16 calibration inputs: the same plan, and
    pruned models whose outputs agree on held-out inputs (every Hessian row is kept at 8x8: the statistics are
    the same sums in another order)."""
    from onnxprune import PruneConfig, PrunePass
    from onnxprune.importer import canonicalize

    criterion, repair, allocation = flags
    extra: dict = {"allocation": allocation, "target_params": "85%"} if allocation == "knapsack" else {"ratio": 0.3}
    if allocation == "relu-refit":
        extra = {"ratio": 0.3, "relu_refit": True}
    config = PruneConfig(criterion=criterion, repair=repair, **extra)
    calib = {"x": _inputs(16)}
    runs = {b: PrunePass(config, calib=calib).run(canonicalize(_export(b))[0]) for b in (4, 1)}
    s4, s1 = runs[4].info["summary"], runs[1].info["summary"]
    m4, m1 = runs[4].model, runs[1].model
    assert s4["plan"] == s1["plan"] and s4["params_after"] == s1["params_after"] < s4["params_before"]
    assert s4["repair"]["repaired"] == s1["repair"]["repaired"] > 0
    if allocation == "relu-refit":
        assert s4["repair"]["relu_refit"]["refitted"] == s1["repair"]["relu_refit"]["refitted"]
        assert s4["repair"]["relu_refit"]["refitted"]
    held = _inputs(8, seed=1)
    y4, y1, dense = _outputs(m4, held), _outputs(m1, held), _outputs(_export(1), held)
    assert np.abs(y4 - y1).max() <= 1e-4 * np.abs(y1).max()
    assert np.linalg.norm(y4 - dense) < np.linalg.norm(dense)  # repaired, not broken
    assert fixed_batch(m4) == 4  # the pruned model keeps its batch


def _cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxprune.cli", "prune", str(tmp_path / "m.onnx"), "-o",
                           str(tmp_path / "o.onnx"), *args], capture_output=True, text=True)


def test_cli_calibrates_a_fixed_batch_model(tmp_path):
    onnx.save(_export(2), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=_inputs(9))
    proc = _cli(tmp_path, "--criterion", "obs", "--repair", "seq", "--calib", str(tmp_path / "c.npz"), "--verify",
                "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["verification"]["passed"] and out["verification"]["inputs"] == "calibration: 4 runs of 2 inputs"
    assert out["repair"]["repaired"] > 0 and fixed_batch(onnx.load(tmp_path / "o.onnx")) == 2
    note = "the model's inputs fix a batch of 2: calibration runs 2 samples at a time (4 runs)"
    assert note in out["notices"] and f"note: {note}" in proc.stderr  # said once, before the work
    assert proc.stderr.count(note) == 1
    (tmp_path / "o.onnx").unlink()
    proc = _cli(tmp_path, "--mode", "unconstrained", "--repair", "seq", "--calib", str(tmp_path / "c.npz"), "--json")
    assert proc.returncode == 0 and note in json.loads(proc.stdout)["notices"], proc.stderr
    (tmp_path / "o.onnx").unlink()

    for args, code, text in [(("--calib-samples", "1"), 2, "below the model's fixed batch of 2")]:
        proc = _cli(tmp_path, "--criterion", "obs", "--repair", "seq", "--calib", str(tmp_path / "c.npz"), *args)
        assert proc.returncode == code and text in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.onnx").exists()
    np.savez(tmp_path / "one.npz", x=_inputs(1))
    proc = _cli(tmp_path, "--criterion", "obs", "--repair", "seq", "--calib", str(tmp_path / "one.npz"))
    assert proc.returncode == 1 and "holds only 1" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
