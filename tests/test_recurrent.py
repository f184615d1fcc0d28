"""LSTM, GRU and RNN (`rules/recurrent.py`): hidden and input channels found, removed exactly.

Hand-built layers (onnx.helper) in every variant the rule distinguishes: forward, reverse and
bidirectional; with and without bias, initial states (non-zero, so masking them matters), peepholes and
sequence lengths; layout 0 and 1 (onnxruntime runs only layout 0: layout 1 is compared in onnx's
reference evaluator). Each reads ``x -> MatMul(6->4)`` (the input channels' producer) and
feeds a MatMul over the hidden axis (their consumer); Y_h feeds one too. Then torch-exported CRNNs
(convs -> reshape into a sequence -> LSTM/GRU -> Linear) prune to the asked ratio and match the masked
original.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import canonical
from onnx import TensorProto, helper, numpy_helper

from onnxprune.channels import ChannelAnalysis, analyze
from onnxprune.graph import ModelGraph, attrs
from onnxprune.importer import canonicalize, check_model
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.rewrite import apply_mask, apply_plan
from onnxprune.shape_inference import infer_shapes
from onnxprune.verify import dead_channel_check, max_rel_error, random_inputs, run

SEQ, BATCH, FEATURES, INPUT, HIDDEN = 5, 2, 6, 4, 6
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


@dataclass(frozen=True)
class Variant:
    op: str
    direction: str = "forward"
    layout: int = 0
    bias: bool = True
    states: bool = False
    peepholes: bool = False
    seq_lens: bool = False
    activations: tuple[str, ...] = ()

    @property
    def dirs(self) -> int:
        return 2 if self.direction == "bidirectional" else 1

    def __str__(self) -> str:
        flags = [f for f in ("bias", "states", "peepholes", "seq_lens") if getattr(self, f)]
        return "-".join([self.op, self.direction, f"layout{self.layout}", *flags, *self.activations])


def recurrent_model(v: Variant, opset: int = 21, seed: int = 0) -> onnx.ModelProto:
    """``x [seq, batch, 6] -> MatMul(6->4) -> X -> op(hidden 6) -> Y -> MatMul(6->3)`` and ``Y_h -> MatMul(6->2)``."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []

    def param(name: str, shape: tuple[int, ...], scale: float = 0.5) -> str:
        inits.append(numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name))
        return name

    g, h, d = GATES[v.op], HIDDEN, v.dirs
    x_shape = [BATCH, SEQ, FEATURES] if v.layout else [SEQ, BATCH, FEATURES]
    state_shape = (BATCH, d, h) if v.layout else (d, BATCH, h)
    nodes = [helper.make_node("MatMul", ["x", param("w_in", (FEATURES, INPUT))], ["X"])]
    inputs = ["X", param("W", (d, g * h, INPUT)), param("R", (d, g * h, h))]
    inputs.append(param("B", (d, 2 * g * h)) if v.bias else "")
    if v.seq_lens:
        inits.append(numpy_helper.from_array(np.array([SEQ, SEQ - 2], np.int32), "seq_lens"))
    inputs.append("seq_lens" if v.seq_lens else "")
    inputs.append(param("initial_h", state_shape) if v.states else "")
    if v.op == "LSTM":
        inputs.append(param("initial_c", state_shape) if v.states else "")
        inputs.append(param("P", (d, 3 * h)) if v.peepholes else "")
    while inputs[-1] == "":
        inputs.pop()
    outputs = ["Y", "Y_h"] + (["Y_c"] if v.op == "LSTM" else [])
    extra = {"layout": v.layout} if v.layout else {}
    if v.activations:
        extra["activations"] = list(v.activations)
    nodes.append(helper.make_node(v.op, inputs, outputs, name="rnn", hidden_size=h, direction=v.direction, **extra))
    nodes.append(helper.make_node("MatMul", ["Y", param("w_out", (h, 3))], ["out"]))
    nodes.append(helper.make_node("MatMul", ["Y_h", param("w_last", (h, 2))], ["last"]))
    graph = helper.make_graph(
        nodes, "recurrent", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("out", "last")], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


VARIANTS = [
    Variant("LSTM"),
    Variant("LSTM", "reverse", bias=False),
    Variant("LSTM", "bidirectional", states=True, peepholes=True),
    Variant("LSTM", "bidirectional", layout=1, states=True, seq_lens=True),
    Variant("LSTM", "forward", states=True, peepholes=True, seq_lens=True),
    Variant("GRU"),
    Variant("GRU", "reverse", states=True),
    Variant("GRU", "bidirectional", bias=False, states=True),
    Variant("GRU", "bidirectional", layout=1, states=True),
    Variant("RNN"),
    Variant("RNN", "reverse", states=True, seq_lens=True),
    Variant("RNN", "bidirectional", layout=1, states=True),
    Variant("RNN", "forward", activations=("Relu",)),
]
IDS = [str(v) for v in VARIANTS]


def _analysed(v: Variant) -> tuple[onnx.ModelProto, ChannelAnalysis]:
    model = canonical(recurrent_model(v))
    return model, analyze(ModelGraph(model))


@pytest.mark.parametrize("v", VARIANTS, ids=IDS)
def test_hidden_and_input_groups(v: Variant):
    _, analysis = _analysed(v)
    assert not analysis.barriers, analysis.barriers
    assert sorted(g.size for g in analysis.groups) == sorted([INPUT, HIDDEN])
    hidden = next(g for g in analysis.groups if any(m.tensor == "R" for m in g.members))
    members = {(m.tensor, m.axis) for m in hidden.param_members}
    expected = {("W", 1), ("R", 1), ("R", 2), ("w_out", 0), ("w_last", 0)}
    expected |= {("B", 1)} if v.bias else set()
    expected |= {("initial_h", 2)} | ({("initial_c", 2)} if v.op == "LSTM" else set()) if v.states else set()
    expected |= {("P", 1)} if v.peepholes else set()
    assert members == expected
    # Every gate row of the channel, both bias halves, and R's column: G*H rows + 2*G*H biases + 1 column.
    r_rows = next(m for m in hidden.members if (m.tensor, m.axis) == ("R", 1))
    assert np.bincount(r_rows.channel_of).tolist() == [GATES[v.op]] * HIDDEN
    inputs = next(g for g in analysis.groups if g is not hidden)
    assert {(m.tensor, m.axis) for m in inputs.param_members} == {("w_in", 1), ("W", 2)}


def _runner(v: Variant):
    """onnxruntime (optimisations off); onnx's reference evaluator for layout 1, which onnxruntime rejects."""
    if not v.layout:
        return run

    def reference(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        from onnx.reference import ReferenceEvaluator

        return list(ReferenceEvaluator(model).run(None, inputs))

    return reference


def _dead_channel_error(analysis: ChannelAnalysis, group, inputs, v: Variant) -> float:
    """`verify.dead_channel_check` with the variant's runner: half the group silenced vs removed."""
    if not v.layout:
        return dead_channel_check(analysis, group, inputs).error
    channels = np.random.default_rng([0, group.id]).choice(group.size, size=group.size // 2, replace=False)
    labels = group.labels[np.sort(channels)]
    pruned = infer_shapes(apply_plan(analysis, labels))
    check_model(pruned)
    return max_rel_error(_runner(v)(apply_mask(analysis, labels), inputs), _runner(v)(pruned, inputs))


@pytest.mark.parametrize("v", VARIANTS, ids=IDS)
def test_dead_channel_equivalence(v: Variant):
    model, analysis = _analysed(v)
    inputs = random_inputs(model, seed=2)
    for group in analysis.groups:
        assert _dead_channel_error(analysis, group, inputs, v) <= 1e-5, [str(m) for m in group.members]


@pytest.mark.parametrize("v", VARIANTS, ids=IDS)
def test_ratio_zero_reproduces_and_half_prunes(v: Variant):
    model, _ = _analysed(v)
    inputs = random_inputs(model, seed=5)
    run_ = _runner(v)
    reference = run_(model, inputs)
    same = PrunePass(PruneConfig(ratio=0.0)).run(model)
    assert same.modified is False and max_rel_error(reference, run_(same.model, inputs)) == 0.0
    half = PrunePass(PruneConfig(ratio=0.5)).run(model)
    check_model(half.model)
    node = next(n for n in half.model.graph.node if n.op_type == v.op)
    assert attrs(node)["hidden_size"] == HIDDEN // 2
    got = run_(half.model, inputs)
    assert [o.shape for o in got] == [o.shape for o in reference] and all(np.isfinite(o).all() for o in got)


@pytest.mark.parametrize(
    ("op", "activations"),
    [("RNN", ("Sigmoid",)), ("GRU", ("Sigmoid", "HardSigmoid")), ("LSTM", ("Sigmoid", "Tanh", "Softplus"))],
)
def test_state_activation_not_zero_at_zero_is_a_barrier(op: str, activations: tuple[str, ...]):
    """A silenced channel's state would be act(0) != 0, not dead: the rule refuses."""
    _, analysis = _analysed(Variant(op, activations=activations))
    assert [b.op_type for b in analysis.barriers] == [op]
    assert "does not map 0 to 0" in analysis.barriers[0].reason


def _bidirectional_features(op: str, opset: int = 21) -> onnx.ModelProto:
    """The CRNN head: ``Y [seq, 2, batch, H] -> Transpose -> Reshape [seq, batch, 2H] -> MatMul(2H->3)``."""
    model = recurrent_model(Variant(op, "bidirectional", states=True), opset)
    g = model.graph
    out_mm = next(n for n in g.node if n.output[0] == "out")
    g.node.remove(out_mm)
    w_out = next(t for t in g.initializer if t.name == "w_out")
    g.initializer.remove(w_out)
    rng = np.random.default_rng(1)
    g.initializer.append(numpy_helper.from_array(rng.standard_normal((2 * HIDDEN, 3)).astype(np.float32), "w_out"))
    g.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), "features"))
    g.node.extend([
        helper.make_node("Transpose", ["Y"], ["Y_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["Y_t", "features"], ["Y_f"]),
        helper.make_node("MatMul", ["Y_f", "w_out"], ["out"]),
    ])  # fmt: skip
    return model


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_bidirectional_features_merge_into_one_axis(op: str):
    """Both directions' channel j sit at positions j and H + j of the 2H features: one channel."""
    model = canonical(_bidirectional_features(op))
    analysis = analyze(ModelGraph(model))
    hidden = next(g for g in analysis.groups if any(m.tensor == "R" for m in g.members))
    assert hidden.size == HIDDEN
    w_out = next(m for m in hidden.members if m.tensor == "w_out")
    assert w_out.channel_of.tolist() == list(range(HIDDEN)) * 2
    inputs = random_inputs(model, seed=2)
    for group in analysis.groups:
        assert dead_channel_check(analysis, group, inputs).error <= 1e-5


# ---- torch-exported CRNNs ----------------------------------------------------------------------------
def _weight_elements(model: onnx.ModelProto) -> int:
    """Elements of the layers' weights (Conv/Gemm/MatMul input 1; LSTM/GRU/RNN W and R), by their shapes,
    so a weight assembled at run time (exporters slice and concatenate gate blocks) counts once."""
    graph = ModelGraph(canonicalize(model)[0])
    total = 0
    for node in graph.nodes:
        if node.op_type in GATES:
            names = node.input[1:3]
        elif node.op_type in ("Conv", "Gemm", "MatMul"):
            names = node.input[1:2]
        else:
            continue
        for name in names:
            shape = graph.shape(name)
            assert shape is not None and all(isinstance(s, int) for s in shape), name
            total += int(np.prod(shape))
    return total


def _torch_crnn(path: Path, rnn: str, bidirectional: bool, folding: bool, dynamic_batch: bool = False) -> Path:
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class CRNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                     nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                     nn.MaxPool2d((2, 1)))  # fmt: skip
            self.rnn = (nn.LSTM if rnn == "lstm" else nn.GRU)(32 * 4, 24, bidirectional=bidirectional)
            self.fc = nn.Linear(24 * (2 if bidirectional else 1), 11)

        def forward(self, x):
            f = self.cnn(x)
            b, c, h, w = f.shape
            y, _ = self.rnn(f.reshape(b, c * h, w).permute(2, 0, 1))
            return self.fc(y)

    torch.manual_seed(0)
    axes = {"x": {0: "batch", 3: "width"}, "y": {0: "steps", 1: "batch"}} if dynamic_batch else {
        "x": {3: "width"}, "y": {0: "steps"}}  # fmt: skip
    with torch.no_grad():
        torch.onnx.export(CRNN().eval(), (torch.randn(2 if dynamic_batch else 1, 1, 16, 32),), str(path),
                          dynamo=False, opset_version=17, do_constant_folding=folding, input_names=["x"],
                          output_names=["y"], dynamic_axes=axes)  # fmt: skip
    return path


def _check_crnn(model: onnx.ModelProto) -> None:
    """Every group dead-channel exact; at ratio 0.5 the layers lose >= 0.9 x half their weights and run."""
    analysis = analyze(ModelGraph(model))
    assert not analysis.barriers, analysis.barriers
    inputs = random_inputs(model, seed=1)
    for group in analysis.groups:
        assert dead_channel_check(analysis, group, inputs).error <= 1e-4
    pruned = PrunePass(PruneConfig(ratio=0.5)).run(model).model
    reach = (1 - _weight_elements(pruned) / _weight_elements(model)) / 0.5
    assert reach >= 0.9, reach
    got, expected = run(pruned, inputs), run(model, inputs)
    assert [o.shape for o in got] == [o.shape for o in expected] and all(np.isfinite(o).all() for o in got)


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
@pytest.mark.parametrize("folding", [True, False], ids=["folded", "unfolded"])
def test_torch_crnn_unidirectional(tmp_path, rnn: str, folding: bool):
    """Y [seq, 1, batch, H] -> Squeeze -> Linear; dynamic width (the reshape into a sequence reads it)."""
    _check_crnn(canonical(onnx.load(str(_torch_crnn(tmp_path / "crnn.onnx", rnn, False, folding)))))


def test_torch_crnn_dynamic_batch_zero_state(tmp_path):
    """With a run-time batch size the zero initial state is ``ConstantOfShape(Concat(1, batch, H))``."""
    model = canonical(onnx.load(str(_torch_crnn(tmp_path / "crnn.onnx", "lstm", False, True, dynamic_batch=True))))
    assert "ConstantOfShape" in {n.op_type for n in model.graph.node}
    _check_crnn(model)


@pytest.mark.parametrize("value", [0.0, 1.0], ids=["zeros", "ones"])
def test_fill_beside_a_recurrent_layer(value: float):
    """``Y + fill_like(Y)`` (ConstantOfShape of Shape(Y)): never a barrier. A zero fill follows Y's sizes, so the
    hidden channels stay prunable and removing them is exact; a nonzero fill would put its value back into a
    removed channel, so it freezes them, saying why."""
    model = recurrent_model(Variant("GRU"))
    g = model.graph
    g.input[0].type.tensor_type.shape.dim[1].dim_param = "batch"  # a run-time size: nothing folds
    g.node.extend([
        helper.make_node("Shape", ["Y"], ["y_shape"]),
        helper.make_node("ConstantOfShape", ["y_shape"], ["fill"],
                         value=numpy_helper.from_array(np.full(1, value, np.float32))),
        helper.make_node("Add", ["Y", "fill"], ["Y_plus"]),
        helper.make_node("MatMul", ["Y_plus", "w_out"], ["out_plus"]),
    ])  # fmt: skip
    g.output.append(helper.make_tensor_value_info("out_plus", TensorProto.FLOAT, None))
    model = canonical(model)
    analysis = analyze(ModelGraph(model))
    assert analysis.barriers == []
    hidden = [grp for grp in analysis.groups if any(m.tensor == "fill" for m in grp.members)]
    if value:
        assert hidden == []
        assert "a nonzero fill (ConstantOfShape) cannot lose channels" in analysis.frozen_reasons.values()
        return
    (group,) = hidden
    inputs = random_inputs(model, seed=5)
    assert dead_channel_check(analysis, group, inputs).error <= 1e-5


@pytest.mark.parametrize("name", ["crnn_lstm", "crnn_gru"])
def test_zoo_crnn_bidirectional(name: str):
    zoo = pytest.importorskip("models.zoo")
    try:
        path = zoo.zoo_model(name)
    except zoo.ZooError as exc:
        pytest.skip(str(exc))
    _check_crnn(canonical(onnx.load(str(path))))
