"""BatchNorm folding (`onnxprune.fold`, `FoldBatchNormPass`): folded == original in onnxruntime (optimisations
off), the checker passes, and tensors read inside If branches survive the fold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import verify
from onnxprune.fold import fold_batchnorm
from onnxprune.importer import check_model
from onnxprune.passes.fold import FoldBatchNormPass

FASHION = Path(__file__).resolve().parents[1] / "models" / "fashion_mnist_cnn.onnx"
TOL = 1e-5  # relative to each output's magnitude (fp32)


def _const(rng: np.random.RandomState, name: str, *shape: int, positive: bool = False) -> onnx.TensorProto:
    value = rng.uniform(0.5, 1.5, shape) if positive else rng.randn(*shape) * 0.5
    return numpy_helper.from_array(value.astype(np.float32), name)


def _bn_stats(rng: np.random.RandomState, prefix: str, channels: int) -> list[onnx.TensorProto]:
    return [
        _const(rng, f"{prefix}_s", channels, positive=True), _const(rng, f"{prefix}_b", channels),
        _const(rng, f"{prefix}_m", channels), _const(rng, f"{prefix}_v", channels, positive=True),
    ]  # fmt: skip


def _model(nodes, inits, inputs, outputs, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _x(shape: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)


def _y(name: str, shape: list[int | str] | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def conv_bn_model() -> onnx.ModelProto:
    """Conv(+bias)-BN-Relu, Conv(no bias)-BN with epsilon, and a Conv whose output also feeds an Add (not
    foldable: the BN is not its only reader)."""
    rng = np.random.RandomState(0)
    inits = [
        _const(rng, "w1", 8, 3, 3, 3), _const(rng, "b1", 8), *_bn_stats(rng, "bn1", 8),
        _const(rng, "w2", 8, 8, 1, 1), *_bn_stats(rng, "bn2", 8),
        _const(rng, "w3", 8, 8, 3, 3), *_bn_stats(rng, "bn3", 8),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn1_s", "bn1_b", "bn1_m", "bn1_v"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"]),
        helper.make_node(
            "BatchNormalization", ["c2", "bn2_s", "bn2_b", "bn2_m", "bn2_v"], ["n2"], epsilon=1e-3
        ),
        helper.make_node("Conv", ["n2", "w3"], ["c3"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c3", "bn3_s", "bn3_b", "bn3_m", "bn3_v"], ["n3"]),
        helper.make_node("Add", ["n3", "c3"], ["y"]),
    ]
    return _model(nodes, inits, [_x([1, 3, 10, 10])], [_y("y", [1, 8, 10, 10])], "conv_bn")


def shared_stats_model() -> onnx.ModelProto:
    """Two Conv-BN pairs whose second BN reads the first one's statistics through Identity nodes (torch's
    exporter shares equal tensors that way)."""
    rng = np.random.RandomState(1)
    inits = [_const(rng, "w1", 6, 4, 3, 3), _const(rng, "w2", 6, 6, 3, 3), *_bn_stats(rng, "bn", 6)]
    stats = ["bn_s", "bn_b", "bn_m", "bn_v"]
    nodes = [
        *[helper.make_node("Identity", [s], [f"{s}_shared"]) for s in stats],
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", *stats], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", *[f"{s}_shared" for s in stats]], ["y"]),
    ]
    return _model(nodes, inits, [_x([1, 4, 8, 8])], [_y("y", [1, 6, 8, 8])], "shared_stats")


def if_branch_model() -> onnx.ModelProto:
    """A Conv-BN pair whose BN mean, conv bias and conv weight are also read inside the branches of an If (as
    outer-scope names), plus a Conv-BN pair whose conv output is read inside a branch (not foldable)."""
    rng = np.random.RandomState(2)
    inits = [
        _const(rng, "w1", 4, 2, 3, 3), _const(rng, "b1", 4), *_bn_stats(rng, "bn1", 4),
        _const(rng, "w2", 4, 4, 1, 1), *_bn_stats(rng, "bn2", 4),
    ]  # fmt: skip
    then_branch = helper.make_graph(
        [helper.make_node("Add", ["bn1_m", "b1"], ["t"]),
         helper.make_node("ReduceSum", ["c2"], ["t_c2"], keepdims=0),
         helper.make_node("Add", ["t", "t_c2"], ["then_out"])],
        "then", [], [_y("then_out", [4])],
    )  # fmt: skip
    else_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["axes"], value_ints=[1, 2, 3]),
         helper.make_node("ReduceSum", ["w1", "axes"], ["else_out"], keepdims=0)],
        "else", [], [_y("else_out", [4])],
    )  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn1_s", "bn1_b", "bn1_m", "bn1_v"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"]),
        helper.make_node("BatchNormalization", ["c2", "bn2_s", "bn2_b", "bn2_m", "bn2_v"], ["y"]),
        helper.make_node("If", ["cond"], ["z"], then_branch=then_branch, else_branch=else_branch),
    ]
    inputs = [_x([1, 2, 6, 6]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    return _model(nodes, inits, inputs, [_y("y", [1, 4, 6, 6]), _y("z", [4])], "if_branch")


def assert_same_outputs(original: onnx.ModelProto, folded: onnx.ModelProto, inputs: dict) -> None:
    want, got = verify.run(original, inputs), verify.run(folded, inputs)
    assert verify.max_rel_error(want, got) < TOL


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_conv_bn_folds_and_matches():
    model = conv_bn_model()
    before = model.SerializeToString()
    folded = fold_batchnorm(model)
    assert model.SerializeToString() == before, "fold_batchnorm modified its input"
    assert ops(folded) == ["Conv", "Relu", "Conv", "Conv", "BatchNormalization", "Add"]
    check_model(folded)
    names = {t.name for t in folded.graph.initializer}
    assert not names & {"w1", "b1", "w2", "bn1_s", "bn1_m", "bn2_v"}, "unread initializers left behind"
    assert {"w3", "bn3_s", "bn3_b", "bn3_m", "bn3_v"} <= names
    assert_same_outputs(model, folded, verify.random_inputs(model))


def test_shared_statistics_through_identity_fold_and_are_cleaned_up():
    model = shared_stats_model()
    folded = fold_batchnorm(model)
    assert ops(folded) == ["Conv", "Relu", "Conv"], "Identity nodes left unread must go too"
    assert len(folded.graph.initializer) == 4  # two folded weights + two folded biases
    check_model(folded)
    assert_same_outputs(model, folded, verify.random_inputs(model))


def test_initializers_read_inside_if_branches_survive():
    model = if_branch_model()
    folded = fold_batchnorm(model)
    # conv 1 folds; conv 2's output is read inside the then-branch, so its BN stays
    assert ops(folded) == ["Conv", "Relu", "Conv", "BatchNormalization", "If"]
    assert {"bn1_m", "b1", "w1"} <= {t.name for t in folded.graph.initializer}
    check_model(folded)
    inputs = verify.random_inputs(model)
    for cond in (True, False):
        assert_same_outputs(model, folded, {**inputs, "cond": np.array(cond)})


def test_folded_names_do_not_collide():
    model = conv_bn_model()
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(8, np.float32), "n1__bnfold_w"))
    folded = fold_batchnorm(model)
    names = [t.name for t in folded.graph.initializer]
    assert len(names) == len(set(names))
    assert_same_outputs(model, folded, verify.random_inputs(model))


def test_nothing_to_fold_returns_the_model_itself():
    model = conv_bn_model()
    for bn in (n for n in model.graph.node if n.op_type == "BatchNormalization"):
        bn.attribute.append(helper.make_attribute("training_mode", 1))
        del bn.output[1:]
    assert fold_batchnorm(model) is model


def test_pass_reports_modified_once():
    model = conv_bn_model()
    first = FoldBatchNormPass().run(model)
    assert first.modified and first.info == {"folded_batchnorms": 2}
    second = FoldBatchNormPass().run(first.model)
    assert not second.modified and second.model is first.model
    assert second.info == {"folded_batchnorms": 0}


@pytest.mark.skipif(not FASHION.is_file(), reason="models/fashion_mnist_cnn.onnx not built")
def test_fashion_mnist_folds_every_batchnorm():
    model = onnx.load(FASHION)
    folded = fold_batchnorm(model)
    assert "BatchNormalization" not in ops(folded) and ops(folded).count("Conv") == 7
    check_model(folded)
    x = {"image": np.random.RandomState(0).randn(2, 1, 28, 28).astype(np.float32)}
    assert_same_outputs(model, folded, x)
