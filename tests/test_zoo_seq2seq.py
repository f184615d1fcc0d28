"""Encoder-decoder transformers (cross-attention) from tiny transformers configs: T5, BART, Whisper.

Each is exported as the full forward pass (encoder inputs + ``decoder_input_ids`` -> decoder logits) by
`models/zoo_seq2seq.py`. The analysis must find, per layer, the self-attention heads, the cross-attention heads
and the FFN channels, and the hidden sizes coupled with everything reading them: cross-attention K/V
projections read the *encoder* output, so their input axis is the encoder's hidden size while their heads are
the decoder layer's. T5 adds its relative position bias to every layer's scores from one tensor per stack, so a
stack's self-attention heads are one group. The slow tier's `test_zoo_all` (tests/test_zoo_pruning.py) checks
dead-channel equivalence on every group of every entry.
"""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import onnx
import pytest

from onnxprune.channels import ChannelAnalysis, ChannelGroup, analyze
from onnxprune.errors import UnsupportedModelError
from onnxprune.graph import ModelGraph
from onnxprune.importer import check_model, import_model
from onnxprune.metrics import count_params
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.rewrite import apply_mask
from onnxprune.synthetic_tokens import token_samples, token_spec
from onnxprune.verify import dead_channel_check, max_rel_error, random_inputs, run

zoo = pytest.importorskip("models.zoo")

FAST = ["t5_tiny", "bart_tiny", "whisper_tiny"]

# Groups by kind (a regression guard: a rule change that freezes a family shows here). Two layers per stack.
EXPECT_KINDS = {
    # one self-attention group per stack: both layers add the stack's one relative position bias tensor
    "t5_tiny": {"hidden": 1, "self-attention heads": 2, "cross-attention heads": 2, "ffn": 4},
    "t5_v11_tiny": {"hidden": 1, "self-attention heads": 2, "cross-attention heads": 2, "ffn": 4},
    "bart_tiny": {"hidden": 1, "self-attention heads": 4, "cross-attention heads": 2, "ffn": 4},
    # the encoder's and the decoder's hidden sizes are separate (no shared embedding); conv1's output channels
    "whisper_tiny": {"conv": 1, "hidden": 2, "self-attention heads": 4, "cross-attention heads": 2, "ffn": 4},
}
EXPECT_KINDS["whisper_tiny_dynamo"] = EXPECT_KINDS["whisper_tiny"]
EXPECT_KINDS["bart_tiny_dynseq"] = EXPECT_KINDS["bart_tiny"]
# the cross-attention's zero position bias is one run-time ConstantOfShape read by both decoder layers
EXPECT_KINDS["t5_tiny_dynseq"] = {**EXPECT_KINDS["t5_tiny"], "cross-attention heads": 1}

_CROSS = ("EncDecAttention", "encoder_attn")


def _model(name: str) -> onnx.ModelProto:
    try:
        path = zoo.zoo_model(name)
    except zoo.ZooError as exc:
        pytest.skip(str(exc))
    return import_model(path)


@functools.cache
def _analysed(name: str) -> tuple[onnx.ModelProto, ChannelAnalysis]:
    model = _model(name)
    return model, analyze(ModelGraph(model))


def _kind(group: ChannelGroup) -> str:
    """hidden (d_model = 128), heads (4), ffn (256); conv: Whisper's conv1 output channels (only conv weights)."""
    names = [m.tensor for m in group.param_members]
    if group.size == 4:
        return "cross-attention heads" if any(c in n for n in names for c in _CROSS) else "self-attention heads"
    if group.size == 256:
        return "ffn"
    if group.size == 128:
        return "conv" if all("conv" in n for n in names) else "hidden"
    return f"unexpected size {group.size}"


def _weight(model: onnx.ModelProto, node_suffix: str) -> str:
    """The weight (input 1) of the one MatMul whose name ends with `node_suffix`."""
    (node,) = [n for n in model.graph.node if n.op_type == "MatMul" and n.name.endswith(node_suffix)]
    return node.input[1]


def _group_of(analysis: ChannelAnalysis, tensor: str, axis: int) -> ChannelGroup | None:
    return next((g for g in analysis.groups if any((m.tensor, m.axis) == (tensor, axis) for m in g.members)), None)


@pytest.mark.parametrize("name", FAST)
def test_groups_per_layer_and_kind(name):
    """Per layer: self-attention heads, cross-attention heads, FFN channels; the hidden sizes; no barrier, nothing
    inexact, and the only frozen weight axes are gathered vocabularies and Whisper's mel input / kernel taps."""
    _, analysis = _analysed(name)
    assert analysis.barriers == []
    assert dict(Counter(_kind(g) for g in analysis.groups)) == EXPECT_KINDS[name]
    assert not any(g.inexact for g in analysis.groups)
    reasons = {row["reason"] for row in analysis.frozen_weights()}
    assert reasons <= {"gathered axis", "not a channel axis of Conv", "graph input/output"}, reasons


@pytest.mark.parametrize("name", FAST)
def test_dead_channel_equivalence_per_kind(name):
    """One group of each kind: half its channels silenced in the original equals them removed."""
    model, analysis = _analysed(name)
    inputs = random_inputs(model, seed=3)
    first: dict[str, ChannelGroup] = {}
    for group in analysis.groups:
        first.setdefault(_kind(group), group)
    for kind, group in first.items():
        assert dead_channel_check(analysis, group, inputs).error <= 1e-5, f"{name} {kind} group {group.id}"


def test_cross_attention_reads_the_encoder_hidden_size():
    """Whisper's cross-attention K/V projections read the encoder output: their input axis is in the encoder's
    hidden group (with conv2's output channels), the query's in the decoder's (with the token embedding); K, V and
    Q output axes are the decoder layer's cross-attention heads, not the encoder's."""
    model, analysis = _analysed("whisper_tiny")
    encoder = _group_of(analysis, "inner.model.encoder.conv2.weight", 0)
    decoder = _group_of(analysis, "inner.model.decoder.embed_tokens.weight", 1)
    assert encoder is not None and decoder is not None and encoder is not decoder
    for layer in (0, 1):
        attn = f"/decoder/layers.{layer}/encoder_attn"
        k, v, q = (_weight(model, f"{attn}/{p}_proj/MatMul") for p in "kvq")
        assert _group_of(analysis, k, 0) is encoder and _group_of(analysis, v, 0) is encoder
        assert _group_of(analysis, q, 0) is decoder
        heads = _group_of(analysis, q, 1)
        assert heads is not None and heads.size == 4
        assert _group_of(analysis, k, 1) is heads and _group_of(analysis, v, 1) is heads
        assert _group_of(analysis, _weight(model, f"{attn}/out_proj/MatMul"), 0) is heads
        assert _group_of(analysis, _weight(model, f"/encoder/layers.{layer}/self_attn/q_proj/MatMul"), 1) is not heads


def test_t5_position_bias_follows_the_heads_and_the_embedding_stays_tied():
    """T5: the relative position bias ([1, heads, q, k], computed once per stack and added to both layers' scores)
    is sliced with the heads, so a stack's self-attention heads are one group spanning both layers; the embedding
    read by the encoder, the decoder and the (d_model ** -0.5 scaled) lm_head stays one parameter after a prune."""
    model, analysis = _analysed("t5_tiny")
    for stack, length in (("encoder", 16), ("decoder", 8)):
        group = _group_of(analysis, _weight(model, f"/{stack}/block.0/layer.0/SelfAttention/q/MatMul"), 1)
        assert group is not None
        assert _group_of(analysis, _weight(model, f"/{stack}/block.1/layer.0/SelfAttention/q/MatMul"), 1) is group
        bias = [m for m in group.param_members if tuple(ModelGraph(model).shape(m.tensor)) == (1, 4, length, length)]
        assert len(bias) == 1 and bias[0].axis == 1
    readers = [n.op_type for n in model.graph.node if "inner.shared.weight" in n.input]
    assert sorted(readers) == ["Gather", "Gather", "Transpose"]  # encoder, decoder, lm_head
    pruned = PrunePass(PruneConfig(ratio=0.5)).run(model).model
    tables = {t.name: tuple(t.dims) for t in pruned.graph.initializer if t.dims and t.dims[0] == 1000}
    assert tables == {"inner.shared.weight": (1000, 64)}  # one table, its hidden axis halved


@pytest.mark.parametrize("name", FAST)
def test_ratio_zero_is_the_original_and_a_prune_runs(name):
    """Ratio 0 gives the original outputs bit for bit; at 0.4 the pruned model runs in onnxruntime with the same
    output shapes, fewer parameters, and equals the original with the removed channels silenced."""
    model, analysis = _analysed(name)
    inputs = random_inputs(model, seed=5)
    reference = run(model, inputs)
    same = PrunePass(PruneConfig(ratio=0.0)).run(model).model
    assert all(np.array_equal(a, b) for a, b in zip(reference, run(same, inputs)))
    result = PrunePass(PruneConfig(ratio=0.4)).run(model)
    check_model(result.model)
    out = run(result.model, inputs)
    assert [o.shape for o in out] == [o.shape for o in reference] == [(1, 8, 1000)]
    assert count_params(ModelGraph(result.model)) < 0.6 * count_params(ModelGraph(model))
    masked = apply_mask(analysis, result.info["plan"].labels(analysis))
    assert max_rel_error(run(masked, inputs), out) <= 1e-5


@pytest.mark.parametrize("name", ["t5_tiny", "bart_tiny"])
def test_synthetic_tokens_draw_decoder_ids_of_their_own(name):
    """`--calib synthetic` on a text seq2seq: input_ids are the ids, the mask ones, decoder_input_ids another
    sequence over the same vocabulary at its own length (8, not the source's 16)."""
    model, _ = _analysed(name)
    spec = token_spec(model)
    assert spec is not None and spec.ids == "input_ids"
    assert spec.roles == {"input_ids": "ids", "attention_mask": "ones", "decoder_input_ids": "more_ids"}
    samples = token_samples(spec, 3)
    assert samples["input_ids"].shape == (3, 16) and samples["decoder_input_ids"].shape == (3, 8)
    assert not np.array_equal(samples["input_ids"][:, :8], samples["decoder_input_ids"])


def test_synthetic_tokens_refuse_speech_features_by_name():
    """Whisper reads mel features (float) beside its decoder ids: the synthetic path cannot make them and says
    which input to supply (`--calib FILE.npz`), in one line."""
    model, _ = _analysed("whisper_tiny")
    with pytest.raises(UnsupportedModelError, match=r"input 'input_features'.*--calib FILE\.npz"):
        token_spec(model)


# ---- slow tier --------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["t5_v11_tiny", "whisper_tiny_dynamo", "t5_tiny_dynseq", "bart_tiny_dynseq"])
def test_variants_find_the_same_groups(name):
    """T5 v1.1 (gated-GELU: wi_0, wi_1 and wo in each FFN group), Whisper through the torch.export-based exporter,
    T5 and BART with dynamic lengths: the groups by kind, no barrier."""
    _, analysis = _analysed(name)
    assert analysis.barriers == []
    assert dict(Counter(_kind(g) for g in analysis.groups)) == EXPECT_KINDS[name]
    if name == "t5_v11_tiny":
        assert all(len(g.param_members) == 3 for g in analysis.groups if _kind(g) == "ffn")


@pytest.mark.parametrize("name", [pytest.param("t5_tiny_dynseq", marks=pytest.mark.slow), "bart_tiny_dynseq"])
def test_dynamic_lengths_prune_and_take_any_length(name):
    """Pruned at 0.4 with symbolic lengths, the model still takes any source and target length and equals the
    masked original at each (BART's hidden size was frozen here: its encoder reads the length off a Gather of the
    last hidden channel, `rules.shape.Gather`)."""
    model, analysis = _analysed(name)
    result = PrunePass(PruneConfig(ratio=0.4)).run(model)
    masked = apply_mask(analysis, result.info["plan"].labels(analysis))
    for src, tgt in ((7, 3), (20, 11)):
        inputs = random_inputs(model, seed=src, dims={"src": src, "tgt": tgt})
        got = run(result.model, inputs)
        assert got[0].shape == (1, tgt, 1000)
        assert max_rel_error(run(masked, inputs), got) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["t5_tiny", "bart_tiny"])
def test_cli_with_synthetic_calibration_and_sequential_repair(name, tmp_path, capsys):
    """As a user runs it: ``onnxprune MODEL --ratio 0.3 --calib synthetic:8 --criterion obs --repair seq``; the
    certificate (pruned vs masked original on the calibration inputs) passes, and only the lm_head (it reads the
    tied embedding) is left unrepaired."""
    import json

    from onnxprune.cli import main

    try:
        src = zoo.zoo_model(name)
    except zoo.ZooError as exc:
        pytest.skip(str(exc))
    args = ["prune", str(src), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.3", "--round-to", "1", "--calib",
            "synthetic:8", "--criterion", "obs", "--repair", "seq", "--verify", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verification"]["passed"] and report["verification"]["exact_max_error"] <= 1e-5
    assert list(report["repair"]["skipped"]) == ["/inner/lm_head/MatMul"]
