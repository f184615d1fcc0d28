"""Dead-channel equivalence on every group of every seeded test model, and ratio-0 identity."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import canonical

from models.testmodels import TEST_MODELS
from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.metrics import count_params
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.verify import dead_channel_check, max_rel_error, random_inputs, run

# Groups each model must expose (guards against a rule silently freezing everything).
MIN_GROUPS = {"chain": 3, "residual": 4, "concat": 4, "depthwise": 4, "attention": 2, "attention_dynamic": 2}


@pytest.mark.parametrize("name", sorted(TEST_MODELS))
def test_every_group_dead_channel_equivalent(name):
    model = canonical(TEST_MODELS[name]())
    analysis = analyze(ModelGraph(model))
    assert len(analysis.groups) >= MIN_GROUPS.get(name, 1)
    inputs = random_inputs(model, seed=1)
    tol = 1e-2 if name == "fp16" else 1e-5
    for group in analysis.groups:
        result = dead_channel_check(analysis, group, inputs)
        assert result.error <= tol, f"group {group.id} ({[str(m) for m in group.members]}): {result.error}"


@pytest.mark.parametrize("name", sorted(TEST_MODELS))
def test_ratio_zero_reproduces_original(name):
    model = canonical(TEST_MODELS[name]())
    result = PrunePass(PruneConfig(ratio=0.0)).run(model)
    assert result.modified is False
    inputs = random_inputs(model)
    assert max_rel_error(run(model, inputs), run(result.model, inputs)) == 0.0


@pytest.mark.parametrize("global_ranking", [False, True])
@pytest.mark.parametrize("name", ["residual", "concat", "depthwise", "attention", "grouped", "split"])
def test_prune_runs_and_shrinks(name, global_ranking):
    model = canonical(TEST_MODELS[name]())
    result = PrunePass(PruneConfig(ratio=0.5, global_ranking=global_ranking)).run(model)
    assert result.modified
    before, after = count_params(ModelGraph(model)), count_params(ModelGraph(result.model))
    assert after < before
    inputs = random_inputs(model)
    ref, out = run(model, inputs), run(result.model, inputs)
    assert [o.shape for o in ref] == [o.shape for o in out]
    assert all(np.isfinite(o).all() for o in out)


def test_groups_never_empty_and_round_to():
    model = canonical(TEST_MODELS["residual"]())
    analysis = analyze(ModelGraph(model))
    result = PrunePass(PruneConfig(ratio=0.95, round_to=4)).run(model)
    plan = result.info["plan"]
    for g in analysis.groups:
        kept = g.size - len(plan.removed.get(g.id, []))
        assert kept >= 1
        assert kept % 4 == 0 or kept == g.size


def test_attention_heads_are_one_group():
    model = canonical(TEST_MODELS["attention"]())
    analysis = analyze(ModelGraph(model))
    sizes = sorted(g.size for g in analysis.groups)
    assert 4 in sizes  # 4 heads: Q, K, V columns and O rows of a head go together
    heads = next(g for g in analysis.groups if g.size == 4)
    assert len(heads.param_members) >= 4


def _layernorm_mlp(between: str | None = None):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((32, 48)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(48).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(48).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal((48, 32)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node(between or "Identity", ["h0"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], axis=-1),
        helper.make_node("MatMul", ["n", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "ln_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 32])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("between", [None, "Relu", "Exp"])
def test_layernorm_hidden_is_exact_with_original_statistics(between):
    """A LayerNorm over a pruned hidden size is rewritten to keep the statistics of its original width
    (`onnxprune.statistics`): the removed channels' value is known (zero from the MatMul, exp(0) = 1
    after an Exp), so the group is exact and pruned by default; dead-channel equivalence holds."""
    model = canonical(_layernorm_mlp(between))
    default = analyze(ModelGraph(model))
    hidden = [g for g in default.groups if g.size == 48]
    assert len(hidden) == 1 and not hidden[0].inexact
    inputs = random_inputs(model, seed=0)
    assert dead_channel_check(default, hidden[0], inputs).error <= 1e-5


def _layernorm_after(kind: str):
    """MatMul + bias -> [layout / concat / reduction] -> LayerNorm -> MatMul, as exporters write a transformer's
    stream:
    OPT flattens ``[B, S, H]`` to ``[B * S, H]`` before its norms; ViT concatenates a class token before the
    patches; a mixture of experts sums its top-k experts' outputs; a transpose that keeps the hidden axis last."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (32, 48)), ("b1", (48,)), ("gamma", (48,)), ("beta", (48,)), ("w2", (48, 32)),
                          ("cls", (1, 1, 48)))]  # fmt: skip
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("flat", [8, 48]), ("topk", [1, 4, 2, 48]),
                                                                             ("axis2", [2]))]  # fmt: skip
    middle = {
        "reshape": [helper.make_node("Reshape", ["h0", "flat"], ["h"])],
        "class_token": [helper.make_node("Concat", ["cls", "h0"], ["h"], axis=1)],
        "expert_sum": [helper.make_node("Reshape", ["h0", "topk"], ["t"]),
                       helper.make_node("ReduceSum", ["t", "axis2"], ["h"], keepdims=0)],
        "transpose": [helper.make_node("Transpose", ["h0"], ["h"], perm=[1, 0, 2])],
    }[kind]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"]), helper.make_node("Add", ["m", "b1"], ["h0"]), *middle,
             helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "ln_stream", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("kind", ["reshape", "class_token", "expert_sum", "transpose"])
def test_layernorm_statistics_see_through_layouts_concats_and_reductions(kind):
    """The removed channels stay zero through a reshape that keeps the hidden axis last, a concatenation of a class
    token (a weight along the axis, zeroed with the group) and a sum over other axes: the hidden size is exact
    (it was inexact, so OPT, ViT and mixture-of-experts models kept their hidden size by default)."""
    model = canonical(_layernorm_after(kind))
    analysis = analyze(ModelGraph(model))
    hidden = [g for g in analysis.groups if g.size == 48]
    assert len(hidden) == 1 and not hidden[0].inexact
    assert dead_channel_check(analysis, hidden[0], random_inputs(model, seed=0)).error <= 1e-5


def test_layernorm_hidden_of_unknown_value_stays_inexact_and_opt_in():
    """Behind an op whose value at a removed channel is not derived (Sin here), the statistics cannot be
    kept: the hidden size stays inexact, only with allow_inexact."""
    model = canonical(_layernorm_mlp("Sin"))
    default = analyze(ModelGraph(model))
    allowed = analyze(ModelGraph(model), allow_inexact=True)
    assert not any(g.inexact for g in default.groups)
    assert any(g.inexact for g in allowed.groups)


@pytest.mark.parametrize("opset", [18, 21])
@pytest.mark.parametrize("name", ["residual", "split", "attention", "mixed_ops"])
def test_newer_opsets(name, opset):
    """Upgraded models use the input forms of Split sizes, Squeeze/Reduce axes, Slice bounds."""
    from onnx import version_converter

    model = canonical(version_converter.convert_version(TEST_MODELS[name](), opset))
    analysis = analyze(ModelGraph(model))
    assert analysis.groups
    inputs = random_inputs(model, seed=2)
    for group in analysis.groups:
        assert dead_channel_check(analysis, group, inputs).error <= 1e-5


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_older_opsets_from_torch(opset, tmp_path):
    """Old opsets (attribute forms of Split/Squeeze/Unsqueeze/Reduce) from a real exporter."""
    torch = pytest.importorskip("torch")
    import onnx

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(16)
            self.a = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.b = torch.nn.Conv2d(8, 12, 1)
            self.dw = torch.nn.Conv2d(20, 20, 3, padding=1, groups=20)
            self.fc = torch.nn.Linear(20, 10)

        def forward(self, x):
            x = torch.relu(self.bn(self.stem(x)))
            left, right = torch.chunk(x, 2, dim=1)  # Split
            y = torch.cat([torch.relu(self.a(left)), self.b(right)], dim=1)
            y = self.dw(y) * torch.sigmoid(y.mean(dim=(2, 3), keepdim=True))  # ReduceMean, SE-like gate
            return self.fc(y.mean(dim=(2, 3)).unsqueeze(1).squeeze(1))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"net{opset}.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, opset_version=opset,
                      do_constant_folding=False, input_names=["x"], output_names=["y"])  # fmt: skip
    model = canonical(onnx.load(str(path)))
    analysis = analyze(ModelGraph(model))
    assert len(analysis.groups) >= 3
    inputs = random_inputs(model, seed=4)
    for group in analysis.groups:
        assert dead_channel_check(analysis, group, inputs).error <= 1e-5


def _decomposed_layernorm(keepdims_second: int = 1):
    """Paddle's (and torch's pre-opset-17) LayerNorm: ReduceMean, Sub, Pow, ReduceMean, Add eps, Sqrt,
    Div, Mul scale, Add bias, between two MatMuls; the hidden size (48) is the pruned axis."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    arrays = {
        "w1": rng.standard_normal((32, 48)), "b1": rng.standard_normal(48), "gamma": rng.standard_normal(48),
        "beta": rng.standard_normal(48), "w2": rng.standard_normal((48, 32)), "two": np.array(2.0),
        "eps": np.array(1e-5),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h"]),
        helper.make_node("ReduceMean", ["h"], ["m"], axes=[-1], keepdims=1),
        helper.make_node("Sub", ["h", "m"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["d2"]),
        helper.make_node("ReduceMean", ["d2"], ["v"], axes=[-1], keepdims=1),
        helper.make_node("Add", ["v", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["s"]),
        helper.make_node("Div", ["d", "s"], ["n0"]),
        helper.make_node("Mul", ["n0", "gamma"], ["n1"]),
        helper.make_node("Add", ["n1", "beta"], ["n"]),
        helper.make_node("MatMul", ["n", "w2"], ["y0"]),
        helper.make_node("ReduceMean", ["h"], ["pooled"], axes=[-1], keepdims=keepdims_second),
    ]
    graph = helper.make_graph(
        nodes, "decomposed_ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 32])],
        [helper.make_tensor_value_info("y0", TensorProto.FLOAT, [2, 8, 32]),
         helper.make_tensor_value_info("pooled", TensorProto.FLOAT, None)], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


@pytest.mark.parametrize("keepdims", [0, 1])
def test_decomposed_layernorm_keeps_original_statistics(keepdims):
    """Both means of a decomposed LayerNorm (and a plain mean over the hidden size) are rewritten as
    (sum of kept + removed x their value) / original width: the second mean's removed value is mean^2,
    not zero. Exact at 1/4 and 3/4 of the hidden size removed, and the pruned model keeps fewer weights."""
    from onnxprune.rewrite import apply_mask

    model = canonical(_decomposed_layernorm(keepdims))
    analysis = analyze(ModelGraph(model))
    (hidden,) = [g for g in analysis.groups if g.size == 48]
    assert not hidden.inexact
    inputs = random_inputs(model, seed=3)
    assert dead_channel_check(analysis, hidden, inputs).error <= 1e-5
    for ratio in (0.25, 0.75):
        result = PrunePass(PruneConfig(ratio=ratio)).run(model)
        masked = apply_mask(analysis, result.info["plan"].labels(analysis))
        assert max_rel_error(run(masked, inputs), run(result.model, inputs)) <= 1e-5
        assert sum(int(np.prod(t.dims)) for t in result.model.graph.initializer if t.name == "w2") < 48 * 32
