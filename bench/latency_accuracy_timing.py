"""Timing for `bench/latency_accuracy.py`: every variant against the dense model, interleaved in one process.

onnxruntime CPU, 1 intra-op thread, batch 1, thread CPU time (or wall clock), round-robin in chunks of `CHUNK`
variants, each chunk with the dense model and a second session of it (the self-check: its ratio must read 1.00).
Each timed sample is K back-to-back runs (`runs_per_sample`); latency = median over rounds of (variant sample /
dense sample of the same round), with its spread and ci (`bench.paired_stats.RatioSummary`). `timing_study`
compares this method with the session-23 one (K = 1, ratio of medians) by timing every model twice.
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

import numpy as np
import onnx

from bench.latency_accuracy_tables import KINDS
from bench.paired_stats import RatioSummary, monotone_violations
from onnxprune.latency.backend import OrtBackend, random_feeds
from onnxprune.latency.measure import static_inputs

__all__ = ["CHUNK", "curve_violations", "runs_per_sample", "samples", "time_all", "timing_study"]

CHUNK = 16  # variants timed per round-robin (plus the dense model twice): bounded memory, shared drift


class Timed(Protocol):
    """What timing reads and writes of a `bench.latency_accuracy.Variant`."""

    model: onnx.ModelProto | None
    config: str
    kind: str
    macs_reduction: float
    latency: float
    spread: float
    extra: dict[str, Any]


def runs_per_sample(dense: onnx.ModelProto, backend: OrtBackend, sample_ms: float) -> int:
    """K: back-to-back runs per timed sample so that a sample of the dense model lasts about `sample_ms`."""
    sess, feeds = backend.session(dense), random_feeds(dense, seed=0)
    seconds = []
    for _ in range(25):
        start = time.thread_time()
        sess.run(None, feeds)
        seconds.append(time.thread_time() - start)
    return max(1, math.ceil(sample_ms / (float(np.median(seconds[5:])) * 1e3)))


def samples(
    models: list[onnx.ModelProto],
    backend: OrtBackend,
    repeat: int,
    runs: int,
    wall: bool = False,
    warmup: int = 3,
) -> list[np.ndarray]:
    """Per-round time per run (seconds) of each model, round-robin with the order rotated every round; each
    sample is `runs` back-to-back runs. Thread CPU time (1 intra-op thread: onnxruntime runs on the calling
    thread), so time the scheduler gives other processes is not counted; `wall`: wall clock."""
    clock = time.perf_counter if wall else time.thread_time
    sessions = [(backend.session(m), random_feeds(m, seed=k)) for k, m in enumerate(models)]
    seconds: list[list[float]] = [[] for _ in models]
    for r in range(warmup + repeat):
        for i in [*range(r % len(sessions), len(sessions)), *range(r % len(sessions))]:
            sess, feeds = sessions[i]
            start = clock()
            for _ in range(runs):
                sess.run(None, feeds)
            if r >= warmup:
                seconds[i].append((clock() - start) / runs)
    return [np.asarray(x) for x in seconds]


def time_all(
    dense: onnx.ModelProto,
    variants: list[Timed],
    repeat: int,
    runs: int,
    wall: bool = False,
    write: bool = True,
) -> dict[str, Any]:
    """Latency of every variant relative to the dense model, timed round-robin in chunks of `CHUNK` variants,
    each chunk with the dense model and a second session of it (the self-check), `runs` runs per sample.

    Writes (unless not `write`) each variant's latency (median of per-round ratios), spread, ci and the
    ratio of medians (the session-23 estimate); returns the self-checks, the dense model's ms per run and a
    map variant index -> (median of per-round ratios, its ci, ratio of medians)."""
    backend = OrtBackend(threads=1)
    ready = [k for k, v in enumerate(variants) if v.model is not None]
    fixed = static_inputs(dense, None)
    checks, dense_ms, found = [], [], {}
    for start in range(0, len(ready), CHUNK):
        chunk = ready[start : start + CHUNK]
        models = [fixed, fixed, *(static_inputs(variants[k].model, None) for k in chunk)]
        got = samples(models, backend, repeat, runs, wall)
        self_check = RatioSummary.of(got[1], got[0])
        checks.append(
            {
                "ratio": self_check.ratio,
                "ci": self_check.ci,
                "spread": self_check.spread,
                "ratio_of_medians": float(np.median(got[1]) / np.median(got[0])),
            }
        )
        dense_ms.append(float(np.median(got[0])) * 1e3)
        for k, x in zip(chunk, got[2:]):
            summary = RatioSummary.of(x, got[0])
            found[k] = (summary.ratio, summary.ci, float(np.median(x) / np.median(got[0])))
            if write:
                v = variants[k]
                v.latency, v.spread = summary.ratio, summary.spread
                v.extra.update(ci=summary.ci, ratio_of_medians=found[k][2])
    return {
        "runs_per_sample": runs,
        "rounds": repeat,
        "dense_ms": dense_ms,
        "self_checks": checks,
        "found": found,
    }


def curve_violations(
    variants: list[Timed], found: dict[int, tuple[float, float, float]], paired: bool = True
) -> int:
    """Monotonicity violations (latency vs MACs, beyond the intervals) summed over every config's curves
    (`paired`: the median of per-round ratios, else the ratio of medians)."""
    total = 0
    for config in dict.fromkeys(v.config for v in variants):
        for kind in KINDS:
            pts = [
                (variants[k].macs_reduction, found[k][0 if paired else 2], found[k][1])
                for k in found
                if variants[k].config == config and variants[k].kind == kind
            ]
            total += len(monotone_violations(pts))
    return total


def timing_study(dense: onnx.ModelProto, variants: list[Timed], repeat: int, runs: int) -> list[dict]:
    """Each method timed twice over the same models: K = 1 with 101 rounds and ratio of medians (session 23);
    K = 1 with as many rounds as the next method's runs (more rounds, the same time) and K = `runs` with `repeat`
    rounds, both median of per-round ratios. Agreement of the two repetitions (median and max |a - b| over
    variants), the dense self-check and the curves' monotonicity violations."""
    rows = []
    for label, k, rounds, paired in (
        ("K=1, 101 rounds, ratio of medians (session 23)", 1, 101, False),
        (f"K=1, {runs * repeat} rounds (the same time), median of per-round ratios", 1, runs * repeat, True),
        (f"K={runs}, {repeat} rounds, median of per-round ratios", runs, repeat, True),
    ):
        t = time.perf_counter()
        reps = [time_all(dense, variants, rounds, k, write=False) for _ in range(2)]
        col = 0 if paired else 2
        a, b = (r["found"] for r in reps)
        diffs = [abs(a[i][col] - b[i][col]) for i in a]
        rows.append(
            {
                "method": label,
                "max_repeat_diff": max(diffs),
                "median_repeat_diff": float(np.median(diffs)),
                "self_checks": [
                    c["ratio"] if paired else c["ratio_of_medians"] for r in reps for c in r["self_checks"]
                ],
                "violations": [curve_violations(variants, r["found"], paired) for r in reps],
                "seconds": round(time.perf_counter() - t, 1),
            }
        )
    return rows
