"""Every model in ``models.testmodels.TEST_MODELS`` is valid ONNX, deterministic and runs in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.testmodels import IR_VERSION, OPSET, TEST_MODELS, make_inputs


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", sorted(TEST_MODELS))
def test_model_passes_full_checker(name: str) -> None:
    model = TEST_MODELS[name]()
    onnx.checker.check_model(model, full_check=True)
    opset = {o.domain: o.version for o in model.opset_import}[""]
    assert opset >= OPSET
    assert model.ir_version >= IR_VERSION


@pytest.mark.parametrize("name", sorted(TEST_MODELS))
def test_model_is_deterministic(name: str) -> None:
    assert TEST_MODELS[name]().SerializeToString() == TEST_MODELS[name]().SerializeToString()


@pytest.mark.parametrize("name", sorted(TEST_MODELS))
def test_model_runs_in_onnxruntime(name: str) -> None:
    model = TEST_MODELS[name]()
    feeds = make_inputs(model, seed=0)
    outputs = _session(model).run(None, feeds)
    assert len(outputs) == len(model.graph.output)
    for value, array in zip(model.graph.output, outputs):
        assert array.dtype == onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        declared = [
            d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim
        ]
        assert len(declared) == array.ndim
        assert all(d is None or d == s for d, s in zip(declared, array.shape)), (declared, array.shape)
        assert np.isfinite(array).all()
        assert np.abs(array).max() > 0


def test_make_inputs_is_seeded_and_fills_symbolic_dims() -> None:
    model = TEST_MODELS["attention_dynamic"]()
    a, b, c = make_inputs(model, 0), make_inputs(model, 0), make_inputs(model, 1)
    assert a.keys() == {"input"}
    assert a["input"].shape == (1, 8, 32)
    np.testing.assert_array_equal(a["input"], b["input"])
    assert not np.array_equal(a["input"], c["input"])


def test_dynamic_attention_runs_with_other_batch_and_seq() -> None:
    model = TEST_MODELS["attention_dynamic"]()
    x = np.random.default_rng(0).standard_normal((3, 5, 32)).astype(np.float32)
    (y,) = _session(model).run(None, {"input": x})
    assert y.shape == (3, 5, 32)


def test_biases_are_nonzero() -> None:
    for name, build in TEST_MODELS.items():
        model = build()
        for node in model.graph.node:
            if node.op_type in ("Conv", "Gemm", "ConvTranspose") and len(node.input) == 3:
                init = {t.name: t for t in model.graph.initializer}.get(node.input[2])
                if init is not None:
                    assert np.abs(onnx.numpy_helper.to_array(init)).min() > 0, (name, node.name)
