"""Exports at opset 23: fused ``Attention``, ``RMSNormalization`` and ``RotaryEmbedding`` ops prune as their
decompositions do.

torch.onnx's exporter at ``opset_version=23`` writes ``F.scaled_dot_product_attention`` as one ``Attention`` node,
RMSNorm as ``RMSNormalization`` and (dynamic sequence length) the rotary embedding as ``RotaryEmbedding``. Before
their rules every head behind them was frozen (a barrier per layer) and the hidden size was inexact. Each zoo
model here has a twin exported at opset 17 by the TorchScript exporter (the same seeded weights, decomposed ops):
the analysis must find the same groups, every group must be dead-channel equivalent, and the calibrated repair
must give the twins the same pruned function.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.importer import check_model, import_model
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.repair import RepairReport
from onnxprune.rewrite import apply_mask
from onnxprune.verify import dead_channel_check, max_rel_error, random_inputs, run

zoo = pytest.importorskip("models.zoo")

TWINS = {  # opset 23 export -> (its opset 17 twin, the fused ops it holds)
    "llama_tiny_opset23": ("llama_tiny", {"Attention", "RMSNormalization"}),
    "llama_tiny_opset23_dynseq": ("llama_tiny_dynseq", {"Attention", "RMSNormalization", "RotaryEmbedding"}),
    "bert_tiny_opset23": ("bert_tiny", {"Attention"}),
    "vit_tiny_16_opset23": ("vit_tiny_16", {"Attention"}),
}
FUSED = {"Attention", "RMSNormalization", "RotaryEmbedding"}


def _model(name: str):
    try:
        return import_model(zoo.zoo_model(name))
    except zoo.ZooError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("name", sorted(TWINS))
def test_fused_ops_find_the_groups_of_the_decomposed_export(name):
    fused, twin = _model(name), _model(TWINS[name][0])
    assert {n.op_type for n in fused.graph.node} & FUSED == TWINS[name][1]
    a, b = analyze(ModelGraph(fused)), analyze(ModelGraph(twin))
    assert not [x for x in a.barriers if x.op_type in FUSED], a.barriers
    assert sorted(g.size for g in a.groups) == sorted(g.size for g in b.groups)
    assert sorted(g.size for g in a.groups if g.inexact) == sorted(g.size for g in b.groups if g.inexact) == []
    heads = {3} if "vit" in name else {2} if "llama" in name else {4}
    assert heads <= {g.size for g in a.groups}  # the attention heads (LLaMA: its 2 KV heads, each with 2 q heads)
    inputs = random_inputs(fused, seed=3)
    for group in a.groups:
        error = dead_channel_check(a, group, inputs).error
        assert error <= 1e-5, f"{name} group {group.id} ({group.size}): {error}"


def test_rotary_embedding_and_rms_norm_are_in_the_dynamic_export():
    """The dynamic-length LLaMA is the one whose rotary embedding the exporter fuses: the heads and the hidden
    size (normalised by RMSNormalization) prune, and the pruned model takes any length."""
    model = _model("llama_tiny_opset23_dynseq")
    assert {"Attention", "RMSNormalization", "RotaryEmbedding"} <= {n.op_type for n in model.graph.node}
    analysis = analyze(ModelGraph(model))
    result = PrunePass(PruneConfig(ratio=0.5)).run(model)
    check_model(result.model)
    plan = result.info["plan"]
    sizes = {g.id: g.size for g in analysis.groups}
    assert {sizes[g] for g, removed in plan.removed.items() if len(removed)} >= {2, 128, 344}
    masked = apply_mask(analysis, plan.labels(analysis))
    pruned_ops = {n.op_type for n in result.model.graph.node}
    assert {"Attention", "RMSNormalization", "RotaryEmbedding"} <= pruned_ops  # still fused, smaller
    seq = model.graph.input[0].type.tensor_type.shape.dim[1].dim_param  # the exporter's name ("s70")
    assert seq
    for length in (5, 11):
        inputs = random_inputs(model, seed=length, dims={seq: length})
        got, expected = run(result.model, inputs), run(masked, inputs)
        assert got[0].shape[1] == length
        assert max_rel_error(expected, got) <= 1e-5


def test_calibrated_repair_prunes_the_twins_alike():
    """obs + seq on the same token samples: the opset 23 LLaMA and its opset 17 twin get the same plan and, after
    the repair, the same function (the fused ops change nothing the scores or the least squares see)."""
    fused, twin = _model("llama_tiny_opset23"), _model("llama_tiny")
    rng = np.random.default_rng(0)
    calib = {"input_ids": rng.integers(0, 1000, (16, 16)).astype(np.int64)}
    config = PruneConfig(ratio=0.5, criterion="obs", repair="seq", round_to=1)
    results = [PrunePass(config, calib=calib).run(m) for m in (fused, twin)]
    plans = [r.info["plan"] for r in results]
    sizes = [sorted(len(v) for v in p.removed.values()) for p in plans]
    assert sizes[0] == sizes[1] and sum(sizes[0]) > 0
    reports = [r.get(RepairReport) for r in results]
    assert reports[0].repaired and len(reports[0].repaired) == len(reports[1].repaired)
    held_out = {"input_ids": rng.integers(0, 1000, (1, 16)).astype(np.int64)}
    dense = run(fused, held_out)[0]
    a, b = run(results[0].model, held_out)[0], run(results[1].model, held_out)[0]
    assert np.abs(a - b).max() <= 1e-3 * np.abs(dense).max()
    unrepaired = PrunePass(PruneConfig(ratio=0.5, criterion="obs", round_to=1), calib=calib).run(fused).model
    assert np.abs(a - run(unrepaired, held_out)[0]).max() > 0.1 * np.abs(dense).max()  # the repair changed weights
