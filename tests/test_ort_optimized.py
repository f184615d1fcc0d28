"""Models run through onnxruntime's transformer optimizer (as many published "optimized" models are): its contrib
ops (`onnxprune/rules/contrib.py`: SkipLayerNormalization, Gelu / FastGelu / BiasGelu) pass channels, so the
optimised BERT and GPT-2 prune as their plain exports do."""

from __future__ import annotations

import pytest

from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.importer import check_model, import_model
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.rewrite import apply_mask
from onnxprune.verify import dead_channel_check, max_rel_error, random_inputs, run

zoo = pytest.importorskip("models.zoo")
optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")


@pytest.mark.parametrize(("name", "kind", "level"), [("bert_tiny", "bert", 1), ("bert_tiny", "bert", 2),
                                                      ("gpt2_tiny", "gpt2", 2)])  # fmt: skip
def test_optimized_transformer_prunes_as_its_plain_export(name, kind, level, tmp_path):
    try:
        plain_path = zoo.zoo_model(name)
    except zoo.ZooError as exc:
        pytest.skip(str(exc))
    optimized = optimizer.optimize_model(str(plain_path), model_type=kind, num_heads=4, hidden_size=128,
                                         opt_level=level)  # fmt: skip
    optimized.save_model_to_file(str(tmp_path / "opt.onnx"))
    model, plain = import_model(tmp_path / "opt.onnx"), import_model(plain_path)
    contrib = {n.op_type for n in model.graph.node if n.domain == "com.microsoft"}
    assert "SkipLayerNormalization" in contrib and contrib & {"Gelu", "FastGelu", "BiasGelu"}
    analysis = analyze(ModelGraph(model))
    assert not analysis.barriers, analysis.barriers
    # the heads and the MLP channels; not the hidden size: a SkipLayerNormalization's statistics are not rewritten
    # (inexact, --allow-inexact), where the plain GPT-2's LayerNorms keep their original width (exact)
    plain_sizes = [g.size for g in analyze(ModelGraph(plain)).groups if g.size != 128]
    assert sorted(g.size for g in analysis.groups) == sorted(plain_sizes)
    inputs = random_inputs(model, seed=3)
    for group in analysis.groups:
        assert dead_channel_check(analysis, group, inputs).error <= 1e-5
    result = PrunePass(PruneConfig(ratio=0.5, round_to=1)).run(model)
    check_model(result.model)
    masked = apply_mask(analysis, result.info["plan"].labels(analysis))
    assert max_rel_error(run(masked, inputs), run(result.model, inputs)) <= 1e-5
