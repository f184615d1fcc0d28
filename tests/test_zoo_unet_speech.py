"""Diffusion U-Nets (diffusers) and speech encoders with a conv front end (wav2vec2, HuBERT), exported from tiny
configs by `models/zoo_diffusion.py` and `models/zoo_speech.py`.

What they bring that the rest of the zoo lacks: GroupNorm exported as Reshape-InstanceNormalization-Reshape (a norm
group of channels is one removable unit), a timestep MLP added to every ResNet block as a per-channel bias, skip
Concats feeding GroupNorms, cross-attention, and a grouped positional Conv1d under weight norm whose output reaches
the encoder's LayerNorms through a Slice. The fast tier checks one U-Net and one speech encoder on sampled groups;
the slow tier checks every group of all four.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.importer import canonicalize, check_model, import_model
from onnxprune.metrics import count_params
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.rewrite import apply_mask
from onnxprune.verify import dead_channel_check, max_rel_error, random_inputs, run

zoo = pytest.importorskip("models.zoo")

# Sorted group sizes the analysis finds: a regression guard (a rule that starts freezing GroupNorm groups, the
# timestep MLP or the speech hidden size changes them). U-Net groups of 8/4/2/5 are GroupNorm groups of channels.
EXPECT_GROUPS = {
    "unet2d_tiny": [2, 2, 4, 4, 4, 4, 4, 4, 4, 4, 4, 5, *[8] * 13, 16, 64, 128, 128],
    "unet2d_cond_tiny": [2, 4, 4, 5, 5, *[8] * 17, 16, 32, 32, 32, 64, 64, 128, 128, 128, 128, 128, 256],
    "wav2vec2_ctc_tiny": [4, 4, 4, *[32] * 7, 128, 128],
    "hubert_ctc_tiny": [4, 4, 4, *[32] * 7, 128, 128],
}


def _model(name: str) -> onnx.ModelProto:
    """The zoo model, canonicalised; skips only when an optional package is missing (a failed export fails)."""
    missing = zoo._missing_modules(zoo.ZOO[name])
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)}: bash models/install_zoo_deps.sh")
    return import_model(zoo.zoo_model(name))


def _check(name: str, max_groups: int | None, ratios: tuple[float, ...]) -> None:
    """Group counts, dead-channel equivalence on (sampled) groups, ratio 0 reproduces the original, and each of
    `ratios` prunes to a smaller model that runs with the original's output shapes and equals the masked original."""
    model = _model(name)
    analysis = analyze(ModelGraph(model))
    assert sorted(g.size for g in analysis.groups) == EXPECT_GROUPS[name]
    assert not analysis.barriers and not any(g.inexact for g in analysis.groups)
    inputs = random_inputs(model, seed=3)
    groups = analysis.groups
    if max_groups is not None and len(groups) > max_groups:
        rng = np.random.default_rng(0)
        groups = [groups[i] for i in sorted(rng.choice(len(groups), max_groups, replace=False))]
    for group in groups:
        error = dead_channel_check(analysis, group, inputs).error
        assert error <= 1e-5, f"{name} group {group.id} {[str(m) for m in group.param_members][:4]}: {error}"
    reference = run(model, inputs)
    same = PrunePass(PruneConfig(ratio=0.0)).run(model).model
    assert count_params(ModelGraph(same)) == count_params(ModelGraph(model))
    assert max_rel_error(reference, run(same, inputs)) == 0.0
    for ratio in ratios:
        result = PrunePass(PruneConfig(ratio=ratio, round_to=1)).run(model)
        check_model(result.model)
        assert count_params(ModelGraph(result.model)) < (1 - ratio / 2) * count_params(ModelGraph(model))
        out = run(result.model, inputs)
        assert [o.shape for o in out] == [o.shape for o in reference]
        masked = apply_mask(analysis, result.info["plan"].labels(analysis))
        assert max_rel_error(run(masked, inputs), out) <= 1e-5


@pytest.mark.parametrize("name", ["unet2d_tiny", "wav2vec2_ctc_tiny"])
def test_zoo_unet_speech_sampled(name):
    _check(name, max_groups=4, ratios=(0.4,))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECT_GROUPS))
def test_zoo_unet_speech_every_group(name):
    _check(name, max_groups=None, ratios=(0.3, 0.5))


def test_unet_groupnorm_group_is_one_channel_with_its_timestep_bias():
    """torch's GroupNorm(8, 32) (Reshape [N, 8, -1], InstanceNormalization, Reshape back, Mul, Add): a group of 4
    channels is one channel of the analysis, coupled with the InstanceNormalization's per-group constants and the
    timestep MLP's rows added to those channels; silencing half the groups changes the output, and removing them
    matches the silenced original. Before the regrouping reshapes were coupled (`rules/reshape.py`), every
    GroupNorm froze its channels: 8 groups, reach 0.23 at --ratio 0.5 (now 29 groups, reach 1.45)."""
    model = _model("unet2d_tiny")
    analysis = analyze(ModelGraph(model))
    group = next(g for g in analysis.groups
                 if any(m.tensor == "unet.down_blocks.0.resnets.0.conv1.weight" and m.axis == 0 for m in g.members))
    members = {m.tensor: m for m in group.param_members}
    conv = members["unet.down_blocks.0.resnets.0.conv1.weight"]
    assert group.size == 8 and np.array_equal(np.bincount(conv.channel_of), [4] * 8)
    assert np.array_equal(conv.channel_of, np.arange(32) // 4)  # whole norm groups, in order
    assert "unet.down_blocks.0.resnets.0.time_emb_proj.weight" in members  # the timestep bias, per channel
    norm_scale = next(m for name, m in members.items() if "norm2" in name and len(m.positions) == 8)
    assert np.array_equal(norm_scale.channel_of, np.arange(8))  # one InstanceNormalization position per group
    inputs = random_inputs(model, seed=1)
    assert dead_channel_check(analysis, group, inputs).error <= 1e-5
    silenced = apply_mask(analysis, group.labels[:4])
    assert max_rel_error(run(model, inputs), run(silenced, inputs)) > 1e-3  # the check compares something


def test_speech_hidden_size_is_exact_through_the_positional_conv():
    """wav2vec2's hidden size: one exact group of 4 units (the positional conv's groups, 16 channels each), holding
    the positional conv's weight (its weight norm ``g * v / ||v||`` folded at import: `onnxprune.parametrizations`)
    and every LayerNorm's scale. It was inexact (kept by default): the positional conv's output reaches the
    LayerNorm through a Slice that drops the last frame, which `onnxprune.statistics` did not see through."""
    model = _model("wav2vec2_ctc_tiny")
    assert not [n for n in model.graph.node if n.op_type == "ReduceL2"]  # the weight norm is one weight now
    analysis = analyze(ModelGraph(model))
    hidden = next(g for g in analysis.groups
                  if any("pos_conv_embed/conv/weight" in m.tensor for m in g.param_members))
    assert hidden.size == 4 and not hidden.inexact
    names = {m.tensor for m in hidden.param_members}
    assert sum("layer_norm.weight" in n for n in names) == 5  # the encoder's and each layer's two
    weight = next(m for m in hidden.param_members if "pos_conv_embed/conv/weight" in m.tensor and m.axis == 0)
    assert np.array_equal(weight.channel_of, np.arange(64) // 16)
    inputs = random_inputs(model, seed=2)
    assert dead_channel_check(analysis, hidden, inputs).error <= 1e-5


def _positional_conv_stream() -> onnx.ModelProto:
    """wav2vec2's encoder input, small: ``h = x W + b``; ``pos = Transpose(GELU(Slice(GroupedConv(Transpose(h)))))``
    (the Slice drops the frame the symmetric padding added); ``LayerNorm(h + pos) W2``."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (16, 24)), ("b1", (24,)), ("wc", (24, 6, 4)), ("bc", (24,)), ("gamma", (24,)),
                          ("beta", (24,)), ("w2", (24, 8)))]  # fmt: skip
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("s0", [0]), ("s1", [10]), ("ax", [2]))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m"]), helper.make_node("Add", ["m", "b1"], ["h"]),
        helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),
        helper.make_node("Conv", ["ht", "wc", "bc"], ["c"], group=4, pads=[2, 2]),  # 10 frames -> 11
        helper.make_node("Slice", ["c", "s0", "s1", "ax"], ["cs"]),
        helper.make_node("Gelu", ["cs"], ["g"]), helper.make_node("Transpose", ["g"], ["pos"], perm=[0, 2, 1]),
        helper.make_node("Add", ["h", "pos"], ["r"]),
        helper.make_node("LayerNormalization", ["r", "gamma", "beta"], ["n"], axis=-1),
        helper.make_node("MatMul", ["n", "w2"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "pos_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_layernorm_statistics_see_through_a_slice_of_frames():
    """The removed channels are zero through a Slice of another axis, so the LayerNorm keeps its original width's
    statistics and the hidden size (4 conv groups of 6) is exact; the pruned model equals the masked original."""
    model = canonicalize(_positional_conv_stream())[0]
    analysis = analyze(ModelGraph(model))
    (hidden,) = [g for g in analysis.groups if any(m.tensor == "gamma" for m in g.members)]
    assert hidden.size == 4 and not hidden.inexact
    assert dead_channel_check(analysis, hidden, random_inputs(model, seed=0)).error <= 1e-5
