"""What a new user meets on the command line: one summary for both prune modes, the equivalence certificate,
the HTML report, stated defaults, contradicting flags, consistent exit codes, a quiet closed pipe, a light
start-up."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from models.testmodels import TEST_MODELS
from onnxprune import certificate
from onnxprune.cli import build_parser, main
from onnxprune.verify import random_inputs

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT / "models" / "fashion_mnist_cnn.onnx"
PRUNE_KEYS = {"input", "output", "params_before", "params_after", "macs_before", "macs_after", "groups",
              "groups_pruned", "barriers", "group_sizes", "verification", "latency", "refine"}  # fmt: skip


def _metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def _calib(model_path, path, n: int = 8):
    model = onnx.load(str(model_path))
    samples = [random_inputs(model, seed=i) for i in range(n)]
    np.savez(path, **{k: np.concatenate([s[k] for s in samples]) for k in samples[0]})
    return path


@pytest.fixture
def residual(tmp_model):
    return tmp_model(TEST_MODELS["residual"](), "residual.onnx")


# ---- one summary for every mode ----------------------------------------------------------------------
def test_both_modes_report_the_same_keys(residual, tmp_path, capsys):
    assert main(["prune", str(residual), "-o", str(tmp_path / "c.onnx"), "--ratio", "0.5", "--json"]) == 0
    constrained = _json(capsys)
    assert main(["prune", str(residual), "-o", str(tmp_path / "u.onnx"), "--ratio", "0.5", "--json",
                 "--mode", "unconstrained"]) == 0  # fmt: skip
    unconstrained = _json(capsys)
    assert PRUNE_KEYS <= constrained.keys() and PRUNE_KEYS <= unconstrained.keys()
    assert {"mode", "effective_params_after", "copies", "layout"} <= unconstrained.keys()  # its own extras
    assert unconstrained["groups"] == constrained["groups"] and unconstrained["barriers"] == constrained["barriers"]
    assert unconstrained["group_sizes"] == constrained["group_sizes"]
    assert 0 < unconstrained["macs_after"] < unconstrained["macs_before"] == constrained["macs_before"]


def test_unconstrained_ratio_zero_has_every_key(residual, tmp_path, capsys):
    assert main(["prune", str(residual), "-o", str(tmp_path / "u.onnx"), "--ratio", "0", "--json",
                 "--mode", "unconstrained"]) == 0  # fmt: skip
    summary = _json(capsys)
    assert PRUNE_KEYS <= summary.keys() and summary["macs_after"] == summary["macs_before"]
    assert summary["verification"]["passed"] is True


@pytest.mark.parametrize("mode", ["constrained", "unconstrained"])
def test_the_table_names_how_the_channels_were_chosen(residual, tmp_path, capsys, monkeypatch, mode):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["prune", str(residual), "-o", str(tmp_path / "o.onnx"), "--mode", mode]) == 0
    out = capsys.readouterr().out
    for setting in ("criterion", "allocation", "rounding", "repair", "verification", "MACs"):
        assert setting in out, setting
    assert "passed: max error" in out
    assert f"mode          │ {mode}" in out


# ---- equivalence certificate ------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [[], ["--repair", "bias"], ["--round-to", "4", "--criterion", "bn"]])
def test_default_prune_stores_a_passing_certificate(tmp_path, capsys, extra):
    out = tmp_path / "p.onnx"
    assert main(["prune", str(FASHION), "-o", str(out), "--json", *extra]) == 0
    summary = _json(capsys)
    stored = json.loads(_metadata(out)[certificate.CERTIFICATE_KEY])
    assert summary["verification"] == stored and stored["passed"] is True
    assert stored["exact_max_error"] <= 1e-5 and stored["output_change"] > stored["exact_max_error"]
    assert stored["input_sha256"] == certificate.sha256_of(FASHION) and stored["inputs"].startswith("random")


def test_no_verify_stores_nothing(tmp_path, capsys):
    out = tmp_path / "p.onnx"
    assert main(["prune", str(FASHION), "-o", str(out), "--json", "--no-verify"]) == 0
    assert _json(capsys)["verification"] is None
    assert certificate.CERTIFICATE_KEY not in _metadata(out)


def test_verification_runs_on_the_calibration_inputs(tmp_path, capsys):
    calib = _calib(FASHION, tmp_path / "calib.npz")
    out = tmp_path / "p.onnx"
    assert main(["prune", str(FASHION), "-o", str(out), "--json", "--repair", "ls", "--calib", str(calib)]) == 0
    cert = _json(capsys)["verification"]
    assert cert["passed"] is True and cert["inputs"] == "calibration: 4 samples"


def test_unconstrained_is_verified_against_its_oracle(residual, tmp_path, capsys):
    calib = _calib(residual, tmp_path / "calib.npz")
    for extra in ([], ["--no-reorder"], ["--repair", "mean", "--calib", str(calib)]):
        out = tmp_path / "u.onnx"
        assert main(["prune", str(residual), "-o", str(out), "--mode", "unconstrained", "--ratio", "0.5", "--json",
                     *extra]) == 0  # fmt: skip
        cert = _json(capsys)["verification"]
        assert cert["passed"] is True and cert["exact_max_error"] <= 1e-5, extra
        assert json.loads(_metadata(out)[certificate.CERTIFICATE_KEY]) == cert


def test_expensive_models_skip_the_check_with_a_note(residual, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(certificate, "CHEAP_SECONDS", 0.0)
    out = tmp_path / "p.onnx"
    assert main(["prune", str(residual), "-o", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["verification"] is None
    assert "pass --verify" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert main(["prune", str(residual), "-o", str(out), "--json", "--verify"]) == 0  # asked for: runs anyway
    assert _json(capsys)["verification"]["passed"] is True


def test_a_broken_pruning_fails_verification_and_writes_nothing(residual, tmp_path, capsys, monkeypatch):
    from onnxprune.passes import remove

    def broken(analysis, labels):  # prunes, then damages one weight: the result no longer equals the oracle
        model = apply_plan(analysis, labels)
        w = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4)
        array = onnx.numpy_helper.to_array(w) + 1.0
        w.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), w.name))
        return model

    apply_plan = remove.apply_plan
    monkeypatch.setattr(remove, "apply_plan", broken)
    out = tmp_path / "p.onnx"
    assert main(["prune", str(residual), "-o", str(out), "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and not out.exists() and not list(tmp_path.glob("*.tmp"))
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("onnxprune: error: verification failed: max error ") and "> tolerance 0.0001" in line


# ---- report -----------------------------------------------------------------------------------------
def test_prune_then_report(tmp_path, capsys):
    pruned = tmp_path / "f.pruned.onnx"
    assert main(["prune", str(FASHION), "-o", str(pruned), "--json"]) == 0
    summary = _json(capsys)
    assert summary["group_sizes"] and set(summary["plan"]) <= set(summary["group_sizes"])
    assert main(["report", str(pruned), "--original", str(FASHION)]) == 0
    html_path = tmp_path / "f.pruned.report.html"
    assert capsys.readouterr().out.strip() == f"report: {html_path}"
    page = html_path.read_text()
    for table in ("summary", "facts", "verification", "layers", "groups"):
        assert f"<table id='{table}'>" in page, table
    assert "PASSED" in page and "Group sizes were not recorded" not in page
    out = tmp_path / "r.html"
    assert main(["report", str(pruned), "-o", str(out), "--json"]) == 0
    assert _json(capsys) == {"report": str(out)} and out.is_file()


def test_report_of_a_model_without_metadata(tmp_path, capsys):
    assert main(["report", str(FASHION), "-o", str(tmp_path / "r.html")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "no onnxprune metadata" in line and not (tmp_path / "r.html").exists()


def test_sensitivity_allocation_lands_in_the_summary_and_the_report(tmp_path, capsys):
    calib = _calib(FASHION, tmp_path / "calib.npz")
    pruned = tmp_path / "s.onnx"
    assert main(["prune", str(FASHION), "-o", str(pruned), "--allocation", "sensitivity", "--calib", str(calib),
                 "--json"]) == 0  # fmt: skip
    sens = _json(capsys)["sensitivity"]
    assert sens["metric"] == "relative L2 error of all outputs" and sens["ratios"]
    assert {"id", "channels", "params", "members", "errors"} <= sens["groups"][0].keys()
    assert all(len(g["errors"]) == len(sens["ratios"]) for g in sens["groups"])
    assert main(["report", str(pruned), "--json"]) == 0
    page = Path(_json(capsys)["report"]).read_text()
    assert "<table id='sensitivity'>" in page


def test_sensitivity_names_its_metric(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    args = ["sensitivity", str(FASHION), "--ratios", "0.5", "--plot", str(tmp_path / "s.png")]
    assert main([*args, "--json"]) == 0
    assert _json(capsys)["metric"] == "relative L2 error of all outputs"
    assert main(args) == 0
    assert "relative L2 error of all outputs when pruning one group" in capsys.readouterr().out


# ---- flags: defaults stated, contradictions refused -------------------------------------------------
def _subparsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "prune" in a.choices)
    return sub.choices


def test_every_default_is_stated_in_help():
    for name, p in _subparsers().items():
        text = p.format_help()
        for action in p._actions:
            valued = not any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS))
            if action.option_strings and valued and action.help:
                assert "default" in p._get_formatter()._get_help_string(action), (name, action.dest)
        if name == "prune":
            assert "default: 0.3" in " ".join(text.split())


def test_the_default_ratio_is_the_configs():
    from onnxprune.cli_options import DEFAULT_RATIO
    from onnxprune.passes.config import PruneConfig
    from onnxprune.upscale.config import UnconstrainedConfig

    assert DEFAULT_RATIO == PruneConfig().ratio == UnconstrainedConfig().ratio


def test_sensitivity_help_has_no_mode():
    text = _subparsers()["sensitivity"].format_help()
    assert "--mode" not in text and "mean" not in text


@pytest.mark.parametrize("args, message", [
    (["--ratio", "0.3", "--target-params", "50%"], "--ratio and --target-params"),
    (["--ratio", "0.3", "--target-macs", "50%"], "--ratio and --target-macs"),
    (["--global", "--allocation", "lamp"], "contradicts --allocation lamp"),
])  # fmt: skip
def test_contradicting_flags_are_refused(tmp_path, capsys, args, message):
    out = tmp_path / "o.onnx"
    assert main(["prune", str(tmp_path / "never_read.onnx"), "-o", str(out), *args]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line and not out.exists()


def test_consistent_flags_still_work(residual, tmp_path, capsys):
    out = str(tmp_path / "o.onnx")
    assert main(["prune", str(residual), "-o", out, "--target-params", "80%", "--json"]) == 0
    assert main(["prune", str(residual), "-o", out, "--global", "--allocation", "global", "--json"]) == 0


# ---- exit codes: 1 = model, data or output problem; 2 = usage ----------------------------------------
EXIT_CODES = [
    # (what, arguments ({m} model, {t} temp folder), exit code)
    ("missing model file", ["prune", "{t}/missing.onnx"], 1),
    ("bad model file", ["prune", "{t}/garbage.onnx"], 1),
    ("missing model file (analyze)", ["analyze", "{t}/missing.onnx"], 1),
    ("missing model file (report)", ["report", "{t}/missing.onnx"], 1),
    ("model without onnxprune metadata", ["report", "{m}", "-o", "{t}/r.html"], 1),
    ("missing calibration file", ["prune", "{m}", "-o", "{t}/o.onnx", "--calib", "{t}/missing.npz"], 1),
    ("bad calibration file", ["prune", "{m}", "-o", "{t}/o.onnx", "--calib", "{t}/garbage.npz"], 1),
    ("calibration file without the model's inputs", ["prune", "{m}", "-o", "{t}/o.onnx", "--calib", "{t}/wrong.npz"], 1),
    ("missing output folder", ["prune", "{m}", "-o", "{t}/nope/o.onnx"], 1),
    ("unwritable output", ["prune", "{m}", "-o", "{t}/a_folder.onnx"], 1),
    ("missing output folder (analyze --graph)", ["analyze", "{m}", "--graph", "{t}/nope/g.json"], 1),
    ("missing output folder (sensitivity --plot)", ["sensitivity", "{m}", "--plot", "{t}/nope/s.png"], 1),
    ("missing output folder (report)", ["report", "{t}/pruned.onnx", "-o", "{t}/nope/r.html"], 1),
    ("ratio out of range", ["prune", "{m}", "--ratio", "1.5"], 2),
    ("unknown criterion", ["prune", "{m}", "--criterion", "nope"], 2),
    ("data criterion without --calib", ["prune", "{m}", "--criterion", "activation"], 2),
    ("zero calibration samples", ["prune", "{m}", "--calib-samples", "0"], 2),
    ("bad target", ["prune", "{m}", "-o", "{t}/o.onnx", "--target-params", "abc%"], 2),
    ("ratio and target", ["prune", "{m}", "--ratio", "0.2", "--target-macs", "50%"], 2),
    ("bad --shape", ["prune", "{m}", "--shape", "bad"], 2),
    ("bad --ratios", ["sensitivity", "{m}", "--ratios", "abc"], 2),
    ("bad --graph suffix", ["analyze", "{m}", "--graph", "{t}/g.txt"], 2),
    ("unknown flag", ["analyze", "{m}", "--bogus"], 2),
]


@pytest.fixture(scope="module")
def exit_code_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exit_codes")
    (folder / "garbage.onnx").write_bytes(b"not onnx")
    (folder / "garbage.npz").write_bytes(b"not npz")
    np.savez(folder / "wrong.npz", nope=np.zeros((2, 3), dtype=np.float32))
    (folder / "a_folder.onnx").mkdir()
    assert main(["prune", str(FASHION), "-o", str(folder / "pruned.onnx"), "--json", "--no-verify"]) == 0
    return folder


@pytest.mark.parametrize("what, args, code", EXIT_CODES, ids=[c[0] for c in EXIT_CODES])
def test_exit_codes(exit_code_files, capsys, what, args, code):
    capsys.readouterr()
    argv = [a.format(m=FASHION, t=exit_code_files) for a in args]
    assert main(argv) == code, what
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxprune: error: "), err


# ---- the shell: closed pipes, start-up ---------------------------------------------------------------
def test_a_closed_pipe_ends_quietly():
    """`onnxprune analyze MODEL | head -c1`: the reader leaves before the output is written."""
    proc = subprocess.Popen([sys.executable, "-m", "onnxprune.cli", "analyze", str(FASHION)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()  # long before the model is even loaded
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == ""


def test_a_closed_pipe_ends_quietly_in_json_mode():
    proc = subprocess.run(f"'{sys.executable}' -m onnxprune.cli analyze '{FASHION}' --json | head -c1",
                          shell=True, capture_output=True, text=True, executable="/bin/bash",
                          timeout=120)  # fmt: skip
    assert proc.stdout == "{" and proc.stderr == ""


def test_the_parser_imports_nothing_heavy():
    code = ("import sys, onnxprune.cli as cli; cli.build_parser(); "
            "print(sorted(m for m in ('onnxruntime', 'rich', 'matplotlib', 'tvm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version_needs_no_parser():
    code = ("import sys, onnxprune.cli as cli; cli.main(['--version']); "
            "print(sorted(m for m in ('onnx', 'numpy', 'onnxprune.targets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0].startswith("onnxprune ") and out.splitlines()[1] == "[]"


def test_the_inputs_data_file_is_never_the_output(tmp_path):
    model = TEST_MODELS["residual"]()
    src = tmp_path / "ext.onnx"
    onnx.save(model, str(src), save_as_external_data=True, location="ext.data", size_threshold=0)
    data = (tmp_path / "ext.data").read_bytes()
    assert main(["prune", str(src), "-o", str(tmp_path / "ext.data"), "--no-verify"]) == 2
    assert (tmp_path / "ext.data").read_bytes() == data


def test_an_original_onnxruntime_cannot_run_is_a_note_unless_verify_was_asked(residual, tmp_path, capsys,
                                                                               monkeypatch):  # fmt: skip
    def no_runtime(model, *args, **kwargs):
        raise RuntimeError("custom op without a kernel")

    monkeypatch.setattr(certificate, "session", no_runtime)
    out = tmp_path / "p.onnx"
    assert main(["prune", str(residual), "-o", str(out), "--json"]) == 0  # the default: a note, the output
    captured = capsys.readouterr()
    assert json.loads(captured.out)["verification"] is None and out.exists()
    assert captured.err.strip() == ("onnxprune: note: not verified: the original model does not run in "
                                    "onnxruntime: custom op without a kernel")  # fmt: skip
    out.unlink()
    assert main(["prune", str(residual), "-o", str(out), "--json", "--verify"]) == 1  # asked for: an error
    assert not out.exists() and "does not run in onnxruntime" in capsys.readouterr().err


def test_huge_random_inputs_are_refused_in_one_line(tmp_path, capsys):
    model = TEST_MODELS["residual"]()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2**40
    assert certificate.input_elements(model) > certificate.MAX_RANDOM_ELEMENTS
    assert not certificate.is_cheap(model)
    with pytest.raises(certificate.VerificationUnavailable, match="too many for random inputs"):
        certificate.certify_against(model, model, model)


def test_an_initializer_whose_typed_data_does_not_fill_its_shape_is_one_line(tmp_path, capsys):
    """Found by fuzzing quantized models (their scales are small float_data tensors): only raw_data used to be
    checked, so a scale declared [2^31] holding one float went on to an internal error or an invalid output."""
    model = onnx.load(ROOT / "models" / "fashion_mnist_cnn.onnx")
    t = next(t for t in model.graph.initializer if len(t.dims) == 1)
    values = onnx.numpy_helper.to_array(t)
    t.ClearField("raw_data")
    t.float_data[:] = values[:1].tolist()  # one value for a shape of many
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "p.onnx"), "--round-to", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"onnxprune: error: {tmp_path / 'm.onnx'}: initializer {t.name!r} holds 1 values for shape "
                   f"{list(t.dims)}"], err  # fmt: skip
    assert not (tmp_path / "p.onnx").exists()


def test_an_input_too_large_to_time_is_not_timed(tmp_path, capsys):
    """A static batch of 2^31 (fuzzing again): auto rounding drew random inputs of that size for minutes; now the
    layers are left untimed with a notice, and a latency target says how to give a smaller size."""
    model = onnx.load(ROOT / "models" / "fashion_mnist_cnn.onnx")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1 << 31
    onnx.save(model, tmp_path / "m.onnx")
    code = main(["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "p.onnx"), "--no-verify", "--json",
                 "--latency-cache", str(tmp_path / "cache")])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert any("too large to time" in n for n in report["notices"]), report["notices"]
    code = main(["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--target-latency", "0.6x",
                 "--latency-cache", str(tmp_path / "cache")])  # fmt: skip
    assert code == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "too many to measure" in err and "--shape" in err, err
