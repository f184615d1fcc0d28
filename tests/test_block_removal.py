"""Whole-block removal on the generated decoder: every attention and MLP sub-block is found, the pass
drops the block whose removal changes outputs least (checked by brute force), the result runs, and a
block made nearly inert is the one chosen."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models.decoder import CONFIGS, build_decoder, token_inputs
from onnxprune.external import materialize
from onnxprune.graph import ModelGraph
from onnxprune.importer import check_model, import_model
from onnxprune.metrics import count_params
from onnxprune.passes.block_removal import (
    BlockRemovalConfig,
    BlockRemovalPass,
    _relative_change,
    find_blocks,
    remove_block,
)  # fmt: skip
from onnxprune.verify import run

CFG = CONFIGS["tiny"]


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return materialize(import_model(build_decoder(CFG, tmp_path_factory.mktemp("dec"))))


def _feeds():
    return [token_inputs(CFG, seed) for seed in range(3)]


def test_finds_attention_and_mlp_blocks(decoder):
    blocks = find_blocks(decoder)
    assert len(blocks) == 2 * CFG.layers
    graph = ModelGraph(decoder)
    weights = [{i for n in graph.nodes if n.name in b.nodes for i in n.input if i.endswith("_proj.weight")} for b in blocks]
    for i in range(CFG.layers):
        assert {f"layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"} in weights
        assert {f"layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")} in weights


def test_removes_the_least_important_block(decoder):
    feeds = _feeds()
    blocks = find_blocks(decoder)
    reference = [run(decoder, f) for f in feeds]
    brute = [np.mean([_relative_change(r, run(remove_block(decoder, b), f)) for r, f in zip(reference, feeds)])
             for b in blocks]  # fmt: skip
    result = BlockRemovalPass(BlockRemovalConfig(num_blocks=1), inputs=feeds).run(decoder)
    assert result.modified
    assert result.info["removed"][0]["add"] == blocks[int(np.argmin(brute))].add
    pruned = result.model
    check_model(pruned)
    assert len(find_blocks(pruned)) == len(blocks) - 1
    assert count_params(ModelGraph(pruned)) == count_params(ModelGraph(decoder)) - result.info["removed"][0]["params"]
    got = np.mean([_relative_change(r, run(pruned, f)) for r, f in zip(reference, feeds)])
    assert got == pytest.approx(min(brute), rel=1e-6)
    record = json.loads({p.key: p.value for p in pruned.metadata_props}["onnxprune.block_removal"])
    assert record["removed"][0]["add"] == result.info["removed"][0]["add"]


@pytest.mark.parametrize("metric", ["output", "influence"])
def test_nearly_inert_block_is_chosen(decoder, metric):
    model = onnx.ModelProto()
    model.CopyFrom(decoder)
    target = "layers.1.mlp.down_proj.weight"
    for t in model.graph.initializer:
        if t.name == target:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1e-4), t.name))
    blocks = {b.add: b for b in find_blocks(model)}
    graph = ModelGraph(model)
    inert = next(b for b in blocks.values() if any(target in n.input for n in graph.nodes if n.name in b.nodes))
    result = BlockRemovalPass(BlockRemovalConfig(num_blocks=2, metric=metric), inputs=_feeds()).run(model)
    assert result.info["removed"][0]["add"] == inert.add
    assert len(result.info["removed"]) == 2
    assert run(result.model, _feeds()[0])[0].shape == (1, CFG.seq, CFG.vocab)


def test_zero_blocks_is_a_no_op(decoder):
    result = BlockRemovalPass(BlockRemovalConfig(num_blocks=0)).run(decoder)
    assert result.modified is False and result.model is decoder


# ---- which Adds are blocks: small graphs built by hand ---------------------------------------------------
def _residual(extra_nodes=(), branch_input="h", extra_inputs=(), extra_outputs=()):
    """x -> Relu -> a; branch h = Relu(Mul(a, w)), b = Mul(<branch_input>, w2); out = Add(a, b)."""
    from onnx import TensorProto, helper

    def info(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4])

    w = numpy_helper.from_array(np.full((1, 4), 0.5, np.float32), "w")
    w2 = numpy_helper.from_array(np.full((1, 4), 2.0, np.float32), "w2")
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="pre"),
        helper.make_node("Mul", ["a", "w"], ["m"], name="mul"),
        helper.make_node("Relu", ["m"], ["h"], name="act"),
        helper.make_node("Mul", [branch_input, "w2"], ["b"], name="mul2"),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
        *extra_nodes,
    ]
    inputs = [info("x")] + [info(n) for n in extra_inputs]
    graph = helper.make_graph(nodes, "g", inputs, [info("y")] + [info(n) for n in extra_outputs], [w, w2])
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_self_contained_branch_is_a_block():
    (block,) = find_blocks(_residual())
    assert (block.add, block.skip, block.nodes, block.params) == ("add", "a", ("mul", "act", "mul2"), 8)


def test_branch_reading_a_second_graph_input_is_not_a_block():
    from onnx import helper

    mix = helper.make_node("Add", ["h", "z"], ["hz"], name="mix")
    assert find_blocks(_residual([mix], branch_input="hz", extra_inputs=["z"])) == []


def test_branch_with_an_outside_consumer_is_not_a_block():
    from onnx import helper

    tap = helper.make_node("Sigmoid", ["h"], ["side"], name="tap")
    assert find_blocks(_residual([tap], extra_outputs=["side"])) == []
    assert find_blocks(_residual(extra_outputs=["h"])) == []  # a branch tensor that is a graph output


def test_branch_read_inside_an_outside_subgraph_is_not_a_block():
    from onnx import TensorProto, helper

    then = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["t"])], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4])]
    )  # fmt: skip
    cond = numpy_helper.from_array(np.array(True), "cond")
    branch = helper.make_node("If", ["cond"], ["side"], name="if", then_branch=then, else_branch=then)
    model = _residual([branch], extra_outputs=["side"])
    model.graph.initializer.append(cond)
    assert find_blocks(model) == []


def test_empty_node_names_do_not_confuse_the_branch():
    model = _residual()
    for node in model.graph.node:
        node.name = ""
    (block,) = find_blocks(model)
    assert block.skip == "a" and len(block.nodes) == 3
