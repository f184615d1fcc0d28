"""Small API contracts a library user relies on: path-like arguments, typed package, no global side effects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from models.testmodels import TEST_MODELS
from onnxprune.verify import random_inputs, run, session

ROOT = Path(__file__).resolve().parents[1]


def test_verify_accepts_path_like(tmp_path):
    model = TEST_MODELS["concat"]()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    inputs = random_inputs(model)
    expected = run(model, inputs)
    for form in (path, str(path)):
        got = run(form, inputs)
        assert all(np.array_equal(a, b) for a, b in zip(expected, got))
    assert session(path).get_inputs()[0].name == model.graph.input[0].name


def test_package_is_typed():
    assert (ROOT / "onnxprune" / "py.typed").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"onnxprune" = ["py.typed"]' in pyproject


def test_sensitivity_plot_leaves_the_callers_backend_alone(tmp_path):
    import matplotlib

    from onnxprune.sensitivity import SensitivityRow, plot

    before = matplotlib.get_backend()
    rows = [SensitivityRow(group=0, channels=8, params=100, members="w", errors=[0.1, 0.2])]
    plot(rows, [0.25, 0.5], tmp_path / "s.png", title="t")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == before


def test_the_package_lists_its_public_names_only():
    """dir(onnxprune) is the public API (every name resolves), not the module's helpers (importlib, Any, ...)."""
    import onnxprune

    names = dir(onnxprune)
    assert set(names) == set(onnxprune.__all__) | {"__version__"}
    assert all(hasattr(onnxprune, n) for n in names)


def test_every_pass_takes_calibration_as_a_plain_mapping_too():
    """{input name: array} is what a library caller has at hand: constrained passes took only CalibrationData
    (AttributeError: 'dict' object has no attribute 'arrays'), the unconstrained one only a dict."""
    from pathlib import Path

    import numpy as np
    import pytest

    from onnxprune import PruneConfig, PrunePass, UnconstrainedConfig, UnconstrainedPass, load_model
    from onnxprune.calibration import CalibrationData

    model = load_model(Path(__file__).resolve().parents[1] / "models" / "fashion_mnist_cnn.onnx")
    x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    config = PruneConfig(ratio=0.3, criterion="obs", repair="seq")
    as_dict = PrunePass(config, calib={"image": x}).run(model)
    as_data = PrunePass(config, calib=CalibrationData({"image": x})).run(model)
    assert as_dict.model.graph.SerializeToString() == as_data.model.graph.SerializeToString()  # (metadata: seconds)
    unconstrained = UnconstrainedConfig(ratio=0.3, repair="ls")
    a = UnconstrainedPass(unconstrained, calib=CalibrationData({"image": x})).run(model)
    b = UnconstrainedPass(unconstrained, calib={"image": x}).run(model)
    assert a.model.graph.SerializeToString() == b.model.graph.SerializeToString()
    with pytest.raises(TypeError, match="input name: array"):
        PrunePass(config, calib=x)
