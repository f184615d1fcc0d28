"""Whole-block removal on the generated decoder: every attention and MLP sub-block is found, the pass
drops the block whose removal changes outputs least (checked by brute force), the result runs, and a
block made nearly inert is the one chosen."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxprune.passes.block_removal import (
    BlockRemovalConfig,
    BlockRemovalPass,
    _relative_change,
    find_blocks,
    remove_block,
)  # fmt: skip

from models.decoder import CONFIGS, build_decoder, token_inputs
from onnxprune.external import materialize
from onnxprune.graph import ModelGraph
from onnxprune.importer import check_model, import_model
from onnxprune.metrics import count_params
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
