"""Fuzzing tier of the fast suite: the crasher corpus as regression cases, ~100 generated cases, and a
few cases as separate CLI processes. `bench/fuzz.py` runs >= 1,000."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.testmodels import TEST_MODELS
from onnxprune.cli import main as cli_main
from onnxprune.fuzz_mutations import HOSTILE
from onnxprune.fuzzing import Case, FuzzRunner, base_models, layout, make_case, run_case, summarize

CORPUS = Path(__file__).parent / "fuzz_corpus"
SEED_FILES = [Path(__file__).resolve().parents[1] / "models" / "fashion_mnist_cnn.onnx"]


def _corpus_cases() -> list[Case]:
    cases = []
    for folder in sorted(p for p in CORPUS.iterdir() if p.is_dir()) if CORPUS.exists() else []:
        meta = json.loads((folder / "case.json").read_text())
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "case.json"}
        cases.append(Case(f"corpus/{folder.name}/{meta['name']}", files, meta["args"], meta.get("links", {})))
    return cases


@pytest.mark.parametrize("case", _corpus_cases(), ids=lambda c: c.name)
def test_corpus_case_ends_in_success_or_one_line_error(case, tmp_path):
    outcome = run_case(case, tmp_path, cli_main)
    assert outcome.status in ("ok", "error"), outcome.detail


@pytest.fixture(scope="module")
def bases():
    return base_models(TEST_MODELS, SEED_FILES)


def test_base_models_are_the_callers_seeds(bases):
    assert set(bases) == set(TEST_MODELS) | {"fashion_mnist_cnn"}
    assert base_models({"only": TEST_MODELS["chain"]}, [Path("/nonexistent/x.onnx")]).keys() == {"only"}


def test_generated_cases_fast_subset(bases):
    cases = [make_case(seed, bases) for seed in range(5000, 5100)]
    runner = FuzzRunner(cli_main, workers=2, timeout=30)
    try:
        results = runner.run(cases)
    finally:
        runner.close()
    counts = summarize(results)
    bad = [f"{r.status} {r.name}: {r.detail[-300:]}" for r in results if r.status not in ("ok", "error")]
    assert not bad, "\n".join(bad)
    assert counts["cases"] == 100
    assert counts["ok"] >= 5 and counts["error"] >= 30  # the generator exercises both paths


def test_generated_cases_as_cli_processes(bases, tmp_path):
    for seed in (7, 11, 12, 19):
        case = make_case(seed, bases)
        root = tmp_path / str(seed)
        model, out = layout(case, root)
        args = [a.format(model=model, out=out) for a in case.args]
        proc = subprocess.run([sys.executable, "-m", "onnxprune.cli", *args], capture_output=True, text=True,
                              timeout=120, cwd=root / "cwd")  # fmt: skip
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert "Traceback" not in proc.stderr and len(lines) <= 1, proc.stderr
        assert proc.returncode in (0, 1, 2)
        assert not list((root / "cwd").iterdir())


@pytest.mark.parametrize("kind", ["external_escape", "external_symlink", "external_missing", "external_bad_range",
                                  "external_truncated", "if", "loop", "scan", "cycle", "huge_input_dim",
                                  "huge_init_dims", "zero_dim_weight", "unknown_domain", "duplicate_output"])
def test_each_hostile_kind(kind, bases, tmp_path):
    import numpy as np
    import onnx

    for k, base in enumerate(["residual", "attention", "fashion_mnist_cnn"]):
        m = onnx.ModelProto()
        m.ParseFromString(bases[base])
        files: dict[str, bytes] = {}
        HOSTILE[kind](m, np.random.default_rng(k), files)
        files["model.onnx"] = m.SerializeToString()
        links = {key.split(":", 1)[1]: files.pop(key).decode() for key in [x for x in files if x.startswith("__link__:")]}
        case = Case(f"{kind}/{base}", files, ["prune", "{model}", "-o", "{out}", "--ratio", "0.5"], links)
        outcome = run_case(case, tmp_path / f"{k}", cli_main)
        assert outcome.status in ("ok", "error"), outcome.detail
        if kind in ("external_escape", "external_symlink", "external_missing", "external_truncated"):
            assert outcome.status == "error", f"{kind} on {base} must be refused"


# Hypothesis explores the case generator's seed space (and shrinks a failure to its smallest seed).


@settings(max_examples=25, deadline=20_000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(min_value=0, max_value=2**31 - 1))
def test_hypothesis_seeds(seed, bases, tmp_path_factory):
    case = make_case(seed, bases)
    outcome = run_case(case, tmp_path_factory.mktemp("hyp"), cli_main)
    assert outcome.status in ("ok", "error"), f"{case.name}: {outcome.detail}"
