"""A bad calibration file ends in one line naming the file and what is wrong, exit code 1, no output written.

Every case runs the CLI on the bundled Fashion-MNIST CNN (input ``(batch, 1, 28, 28)`` float32) with a
calibrated criterion, so the file is read and checked before anything runs in onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.calibration import CalibrationData, check_calib, load_calib
from onnxprune.cli import main
from onnxprune.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
FMNIST = ROOT / "models" / "fashion_mnist_cnn.onnx"


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(str(FMNIST))


@pytest.fixture(scope="module")
def input_name(model) -> str:
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    assert len(names) == 1
    return names[0]


def _images(n: int = 4, shape=(1, 28, 28), dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(0).random((n, *shape)).astype(dtype)


def _write(kind: str, path: Path, name: str) -> None:
    """A calibration file that is wrong in one way (`kind`)."""
    if kind == "shape":
        np.savez(path, **{name: _images(10, (3, 32, 32))})
    elif kind == "rank":
        np.savez(path, **{name: _images(10, (28, 28))})
    elif kind == "keys":
        np.savez(path, pixels=_images())
    elif kind == "dtype":
        np.savez(path, **{name: np.full((4, 1, 28, 28), "a")})
    elif kind == "objects":
        np.savez(path, **{name: np.array([None] * 4, dtype=object)})
    elif kind == "empty":
        np.savez(path, **{name: _images(0)})
    elif kind == "nan":
        x = _images()
        x[1, 0, 3, 4], x[2, 0, 5, 6] = np.nan, np.nan
        np.savez(path, **{name: x})
    elif kind == "npy":
        np.save(path, _images())
    elif kind == "text":
        path.write_text("0.1 0.2 0.3\n")
    elif kind == "truncated":
        np.savez(path, **{name: _images()})
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "directory":
        path.mkdir()
    elif kind != "missing":
        raise AssertionError(kind)


CASES = {  # kind -> file name, words the message must contain
    "missing": ("calib.npz", ["not found"]),
    "directory": ("calib.npz", ["directory"]),
    "text": ("calib.txt", ["not an .npz archive"]),
    "npy": ("calib.npy", [".npy array", "not an .npz archive"]),
    "truncated": ("calib.npz", ["not a readable .npz archive"]),
    "objects": ("calib.npz", ["Python objects"]),
    "keys": ("calib.npz", ["no array for model input", "'pixels'"]),
    "shape": ("calib.npz", ["has shape (10, 3, 32, 32)", "expects (N, 1, 28, 28)"]),
    "rank": ("calib.npz", ["has shape (10, 28, 28)", "expects (N, 1, 28, 28)"]),
    "dtype": ("calib.npz", ["<U1", "float32"]),
    "empty": ("calib.npz", ["no samples"]),
    "nan": ("calib.npz", ["2 NaN values of 3136"]),  # the repair wrote 89,530 NaN weights, "verified"
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_bad_calibration_file_is_one_line_exit_1(kind, tmp_path, capsys, input_name):
    file_name, words = CASES[kind]
    calib = tmp_path / file_name
    _write(kind, calib, input_name)
    out = tmp_path / "out.onnx"
    code = main(["prune", str(FMNIST), "-o", str(out), "--criterion", "activation", "--calib", str(calib)])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 1, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"onnxprune: error: {calib}: "), err
    if kind in ("keys", "shape", "rank", "dtype", "empty", "nan"):
        assert repr(input_name) in lines[0]
    for word in words:
        assert word in lines[0], (word, err)
    assert "internal error" not in err and "InvalidArgument" not in err
    assert not out.exists()


def test_sensitivity_and_unconstrained_check_the_file_too(tmp_path, capsys, input_name):
    calib = tmp_path / "calib.npz"
    _write("shape", calib, input_name)
    png = tmp_path / "s.png"
    assert main(["sensitivity", str(FMNIST), "--calib", str(calib), "--plot", str(png)]) == 1
    assert "expects (N, 1, 28, 28)" in capsys.readouterr().err
    assert not png.exists()
    out = tmp_path / "out.onnx"
    args = ["prune", str(FMNIST), "-o", str(out), "--mode", "unconstrained", "--repair", "mean", "--calib", str(calib)]
    assert main(args) == 1
    assert "expects (N, 1, 28, 28)" in capsys.readouterr().err
    assert not out.exists()


def test_unreadable_file_is_a_data_error(tmp_path, monkeypatch, model):
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=_images())
    real_open = Path.open

    def deny(self, *args, **kwargs):
        if self == calib:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", deny)
    with pytest.raises(DataError, match=r"calib\.npz: cannot read the calibration file \(Permission denied\)"):
        load_calib(calib, model)


def test_good_file_loads_and_converts(tmp_path, model, input_name):
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{input_name: _images(6, dtype=np.float64)}, extra=np.zeros(3))  # extra keys are ignored
    data = load_calib(calib, model, samples=4)
    assert set(data.arrays) == {input_name} and data.n == 4
    assert data.arrays[input_name].dtype == np.float32


def test_symbolic_and_unknown_dims_accept_any_size():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x, ids], [y])
    model = helper.make_model(graph)
    ok = check_calib(CalibrationData({"x": np.zeros((3, 17, 8)), "ids": np.ones((3, 5))}), model)
    assert ok.arrays["x"].dtype == np.float32 and ok.arrays["ids"].dtype == np.int64
    with pytest.raises(DataError, match=r"'x' has shape \(3, 17, 9\) but the model expects \(N, seq, 8\)"):
        check_calib(CalibrationData({"x": np.zeros((3, 17, 9)), "ids": np.ones((3, 5))}), model)
    with pytest.raises(DataError, match=r"'ids' holds fractional float64 values but the model expects int64"):
        check_calib(CalibrationData({"x": np.zeros((3, 17, 8)), "ids": np.full((3, 5), 0.5)}), model)
