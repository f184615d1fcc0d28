"""The text of `bench/latency_accuracy.py`'s results: per-model tables, equal-latency comparisons with their
strict verdict and paired significance, the timing checks, and the summary bar.

Start reading at `model_lines`. Every comparison puts two accuracies at the same measured latency: one of a
measured model, the other interpolated on the other allocation's accuracy-vs-latency curve. The strict
verdict (PASS: latency-aware >= FLOPs-based - `TIE`) is unchanged from session 23; next to it, McNemar's exact
test (`bench.paired_stats.mcnemar`) on the per-image correctness of the measured model and of the nearer of
the two measured models bracketing the interpolated point (the brief's rule), and "significant" (p < `ALPHA`
and the paired models differ the same way). The nearer model may sit a few % of latency away, so each line also
gives an interpolation-aware paired test: the interpolated accuracy w acc(A) + (1 - w) acc(B) is the mean of the
per-image score w a_i + (1 - w) b_i, compared with the other side's per-image scores (`paired_z`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bench.paired_stats import mcnemar, monotone_violations, nearer, paired_z, unpack

KINDS = ("latency-aware", "FLOPs-based", "uniform")
TIE = 0.1  # points of accuracy counted as equal in the bar (10 of 10,000 test images)
ALPHA = 0.05  # "significant": McNemar p below this
LABELS = {
    "calibrated": "obs + seq (calibrated), knapsack curves",
    "data-free": "obs + seq on --calib synthetic (data-free), knapsack curves",
    "l2-bias": "l2 + bias (data-free by construction)",
}
DENSE = -1  # the id of the dense model among a curve's points


def curve_at(
    records: list[dict], config: str, kind: str, latency: float, dense: float
) -> tuple[float, int, dict[int, float]] | None:
    """Accuracy of `kind`'s accuracy-vs-measured-latency curve at `latency`, the id (index in `records`,
    `DENSE` for the dense model) of the nearer bracketing measured model, and the interpolation weights of
    the bracketing models (id -> weight); None outside the curve's range.
    Every curve starts at the dense model (1.0x, `dense`): pruning nothing is a point of every allocation."""
    points = sorted([(1.0, dense, DENSE)] + [(r["latency_fraction"], r["accuracy"], k) for k, r in enumerate(records)
                                             if r["config"] == config and r["kind"] == kind and not r["error"]
                                             and np.isfinite(r["latency_fraction"])])  # fmt: skip
    if len(points) < 2 or not points[0][0] <= latency <= points[-1][0]:
        return None
    lat, acc, ids = zip(*points)
    near = nearer(list(zip(lat, ids)), latency)
    assert near is not None  # inside the range
    hi = min(max(int(np.searchsorted(lat, latency)), 1), len(lat) - 1)
    w = (latency - lat[hi - 1]) / (lat[hi] - lat[hi - 1]) if lat[hi] > lat[hi - 1] else 1.0
    weights = {ids[hi - 1]: 1.0 - w}
    weights[ids[hi]] = weights.get(ids[hi], 0.0) + w
    return float(np.interp(latency, lat, acc)), near, weights


def _correct(result: dict, k: int) -> np.ndarray | None:
    text = result.get("dense_correct") if k == DENSE else result["records"][k].get("correct")
    return unpack(text, int(result["n_test"])) if text and result.get("n_test") else None


def _score(result: dict, weights: dict[int, float]) -> np.ndarray | None:
    """Per-image score of a point of a curve: the interpolation weights applied to its models' correctness."""
    vectors = {k: _correct(result, k) for k in weights}
    if any(v is None for v in vectors.values()):
        return None
    return sum(w * vectors[k].astype(np.float64) for k, w in weights.items())


def _paired(result: dict, aware: int, flops: int) -> dict[str, Any]:
    """McNemar of the latency-aware model `aware` vs the FLOPs-based model `flops` (record ids or `DENSE`)."""
    a, f = _correct(result, aware), _correct(result, flops)
    if a is None or f is None:
        return {"p": None, "significant": None, "text": "paired test n/a (no per-image vectors)"}
    only_a, only_f, p = mcnemar(a, f)  # images only the latency-aware / only the FLOPs-based model gets right
    return {
        "p": p,
        "only_aware": only_a,
        "only_flops": only_f,
        "text": f"McNemar {only_a}:{only_f} p={p:.3f}",
    }


def _pair_text(result: dict, k: int) -> str:
    if k == DENSE:
        return "dense"
    r = result["records"][k]
    return f"{r['kind']} {r['setting']} at {r['latency_fraction']:.3f}x"


def _comparison_line(
    result: dict,
    config: str,
    latency: float,
    aware: tuple[float, int, dict[int, float]],
    flops: tuple[float, int, dict[int, float]],
    interpolated: str,
) -> tuple[str, dict]:
    """(accuracy, nearer measured model, interpolation weights) of each side -> the verdict text and record."""
    ok = aware[0] >= flops[0] - TIE
    test = _paired(result, aware[1], flops[1])
    near = aware[1] if interpolated == "latency-aware" else flops[1]
    # significant: p < ALPHA and the paired models differ the way the comparison does
    if test["p"] is not None:
        same_way = (test["only_aware"] - test["only_flops"]) * (aware[0] - flops[0]) > 0
        test["significant"] = bool(test["p"] < ALPHA and same_way)
        if test["p"] < ALPHA and not same_way:
            test["text"] += " (the paired models differ the other way)"
    sig = "n/a" if test["significant"] is None else ("yes" if test["significant"] else "no")
    score_a, score_f = _score(result, aware[2]), _score(result, flops[2])
    p_interp = paired_z(score_a, score_f) if score_a is not None and score_f is not None else None
    line = (
        f"{'PASS' if ok else 'FAIL'}  diff {aware[0] - flops[0]:+.2f} pt, {test['text']} "
        f"(paired with {_pair_text(result, near)}), significant: {sig}"
        + (f"; interpolated per-image z p={p_interp:.3f}" if p_interp is not None else "")
    )
    return line, {
        "model": result["model"],
        "config": config,
        "latency": latency,
        "latency_aware": aware[0],
        "flops": flops[0],
        "pass": ok,
        "p": test["p"],
        "significant": test["significant"],
        "p_interpolated": p_interp,
    }


def timing_lines(result: dict) -> list[str]:
    """The timing method, its self-check (dense / dense), monotonicity in MACs and the timing study."""
    timing = result.get("timing")
    if not timing:
        return []
    checks = ", ".join(f"{c['ratio']:.3f} (ci {c['ci']:.3f})" for c in timing["self_checks"])
    lines = [
        f"  timing: {timing['runs_per_sample']} back-to-back runs per sample, {timing['rounds']} rounds, dense "
        f"{np.median(timing['dense_ms']):.3f} ms/run; self-check dense/dense (second session): {checks}"
    ]
    records = result["records"]
    for config in dict.fromkeys(r["config"] for r in records if r["kind"] in KINDS):
        cells = []
        for kind in KINDS:
            mine = [r for r in records if r["config"] == config and r["kind"] == kind and not r["error"]]
            pts = [(r["macs_reduction"], r["latency_fraction"], r.get("ci", 0.0)) for r in mine]
            bad = monotone_violations(pts)
            cells.append(
                f"{kind} "
                + (
                    "yes"
                    if not bad
                    else "NO: "
                    + "; ".join(
                        f"{mine[j]['setting']} (MACs /{pts[j][0]:.2f}) {pts[j][1]:.3f}x > {mine[i]['setting']} "
                        f"(/{pts[i][0]:.2f}) {pts[i][1]:.3f}x"
                        for i, j in bad
                    )
                )
            )
        lines.append(f"  monotone in MACs within the ci ({config}): " + ", ".join(cells))
    for row in result.get("timing_study", []):
        lines.append(
            f"  timing study, {row['method']}: two repetitions differ by median {row['median_repeat_diff']:.3f}"
            f" / max {row['max_repeat_diff']:.3f} (latency fraction); dense/dense "
            + ", ".join(f"{x:.3f}" for x in row["self_checks"])
            + f"; monotonicity violations {row['violations']}; {row['seconds']:.0f} s"
        )
    return lines


def model_lines(result: dict) -> tuple[list[str], list[dict]]:
    """The text of one model's results, and its equal-latency comparisons (for the bar)."""
    records = result["records"]
    dense = result["dense"]
    lines = [
        f"{result['model']}: dense {result['metric']} {dense:.2f}%  ({result['load_before']}; "
        f"after: {result['load_after']})"
    ]
    if result.get("synthetic_s"):
        lines.append(
            f"  --calib synthetic: {result.get('synthetic_n', '?')} inputs in {result['synthetic_s']:.0f} s "
            "(once per model, shared by its data-free rows)"
        )
    lines += timing_lines(result)
    comparisons: list[dict] = []
    for config in dict.fromkeys(r["config"] for r in records if r["kind"] in KINDS):
        lines.append(f"  {LABELS.get(config, config)}:")
        lines.append(
            f"    {'kind':<14} {'setting':>8} {'latency':>8} {'ci':>6} {'spread':>7} {'MACs /':>7} {'acc':>7}"
        )
        for r in (x for x in records if x["config"] == config and x["kind"] in KINDS):
            if r["error"]:
                lines.append(f"    {r['kind']:<14} {r['setting']:>8}  {r['error']}")
                continue
            lines.append(f"    {r['kind']:<14} {r['setting']:>8} {r['latency_fraction']:>7.3f}x {r.get('ci', math.nan):>6.3f} "
                         f"{r['spread']:>7.2f} {r['macs_reduction']:>7.2f} {r['accuracy']:>6.2f}%"
                         + ("  kept " + " ".join(f"g{g}:{n}" for g, n in sorted(r["kept"].items(), key=lambda x: int(x[0])))
                            if r.get("kept") else ""))  # fmt: skip
        lines.append(
            "    at equal measured latency (FLOPs-based / uniform interpolated on their curves; strict verdict, "
            "then McNemar on per-image correctness):"
        )
        for k, r in enumerate(records):
            if r["config"] != config or r["kind"] != "latency-aware" or r["error"]:
                continue
            flops = curve_at(records, config, "FLOPs-based", r["latency_fraction"], dense)
            uniform = curve_at(records, config, "uniform", r["latency_fraction"], dense)
            cells = [
                f"latency-aware {r['accuracy']:.2f}%",
                f"FLOPs-based {flops[0]:.2f}%" if flops else "FLOPs-based - (outside its range)",
                f"uniform {uniform[0]:.2f}%" if uniform else "uniform - (outside its range)",
            ]
            verdict = ""
            if flops is not None:
                verdict, c = _comparison_line(
                    result, config, r["latency_fraction"], (r["accuracy"], k, {k: 1.0}), flops, "FLOPs-based"
                )
                comparisons.append(c)
            lines.append(
                f"      {r['latency_fraction']:.3f}x: "
                + ", ".join(cells)
                + ("  " + verdict if verdict else "")
            )
        lines.append(
            "    and at each FLOPs-based model's measured latency (latency-aware interpolated on its curve):"
        )
        for k, r in enumerate(records):
            if r["config"] != config or r["kind"] != "FLOPs-based" or r["error"]:
                continue
            aware = curve_at(records, config, "latency-aware", r["latency_fraction"], dense)
            if aware is None:
                lines.append(
                    f"      {r['latency_fraction']:.3f}x: FLOPs-based {r['accuracy']:.2f}%, latency-aware - "
                    "(outside its range)"
                )
                continue
            verdict, c = _comparison_line(
                result, config, r["latency_fraction"], aware, (r["accuracy"], k, {k: 1.0}), "latency-aware"
            )
            comparisons.append(c)
            lines.append(
                f"      {r['latency_fraction']:.3f}x: FLOPs-based {r['accuracy']:.2f}%, latency-aware "
                f"{aware[0]:.2f}%  {verdict}"
            )
    lines += rounding_lines(result)
    return lines, comparisons


def rounding_lines(result: dict) -> list[str]:
    """The bar "auto rounding is never slower than unrounded": plain --ratio R, auto vs --round-to 1."""
    records, lines = result["records"], []
    rounds = int(result.get("repeat", 101))
    bar = [r for r in records if r["kind"] in ("auto", "round-to-1") and not r["error"]]
    if not bar:
        return lines
    lines.append("  rounding (plain --ratio R, l2 + bias): latency auto vs --round-to 1, same rounds")
    for ratio in dict.fromkeys(r["setting"] for r in bar):
        pair = {r["kind"]: r for r in bar if r["setting"] == ratio}
        if len(pair) != 2:
            continue
        a, one = pair["auto"], pair["round-to-1"]
        if a.get("graph_sha") and a.get("graph_sha") == one.get("graph_sha"):
            lines.append(
                f"    ratio {ratio}: auto wrote the --round-to 1 model itself (same graph and weights; "
                f"measured {a['latency_fraction']:.3f}x vs {one['latency_fraction']:.3f}x: the timing noise)  PASS"
            )
            continue
        if "ci" in a and "ci" in one:  # both medians' ~95% intervals (paired per-round ratios)
            margin = max(0.01, a["ci"] + one["ci"])
        else:  # session 23: the median's standard error is ~0.93 x IQR / sqrt(rounds) per model; 2 sigma of the ratio
            margin = max(0.03, 2 * 0.93 * math.sqrt(2) * max(a["spread"], one["spread"]) / math.sqrt(rounds))
        ok = a["latency_fraction"] <= one["latency_fraction"] * (1 + margin)
        lines.append(
            f"    ratio {ratio}: auto {a['latency_fraction']:.3f}x (MACs /{a['macs_reduction']:.2f}, "
            f"{a['accuracy']:.2f}%), round-to 1 {one['latency_fraction']:.3f}x (MACs /"
            f"{one['macs_reduction']:.2f}, {one['accuracy']:.2f}%)  "
            f"{'PASS' if ok else 'FAIL'} (auto <= unrounded x {1 + margin:.3f}, the timing noise)"
        )
    return lines


def summary_lines(results: list[dict]) -> list[str]:
    """The bar per config: strict PASS count, and how many FAILs (and wins) are beyond the test set's noise."""
    comparisons = [c for res in results for c in model_lines(res)[1]]
    lines = []
    for config in dict.fromkeys(c["config"] for c in comparisons):
        mine = [c for c in comparisons if c["config"] == config]
        wins = sum(c["pass"] for c in mine)
        fails = [c for c in mine if not c["pass"]]
        sig_fails = sum(bool(c["significant"]) for c in fails)
        sig_wins = sum(bool(c["significant"]) and c["latency_aware"] > c["flops"] for c in mine)
        interp = sum(c.get("p_interpolated") is not None and c["p_interpolated"] < ALPHA for c in fails)
        mean = float(np.mean([c["latency_aware"] - c["flops"] for c in mine]))
        worst = min(mine, key=lambda c: c["latency_aware"] - c["flops"])
        lines.append(
            f"bar, {LABELS.get(config, config)} (latency-aware >= FLOPs-based - {TIE} pt at equal measured "
            f"latency): {wins}/{len(mine)} PASS; FAILs significant (McNemar p < {ALPHA}): {sig_fails}/"
            f"{len(fails)} (by the interpolated per-image test: {interp}/{len(fails)}); latency-aware significantly better: {sig_wins}; mean difference {mean:+.2f} pt; "
            f"worst {worst['latency_aware'] - worst['flops']:+.2f} pt ({worst['model']}, {worst['latency']:.3f}x)"
        )
    return lines
