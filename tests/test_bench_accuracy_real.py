"""bench/accuracy_real.py's judgement of the issue's bars."""

from __future__ import annotations


def test_the_accuracy_bench_passes_a_drop_of_exactly_the_bar():
    """91.73 - 85.73 is 6.000000000000014 in floats: a drop of exactly the issue's 6 pt passes."""
    from bench.accuracy_real import bars

    cell = {"top1": 85.73}
    assert bars("cifar_resnet20", "synthetic-knapsack", 0.4, cell, 91.73, {}).startswith("PASS drop 6.00")
    assert bars("cifar_resnet20", "synthetic-knapsack", 0.4, {"top1": 85.72}, 91.73, {}).startswith("FAIL")
