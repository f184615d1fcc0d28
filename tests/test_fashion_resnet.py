"""The bundled Fashion-MNIST ResNet (models/fashion_mnist_resnet.onnx): a real trained model whose
residual streams have several writers and several readers (issue 6's accuracy criterion runs on it)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from models import fashion_mnist
from onnxprune.importer import import_model
from onnxprune.passes.unconstrained import UnconstrainedPass
from onnxprune.upscale.config import UnconstrainedConfig
from onnxprune.upscale.oracle import mask_model
from onnxprune.upscale.plan import build_plan
from onnxprune.verify import max_rel_error, random_inputs, run

RESNET = Path(__file__).resolve().parents[1] / "models" / "fashion_mnist_resnet.onnx"
pytestmark = pytest.mark.skipif(not RESNET.is_file(), reason="models/fashion_mnist_resnet.onnx not built")


def test_resnet_is_valid_small_and_residual() -> None:
    assert RESNET.stat().st_size < 3_000_000
    model = onnx.load(RESNET)
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Add") == 6 and ops.count("BatchNormalization") == 15 and "Gemm" in ops
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["logits"]
    meta = json.loads(RESNET.with_suffix(".json").read_text())
    assert meta["arch"] == "resnet" and meta["dataset"] == fashion_mnist.DEBIAN_PACKAGE
    assert 300_000 <= meta["params"] <= 700_000


def test_resnet_reaches_its_recorded_accuracy() -> None:
    if not fashion_mnist.is_available():
        pytest.skip(f"Fashion-MNIST not installed: apt-get install -y {fashion_mnist.DEBIAN_PACKAGE}")
    import onnxruntime as ort

    images, labels = fashion_mnist.load_fashion_mnist("test")
    images, labels = images[:2000], labels[:2000]
    sess = ort.InferenceSession(RESNET.read_bytes(), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {"image": images})
    top1 = float((logits.argmax(axis=1) == labels).mean())
    recorded = json.loads(RESNET.with_suffix(".json").read_text())["test_top1"]
    assert top1 >= recorded - 0.015, (top1, recorded)  # a 2000-image subset of the 10k test set


def test_resnet_streams_have_several_writers_and_readers() -> None:
    """Each stage's stream is written by its stem/shortcut and both blocks, and read by several convs:
    where unconstrained pruning can differ from constrained pruning at all."""
    plan = build_plan(import_model(RESNET), UnconstrainedConfig(ratio=0.3, criterion="l1", drive="writer"))
    streams = []
    for gp in plan.groups:
        units = [pc for pc in gp.pieces if pc.is_unit]
        writers = sum(pc.has_producer for pc in units)
        streams.append((writers, len(units) - writers))
    assert sorted(w for w, r in streams if w >= 3) == [3, 3, 3], streams
    assert all(r >= 2 for w, r in streams if w >= 3), streams


@pytest.mark.parametrize("drive", ["reader", "writer", "free"])
def test_resnet_unconstrained_export_equals_masked_original(drive) -> None:
    model = import_model(RESNET)
    inputs = random_inputs(model, seed=3)
    result = UnconstrainedPass(UnconstrainedConfig(ratio=0.3, criterion="l1", drive=drive)).run(model)
    expected = run(mask_model(model, result.info["plan"]), inputs)
    assert max_rel_error(expected, run(result.model, inputs)) <= 1e-5
    assert max_rel_error(run(model, inputs), expected) > 1e-3  # really pruned
