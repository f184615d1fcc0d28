"""Real exported architectures: dead-channel equivalence on sampled groups and a 50% prune that runs.

The fast tier runs a representative subset (a ResNet, a depthwise+SE MobileNet, a Concat network, a
transformer with attention heads, a GQA decoder, a pretrained PP-OCR model); the slow tier runs the
whole zoo. Models are exported by `models/zoo.py` into its cache (built on first use).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune.channels import DimRef, analyze
from onnxprune.graph import ModelGraph
from onnxprune.importer import check_model, import_model
from onnxprune.metrics import count_params
from onnxprune.passes.iterative import IterativePrunePass
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.plan import make_plan
from onnxprune.rewrite import apply_plan
from onnxprune.shape_inference import infer_shapes
from onnxprune.verify import dead_channel_check, max_rel_error, random_inputs, run

zoo = pytest.importorskip("models.zoo")
HEAD_OUTPUTS = pytest.importorskip("models.zoo_segmentation").HEAD_OUTPUTS

FAST = ["resnet18", "mobilenet_v3_small", "googlenet", "bert_tiny", "llama_tiny", "ppocrv4_det"]
# Groups the analysis must find (guards against a regression that freezes a family).
EXPECT_GROUPS = {"resnet18": 12, "mobilenet_v3_small": 20, "googlenet": 50, "bert_tiny": 4, "llama_tiny": 4}


# PP-OCR's detector ends in DB binarisation (a sigmoid of 50x its input): float32 rounding noise of
# 1e-7 before it becomes 1e-2 after it, so the oracle compares the logits that feed it.
COMPARE_BEFORE_SIGMOID = {"ppocrv4_det", "ppocrv6_det_small"}


def _model(name):
    try:
        path = zoo.zoo_model(name)
    except zoo.ZooError as exc:
        pytest.skip(str(exc))
    model = import_model(path, zoo.INPUT_SHAPES.get(name))
    if name in COMPARE_BEFORE_SIGMOID:
        import onnx

        from onnxprune.importer import canonicalize

        producers = {o: n for n in model.graph.node for o in n.output}
        last = producers[model.graph.output[0].name]
        assert last.op_type == "Sigmoid"
        del model.graph.output[:]
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(last.input[0]))
        model = canonicalize(model)[0]
    elif name in HEAD_OUTPUTS:  # NMS / TopK flip near-ties under float32 rounding: compare the detector's heads
        import onnx  # local, as above: the import in the branch above makes the name local to the function

        from onnxprune.importer import canonicalize

        del model.graph.output[:]
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in HEAD_OUTPUTS[name])
        model = canonicalize(model)[0]  # drops the post-processing (tests/test_zoo_segmentation.py keeps it)
    return model


def _check(name: str, max_groups: int):
    model = _model(name)
    analysis = analyze(ModelGraph(model))
    assert len(analysis.groups) >= EXPECT_GROUPS.get(name, 1), [g.size for g in analysis.groups]
    inputs = random_inputs(model, seed=3)
    rng = np.random.default_rng(0)
    groups = analysis.groups
    if len(groups) > max_groups:
        groups = [groups[i] for i in sorted(rng.choice(len(groups), max_groups, replace=False))]
    for group in groups:
        result = dead_channel_check(analysis, group, inputs)
        assert result.error <= 1e-5, f"{name} group {group.id} {[str(m) for m in group.param_members][:4]}"
    pruned = PrunePass(PruneConfig(ratio=0.5)).run(model).model
    check_model(pruned)
    before, after = count_params(ModelGraph(model)), count_params(ModelGraph(pruned))
    assert after < before
    ref, out = run(model, inputs), run(pruned, inputs)
    assert [o.shape for o in ref] == [o.shape for o in out]


@pytest.mark.parametrize("name", FAST)
def test_zoo_subset(name):
    _check(name, max_groups=6)


KNOWN_GAPS: dict[str, str] = {}  # name -> reason; strict xfail, so a fixed gap fails loudly


@pytest.mark.parametrize("name", ["llama_tiny_dynseq", "gpt2_tiny_dynseq"])
def test_dynamic_sequence_length(name):
    """Heads (GQA KV heads for LLaMA) and MLP channels prune with run-time shapes, and the pruned model
    still takes any sequence length, matching the masked original at each."""
    from onnxprune.rewrite import apply_mask

    model = _model(name)
    analysis = analyze(ModelGraph(model))
    assert len(analysis.groups) >= 4  # per layer: one attention-head group and one MLP group
    result = PrunePass(PruneConfig(ratio=0.5)).run(model)
    plan = result.info["plan"]
    masked = apply_mask(analysis, plan.labels(analysis))
    for length in (5, 11):
        inputs = random_inputs(model, seed=length, dims={"seq": length})
        got, expected = run(result.model, inputs), run(masked, inputs)
        assert got[0].shape[1] == length
        assert max_rel_error(expected, got) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_GAPS[n], strict=True)) if n in KNOWN_GAPS else n
     for n in sorted(zoo.ZOO)],
)  # fmt: skip
def test_zoo_all(name):
    _check(name, max_groups=50)


def test_hidden_size_is_one_exact_group():
    """The residual stream's hidden size (RMSNorm-coupled) is one big group, exact by default: the
    RMS statistics keep the original width (`onnxprune.statistics`), so the pruned model equals the
    original with the group's channels silenced."""
    from onnxprune.rewrite import apply_mask

    model = _model("llama_tiny")
    analysis = analyze(ModelGraph(model))
    hidden = [g for g in analysis.groups if g.size == 128]
    assert len(hidden) == 1 and not hidden[0].inexact
    names = {m.tensor for m in hidden[0].param_members}
    assert any("embed_tokens" in n for n in names)  # the embedding table's hidden axis is in it
    inputs = random_inputs(model)
    assert dead_channel_check(analysis, hidden[0], inputs).error <= 1e-5
    result = PrunePass(PruneConfig(ratio=0.25)).run(model)
    check_model(result.model)
    out, expected = run(result.model, inputs), run(apply_mask(analysis, result.info["plan"].labels(analysis)), inputs)
    assert out[0].shape == (1, 16, 1000) and max_rel_error(expected, out) <= 1e-4


@pytest.mark.parametrize("name", ["albert_tiny", "opt_tiny"])
def test_tied_weights_are_pruned_once(name, tmp_path):
    """ALBERT's layers read one set of weights, OPT's output projection reads the embedding table: each stays
    one parameter, so the pruned file holds fewer weights than the exported one (each reader got its own copy
    below 1 M values before: pruned ALBERT and OPT files grew by 18% and 13% at --ratio 0.3)."""
    import onnx

    from onnxprune.cli import main

    def stored(path) -> int:
        return sum(int(np.prod(t.dims)) for t in onnx.load(path).graph.initializer if t.data_type == 1)

    try:
        src = zoo.zoo_model(name)
    except zoo.ZooError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "p.onnx"
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.3", "--round-to", "1", "--verify"]) == 0
    assert stored(out) < 0.85 * stored(src)


@pytest.mark.parametrize("name", ["opt_tiny", "mixtral_tiny", "vit_tiny_16"])
def test_hidden_size_is_exact_behind_flattening_experts_and_class_tokens(name):
    """OPT flattens [B, S, H] before its LayerNorms, Mixtral sums its top-2 experts, ViT concatenates a class
    token: the LayerNorm / RMSNorm statistics still see zeros at removed channels, so the hidden size is one
    exact group (it was inexact: these models kept their hidden size by default)."""
    model = _model(name)
    analysis = analyze(ModelGraph(model))
    hidden = max(analysis.groups, key=lambda g: len(g.param_members))
    assert not hidden.inexact and hidden.size in (128, 192)
    assert dead_channel_check(analysis, hidden, random_inputs(model, seed=1)).error <= 1e-5


def test_layers_reading_a_tied_weight_are_reported_unrepaired(tmp_path, capsys):
    """ALBERT's output projections read their shared weights through a Transpose: the seq repair cannot refit one
    reader without changing the other, and says so per layer (they were missing from ``skipped``)."""
    import json

    from onnxprune.cli import main

    try:
        src = zoo.zoo_model("albert_tiny")
    except zoo.ZooError as exc:
        pytest.skip(str(exc))
    args = ["prune", str(src), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.3", "--round-to", "1", "--criterion",
            "l2", "--repair", "seq", "--calib", "synthetic:4", "--json"]
    assert main(args) == 0
    skipped = json.loads(capsys.readouterr().out)["repair"]["skipped"]
    shared = sorted(name for name, why in skipped.items() if why == "weight shared with other nodes")
    assert len(shared) == 4 and all(n.endswith(("/dense/MatMul", "/dense_1/MatMul", "/ffn_output/MatMul",
                                                "/ffn_output_1/MatMul")) for n in shared), skipped


def test_moe_router_ranks_experts_without_a_barrier():
    """Mixtral's router ranks its experts with TopK: not a barrier. By default the experts stay whole, and the
    report says why (their removal is inexact); the groups are as they were with the barrier: the hidden size,
    the heads of each layer, each layer's expert FFN channels."""
    model = _model("mixtral_tiny")
    analysis = analyze(ModelGraph(model))
    assert analysis.barriers == []
    assert sorted(g.size for g in analysis.groups) == [2, 2, 128, 128, 128]
    reasons = {row["reason"]: row["count"] for row in analysis.frozen_weights()}
    assert reasons["removal would be inexact (experts chosen by TopK: a removed one is never chosen); see "
                   "--allow-inexact"] == 6  # per layer: the router's column axis and the two stacked slabs


def _experts_never_chosen(model: onnx.ModelProto, topk: onnx.NodeProto, experts: np.ndarray) -> onnx.ModelProto:
    """`model` with the router scores of `experts` at -1e9 before the softmax that `topk` ranks: the oracle of
    expert removal (a removed expert is never chosen; a zeroed router row would still be)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    producer = {o: n for n in out.graph.node for o in n.output}
    softmax = producer[topk.input[0]]
    while softmax.op_type != "Softmax":  # Qwen2-MoE casts the probabilities before ranking them
        softmax = producer[softmax.input[0]]
    n_experts = ModelGraph(model).shape(topk.input[0])[-1]
    bias = np.zeros(n_experts, np.float32)
    bias[experts] = -1e9
    out.graph.initializer.append(onnx.numpy_helper.from_array(bias, "expert_mask__test"))
    masked = softmax.input[0] + "__masked"
    out.graph.node.insert(list(out.graph.node).index(softmax),
                          onnx.helper.make_node("Add", [softmax.input[0], "expert_mask__test"], [masked]))
    softmax.input[0] = masked
    return out


@pytest.mark.parametrize("name", ["mixtral_tiny", "qwen2_moe_tiny"])
def test_moe_experts_are_removable_units(name):
    """The experts of each MoE layer: with --allow-inexact one group per layer (router column, stacked gate/up
    and down slabs), inexact (a token that chose a removed expert takes its next-best), keeping at least top-k;
    the pruned model equals the original with the removed experts' router scores at -inf. Mixtral renormalises
    its top-2 weights; Qwen2-MoE does not and adds a shared expert behind a sigmoid gate, which stays whole."""
    model = _model(name)
    assert not [g for g in analyze(ModelGraph(model)).groups if g.inexact]
    analysis = analyze(ModelGraph(model), allow_inexact=True)
    experts = [g for g in analysis.groups if g.inexact]
    assert [g.size for g in experts] == [4, 4] and [g.min_keep for g in experts] == [2, 2]
    inputs = random_inputs(model, seed=2)
    for layer, (group, topk) in enumerate(zip(experts, [n for n in model.graph.node if n.op_type == "TopK"])):
        removed = group.labels[[1, 2]]
        stacked = next(m for m in group.members if m.tensor.endswith(f"layers.{layer}.mlp.experts.gate_up_proj"))
        gone = analysis.removed_positions(removed)[DimRef(stacked.tensor, stacked.axis)]
        pruned = infer_shapes(apply_plan(analysis, removed))
        check_model(pruned)
        oracle = _experts_never_chosen(model, topk, gone)
        assert max_rel_error(run(oracle, inputs), run(pruned, inputs)) <= 1e-5
        assert max_rel_error(run(model, inputs), run(pruned, inputs)) > 1e-3  # the routing did change
    plan = make_plan(analysis, {g.id: np.arange(g.size, dtype=float) for g in analysis.groups}, 0.9,
                     groups=experts)
    assert all(g.size - len(plan.removed[g.id]) == 2 for g in experts)  # top-2 keeps two experts


def test_steps_go_on_after_a_group_shrinks_to_one_channel():
    """--steps 3 at ratio 0.7 on Mixtral: each layer's two attention heads lose one in step 2 and stop being a
    group; step 3 goes on (it stopped with 'has no counterpart in the pruned model') and lands the one-shot
    counts (the channels differ: step 3 ranks on the pruned weights)."""
    model = _model("mixtral_tiny")
    config = PruneConfig(ratio=0.7, round_to=1)
    stepped = IterativePrunePass(config, steps=3).run(model)
    one_shot = PrunePass(config).run(model)
    assert stepped.info["summary"]["plan"] == one_shot.info["summary"]["plan"]
    assert count_params(ModelGraph(stepped.model)) == count_params(ModelGraph(one_shot.model))
    inputs = random_inputs(model, seed=3)
    assert all(np.isfinite(o).all() for o in run(stepped.model, inputs))


def test_knapsack_curves_keep_the_top_k_experts():
    """The knapsack's error curves measure each group at up to 90% removed on the pruned model (inexact groups):
    an expert group stops at k kept (a TopK over fewer experts than k does not run), and the allocation too."""
    from onnxprune.calibration_data import CalibrationData

    model = _model("mixtral_tiny")
    calib = CalibrationData({"input_ids": np.random.default_rng(0).integers(0, 1000, (8, 16)).astype(np.int64)})
    config = PruneConfig(allocation="knapsack", criterion="obs", repair="ls", target_params="40%", round_to=1,
                         allow_inexact=True)
    result = PrunePass(config, calib=calib).run(model)
    stacked = [t for t in result.model.graph.initializer if t.name.endswith("mlp.experts.gate_up_proj")]
    assert len(stacked) == 2 and all(t.dims[0] >= 2 for t in stacked)
    assert all(np.isfinite(o).all() for o in run(result.model, random_inputs(model, seed=4)))


def test_analyze_json_names_the_experts_min_keep(capsys):
    """`onnxprune analyze --allow-inexact --json` on Qwen2-MoE: each layer's experts are an inexact group that
    keeps at least its top-k (2); every other group is exact and may shrink to one channel."""
    import json

    from onnxprune.cli import main

    try:
        path = zoo.zoo_model("qwen2_moe_tiny")
    except zoo.ZooError as exc:
        pytest.skip(str(exc))
    assert main(["analyze", str(path), "--allow-inexact", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    experts = [g for g in groups if g["inexact"]]
    assert [(g["channels"], g["min_keep"]) for g in experts] == [(4, 2), (4, 2)]
    assert all(g["min_keep"] == 1 for g in groups if not g["inexact"])
    assert any("experts.gate_up_proj[axis 0]" in m for m in experts[0]["members"])
