"""The CLI contract (flags, JSON keys, exit codes) and bad-input handling."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from models.testmodels import TEST_MODELS
from onnxprune.cli import main
from onnxprune.verify import max_rel_error, random_inputs, run

PRUNE_KEYS = {"input", "output", "params_before", "params_after", "macs_before", "macs_after", "groups",
              "groups_pruned", "barriers"}  # fmt: skip
ANALYZE_KEYS = {"params", "macs", "prunable_params", "groups", "barriers"}
FASHION = Path(__file__).resolve().parents[1] / "models" / "fashion_mnist_cnn.onnx"


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "onnxprune.cli", *map(str, args)], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def residual(tmp_model):
    return tmp_model(TEST_MODELS["residual"](), "residual.onnx")


def test_default_command_writes_pruned_model_next_to_input(residual):
    digest = _sha(residual)
    code, out, err = _cli(residual)
    assert code == 0, err
    pruned = residual.with_name("residual.pruned.onnx")
    assert pruned.exists()
    assert "params" in out
    assert _sha(residual) == digest  # the input is never modified
    onnx.checker.check_model(onnx.load(str(pruned)), full_check=True)


def test_prune_json_contract(residual, tmp_path):
    out_path = tmp_path / "out.onnx"
    code, out, err = _cli("prune", residual, "-o", out_path, "--ratio", "0.5", "--global", "--round-to", "2",
                          "--criterion", "l2", "--json")  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert PRUNE_KEYS <= data.keys()
    assert data["output"] == str(out_path)
    assert data["params_after"] < data["params_before"]
    assert data["macs_after"] < data["macs_before"]
    assert data["groups_pruned"] >= 1
    pruned = onnx.load(str(out_path))
    assert any(p.key == "onnxprune.summary" for p in pruned.metadata_props)


def test_analyze_json_contract(residual):
    code, out, err = _cli("analyze", residual, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert ANALYZE_KEYS <= data.keys()
    assert data["prunable_params"] > 0
    assert {"id", "channels", "params", "members", "inexact", "min_keep"} <= data["groups"][0].keys()


def test_barrier_reported_for_op_without_rule(tmp_model, capsys):
    model = TEST_MODELS["chain"]()
    node = next(n for n in model.graph.node if n.op_type == "Relu")
    node.op_type = "LpNormalization"  # a real op that has no channel rule
    path = tmp_model(model, "barrier.onnx")
    assert main(["analyze", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    barrier = next(b for b in data["barriers"] if b["node"] == node.name)
    assert barrier["op_type"] == "LpNormalization" and "no channel rule" in barrier["reason"]
    # The channels through the barrier are frozen, the others are still prunable.
    assert data["groups"] and data["prunable_params"] < data["params"]


def test_ratio_zero_roundtrip(residual, tmp_path):
    out_path = tmp_path / "zero.onnx"
    assert main(["prune", str(residual), "--ratio", "0", "-o", str(out_path), "--json"]) == 0
    original, pruned = onnx.load(str(residual)), onnx.load(str(out_path))
    inputs = random_inputs(original)
    assert max_rel_error(run(original, inputs), run(pruned, inputs)) == 0.0


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"this is not onnx", "not a readable"), (None, "no such file")],
)
def test_bad_files_one_line_error(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    code, _, err = _cli(path)
    assert code == 1
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert not list(tmp_path.glob("*.pruned.onnx"))


def test_truncated_model(residual, tmp_path):
    data = residual.read_bytes()
    path = tmp_path / "trunc.onnx"
    path.write_bytes(data[: len(data) // 2])
    code, _, err = _cli(path)
    assert code == 1 and len(err.strip().splitlines()) == 1


def test_checker_failure(tmp_path):
    model = TEST_MODELS["chain"]()
    model.graph.node[0].input[1] = "does_not_exist"
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    code, _, err = _cli(path)
    assert code == 1 and "checker" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["--ratio", "1.0"], ["--ratio", "-0.1"], ["--ratio", "abc"], ["--round-to", "0"],
                                  ["--criterion", "nope"], ["--bogus"], ["--seed", "-1", "--criterion", "random"]])  # fmt: skip
def test_usage_errors_exit_2(residual, args):
    code, _, err = _cli("prune", residual, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["--repair", "seq"], ["--repair", "ls"], ["--criterion", "activation"],
                                  ["--allocation", "knapsack"], ["--sparsity", "0.5", "--sparse-criterion", "wanda"],
                                  ["--mode", "unconstrained", "--repair", "ls"]])  # fmt: skip
def test_options_needing_data_name_both_real_and_distilled_inputs(residual, args):
    """Without samples a user is pointed at --calib synthetic too, not only at the weak data-free repair."""
    code, _, err = _cli("prune", residual, "--ratio", "0.3", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--calib FILE.npz" in err and "--calib synthetic" in err, err


def test_output_equal_to_input_refused(residual):
    digest = _sha(residual)
    code, _, _ = _cli("prune", residual, "-o", residual)
    assert code == 2 and _sha(residual) == digest


def test_unwritable_output(residual, tmp_path):
    target = tmp_path / "a_folder.onnx"
    target.mkdir()  # a directory cannot be replaced by the output file, even as root
    code, _, err = _cli("prune", residual, "-o", target)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_missing_output_folder(residual, tmp_path):
    code, _, err = _cli("prune", residual, "-o", tmp_path / "nope" / "x.onnx")
    assert code == 1 and len(err.strip().splitlines()) == 1


def test_version_and_help():
    assert _cli("--version")[0] == 0
    assert _cli("--help")[0] == 0
    assert _cli("prune", "--help")[0] == 0


def test_analyze_explains_frozen_weights(tmp_model, capsys):
    """A weight next to a graph output cannot shrink there; analyze says which and why."""
    path = tmp_model(TEST_MODELS["chain"](), "chain.onnx")
    assert main(["analyze", str(path), "--json"]) == 0
    frozen = json.loads(capsys.readouterr().out)["frozen_weights"]
    head = [f for f in frozen if f["reason"].startswith("graph input/output")]
    assert head and all({"reason", "count", "examples", "nodes"} <= f.keys() for f in frozen)
    assert len({f["reason"] for f in frozen}) == len(frozen)  # one row per reason


def test_analyze_groups_frozen_weights_by_reason(capsys, monkeypatch):
    """Kernel axes of every conv share one row: node names are a field of their own, not part of the reason."""
    assert main(["analyze", str(FASHION), "--json"]) == 0
    frozen = json.loads(capsys.readouterr().out)["frozen_weights"]
    kernels = [f for f in frozen if f["reason"] == "not a channel axis of Conv"]
    assert len(kernels) == 1 and kernels[0]["count"] >= 6 and len(kernels[0]["examples"]) == 3
    names = [n.name for n in onnx.load(str(FASHION)).graph.node]
    assert not [f["reason"] for f in frozen if any(name in f["reason"] for name in names)]
    assert kernels[0]["nodes"][0] in names
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps cells to the terminal width
    assert main(["analyze", str(FASHION)]) == 0
    assert capsys.readouterr().out.count("not a channel axis of") == 1  # the text table has one row too


@pytest.mark.parametrize("suffix", [".graphml", ".json"])
def test_analyze_writes_the_dependency_graph(residual, tmp_path, suffix, capsys):
    import networkx as nx

    path = tmp_path / f"deps{suffix}"
    assert main(["analyze", str(residual), "--graph", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["graph"] == str(path) and ANALYZE_KEYS <= data.keys()
    if suffix == ".json":
        graph = json.loads(path.read_text())
        assert len(graph["groups"]) == len(data["groups"]) and graph["nodes"]
    else:
        graph = nx.read_graphml(path)
        assert any(node.startswith("op:") for node in graph.nodes)
    assert main(["analyze", str(residual), "--graph", str(path)]) == 0  # text mode names the file
    assert f"graph: {path}" in capsys.readouterr().out


def test_analyze_graph_suffix_checked_before_reading(tmp_path):
    code, _, err = _cli("analyze", tmp_path / "missing.onnx", "--graph", tmp_path / "deps.txt")
    assert code == 2 and ".graphml or .json" in err and len(err.strip().splitlines()) == 1


def test_notices_come_before_reading_the_model(tmp_path):
    code, _, err = _cli("prune", tmp_path / "missing.onnx", "--criterion", "obs")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 2
    assert lines[0].startswith("onnxprune: note: criterion obs") and "no such file" in lines[1]


def test_prune_stamps_even_when_nothing_is_removed(residual, tmp_path):
    out_path = tmp_path / "zero.onnx"
    assert main(["prune", str(residual), "--ratio", "0", "-o", str(out_path), "--json"]) == 0
    record = json.loads({p.key: p.value for p in onnx.load(str(out_path)).metadata_props}["onnxprune.summary"])
    assert record["channels_removed"] == 0 and record["params_after"] == record["params_before"]


def test_a_count_target_the_model_already_meets_is_said_in_text_and_json(residual, tmp_path):
    """Nothing to remove is a notice, not a silent copy; the text output prints the selection's notices."""
    out = tmp_path / "p.onnx"
    code, text, _ = _cli("prune", residual, "-o", out, "--target-params", "1000000000", "--round-to", "1")
    assert code == 0 and "note: target params 1000000000 is not below the model's" in text
    code, js, _ = _cli("prune", residual, "-o", out, "--target-params", "1000000000", "--round-to", "1", "--json")
    record = json.loads(js)
    assert record["params_after"] == record["params_before"]
    assert any(n.startswith("target params 1000000000 is not below") for n in record["notices"])


def test_a_data_free_fallback_note_is_printed_once(residual, tmp_path):
    code, text, err = _cli("prune", residual, "-o", tmp_path / "p.onnx", "--criterion", "obs", "--round-to", "1")
    assert code == 0 and "BatchNorm Hessian surrogate" in err and "surrogate" not in text


def test_unconstrained_mode_says_so_too_when_the_target_is_met(residual, tmp_path):
    code, js, _ = _cli("prune", residual, "-o", tmp_path / "u.onnx", "--mode", "unconstrained", "--target-params",
                       "1000000000", "--json")
    assert code == 0 and any("nothing to remove" in n for n in json.loads(js)["notices"])


def test_a_parameter_target_below_the_smallest_model_is_a_usage_error(residual, tmp_path):
    """Known from the model before any work: exit 2 (an unreachable --target-latency is measured: exit 1)."""
    out = tmp_path / "p.onnx"
    code, _, err = _cli("prune", residual, "-o", out, "--target-params", "10", "--round-to", "1")
    assert code == 2 and "is unreachable: the smallest this model can get is" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
