"""Honest timing of several callables: warm-up, repetitions, round-robin interleaving, median and spread.

Start reading at `interleaved`. Every round runs each function once, the order rotated by one position per
round, so slow drift of the machine (other processes, frequency scaling, a cache warming up) hits every
function alike instead of whichever happened to be measured last. The result of each function is the
median of its runs (robust to the odd preempted run) and the spread, the interquartile range relative to
the median, which callers use as the noise level when they compare timings.

`in_blocks` is the variant for things that must not be alive together: multi-threaded onnxruntime sessions.
Each owns a thread pool whose idle workers spin-wait (onnxruntime's default, what a deployed session does), so
a session timed while others are alive loses its cores to their spinning workers. Rounds still rotate the
order, but each round opens one function at a time, times a block of runs and closes it before the next.
Measured on 2 cores, quiet, 2 threads: ResNet-50 dense 24.7 ms this way, 75.6 ms with all five sessions of a
comparison alive (spinning), 32.1 ms with spinning disabled (every small op then pays a worker wake-up, which
under-reports pruned models: ResNet-50 at --ratio 0.7 5.0x without spinning, 6.8x in blocks).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from onnxprune.progress import Task, task

__all__ = ["Timing", "in_blocks", "interleaved"]


@dataclass(frozen=True)
class Timing:
    """The median of `runs` timed runs in milliseconds, their spread ((p75 - p25) / median) and the fastest
    run (`min_ms`, 0.0 when unknown).

    The median is the honest figure for a whole model. Micro-benchmarks in latency tables use `best_ms`:
    on a loaded machine a run is only ever slowed down (preempted, caches evicted), never sped up, and with
    more runnable threads than cores most runs of a millisecond-long kernel are preempted, which moves the
    median but not the minimum.
    """

    median_ms: float
    spread: float
    runs: int
    min_ms: float = 0.0

    @property
    def best_ms(self) -> float:
        """The fastest run, or the median when that is unknown."""
        return self.min_ms if self.min_ms > 0 else self.median_ms

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Timing:
        """Summarise run times given in seconds."""
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        median = float(np.median(ms))
        p25, p75 = np.percentile(ms, [25, 75])
        spread = float((p75 - p25) / median) if median > 0 else 0.0
        return cls(median, spread, len(ms), float(ms.min()))

    def scaled(self, factor: float) -> Timing:
        """The same timing with every duration multiplied by `factor`."""
        return Timing(self.median_ms * factor, self.spread, self.runs, self.min_ms * factor)

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "spread": self.spread, "runs": self.runs, "min_ms": self.min_ms}

    @classmethod
    def from_dict(cls, d: dict) -> Timing:
        return cls(float(d["median_ms"]), float(d["spread"]), int(d["runs"]), float(d.get("min_ms", 0.0)))


def interleaved(
    run_fns: Sequence[Callable[[], None]], *, warmup: int, repeat: int, progress: Task | None = None
) -> list[Timing]:
    """Time every function of `run_fns` `repeat` times, round-robin, after `warmup` untimed rounds.

    Args:
        run_fns: the functions to time (each one run = one call).
        warmup: untimed rounds first (lazy initialisation, caches, pre-packed weights).
        repeat: timed rounds; each yields one run of every function.
        progress: a `Task` advanced by one per timed round; None opens a task of its own.

    Returns:
        One `Timing` per function, in the order of `run_fns`.
    """
    n = len(run_fns)
    if n == 0:
        return []
    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    for _ in range(max(0, warmup)):
        for fn in run_fns:
            fn()
    seconds: list[list[float]] = [[] for _ in range(n)]
    clock = time.perf_counter
    opened = task(f"timing {n} model{'s' if n > 1 else ''}", total=repeat) if progress is None else nullcontext(progress)
    collecting = gc.isenabled()
    gc.disable()  # as timeit does: a collection inside a timed run is not the model's time
    try:
        with opened as t:
            for r in range(repeat):
                for j in range(n):
                    i = (j + r) % n  # rotate the order so no function always runs first (or after the slowest)
                    start = clock()
                    run_fns[i]()
                    seconds[i].append(clock() - start)
                t.advance()
    finally:
        if collecting:
            gc.enable()
    return [Timing.of(s) for s in seconds]


def in_blocks(
    openers: Sequence[Callable[[], Callable[[], None]]], *, warmup: int, repeat: int, block: int = 10,
    progress: Task | None = None,
) -> list[Timing]:
    """Time every function `repeat` rounds x `block` runs, only one of them alive at a time.

    Args:
        openers: each call opens one function's resources (e.g. an onnxruntime session) and returns the
            function to time; the returned function is dropped (and garbage-collected) after its block.
        warmup: untimed runs after each opening (first runs allocate and pre-pack weights).
        repeat: rounds; each opens every function once, in an order rotated by one position per round.
        block: timed runs per opening.
        progress: a `Task` advanced by one per round; None opens a task of its own.

    Returns:
        One `Timing` per opener, over all its timed runs.
    """
    n = len(openers)
    if n == 0:
        return []
    if repeat < 1 or block < 1:
        raise ValueError("repeat and block must be at least 1")
    seconds: list[list[float]] = [[] for _ in range(n)]
    clock = time.perf_counter
    opened = task(f"timing {n} model{'s' if n > 1 else ''} in blocks", total=repeat) if progress is None \
        else nullcontext(progress)
    collecting = gc.isenabled()
    with opened as t:
        for r in range(repeat):
            for j in range(n):
                i = (j + r) % n
                fn = openers[i]()
                for _ in range(max(0, warmup)):
                    fn()
                gc.disable()
                try:
                    for _ in range(block):
                        start = clock()
                        fn()
                        seconds[i].append(clock() - start)
                finally:
                    if collecting:
                        gc.enable()
                del fn
                gc.collect()  # the session (and its thread pool) goes before the next one opens
            t.advance()
    return [Timing.of(s) for s in seconds]
