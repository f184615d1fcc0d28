"""Walks over a model's protos: every value name (`onnx_utils.value_names`), every tensor
(`external.all_tensors`), and the rewrite's fresh names, which must not collide with any of them."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import canonical
from onnx import TensorProto, helper, numpy_helper

from onnxprune.channels import analyze
from onnxprune.external import all_tensors
from onnxprune.graph import ModelGraph
from onnxprune.importer import check_model
from onnxprune.onnx_utils import all_graphs, value_names
from onnxprune.rewrite import apply_plan
from onnxprune.shape_inference import infer_shapes
from onnxprune.verify import dead_channel_check, random_inputs


def _model_with_subgraph_and_attribute_tensors() -> onnx.ModelProto:
    inner_const = helper.make_node("Constant", [], ["inner_c"], value=numpy_helper.from_array(np.ones(2, np.float32), "ic"))
    branch = helper.make_graph(
        [inner_const, helper.make_node("Add", ["x", "inner_c"], ["branch_out"])], "branch", [],
        [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.zeros(2, np.float32), "branch_init")],
    )  # fmt: skip
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([5.0], np.float32), "sparse_values"),
        numpy_helper.from_array(np.array([1], np.int64), "sparse_indices"), [2],
    )  # fmt: skip
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(2, np.float32), "main_attr")),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array(True), "cond")], sparse_initializer=[sparse],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_value_names_cover_subgraphs_and_every_kind_of_name():
    model = _model_with_subgraph_and_attribute_tensors()
    assert len(list(all_graphs(model.graph))) == 3  # main, then_branch, else_branch
    assert {"x", "y", "c", "cond", "inner_c", "branch_out", "branch_init", "sparse_values"} <= value_names(model.graph)


def test_all_tensors_walks_subgraphs_attributes_and_sparse_initializers():
    from onnx.external_data_helper import _get_all_tensors  # the private walk all_tensors replaces

    model = _model_with_subgraph_and_attribute_tensors()
    names = [t.name for t in all_tensors(model)]
    assert {"cond", "branch_init", "main_attr", "ic", "sparse_values", "sparse_indices"} <= set(names)
    dense = [n for n in names if not n.startswith("sparse_")]
    assert dense == [t.name for t in _get_all_tensors(model)]  # same tensors, same order


def test_fresh_names_never_collide_with_any_value():
    """The rewritten Reshape target needs a new constant; `shape_pruned` is already an activation's name
    and `shape_pruned1` a graph input's, so the constant must be called something else."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.array([1, 36], np.int64), "shape"),
        numpy_helper.from_array(rng.standard_normal((36, 2)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["t"]),
        helper.make_node("Relu", ["t"], ["shape_pruned"]),
        helper.make_node("Reshape", ["shape_pruned", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w2"], ["y"]),
        helper.make_node("Add", ["y", "shape_pruned1"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes, "names",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 3, 3]),
         helper.make_tensor_value_info("shape_pruned1", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2])], inits,
    )  # fmt: skip
    model = canonical(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    analysis = analyze(ModelGraph(model))
    (group,) = analysis.groups
    pruned = apply_plan(analysis, group.labels[:2])
    target = next(n for n in pruned.graph.node if n.op_type == "Reshape").input[1]
    assert target not in value_names(model.graph)
    check_model(infer_shapes(pruned))  # single static assignment holds
    assert dead_channel_check(analysis, group, random_inputs(model)).error <= 1e-5
