"""Statistics of `bench/latency_accuracy.py`: paired latency ratios and paired accuracy tests.

Start reading at `RatioSummary.of` (latency) and `mcnemar` (accuracy).

Latency: every timed round runs the dense model and each variant (each sample = K back-to-back runs, so a
~1 ms model is timed over ~20 ms, well above the timer's and the scheduler's granularity). The latency of a
variant is the median over rounds of (variant sample / dense sample of the same round): a slow round (another
process, a frequency change) slows both and cancels in the ratio. Its noise is the interquartile range of the
per-round ratios; the median's 95% interval is median +- 1.57 IQR / sqrt(rounds) (McGill's notch).

Accuracy: two models scored on the same test images are compared by their per-image correctness, not by two
independent proportions: McNemar's exact test counts the images only one of them gets right (b and c); under
"equally accurate" each such image is a fair coin, p = P(Binomial(b + c, 1/2) as extreme as observed).
"""

from __future__ import annotations

import base64
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["RatioSummary", "mcnemar", "monotone_violations", "nearer", "pack", "paired_z", "unpack"]

NOTCH = 1.57  # McGill et al.: the median's ~95% interval is +- 1.57 IQR / sqrt(n)


@dataclass(frozen=True)
class RatioSummary:
    """The median of per-round ratios `variant / reference`, their relative IQR (`spread`) and the median's
    ~95% half-interval relative to it (`ci`)."""

    ratio: float
    spread: float
    ci: float
    rounds: int

    @classmethod
    def of(cls, variant: Sequence[float], reference: Sequence[float]) -> RatioSummary:
        """Summarise paired samples (round r of `variant` was timed in the same round as `reference[r]`)."""
        v, ref = np.asarray(variant, dtype=np.float64), np.asarray(reference, dtype=np.float64)
        if v.shape != ref.shape or v.size == 0:
            raise ValueError(f"paired samples need equal non-empty lengths, got {v.shape} and {ref.shape}")
        ratios = v / ref
        median = float(np.median(ratios))
        p25, p75 = np.percentile(ratios, [25, 75])
        spread = float((p75 - p25) / median) if median > 0 else 0.0
        return cls(median, spread, NOTCH * spread / math.sqrt(v.size), int(v.size))


def mcnemar(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """Exact two-sided McNemar test of two models' per-image correctness on the same images.

    Returns:
        (images only `a` gets right, images only `b` gets right, p-value); p = 1.0 when they never disagree.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"correctness vectors differ in length: {a.shape} vs {b.shape}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return only_a, only_b, 1.0
    # P(X <= k) for X ~ Binomial(n, 1/2), summed in log space (n may be thousands)
    logs = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
        for i in range(k + 1)
    ]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(x - top) for x in logs)
    return only_a, only_b, min(1.0, 2 * tail)


def paired_z(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sided p-value of mean(x - y) = 0 from per-image differences (normal approximation, n in the
    thousands). `x`, `y` may be fractional: an accuracy interpolated between two measured models with weights
    w and 1 - w is the mean of the per-image score w a_i + (1 - w) b_i, so it has a paired test too."""
    d = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    mean, sd = float(d.mean()), float(d.std(ddof=1)) if d.size > 1 else 0.0
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    return math.erfc(abs(mean) / (sd / math.sqrt(d.size)) / math.sqrt(2))


def pack(correct: np.ndarray) -> str:
    """A boolean vector as base64 of its packed bits (for the results JSON)."""
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode()


def unpack(text: str, n: int) -> np.ndarray:
    """Inverse of `pack` for a vector of `n` entries."""
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n].astype(bool)


def nearer(points: Sequence[tuple[float, int]], x: float) -> int | None:
    """Of the points (position, id) sorted by position, the id of the nearer of the two bracketing `x`
    (None outside their range). An interpolated accuracy has no per-image vector: the paired test uses
    the nearer measured model's."""
    pts = sorted(points)
    for (x0, i0), (x1, i1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            return i0 if x - x0 <= x1 - x else i1
    return None


def monotone_violations(points: Sequence[tuple[float, float, float]]) -> list[tuple[int, int]]:
    """Pairs (i, j) of points (MACs reduction, latency, ci) where j removes more MACs than i but is slower
    beyond both latencies' intervals. An empty list: latency is monotone in MACs within the noise."""
    out = []
    for i, (m0, l0, c0) in enumerate(points):
        for j, (m1, l1, c1) in enumerate(points):
            if m1 > m0 * 1.01 and l1 * (1 - c1) > l0 * (1 + c0):
                out.append((i, j))
    return out
