"""Channel analysis through control flow: `If` branches are analysed like inlined code (`onnxprune.subgraphs`).

Hand-built models, canonicalised as the CLI does, checked in onnxruntime with optimisations off: every group,
half its channels removed (`rewrite.apply_plan`) vs silenced (`rewrite.apply_mask`), gives the same outputs
for both values of the condition; the pruned model passes the checker; a ratio-0 plan reproduces the model.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import canonical
from onnx import TensorProto, helper, numpy_helper

from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.importer import check_model
from onnxprune.rewrite import apply_plan
from onnxprune.shape_inference import infer_shapes
from onnxprune.verify import dead_channel_check, run

RNG = np.random.default_rng(0)
X_SHAPE = [1, 3, 6, 6]


def _w(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _branch(tag: str, outer_weights: bool, hidden: int = 8, out: int = 6) -> tuple[onnx.GraphProto, list]:
    """conv(3->hidden) -> relu -> conv3x3(hidden->out) on the outer input x; weights in the branch or outside."""
    weights = [_w(f"{tag}_w1", hidden, 3, 1, 1), _w(f"{tag}_b1", hidden), _w(f"{tag}_w2", out, hidden, 3, 3)]
    nodes = [
        helper.make_node("Conv", ["x", f"{tag}_w1", f"{tag}_b1"], [f"{tag}_h"], name=f"{tag}_conv1"),
        helper.make_node("Relu", [f"{tag}_h"], [f"{tag}_r"], name=f"{tag}_relu"),
        helper.make_node("Conv", [f"{tag}_r", f"{tag}_w2"], [f"{tag}_y"], name=f"{tag}_conv2", pads=[1, 1, 1, 1]),
    ]
    y = helper.make_tensor_value_info(f"{tag}_y", TensorProto.FLOAT, [1, out, 6, 6])
    graph = helper.make_graph(nodes, f"{tag}_branch", [], [y], initializer=[] if outer_weights else weights)
    return graph, (weights if outer_weights else [])


def if_model(outer_weights: bool = False) -> onnx.ModelProto:
    then, then_outer = _branch("then", outer_weights)
    other, else_outer = _branch("else", outer_weights)
    nodes = [
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other),
        helper.make_node("Relu", ["y"], ["yr"], name="relu_out"),
        helper.make_node("Conv", ["yr", "w_out"], ["z"], name="conv_out"),
    ]
    graph = helper.make_graph(
        nodes, "if_model",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, X_SHAPE)],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 6, 6])],
        initializer=[_w("w_out", 4, 6, 1, 1), *then_outer, *else_outer],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return canonical(model)


def loop_model(inner_weight: bool = False) -> onnx.ModelProto:
    """A Loop carrying a tensor through a conv of its body and scanning the conv's relu; the body's weight is
    read from the outer scope or lives in the body."""
    w_loop = _w("w_loop", 8, 8, 3, 3)
    body_nodes = [
        helper.make_node("Identity", ["c_in"], ["c_out"], name="loop_cond"),
        helper.make_node("Conv", ["s_in", "w_loop"], ["s_out"], name="loop_conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["s_out"], ["scan_out"], name="loop_relu"),
    ]
    body = helper.make_graph(
        body_nodes, "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [1, 8, 6, 6]),
         helper.make_tensor_value_info("scan_out", TensorProto.FLOAT, [1, 8, 6, 6])],
        initializer=[w_loop] if inner_weight else [],
    )  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w_in"], ["h"], name="conv_in"),
        helper.make_node("Loop", ["trip", "keep", "h"], ["s", "scans"], name="loop", body=body),
        helper.make_node("ReduceMean", ["scans", "axis0"], ["scan_mean"], name="scan_mean", keepdims=0),
        helper.make_node("Add", ["s", "scan_mean"], ["sum"], name="add"),
        helper.make_node("Conv", ["sum", "w_out"], ["z"], name="conv_out"),
    ]
    graph = helper.make_graph(
        nodes, "loop_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, X_SHAPE)],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 6, 6])],
        initializer=[_w("w_in", 8, 3, 1, 1), _w("w_out", 4, 8, 1, 1), *([] if inner_weight else [w_loop]),
                     numpy_helper.from_array(np.array(2, dtype=np.int64), "trip"),
                     numpy_helper.from_array(np.array(True), "keep"),
                     numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return canonical(model)


def scan_model() -> onnx.ModelProto:
    """A Scan over the rows of a conv's output (axis 2): each row through a 1-D conv, summed into a state,
    the rows stacked back along axis 2; the body's weight lives in the body."""
    body = helper.make_graph(
        [helper.make_node("Conv", ["row", "w_scan"], ["row_h"], name="scan_conv"),
         helper.make_node("Relu", ["row_h"], ["row_y"], name="scan_relu"),
         helper.make_node("Add", ["acc_in", "row_y"], ["acc_out"], name="scan_add")],
        "scan_body",
        [helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1, 6, 6]),
         helper.make_tensor_value_info("row", TensorProto.FLOAT, [1, 8, 6])],
        [helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1, 6, 6]),
         helper.make_tensor_value_info("row_y", TensorProto.FLOAT, [1, 6, 6])],
        initializer=[_w("w_scan", 6, 8, 1)],
    )  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w_in"], ["h"], name="conv_in"),
        helper.make_node("Scan", ["acc0", "h"], ["acc", "rows"], name="scan", body=body, num_scan_inputs=1,
                         scan_input_axes=[2], scan_output_axes=[2]),
        helper.make_node("Conv", ["rows", "w_out"], ["z"], name="conv_out"),
        helper.make_node("Unsqueeze", ["acc", "axis2"], ["acc4"], name="acc_unsqueeze"),
        helper.make_node("Conv", ["acc4", "w_acc"], ["za"], name="conv_acc"),
    ]
    graph = helper.make_graph(
        nodes, "scan_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, X_SHAPE)],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 6, 6]),
         helper.make_tensor_value_info("za", TensorProto.FLOAT, [1, 4, 1, 6])],
        initializer=[_w("w_in", 8, 3, 1, 1), _w("w_out", 4, 6, 1, 1), _w("w_acc", 4, 6, 1, 1),
                     numpy_helper.from_array(np.zeros((1, 6, 6), np.float32), "acc0"),
                     numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return canonical(model)


def _inputs(cond: bool) -> dict[str, np.ndarray]:
    return {"cond": np.array(cond), "x": np.random.default_rng(1).standard_normal(X_SHAPE).astype(np.float32)}


@pytest.mark.parametrize("outer_weights", [False, True], ids=["branch weights", "outer weights"])
def test_if_groups_descend_into_branches(outer_weights: bool):
    analysis = analyze(ModelGraph(if_model(outer_weights)))
    assert not analysis.barriers, analysis.barriers
    members = sorted(sorted(str(m) for m in g.param_members) for g in analysis.groups)
    assert members == [
        ["else_b1[axis 0]", "else_w1[axis 0]", "else_w2[axis 1]"],
        ["else_w2[axis 0]", "then_w2[axis 0]", "w_out[axis 1]"],  # the If output: both branches' last convs
        ["then_b1[axis 0]", "then_w1[axis 0]", "then_w2[axis 1]"],
    ]


@pytest.mark.parametrize("outer_weights", [False, True], ids=["branch weights", "outer weights"])
@pytest.mark.parametrize("cond", [True, False], ids=["then", "else"])
def test_if_dead_channel_equivalence(outer_weights: bool, cond: bool):
    analysis = analyze(ModelGraph(if_model(outer_weights)))
    for group in analysis.groups:
        result = dead_channel_check(analysis, group, _inputs(cond))
        assert result.error <= 1e-5, f"group {group.id} {[str(m) for m in group.members]}: {result.error}"


def test_if_prunes_half_of_every_group_and_runs():
    model = if_model()
    analysis = analyze(ModelGraph(model))
    labels = np.concatenate([g.labels[: g.size // 2] for g in analysis.groups])
    pruned = infer_shapes(apply_plan(analysis, labels))
    check_model(pruned)
    branches = {a.name: a.g for a in next(n for n in pruned.graph.node if n.op_type == "If").attribute}
    shapes = {t.name: list(t.dims) for b in branches.values() for t in b.initializer}
    assert shapes["then_w2"] == [3, 4, 3, 3] and shapes["else_w1"] == [4, 3, 1, 1]
    assert [d.dim_value for d in branches["then_branch"].output[0].type.tensor_type.shape.dim] == [1, 3, 6, 6]
    for cond in (True, False):
        assert run(pruned, _inputs(cond))[0].shape == (1, 4, 6, 6)


def test_ratio_zero_reproduces_the_model():
    model = if_model()
    analysis = analyze(ModelGraph(model))
    pruned = infer_shapes(apply_plan(analysis, np.zeros(0, dtype=np.int64)))
    check_model(pruned)
    for cond in (True, False):
        np.testing.assert_array_equal(run(pruned, _inputs(cond))[0], run(model, _inputs(cond))[0])


def test_nested_if():
    """An If inside a branch: its branches' weights are pruned and its output is coupled through both levels."""
    inner_then, _ = _branch("in_then", False)
    inner_else, _ = _branch("in_else", False)
    then = helper.make_graph(
        [helper.make_node("If", ["cond"], ["nested_y"], name="inner_if", then_branch=inner_then, else_branch=inner_else),
         helper.make_node("Relu", ["nested_y"], ["then_y"], name="then_relu")],
        "then_branch", [], [helper.make_tensor_value_info("then_y", TensorProto.FLOAT, [1, 6, 6, 6])],
    )  # fmt: skip
    other, _ = _branch("else", False)
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other),
         helper.make_node("Conv", ["y", "w_out"], ["z"], name="conv_out")],
        "nested", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                   helper.make_tensor_value_info("x", TensorProto.FLOAT, X_SHAPE)],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 6, 6])], initializer=[_w("w_out", 4, 6, 1, 1)],
    )  # fmt: skip
    model = canonical(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    analysis = analyze(ModelGraph(model))
    assert not analysis.barriers, analysis.barriers
    out = next(g for g in analysis.groups if any(m.tensor == "w_out" for m in g.members))
    assert {m.tensor for m in out.param_members} == {"w_out", "in_then_w2", "in_else_w2", "else_w2"}
    assert len(analysis.groups) == 4
    for cond in (True, False):
        for group in analysis.groups:
            assert dead_channel_check(analysis, group, _inputs(cond)).error <= 1e-5


def test_if_with_identical_branches_stays_a_barrier():
    model = if_model()
    node = model.graph.node[0]
    then = next(a.g for a in node.attribute if a.name == "then_branch")
    next(a for a in node.attribute if a.name == "else_branch").g.CopyFrom(then)
    analysis = analyze(ModelGraph(model))
    assert [(b.op_type, b.reason) for b in analysis.barriers] == [
        ("If", "If branches define value names another scope defines too")
    ]
    assert all("then_" not in str(m) for g in analysis.groups for m in g.members)


@pytest.mark.parametrize("inner_weight", [False, True], ids=["outer weight", "body weight"])
def test_loop_carried_channels_are_one_channel(inner_weight: bool):
    """The carried tensor's channels: conv_in's outputs, the body conv's inputs and outputs, the scanned
    relu's, conv_out's inputs; pruned at 0.5, the model passes the checker and keeps its output shape."""
    model = loop_model(inner_weight)
    analysis = analyze(ModelGraph(model))
    assert not analysis.barriers, analysis.barriers
    members = [sorted(str(m) for m in g.param_members) for g in analysis.groups]
    assert members == [["w_in[axis 0]", "w_loop[axis 0]", "w_loop[axis 1]", "w_out[axis 1]"]]
    inputs = {"x": _inputs(True)["x"]}
    for group in analysis.groups:
        assert dead_channel_check(analysis, group, inputs).error <= 1e-5
    pruned = infer_shapes(apply_plan(analysis, analysis.groups[0].labels[:4]))
    check_model(pruned)
    body = next(n for n in pruned.graph.node if n.op_type == "Loop").attribute[0].g
    assert [d.dim_value for d in body.input[2].type.tensor_type.shape.dim] == [1, 4, 6, 6]
    assert run(pruned, inputs)[0].shape == (1, 4, 6, 6)


def test_scan_slices_and_stacks_channels():
    """The scanned conv's inputs are conv_in's outputs; its outputs are the stacked rows', the state's and
    both consumers' inputs."""
    model = scan_model()
    analysis = analyze(ModelGraph(model))
    assert not analysis.barriers, analysis.barriers
    members = sorted(sorted(str(m) for m in g.param_members) for g in analysis.groups)
    assert members == [
        ["acc0[axis 1]", "w_acc[axis 1]", "w_out[axis 1]", "w_scan[axis 0]"],
        ["w_in[axis 0]", "w_scan[axis 1]"],
    ]
    inputs = {"x": _inputs(True)["x"]}
    for group in analysis.groups:
        assert dead_channel_check(analysis, group, inputs).error <= 1e-5


def test_weight_read_inside_a_body_is_not_repaired_and_scalar_inputs_run():
    """A conv weight the main graph and an If branch both read must keep its values under calibrated repair
    (new values would change the branch too); a rank-0 condition input gets a real array from random_inputs."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from onnxprune.calibration import consumers
    from onnxprune.graph import ModelGraph
    from onnxprune.verify import random_inputs, run

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w")
    branch = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["b_out"])], "then",
                               [], [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e_out"])], "else",
                              [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"]),
         helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=other),
         helper.make_node("Add", ["y", "z"], ["out"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [w],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert consumers(ModelGraph(model)) == []
    feeds = random_inputs(model)
    assert isinstance(feeds["cond"], np.ndarray) and feeds["cond"].shape == ()
    assert run(model, feeds)[0].shape == (1, 4, 3, 3)


def test_params_and_macs_count_weights_inside_branches():
    """Sizes in the summary include the layers that live in If branches (equal in both weight layouts)."""
    from onnxprune.metrics import count_macs, count_params, node_macs

    inner, outer = ModelGraph(if_model(False)), ModelGraph(if_model(True))
    assert count_params(inner) == count_params(outer) > 0
    assert count_macs(inner) == count_macs(outer)
    main_only = sum(int(np.prod(t.dims)) for t in inner.model.graph.initializer if t.data_type == 1)
    assert count_params(inner) > main_only  # the branch weights are counted
    assert count_macs(inner) > sum(node_macs(inner, n) for n in inner.nodes)  # and the branch convs' MACs


def test_branch_arithmetic_on_outer_constants_is_folded():
    """A branch that Slices with axes Unsqueezed from an outer-scope constant (torchvision's batched NMS inside its
    ``If``): canonicalisation folds the Unsqueeze inside the branch, so the Slice reads constant axes and is no
    barrier ("slice axes computed at run time"); the channels of x pass through it and prune exactly."""
    axis = numpy_helper.from_array(np.array(2, np.int64), "outer_axis")  # a main-graph constant
    then = helper.make_graph(
        [helper.make_node("Unsqueeze", ["outer_axis", "zero_axis"], ["slice_axes"], name="fold_me"),
         helper.make_node("Slice", ["h", "starts", "ends", "slice_axes"], ["t_y"], name="branch_slice")],
        "then", [], [helper.make_tensor_value_info("t_y", TensorProto.FLOAT, [1, 8, 3, 6])],
        [numpy_helper.from_array(np.array([0], np.int64), n) for n in ("zero_axis", "starts")]
        + [numpy_helper.from_array(np.array([3], np.int64), "ends")])
    other = helper.make_graph(
        [helper.make_node("Slice", ["h", "starts2", "ends2", "axes2"], ["e_y"], name="else_slice")],
        "else", [], [helper.make_tensor_value_info("e_y", TensorProto.FLOAT, [1, 8, 3, 6])],
        [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("starts2", 3), ("ends2", 6), ("axes2", 2))])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1"),
         helper.make_node("If", ["cond"], ["u"], name="branch", then_branch=then, else_branch=other),
         helper.make_node("Conv", ["u", "w2"], ["y"], name="conv2")],
        "outer_constant", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [1]),
                           helper.make_tensor_value_info("x", TensorProto.FLOAT, X_SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3, 6])], [axis, _w("w1", 8, 3, 1, 1), _w("w2", 4, 8, 1, 1)])
    model = canonical(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    analysis = analyze(ModelGraph(model))
    assert analysis.barriers == []
    (group,) = analysis.groups
    assert group.size == 8
    for cond in (True, False):
        inputs = {"cond": np.array([cond]), "x": RNG.standard_normal(X_SHAPE).astype(np.float32)}
        assert dead_channel_check(analysis, group, inputs).error <= 1e-5
