"""Calibration statistics of the sequential repair: per consumer, the input moments of the original and the
pruned model over the same rows (`sequential_stats`), and the cross moments the sparse repair reads
(`cross_stats`). Split from `repair` (the fits) by concept; `repair.repair_sequential` is the caller to start
reading from.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import onnx

from onnxprune.calibration import (
    CalibrationData,
    Consumer,
    hessian_rows,
    output_rows,
    rows_per_input,
    single_threaded_blas,
)
from onnxprune.dense_rows import DenseRows
from onnxprune.gram import add_gram, add_product, fill_upper, with_one
from onnxprune.graph import ModelGraph
from onnxprune.layer_inputs import FrontierRunner
from onnxprune.progress import task
from onnxprune.repair_stream import StreamWrite

T = TypeVar("T")

FLUSH_ROWS = 1024  # sequential statistics: rows buffered per consumer before they are multiplied in
QUEUE_BYTES = 128 << 20  # rows handed to the products' worker and not yet multiplied in, at most (but one buffer)


@dataclass
class LayerStats:
    """Sums over sampled rows of one consumer's input ([x 1] features; x original, x~ pruned-and-repaired)
    and, for a stream writer, of its residual rows r (`repair_stream`)."""

    H: np.ndarray  # sum x~ x~^T, then E[.] after `mean`
    C: np.ndarray | None  # sum x x~^T (None when projected: `P`)
    D: np.ndarray | None  # sum x~ r^T [features + 1, outputs]
    rows: int = 0
    P: np.ndarray | None = None  # sum y x~^T [outputs, features + 1], y = [W b] [x 1] the original outputs

    def mean(self) -> LayerStats:
        """The float32 sums (H: its lower triangle, `gram.add_gram`) turned into float64 means, which the fits
        solve with; each sum is released as its mean is made, so one float32 copy is alive at a time (a
        4,609-wide H: 85 MB beside the 170 MB mean). Returned."""
        n = max(1, self.rows)
        fill_upper(self.H)
        self.H = np.divide(self.H, n, dtype=np.float64)
        self.C, self.D, self.P = (None if a is None else np.divide(a, n, dtype=np.float64)
                                  for a in (self.C, self.D, self.P))
        return self

    def parts(self, with_bias: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(H, C, D) (`repair_stream.choose_damp` reads them), without the constant feature unless `with_bias`."""
        assert self.C is not None, "projected statistics hold P, not C"
        if with_bias:
            return self.H, self.C, self.D
        return self.H[:-1, :-1], self.C[:-1, :-1], None if self.D is None else self.D[:-1]

    def projected_parts(self, wa: np.ndarray, with_bias: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(H, ``wa @ C``, D) as `repair_stream.ridge_fit` reads them: ``wa @ C`` is `P` (``[W b] E[x x~^T]``,
        accumulated) where the statistics hold it, else formed here."""
        if self.P is None:
            H, C, D = self.parts(with_bias)
            return H, wa @ C, D
        if with_bias:
            return self.H, self.P, self.D
        return self.H[:-1, :-1], self.P[:, :-1], None if self.D is None else self.D[:-1]


@dataclass
class FoldedStats:
    """A consumer's `LayerStats` (means) on the fitting samples and, with a held-out fold, on the held-out ones."""

    fit: LayerStats
    held: LayerStats | None

    def total(self) -> LayerStats:
        """The means over every sample."""
        if self.held is None:
            return self.fit
        n = self.fit.rows + self.held.rows
        a, b = self.fit.rows / max(1, n), self.held.rows / max(1, n)

        def mix(x: np.ndarray | None, y: np.ndarray | None) -> np.ndarray | None:
            return None if x is None or y is None else a * x + b * y

        f, h = self.fit, self.held
        return LayerStats(a * f.H + b * h.H, mix(f.C, h.C), mix(f.D, h.D), n, mix(f.P, h.P))


def cross_stats(
    original: onnx.ModelProto,
    current: onnx.ModelProto,
    wave: list[Consumer],
    data: CalibrationData,
    max_rows: int,
    seed: int,
    runners: tuple[FrontierRunner, FrontierRunner] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per consumer of `wave`: (E[x~ x~^T], E[x x~^T]) over the same sampled rows, [x 1] features.

    `runners` (original, current) carry cached frontier tensors from wave to wave (`layer_inputs`); without
    them every sample runs from the graph inputs.
    """
    folds = sequential_stats(original, current, wave, data, max_rows, seed, runners)
    return {name: f.fit.parts(True)[:2] for name, f in folds.items()}


def sequential_stats(
    original: onnx.ModelProto,
    current: onnx.ModelProto,
    wave: list[Consumer],
    data: CalibrationData,
    max_rows: int,
    seed: int,
    runners: tuple[FrontierRunner, FrontierRunner] | None = None,
    *,
    streams: dict[str, StreamWrite] | None = None,
    holdout: int = 0,
    targets: dict[str, np.ndarray] | None = None,
    kept: dict[str, np.ndarray] | None = None,
    dense: DenseRows | None = None,
) -> dict[str, FoldedStats]:
    """Per consumer of `wave`: its `FoldedStats` over the same sampled rows of both models.

    `streams` (consumer name -> `StreamWrite`): also accumulate E[x~ r^T] for the residual rows
    ``r = (s - s~) / scale`` of the writer's shortcut `other` (original s, current s~). `holdout` > 1:
    every `holdout`-th sample goes to the held-out fold. `runners` (original, current) carry cached
    frontier tensors from wave to wave (`layer_inputs`); without them every sample runs from the graph inputs.
    `targets` (consumer name -> its original ``[W b]``, [outputs, features + 1]): accumulate
    ``P = E[y x~^T]`` with ``y = [W b] [x 1]`` instead of C (all a fit reads of C is ``[W b] C``): for a
    consumer with fewer outputs than half its features (a 3x3 conv: 9 C_in features, C_out outputs) two thin
    products instead of one F x F (ResNet-50's 4,608-feature convs: 4.5x fewer multiply-adds).
    `kept` (consumer name -> the input positions on its `x_axis` that the pruned model keeps): x~ only at those
    (its features there, then the constant), so H is [K + 1, K + 1] and C, P, D have K + 1 columns / rows for
    x~: the removed positions of x~ are zeros, their rows and columns of the statistics zeros nothing reads
    (`repair.repair_sequential`: ResNet-50 at 20% removed: 0.64x the multiply-adds of H).
    `dense`: the original model's rows of every consumer of the wave, drawn before the waves (`dense_rows`):
    only the pruned model runs, its rows drawn at the same positions; consumers whose dense rows are outputs
    accumulate ``P = E[y x~^T]``. Not with `streams` or a held-out fold.
    """
    data = data.for_model(current)
    streams = streams or {}
    assert dense is None or not (streams or holdout > 1), "dense rows carry neither stream rows nor folds"
    names = sorted({c.x for c in wave} | {w.other for w in streams.values()})
    run_o, run_c = runners or (FrontierRunner(data, budget=0), FrontierRunner(data, budget=0))
    graph = ModelGraph(original)
    w_shapes = {c.name: c.weight_shape(graph) for c in wave}
    feats = {c.name: c.feature_count(w_shapes[c.name]) for c in wave}
    kept = kept or {}
    # features of x~ (the pruned input): only its kept positions, each with all of a conv's taps
    feats_c = {c.name: feats[c.name] if c.name not in kept else
               feats[c.name] * len(kept[c.name]) // w_shapes[c.name][c.in_axis] for c in wave}
    n_outs = {c.name: w_shapes[c.name][c.out_axis] for c in wave}
    per_sample = {k: rows_per_input(f, max_rows, data) for k, f in feats.items()}
    if dense is not None:
        per_sample = {c.name: dense.per_sample[c.name] for c in wave}
    outputs_given = set() if dense is None else {c.name for c in wave if c.name in dense.outputs}
    n_folds = 2 if holdout > 1 and data.n >= 2 * holdout else 1
    targets = targets or {}
    projections = {name: np.ascontiguousarray(wa.T, dtype=np.float32) for name, wa in targets.items()}
    with_p = set(targets) | outputs_given
    f32 = np.float32  # float32 sums, added to in place (`gram`); means in float64
    sums = {c.name: [LayerStats(np.zeros((feats_c[c.name] + 1,) * 2, f32),
                                None if c.name in with_p else np.zeros((feats[c.name] + 1, feats_c[c.name] + 1), f32),
                                np.zeros((feats_c[c.name] + 1, n_outs[c.name]), f32) if c.name in streams else None,
                                P=np.zeros((n_outs[c.name], feats_c[c.name] + 1), f32) if c.name in with_p else None)
                     for _ in range(n_folds)] for c in wave}
    loaded = {} if dense is None else {c.name: dense.load(c.name) for c in wave}
    pending: dict[tuple[str, int], list[tuple[np.ndarray, ...]]] = {}

    queue: deque[tuple[Future[None], int]] = deque()  # products in flight and the bytes of rows they hold
    queued = 0

    def flush(name: str, fold: int) -> None:
        """The buffered rows of (`name`, `fold`) handed to the worker; waits while more than `QUEUE_BYTES`
        of rows are in flight."""
        nonlocal queued
        parts = pending.pop((name, fold), [])
        if not parts:
            return
        size = sum(a.nbytes for p in parts for a in p)
        queue.append((pool.submit(multiply, name, fold, parts), size))
        queued += size
        while len(queue) > 1 and queued > QUEUE_BYTES:
            done, freed = queue.popleft()
            done.result()
            queued -= freed

    def multiply(name: str, fold: int, parts: list[tuple[np.ndarray, ...]]) -> None:
        # rows of many samples in one product: a few large GEMMs instead of one tiny one per sample
        if parts:
            rc = with_one([p[1] for p in parts])
            acc = sums[name][fold]
            add_gram(acc.H, rc)
            if acc.P is not None:  # the dense rows are the original outputs y already, or projected to them
                y = (np.concatenate([p[0] for p in parts]) if name in outputs_given
                     else with_one([p[0] for p in parts]) @ projections[name])
                add_product(acc.P, y, rc)
            else:
                assert acc.C is not None
                add_product(acc.C, with_one([p[0] for p in parts]), rc)
            if acc.D is not None:
                add_product(acc.D, rc, np.concatenate([p[2] for p in parts]))

            acc.rows += len(rc)

    def add_sample(i: int, xo: dict[str, np.ndarray] | None, xc: dict[str, np.ndarray]) -> None:
        """Sample `i`'s rows of every consumer of the wave, buffered; full buffers multiplied in."""
        fold = 1 if n_folds == 2 and i % holdout == holdout - 1 else 0
        for j, c in enumerate(wave):
            picks: list[np.ndarray | None] = []
            if xo is None:  # the dense rows, drawn before the waves
                assert dense is not None
                count = dense.count[c.name]
                ro = loaded[c.name][i * count : (i + 1) * count]
                rng = dense.rng(c.name, i)
            else:
                ro = hessian_rows(np.asarray(xo[c.x], np.float32), c, w_shapes[c.name], per_sample[c.name],
                                  np.random.default_rng([seed, i, j]), picks)
                rng = np.random.default_rng([seed, i, j])
            # the kept channels only; the same positions are drawn: they do not depend on the channel count
            rc = hessian_rows(np.asarray(xc[c.x], np.float32), c, w_shapes[c.name], per_sample[c.name], rng,
                              channels=kept.get(c.name))
            entry: tuple[np.ndarray, ...] = (ro, rc)
            write = streams.get(c.name)
            if write is not None and xo is not None:
                diff = np.asarray(xo[write.other], np.float32) - np.asarray(xc[write.other], np.float32)
                r = output_rows(diff, c, picks)
                entry += (r / write.scale[None, :] if write.scale is not None else r,)
            buf = pending.setdefault((c.name, fold), [])
            buf.append(entry)
            # ~1,024 rows make an efficient GEMM; more only hold memory (a 4,608-feature layer's 4,608 rows
            # were 85 MB per model)
            if sum(len(p[1]) for p in buf) >= FLUSH_ROWS:
                flush(c.name, fold)

    # The main thread runs the pruned model and draws each sample's rows; one worker thread (one BLAS thread)
    # multiplies full buffers into the sums, in order (the sums are the same as without it). A product is
    # ~100x a sample's forward pass on ResNet-50's late waves (1,024 rows x 3,700^2 against ~1.5 ms), so the
    # worker takes whole buffers with up to `QUEUE_BYTES` of rows waiting, not one sample at a time: with one
    # sample in flight the two threads were both busy 8.7 s of the waves' 54 (ResNet-50, 256 samples). The
    # original model, without `dense` rows, runs in a second thread (`paired`), one onnxruntime thread per
    # session (`FrontierRunner.threads`); with them only the pruned model runs, with the runner's threads.
    with (
        single_threaded_blas(),
        ThreadPoolExecutor(max_workers=1) as pool,
        ThreadPoolExecutor(max_workers=1) as runner_pool,
        task("layer inputs, original and pruned", total=data.n) as progress,
    ):
        samples = (((None, xc) for xc in run_c.run(current, names)) if dense is not None
                   else paired(run_o.run(original, names), run_c.run(current, names), runner_pool))
        for i, (xo, xc) in enumerate(progress.track(samples)):
            if (xo is None and dense is None) or xc is None:
                raise RuntimeError("the original and the pruned model's runners gave different numbers of samples")
            add_sample(i, xo, xc)
        for c in wave:
            for fold in range(n_folds):
                flush(c.name, fold)
        while queue:
            queue.popleft()[0].result()
    return {name: FoldedStats(parts[0].mean(), parts[1].mean() if n_folds == 2 else None)
            for name, parts in sums.items()}


def paired(first: Iterator[T], second: Iterator[T], pool: ThreadPoolExecutor) -> Iterator[tuple[T | None, T | None]]:
    """``zip_longest(first, second)``, each step of `first` computed in `pool` while `second`'s runs here; both
    run to their end (a `FrontierRunner.run` refreshes its cache after its last sample)."""
    done: Any = object()
    while True:
        ahead = pool.submit(next, first, done)
        b: Any = next(second, done)
        a: Any = ahead.result()
        if a is done and b is done:
            return
        yield (None if a is done else a, None if b is done else b)
