"""Sparse kernels (targets/tvm_sparse.py) and the per-layer dense-or-sparse choice (targets/tvm_sparse_choice.py):
compressed formats round-trip, every kernel (block-sparse matmul, group-sparse matmul, pointwise and 3x3 convs
with bias/ReLU/ReLU6 epilogues) matches onnxruntime within 1e-4 on x86 (wasm under node, aarch64 under qemu
where the tools are present), the choice keeps dense where sparse loses, the manifest records it, the weights
file shrinks, ``--sparse off`` is the dense bundle, and CUDA code is generated for the sparse kernels.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from onnx import helper, numpy_helper

from onnxprune.targets.sparse_formats import block_density, choose_block, sparsity, to_bsr
from tests.tvm_helpers import (
    HAVE_TVM,
    assert_matches,
    compile_and_check,
    needs_tvm,
    ort_reference,
    random_inputs,
    save_graph,
    skip_unless_tools,
)


def zero_pattern(
    w_kn: np.ndarray, block: tuple[int, int], sparsity_: float, rng: np.random.Generator
) -> np.ndarray:
    """``w_kn`` with a ``sparsity_`` fraction of its ``block``-shaped tiles zeroed."""
    bk, bn = block
    k, n = w_kn.shape
    keep = rng.random((k // bk, n // bn)) >= sparsity_
    return (w_kn * np.kron(keep, np.ones((bk, bn)))).astype(np.float32)


def sparse_mlp(path: Path, *, k: int = 128, n: int = 256, batch: int = 4, s: float = 0.8,
               block: tuple[int, int] = (1, 16), seed: int = 0) -> Path:  # fmt: skip
    """Gemm (bias, ReLU) then MatMul, both weights block-sparse ([K, N] blocks ``block``)."""
    rng = np.random.default_rng(seed)
    w1 = zero_pattern(rng.standard_normal((k, n)).astype(np.float32) * 0.1, block, s, rng)
    w2 = zero_pattern(rng.standard_normal((n, k)).astype(np.float32) * 0.1, block, s, rng)
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(w1.T), "w1"),  # Gemm transB: [N, K]
        numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b1"),
        numpy_helper.from_array(w2, "w2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    return save_graph(path, nodes, inits, "sparse_mlp", [batch, k], [batch, k])


def sparse_cnn(path: Path, *, s: float = 0.7, seed: int = 1) -> Path:
    """3x3 conv (padding, bias, ReLU), 1x1 conv (ReLU6), 3x3 stride-2 conv with asymmetric padding, 1x1 conv;
    weights group-sparse along the input channels (runs of 4, ``group:1x4``) or along outputs (16x1)."""
    rng = np.random.default_rng(seed)

    def conv_w(o: int, i: int, kh: int, block: tuple[int, int]) -> np.ndarray:
        w = rng.standard_normal((kh * kh * i, o)).astype(np.float32) * 0.2  # [K = (kh, kw, c), N]
        w = zero_pattern(w, block, s, rng)
        return np.ascontiguousarray(w.reshape(kh, kh, i, o).transpose(3, 2, 0, 1))  # OIHW

    inits = [
        numpy_helper.from_array(conv_w(32, 16, 3, (4, 1)), "w1"),
        numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1"),
        numpy_helper.from_array(conv_w(48, 32, 1, (1, 16)), "w2"),
        numpy_helper.from_array(conv_w(32, 48, 3, (1, 16)), "w3"),
        numpy_helper.from_array(conv_w(16, 32, 1, (4, 1)), "w4"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"]),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], pads=[0, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["c3", "w4"], ["y"]),
    ]
    return save_graph(path, nodes, inits, "sparse_cnn", [1, 16, 12, 12], [1, 16, 6, 6])


# ------------------------------------------------------------------------------------------------
# formats (no tvm)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [(1, 1), (4, 1), (1, 4), (1, 16), (8, 8), (16, 32)])
def test_bsr_round_trips(block):
    """Block (16x1, 8x8), group (1x4 along the reduction axis = (4, 1); 4x1 = (1, 4)) and unstructured."""
    rng = np.random.default_rng(0)
    w = zero_pattern(rng.standard_normal((64, 96)).astype(np.float32), block, 0.75, rng)
    bsr = to_bsr(w, block)
    np.testing.assert_array_equal(bsr.to_dense(), w)
    assert bsr.block == block and bsr.indptr[-1] == bsr.nnz_blocks
    assert bsr.density == pytest.approx(block_density(w, block))
    # stored values: the non-zero blocks only (what makes the weights file shrink)
    assert bsr.data.size == bsr.nnz_blocks * block[0] * block[1] < w.size


def test_bsr_of_zero_and_dense_weights():
    zero = to_bsr(np.zeros((8, 32), np.float32), (4, 16))
    assert zero.nnz_blocks == 0 and not zero.to_dense().any() and zero.data.shape[0] == 1
    w = np.arange(1, 8 * 32 + 1, dtype=np.float32).reshape(8, 32)
    dense = to_bsr(w, (4, 16))
    assert dense.density == 1.0 and np.array_equal(dense.to_dense(), w)
    with pytest.raises(ValueError, match="does not tile"):
        to_bsr(w, (3, 16))


def test_choose_block_recognises_the_pattern():
    """A 16x1 block pattern is stored as (1, 16) blocks (one AVX-512 vector); a 4-run group pattern along the
    reduction axis as bk = 4 runs; unstructured 30% sparsity is estimated slower than dense."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((256, 128)).astype(np.float32)
    c = choose_block(zero_pattern(w, (1, 16), 0.9, rng), lanes=16)
    assert c.block == (1, 16) and c.density == pytest.approx(0.1, abs=0.03) and c.relative_cost < 0.3
    g = zero_pattern(w, (4, 1), 0.9, rng)
    assert sparsity(g) == pytest.approx(0.9, abs=0.02)
    cg = choose_block(g, lanes=4)
    assert cg.block[0] % 4 == 0 or cg.block == (4, 1)
    u = w * (rng.random(w.shape) >= 0.3)
    assert choose_block(u.astype(np.float32), lanes=16).relative_cost > 1.0


# ------------------------------------------------------------------------------------------------
# kernels, x86
# ------------------------------------------------------------------------------------------------
def _skip_unless_x86() -> None:
    if not HAVE_TVM:
        pytest.skip("apache-tvm not installed (bash .ci/install-tvm.sh)")
    skip_unless_tools("g++", package_hint="apt-get install g++")


@pytest.fixture
def tune_cache(tmp_path, monkeypatch):
    """A fresh crossover-table cache (timings are never read from another test's run)."""
    monkeypatch.setenv("ONNXPRUNE_TUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@needs_tvm
@pytest.mark.parametrize(
    ("block", "batch"),
    [((1, 16), 1), ((4, 1), 3), pytest.param((4, 4), 4, marks=pytest.mark.slow)],
)
def test_x86_sparse_matmul_matches_onnxruntime(tmp_path, tune_cache, block, batch):
    """Block-sparse (16x1, 4x4) and group-sparse (runs of 4 along K) Gemm+bias+ReLU and MatMul, forced."""
    _skip_unless_x86()
    model = sparse_mlp(tmp_path / "m.onnx", block=block, batch=batch)
    from onnxprune.targets import compile_bundle, read_manifest, run_bundle

    bundle = compile_bundle(model, "x86", tmp_path / "b", sparse="force")
    manifest = read_manifest(bundle)
    inputs = random_inputs(manifest)
    assert_matches(run_bundle(bundle, inputs), ort_reference(model, inputs))
    layers = manifest["sparse"]["layers"]
    assert [e["choice"] for e in layers] == ["sparse", "sparse"]
    assert all(e["decided_by"] == "forced" and e["sparsity"] > 0.7 for e in layers)
    assert manifest["sparse"]["sparse_layer_count"] == 2 and manifest["unscheduled_kernels"] == []


@needs_tvm
def test_x86_sparse_convs_match_onnxruntime(tmp_path, tune_cache):
    """Pointwise and 3x3 convs (padding, stride 2) as direct sparse kernels with bias/ReLU/ReLU6 fused."""
    _skip_unless_x86()
    model = sparse_cnn(tmp_path / "m.onnx")
    manifest = _compile_run_compare(model, "x86", tmp_path / "b", "force")
    layers = manifest["sparse"]["layers"]
    assert [e["kind"] for e in layers] == ["conv2d"] * 4 and all(e["choice"] == "sparse" for e in layers)


def test_choose_block_sends_output_blocks_of_pointwise_convs_to_the_rows_kernel():
    """``group:8x1`` zeros (8 outputs share each kept input) are stored as (1, 8) blocks when the 1x1 conv's
    output-row-blocked kernel is available, and estimated well below dense at 50%; without it they are not."""
    rng = np.random.default_rng(3)
    w = zero_pattern(rng.standard_normal((256, 128)).astype(np.float32), (1, 8), 0.5, rng)
    rows = choose_block(w, lanes=16, align=256, pixel_runs=True, row_blocks=True)
    assert rows.block == (1, 8) and rows.relative_cost == pytest.approx(0.55, abs=0.05)
    assert choose_block(w, lanes=16, align=256, pixel_runs=True).relative_cost > 0.9


@needs_tvm
def test_x86_output_blocked_pointwise_convs_match_onnxruntime(tmp_path, tune_cache):
    """1x1 convs with ``group:8x1`` / ``group:4x1`` zeros (stride 1 and 2, bias, ReLU) run as the rows kernel
    (blocks recorded in the manifest) and match onnxruntime."""
    _skip_unless_x86()
    rng = np.random.default_rng(4)

    def conv_w(o: int, i: int, block: tuple[int, int]) -> np.ndarray:
        w = zero_pattern(rng.standard_normal((i, o)).astype(np.float32) * 0.2, block, 0.5, rng)
        return np.ascontiguousarray(w.T.reshape(o, i, 1, 1))

    inits = [
        numpy_helper.from_array(conv_w(64, 32, (1, 8)), "w1"),
        numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b1"),
        numpy_helper.from_array(conv_w(32, 64, (1, 4)), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["y"], strides=[2, 2]),
    ]
    model = save_graph(tmp_path / "m.onnx", nodes, inits, "rows_cnn", [1, 32, 12, 12], [1, 32, 6, 6])
    manifest = _compile_run_compare(model, "x86", tmp_path / "b", "force")
    layers = manifest["sparse"]["layers"]
    assert [e["block"] for e in layers] == [[1, 8], [1, 4]] and all(e["choice"] == "sparse" for e in layers)


def _compile_run_compare(model: Path, target: str, out: Path, sparse: str) -> dict:
    from onnxprune.targets import compile_bundle, read_manifest, run_bundle

    bundle = compile_bundle(model, target, out, sparse=sparse)
    manifest = read_manifest(bundle)
    inputs = random_inputs(manifest)
    assert_matches(run_bundle(bundle, inputs), ort_reference(model, inputs))
    return manifest


@needs_tvm
def test_weights_file_shrinks_and_sparse_off_is_the_dense_bundle(tmp_path, tune_cache):
    """At 90% block sparsity the weights file holds ~10% of the dense bytes (+ indices); ``--sparse off``
    writes the same weights and outputs as a bundle with no sparse weights at all."""
    _skip_unless_x86()
    from onnxprune.targets import compile_bundle, read_manifest, run_bundle

    model = sparse_mlp(tmp_path / "m.onnx", k=256, n=512, s=0.9)
    sparse = read_manifest(compile_bundle(model, "x86", tmp_path / "s", sparse="force"))
    off = read_manifest(compile_bundle(model, "x86", tmp_path / "d", sparse="off"))
    assert off["sparse"] == {"mode": "off", "layers": []}
    ratio = sparse["weights"]["bytes"] / off["weights"]["bytes"]
    assert 0.08 < ratio < 0.16, ratio  # 10% of the values + 1/16 of an index per stored value
    rep = sparse["sparse"]
    assert rep["sparse_weight_bytes"] < 0.16 * rep["dense_weight_bytes_replaced"]
    inputs = random_inputs(off)
    a = run_bundle(tmp_path / "d", inputs)
    ref = ort_reference(model, inputs)
    assert_matches(a, ref)
    assert (tmp_path / "d" / "weights.bin").stat().st_size == off["weights"]["bytes"]


@needs_tvm
def test_choice_keeps_dense_where_sparse_loses(tmp_path, tune_cache, monkeypatch):
    """``auto``: each candidate's dense and sparse timings decide; a layer whose sparse kernel measures slower
    stays dense (forced here with a fake measurement), a layer with too few zeros is not a candidate, and the
    measured timings are cached (the crossover table) and read back by the next compile."""
    _skip_unless_x86()
    from onnxprune.targets import compile_bundle, read_manifest, run_bundle, tvm_sparse_choice

    calls: list[int] = []

    def fake_measure(layers, spec, build, lanes, registers):
        calls.append(len(layers))
        return [(10.0, 40.0), (30.0, 5.0)][: len(layers)]  # first layer: sparse 4x slower; second: 6x faster

    monkeypatch.setattr(tvm_sparse_choice, "measure", fake_measure)
    model = sparse_mlp(tmp_path / "m.onnx", s=0.9)
    bundle = compile_bundle(model, "x86", tmp_path / "b")
    manifest = read_manifest(bundle)
    layers = manifest["sparse"]["layers"]
    assert manifest["sparse"]["mode"] == "auto" and calls == [2]
    assert [(e["choice"], e["decided_by"]) for e in layers] == [("dense", "measured"), ("sparse", "measured")]
    assert layers[0]["gain"] == 0.25 and layers[1]["gain"] == 6.0
    assert manifest["sparse"]["sparse_layer_count"] == 1
    inputs = random_inputs(manifest)
    assert_matches(run_bundle(bundle, inputs), ort_reference(model, inputs))
    cached = json.loads((tune_cache / tvm_sparse_choice.CACHE_FILE).read_text())
    assert sorted(cached.values()) == [[10.0, 40.0], [30.0, 5.0]]
    # a recompile reads the table: nothing is measured again
    compile_bundle(model, "x86", tmp_path / "b2")
    assert calls == [2]
    # a model with only 10% zeros has no candidate: all dense, nothing measured
    low = sparse_mlp(tmp_path / "low.onnx", s=0.1, seed=3)
    assert read_manifest(compile_bundle(low, "x86", tmp_path / "b3"))["sparse"]["layers"] == []
    assert calls == [2]


@pytest.mark.exclusive
@needs_tvm
@pytest.mark.slow
def test_auto_measures_for_real_and_picks_sparse_at_95_percent(tmp_path, tune_cache):
    """A real measurement: a 95% block-sparse 512x1024 layer at batch 1 measures faster sparse."""
    _skip_unless_x86()
    model = sparse_mlp(tmp_path / "m.onnx", k=512, n=1024, batch=1, s=0.95)
    manifest = compile_and_check(model, "x86", tmp_path / "b")
    layers = manifest["sparse"]["layers"]
    assert all(e["decided_by"] == "measured" and e["dense_us"] > 0 and e["sparse_us"] > 0 for e in layers)
    assert any(e["choice"] == "sparse" and e["gain"] >= 1.1 for e in layers), layers


# ------------------------------------------------------------------------------------------------
# other targets
# ------------------------------------------------------------------------------------------------
@needs_tvm
def test_cuda_sparse_codegen(tmp_path, tune_cache):
    """CUDA: the sparse matmul kernels are generated with their outputs bound to threads and blocks (no
    device needed); the choice there is the cost model's (no measurement without a GPU)."""
    from onnxprune.targets import compile_bundle, read_manifest

    model = sparse_mlp(tmp_path / "m.onnx", s=0.9)
    bundle = compile_bundle(model, "cuda", tmp_path / "b")
    manifest = read_manifest(bundle)
    src = (bundle / "model.cu").read_text()
    kernels = set(re.findall(r"__global__ void \S* ?(sparse_matmul\w*)_kernel\(", src))
    assert len(kernels) == 2, kernels  # one per layer, each with its bias/ReLU fused
    assert "threadIdx.x" in src and "blockIdx.x" in src and "blockIdx.y" in src
    assert [(e["choice"], e["decided_by"]) for e in manifest["sparse"]["layers"]] == [
        ("sparse", "cost-model")
    ] * 2


@needs_tvm
def test_wasm_sparse_kernels_match_onnxruntime_under_node(tmp_path, tune_cache):
    skip_unless_tools("emcc", "node", package_hint="apt-get install emscripten nodejs")
    manifest = _compile_run_compare(sparse_mlp(tmp_path / "m.onnx"), "wasm", tmp_path / "b", "force")
    assert manifest["sparse"]["sparse_layer_count"] == 2


@needs_tvm
@pytest.mark.slow
def test_wasm_sparse_convs_match_onnxruntime_under_node(tmp_path, tune_cache):
    skip_unless_tools("emcc", "node", package_hint="apt-get install emscripten nodejs")
    _compile_run_compare(sparse_cnn(tmp_path / "m.onnx"), "wasm", tmp_path / "b", "force")


@needs_tvm
@pytest.mark.slow
def test_arm_sparse_kernels_match_onnxruntime_under_qemu(tmp_path, tune_cache):
    skip_unless_tools("aarch64-linux-gnu-g++", "qemu-aarch64-static",
                      package_hint="apt-get install g++-aarch64-linux-gnu qemu-user-static")  # fmt: skip
    from onnxprune.errors import ToolchainError
    from onnxprune.targets.toolchains import runtime_libs

    try:
        runtime_libs("aarch64")
    except ToolchainError as e:
        pytest.skip(str(e))
    _compile_run_compare(sparse_mlp(tmp_path / "m.onnx"), "arm", tmp_path / "b", "force")
    _compile_run_compare(sparse_cnn(tmp_path / "c.onnx"), "arm", tmp_path / "c", "force")


def test_parser_has_sparse_flag():
    import argparse

    from onnxprune.targets.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["compile", "m.onnx", "-t", "x86"]).sparse == "auto"
    assert parser.parse_args(["compile", "m.onnx", "-t", "x86", "--sparse", "off"]).sparse == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["compile", "m.onnx", "-t", "x86", "--sparse", "maybe"])
