"""Shared helpers of the TVM target tests: reference runs, tolerances, small models, tool checks."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT / "models" / "fashion_mnist_cnn.onnx"
HAVE_TVM = importlib.util.find_spec("tvm") is not None
needs_tvm = pytest.mark.skipif(not HAVE_TVM, reason="apache-tvm not installed (bash .ci/install-tvm.sh)")
RTOL = 1e-4


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def ort_reference(model_path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime outputs with every graph optimisation off."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


def assert_matches(outputs: dict[str, np.ndarray], reference: list[np.ndarray]) -> None:
    """Every output equals the reference within RTOL relative to the output's magnitude."""
    assert len(outputs) == len(reference)
    for (name, got), ref in zip(outputs.items(), reference):
        assert got.shape == ref.shape, name
        assert got.dtype == ref.dtype, name
        scale = float(np.max(np.abs(ref))) or 1.0
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=RTOL * scale, err_msg=name)


def tiny_cnn(path: Path, *, dynamic_batch: bool = False, summary: dict | None = None) -> Path:
    """Conv-BN-ReLU, depthwise conv, max-pool, global pool, Gemm: the kernels the CPU rules schedule."""
    rng = np.random.RandomState(0)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.randn(*shape) * 0.3).astype(np.float32), name)

    inits = [
        init("w1", 16, 3, 3, 3), init("b1", 16),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 16).astype(np.float32), "bn_s"),
        init("bn_b", 16), init("bn_m", 16),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 16).astype(np.float32), "bn_v"),
        init("wd", 16, 1, 3, 3), init("w2", 24, 16, 1, 1), init("wf", 10, 24), init("bf", 10),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r1"]),
        helper.make_node("Conv", ["r1", "wd"], ["dw"], pads=[1, 1, 1, 1], group=16, strides=[2, 2]),
        helper.make_node("Conv", ["dw", "w2"], ["c2"]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["mp"], ["gp"]),
        helper.make_node("Flatten", ["gp"], ["fl"]),
        helper.make_node("Gemm", ["fl", "wf", "bf"], ["y"], transB=1),
    ]
    batch: str | int = "N" if dynamic_batch else 1
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 20, 20])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if summary is not None:
        helper.set_model_props(model, {"onnxprune.summary": json.dumps(summary)})
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def random_inputs(manifest: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    return {i["name"]: rng.randn(*i["shape"]).astype(i["dtype"]) for i in manifest["inputs"]}


def compile_and_check(model: Path, target: str, out: Path, shapes=None, tune: int = 0) -> dict:
    from onnxprune.targets import compile_bundle, read_manifest, run_bundle

    bundle = compile_bundle(model, target, out, shapes=shapes, tune=tune)
    manifest = read_manifest(bundle)
    assert manifest["unscheduled_kernels"] == [], "kernels left as naive loop nests"
    inputs = random_inputs(manifest)
    outputs = run_bundle(bundle, inputs)
    assert_matches(outputs, ort_reference(model, inputs))
    return manifest


def skip_unless_tools(*programs: str, package_hint: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed ({package_hint})")


# ------------------------------------------------------------------------------------------------
# no tvm needed
# ------------------------------------------------------------------------------------------------


def save_graph(path: Path, nodes, inits, name: str, x_shape: list[int], y_shape: list[int]) -> Path:
    """A one-input ("x") one-output ("y") float model, checked and saved."""
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def winograd_cnn(path: Path) -> Path:
    """3x3 stride-1 convs the Winograd kernels take: maps that are not whole tiles (15x15 in F(4,3) tiles, 7x7
    in F(2,3) tiles), asymmetric and zero padding, pruned-looking channel counts (37 in, 21 out: padded to
    whole vectors then sliced), with bias + ReLU + residual add fused into the output transform."""
    rng = np.random.RandomState(2)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.randn(*shape) * 0.2).astype(np.float32), name)

    inits = [
        init("w0", 37, 3, 1, 1), init("w1", 32, 37, 3, 3), init("b1", 32), init("w2", 32, 32, 3, 3),
        init("w3", 21, 32, 3, 3), init("b3", 21), init("w4", 48, 21, 3, 3),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"]),  # 15x15x37
        helper.make_node("Conv", ["c0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),  # 15x15x32, F(4,3)
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a2"]),  # residual add in the epilogue
        helper.make_node("Relu", ["a2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),  # 7x7
        helper.make_node("Conv", ["p2", "w3", "b3"], ["c3"], pads=[0, 1, 2, 1]),  # 7x7x21, F(2,3)
        helper.make_node("Conv", ["c3", "w4"], ["y"]),  # no padding: 5x5x48
    ]
    return save_graph(path, nodes, inits, "winograd", [1, 3, 15, 15], [1, 48, 5, 5])
