"""Hardware-friendly channel counts: the kept counts at the bottom of each latency step.

Start reading at `keep_counts`. A kernel's latency is step-shaped in the channel count: onnxruntime's CPU
convolutions work in NCHWc blocks (16 channels on AVX-512), so 49..64 output channels cost the same as 64;
input channel counts that are not a multiple of 4 leave the blocked path altogether. Measured on this
machine (onnxruntime 1.32, 1 thread, AMD EPYC with AVX-512, 28x28 maps, median ms of 20 interleaved runs):

==================================  =====  =====  =====  =====  =====
count                                  48     56     63     64     65
==================================  =====  =====  =====  =====  =====
3x3 conv, 64 in, count out           0.271  0.325  0.328  0.327  0.419
3x3 conv, count in, 64 out           0.266  0.345  0.505  0.341  0.518
depthwise 3x3 conv, count channels   0.074  0.105  0.196  0.086  0.203
==================================  =====  =====  =====  =====  =====

So output counts step every 16 (49..64 cost as 64), an input count that is not a multiple of 4 costs up
to 1.5x its rounded-up neighbour, and a depthwise conv is 2.3x slower at 63 than at 64 and fastest at
multiples of 16 (48 and 64 beat 52..60). A pruned MobileNetV2 whose counts land anywhere (``--round-to
1``) was slower than the dense model; the grid keeps each group at counts that buy latency.

**The rule**, per group curve (`table.GroupCurve`: the summed latency of the layers the group touches at
the measured counts), with ``tol(c) = f(c) * max(tolerance, min(spread(c) / 2, 0.2))`` (measured noise,
half the runs' relative interquartile range, raises the tolerance; beyond 20% the spread is load spikes,
which the fastest runs the table uses do not see):

1. *Flat*: if the whole curve stays within ``tol`` of its dense value (tiny layers: the time is call
   overhead), latency does not care: every count 1..size is allowed.
2. *Dominated* counts go: a measured count is dropped if a larger measured count is faster by more than
   ``tol`` (63 input channels: 64 is clearly faster and keeps more).
3. *Period*, from the fine window (the densely measured counts below the dense size: the last 32 on
   onnxruntime, see `backend`):

   a. the *alignment*: the period ``P`` (2, 4, ..., 64; at most half the window) whose multiples best
      match the window's counts that are not dominated (fewest counts in one set but not the other; ties
      go to the smaller period, 1 = every count). Misaligned counts that cost extra show up here;
   b. the *staircase* among the aligned counts: ``f(c) = a + b * ceil(c / Q)`` for multiples ``Q`` of
      ``P`` seen at least twice in the window, against a line. The best staircase (near-ties, within 10%
      of the best residual, go to the larger period) replaces ``P`` if its residual is no larger than the
      line's and its step ``b`` exceeds 0.5% of the dense latency: a coarser grid only costs choice, a
      missed step costs latency.

   The allowed counts are the multiples of ``P`` over the whole range (blocks and lanes align to zero;
   the coarse sweep's counts are multiples of 32, which every such period divides) plus the dense size,
   minus the dominated measured counts.
4. Without a fine window (a backend that probes sparsely, e.g. TVM where each count is a compile), the
   allowed counts are the measured ones that are not dominated and top their plateau (the most channels
   among consecutive counts within ``tol`` of each other), plus the size.
5. *Thread balance* (`balanced`, onnxruntime's NCHWc block of 16 only): in groups of at least 128
   channels, 80 and 112 (5 and 7 blocks) go when 96 and 128 are allowed: at 2 threads they cost 0.92-0.97
   of the next block up (one thread gets a light partial filter set), at 1 thread 0.86-0.93. The default
   table is measured at 1 thread and cannot see this; without the rule the default ResNet-50 plan at
   ``--ratio 0.7`` kept 80 channels in its 256-channel groups, the weakest 2-thread row of issue 13.

Everything is a function of the table, so the grid is deterministic for a given table.

**Measured example.** MobileNetV2's group of 384 channels (expand conv, depthwise conv, project conv of
block 8), relative to the dense latency (fastest of 5-15 runs, load average 24 on 2 cores): 352: 0.95,
354: 1.30, 356: 0.94, 358: 1.24, 360: 0.98, 364: 0.95, 368: 0.97, 372: 1.02, 376: 1.04, 377: 1.37, 380:
1.01, 383: 1.41, 384: 1.00. Every count that is not a multiple of 4 is dominated (1.24-1.5x: the depthwise
conv off its blocked path), so the alignment is 4; among the multiples of 4 the staircase of 16 fits no
worse than a line, so the group keeps multiples of 16 (272, 288, ..., 368, 384).

Over whole models (onnxruntime 1.32, 1 thread, tables built at load averages 15-25 on 2 cores, so noisy): ResNet-50 11 of its 37 groups multiples of 16, 13 of
8, 6 of 4, 1 of 2, 6 linear (mostly 64-channel groups); MobileNetV2 (25 groups) 7 of 16, 6 of 8, 7 of 4, 5
linear (groups of 16-96 channels and the 1280 before the classifier); EfficientNet-B0 (40 groups) 11 of
16, 5 of 8, 10 of 4, 2 linear and 12 flat (squeeze-excitation layers of 4-10 channels on a 1x1 map, whose
cost is call overhead). Under that load two builds of one model disagree on some groups, mostly 8 against
16; `bench/latency_tables.py` re-measures on a quiet machine. What the grid buys, MobileNetV2 pruned with
``--ratio 0.3`` (the CLI; onnxruntime 1 thread, 120 interleaved rounds, load 23): ``--round-to 1`` ran at
0.86x the dense speed, 4 at 1.37x, 8 at 1.39x, 16 at 1.55x (MACs / 1.53), auto at 1.49x (MACs / 1.83).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnxprune.channels import ChannelAnalysis
from onnxprune.latency.table import GroupCurve, LatencyTable

__all__ = [
    "GridChoice", "aligned", "balanced", "curve_counts", "fit_period", "fit_residues", "keep_counts", "multiples",
    "next_on_grid", "off_grid_penalty",
]

MIN_WINDOW = 8  # densely measured counts needed to fit a period
MAX_GAP = 2  # counts at most this far apart are dense (a backend may measure only the even ones)
PERIODS = (2, 4, 8, 16, 32, 64)  # vector lanes and layout blocks (a 32-count window cannot tell 12 from noise)
NEAR_TIE = 1.1  # staircase residuals within 10% of the best one count as equally good
MIN_STEP = 0.005  # a staircase's step must exceed this fraction of the dense latency
NOISE_OF_SPREAD = 0.5  # noise of a median, as a fraction of the runs' interquartile range over median
MAX_NOISE = 0.2  # a relative noise above this is a load spike in some runs; the median is robust to it
ALIGN_FROM = 16  # groups of at least this many channels keep multiples of the backend's alignment
BALANCED_BLOCK = 16  # the NCHWc block `balanced` was measured with (AVX-512)
FILTER_SET_BLOCKS = 4  # MLAS computes an NCHWc convolution's output in sets of this many blocks


@dataclass(frozen=True)
class GridChoice:
    """Which branch of the rule chose a group's grid: ``"flat"``, ``"linear"``, ``"period"`` (multiples of
    `period`) or ``"measured"`` (sparse probes)."""

    kind: str
    period: int = 1


def keep_counts(table: LatencyTable, analysis: ChannelAnalysis, *, tolerance: float = 0.03) -> dict[int, tuple[int, ...]]:
    """The allowed kept counts of every group of `analysis`, ascending, always including the group size.

    A group without a curve in `table` (it touches no measured layer) may keep any count. See the module
    docstring for the rule; the backend's alignment (`aligned`) and thread balance (`balanced`) apply last.
    A table calibrated in-model (`latency.calibrate`) is read through its micro-model prices
    (``table.alone``): the steps are what the micro-benchmarks measured.
    """
    table = table.alone or table
    out: dict[int, tuple[int, ...]] = {}
    for g in analysis.groups:
        curve = table.curves.get(g.id)
        if curve is None:
            out[g.id] = tuple(range(1, g.size + 1))
            continue
        counts = curve_counts(curve, tolerance=tolerance)[0]
        alignment = getattr(table, "alignment", 1)
        out[g.id] = balanced(aligned(counts, g.size, alignment), g.size, alignment)
    return out


def aligned(counts: Sequence[int], size: int, alignment: int) -> tuple[int, ...]:
    """`counts` restricted to multiples of the backend's `alignment` (plus `size`), for groups of at least
    `ALIGN_FROM` channels; unchanged when that would leave only the size or the alignment is 1.

    Why a prior and not a measurement: a one-layer micro-model converts layouts at its input and output
    whatever the count, so it cannot see what a whole model's chain of blocked convolutions does with a
    count. Measured on onnxruntime 1.32 (CPU, AVX-512, this machine; `backend.nchwc_block` = 16):

    * a 1x1 conv whose input channel count is 16 or more and not a multiple of 4 (18, 21, 22, 30) leaves the
      NCHWc path, with a reorder on each side; MobileNetV2 at ``--ratio 0.7`` kept 21, 18 and 22 of its
      24-, 32- and 64-channel stream groups (their one-layer curves looked linear), and its eight expand
      convs ran as NCHW convs with 16 reorders (0.35 of its 1.57 ms);
    * on the path, both channel counts are padded to the block (a 24-channel input is reordered as 32), so
      a count between two multiples of 16 removes MACs and no time: ResNet-50 at ``--ratio 0.7`` kept 24 and
      32 of its 64-channel groups with alignment 4 (MACs / 8.18, 7.12x faster, efficiency 0.87) and 16/32
      with alignment 16 (MACs / 7.46, 7.11x, 0.95); EfficientNet-B0 (latency-weighted ratios) 1.05x/1.85x/
      2.61x/3.73x at 0.1/0.3/0.5/0.7 with alignment 4, 1.18x/1.86x/2.52x/3.97x with 16 (efficiency
      0.89/0.98/0.93/0.70 against 0.97/1.04/0.99/0.85); MobileNetV2 0.95/0.84/0.94/0.90 against
      0.92/0.92/1.07/0.85 (thread CPU time, fastest of 20 interleaved runs, load average 9).
    """
    if alignment <= 1 or size < ALIGN_FROM:
        return tuple(counts)
    kept = tuple(c for c in counts if c % alignment == 0 or c == size)
    return kept if len(kept) > 1 else tuple(counts)


def balanced(counts: Sequence[int], size: int, alignment: int) -> tuple[int, ...]:
    """`counts` without the output counts that split unevenly over two threads: with the NCHWc block of
    `BALANCED_BLOCK` (16) channels, a count of 5 or 7 blocks (80, 112) when the next block up (96, 128) is
    allowed too. Unchanged for other alignments (not measured) and when the next block up is not allowed.

    Why a prior and not the table: the default table is measured at 1 thread, where 80 channels are
    properly cheaper than 96; at 2 threads they are not. MLAS computes an NCHWc convolution's output in filter
    sets of `FILTER_SET_BLOCKS` blocks (64 channels) and splits (filter set x output row) among the threads,
    so a count of 5 or 7 blocks leaves one thread a light partial set. Measured per group (onnxruntime 1.32,
    AVX-512, every multiple of 16 from 15% to 65% of the size, fastest runs, 2 threads timed alone in blocks,
    other processes paused; `bench/latency_thread_curves.py`), the latency at 80 over that at 96 and at
    112 over 128, median over the groups of at least 128 channels:

    ================  ===========  ===========  ===========  ===========
    model             80/96 1T     80/96 2T     112/128 1T   112/128 2T
    ================  ===========  ===========  ===========  ===========
    ResNet-50         0.86         0.92         0.90         0.94
    MobileNetV2       0.86         0.95         0.93         0.94
    EfficientNet-B0   0.90         0.93         0.92         0.97
    ================  ===========  ===========  ===========  ===========

    (144 over 160, 9 blocks, stays a real step at 2 threads: ResNet-50 0.87, so the rule stops at 8 blocks.)
    Whole model, ResNet-50 ``--ratio 0.7`` with its 256-channel groups at 80, 96 or 64 and all else equal
    (two quiet runs, wall medians; 2 threads 10-30 rounds of 10 runs in blocks, 1 thread 100-300
    interleaved rounds): efficiency at 2 threads 0.903/0.908 at 80, 0.929/0.937 at 96, 0.917/0.949 at 64;
    at 1 thread 0.955/0.952, 0.965/0.965, 0.954/0.954. 80 is the worst of the three at 2 threads and no
    better at 1. Not shown to help where a group's time is mostly depthwise convs and elementwise nodes:
    EfficientNet-B0 at ``--ratio 0.7`` (one 480-channel group at 128 instead of 112, 51% of its time in
    ungrouped convs) read 0.887/0.847/0.860 at 2 threads against 0.929/0.870/0.897 before (spreads 30-41%).
    """
    if alignment != BALANCED_BLOCK or size < 2 * FILTER_SET_BLOCKS * alignment:
        return tuple(counts)
    allowed = set(counts)
    uneven = {b * alignment for b in range(FILTER_SET_BLOCKS + 1, 2 * FILTER_SET_BLOCKS, 2)}
    return tuple(c for c in counts if not (c in uneven and c + alignment in allowed))


def multiples(analysis: ChannelAnalysis, n: int) -> dict[int, tuple[int, ...]]:
    """The grid of ``--round-to N``: multiples of `n` plus the group size; groups smaller than `n` keep
    any count."""
    if n < 1:
        raise ValueError(f"round-to must be at least 1, got {n}")
    out: dict[int, tuple[int, ...]] = {}
    for g in analysis.groups:
        if g.size < n:
            out[g.id] = tuple(range(1, g.size + 1))
        else:
            out[g.id] = tuple(sorted(set(range(n, g.size + 1, n)) | {g.size}))
    return out


def curve_counts(curve: GroupCurve, *, tolerance: float = 0.03) -> tuple[tuple[int, ...], GridChoice]:
    """The allowed counts of one curve (1..size) and which branch of the rule chose them."""
    counts = np.asarray(curve.counts, dtype=np.int64)
    f = np.asarray(curve.ms, dtype=np.float64)
    size = int(counts[-1])
    spread = np.asarray(curve.spread, dtype=np.float64) if len(curve.spread) == len(f) else np.zeros_like(f)
    tol = f * np.maximum(tolerance, np.minimum(spread * NOISE_OF_SPREAD, MAX_NOISE))
    everything = range(1, size + 1)
    if np.all(np.abs(f - f[-1]) <= tol[-1]):
        return tuple(everything), GridChoice("flat")
    # best latency among strictly larger counts: a count is dominated when that beats it by more than tol
    suffix_min = np.minimum.accumulate(f[::-1])[::-1]
    better_above = np.append(suffix_min[1:], np.inf)
    dominated = better_above < f - tol
    dropped = {int(c) for c in counts[dominated]}
    n = len(_window(counts))
    if n >= MIN_WINDOW:
        window, fw, alive = counts[-n:], f[-n:], ~dominated[-n:]
        period = fit_residues(window, alive)
        on = alive & (window % period == 0)
        period = max(period, fit_period(window[on], fw[on], f[-1] * MIN_STEP, multiple_of=period))
        allowed = {c for c in everything if c % period == 0} | {size}
        return tuple(sorted(allowed - dropped | {size})), GridChoice("linear" if period == 1 else "period", period)
    # sparse probes: the measured counts that top their plateau
    allowed = set()
    alive_idx = [i for i in range(len(counts)) if not dominated[i]]
    for j, i in enumerate(alive_idx):
        nxt = alive_idx[j + 1] if j + 1 < len(alive_idx) else None
        if nxt is None or f[nxt] - f[i] > tol[i]:
            allowed.add(int(counts[i]))
    return tuple(sorted(allowed | {size})), GridChoice("measured")


def fit_residues(window: np.ndarray, alive: np.ndarray) -> int:
    """The period whose multiples best match the counts of `window` that are not dominated (`alive`):
    fewest counts in one set and not the other; ties go to the smaller period (1: every count)."""
    best = (int(np.sum(~alive)), 1)
    span = int(window[-1] - window[0])
    for period in PERIODS:
        if period * 2 > span:
            break
        best = min(best, (int(np.sum((window % period == 0) != alive)), period))
    return best[1]


def fit_period(
    counts: Sequence[int] | np.ndarray, ms: Sequence[float] | np.ndarray, noise: float, *, multiple_of: int = 1
) -> int:
    """The period of the staircase that best explains `ms` over `counts`, or 1 for a line.

    Staircases ``ms = a + b * ceil(count / P)`` for the periods P of `PERIODS` that are multiples of
    `multiple_of` (at least two periods inside the counts) compete with a line. The staircase with the
    smallest residual (the largest period among those within 10% of it) wins if its residual is no larger
    than the line's and its step `b` exceeds `noise` (an absolute latency).
    """
    c = np.asarray(counts, dtype=np.float64)
    y = np.asarray(ms, dtype=np.float64)
    if len(c) < 4:
        return 1
    line_rss = _rss(c, y)
    fits: list[tuple[float, int, float]] = []
    for period in PERIODS:
        if 2 * period > c[-1] - c[0] or period % multiple_of or period <= multiple_of:
            continue
        steps = np.ceil(c / period)
        if np.unique(steps).size < 3:
            continue
        rss, slope = _rss(steps, y, slope=True)
        fits.append((rss, period, slope))
    good = [(rss, period) for rss, period, slope in fits if rss <= line_rss and slope > noise]
    if not good:
        return 1
    best = min(rss for rss, _ in good)
    # near-ties go to the larger period: a missed step costs latency, a coarser grid only costs choice
    return max(period for rss, period in good if rss <= best * NEAR_TIE)


def _rss(x: np.ndarray, y: np.ndarray, slope: bool = False):
    """Residual sum of squares of the least-squares line y ~ a + b x (and b if asked)."""
    a = np.vstack([np.ones_like(x), x]).T
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    rss = float(np.sum((a @ coef - y) ** 2))
    return (rss, float(coef[1])) if slope else rss


def _window(counts: np.ndarray) -> np.ndarray:
    """The densely measured counts below the dense size: the longest suffix with gaps of at most 2."""
    k = len(counts) - 1
    while k > 0 and counts[k] - counts[k - 1] <= MAX_GAP:
        k -= 1
    return counts[k:]


def off_grid_penalty(curve: GroupCurve, grid: Sequence[int]) -> float:
    """How much slower a count off `grid` runs than the next grid count up: the median ratio over the
    measured off-grid counts of `curve` (at least 1.0; 1.0 when none was measured)."""
    allowed = np.asarray(sorted(grid), dtype=np.int64)
    values = dict(zip(curve.counts, curve.ms))
    ratios = []
    for c, ms in values.items():
        k = int(np.searchsorted(allowed, c))
        if k < len(allowed) and allowed[k] != c and int(allowed[k]) in values and values[int(allowed[k])] > 0:
            ratios.append(ms / values[int(allowed[k])])
    return max(1.0, float(np.median(ratios))) if ratios else 1.0


def next_on_grid(grid: Sequence[int], kept: int) -> int:
    """The smallest count of `grid` that is at least `kept` (the largest one if none is)."""
    allowed = sorted(grid)
    k = int(np.searchsorted(np.asarray(allowed), kept))
    return int(allowed[min(k, len(allowed) - 1)])
