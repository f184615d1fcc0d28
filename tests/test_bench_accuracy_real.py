"""bench/accuracy_real.py's judgement of the issue's bars."""

from __future__ import annotations


def test_the_accuracy_bench_passes_a_drop_of_exactly_the_bar():
    """91.73 - 85.73 is 6.000000000000014 in floats: a drop of exactly the issue's 6 pt passes."""
    from bench.accuracy_real import bars

    cell = {"top1": 85.73}
    for method in ("synthetic-lamp", "synthetic-knapsack"):
        assert bars("cifar_resnet20", method, 0.4, cell, 91.73, {}).startswith("PASS drop 6.00")
        assert bars("cifar_resnet20", method, 0.4, {"top1": 85.72}, 91.73, {}).startswith("FAIL")
    assert bars("cifar_resnet20", "calibrated-lamp", 0.4, {"top1": 88.73}, 91.73, {}).startswith("PASS drop 3.00")
    assert bars("cifar_resnet20", "synthetic", 0.4, cell, 91.73, {}) == ""  # uniform: a reference row


def test_the_plot_draws_models_with_different_methods(tmp_path):
    """Panels with different method sets share one legend and one colour per method (the first version coloured
    by position: one method had two colours, and the first panel had no legend)."""
    from bench.accuracy_real import plot

    def model(rows):
        return {"top1": 91.7, "rows": {f"{m}@{f}": {"top1": t} for (m, f), t in rows.items()}}

    results = {"fractions": [0.2, 0.4], "models": {
        "a": model({("l1", 0.2): 63.5, ("l1", 0.4): 23.4, ("synthetic-knapsack", 0.2): 89.7,
                    ("synthetic-knapsack", 0.4): 85.0}),
        "b": model({("synthetic-knapsack", 0.2): 92.2, ("onnxsim", 0.2): 73.8, ("onnxsim", 0.4): 21.5})}}
    plot(tmp_path / "p.png", results)
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_the_unconstrained_row_is_judged_against_constrained_and_the_calibrated_bar():
    from bench.accuracy_real import bars

    rows = {("constrained", 0.4): {"top1": 86.13}}
    verdict = bars("cifar_resnet20", "unconstrained", 0.4, {"top1": 88.90}, 91.73, rows)
    assert verdict == "PASS vs constrained +2.77 >= +1; PASS drop 2.83 <= 3"
    assert bars("cifar_resnet20", "unconstrained", 0.4, {"top1": 88.70}, 91.73, rows).endswith("FAIL drop 3.03 <= 3")


def test_readme_states_the_bench_s_best_unconstrained_configuration():
    """README's best calibrated configuration and its data-free command are `UNCONSTRAINED_BEST`'s flags (lamp is
    the default with --target-params, so README leaves it out): one definition, written out in both places."""
    from pathlib import Path

    from bench.accuracy_real import UNCONSTRAINED_BEST
    from bench.unconstrained_latency import cli_flags

    assert UNCONSTRAINED_BEST["allocation"] == "lamp"
    flags = " ".join(["--mode", "unconstrained", *cli_flags({k: v for k, v in UNCONSTRAINED_BEST.items()
                                                               if k != "allocation"})])
    text = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert f"`{flags}`" in text
    assert f"`onnxprune prune MODEL.onnx {flags} --target-params 60% --round-to 1 --calib synthetic:512`" in text
