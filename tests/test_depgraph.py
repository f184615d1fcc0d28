"""The dependency graph: `ModelGraph.nx` and its queries on awkward node names, and the annotated export
(`depgraph.write_graph`) loading back as GraphML and JSON with groups on the right tensors and barriers on
the ops without a rule."""

from __future__ import annotations

import json

import networkx as nx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.testmodels import TEST_MODELS
from onnxprune.channels import analyze
from onnxprune.depgraph import dependency_graph, write_graph
from onnxprune.errors import UsageError
from onnxprune.graph import ModelGraph
from onnxprune.importer import canonicalize
from onnxprune.passes.block_removal import find_blocks


@pytest.fixture(scope="module")
def residual():
    """The ResNet-like test model (identity and projection skips), canonicalised as the CLI does."""
    return analyze(ModelGraph(canonicalize(TEST_MODELS["residual"]())[0]))


def _conv_lrn_conv():
    """Conv -> LRN (no channel rule: a barrier) -> Conv; two nodes share a name, one has none."""

    def weight(name, shape):
        return numpy_helper.from_array(
            np.random.default_rng(0).standard_normal(shape).astype(np.float32), name
        )

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="same", pads=[1, 1, 1, 1]),
        helper.make_node("LRN", ["c1"], ["s"], name="", size=3),
        helper.make_node("Conv", ["s", "w2"], ["c2"], name="same", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["y"], name=""),
    ]
    inits = [
        weight("w1", (8, 3, 3, 3)),
        weight("w2", (4, 8, 3, 3)),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits,
    )  # fmt: skip
    return onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )


# ---- ModelGraph.nx and its queries ---------------------------------------------------------------------
def test_nx_keys_ops_by_index_when_names_are_empty_or_duplicated():
    graph = ModelGraph(_conv_lrn_conv())
    ops = {key: data for key, data in graph.nx.nodes(data=True) if data["kind"] == "op"}
    assert sorted(ops) == [("op", k) for k in range(4)]
    assert [ops["op", k]["name"] for k in range(4)] == ["same", "", "same", ""]
    assert [n.op_type for n in graph.topological_nodes()] == ["Conv", "LRN", "Conv", "Relu"]
    assert graph.op(("op", 2)) is graph.nodes[2]
    assert graph.nx.nodes["tensor", "w2"] == {
        "kind": "tensor", "name": "w2", "shape": (4, 8, 3, 3), "dtype": TensorProto.FLOAT,
        "initializer": True, "graph_input": False, "graph_output": False,
    }  # fmt: skip
    assert graph.nx.edges[("tensor", "s"), ("op", 2)]["slots"] == (0,)


def test_nx_holds_no_tensor_data(residual):
    allowed = (str, int, bool, tuple, type(None))
    graph = residual.graph.nx
    assert all(isinstance(v, allowed) for _, d in graph.nodes(data=True) for v in d.values())


def test_reachability_and_dominance(residual):
    graph = residual.graph
    assert ("tensor", graph.graph_outputs[0]) in graph.reachable_from("input")
    weight = next(name for name, role in residual.roles.items() if role == "weight")
    assert ("tensor", weight) in graph.ancestors(graph.graph_outputs[0])
    assert graph.dominates("input", graph.graph_outputs[0])
    assert not graph.dominates(weight, graph.graph_outputs[0])  # a constant never dominates
    assert not graph.dominates("input", weight)  # nor is dominated
    for block in find_blocks(graph.model):
        add = next(n for n in graph.nodes if n.name == block.add)
        branch = next(i for i in add.input if i != block.skip)
        assert graph.dominates(block.skip, branch)
        assert not graph.dominates(branch, block.skip)
        assert ("tensor", block.skip) in graph.ancestors(branch, stop=[block.skip])
        assert not any(
            key[0] == "tensor" and key[1] == "input" for key in graph.ancestors(branch, stop=[block.skip])
        )


def test_second_input_breaks_dominance():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Mul", ["a", "z"], ["b"])]
    graph = ModelGraph(
        helper.make_model(helper.make_graph(nodes, "g", [x, z], [helper.make_tensor_value_info("b", 1, [2])]))
    )
    assert graph.dominates("x", "a") and not graph.dominates("a", "b") and not graph.dominates("z", "b")


# ---- the annotated graph and its export ----------------------------------------------------------------
def test_groups_are_on_their_tensors(residual):
    deps = dependency_graph(residual)
    assert deps.graph["groups"] and len(deps.graph["groups"]) == len(residual.groups)
    for group in residual.groups:
        for m in group.members:
            data = deps.nodes["tensor", m.tensor]
            assert f"{group.id}:axis{m.axis}" in data["groups"].split(";")
            assert {"group": group.id, "axis": m.axis, "positions": len(m.positions)} in data["group_axes"]
    assert deps.nodes["tensor", "input"]["groups"] == ""
    assert "graph input/output" in deps.nodes["tensor", "input"]["frozen"]
    assert "groups" not in residual.graph.nx.nodes["tensor", "input"]  # the cached graph is not annotated


@pytest.mark.parametrize("suffix", [".graphml", ".json"])
def test_export_loads_back(residual, tmp_path, suffix):
    deps = dependency_graph(residual)
    path = write_graph(residual, tmp_path / f"deps{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"deps{suffix}"]  # no temporary file left
    if suffix == ".graphml":
        loaded = nx.read_graphml(path)
        groups = json.loads(loaded.graph["groups"])
    else:
        data = json.loads(path.read_text())
        loaded = nx.node_link_graph(data, edges="edges")
        groups = data["groups"]
        member = residual.groups[0].members[0]
        axes = loaded.nodes[f"tensor:{member.tensor}"]["group_axes"]
        assert {"group": 0, "axis": member.axis, "positions": len(member.positions)} in axes
    assert (loaded.number_of_nodes(), loaded.number_of_edges()) == (
        deps.number_of_nodes(),
        deps.number_of_edges(),
    )
    assert [g["id"] for g in groups] == [g.id for g in residual.groups]
    assert [g["params"] for g in groups] == [g.params for g in residual.groups]
    for group in residual.groups:
        for m in group.members:
            assert f"{group.id}:axis{m.axis}" in loaded.nodes[f"tensor:{m.tensor}"]["groups"].split(";")
    assert loaded.nodes["tensor:input"]["groups"] == ""
    assert loaded.nodes["tensor:input"]["graph_input"] is True


@pytest.mark.parametrize("suffix", [".graphml", ".json"])
def test_barrier_on_the_op_without_a_rule(tmp_path, suffix):
    analysis = analyze(ModelGraph(_conv_lrn_conv()))
    assert [b.op_type for b in analysis.barriers] == ["LRN"]
    path = write_graph(analysis, tmp_path / f"deps{suffix}")
    loaded = (
        nx.read_graphml(path)
        if suffix == ".graphml"
        else nx.node_link_graph(json.loads(path.read_text()), edges="edges")
    )
    barriers = {key: data["barrier"] for key, data in loaded.nodes(data=True) if "barrier" in data}
    assert list(barriers) == ["op:1"]
    assert "no channel rule for LRN" in barriers["op:1"]


def test_export_replaces_an_existing_file(residual, tmp_path):
    path = tmp_path / "deps.json"
    path.write_text("old")
    write_graph(residual, path)
    assert json.loads(path.read_text())["groups"]
    assert [p.name for p in tmp_path.iterdir()] == ["deps.json"]


@pytest.mark.parametrize("name", ["deps.dot", "deps", "deps.graphml.gz"])
def test_unknown_suffix_is_a_usage_error(residual, tmp_path, name):
    with pytest.raises(UsageError, match=r"\.graphml or \.json") as info:
        write_graph(residual, tmp_path / name)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_graph_queries_import_networkx_on_demand():
    """`onnxprune.graph` defers `import networkx` (start-up time); every query must still work."""
    import subprocess
    import sys

    code = (
        "import sys; from models.testmodels import TEST_MODELS; from onnxprune.graph import ModelGraph\n"
        "g = ModelGraph(TEST_MODELS['concat']())\n"
        "assert 'networkx' not in sys.modules\n"
        "assert g.has_cycle() is False and g.topological_nodes()\n"
        "t = g.graph_inputs[0]; assert g.reachable_from(t) and g.immediate_dominators\n"
    )
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
