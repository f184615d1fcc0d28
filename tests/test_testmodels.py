"""Every model in ``models.testmodels.TEST_MODELS`` is valid ONNX, deterministic and runs in onnxruntime;
the bundled Fashion-MNIST model is valid and accurate; the dataset loader reads IDX files."""

from __future__ import annotations

import gzip
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import fashion_mnist, zoo
from models.testmodels import IR_VERSION, OPSET, TEST_MODELS, make_inputs
from models.zoo import ZOO


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


# -- bundled default model -------------------------------------------------------------------------
BUNDLED_ONNX = Path(__file__).resolve().parents[1] / "models" / "fashion_mnist_cnn.onnx"


def test_bundled_model_is_valid_and_small() -> None:
    assert BUNDLED_ONNX.stat().st_size < 2_000_000
    model = onnx.load(BUNDLED_ONNX)
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "BatchNormalization", "Add", "Concat", "Gemm"} <= ops
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]
    meta = json.loads(BUNDLED_ONNX.with_suffix(".json").read_text())
    assert meta["input"] == "image" and meta["dataset"] == fashion_mnist.DEBIAN_PACKAGE
    params = sum(
        int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
    )
    assert params >= meta["params"]  # BN running stats are initializers too, not torch parameters


def test_bundled_model_accuracy_on_fashion_mnist() -> None:
    if not fashion_mnist.is_available():
        pytest.skip(f"Fashion-MNIST not installed: apt-get install -y {fashion_mnist.DEBIAN_PACKAGE}")
    images, labels = fashion_mnist.load_fashion_mnist("test")
    images, labels = images[:2000], labels[:2000]
    (logits,) = _session(onnx.load(BUNDLED_ONNX)).run(None, {"image": images})
    top1 = float((logits.argmax(axis=1) == labels).mean())
    assert top1 >= 0.85, top1


def test_fashion_mnist_loader_shapes() -> None:
    if not fashion_mnist.is_available():
        pytest.skip(f"Fashion-MNIST not installed: apt-get install -y {fashion_mnist.DEBIAN_PACKAGE}")
    images, labels = fashion_mnist.load_fashion_mnist("test")
    assert images.shape == (10000, 1, 28, 28) and images.dtype == np.float32
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert images.min() == 0.0 and images.max() == 1.0
    assert set(np.unique(labels)) == set(range(10))


def test_fashion_mnist_loader_names_package_when_missing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ONNXPRUNE_FASHION_MNIST_DIR", str(tmp_path))
    assert not fashion_mnist.is_available()
    with pytest.raises(fashion_mnist.DatasetMissingError, match=fashion_mnist.DEBIAN_PACKAGE):
        fashion_mnist.load_fashion_mnist("train")
    with pytest.raises(ValueError, match="split"):
        fashion_mnist.load_fashion_mnist("valid")  # type: ignore[arg-type]


def test_fashion_mnist_loader_reads_idx(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    classes = np.asarray([7, 0, 9], dtype=np.uint8)
    for prefix in ("train", "t10k"):
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">IIII", 0x803, 3, 28, 28) + pixels.tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">II", 0x801, 3) + classes.tobytes())
    monkeypatch.setenv("ONNXPRUNE_FASHION_MNIST_DIR", str(tmp_path))
    images, labels = fashion_mnist.load_fashion_mnist("train")
    np.testing.assert_array_equal(images[:, 0], pixels.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(labels, classes.astype(np.int64))


# -- development zoo -------------------------------------------------------------------------------
def test_zoo_registry_is_well_formed() -> None:
    assert ZOO, "empty zoo"
    for name, entry in ZOO.items():
        assert entry.name == name
        assert entry.family in {"cnn", "transformer", "ocr"}
        assert entry.requires
    assert {e.family for e in ZOO.values()} == {"cnn", "transformer", "ocr"}


def test_zoo_cache_honours_env_and_rejects_unknown_names(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ONNXPRUNE_MODEL_CACHE", str(tmp_path))
    assert zoo.cache_dir() == tmp_path
    with pytest.raises(zoo.ZooError, match="unknown zoo model"):
        zoo.zoo_model("no_such_model")


def test_zoo_skips_existing_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ONNXPRUNE_MODEL_CACHE", str(tmp_path))
    existing = tmp_path / "resnet18.onnx"
    existing.write_bytes(b"placeholder")
    assert zoo.zoo_model("resnet18") == existing
    assert existing.read_bytes() == b"placeholder"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_builds_and_runs(name: str) -> None:
    missing = [m for m in ZOO[name].requires if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)}: bash models/install_zoo_deps.sh")
    from models.cifar_resnet import DatasetMissing

    try:
        path = zoo.zoo_model(name)
    except DatasetMissing as exc:  # the CIFAR entries need ../shared/datasets
        pytest.skip(str(exc))
    onnx.checker.check_model(str(path))
    assert zoo.check_runs(path)
