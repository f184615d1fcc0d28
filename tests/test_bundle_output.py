"""Bundle output: where ``compile`` writes, what a failed compile leaves, and bundles this machine cannot run.

A bundle folder is checked before the slow part (missing parent, a file in the way, a folder that is not a
bundle); the bundle is written into a hidden staging folder and renamed into place, so a failed recompile
keeps the old bundle; an x86 bundle records the instruction-set extensions its code may use and ``run``
refuses, in one line, a CPU that lacks them (instead of the runner dying of SIGILL); a runner killed by a
signal is named; timing under an emulator says so.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from onnxprune.errors import OnnxPruneError, UsageError
from onnxprune.targets import bundle as B
from onnxprune.targets.cpu_features import host_cpu_flags, missing_cpu_features, recorded_features
from onnxprune.targets.launch import _failure
from tests.tvm_helpers import HAVE_TVM, assert_matches, ort_reference, skip_unless_tools, tiny_cnn


def _skip_unless_x86() -> None:
    if not HAVE_TVM:
        pytest.skip("apache-tvm not installed (bash .ci/install-tvm.sh)")
    skip_unless_tools("g++", package_hint="apt-get install g++")


# ------------------------------------------------------------------------------------------------
# no tvm needed
# ------------------------------------------------------------------------------------------------
def test_destination_is_checked_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OnnxPruneError, match="exists and is not a folder") as e:
        B.check_destination(tmp_path / "afile")
    assert e.value.exit_code == 1
    with pytest.raises(OnnxPruneError, match="output folder does not exist") as e:
        B.check_destination(tmp_path / "missing" / "b")
    assert e.value.exit_code == 1
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(UsageError, match="is not a bundle; refusing to overwrite it"):
        B.check_destination(tmp_path / "notes")
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / B.MANIFEST).write_text("{}")  # even a bundle: replaced, the shell's folder is gone
    monkeypatch.chdir(tmp_path / "here")
    for held in (Path("."), tmp_path):
        with pytest.raises(UsageError, match="is the current folder or holds it"):
            B.check_destination(held)
    monkeypatch.chdir(tmp_path)
    B.check_destination(tmp_path / "new")  # absent: fine
    (tmp_path / "empty").mkdir()
    B.check_destination(tmp_path / "empty")  # an empty folder: fine
    assert not (tmp_path / "missing").exists() and (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_staged_bundle_replaces_on_success_and_keeps_the_old_one_on_failure(tmp_path):
    dest = tmp_path / "b"
    with B.staged_bundle(dest) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".b.") and not dest.exists()
        (stage / B.MANIFEST).write_text("{}")
        (stage / "model.so").write_text("old")
    assert (dest / "model.so").read_text() == "old"

    with pytest.raises(RuntimeError, match="link failed"), B.staged_bundle(dest) as stage:
        (stage / "model.so").write_text("half")
        raise RuntimeError("link failed")
    assert (dest / "model.so").read_text() == "old", "a failed recompile destroyed the previous bundle"

    with B.staged_bundle(dest) as stage:
        (stage / B.MANIFEST).write_text("{}")
        (stage / "model.so").write_text("new")
    assert (dest / "model.so").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"], "staging or old folders left behind"


def test_cpu_features_are_recorded_in_cpuinfo_spelling_and_compared(tmp_path):
    llvm = ["avx2", "fma", "avx512f", "avx512vnni", "bmi", "lzcnt", "macrofusion", "fast-lzcnt", "64bit"]
    assert recorded_features(llvm) == ["abm", "avx2", "avx512_vnni", "avx512f", "bmi1", "fma"]
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx avx2 fma bmi1 abm\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert host_cpu_flags(cpuinfo) == {"fpu", "sse", "avx", "avx2", "fma", "bmi1", "abm"}
    assert missing_cpu_features(["avx2", "avx512f", "avx512_vnni", "fma"], cpuinfo) == ["avx512_vnni", "avx512f"]
    assert missing_cpu_features(["avx2"], cpuinfo) == []
    # flags unknown (no /proc here): nothing is refused on a guess
    assert host_cpu_flags(tmp_path / "absent") is None
    assert missing_cpu_features(["avx512f"], tmp_path / "absent") == []


def test_a_runner_killed_by_a_signal_is_named():
    manifest = {"target": {"tvm_target": {"mcpu": "znver4"}}}
    msg = _failure(-int(signal.SIGILL), "", manifest)
    assert msg.startswith("bundle runner killed by SIGILL: an instruction this CPU lacks")
    assert "compiled for znver4" in msg
    assert _failure(-int(signal.SIGSEGV), "", manifest) == "bundle runner killed by SIGSEGV"
    assert _failure(3, "loading\nbad weights file\n", manifest) == "bundle runner failed (exit 3): bad weights file"


# ------------------------------------------------------------------------------------------------
# compiles (x86: tvm + g++)
# ------------------------------------------------------------------------------------------------
def test_recompile_replaces_a_bundle_and_a_failed_one_keeps_it(tmp_path, capfd, monkeypatch):
    """Recompiling into an existing bundle replaces it whole; a compile that fails after the build keeps the
    old bundle byte for byte and leaves no staging folder."""
    _skip_unless_x86()
    from onnxprune.cli import main
    from onnxprune.targets import read_manifest, tvm_backend

    model = tiny_cnn(tmp_path / "tiny.onnx")
    out = tmp_path / "b"
    assert main(["compile", str(model), "--target", "x86", "-o", str(out)]) == 0, capfd.readouterr().err
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    read_manifest(out)

    real = tvm_backend._compile_into

    def failing(stage, *args, **kwargs):
        real(stage, *args, **kwargs)
        assert (stage / "model.so").is_file()  # the new bundle is half written when it fails
        raise OnnxPruneError("linking the runner failed: forced")

    monkeypatch.setattr(tvm_backend, "_compile_into", failing)
    assert main(["compile", str(model), "--target", "x86", "-o", str(out)]) == 1
    assert capfd.readouterr().err.strip().splitlines()[-1] == "onnxprune: error: linking the runner failed: forced"
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "tiny.onnx"]
    monkeypatch.setattr(tvm_backend, "_compile_into", real)

    assert main(["compile", str(model), "--target", "x86", "-o", str(out)]) == 0
    read_manifest(out)  # the new bundle, whole: every file matches its sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "tiny.onnx"]


def test_run_refuses_a_bundle_for_a_cpu_this_one_is_not(tmp_path, capfd):
    """The manifest lists the extensions the x86 code may use (this machine's, for ``--target x86``); a bundle
    needing one this CPU lacks is refused in one line before the runner starts; this machine's own bundle runs."""
    _skip_unless_x86()
    from onnxprune.cli import main

    model = tiny_cnn(tmp_path / "tiny.onnx")
    out = tmp_path / "b"
    assert main(["compile", str(model), "--target", "x86", "-o", str(out)]) == 0, capfd.readouterr().err
    manifest = json.loads((out / B.MANIFEST).read_text())
    features = manifest["target"]["cpu_features"]
    flags = host_cpu_flags()
    if flags is not None:
        assert features and set(features) <= flags, "this machine's bundle needs what this machine lacks"
    x = np.random.RandomState(0).randn(1, 3, 20, 20).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    capfd.readouterr()
    assert main(["run", str(out), "--inputs", str(tmp_path / "in.npz"), "-o", str(tmp_path / "o.npz")]) == 0
    with np.load(tmp_path / "o.npz") as z:
        assert_matches({"y": z["y"]}, ort_reference(model, {"x": x}))

    if flags is None:
        pytest.skip("no /proc/cpuinfo flags here: the refusal cannot be exercised")
    manifest["target"]["cpu_features"] = [*features, "amx_tile_not_here"]
    manifest["target"]["tvm_target"]["mcpu"] = "future-cpu"
    (out / B.MANIFEST).write_text(json.dumps(manifest))
    capfd.readouterr()
    assert main(["run", str(out), "--inputs", str(tmp_path / "in.npz"), "-o", str(tmp_path / "o2.npz")]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compiled for future-cpu" in err[0] and "amx_tile_not_here" in err[0], err
    assert "--target x86-avx2" in err[0]
    assert not (tmp_path / "o2.npz").exists()


def test_timing_under_an_emulator_says_so(tmp_path, capfd):
    _skip_unless_x86()
    skip_unless_tools("aarch64-linux-gnu-g++", "qemu-aarch64-static",
                      package_hint="bash .ci/install-tvm.sh")  # fmt: skip
    if not Path("/usr/aarch64-linux-gnu").is_dir():
        pytest.skip("aarch64 C/C++ runtime missing (bash .ci/install-tvm.sh)")
    from onnxprune.cli import main

    model = tiny_cnn(tmp_path / "tiny.onnx")
    out = tmp_path / "arm"
    assert main(["compile", str(model), "--target", "arm", "-o", str(out)]) == 0, capfd.readouterr().err
    assert json.loads((out / B.MANIFEST).read_text())["target"]["cpu_features"] is None
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 3, 20, 20), np.float32))
    capfd.readouterr()
    assert main(["run", str(out), "--inputs", str(tmp_path / "in.npz"), "--repeat", "2"]) == 0
    line = capfd.readouterr().out.strip()
    assert "median" in line and line.endswith("(under an emulator: not the device's timing)"), line
