"""ReLU-aware refit after the sequential repair (`onnxprune.repair_relu`, `--relu-refit`)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import canonical
from onnx import helper

from models.testmodels import TEST_MODELS
from onnxprune.calibration import CalibrationData, consumers
from onnxprune.channels import analyze
from onnxprune.errors import UsageError
from onnxprune.graph import ModelGraph
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.repair import reanalyze, repair_sequential
from onnxprune.repair_relu import refit_relu, relu_point
from onnxprune.rewrite import apply_mask, apply_plan
from onnxprune.shape_inference import infer_shapes
from onnxprune.verify import max_rel_error, random_inputs, run


def _calib(model, n, seed=0) -> CalibrationData:
    samples = [random_inputs(model, seed=seed + i) for i in range(n)]
    return CalibrationData({k: np.concatenate([s[k] for s in samples]) for k in samples[0]})


def _relu_inputs(model: onnx.ModelProto) -> list[str]:
    return [n.input[0] for n in model.graph.node if n.op_type == "Relu"]


def _post_relu_error(model: onnx.ModelProto, reference: onnx.ModelProto, calib: CalibrationData) -> float:
    """Sum over samples and ReLUs of ||relu(z) - relu(z_ref)||^2 / ||relu(z_ref)||^2."""
    names = _relu_inputs(reference)

    def probe(m: onnx.ModelProto) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(m)
        out.graph.output.extend(helper.make_empty_tensor_value_info(a) for a in names)
        return out

    got_model, want_model = probe(model), probe(reference)
    total = 0.0
    for i in range(calib.n):
        n_out = len(reference.graph.output)
        got, want = run(got_model, calib.sample(i))[n_out:], run(want_model, calib.sample(i))[n_out:]
        for g, w in zip(got, want):
            total += float(np.sum((np.maximum(g, 0) - np.maximum(w, 0)) ** 2) / max(np.sum(np.maximum(w, 0) ** 2), 1e-12))
    return total


def test_relu_point_follows_batchnorm_and_one_stream_add_with_the_batchnorm_scale():
    graph = ModelGraph(canonical(TEST_MODELS["residual"]()))
    points = {c.name: relu_point(graph, c) for c in consumers(graph)}
    convs = {n.name: n for n in graph.nodes if n.op_type == "Conv"}
    assert any(p is not None for p in points.values())
    for name, p in points.items():
        if name not in convs:  # the Gemm head writes the logits: no ReLU
            assert p is None
            continue
        assert p is not None, name
        relu = graph.consumers[p.tensor][0].node
        assert relu.op_type == "Relu"
        bn = graph.consumers[convs[name].output[0]][0].node
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        assert np.allclose(p.scale, graph.const(bn.input[1]) / np.sqrt(graph.const(bn.input[4]) + eps), rtol=1e-6)
    # MobileNet-like blocks: a Clip (ReLU6) clamps at both of its bounds; layers feeding HardSwish have no point
    mobile = ModelGraph(canonical(TEST_MODELS["depthwise"]()))
    found = [relu_point(mobile, c) for c in consumers(mobile)]
    assert None in found
    ops = {graph_op(mobile, p.tensor) for p in found if p is not None}
    assert "Clip" in ops and ops <= {"Relu", "Clip"}
    for p in found:
        if p is not None and graph_op(mobile, p.tensor) == "Clip":
            clip = mobile.consumers[p.tensor][0].node
            assert (p.low, p.high) == (float(mobile.const(clip.input[1])), float(mobile.const(clip.input[2])))


def graph_op(graph: ModelGraph, tensor: str) -> str:
    return graph.consumers[tensor][0].node.op_type


@pytest.mark.parametrize("name", ["chain", "residual", "concat"])
def test_refit_keeps_dead_channel_semantics_and_lowers_the_post_relu_error(name):
    """pruned == masked after the refit (onnxruntime), and on the calibration samples the post-ReLU error
    of every ReLU is lower than after the sequential repair alone."""
    model = canonical(TEST_MODELS[name]())
    calib = _calib(model, 24)
    analysis = analyze(ModelGraph(model))
    labels = PrunePass(PruneConfig(ratio=0.5)).plan(analysis).labels(analysis)
    repaired, _ = repair_sequential(analysis, labels, calib)
    work, work_labels = reanalyze(analysis, labels, repaired, False)
    refitted, report = refit_relu(analysis, labels, work, work_labels, calib)
    assert report.refitted and all(report.error_after[k] < report.error_before[k] for k in report.error_after)
    after, after_labels = reanalyze(analysis, labels, refitted, False)
    inputs = random_inputs(model, seed=99)
    pruned = infer_shapes(apply_plan(after, after_labels))
    assert max_rel_error(run(apply_mask(after, after_labels), inputs), run(pruned, inputs)) <= 1e-5
    seq_error = _post_relu_error(apply_mask(work, work_labels), model, calib)
    relu_error = _post_relu_error(apply_mask(after, after_labels), model, calib)
    assert relu_error < seq_error, (relu_error, seq_error)


def test_refit_is_a_no_op_with_nothing_removed_or_no_iterations():
    model = canonical(TEST_MODELS["residual"]())
    calib = _calib(model, 8)
    analysis = analyze(ModelGraph(model))
    none = np.zeros(0, dtype=int)
    out, report = refit_relu(analysis, none, analysis, none, calib)
    assert out is analysis.graph.model and not report.refitted
    labels = PrunePass(PruneConfig(ratio=0.5)).plan(analysis).labels(analysis)
    repaired, _ = repair_sequential(analysis, labels, calib)
    work, work_labels = reanalyze(analysis, labels, repaired, False)
    out, report = refit_relu(analysis, labels, work, work_labels, calib, iterations=0)
    assert out is work.graph.model and not report.refitted


def test_prune_pass_with_relu_refit_reports_it_and_needs_the_sequential_repair():
    model = canonical(TEST_MODELS["residual"]())
    calib = _calib(model, 16)
    result = PrunePass(PruneConfig(ratio=0.4, repair="seq", relu_refit=True), calib=calib)(model)
    refit = result.info["summary"]["repair"]["relu_refit"]
    assert refit["refitted"] > 0 and refit["error_after"] < refit["error_before"]
    plain = PrunePass(PruneConfig(ratio=0.4, repair="seq"), calib=calib)(model)
    assert "relu_refit" not in plain.info["summary"]["repair"]
    inputs = random_inputs(model, seed=5)
    # the same removal: the refit changes values only
    assert [i.dims for i in result.model.graph.initializer] == [i.dims for i in plain.model.graph.initializer]
    assert max_rel_error(run(model, inputs), run(result.model, inputs)) < 1.0
    with pytest.raises(UsageError, match="--repair seq"):
        PruneConfig(repair="ls", relu_refit=True)


@pytest.mark.parametrize("name", ["residual", "depthwise"])
def test_relu_inputs_computed_from_the_layer_rows_match_the_model(name):
    """z = scale * (x W^T + b) + shift (+ the stream input): what the refit computes from a layer's input rows
    and its residual Add's other input equals the ReLU input onnxruntime computes, on every drawn row."""
    from onnxprune.calibration import hessian_rows, output_rows

    model = canonical(TEST_MODELS[name]())
    graph = ModelGraph(model)
    sample = random_inputs(model, seed=3)
    points = [(c, p) for c in consumers(graph) if (p := relu_point(graph, c)) is not None]
    assert points and (name != "residual" or any(p.other is not None for _, p in points))
    names = sorted({c.x for c, _ in points} | {p.tensor for _, p in points}
                   | {p.other for _, p in points if p.other is not None})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    values = dict(zip(names, run(probe, sample)[len(model.graph.output):]))
    for c, p in points:
        picks: list = []
        rows = hessian_rows(values[c.x], c, c.weight_shape(graph), 10**6, np.random.default_rng(0), picks)
        w = c.weight_matrix(graph.initializer_value(c.weight))
        other = None if p.other is None else output_rows(values[p.other], c, picks)
        z = p.z_rows(rows @ w.T + p.bias, other)
        want = output_rows(values[p.tensor], c, picks)
        assert np.allclose(z, want, rtol=1e-4, atol=1e-4 * np.abs(want).max()), c.name


@pytest.mark.parametrize("name", sorted(TEST_MODELS))
def test_refit_keeps_dead_channel_semantics_on_every_test_model(name):
    """Whatever the architecture (grouped convs, Concat / Split, attention, fp16, norms): after the refit the
    pruned model computes what the masked original with the refitted values computes."""
    model = canonical(TEST_MODELS[name]())
    calib = _calib(model, 6)
    analysis = analyze(ModelGraph(model))
    labels = PrunePass(PruneConfig(ratio=0.4)).plan(analysis).labels(analysis)
    if not len(analysis.removed_positions(labels)):
        pytest.skip("nothing to remove")
    repaired, _ = repair_sequential(analysis, labels, calib)
    work, work_labels = reanalyze(analysis, labels, repaired, False)
    refitted, report = refit_relu(analysis, labels, work, work_labels, calib)
    after, after_labels = reanalyze(analysis, labels, refitted, False)
    inputs = random_inputs(model, seed=7)
    pruned = infer_shapes(apply_plan(after, after_labels))
    tol = 1e-2 if name == "fp16" else 1e-5
    assert max_rel_error(run(apply_mask(after, after_labels), inputs), run(pruned, inputs)) <= tol
    assert set(report.error_after) == set(report.refitted)
    assert all(report.error_after[k] < report.error_before[k] for k in report.refitted)


def test_cli_relu_refit_reports_it_in_the_json_and_refuses_other_repairs(tmp_path, capsys):
    import json
    from pathlib import Path

    from onnxprune.cli import main

    model_path = Path(__file__).resolve().parents[1] / "models" / "fashion_mnist_cnn.onnx"
    model = onnx.load(str(model_path))
    samples = [random_inputs(model, seed=i) for i in range(8)]
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{k: np.concatenate([s[k] for s in samples]) for k in samples[0]})
    out = tmp_path / "out.onnx"
    args = ["prune", str(model_path), "-o", str(out), "--ratio", "0.3", "--round-to", "1", "--calib", str(calib)]
    assert main([*args, "--repair", "seq", "--relu-refit", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verification"]["passed"] is True
    refit = report["repair"]["relu_refit"]
    assert refit["refitted"] > 0 and refit["error_after"] < refit["error_before"]
    summary = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["onnxprune.summary"])
    assert summary["repair"]["relu_refit"] == refit  # the model says what was done
    assert main([*args, "--repair", "ls", "--relu-refit"]) == 2
    assert "--relu-refit" in capsys.readouterr().err


@pytest.mark.parametrize("bounds", [(0.0, np.inf), (0.0, 6.0), (-np.inf, 6.0), (-np.inf, np.inf)])
@pytest.mark.parametrize("rows", [3, 700])
def test_step_targets_equal_whole_array_passes_bit_for_bit(bounds, rows, monkeypatch):
    """`_step_targets` (row blocks, two threads): the current prediction where both models clamp to the same bound,
    the target elsewhere, exactly as one whole-array pass; the blocks made small so that 700 rows span several
    of them in each half."""
    from onnxprune import repair_relu

    monkeypatch.setattr(repair_relu, "STEP_BLOCK", 64)
    rng = np.random.default_rng(1)
    lo, hi = bounds
    width = 9
    s = (rng.random(width) + 0.5).astype(np.float32)
    zo = (4 * rng.standard_normal((rows, width))).astype(np.float32)
    zc = zo + rng.standard_normal((rows, width)).astype(np.float32)
    target = (zo - zc) / s
    pred = (0.8 * target + 0.3 * rng.standard_normal((rows, width))).astype(np.float32)
    below = (zo <= lo) if np.isfinite(lo) else None
    above = (zo >= hi) if np.isfinite(hi) else None

    zn = s * pred + zc
    clamped = np.zeros(zn.shape, bool)
    if below is not None:
        clamped |= below & (zn <= lo)
    if above is not None:
        clamped |= above & (zn >= hi)
    expected = np.where(clamped, pred, target)
    assert clamped.any() == (below is not None or above is not None)  # the case is exercised

    out = np.full_like(target, np.nan)
    repair_relu._step_targets(out, pred, zc, s, target, below, above, lo, hi)
    assert np.array_equal(out.view(np.int32), expected.view(np.int32))
