"""Targets: compiled bundles are executed and their outputs compared with onnxruntime (optimisations off).

x86 runs natively, aarch64 under qemu-user, wasm under node; each skips cleanly (saying what is missing)
where a toolchain or runtime is absent. CUDA code generation is checked without a GPU.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import DataError, ModelError, ToolchainError, UnsupportedModelError, UsageError
from tests.tvm_helpers import (
    FASHION,
    HAVE_TVM,
    assert_matches,
    compile_and_check,
    needs_tvm,
    ort_reference,
    random_inputs,
    save_graph,
    skip_unless_tools,
    tiny_cnn,
    winograd_cnn,
)  # fmt: skip


def test_import_does_not_import_tvm():
    code = "import sys, onnxprune.targets, onnxprune.targets.cli; sys.exit('tvm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_target_table_names_and_aliases():
    from onnxprune.targets import TARGETS, get_target

    assert {"x86", "arm", "wasm", "cuda", "raspberry-pi-4"} <= {t.name for t in TARGETS}
    assert get_target("aarch64").name == "arm"
    assert get_target("RPI4").family == "arm"
    assert get_target("cuda").gpu
    with pytest.raises(UsageError, match="unknown target"):
        get_target("z80")


def test_target_rows_hold_their_export_and_run_strategies():
    """Rows carry strategy objects (no string dispatch on the target's kind anywhere)."""
    import platform

    from onnxprune.targets.exporters import CudaLibrary, SharedLibrary, WasmProgram
    from onnxprune.targets.launch import CudaRunner, NativeRunner, NodeRunner, QemuRunner
    from onnxprune.targets.table import get_target

    kinds = {name: (type(get_target(name).exporter), type(get_target(name).runner))
             for name in ("x86", "raspberry-pi-4", "wasm", "jetson-orin")}  # fmt: skip
    assert kinds == {"x86": (SharedLibrary, NativeRunner), "raspberry-pi-4": (SharedLibrary, QemuRunner),
                     "wasm": (WasmProgram, NodeRunner), "jetson-orin": (CudaLibrary, CudaRunner)}  # fmt: skip
    assert get_target("wasm").exporter.build_kwargs() == {"system_lib": True}
    assert get_target("x86").exporter.build_kwargs() == {"system_lib": False}
    x86, orin = get_target("x86"), get_target("jetson-orin")
    assert x86.runner.can_run_here(x86) == (platform.machine() == "x86_64")
    if platform.machine() != "aarch64":
        assert not orin.runner.can_run_here(orin)
        with pytest.raises(ToolchainError, match="aarch64 host"):
            orin.runner.check(orin)


def test_parse_shapes():
    from onnxprune.targets.cli import parse_shapes

    assert parse_shapes(["image=1,1,28,28", "ids=1x16"]) == {"image": (1, 1, 28, 28), "ids": (1, 16)}
    with pytest.raises(UsageError):
        parse_shapes(["image"])
    with pytest.raises(UsageError):
        parse_shapes(["image=1,a"])


def test_signature_requires_static_shapes(tmp_path):
    from onnxprune.targets.bundle import model_signature

    model = onnx.load(tiny_cnn(tmp_path / "m.onnx", dynamic_batch=True))
    with pytest.raises(UnsupportedModelError, match=r"--shape x=1,3,20,20"):
        model_signature(model)  # without batch_default (compile_bundle passes 1: tests/test_targets_edges.py)
    ins, outs = model_signature(model, {"x": (2, 3, 20, 20)})
    assert ins[0].shape == (2, 3, 20, 20) and outs[0].name == "y"
    with pytest.raises(UsageError, match="fixed"):
        model_signature(model, {"x": (2, 4, 20, 20)})
    with pytest.raises(UsageError, match="unknown input"):
        model_signature(model, {"nope": (1,)})


def test_missing_toolchain_names_the_package(monkeypatch):
    from onnxprune.targets import toolchains
    from onnxprune.targets.table import get_target

    monkeypatch.setattr(toolchains.shutil, "which", lambda _: None)
    with pytest.raises(ToolchainError, match="apt-get install g\\+\\+-aarch64-linux-gnu"):
        toolchains.require(get_target("arm").compiler, "to build arm bundles")


def test_run_rejects_non_bundle(tmp_path):
    from onnxprune.targets import run_bundle

    with pytest.raises(ModelError, match="not a bundle"):
        run_bundle(tmp_path, {})


# ------------------------------------------------------------------------------------------------
# x86: compiled, executed natively, compared with onnxruntime
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def x86_bundle(tmp_path_factory):
    if not HAVE_TVM:
        pytest.skip("apache-tvm not installed (bash .ci/install-tvm.sh)")
    skip_unless_tools("g++", package_hint="apt-get install g++")
    tmp = tmp_path_factory.mktemp("x86")
    model = tiny_cnn(tmp / "tiny.onnx", summary={"ratio": 0.5, "params_before": 100, "params_after": 50})
    manifest = compile_and_check(model, "x86", tmp / "bundle")
    return tmp / "bundle", manifest, model


@needs_tvm
def test_x86_bundle_matches_onnxruntime(x86_bundle):
    _bundle, manifest, _ = x86_bundle
    assert manifest["target"]["name"] == "x86"
    assert manifest["outputs"] == [{"name": "y", "shape": [1, 10], "dtype": "float32"}]
    assert manifest["pruning_summary"] == {"ratio": 0.5, "params_before": 100, "params_after": 50}
    assert set(manifest["files"]) >= {"model.so", "weights.bin", "runner", "runner.cc", "README.md",
                                      "lib/libtvm_runtime.so", "lib/libtvm_ffi.so"}  # fmt: skip
    assert manifest["weights"]["file"] == "weights.bin" and manifest["weights"]["count"] >= 5
    assert manifest["library"] == "model.so"
    assert manifest["runner"] == {"program": "runner", "source": "runner.cc", "kind": "native"}
    assert manifest["runtime"] == ["lib/libtvm_runtime.so", "lib/libtvm_ffi.so"]
    assert manifest["unscheduled_kernels"] == [] and manifest["unscheduled_kernel_count"] == 0
    assert manifest["batch_defaulted_to_1"] == [] and manifest["compile_log"] is None


@needs_tvm
def test_x86_bundle_is_self_contained(x86_bundle, tmp_path):
    """The bundle runs from a copy of its folder alone: runner + model.so + lib/."""
    bundle, manifest, model = x86_bundle
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    inputs = random_inputs(manifest, seed=3)
    np.save(tmp_path / "x.npy", inputs["x"])
    out = tmp_path / "out"
    out.mkdir()
    env = {"PATH": "/usr/bin:/bin"}  # no LD_LIBRARY_PATH, no python
    subprocess.run([str(copy / "runner"), str(copy / "model.so"), str(out), str(tmp_path / "x.npy"),
                    "--weights", str(copy / "weights.bin")], check=True, env=env, cwd=tmp_path)  # fmt: skip
    assert_matches({"y": np.load(out / "output_0.npy")}, ort_reference(model, inputs))


@needs_tvm
@pytest.mark.parametrize("victim", ["model.so", "weights.bin"])
def test_tampered_bundle_is_refused(x86_bundle, tmp_path, victim):
    from onnxprune.targets import run_bundle

    bundle, manifest, _ = x86_bundle
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with open(copy / victim, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="sha256"):
        run_bundle(copy, random_inputs(manifest))


@needs_tvm
def test_weights_file_is_what_the_model_computes_with(x86_bundle, tmp_path):
    """The weights come from weights.bin: with every lifted tensor zeroed, the output is the Gemm bias (10
    elements, below the lifting threshold, so it stays in the library)."""
    import tvm

    bundle, manifest, model = x86_bundle
    assert (bundle / "model.so").stat().st_size < 4 * (bundle / "weights.bin").stat().st_size + 200_000
    params = tvm.runtime.load_param_dict((bundle / "weights.bin").read_bytes())
    zeros = {k: tvm.runtime.tensor(np.zeros_like(v.numpy())) for k, v in params.items()}
    (tmp_path / "w0.bin").write_bytes(tvm.runtime.save_param_dict(zeros))
    np.save(tmp_path / "x.npy", random_inputs(manifest)["x"])
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run([str(bundle / "runner"), str(bundle / "model.so"), str(out), str(tmp_path / "x.npy"),
                    "--weights", str(tmp_path / "w0.bin")], check=True)  # fmt: skip
    bias = next(numpy_helper.to_array(i) for i in onnx.load(model).graph.initializer if i.name == "bf")
    np.testing.assert_allclose(np.load(out / "output_0.npy")[0], bias, rtol=1e-6)


@needs_tvm
def test_run_cli_output_path_and_bad_flags(x86_bundle, tmp_path, capsys):
    """`run -o` into a missing folder says so before running (it was FileNotFoundError as an internal error), an
    output name without .npz is written as given (numpy appended .npz and the message named another file), and a
    negative --repeat is a usage error (it was accepted)."""
    from onnxprune.cli import main

    bundle, _, _ = x86_bundle
    inputs = tmp_path / "in.npz"
    np.savez(inputs, x=np.zeros((1, 3, 20, 20), np.float32))
    assert main(["run", str(bundle), "--inputs", str(inputs), "-o", str(tmp_path / "no" / "out.npz")]) == 1
    assert capsys.readouterr().err.strip().endswith("output folder does not exist")
    assert main(["run", str(bundle), "--inputs", str(inputs), "-o", str(tmp_path / "outputs")]) == 0
    assert (tmp_path / "outputs").is_file() and not (tmp_path / "outputs.npz").exists()
    assert np.load(tmp_path / "outputs").files == ["y"]
    assert main(["run", str(bundle), "--inputs", str(inputs), "--repeat", "-3"]) == 2


@needs_tvm
def test_run_checks_input_shapes(x86_bundle):
    from onnxprune.targets import run_bundle

    bundle, _, _ = x86_bundle
    # the inputs file does not fit the bundle: a data problem (exit 1), as a calibration file that does not fit
    with pytest.raises(DataError, match="shape"):
        run_bundle(bundle, {"x": np.zeros((1, 3, 8, 8), np.float32)})
    with pytest.raises(DataError, match="missing"):
        run_bundle(bundle, {})


@needs_tvm
def test_cli_compile_and_run(tmp_path):
    model = tiny_cnn(tmp_path / "tiny.onnx", dynamic_batch=True)
    exe = [sys.executable, "-m", "onnxprune.cli"] if not shutil.which("onnxprune") else ["onnxprune"]
    spatial = onnx.load(model)  # a dynamic dim other than the batch still needs --shape
    spatial.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "W"
    onnx.save(spatial, tmp_path / "spatial.onnx")
    r = subprocess.run([*exe, "compile", str(tmp_path / "spatial.onnx"), "--target", "x86"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 1 and "--shape x=1,3,20,1" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([*exe, "compile", str(model), "--target", "x86", "--shape", "x=2,3,20,20",
                        "-o", str(tmp_path / "b")], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr  # the batch is given: no note
    x = np.random.RandomState(1).randn(2, 3, 20, 20).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    r = subprocess.run([*exe, "run", str(tmp_path / "b"), "--inputs", str(tmp_path / "in.npz"),
                        "-o", str(tmp_path / "out.npz")], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "out.npz") as z:
        assert_matches({"y": z["y"]}, ort_reference(model, {"x": x}))


@needs_tvm
def test_schedule_failure_is_reported_not_swallowed(tmp_path, monkeypatch, capsys):
    """A kernel whose schedule fails still compiles (as a naive loop nest, numerically right) but is listed in
    the manifest, and ``onnxprune compile`` warns about it in one line on stderr."""
    import argparse

    skip_unless_tools("g++", package_hint="apt-get install g++")
    from onnxprune.targets import read_manifest, run_bundle, tvm_schedules
    from onnxprune.targets.cli import cmd_compile

    def broken(self, block):
        raise RuntimeError("forced schedule failure")

    monkeypatch.setattr(tvm_schedules.Kernel, "schedule_reduction", broken)
    model = tiny_cnn(tmp_path / "tiny.onnx")
    args = argparse.Namespace(model=str(model), target="x86", output=str(tmp_path / "b"), tune=0, shape=None, sparse="auto",
                              json=False)  # fmt: skip
    assert cmd_compile(args) == 0
    manifest = read_manifest(tmp_path / "b")
    naive = manifest["unscheduled_kernels"]
    assert manifest["unscheduled_kernel_count"] == len(naive) >= 4  # conv, depthwise, 1x1 conv, pools, dense
    assert any("conv2d" in k for k in naive) and any("matmul" in k or "dense" in k for k in naive), naive
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {len(naive)} kernel(s) got no schedule"), err
    inputs = random_inputs(manifest)
    assert_matches(run_bundle(tmp_path / "b", inputs), ort_reference(model, inputs))


@needs_tvm
def test_unsupported_op_is_one_line_error(tmp_path):
    from onnxprune.targets import compile_bundle

    node = helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])  # fmt: skip
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(UnsupportedModelError, match=r"lacks op.*com\.example::FancyOp"):
        compile_bundle(tmp_path / "m.onnx", "x86", tmp_path / "b")


def compile_with_cli(model: Path, target: str, out: Path, capfd) -> dict:
    """``onnxprune compile MODEL --target T -o OUT`` through ``onnxprune.cli.main`` (no --shape: the bundled
    models' batch is dynamic); the bundle runs and matches onnxruntime on a batch-1 input. Returns the
    manifest, with the compile's stderr lines under ``"__stderr__"``."""
    from onnxprune.cli import main
    from onnxprune.targets import read_manifest, run_bundle

    rc = main(["compile", str(model), "--target", target, "-o", str(out)])
    captured = capfd.readouterr()
    assert rc == 0, captured.err
    assert captured.out.startswith(f"{out}  ({target}, "), captured.out
    manifest = read_manifest(out)
    assert manifest["unscheduled_kernels"] == [], "kernels left as naive loop nests"
    assert manifest["inputs"][0]["shape"][0] == 1 and manifest["batch_defaulted_to_1"] == ["image"]
    inputs = random_inputs(manifest)
    assert_matches(run_bundle(out, inputs), ort_reference(model, inputs))
    return {**manifest, "__stderr__": captured.err.splitlines()}


FASHION_NOTE = "onnxprune: note: input 'image' has a dynamic batch; compiling for batch 1 (use --shape to choose)"


@needs_tvm
@pytest.mark.skipif(not FASHION.is_file(), reason="models/fashion_mnist_cnn.onnx not built")
def test_x86_fashion_mnist_matches_onnxruntime(tmp_path, capfd):
    """The README's example on the bundled model: a dynamic batch compiles as 1, and stderr holds that note
    and nothing else (TVM's messages, if any, would be in compile.log, named by a second note)."""
    skip_unless_tools("g++", package_hint="apt-get install g++")
    manifest = compile_with_cli(FASHION, "x86", tmp_path / "b", capfd)
    log_note = [f"onnxprune: note: TVM messages in {tmp_path / 'b' / 'compile.log'}"] if manifest["compile_log"] else []
    assert manifest["__stderr__"] == [FASHION_NOTE, *log_note]


@needs_tvm
def test_tune_runs_metaschedule_and_reuses_its_database(tmp_path, monkeypatch, capfd):
    """--tune N: default schedules seeded as candidates, N MetaSchedule trials measured, database reused."""
    skip_unless_tools("g++", package_hint="apt-get install g++")
    from onnxprune.targets import compile_bundle

    monkeypatch.setenv("ONNXPRUNE_TUNE_CACHE", str(tmp_path / "tune"))
    model = tiny_cnn(tmp_path / "tiny.onnx")
    manifest = compile_and_check(model, "x86", tmp_path / "b", tune=8)
    assert manifest["tune_trials"] == 8
    # MetaSchedule's C++ warnings ("Unknown schedule rule meta_schedule.pool_max") land in compile.log, named
    # by one note; nothing else reaches the terminal
    # (TVM 0.27 has no CPU rule for pooling blocks tagged "meta_schedule.pool_max": it warns, from C++, on fd 2)
    out, err = capfd.readouterr()
    assert out == ""
    assert manifest["compile_log"] == "compile.log" and "compile.log" in manifest["files"]
    assert err.splitlines() == [f"onnxprune: note: TVM messages in {tmp_path / 'b' / 'compile.log'}"]
    assert "pool_max" in (tmp_path / "b" / "compile.log").read_text()
    (db,) = (tmp_path / "tune").glob("*/database_tuning_record.json")
    records = [json.loads(line) for line in db.read_text().splitlines()]
    workloads = {r[0] for r in records}
    assert len(workloads) >= 4  # conv, depthwise, 1x1 conv, pooling, dense … each a task
    measured = {r[0] for r in records if max(r[1][1]) < 1.0}  # failed candidates record 1e10 s
    assert measured == workloads, "some kernel has no measured schedule (the default one is seeded first)"
    assert len(records) - len(workloads) >= 8, "MetaSchedule measured fewer than 8 candidates"
    # Same model, same trials: nothing is tuned again, the database is only applied.
    compile_bundle(model, "x86", tmp_path / "b2", tune=8)
    assert len(db.read_text().splitlines()) == len(records)


@needs_tvm
def test_tune_leaves_winograd_kernels_to_their_own_schedule(tmp_path, monkeypatch):
    """--tune on a model with Winograd kernels: they are not MetaSchedule tasks (its search aborts on their
    compute_at structure), the other kernels are tuned, and the bundle matches onnxruntime."""
    skip_unless_tools("g++", package_hint="apt-get install g++")
    monkeypatch.setenv("ONNXPRUNE_TUNE_CACHE", str(tmp_path / "tune"))
    manifest = compile_and_check(winograd_cnn(tmp_path / "m.onnx"), "x86", tmp_path / "b", tune=4)
    assert manifest["tune_trials"] == 4
    (db,) = (tmp_path / "tune").glob("*/database_tuning_record.json")
    assert db.read_text().strip(), "the non-Winograd kernels (1x1 conv, pooling) were not tuned"


def matmul_model(path: Path) -> Path:
    """One MatMul by a constant weight: a single, cheap tuning task."""
    w = numpy_helper.from_array(np.random.RandomState(4).randn(16, 8).astype(np.float32), "w")
    return save_graph(path, [helper.make_node("MatMul", ["x", "w"], ["y"])], [w], "matmul", [4, 16], [4, 8])


@needs_tvm
def test_two_tuned_compiles_in_one_process(tmp_path, monkeypatch):
    """Regression: MetaSchedule's logging set-up (``logging.config.dictConfig`` over the whole process, the
    names of the handlers on its logger passed through ``str.format``) failed every tuned compile once a
    handler without a name sat on its logger ("'NoneType' object has no attribute 'format'"), so a second
    ``--tune`` compile in a test run failed. Now the tuning logs are set up and taken down per run."""
    import logging
    import logging.handlers

    skip_unless_tools("g++", package_hint="apt-get install g++")
    meta = logging.getLogger("tvm.s_tir.meta_schedule")
    before = (meta.level, meta.propagate)
    foreign = logging.handlers.BufferingHandler(10_000)  # unnamed, as a host application attaches one
    meta.addHandler(foreign)
    try:
        model = matmul_model(tmp_path / "m.onnx")
        for i in range(2):
            monkeypatch.setenv("ONNXPRUNE_TUNE_CACHE", str(tmp_path / f"tune{i}"))  # fresh database: both tune
            assert compile_and_check(model, "x86", tmp_path / f"b{i}", tune=2)["tune_trials"] == 2
            (log,) = (tmp_path / f"tune{i}").glob("*/logs/task_scheduler.log")
            assert "Initializing Task" in log.read_text(), "the progress table was not written"
        assert meta.handlers == [foreign] and (meta.level, meta.propagate) == before
    finally:
        meta.removeHandler(foreign)


# ------------------------------------------------------------------------------------------------
# arm (aarch64): cross-compiled, executed under qemu-user
# ------------------------------------------------------------------------------------------------
def _skip_unless_arm() -> None:
    if not HAVE_TVM:
        pytest.skip("apache-tvm not installed (bash .ci/install-tvm.sh)")
    skip_unless_tools("aarch64-linux-gnu-g++", "qemu-aarch64-static",
                      package_hint="apt-get install g++-aarch64-linux-gnu qemu-user-static")  # fmt: skip
    from onnxprune.targets.toolchains import runtime_libs

    try:
        runtime_libs("aarch64")
    except ToolchainError as e:
        pytest.skip(str(e))


@needs_tvm
def test_arm_bundle_matches_onnxruntime_under_qemu(tmp_path):
    _skip_unless_arm()
    model = tiny_cnn(tmp_path / "tiny.onnx")
    manifest = compile_and_check(model, "arm", tmp_path / "bundle")
    assert manifest["target"]["arch"] == "aarch64"
    out = subprocess.run(["file", str(tmp_path / "bundle" / "runner")], capture_output=True, text=True).stdout
    assert "aarch64" in out or not out  # `file` may be absent


@needs_tvm
@pytest.mark.skipif(not FASHION.is_file(), reason="models/fashion_mnist_cnn.onnx not built")
def test_raspberry_pi_4_fashion_mnist_under_qemu(tmp_path):
    _skip_unless_arm()
    compile_and_check(FASHION, "raspberry-pi-4", tmp_path / "b", shapes={"image": (1, 1, 28, 28)})


# ------------------------------------------------------------------------------------------------
# cuda: code generated and checked here; executed only where a GPU is present
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cuda_bundle(tmp_path_factory):
    if not HAVE_TVM:
        pytest.skip("apache-tvm not installed (bash .ci/install-tvm.sh)")
    from onnxprune.targets import compile_bundle, read_manifest

    tmp = tmp_path_factory.mktemp("cuda")
    model = tiny_cnn(tmp / "tiny.onnx")
    bundle = compile_bundle(model, "cuda", tmp / "bundle")
    return bundle, read_manifest(bundle), model


@needs_tvm
def test_cuda_codegen(cuda_bundle):
    bundle, manifest, _ = cuda_bundle
    src = (bundle / "model.cu").read_text()
    assert "__global__" in src and "threadIdx.x" in src and "blockIdx.x" in src
    assert manifest["target"]["tvm_target"]["kind"] == "cuda"


@needs_tvm
def test_cuda_bundle_runs_on_gpu_or_says_why_not(cuda_bundle):
    """``onnxprune run`` executes CUDA bundles where a GPU is present; elsewhere a one-line ToolchainError."""
    from onnxprune.targets import run_bundle

    bundle, manifest, model = cuda_bundle
    import tvm

    inputs = random_inputs(manifest)
    if not tvm.cuda().exist:
        with pytest.raises(ToolchainError, match="no CUDA GPU"):
            run_bundle(bundle, inputs)
        pytest.skip("CUDA code generated and checked; no GPU here to execute it")
    assert_matches(run_bundle(bundle, inputs), ort_reference(model, inputs))


@needs_tvm
@pytest.mark.skipif(not FASHION.is_file(), reason="models/fashion_mnist_cnn.onnx not built")
def test_wasm_fashion_mnist_matches_onnxruntime_under_node(tmp_path, capfd):
    # CI builds the emscripten TVM runtime in .ci/install-tvm.sh (cached); without it the first run here
    # builds it (~5 min on 2 cores).
    skip_unless_tools("emcc", "node", package_hint="apt-get install emscripten nodejs")
    manifest = compile_with_cli(FASHION, "wasm", tmp_path / "b", capfd)
    # LLVM's "Set native vector bits to be 128 for wasm32" (x6) is gone: the row sets vector-width 128
    assert manifest["__stderr__"] == [FASHION_NOTE] and manifest["compile_log"] is None
    assert manifest["target"]["tvm_target"]["vector-width"] == 128
    # the runner is linked into runner.wasm: its C++ source is not shipped, and nothing names it
    assert manifest["runner"] == {"program": "runner.js", "kind": "node"}
    assert set(manifest["files"]) == {"README.md", "runner.js", "runner.wasm", "weights.bin"}
    readme = (tmp_path / "b" / "README.md").read_text()
    assert "runner.cc" not in readme and "model.wasm" not in readme and "`runner.wasm`" in readme


# ------------------------------------------------------------------------------------------------
# zoo models (torchvision exports): x86 numerics, slow tier (each compiles for ~1 min on 2 cores)
# ------------------------------------------------------------------------------------------------
def _zoo_or_skip(name: str) -> Path:
    skip_unless_tools("g++", package_hint="apt-get install g++")
    zoo = pytest.importorskip("models.zoo")
    try:
        return zoo.zoo_model(name)
    except zoo.ZooError as e:
        pytest.skip(str(e))


@needs_tvm
def test_x86_resnet18_matches_onnxruntime(tmp_path):
    """A real zoo export in the fast tier (~25 s: compile, run the bundle, compare with onnxruntime)."""
    compile_and_check(_zoo_or_skip("resnet18"), "x86", tmp_path / "b")


@needs_tvm
@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    # shufflenet_v2: torch's chunk exports as Shape/Gather/Div/Slice, which TVM's importer cannot fold
    # resnet50, densenet121, googlenet: many 3x3 convs run as Winograd kernels (F(4,3) and F(2,3))
    ["mobilenet_v3_small", "mobilenet_v2", "shufflenet_v2_x0_5", "resnet50", "densenet121", "googlenet"],
)
def test_x86_zoo_model_matches_onnxruntime(name, tmp_path):
    compile_and_check(_zoo_or_skip(name), "x86", tmp_path / "b")
