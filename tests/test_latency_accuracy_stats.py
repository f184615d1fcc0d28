"""bench/latency_accuracy.py's judgement: paired latency ratios, McNemar's test, and the comparison table
(strict verdict and significance side by side, interpolated points paired with the nearer measured model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.latency_accuracy_tables import DENSE, curve_at, model_lines, summary_lines
from bench.paired_stats import RatioSummary, mcnemar, monotone_violations, nearer, pack, paired_z, unpack


def test_mcnemar_matches_scipy_exact_binomial():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n, flip in ((10_000, 0.02), (2_000, 0.005), (200, 0.1)):
        a = rng.random(n) < 0.9
        b = a ^ (rng.random(n) < flip)
        only_a, only_b, p = mcnemar(a, b)
        assert only_a == int(np.sum(a & ~b)) and only_b == int(np.sum(~a & b))
        expected = stats.binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue
        assert p == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert mcnemar(b, a)[2] == pytest.approx(p)  # symmetric


def test_mcnemar_edge_cases():
    same = np.array([True, False, True])
    assert mcnemar(same, same) == (0, 0, 1.0)  # never disagree: no evidence of a difference
    a = np.ones(40, bool)
    b = a.copy()
    b[:20] = False  # 20 images only `a` gets right, none the other way: 2 * 0.5**20
    assert mcnemar(a, b) == (20, 0, pytest.approx(2 * 0.5**20))
    with pytest.raises(ValueError):
        mcnemar(np.ones(3, bool), np.ones(4, bool))


def test_paired_ratio_cancels_drift_that_ratio_of_medians_does_not():
    rng = np.random.default_rng(1)
    drift = np.exp(rng.normal(0, 0.3, 61))  # every round slowed alike (another process, frequency)
    dense, pruned = 1.0 * drift, 0.5 * drift
    s = RatioSummary.of(pruned, dense)
    assert s.ratio == pytest.approx(0.5) and s.spread == pytest.approx(0.0, abs=1e-12) and s.rounds == 61
    # noise independent per sample: the median's interval is 1.57 IQR / sqrt(n)
    noisy = pruned * np.exp(rng.normal(0, 0.05, 61))
    s = RatioSummary.of(noisy, dense)
    assert s.ci == pytest.approx(1.57 * s.spread / math.sqrt(61))
    assert abs(s.ratio - 0.5) < 0.05
    with pytest.raises(ValueError):
        RatioSummary.of([1.0, 2.0], [1.0])


def test_paired_z_on_fractional_scores():
    rng = np.random.default_rng(3)
    a = rng.random(10_000) < 0.9
    assert paired_z(a, a) == 1.0
    b = a.copy()
    b[np.flatnonzero(a)[:200]] = False  # 2 pt worse on the same images: far beyond the noise
    assert paired_z(a, b) < 1e-10
    c = a ^ (rng.random(10_000) < 0.02)  # random disagreements: about as many each way
    d = 0.5 * a + 0.5 * c  # an interpolation halfway: half the differences
    assert paired_z(a, d) == pytest.approx(paired_z(a, c), abs=1e-12)  # scale-free: the same z


def test_pack_roundtrip_and_nearer():
    v = np.random.default_rng(2).random(10_003) < 0.5
    assert np.array_equal(unpack(pack(v), v.size), v)
    pts = [(1.0, DENSE), (0.8, 3), (0.5, 7)]
    assert nearer(pts, 0.95) == DENSE and nearer(pts, 0.85) == 3 and nearer(pts, 0.6) == 7
    assert nearer(pts, 0.4) is None and nearer(pts, 1.01) is None


def test_monotone_violations_beyond_the_interval_only():
    # (MACs reduction, latency, ci): the second removes more MACs but is slower
    assert monotone_violations([(1.2, 0.80, 0.01), (1.5, 0.90, 0.01)]) == [(0, 1)]
    assert monotone_violations([(1.2, 0.80, 0.05), (1.5, 0.82, 0.05)]) == []  # within the noise
    assert monotone_violations([(1.2, 0.80, 0.01), (1.5, 0.70, 0.01), (2.0, 0.55, 0.01)]) == []


def _record(config: str, kind: str, setting: str, latency: float, correct: np.ndarray) -> dict:
    return {"config": config, "kind": kind, "setting": setting, "error": "", "latency_fraction": latency,
            "spread": 0.1, "ci": 0.02, "accuracy": float(correct.mean() * 100), "macs_reduction": 1 / latency,
            "correct": pack(correct)}  # fmt: skip


def _result() -> dict:
    n = 10_000
    dense = np.zeros(n, bool)
    dense[:9300] = True  # 93.00%

    def drop(k: int) -> np.ndarray:
        out = dense.copy()
        out[:k] = False
        return out

    records = [
        _record("calibrated", "latency-aware", "0.8", 0.80, drop(10)),  # 92.90%
        _record("calibrated", "latency-aware", "0.6", 0.62, drop(400)),  # 89.00%
        _record("calibrated", "FLOPs-based", "70", 0.70, drop(60)),  # 92.40%
        _record("calibrated", "FLOPs-based", "50", 0.50, drop(500)),  # 88.00%
        _record("calibrated", "uniform", "0.3", 0.65, drop(900)),
    ]
    return {"model": "toy", "metric": "top-1", "dense": 93.0, "n_test": n, "dense_correct": pack(dense),
            "load_before": "-", "load_after": "-", "records": records}  # fmt: skip


def test_comparisons_keep_strict_verdict_and_add_paired_significance():
    result = _result()
    records = result["records"]
    # FLOPs-based curve: (0.5, 88.0) (0.7, 92.4) (1.0, 93.0); at 0.8x -> 92.6, nearer measured = 70 (index 2)
    acc, near, weights = curve_at(records, "calibrated", "FLOPs-based", 0.80, 93.0)
    assert acc == pytest.approx(92.4 + (93.0 - 92.4) * (0.1 / 0.3)) and near == 2
    assert weights == {2: pytest.approx(2 / 3), DENSE: pytest.approx(1 / 3)}
    # the interpolated accuracy is the mean of the weighted per-image scores
    score = sum(w * (unpack(result["dense_correct"], 10_000) if k == DENSE else unpack(records[k]["correct"], 10_000))
                for k, w in weights.items())  # fmt: skip
    assert float(np.mean(score) * 100) == pytest.approx(acc)
    assert curve_at(records, "calibrated", "FLOPs-based", 0.45, 93.0) is None
    lines, comparisons = model_lines(result)
    by_latency = {round(c["latency"], 2): c for c in comparisons}
    # 0.8x: latency-aware 92.90 vs FLOPs-based 92.60: PASS; paired with FLOPs-based 70 (60 vs 10 wrong images)
    c = by_latency[0.8]
    assert c["pass"] and c["p"] == pytest.approx(mcnemar(unpack(records[0]["correct"], 10_000),
                                                         unpack(records[2]["correct"], 10_000))[2])  # fmt: skip
    assert c["significant"]  # 50 images only the latency-aware model gets right, none the other way
    # 0.62x: latency-aware 89.00 vs FLOPs-based interpolated 90.64: a strict FAIL, paired with FLOPs-based 70
    # (0.70x is nearer than 0.50x): 340 images only it gets right, significant
    c = by_latency[0.62]
    assert not c["pass"] and c["flops"] == pytest.approx(90.64) and c["significant"]
    # 0.7x: FLOPs-based 92.40 vs latency-aware interpolated 90.73 (paired with 0.6 at 0.62x): FAIL, significant;
    # 0.5x is outside the latency-aware curve
    c = by_latency[0.7]
    assert (
        not c["pass"] and c["latency_aware"] == pytest.approx(89.0 + 3.9 * 0.08 / 0.18) and c["significant"]
    )
    assert 0.5 not in by_latency
    text = "\n".join(lines)
    assert "FAIL" in text and "significant: yes" in text and "paired with FLOPs-based 70 at 0.700x" in text
    summary = summary_lines([result])
    assert (
        len(summary) == 1
        and "1/3 PASS" in summary[0]
        and "FAILs significant (McNemar p < 0.05): 2/2" in summary[0]
    )


def test_comparison_against_the_dense_end_of_a_curve_pairs_with_dense():
    result = _result()
    result["records"] = [
        r for r in result["records"] if r["kind"] != "latency-aware" or r["setting"] != "0.8"
    ]
    _, comparisons = model_lines(result)
    # FLOPs-based 70 at 0.7x vs latency-aware interpolated between 0.62x and dense 1.0x (nearer: 0.62x)
    c = next(c for c in comparisons if c["latency"] == pytest.approx(0.7))
    assert c["latency_aware"] == pytest.approx(89.0 + 4.0 * 0.08 / 0.38) and c["significant"]
    # latency-aware 0.6 moved to 0.95x: FLOPs-based interpolated between 0.7x and dense, nearer: dense
    result["records"][0]["latency_fraction"] = 0.95
    lines, comparisons = model_lines(result)
    assert any("0.950x" in line and "paired with dense" in line for line in lines)
    c = next(c for c in comparisons if c["latency"] == pytest.approx(0.95))
    assert not c["pass"] and c["significant"]  # 89.00% vs ~92.9%: dense gets 400 more images right


def test_significance_needs_the_paired_models_to_differ_the_same_way():
    # a FAIL whose paired (nearer) model is in fact better than the FLOPs-based one is not significant
    result = _result()
    records = result["records"]
    records[0]["latency_fraction"] = 0.72  # latency-aware 0.8 (92.90%) now at 0.72x
    records[1]["latency_fraction"] = 0.50  # latency-aware 0.6 (89.00%) at 0.50x
    # FLOPs-based 70 at 0.70x: latency-aware interpolated 89 + 3.9 * 0.2 / 0.22 = 92.55 > 92.4 - 0.1: PASS
    _, comparisons = model_lines(result)
    c = next(c for c in comparisons if c["latency"] == pytest.approx(0.7))
    assert c["pass"] and c["significant"]  # nearer: latency-aware 0.8 (50 images only it gets right)
    records[0]["accuracy"] = 92.0  # the interpolated point now says FAIL, the paired vectors still favour it
    _, comparisons = model_lines(result)
    c = next(c for c in comparisons if c["latency"] == pytest.approx(0.7))
    assert not c["pass"] and c["p"] < 0.05 and c["significant"] is False


def _conv_chain(depth: int):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(depth)
    nodes, inits, prev = [], [], "x"
    for k in range(depth):
        w = numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.1, f"w{k}")
        inits.append(w)
        nodes.append(helper.make_node("Conv", [prev, f"w{k}"], [f"y{k}"], pads=[1, 1, 1, 1]))
        prev = f"y{k}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 32, 32])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 16, 32, 32])], inits)  # fmt: skip
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.exclusive
def test_time_all_self_check_and_ordering_on_onnxruntime():
    pytest.importorskip("onnxruntime")
    from bench.latency_accuracy import Variant
    from bench.latency_accuracy_timing import time_all

    dense = _conv_chain(2)
    variants = [Variant("calibrated", "uniform", "0", model=_conv_chain(2)),
                Variant("calibrated", "uniform", "1", model=_conv_chain(8))]  # fmt: skip
    timing = time_all(dense, variants, repeat=21, runs=4)
    # a second session of the dense model, and the same graph as a variant: ratio ~1 (loaded 2-core machine:
    # generous margins); four times the convolutions: clearly slower
    assert all(0.8 < c["ratio"] < 1.25 for c in timing["self_checks"])
    assert 0.8 < variants[0].latency < 1.25
    assert variants[1].latency > 2.0
    assert variants[1].extra["ci"] >= 0 and timing["runs_per_sample"] == 4


def test_rows_show_the_kept_channels_when_recorded():
    result = _result()
    result["records"][0]["kept"] = {"10": 3, "2": 8}  # JSON keys: group ids as strings, shown in group order
    lines = model_lines(result)[0]
    assert sum("kept g2:8 g10:3" in line for line in lines) == 1
    assert sum("kept" in line for line in lines) == 1  # rows without the record print as before
