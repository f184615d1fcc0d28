"""Sparse kernels on wasm, run under node: group-sparse (``group:1x4``) bundles match onnxruntime within 1e-4
(pointwise convs through the group kernel, 3x3 convs through the phase-plane group kernel, a Gemm through
the run kernel), the weights file
shrinks, and the per-layer dense-or-sparse choice is measured under node (the runner's ``--time`` mode),
cached as the crossover table, and read by the wasm compile (``decided_by: "measured"``). Skips cleanly
without tvm, emcc or node.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import helper, numpy_helper

from tests.tvm_helpers import (
    assert_matches,
    needs_tvm,
    ort_reference,
    random_inputs,
    save_graph,
    skip_unless_tools,
)

pytestmark = needs_tvm


@pytest.fixture
def tune_cache(tmp_path, monkeypatch):
    """A fresh crossover-table cache (timings are never read from another test's run)."""
    monkeypatch.setenv("ONNXPRUNE_TUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _need_wasm_tools() -> None:
    skip_unless_tools("emcc", "node", package_hint="apt-get install emscripten nodejs")


def group_runs(w_kn: np.ndarray, s: float, rng: np.random.Generator, run: int = 4) -> np.ndarray:
    """``w_kn`` ([K, N]) with a ``s`` fraction of its runs of ``run`` along K (one output each) zeroed."""
    k, n = w_kn.shape
    keep = rng.random((k // run, n)) >= s
    return (w_kn * np.repeat(keep, run, axis=0)).astype(np.float32)


def group_cnn(path: Path, *, s: float = 0.8, c: int = 16, hw: int = 8, seed: int = 0) -> Path:
    """1x1 conv (bias, ReLU) -> 3x3 conv (pad 1, bias) -> 1x1 conv stride 2 (ReLU6) -> global pool -> Gemm
    (bias), every weight group-sparse in runs of 4 input channels (the kernels' reduction order
    (kh, kw, c))."""
    rng = np.random.default_rng(seed)

    def conv_w(o: int, i: int, k: int) -> np.ndarray:
        w = group_runs(rng.standard_normal((k * k * i, o)).astype(np.float32) * 0.3, s, rng)
        return np.ascontiguousarray(w.reshape(k, k, i, o).transpose(3, 2, 0, 1))  # OIHW

    inits = [
        numpy_helper.from_array(conv_w(2 * c, c, 1), "w1"),
        numpy_helper.from_array(rng.standard_normal(2 * c).astype(np.float32), "b1"),
        numpy_helper.from_array(conv_w(2 * c, 2 * c, 3), "w2"),
        numpy_helper.from_array(rng.standard_normal(2 * c).astype(np.float32), "b2"),
        numpy_helper.from_array(conv_w(4 * c, 2 * c, 1), "w3"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
        numpy_helper.from_array(np.ascontiguousarray(group_runs(
            rng.standard_normal((4 * c, 10)).astype(np.float32), s, rng).T), "fw"),  # Gemm transB: [N, K]
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fb"),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c2", "w3"], ["c3"], strides=[2, 2]),
        helper.make_node("Clip", ["c3", "lo", "hi"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["gp"]),
        helper.make_node("Flatten", ["gp"], ["fl"]),
        helper.make_node("Gemm", ["fl", "fw", "fb"], ["y"], transB=1),
    ]
    return save_graph(path, nodes, inits, "group_cnn", [1, c, hw, hw], [1, 10])


def pointwise_pair(path: Path, seed: int = 3) -> Path:
    """Two 1x1 convs 128 -> 128 at 14x14 (MobileNet-v1's 5th block), 90% then 30% group-sparse, bias + ReLU."""
    rng = np.random.default_rng(seed)
    inits = []
    for i, s in enumerate((0.9, 0.3)):
        w = group_runs(rng.standard_normal((128, 128)).astype(np.float32) * 0.1, s, rng)  # [K, N]
        inits += [numpy_helper.from_array(np.ascontiguousarray(w.T).reshape(128, 128, 1, 1), f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(128).astype(np.float32), f"b{i}")]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"]),
        helper.make_node("Relu", ["c1"], ["y"]),
    ]
    return save_graph(path, nodes, inits, "pointwise_pair", [1, 128, 14, 14], [1, 128, 14, 14])


def _dense_weight_bytes(model: Path) -> int:
    import onnx

    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(model)).graph.initializer
               if len(t.dims) >= 2)  # fmt: skip


def test_wasm_group_sparse_bundle_matches_onnxruntime(tmp_path, tune_cache):
    """Every layer sparse (``--sparse force``): the bundle's outputs equal onnxruntime's within 1e-4 relative
    under node, and the weights file holds about the stored fifth of the values (+ indices)."""
    _need_wasm_tools()
    from onnxprune.targets import compile_bundle, read_manifest, run_bundle

    model = group_cnn(tmp_path / "m.onnx")
    bundle = compile_bundle(model, "wasm", tmp_path / "b", sparse="force")
    manifest = read_manifest(bundle)
    layers = manifest["sparse"]["layers"]
    assert [e["kind"] for e in layers] == ["conv2d"] * 3 + ["matmul"], layers
    assert all(e["choice"] == "sparse" and e["block"] == [4, 1] for e in layers), layers
    for seed in (0, 1):
        inputs = random_inputs(manifest, seed)
        assert_matches(run_bundle(bundle, inputs), ort_reference(model, inputs))
    ratio = manifest["weights"]["bytes"] / _dense_weight_bytes(model)
    assert ratio < 0.35, ratio  # 20% of the values + one int32 index per run of 4 (+ biases)


def test_wasm_choice_is_measured_under_node_and_read_by_the_compile(tmp_path, tune_cache):
    """The crossover table for wasm is measured under node (both variants of each candidate in one node
    process, interleaved), each layer's choice follows its measured gain, the timings are cached, and the
    wasm compile then decides by them and its bundle still matches onnxruntime."""
    _need_wasm_tools()
    from onnxprune.targets import compile_bundle, read_manifest, run_bundle
    from onnxprune.targets.tvm_sparse_choice import CACHE_FILE, MIN_GAIN
    from onnxprune.targets.tvm_sparse_crossover import measure_crossovers

    model = pointwise_pair(tmp_path / "m.onnx")
    report = measure_crossovers(model, "wasm")
    measured = [e for e in report["layers"] if e["decided_by"] == "measured"]
    assert measured, report["layers"]
    assert all(
        e["dense_us"] > 0 and e["sparse_us"] > 0 and e["measured_on"].startswith("node") for e in measured
    )
    assert [e["layer"] for e in measured] == ["conv0[1x1x128->128]", "conv1[1x1x128->128]"], measured
    # the choice follows the measurement (whether sparse wins is the bench's question: under pytest at load
    # 13-17 the 90% layer measured 0.4-0.8x, run alone 2.4-6.8x; bench/sparse_wasm.py has the numbers)
    for e in measured:
        assert e["gain"] == round(e["dense_us"] / e["sparse_us"], 3)
        assert e["choice"] == ("sparse" if e["gain"] >= MIN_GAIN else "dense"), e
    cache = json.loads((tune_cache / CACHE_FILE).read_text())
    assert sum("wasm32" in k for k in cache) == len(measured)  # keyed by target, shape, pattern
    bundle = compile_bundle(model, "wasm", tmp_path / "b")  # --sparse auto: reads the table
    manifest = read_manifest(bundle)
    by_layer = {e["layer"]: e for e in manifest["sparse"]["layers"]}
    for e in measured:
        got = by_layer[e["layer"]]
        assert (got["decided_by"], got["choice"], got["gain"]) == ("measured", e["choice"], e["gain"])
    assert manifest["sparse"]["sparse_layer_count"] == sum(e["choice"] == "sparse" for e in report["layers"])
    inputs = random_inputs(manifest)
    assert_matches(run_bundle(bundle, inputs), ort_reference(model, inputs))


def three_by_three_cnn(path: Path, seed: int = 5) -> Path:
    """Three 3x3 convs (pad 1 + bias + ReLU, stride 2, dilation 2) for the pruner to make group-sparse."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32) * 0.2, "w1"),
        numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((32, 32, 3, 3)).astype(np.float32) * 0.2, "w2"),
        numpy_helper.from_array(rng.standard_normal((16, 32, 3, 3)).astype(np.float32) * 0.2, "w3"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["c2", "w3"], ["y"], pads=[2, 2, 2, 2], dilations=[2, 2]),
    ]
    return save_graph(path, nodes, inits, "three_by_three", [1, 16, 12, 12], [1, 16, 6, 6])


# wasm in the slow tier (26 s of compiling): its group kernel with padding runs in the default tier
# (`test_wasm_group_sparse_bundle_matches_onnxruntime`), stride and dilation on x86 here
@pytest.mark.parametrize("target", ["x86", pytest.param("wasm", marks=pytest.mark.slow)])
def test_pruned_3x3_group_convs_match_onnxruntime(tmp_path, tune_cache, target):
    """3x3 convs pruned by ``onnxprune prune --pattern group:1x4`` (runs of 4 input channels at one kernel
    tap, the kernels' (kh, kw, c) order) run sparse (``--sparse force``) as runs of 4 (the phase-plane group
    kernel: padding, stride 2, dilation 2) within 1e-4 relative of onnxruntime, on x86 and under node."""
    import platform
    import subprocess
    import sys

    if target == "x86" and platform.machine() != "x86_64":
        pytest.skip("x86 bundles run on x86_64 only")
    if target == "wasm":
        _need_wasm_tools()
    from onnxprune.targets import compile_bundle, read_manifest, run_bundle

    model = three_by_three_cnn(tmp_path / "m.onnx")
    pruned = tmp_path / "p.onnx"
    cmd = [sys.executable, "-m", "onnxprune.cli", "prune", str(model), "--sparsity", "0.7",
           "--pattern", "group:1x4", "-o", str(pruned)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-500:]
    bundle = compile_bundle(pruned, target, tmp_path / "b", sparse="force")
    manifest = read_manifest(bundle)
    layers = manifest["sparse"]["layers"]
    pruned_3x3 = [e for e in layers if e["layer"].startswith("conv") and "[3x3" in e["layer"]]
    assert len(pruned_3x3) == 2 and all(e["choice"] == "sparse" and e["block"] == [4, 1] for e in pruned_3x3), layers
    assert all(e["block_density"] == pytest.approx(1 - e["sparsity"]) for e in pruned_3x3), layers
    for seed in (0, 1):
        inputs = random_inputs(manifest, seed)
        assert_matches(run_bundle(bundle, inputs), ort_reference(pruned, inputs))


@pytest.mark.parametrize("target", ["x86", "wasm"])
def test_pruned_3x3_group_convs_are_measured(tmp_path, tune_cache, monkeypatch, target):
    """Logic only (a fake measurement): the 3x3 convs ``group:1x4`` pruned at 30% and 70% are candidates
    stored as runs of 4 and are timed dense vs sparse (``decided_by: "measured"``), not left to the cost
    model, on x86 and wasm."""
    import onnx

    from onnxprune.sparsity import SparsityConfig, sparsify_model
    from onnxprune.targets import tvm_sparse_choice
    from onnxprune.targets.tvm_sparse_crossover import measure_crossovers

    offered: list[str] = []

    def fake_measure(layers, spec, build, lanes, registers):
        offered.extend(layer.name for layer, _ in layers)
        return [(100.0, 50.0)] * len(layers)

    monkeypatch.setattr(tvm_sparse_choice, "measure", fake_measure)
    model = onnx.load(str(three_by_three_cnn(tmp_path / "m.onnx")))
    for s in (0.3, 0.7):
        pruned, _ = sparsify_model(model, SparsityConfig(sparsity=s, pattern="group:1x4"))
        offered.clear()
        layers = measure_crossovers(pruned, target)["layers"]
        assert [e["layer"] for e in layers] == ["conv1[3x3x32->32]", "conv2[3x3x32->16]"], layers
        assert offered == [e["layer"] for e in layers]
        assert all(e["decided_by"] == "measured" and e["block"] == [4, 1] and e["gain"] == 2.0 for e in layers)


def test_without_a_builder_the_choice_reads_the_crossover_table(tmp_path, tune_cache, monkeypatch):
    """Logic only (a fake measurement, nothing compiled): the timings ``measure_crossovers`` measured for wasm
    decide the layers when the choice has no builder (``decided_by: "measured"``, the same gains), and a
    layer missing from the table falls back to the cost model."""
    from onnxprune.targets import tvm_sparse_choice
    from onnxprune.targets.tvm_sparse_crossover import at_sparse_point, measure_crossovers
    from onnxprune.targets.tvm_tiles import vector_lanes, vector_registers

    def fake_measure(layers, spec, build, lanes, registers):
        assert spec.name == "wasm"
        return [(100.0, 20.0 + 100.0 * i) for i in range(len(layers))]  # 5x, then 0.83x, 0.45x, ...

    monkeypatch.setattr(tvm_sparse_choice, "measure", fake_measure)
    model = group_cnn(tmp_path / "m.onnx", s=0.9)
    measured = measure_crossovers(model, "wasm")["layers"]
    assert [e["decided_by"] for e in measured] == ["measured"] * 4, measured
    assert [e["choice"] for e in measured] == ["sparse", "dense", "dense", "dense"]
    assert measured[0]["gain"] == 5.0 and measured[0]["measured_on"] == "node (wasm, 1 thread)"

    mod, spec, target = at_sparse_point(model, "wasm")
    lanes, registers = vector_lanes(target), vector_registers(target)

    def decide_without_builder() -> list[dict]:
        report: dict = {}
        with target:
            tvm_sparse_choice.apply(mod, "auto", spec, target, lanes, registers, None, report)
        return report["layers"]

    assert decide_without_builder() == measured
    cache_file = tune_cache / tvm_sparse_choice.CACHE_FILE
    table = json.loads(cache_file.read_text())
    table.pop(sorted(table)[0])  # one layer's timings gone: that layer is decided by the cost model
    cache_file.write_text(json.dumps(table))
    layers = decide_without_builder()
    assert sorted(e["decided_by"] for e in layers) == ["cost-model"] + ["measured"] * 3
