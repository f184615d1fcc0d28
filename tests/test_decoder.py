"""The generated LLaMA-style decoder (RMSNorm, RoPE, GQA, SwiGLU) with external data: the analysis finds
one MLP group (gate/up/down) and one KV-head group per layer, every group passes dead-channel
equivalence, and pruning end to end through the CLI keeps the output shape and shrinks the model."""

from __future__ import annotations

import json

import onnx
import pytest

from models.decoder import CONFIGS, build_decoder, token_inputs
from onnxprune import external
from onnxprune.channels import analyze
from onnxprune.cli import main
from onnxprune.graph import ModelGraph
from onnxprune.importer import import_model
from onnxprune.verify import dead_channel_check, run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_decoder(CONFIGS["tiny"], tmp_path_factory.mktemp("decoder"))


def _param_sets(group):
    return {(m.tensor, m.axis) for m in group.members if m.is_param}


def test_groups_per_layer(tiny):
    cfg = CONFIGS["tiny"]
    model = import_model(tiny)
    assert external.has_lazy(model)
    analysis = analyze(ModelGraph(model))
    for i in range(cfg.layers):
        p = f"layers.{i}"
        mlp = [g for g in analysis.groups if (f"{p}.mlp.gate_proj.weight", 1) in _param_sets(g)]
        assert len(mlp) == 1
        assert mlp[0].size == cfg.ffn
        assert _param_sets(mlp[0]) == {(f"{p}.mlp.gate_proj.weight", 1), (f"{p}.mlp.up_proj.weight", 1),
                                       (f"{p}.mlp.down_proj.weight", 0)}  # fmt: skip
        kv = [g for g in analysis.groups if (f"{p}.self_attn.k_proj.weight", 1) in _param_sets(g)]
        assert len(kv) == 1
        assert kv[0].size == cfg.kv_heads
        assert _param_sets(kv[0]) == {(f"{p}.self_attn.{n}_proj.weight", 0 if n == "o" else 1) for n in "qkvo"}
        # One KV-head channel carries its key/value head and the query heads that share it.
        per_head = kv[0].params_per_channel[0]
        hd, rep = cfg.head_dim, cfg.heads // cfg.kv_heads
        assert per_head == cfg.hidden * hd * (2 + 2 * rep)
    # plus the residual stream's hidden size: one exact group (RMSNorm keeps its original-width statistics)
    hidden = [g for g in analysis.groups if ("embed_tokens.weight", 1) in _param_sets(g)]
    assert len(hidden) == 1 and hidden[0].size == cfg.hidden and not hidden[0].inexact
    assert len(analysis.groups) == 2 * cfg.layers + 1


def test_every_group_dead_channel_equivalent(tiny):
    model = import_model(tiny)
    analysis = analyze(ModelGraph(model))
    inputs = token_inputs(CONFIGS["tiny"])
    for group in analysis.groups:
        assert dead_channel_check(analysis, group, inputs).error <= 1e-5


def test_cli_prunes_mlp_and_kv_heads(tiny, tmp_path):
    out = tmp_path / "pruned.onnx"
    # exact counts: --round-to 1 (the default, auto, snaps kept counts to the measured latency grid)
    assert main(["prune", str(tiny), "-o", str(out), "--ratio", "0.5", "--round-to", "1", "--json"]) == 0
    assert (tmp_path / "pruned.onnx.data").exists()
    onnx.checker.check_model(str(out), full_check=True)
    pruned = onnx.load(str(out), load_external_data=False)
    summary = json.loads({p.key: p.value for p in pruned.metadata_props}["onnxprune.summary"])
    assert summary["groups_pruned"] == 2 * CONFIGS["tiny"].layers + 1  # + the hidden size
    dims = {t.name: list(t.dims) for t in pruned.graph.initializer}
    cfg = CONFIGS["tiny"]
    assert dims["layers.0.mlp.gate_proj.weight"] == [cfg.hidden // 2, cfg.ffn // 2]  # hidden size halved too
    assert dims["layers.0.self_attn.k_proj.weight"] == [cfg.hidden // 2, cfg.head_dim * cfg.kv_heads // 2]
    assert run(str(out), token_inputs(cfg))[0].shape == (1, cfg.seq, cfg.vocab)
