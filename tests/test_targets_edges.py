"""Targets: the rough edges a new user hits.

A start-up that imports nothing heavy, a dynamic batch compiled as 1 (with a note), other dynamic dims as a
one-line error, a ``ModelProto`` accepted by ``compile_bundle``, ``onnxprune run`` on a relative bundle path,
progress reported for every compile step, and TVM's own messages kept in a log file instead of the terminal.
Tests that compile skip cleanly (saying what is missing) without TVM or g++.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.errors import UnsupportedModelError, UsageError
from tests.tvm_helpers import HAVE_TVM, assert_matches, ort_reference, skip_unless_tools, tiny_cnn

BATCH_NOTE = "onnxprune: note: input 'x' has a dynamic batch; compiling for batch 1 (use --shape to choose)"
needs_tvm = pytest.mark.skipif(not HAVE_TVM, reason="apache-tvm not installed (bash .ci/install-tvm.sh)")


def dynamic_spatial(path: Path) -> Path:
    """tiny_cnn with dynamic batch AND a dynamic height: only the batch may default."""
    model = onnx.load(tiny_cnn(path, dynamic_batch=True))
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    onnx.save(model, path)
    return path


# ------------------------------------------------------------------------------------------------
# no tvm needed
# ------------------------------------------------------------------------------------------------
def test_cli_registration_imports_nothing_heavy():
    """``onnxprune --version`` builds the whole parser (targets' ``compile``/``run`` included): no onnx, numpy
    or tvm may be imported for it (they cost ~1 s; the budget is 0.2 s)."""
    code = textwrap.dedent("""
        import sys
        import onnxprune.targets.cli
        from onnxprune.cli import main
        try:
            main(["--version"])
        except SystemExit:
            pass
        heavy = sorted({m.split(".")[0] for m in sys.modules} & {"onnx", "numpy", "tvm", "onnxruntime", "rich"})
        sys.exit(" ".join(heavy) if heavy else 0)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, f"imported at start-up: {r.stderr.strip()}"
    assert r.stdout.startswith("onnxprune ")


def test_dynamic_batch_defaults_to_one_other_dims_do_not(tmp_path):
    from onnxprune.targets.bundle import dynamic_batch_inputs, model_signature

    model = onnx.load(tiny_cnn(tmp_path / "m.onnx", dynamic_batch=True))
    assert dynamic_batch_inputs(model) == ["x"]
    assert dynamic_batch_inputs(model, {"x": (2, 3, 20, 20)}) == []
    ins, outs = model_signature(model, batch_default=1)
    assert ins[0].shape == (1, 3, 20, 20) and outs[0].shape == (-1, 10)
    ins, _ = model_signature(model, {"x": (4, 3, 20, 20)}, batch_default=1)
    assert ins[0].shape == (4, 3, 20, 20)

    spatial = onnx.load(dynamic_spatial(tmp_path / "s.onnx"))
    with pytest.raises(UnsupportedModelError, match=r"dynamic dim 'H' \(only a dynamic batch.*--shape x=1,3,1,20"):
        model_signature(spatial, batch_default=1)

    static = onnx.load(tiny_cnn(tmp_path / "t.onnx"))
    assert dynamic_batch_inputs(static) == []


def _capture_script(log: Path, body: str) -> str:
    return textwrap.dedent(f"""
        import logging, os, subprocess, sys, warnings
        from pathlib import Path
        from onnxprune.targets.messages import tvm_messages
        with tvm_messages(Path({str(log)!r})):
    """) + textwrap.indent(textwrap.dedent(body), "    ")


def test_tvm_messages_go_to_the_log_and_onnxprune_output_does_not(tmp_path):
    """Every channel TVM talks on lands in the log: ``tvm.*`` logging, warnings, prints, C-level writes to
    fd 2 (also from child processes); what onnxprune writes to ``sys.stderr`` (progress) still shows."""
    log = tmp_path / "compile.log"
    body = """
        logging.getLogger("tvm.s_tir.meta_schedule").warning("from tvm logging")
        warnings.warn("from a python warning")
        print("from print")
        os.write(2, b"from fd 2\\n")
        subprocess.run(["sh", "-c", "echo from a child >&2"])
        sys.stderr.write("progress display\\n")
    """
    r = subprocess.run([sys.executable, "-c", _capture_script(log, body) + 'sys.stderr.write("after\\n")\n'],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    text = log.read_text()
    for expected in ("from tvm logging", "from a python warning", "from print", "from fd 2", "from a child"):
        assert expected in text, (expected, text)
    assert "progress display" not in text
    assert r.stderr.splitlines() == ["progress display", "after"], r.stderr
    assert r.stdout == ""


def test_tvm_messages_restore_everything(tmp_path, capfd):
    """After the block: fd 2, sys.stderr/stdout, the tvm logger and warning display are as before; an empty
    log is removed; ``ONNXPRUNE_DEBUG`` captures nothing."""
    from onnxprune.targets.messages import tvm_messages

    logger = logging.getLogger("tvm")
    before = (sys.stdout, sys.stderr, list(logger.handlers), logger.propagate, warnings.showwarning)
    with tvm_messages(tmp_path / "empty.log"):
        pass
    assert not (tmp_path / "empty.log").exists()
    with pytest.raises(RuntimeError), tvm_messages(tmp_path / "boom.log"):
        os.write(2, b"before the failure\n")
        raise RuntimeError("boom")
    assert (sys.stdout, sys.stderr, list(logger.handlers), logger.propagate, warnings.showwarning) == before
    assert "before the failure" in (tmp_path / "boom.log").read_text()
    os.write(2, b"visible again\n")
    assert capfd.readouterr().err == "visible again\n"


def test_debug_env_captures_nothing(tmp_path, capfd, monkeypatch):
    from onnxprune.targets.messages import tvm_messages

    monkeypatch.setenv("ONNXPRUNE_DEBUG", "1")
    with tvm_messages(tmp_path / "x.log"):
        os.write(2, b"shown\n")
    assert capfd.readouterr().err == "shown\n" and not (tmp_path / "x.log").exists()


# ------------------------------------------------------------------------------------------------
# compiled for x86 (tvm + g++)
# ------------------------------------------------------------------------------------------------
def _skip_unless_x86() -> None:
    if not HAVE_TVM:
        pytest.skip("apache-tvm not installed (bash .ci/install-tvm.sh)")
    skip_unless_tools("g++", package_hint="apt-get install g++")


@needs_tvm
def test_proto_dynamic_batch_progress_and_relative_run(tmp_path, capfd, monkeypatch):
    """One compile, four edges: ``compile_bundle`` takes a ``ModelProto`` (hashed as serialized, not
    modified); its dynamic batch compiles as 1 with one note; every step is a progress task; and
    ``onnxprune run`` works on a relative bundle path."""
    _skip_unless_x86()
    from onnxprune.cli import main
    from onnxprune.progress import RecordingReporter, reporting
    from onnxprune.targets import compile_bundle, read_manifest

    model = onnx.load(tiny_cnn(tmp_path / "tiny.onnx", dynamic_batch=True))
    serialized = model.SerializeToString()
    recorder = RecordingReporter()
    with reporting(recorder):
        bundle = compile_bundle(model, "x86", tmp_path / "model.x86")
    assert model.SerializeToString() == serialized, "compile_bundle modified the caller's proto"
    assert capfd.readouterr().err.splitlines() == [BATCH_NOTE]

    manifest = read_manifest(bundle)
    assert manifest["model"] == {"name": "tiny_cnn", "file": None, "sha256": hashlib.sha256(serialized).hexdigest()}
    assert manifest["inputs"][0]["shape"] == [1, 3, 20, 20] and manifest["outputs"][0]["shape"] == [1, 10]
    assert manifest["batch_defaulted_to_1"] == ["x"] and manifest["compile_log"] is None
    assert "compiled for batch 1 (`x`)" in (bundle / "README.md").read_text()

    finished = [t.description for t in recorder.finished()]
    for step in ("importing the ONNX model", "folding constants, NHWC layout", "Winograd, channel padding, legalizing",
                 "scheduling kernels",
                 "lowering to VM code", "generating x86 code", "linking model.so", "building the runner",
                 "writing the x86 bundle", "compiling tiny_cnn for x86"):  # fmt: skip
        assert any(d.startswith(step) for d in finished), (step, finished)
    (scheduled,) = recorder.finished("scheduling kernels")
    assert scheduled.total and scheduled.completed == scheduled.total
    (whole,) = recorder.finished("compiling tiny_cnn")
    assert whole.completed == whole.total == 3

    x = np.random.RandomState(5).randn(1, 3, 20, 20).astype(np.float32)
    monkeypatch.chdir(tmp_path)
    np.savez("in.npz", x=x)
    assert main(["run", "model.x86", "--inputs", "in.npz", "-o", "out.npz"]) == 0, capfd.readouterr().err
    with np.load(tmp_path / "out.npz") as z:
        assert_matches({"y": z["y"]}, ort_reference(tmp_path / "tiny.onnx", {"x": x}))


@needs_tvm
def test_proto_without_out_dir_and_other_dynamic_dims_are_one_line_errors(tmp_path, capfd):
    _skip_unless_x86()
    from onnxprune.cli import main
    from onnxprune.targets import compile_bundle

    with pytest.raises(UsageError, match="out_dir is required"):
        compile_bundle(onnx.load(tiny_cnn(tmp_path / "m.onnx")), "x86")
    model = dynamic_spatial(tmp_path / "s.onnx")
    assert main(["compile", str(model), "--target", "x86", "-o", str(tmp_path / "b")]) == 1
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and "dynamic dim 'H'" in err[0] and "--shape x=1,3,1,20" in err[0], err
    assert not (tmp_path / "b").exists()


@needs_tvm
def test_failed_compile_keeps_tvm_messages_and_names_them(tmp_path, capfd, monkeypatch):
    """TVM's messages may explain a failure: they are kept in a temporary log, named by a note, and the
    error stays one line."""
    _skip_unless_x86()
    from onnxprune.cli import main
    from onnxprune.targets import tvm_backend

    def failing_import(model, inputs):
        os.write(2, b"TVM: something went wrong in C++\n")
        raise UnsupportedModelError("TVM's ONNX importer failed: forced")

    monkeypatch.setattr(tvm_backend, "import_onnx", failing_import)
    model = tiny_cnn(tmp_path / "tiny.onnx")
    assert main(["compile", str(model), "--target", "x86", "-o", str(tmp_path / "b")]) == 1
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("onnxprune: note: TVM messages in "), err
    assert err[1] == "onnxprune: error: TVM's ONNX importer failed: forced"
    kept = Path(err[0].rsplit(" ", 1)[1])
    try:
        assert kept.read_text() == "TVM: something went wrong in C++\n"
    finally:
        kept.unlink()
    assert not (tmp_path / "b").exists()


def test_only_runners_that_run_target_code_as_the_target_does_time_layers():
    """The compile's dense-vs-sparse choice times kernels only where the timing means something: natively and
    under node (wasm); qemu is emulation, and the CUDA pipeline chooses no layers."""
    from onnxprune.targets.table import TARGETS

    timed = {t.name: t.runner.times_layers for t in TARGETS}
    assert {name for name, yes in timed.items() if yes} == {
        t.name for t in TARGETS if t.runner.kind in ("native", "node")
    }
    assert timed["x86"] and timed["wasm"] and not timed["arm"] and not timed["cuda"]
