"""Attention heads in every exporter's form, and GatherND pooling.

Hand-built graphs reproduce what the exporters emit at a static batch of 2 (batch 1 hides the bugs: a
size-1 axis takes no part in a reshape's segments):

* separate Q/K/V projections reshaped into ``[B, S, heads, D]``, computed on ``[B, S, E]`` (dynamo) or
  on the flattened ``[B*S, E]`` (legacy ``Gemm``);
* K transposed through ``[B*heads, S, D]`` (the torch.export-based exporter's SDPA decomposition): the
  batch axis merged with the head axis must not carry the channels;
* one fused QKV projection split into three along the feature axis (GPT-2's ``c_attn`` + ``Split``);
* ``GatherND`` last-token pooling (``batch_dims=1``), indices static or fed at run time.

Each must expose the heads as one group (Q, K, V columns and O rows of a head), and removing channels
must equal silencing them in the original (onnxruntime, optimisations off). The zoo models at the end
(`minilm_l6_dynamo_b2`, `gpt2_tiny_fused`) are checked when their packages are installed.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import canonical
from onnx import TensorProto, helper, numpy_helper

from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.importer import check_model
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.verify import dead_channel_check, random_inputs, run

B, S, E, HEADS = 2, 4, 8, 4  # heads != batch, so a mistaken carrier cannot pass by coincidence
D = E // HEADS


class _Graph:
    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.k = 0

    def const(self, value, prefix: str = "c") -> str:
        self.k += 1
        name = f"{prefix}{self.k}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, *shape: int) -> str:
        return self.const(self.rng.standard_normal(shape).astype(np.float32), "w")

    def shape(self, *dims: int) -> str:
        return self.const(np.array(dims, np.int64), "shape")

    def __call__(self, op: str, inputs: list[str], n_out: int = 1, **attrs):
        self.k += 1
        outs = [f"{op.lower()}{self.k}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"{op}_{self.k}", **attrs))
        return outs[0] if n_out == 1 else outs

    def model(self, inputs: list[tuple[str, int, list[int]]], output: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "attention_export",
            [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], self.inits,
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        return canonical(model)


def _heads(g: _Graph, t: str) -> str:
    """``[B, S, E]`` (or ``[B*S, E]``) -> ``[B, heads, S, D]``."""
    return g("Transpose", [g("Reshape", [t, g.shape(B, S, HEADS, D)])], perm=[0, 2, 1, 3])


def _attend(g: _Graph, q: str, k: str, v: str, k_through_batch_heads: bool) -> str:
    """Scaled dot-product attention over ``[B, heads, S, D]``, merged back to ``[B, S, E]``."""
    if k_through_batch_heads:  # the dynamo SDPA form: K^T via [B*heads, S, D]
        flat = g("Reshape", [k, g.shape(-1, S, D)])
        kt = g("Reshape", [g("Transpose", [flat], perm=[0, 2, 1]), g.shape(B, HEADS, D, S)])
    else:
        kt = g("Transpose", [k], perm=[0, 1, 3, 2])
    scores = g("Softmax", [g("MatMul", [q, kt])], axis=-1)
    out = g("Transpose", [g("MatMul", [scores, v])], perm=[0, 2, 1, 3])
    return g("Reshape", [out, g.shape(B, S, E)])


def separate_qkv(flat: bool, k_through_batch_heads: bool) -> onnx.ModelProto:
    """``x [B, S, E]`` -> Q, K, V projections (+bias) -> heads -> attention -> O -> ``y``."""
    g = _Graph()
    x = g("Reshape", ["x", g.shape(B * S, E)]) if flat else "x"
    q, k, v = (_heads(g, g("Add", [g("MatMul", [x, g.weight(E, E)]), g.weight(E)])) for _ in range(3))
    y = g("MatMul", [_attend(g, q, k, v, k_through_batch_heads), g.weight(E, E)])
    return g.model([("x", TensorProto.FLOAT, [B, S, E])], y)


def fused_qkv(flat: bool, k_through_batch_heads: bool) -> onnx.ModelProto:
    """One ``[E, 3E]`` projection, ``Split`` into Q, K, V along the feature axis (GPT-2's ``c_attn``)."""
    g = _Graph()
    x = g("Reshape", ["x", g.shape(B * S, E)]) if flat else "x"
    qkv = g("Add", [g("MatMul", [x, g.weight(E, 3 * E)]), g.weight(3 * E)])
    if flat:
        qkv = g("Reshape", [qkv, g.shape(B, S, 3 * E)])
    q, k, v = g("Split", [qkv], n_out=3, axis=-1, num_outputs=3)
    y = g("MatMul", [_attend(g, _heads(g, q), _heads(g, k), _heads(g, v), k_through_batch_heads), g.weight(E, E)])
    return g.model([("x", TensorProto.FLOAT, [B, S, E])], y)


def last_token_pooling(run_time_indices: bool) -> onnx.ModelProto:
    """``x [B, S, 3] -> MatMul(3->6) -> Relu -> GatherND(indices [B, 1], batch_dims=1) -> [B, 6] -> MatMul``."""
    g = _Graph()
    h = g("Relu", [g("MatMul", ["x", g.weight(3, 6)])])
    idx = "last" if run_time_indices else g.const(np.array([[S - 1], [1]], np.int64), "idx")
    y = g("MatMul", [g("GatherND", [h, idx], batch_dims=1), g.weight(6, 3)])
    inputs = [("x", TensorProto.FLOAT, [B, S, 3])]
    if run_time_indices:
        inputs.append(("last", TensorProto.INT64, [B, 1]))
    return g.model(inputs, y)


FORMS = [
    pytest.param(separate_qkv, False, False, id="separate-qkv"),
    pytest.param(separate_qkv, True, False, id="separate-qkv-flat-legacy"),
    pytest.param(separate_qkv, False, True, id="separate-qkv-k-via-batch-heads"),
    pytest.param(separate_qkv, True, True, id="separate-qkv-flat-k-via-batch-heads"),
    pytest.param(fused_qkv, False, False, id="fused-qkv-split"),
    pytest.param(fused_qkv, True, True, id="fused-qkv-split-flat-k-via-batch-heads"),
]


def _inputs(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inputs = random_inputs(model, seed=5)
    if "last" in inputs:
        inputs["last"] = np.array([[S - 1], [2]], np.int64)
    return inputs


def _assert_equivalent(model: onnx.ModelProto) -> None:
    analysis = analyze(ModelGraph(model))
    inputs = _inputs(model)
    for group in analysis.groups:
        result = dead_channel_check(analysis, group, inputs)
        assert result.error <= 1e-5, f"group {group.id} {[str(m) for m in group.members]}: {result.error}"
    pruned = PrunePass(PruneConfig(ratio=0.5)).run(model).model
    check_model(pruned)
    assert [o.shape for o in run(pruned, inputs)] == [o.shape for o in run(model, inputs)]


@pytest.mark.parametrize(("build", "flat", "k_via_batch_heads"), FORMS)
def test_heads_are_one_group(build, flat, k_via_batch_heads):
    model = build(flat, k_via_batch_heads)
    analysis = analyze(ModelGraph(model))
    assert not analysis.barriers, analysis.barriers
    assert [g.size for g in analysis.groups] == [HEADS]
    heads = analysis.groups[0]
    weights = {m.tensor for m in heads.param_members if len(m.positions) > 1}
    separate = 7 if build is separate_qkv else 3  # Q, K, V weights and biases, O weight (fused: one W, one b)
    assert len(weights) == separate, [str(m) for m in heads.param_members]
    # a head is D consecutive columns of each projection (of each third of the fused one)
    for m in (m for m in heads.param_members if m.axis == 1):
        for c in range(HEADS):
            assert np.array_equal(np.unique(m.positions[m.channel_of == c] % E), np.arange(c * D, (c + 1) * D))


@pytest.mark.parametrize(("build", "flat", "k_via_batch_heads"), FORMS)
def test_pruned_heads_equal_masked_original(build, flat, k_via_batch_heads):
    _assert_equivalent(build(flat, k_via_batch_heads))


@pytest.mark.parametrize("run_time_indices", [False, True], ids=["static-indices", "run-time-indices"])
def test_gathernd_pooling_keeps_hidden_channels(run_time_indices):
    model = last_token_pooling(run_time_indices)
    analysis = analyze(ModelGraph(model))
    assert not analysis.barriers, analysis.barriers
    assert [g.size for g in analysis.groups] == [6]
    _assert_equivalent(model)


# ---- zoo models ---------------------------------------------------------------------------------------
def _coverage():
    """`bench/coverage.py` (the reach the issue is judged by), loaded from its file; skip without rich."""
    import importlib.util

    pytest.importorskip("rich")
    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("bench_coverage", ROOT / "bench" / "coverage.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["minilm_l6_dynamo_b2", "gpt2_tiny_fused"])
def test_zoo_attention_exports(name):
    zoo = pytest.importorskip("models.zoo")
    try:
        path = zoo.zoo_model(name)
    except zoo.ZooError as exc:
        pytest.skip(str(exc))
    from onnxprune.importer import import_model

    model = import_model(path)
    analysis = analyze(ModelGraph(model))
    inputs = random_inputs(model, seed=3)
    rng = np.random.default_rng(0)
    sampled = [analysis.groups[i] for i in sorted(rng.choice(len(analysis.groups), 3, replace=False))]
    for group in sampled:
        result = dead_channel_check(analysis, group, inputs)
        assert result.error <= 1e-4, f"{name} group {group.id} {[str(m) for m in group.param_members][:4]}"
    pruned = PrunePass(PruneConfig(ratio=0.5)).run(model).model
    check_model(pruned)
    out = run(pruned, inputs)
    assert [o.shape for o in out] == [o.shape for o in run(model, inputs)]
    assert all(np.isfinite(o).all() for o in out)
    coverage = _coverage()
    before = coverage.weight_elements(model, coverage.weight_names(ModelGraph(model), transformer=True))
    reach = coverage.reach(pruned, before, transformer=True)
    assert reach >= 0.8, reach
