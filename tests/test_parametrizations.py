"""Weight norm computed in the graph (``W = g * v / ||v||``) is folded at import: pruning a channel then removes
that channel and leaves every kept channel's weight as it was (wav2vec2's positional convolution normalises
over the output channels: without the fold, removing half of them scaled the rest by ~sqrt(2))."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.importer import import_model
from onnxprune.parametrizations import fold_parametrizations
from onnxprune.rewrite import apply_plan
from onnxprune.verify import max_rel_error, random_inputs, run

C = 8


def _weight_norm_model(norm_axes: list[int], tied_v: bool = False) -> onnx.ModelProto:
    """x[1, 4, 10] -> Conv1d(W = g * v / ReduceL2(v, norm_axes)) -> Relu -> Conv1d(W2) -> y. ``norm_axes`` [1, 2]
    is torch's default weight norm (one norm per output channel), [0, 1] wav2vec2's (one per kernel tap, over
    every channel). `tied_v`: v is also read by another layer (then it must not be folded into a copy)."""
    rng = np.random.default_rng(0)
    v = rng.standard_normal((C, 4, 3)).astype(np.float32)
    g_shape = [C, 1, 1] if norm_axes == [1, 2] else [1, 1, 3]
    inits = [
        numpy_helper.from_array(v, "v"),
        numpy_helper.from_array(rng.uniform(0.5, 2, g_shape).astype(np.float32), "g"),
        numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((5, C, 1)).astype(np.float32), "W2"),
    ]
    nodes = [
        helper.make_node("ReduceL2", ["v"], ["norm"], axes=norm_axes, keepdims=1),
        helper.make_node("Div", ["v", "norm"], ["direction"]),
        helper.make_node("Mul", ["direction", "g"], ["W"]),
        helper.make_node("Conv", ["x", "W", "b"], ["h"], pads=[1, 1]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "W2"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 10])]
    if tied_v:
        nodes.append(helper.make_node("Conv", ["x", "v"], ["y2"], pads=[1, 1]))
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, C, 10]))
    graph = helper.make_graph(nodes, "weight_norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 10])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("norm_axes", [[1, 2], [0, 1]], ids=["per-channel", "across-channels"])
def test_weight_norm_folds_and_prunes_as_a_plain_weight(norm_axes, tmp_path):
    original = _weight_norm_model(norm_axes)
    onnx.save(original, tmp_path / "m.onnx")
    model = import_model(tmp_path / "m.onnx")
    assert not [n for n in model.graph.node if n.op_type in ("ReduceL2", "Div", "Mul")]
    assert {t.name for t in model.graph.initializer} == {"W", "b", "W2"}  # v and g are gone, W is stored
    inputs = random_inputs(original, seed=1)
    assert max_rel_error(run(original, inputs), run(model, inputs)) <= 1e-6

    analysis = analyze(ModelGraph(model))
    (group,) = analysis.groups
    removed = group.labels[[1, 4, 6]]
    pruned = apply_plan(analysis, removed)
    # The oracle: the original with those channels' outputs unread (their columns of W2 zeroed): the kept
    # channels are as they were, whatever the norm runs over.
    silenced = onnx.ModelProto()
    silenced.CopyFrom(original)
    w2 = next(t for t in silenced.graph.initializer if t.name == "W2")
    value = numpy_helper.to_array(w2).copy()
    value[:, [1, 4, 6]] = 0
    w2.CopyFrom(numpy_helper.from_array(value, "W2"))
    assert max_rel_error(run(silenced, inputs), run(pruned, inputs)) <= 1e-5


def test_tied_or_growing_parametrizations_stay():
    """A v also read elsewhere would be stored twice: not folded. A Cast of fp16 weights to fp32 would double
    them: not folded either."""
    tied = _weight_norm_model([0, 1], tied_v=True)
    assert not fold_parametrizations(tied.graph)
    assert [n.op_type for n in tied.graph.node][:3] == ["ReduceL2", "Div", "Mul"]

    half = numpy_helper.from_array(np.ones((64, 64), np.float16), "w16")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["w16"], ["w32"], to=TensorProto.FLOAT), helper.make_node("Mul", ["w32", "s"], ["w"]),
         helper.make_node("MatMul", ["x", "w"], ["y"])],
        "cast", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [half, numpy_helper.from_array(np.float32(2.0), "s")])
    assert not fold_parametrizations(graph)
