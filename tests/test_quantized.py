"""Quantized (QDQ) models: pruned as they are, staying quantized, checked against their masked original.

The models are real QDQ exports: the bundled Fashion-MNIST models and seeded test models quantized by
onnxruntime's ``quantize_static`` (per-channel int8 weights, and per-tensor uint8 with non-zero zero points).
Checked: every group's dead-channel equivalence (the masked original sets silenced integers to their zero
point); a pruned model that is still QDQ (integer weights behind DequantizeLinear, nothing dequantized into
floats) with a passed certificate; ratio 0 reproduces the original; scoring reads the dequantized weights;
options that read or write float weights are refused in one line; blocked quantization is a barrier.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import canonical
from onnx import TensorProto, helper, numpy_helper

from models.testmodels import TEST_MODELS
from onnxprune.channels import analyze
from onnxprune.cli import main
from onnxprune.graph import ModelGraph
from onnxprune.html_report import layer_rows
from onnxprune.metrics import count_params
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.quantized import dequantizer, effective_value, quantized_initializers
from onnxprune.verify import dead_channel_check, max_rel_error, random_inputs, run

quantization = pytest.importorskip("onnxruntime.quantization")
ROOT = Path(__file__).resolve().parents[1]
FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)


class _Reader(quantization.CalibrationDataReader):
    def __init__(self, model: onnx.ModelProto, n: int = 8) -> None:
        self.samples = iter([random_inputs(model, seed=s) for s in range(n)])

    def get_next(self):
        return next(self.samples, None)


def quantize(model: onnx.ModelProto, path: Path, per_channel: bool) -> Path:
    """`model` quantized by onnxruntime (QDQ): int8 per-channel weights, or uint8 per tensor (zero points != 0)."""
    src = path.with_suffix(".float.onnx")
    onnx.save(model, src)
    kind = quantization.QuantType.QInt8 if per_channel else quantization.QuantType.QUInt8
    quantization.quantize_static(
        str(src), str(path), _Reader(model), quant_format=quantization.QuantFormat.QDQ, per_channel=per_channel,
        weight_type=kind, activation_type=quantization.QuantType.QUInt8,
    )  # fmt: skip
    return path


def _source(name: str) -> onnx.ModelProto:
    if name.startswith("fashion_mnist"):
        path = ROOT / "models" / f"{name}.onnx"
        if not path.is_file():
            pytest.skip(f"{path} not built")
        return onnx.load(path)
    return TEST_MODELS[name]()


MODELS = ["fashion_mnist_cnn", "fashion_mnist_resnet", "chain", "residual", "concat", "depthwise", "gemm_head",
          "attention"]


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    cache: dict[tuple[str, bool], onnx.ModelProto] = {}

    def get(name: str, per_channel: bool) -> onnx.ModelProto:
        if (name, per_channel) not in cache:
            path = tmp_path_factory.mktemp("qdq") / f"{name}.onnx"
            cache[name, per_channel] = canonical(onnx.load(quantize(_source(name), path, per_channel)))
        return cache[name, per_channel]

    return get


def _quantized_weight_inputs(model: onnx.ModelProto) -> list[str]:
    """The weight inputs of Conv/Gemm/MatMul that are dequantized integers."""
    graph = ModelGraph(model)
    out = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            producer = graph.producer.get(node.input[1])
            if producer is not None and producer.op_type == "DequantizeLinear" and dequantizer(graph, producer.input[0]):
                out.append(node.input[1])
    return out


@pytest.mark.parametrize("per_channel", [True, False], ids=["int8-per-channel", "uint8-per-tensor"])
@pytest.mark.parametrize("name", MODELS)
def test_every_group_of_a_qdq_model_is_dead_channel_equivalent(name, per_channel, qdq):
    model = qdq(name, per_channel)
    graph = ModelGraph(model)
    assert _quantized_weight_inputs(model), "onnxruntime quantized no weight"
    analysis = analyze(graph)
    float_groups = analyze(ModelGraph(canonical(_source(name)))).groups
    assert sorted(g.size for g in analysis.groups) == sorted(g.size for g in float_groups), "QDQ hid some groups"
    assert not [b for b in analysis.barriers if "Quantize" in b.op_type]
    quantized = set(quantized_initializers(graph))
    assert any(m.tensor in quantized for g in analysis.groups for m in g.param_members)
    inputs = random_inputs(model, seed=1)
    for group in analysis.groups:
        result = dead_channel_check(analysis, group, inputs)
        assert result.error <= 1e-5, f"group {group.id} ({[str(m) for m in group.members]}): {result.error}"


@pytest.mark.parametrize("name", MODELS)
def test_ratio_zero_reproduces_a_qdq_model(name, qdq):
    model = qdq(name, False)
    result = PrunePass(PruneConfig(ratio=0.0)).run(model)
    assert result.modified is False
    inputs = random_inputs(model)
    assert max_rel_error(run(model, inputs), run(result.model, inputs)) == 0.0


@pytest.mark.parametrize("per_channel", [True, False], ids=["int8-per-channel", "uint8-per-tensor"])
def test_a_pruned_qdq_model_stays_quantized(per_channel, qdq, tmp_path, capsys):
    """The CLI prunes the quantized Fashion-MNIST ResNet: the certificate passes, every weight that was a
    dequantized integer still is (smaller), no float copy of a weight appears, and the parameters counted
    include the integer weights."""
    model = qdq("fashion_mnist_resnet", per_channel)
    src, out = tmp_path / "q.onnx", tmp_path / "q.pruned.onnx"
    onnx.save(model, src)
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.3", "--round-to", "1", "--criterion", "l2",
                 "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["verification"]["passed"] and report["verification"]["exact_max_error"] <= 1e-5
    assert report["channels_removed"] > 0 and report["params_after"] < report["params_before"]
    pruned = onnx.load(out)
    assert count_params(ModelGraph(model)) == report["params_before"]
    weights_before, weights_after = _quantized_weight_inputs(model), _quantized_weight_inputs(pruned)
    assert weights_after == weights_before, "a quantized weight became float"
    biggest_float = max(int(np.prod(t.dims)) for t in pruned.graph.initializer if t.data_type in FLOATS)
    biggest_before = max(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in FLOATS)
    assert biggest_float <= biggest_before, "a dequantized weight was folded into a float initializer"
    assert out.stat().st_size < src.stat().st_size
    rows = layer_rows(pruned, model)  # the HTML report's per-layer table sees through DequantizeLinear
    assert len(rows) == len(weights_before)
    assert any(r.channels < r.channels_before for r in rows if r.channels_before is not None)
    inputs = random_inputs(model, seed=2)
    (y,) = run(pruned, inputs)
    assert y.shape == run(model, inputs)[0].shape and np.isfinite(y).all()


def _two_convs(scales: np.ndarray, ints: np.ndarray) -> onnx.ModelProto:
    """``x -> Conv(DQ(ints, per-channel scales)) -> Relu -> Conv(float) -> y`` (4 channels between)."""
    c = len(scales)
    inits = [
        numpy_helper.from_array(ints.astype(np.int8), "wq"),
        numpy_helper.from_array(scales.astype(np.float32), "ws"),
        numpy_helper.from_array(np.zeros(c, np.int8), "wz"),
        numpy_helper.from_array(np.ones((2, c, 1, 1), np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w1"], axis=0),
        helper.make_node("Conv", ["x", "w1"], ["t"]),
        helper.make_node("Relu", ["t"], ["u"]),
        helper.make_node("Conv", ["u", "w2"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    return canonical(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


def test_scoring_reads_the_dequantized_weights():
    """Channel 0 holds the largest integers but the smallest scale: by its real (dequantized) weights it is the
    weakest and goes first; the raw integers would rank it first."""
    ints = np.stack([np.full((3, 1, 1), v) for v in (120, 40, 50, 60)])
    scales = np.array([0.001, 0.05, 0.05, 0.05])
    model = _two_convs(scales, ints)
    graph = ModelGraph(model)
    np.testing.assert_allclose(effective_value(graph, "wq"), ints * scales[:, None, None, None], rtol=1e-6)
    (w1,) = run(_with_output(model, "w1"), random_inputs(model))[-1:]
    np.testing.assert_allclose(effective_value(graph, "wq"), w1, rtol=1e-6)  # what onnxruntime dequantizes
    for criterion in ("l1", "l2", "lamp"):
        result = PrunePass(PruneConfig(ratio=0.25, criterion=criterion)).run(model)
        kept = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "wq"))
        assert kept.shape[0] == 3 and (kept[:, 0, 0, 0] != 120).all(), (criterion, kept[:, 0, 0, 0])


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.append(helper.make_empty_tensor_value_info(name))
    return out


def test_small_quantized_weights_are_not_folded_into_floats():
    model = _two_convs(np.full(4, 0.01), np.ones((4, 3, 1, 1)))
    assert model.graph.node[0].op_type == "DequantizeLinear"
    assert {t.name: t.data_type for t in model.graph.initializer}["wq"] == TensorProto.INT8


@pytest.mark.parametrize(
    "args",
    [
        ["--criterion", "obs"],  # its data-free surrogate: no float layer to read
        ["--mode", "unconstrained"],
    ],
    ids=lambda a: " ".join(a),
)
def test_options_that_need_float_weights_are_refused_in_one_line(args, qdq, tmp_path, capsys):
    model = qdq("chain", True)
    src, out = tmp_path / "q.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    np.savez(tmp_path / "calib.npz", **{k: np.concatenate([random_inputs(model, seed=s)[k] for s in range(4)])
                                        for k in random_inputs(model)})  # fmt: skip
    args = [str(tmp_path / "calib.npz") if a == "CALIB" else a for a in args]
    ratio = [] if "--ratio" in args else ["--ratio", "0.3"]
    assert main(["prune", str(src), "-o", str(out), "--round-to", "1", *ratio, *args]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "note:" not in line]
    assert len(err) == 1 and "quantized (QDQ" in err[0] and "--calib" in err[0] and "prune the float model" in err[0], err
    assert not out.exists()


def test_blocked_quantization_is_a_barrier():
    inits = [
        numpy_helper.from_array(np.ones((4, 4), np.int8), "wq"),
        numpy_helper.from_array(np.full((4, 2), 0.1, np.float32), "ws"),
        numpy_helper.from_array(np.ones((3, 4), np.float32), "w0"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["t"]),
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["w1"], axis=1, block_size=2),
        helper.make_node("MatMul", ["t", "w1"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)  # fmt: skip
    model = canonical(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    analysis = analyze(ModelGraph(model))
    (barrier,) = [b for b in analysis.barriers if b.op_type == "DequantizeLinear"]
    assert barrier.reason.startswith("blocked quantization (block_size)")


def _fake_quantized(per_channel: bool) -> onnx.ModelProto:
    """Quantization-aware exports keep float weights and quantize them in the graph:
    ``x -> Conv(DQ(Q(W1))) -> QDQ -> Relu -> Conv(DQ(Q(W2))) -> y`` (W1 per output channel or per tensor)."""
    rng = np.random.default_rng(0)
    c = 6
    w1_scale = rng.uniform(0.01, 0.03, c) if per_channel else np.array(0.02)
    inits = [
        numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(w1_scale.astype(np.float32), "w1s"),
        numpy_helper.from_array(np.zeros(w1_scale.shape, np.int8), "w1z"),
        numpy_helper.from_array(rng.standard_normal((4, c, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(0.02, np.float32), "w2s"),
        numpy_helper.from_array(np.array(0, np.int8), "w2z"),
        numpy_helper.from_array(np.array(0.05, np.float32), "as"),
        numpy_helper.from_array(np.array(128, np.uint8), "az"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["w1", "w1s", "w1z"], ["w1q"], axis=0),
        helper.make_node("DequantizeLinear", ["w1q", "w1s", "w1z"], ["w1d"], axis=0),
        helper.make_node("Conv", ["x", "w1d"], ["t"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["t", "as", "az"], ["tq"]),
        helper.make_node("DequantizeLinear", ["tq", "as", "az"], ["td"]),
        helper.make_node("Relu", ["td"], ["u"]),
        helper.make_node("QuantizeLinear", ["w2", "w2s", "w2z"], ["w2q"]),
        helper.make_node("DequantizeLinear", ["w2q", "w2s", "w2z"], ["w2d"]),
        helper.make_node("Conv", ["u", "w2d"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "fake_quant", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    return canonical(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_fake_quantized_float_weights(per_channel):
    """``DequantizeLinear(QuantizeLinear(W))`` on a float W: W is the weight (scored, role 'weight'), the
    channels between the convs are one group, masked and pruned agree, and a pruned model still runs."""
    model = _fake_quantized(per_channel)
    analysis = analyze(ModelGraph(model))
    assert analysis.roles.get("w1") == "weight" and analysis.roles.get("w2") == "weight"
    (group,) = analysis.groups
    assert group.size == 6 and {"w1", "w2"} <= {m.tensor for m in group.param_members}
    inputs = random_inputs(model, seed=5)
    assert dead_channel_check(analysis, group, inputs).error <= 1e-5
    result = PrunePass(PruneConfig(ratio=0.5, criterion="l2")).run(model)
    value = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    rows = np.sqrt((value["w1"] ** 2).sum(axis=(1, 2, 3)))
    cols = np.sqrt((value["w2"] ** 2).sum(axis=(0, 2, 3)))
    expected = sorted(np.argsort(rows / rows.mean() + cols / cols.mean())[3:].tolist())  # the float weights' l2
    w1 = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "w1"))
    kept = [int(np.flatnonzero((value["w1"] == row).all(axis=(1, 2, 3)))[0]) for row in w1]
    assert kept == expected
    inputs = random_inputs(model, seed=6)
    assert np.isfinite(run(result.model, inputs)[0]).all()
    # calibrated: the statistics and the repairs read the fake-quantized values as floats (`float_view`), and the
    # repaired weights go back behind their QuantizeLinear -> DequantizeLinear, still floats
    from onnxprune.quantized_repair import float_view

    view, removed = float_view(model)
    assert set(removed) == {"w1", "w2"} and not any(n.op_type.endswith("QuantizeLinear") and n.input[0] in removed
                                                    for n in view.graph.node)  # fmt: skip
    assert max_rel_error(run(model, inputs), run(view, inputs)) == 0.0  # the view reads the rounded values
    calib = {"x": np.random.default_rng(0).random((16, 3, 5, 5), np.float32)}
    errors = {}
    for criterion, repair in (("l2", "none"), ("l2", "seq"), ("obs", "ls")):
        pruned = PrunePass(PruneConfig(ratio=0.5, criterion=criterion, repair=repair), calib=calib).run(model).model
        fed = {n.input[0]: n.op_type for n in pruned.graph.node if n.op_type == "QuantizeLinear"}
        assert fed.keys() >= {"w1", "w2"} and ModelGraph(pruned).dtype("w1") == TensorProto.FLOAT
        errors[criterion, repair] = max_rel_error(run(model, inputs), run(pruned, inputs))
    assert errors["l2", "seq"] < errors["l2", "none"], errors
    # without the float view no layer reads the group as a refittable weight: the repair has nothing to do (it
    # crashed in onnxruntime on an empty probe before)
    from onnxprune.calibration import CalibrationData
    from onnxprune.repair import repair_sequential

    same, report = repair_sequential(analysis, group.labels[:3], CalibrationData(calib))
    assert same is model and not report.repaired


def test_latency_tables_time_quantized_layers_as_integer_kernels(qdq, tmp_path):
    """A QDQ conv is timed as the pattern onnxruntime fuses (DequantizeLinear -> Conv -> QuantizeLinear becomes
    QLinearConv), not as a float conv; float layers keep their signatures (and cached timings)."""
    import onnxruntime as ort

    from onnxprune.latency.microbench import dense_variant, micro_model, touched_ops

    model = qdq("fashion_mnist_cnn", True)
    analysis = analyze(ModelGraph(model))
    touches = [t for g in analysis.groups for t in touched_ops(analysis, g)[0]]
    convs = [t for t in touches if t.spec.op_type == "Conv"]
    assert convs and all(t.spec.qdq for t in convs)
    fused = set()
    for touch in convs:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(micro_model(touch.spec, dense_variant(touch.spec)).SerializeToString(), options)
        fused |= {n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node}
    assert "QLinearConv" in fused and "Conv" not in fused, fused

    float_model = canonical(_source("fashion_mnist_cnn"))
    float_analysis = analyze(ModelGraph(float_model))
    for g in float_analysis.groups:
        for touch in touched_ops(float_analysis, g)[0]:
            assert touch.spec.qdq == () and '"qdq"' not in touch.spec.signature


def test_auto_rounding_measures_a_qdq_model(qdq, tmp_path, capsys):
    model = qdq("fashion_mnist_cnn", True)
    src, out = tmp_path / "q.onnx", tmp_path / "q.pruned.onnx"
    onnx.save(model, src)
    code = main(["prune", str(src), "-o", str(out), "--ratio", "0.3", "--latency-cache", str(tmp_path / "cache"),
                 "--json"])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["latency"] is not None and report["latency"]["pruned_ms"] > 0
    assert report["verification"]["passed"] and _quantized_weight_inputs(onnx.load(out))


def test_a_dequantized_constant_shared_by_layers_is_unshared():
    """Quantizers dequantize a deduplicated constant once for every reader (BERT's all-zero biases: the query
    projection's bias is the embeddings' LayerNorm bias); unshared, each reader keeps its own channels: two
    independent groups here instead of none."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.zeros(4, np.int8), "bq"),
        numpy_helper.from_array(np.array(0.1, np.float32), "bs"),
        numpy_helper.from_array(np.array(0, np.int8), "bz"),
        *(numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
          for n, s in (("w1", (4, 3, 1, 1)), ("w2", (4, 4, 1, 1)), ("w3", (2, 4, 1, 1)))),
    ]  # fmt: skip
    nodes = [
        helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["b"]),
        helper.make_node("Conv", ["x", "w1", "b"], ["t"]),
        helper.make_node("Relu", ["t"], ["u"]),
        helper.make_node("Conv", ["u", "w2", "b"], ["v"]),
        helper.make_node("Relu", ["v"], ["r"]),
        helper.make_node("Conv", ["r", "w3"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model = canonical(original)
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == 2
    analysis = analyze(ModelGraph(model))
    assert sorted(g.size for g in analysis.groups) == [4, 4]
    inputs = random_inputs(model, seed=3)
    assert max_rel_error(run(original, inputs), run(model, inputs)) == 0.0
    for group in analysis.groups:
        assert dead_channel_check(analysis, group, inputs).error <= 1e-6


def test_a_pruned_qdq_model_compiles_and_matches_onnxruntime(qdq, tmp_path, capsys):
    """The pruned quantized model goes through the TVM backend like any other: the x86 bundle's outputs are
    onnxruntime's."""
    from tests.tvm_helpers import HAVE_TVM, skip_unless_tools

    if not HAVE_TVM:
        pytest.skip("apache-tvm not installed (bash .ci/install-tvm.sh)")
    skip_unless_tools("g++", package_hint="apt-get install g++")
    model = qdq("fashion_mnist_cnn", True)
    src, pruned, bundle = tmp_path / "q.onnx", tmp_path / "q.pruned.onnx", tmp_path / "bundle"
    onnx.save(model, src)
    assert main(["prune", str(src), "-o", str(pruned), "--ratio", "0.3", "--round-to", "1"]) == 0
    assert main(["compile", str(pruned), "--target", "x86", "-o", str(bundle)]) == 0
    inputs = random_inputs(model, seed=7)
    np.savez(tmp_path / "in.npz", **inputs)
    assert main(["run", str(bundle), "--inputs", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz")]) == 0
    with np.load(tmp_path / "out.npz") as z:
        (got,) = [z[k] for k in z.files]
    (expected,) = run(onnx.load(pruned), inputs)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def test_malformed_quantization_parameters_are_barriers():
    """A per-channel scale along an axis the weight does not have, or of another length: a barrier, never a
    crash (the checker lets both through; onnxruntime fails only when it runs them)."""
    for axis, length in ((7, 4), (0, 3)):
        model = _two_convs(np.full(4, 0.01), np.ones((4, 3, 1, 1)))
        dq = model.graph.node[0]
        for a in dq.attribute:
            if a.name == "axis":
                a.i = axis
        for t in model.graph.initializer:
            if t.name in ("ws", "wz"):
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t)[:1].repeat(length), t.name))
        graph = ModelGraph(model)
        assert dequantizer(graph, "wq") is None
        analysis = analyze(graph)
        assert any(b.op_type == "DequantizeLinear" for b in analysis.barriers) or not analysis.groups
        result = PrunePass(PruneConfig(ratio=0.5)).run(model)  # no crash, nothing wrong removed
        assert result.model is not None


def test_a_parameter_target_counts_the_quantized_weights(qdq, tmp_path, capsys):
    """``--target-params 70%`` on a QDQ model keeps 70% of its parameters, integer weights included (the
    predicted counts once saw only float tensors: the target read as met, nothing was removed)."""
    model = qdq("fashion_mnist_resnet", True)
    src, out = tmp_path / "q.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    assert main(["prune", str(src), "-o", str(out), "--target-params", "70%", "--round-to", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params_before"] == count_params(ModelGraph(model))
    assert 0.6 * report["params_before"] < report["params_after"] <= 0.7 * report["params_before"]
    assert report["params_after"] == count_params(ModelGraph(onnx.load(out)))


def test_the_sequential_repair_refits_quantized_weights_and_quantizes_them_again(qdq, tmp_path, capsys):
    """``--repair seq`` on a QDQ model: the layers are refitted as floats (`quantized_repair.float_view`) and written
    back as integers on their own scales; the model stays QDQ, the certificate passes, and the pruned model is
    nearer the original than without the repair."""
    model = qdq("fashion_mnist_resnet", True)
    src = tmp_path / "q.onnx"
    onnx.save(model, src)
    name = model.graph.input[0].name
    samples = [random_inputs(model, seed=s)[name] for s in range(64)]
    np.savez(tmp_path / "calib.npz", **{name: np.concatenate(samples)})
    outputs = {}
    for repair in ("none", "seq"):
        out = tmp_path / f"{repair}.onnx"
        assert main(["prune", str(src), "-o", str(out), "--ratio", "0.4", "--round-to", "1", "--repair", repair,
                     "--calib", str(tmp_path / "calib.npz"), "--json"]) == 0  # fmt: skip
        report = json.loads(capsys.readouterr().out)
        assert report["verification"]["passed"]
        pruned = onnx.load(out)
        assert _quantized_weight_inputs(pruned) == _quantized_weight_inputs(model), "a weight stayed float"
        outputs[repair] = (report, pruned)
    requantized = outputs["seq"][0]["repair"]["requantized"]
    assert requantized["tensors"] > 0 and requantized["clipped"] == 0  # scales grew where values outgrew them
    fused = [_fused_integer_convs(m, tmp_path) for m in (model, outputs["seq"][1])]
    assert fused[0] > 0 and fused[1] == fused[0], "a bias scale no longer equals input x weight scale"
    inputs = random_inputs(model, seed=99)
    (reference,) = run(model, inputs)
    errors = {r: max_rel_error([reference], run(m, inputs)) for r, (_, m) in outputs.items()}
    assert errors["seq"] < errors["none"], errors


@pytest.mark.parametrize("criterion,repair", [("obs", "seq"), ("obs", "ls"), ("apoz", "ls")])
def test_calibrated_criteria_and_repairs_read_the_dequantized_layers(criterion, repair, qdq, tmp_path, capsys):
    """With --calib, the data criteria and every repair work on a QDQ model: the statistics are collected on its
    float view (every quantized layer is a consumer there, so OBS scores every group from Hessians, not its
    magnitude fallback), the repaired weights are quantized again, the certificate passes, and the repaired model
    is nearer the original than the same selection unrepaired."""
    from onnxprune.calibration import CalibrationData
    from onnxprune.criteria import get_criterion
    from onnxprune.passes.select import calibration_statistics

    model = qdq("fashion_mnist_resnet", True)
    src = tmp_path / "q.onnx"
    onnx.save(model, src)
    name = model.graph.input[0].name
    calib = np.concatenate([random_inputs(model, seed=s)[name] for s in range(48)])
    np.savez(tmp_path / "calib.npz", **{name: calib})
    config = PruneConfig(criterion=criterion, repair=repair)
    stats = calibration_statistics(config, model, CalibrationData({name: calib}))
    analysis = analyze(ModelGraph(model))
    scorer = get_criterion(criterion, 0, stats, "ls")
    assert all(scorer.consumer_members(g, analysis) for g in analysis.groups), "a group without its quantized readers"
    outputs = {}
    for rep in ("none", repair):
        out = tmp_path / f"{rep}.onnx"
        assert main(["prune", str(src), "-o", str(out), "--ratio", "0.4", "--round-to", "1", "--criterion", criterion,
                     "--repair", rep, "--calib", str(tmp_path / "calib.npz"), "--json"]) == 0  # fmt: skip
        report = json.loads(capsys.readouterr().out)
        assert report["verification"]["passed"]
        pruned = onnx.load(out)
        assert _quantized_weight_inputs(pruned) == _quantized_weight_inputs(model), "a weight stayed float"
        outputs[rep] = (report, pruned)
    assert outputs["none"][0]["plan"] == outputs[repair][0]["plan"]
    assert outputs[repair][0]["repair"]["requantized"]["tensors"] > 0
    inputs = random_inputs(model, seed=99)
    (reference,) = run(model, inputs)
    errors = {r: max_rel_error([reference], run(m, inputs)) for r, (_, m) in outputs.items()}
    assert errors[repair] < errors["none"], errors


def _fused_integer_convs(model: onnx.ModelProto, tmp_path: Path) -> int:
    """How many convolutions onnxruntime fuses into QLinearConv (it needs bias scale = input x weight scale)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(model.SerializeToString(), options)
    return sum(n.op_type == "QLinearConv" for n in onnx.load(tmp_path / "fused.onnx").graph.node)


def test_requantize_grows_only_the_scales_that_must():
    """A repaired channel three times larger than its range gets a scale three times larger; the others keep
    theirs; the dequantized values are the repaired ones to within half a step."""
    from onnxprune.quantized_repair import float_view, requantize

    ints = np.stack([np.full((3, 1, 1), v) for v in (100, 40, 50, 60)])
    model = _two_convs(np.array([0.01, 0.02, 0.02, 0.02]), ints)
    view, removed = float_view(model)
    assert "wq" in removed and not any(n.op_type == "DequantizeLinear" for n in view.graph.node)
    value = numpy_helper.to_array(next(t for t in view.graph.initializer if t.name == "wq")).copy()
    value[0] *= 3.81  # 1.0 -> 3.81: 381 steps of 0.01, past int8's 127
    for t in view.graph.initializer:
        if t.name == "wq":
            t.CopyFrom(numpy_helper.from_array(value, "wq"))
    back, report = requantize(view, removed, model)
    assert report.as_dict() == {"tensors": 1, "values": 12, "clipped": 0}
    graph = ModelGraph(back)
    scale = graph.initializer_value("ws")
    np.testing.assert_allclose(scale, [0.03, 0.02, 0.02, 0.02], rtol=1e-6)
    np.testing.assert_allclose(effective_value(graph, "wq"), value, atol=0.5 * scale.max() + 1e-7)
    assert graph.initializers["wq"].data_type == TensorProto.INT8 and back.graph.node[0].op_type == "DequantizeLinear"


def test_gradual_selection_repairs_quantized_weights_at_every_step(qdq, tmp_path, capsys):
    model = qdq("fashion_mnist_cnn", True)
    src, out = tmp_path / "q.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    name = model.graph.input[0].name
    np.savez(tmp_path / "calib.npz", **{name: np.concatenate([random_inputs(model, seed=s)[name] for s in range(32)])})
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.3", "--steps", "2", "--repair", "seq",
                 "--round-to", "1", "--calib", str(tmp_path / "calib.npz"), "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["verification"]["passed"] and report["repair"]["requantized"]["tensors"] > 0
    assert _quantized_weight_inputs(onnx.load(out)) == _quantized_weight_inputs(model)


def test_activation_quantization_is_bypassed_in_the_exact_check(qdq):
    """`without_activation_quantization` drops the run-time QuantizeLinear -> DequantizeLinear pairs and keeps the
    dequantized weights; a float model has none (None)."""
    from onnxprune.quantized import without_activation_quantization

    model = qdq("residual", True)
    bypassed = without_activation_quantization(model)
    assert bypassed is not None and without_activation_quantization(bypassed) is None
    assert without_activation_quantization(_source("residual")) is None
    graph = ModelGraph(bypassed)
    assert _quantized_weight_inputs(bypassed) == _quantized_weight_inputs(model)  # the weights stay integers
    assert all(graph.producer.get(n.input[0]) is None or graph.producer[n.input[0]].op_type != "QuantizeLinear"
               for n in bypassed.graph.node if n.op_type == "DequantizeLinear")  # fmt: skip
    inputs = random_inputs(model, seed=3)
    float_out, quant_out, bypass_out = run(_source("residual"), inputs), run(model, inputs), run(bypassed, inputs)
    assert max_rel_error(float_out, bypass_out) < max_rel_error(float_out, quant_out)  # only the weights' rounding


def test_an_exact_pruning_of_a_quantized_resnet_is_certified(tmp_path, capsys, monkeypatch):
    """ResNet-18 (torchvision, 96x96) quantized by onnxruntime and pruned exactly: with its activation quantizers
    the masked original and the pruned model differ where float round-off crosses a rounding boundary (a whole
    step; the check failed, exit 1); the certificate compares them with the quantizers bypassed."""
    torch = pytest.importorskip("torch")
    from models.zoo_builders import _torchvision

    torchvision = _torchvision()
    torch.manual_seed(0)
    float_path, pre, src = tmp_path / "r18.onnx", tmp_path / "pre.onnx", tmp_path / "q.onnx"
    torch.onnx.export(torchvision.models.resnet18(num_classes=10).eval(), (torch.randn(1, 3, 96, 96),), float_path,
                      dynamo=False, opset_version=17, do_constant_folding=False, input_names=["x"])  # fmt: skip
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
    rng = np.random.default_rng(0)

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.samples = iter([{"x": rng.standard_normal((1, 3, 96, 96)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.samples, None)

    quantization.quantize_static(str(pre), str(src), Reader(), quant_format=quantization.QuantFormat.QDQ,
                                 per_channel=True)  # fmt: skip
    out = tmp_path / "out.onnx"
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.3", "--verify", "--json"]) == 0
    cert = json.loads(capsys.readouterr().out)["verification"]
    assert cert["passed"] and cert["exact_max_error"] < 1e-5 and cert["inputs"].endswith("activation quantization bypassed")
    out.unlink()
    monkeypatch.setattr("onnxprune.certificate.without_activation_quantization", lambda model: None)
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.3", "--verify", "--json"]) == 1  # as it was
    assert "verification failed" in capsys.readouterr().err and not out.exists()


def test_knapsack_curves_of_a_qdq_model_are_measured_with_its_layers_repaired(qdq):
    """The knapsack's error curves of a QDQ model come from its float view, where the measurement's ls repair
    refits the quantized layers (on the QDQ model itself no layer is a refittable float weight): one row per
    group of the QDQ analysis, and lower errors than the same curves measured on the QDQ graph."""
    from onnxprune import allocation_knapsack as knapsack
    from onnxprune.calibration import CalibrationData
    from onnxprune.passes.select import measure_sensitivity

    model = qdq("fashion_mnist_resnet", True)
    name = model.graph.input[0].name
    data = CalibrationData({name: np.concatenate([random_inputs(model, seed=s)[name] for s in range(24)])})
    analysis = analyze(ModelGraph(model))
    config = PruneConfig(criterion="l2", repair="seq", allocation="knapsack", target_params="70%")
    rows = measure_sensitivity(config, analysis, None, data).rows
    direct = {r.group: r for r in knapsack.measure_curves(model, data, "l2", "seq")}
    assert sorted(r.group for r in rows) == sorted(direct) == sorted(g.id for g in analysis.groups)
    assert all(r.channels == analysis.groups[r.group].size for r in rows)
    view_err = np.nanmean([r.errors[-1] for r in rows])
    qdq_err = np.nanmean([direct[r.group].errors[-1] for r in rows])
    assert view_err < 0.9 * qdq_err, (view_err, qdq_err)
    config = PruneConfig(criterion="l2", repair="bias", allocation="sensitivity", target_params="70%")
    rows = measure_sensitivity(config, analysis, None, data.head(2)).rows  # the coarser curves: the same view
    assert sorted(r.group for r in rows) == sorted(g.id for g in analysis.groups)


@pytest.mark.parametrize("args", [["--sparsity", "0.5"], ["--pattern", "nm:2:4", "--repair", "ls", "--calib", "CALIB"]],
                         ids=["50%", "2:4 ls"])
def test_a_qdq_model_is_sparsified_and_stays_quantized(args, qdq, tmp_path, capsys):
    """``--sparsity`` / ``--pattern`` on a QDQ model: zeroed (and repaired) on the float view, quantized again; the
    zeros are zero points, so the dequantized weights hold the pattern; integer weights stay integers."""
    from onnxprune.quantized_repair import float_view
    from onnxprune.sparsity import sparse_layers
    from onnxprune.sparsity.patterns import check_mask, parse_pattern

    model = qdq("fashion_mnist_cnn", False)  # per tensor, uint8 weights: zero points are not 0
    src, out = tmp_path / "q.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    name = model.graph.input[0].name
    np.savez(tmp_path / "calib.npz", **{name: np.concatenate([random_inputs(model, seed=s)[name] for s in range(16)])})
    args = [str(tmp_path / "calib.npz") if a == "CALIB" else a for a in args]
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0", *args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["sparsity"]
    pruned = onnx.load(out)
    assert _quantized_weight_inputs(pruned) == _quantized_weight_inputs(model)
    view = ModelGraph(float_view(pruned)[0])
    layers = [layer for layer in sparse_layers(view) if not layer.skip]
    assert layers and report["achieved"] >= 0.49
    assert report["requantized"]["tensors"] >= len(layers)  # every zeroed layer went back to its integers
    for layer in layers:
        m = layer.matrix(view.initializer_value(layer.weight))
        if "nm:2:4" in args:
            assert check_mask(m != 0, parse_pattern("nm:2:4"))
    zeros = sum(int((layer.matrix(view.initializer_value(layer.weight)) == 0).sum()) for layer in layers)
    assert zeros >= 0.49 * sum(layer.size for layer in layers)


def test_a_quantized_scalar_constant_survives_the_requantization():
    """A quantized scalar read by an elementwise node (a transformer's attention scale, quantized by onnxruntime)
    comes back unchanged; requantizing it divided by its rank 0 (an internal error on BERT)."""
    from onnxprune.quantized_repair import float_view, requantize

    model = _two_convs(np.array([0.01, 0.02, 0.02, 0.02]), np.stack([np.full((3, 1, 1), v) for v in (100, 40, 50, 60)]))
    extra = onnx.ModelProto()
    extra.CopyFrom(model)
    extra.graph.initializer.extend([numpy_helper.from_array(np.array(50, np.int8), "sq"),
                                    numpy_helper.from_array(np.array(0.02, np.float32), "ss")])  # fmt: skip
    extra.graph.node.extend([helper.make_node("DequantizeLinear", ["sq", "ss"], ["s"]),
                             helper.make_node("Mul", ["y", "s"], ["z"])])  # fmt: skip
    del extra.graph.output[:]
    extra.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    view, removed = float_view(extra)
    assert "sq" in removed
    back, report = requantize(view, removed, extra)
    assert report.clipped == 0 and ModelGraph(back).initializer_value("sq") == 50
    inputs = random_inputs(extra, seed=1)
    assert max_rel_error(run(extra, inputs), run(back, inputs)) == 0.0
