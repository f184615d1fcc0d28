"""Stream-aware sequential repair of unconstrained plans (`upscale.stream_repair`): row alignment of the
stream correction, writer detection, equality with plain sequential repair where there is no stream, and
exact exports that bring a real model's outputs closer to the original's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import canonical, unconstrained_exact
from onnx import helper, numpy_helper

from models.testmodels import TEST_MODELS
from onnxprune.calibration import CalibrationData, consumers, hessian_rows
from onnxprune.graph import ModelGraph
from onnxprune.passes.unconstrained import UnconstrainedPass
from onnxprune.repair import repair_sequential
from onnxprune.upscale.config import UnconstrainedConfig
from onnxprune.upscale.plan import build_plan
from onnxprune.upscale.repair import plan_removals
from onnxprune.upscale.stream_repair import output_rows, repair_stream, stream_writer
from onnxprune.verify import random_inputs, run


def _conv_model(stride: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((5, 3, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1], strides=[stride, stride])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 9, 9])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [w])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("stride", [1, 2])
def test_output_rows_are_the_positions_hessian_rows_draws(stride):
    """im2col rows times the weight equal the conv output at the rows `output_rows` draws with the same
    generator: the stream correction lines up with the input rows it is regressed on."""
    model = _conv_model(stride)
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 9)).astype(np.float32)
    y = run(model, {"x": x})[0]
    graph = ModelGraph(model)
    (c,) = consumers(graph)
    w = graph.initializer_value("w")
    for per_sample in (7, 10_000):  # drawn positions, then every position
        rows = hessian_rows(x, c, w.shape, per_sample, np.random.default_rng(3))
        out = output_rows(y, per_sample, np.random.default_rng(3))
        assert len(rows) == len(out) == 2 * min(per_sample, y.shape[2] * y.shape[3])
        np.testing.assert_allclose(rows @ c.weight_matrix(w).T, out, rtol=1e-4, atol=1e-4)


def test_writers_are_the_convs_feeding_a_residual_add(fashion):
    model, _, _ = fashion
    graph = ModelGraph(model)
    found = {c.name: stream_writer(graph, c) for c in consumers(graph)}
    writers = {name for name, w in found.items() if w is not None}
    assert writers  # the trained ResNet has residual blocks
    for c in consumers(graph):
        if c.name not in writers:
            continue
        skip, scale = found[c.name]
        bn = graph.consumers[c.node.output[0]][0].node
        assert bn.op_type == "BatchNormalization"
        add = graph.consumers[bn.output[0]][0].node
        assert add.op_type == "Add" and skip in add.input and skip != bn.output[0]
        gamma, var = graph.const(bn.input[1]), graph.const(bn.input[4])
        np.testing.assert_allclose(scale, gamma / np.sqrt(var + 1e-5), rtol=1e-4)


def _chain_calib(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inputs = random_inputs(model, seed=0)
    return {k: np.concatenate([random_inputs(model, seed=i)[k] for i in range(6)]) for k in inputs}


def test_without_a_stream_it_is_sequential_repair():
    """A chain has no residual Add: the stream-aware repair computes what `repair_sequential` does."""
    model = canonical(TEST_MODELS["chain"]())
    calib = _chain_calib(model)
    plan = build_plan(model, UnconstrainedConfig(ratio=0.4, criterion="l2"))
    removals = plan_removals(model, plan)
    assert not any(stream_writer(removals.graph, c) for c in consumers(removals.graph))
    data = CalibrationData(calib)
    ours, _ = repair_stream(removals, data)
    theirs, _ = repair_sequential(removals, np.zeros(1, dtype=np.int64), data)
    a = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in theirs.graph.initializer}
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(b[name]).max())))


def test_stream_repair_is_exact_and_closer_to_the_original(fashion):
    """On the trained ResNet at 40% of channels removed (coupled drive), the stream-aware repair's export
    is exact, and the repaired streams end closer to the original's on the calibration images than with
    writers fitted to their own outputs only."""
    model, calib, held_out = fashion
    adds = [n.output[0] for n in model.graph.node if n.op_type == "Add"]
    streams = {}
    for stream in (False, True):
        config = UnconstrainedConfig(ratio=0.4, criterion="l2", drive="coupled", repair="seq", stream_repair=stream)
        result = UnconstrainedPass(config, calib=calib).run(model)
        unconstrained_exact(model, result, held_out)
        from onnxprune.upscale.oracle import mask_model

        masked = mask_model(model, result.info["plan"])
        streams[stream] = _tensors(masked, adds, calib)
    reference = _tensors(model, adds, calib)
    err = {s: sum(float(np.sum((v[t] - reference[t]) ** 2)) for t in adds) for s, v in streams.items()}
    assert err[True] < 0.95 * err[False], err


def _tensors(model: onnx.ModelProto, names: list[str], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from onnxprune.layer_inputs import truncated

    return dict(zip(names, run(truncated(model, names), inputs)))
