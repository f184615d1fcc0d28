"""The original model's side of the sequential repair's statistics, computed once before the waves.

Every wave of `repair.repair_sequential` reads, per consumer and calibration sample, sampled rows of the
consumer's input in two models: the original (x) and the pruned-and-repaired one (x~), at the same positions.
The original model never changes, so its rows are the same in every wave: `dense_rows` runs it once over
the samples and keeps, per fitted consumer, either its input rows [x] (F features) or the original outputs
at them ``y = [W b] [x 1]`` (what the fit reads of x: ``E[y x~^T]``), whichever is narrower. The waves then
run only the pruned model (`repair_stats.sequential_stats`), whose frontier cache gets the whole budget.

Rows of consumer c for sample i are drawn at the positions ``hessian_rows`` draws from the generator
``default_rng([seed, i, index of c])``: the pruned side draws the same positions (they do not depend on
the channel count). The rows are float32, as the on-the-fly ones were; they live in memory up to
`MEMORY_BYTES`, beyond that in an anonymous temporary file (not resident memory: the page cache holds it and
may write it out), read back one consumer at a time when its wave runs.

ResNet-50 at 224x224, 256 samples, 53 fitted consumers: the narrower form is 1.4 GiB in float32, against
3.9 GiB of plain input rows; the seq repair's peak RSS stayed at 1,862 MiB (1,878 before, with the second
runner).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import onnx

from onnxprune.calibration import CalibrationData, Consumer, hessian_rows, row_budget, single_threaded_blas
from onnxprune.graph import ModelGraph
from onnxprune.layer_inputs import truncated
from onnxprune.progress import task
from onnxprune.verify import session

__all__ = ["DenseRows", "dense_rows"]

# Rows kept in memory up to this many bytes (all consumers); more go to a temporary file.
MEMORY_BYTES = 256 << 20
OPTIMIZE = True  # onnxruntime graph optimisations, as `layer_inputs.OPTIMIZE` (the runners this replaces)


@dataclass
class DenseRows:
    """Per consumer: its rows of the original model, all samples in order, ``per_sample[name]`` rows each.

    ``targets[name]`` is the original ``[W b]`` [outputs, F + 1] when the rows are outputs ``y`` (then
    [rows, outputs]); absent when they are inputs ``x`` ([rows, F], no constant feature).
    """

    seed: int
    index: dict[str, int]  # consumer name -> its place in the row generators' seeds
    per_sample: dict[str, int]  # the row budget per sample `hessian_rows` was given
    count: dict[str, int]  # rows actually drawn per sample (the budget or every position)
    width: dict[str, int]
    targets: dict[str, np.ndarray]
    samples: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # in memory
    offsets: dict[str, int] = field(default_factory=dict)  # in `file`
    file: BinaryIO | None = None

    def rng(self, name: str, sample: int) -> np.random.Generator:
        """The generator consumer `name`'s rows of `sample` are drawn with (on both sides)."""
        return np.random.default_rng([self.seed, sample, self.index[name]])

    def load(self, name: str) -> np.ndarray:
        """All rows of consumer `name` [samples x count, width], float32."""
        if name in self.arrays:
            return self.arrays[name]
        assert self.file is not None
        out = np.empty((self.samples * self.count[name], self.width[name]), np.float32)
        view, at = out.reshape(-1).view(np.uint8).data, 0
        while at < len(view):  # a single read returns at most ~2 GB
            got = os.preadv(self.file.fileno(), [view[at:]], self.offsets[name] + at)
            if got <= 0:
                raise OSError(f"temporary file of the sequential repair ended early ({name})")
            at += got
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def dense_rows(
    model: onnx.ModelProto,
    which: list[Consumer],
    targets: dict[str, np.ndarray],
    data: CalibrationData,
    max_rows: int,
    seed: int,
) -> DenseRows | None:
    """Sampled rows of `which`'s inputs in `model` over `data` (see the module docstring), or None when
    the samples draw different row counts (dynamic shapes) or the temporary file would not fit on disk.

    `targets`: consumer name -> its original ``[W b]`` [outputs, F + 1] (`repair.original_target`).
    """
    graph = ModelGraph(model)
    w_shapes = {c.name: c.weight_shape(graph) for c in which}
    feats = {c.name: c.feature_count(w_shapes[c.name]) for c in which}
    per_sample = {c.name: max(1, -(-row_budget(feats[c.name], max_rows) // max(1, data.n))) for c in which}
    store = DenseRows(seed, {c.name: j for j, c in enumerate(which)}, per_sample, {}, {}, {}, data.n)
    projections = {}
    for c in which:
        wa = targets[c.name]
        if len(wa) < feats[c.name]:  # outputs narrower than the input features: keep y
            store.targets[c.name] = wa
            projections[c.name] = np.ascontiguousarray(wa.T, dtype=np.float32)
        store.width[c.name] = len(wa) if c.name in store.targets else feats[c.name]

    names = sorted({c.x for c in which})
    probe = truncated(model, names)  # only the nodes the consumers' inputs need
    # onnxruntime's default threads beside the worker: ResNet-50's pass 21.4 -> 18.8 s wall (quiet, 2 cores)
    sess = session(probe, optimize=OPTIMIZE, spin=False)
    feeds = {i.name for i in sess.get_inputs()}

    def rows_of(i: int, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for c in which:
            x = np.asarray(values[c.x], np.float32)
            rows = hessian_rows(x, c, w_shapes[c.name], per_sample[c.name], store.rng(c.name, i))
            if c.name in store.targets:
                proj = projections[c.name]
                rows = rows @ proj[:-1] + proj[-1]  # [x 1] [W b]^T
            out[c.name] = np.ascontiguousarray(rows, np.float32)
        return out

    def job(i: int, values: dict[str, np.ndarray]) -> None:
        write(i, rows_of(i, values))

    def write(i: int, rows: dict[str, np.ndarray]) -> None:
        if i == 0:
            store.count.update({name: len(r) for name, r in rows.items()})
            total = sum(data.n * len(r) * r.shape[1] * 4 for r in rows.values())
            if total <= MEMORY_BYTES:
                store.arrays.update({name: np.empty((data.n * len(r), r.shape[1]), np.float32)
                                     for name, r in rows.items()})
            else:
                directory = tempfile.gettempdir()
                if shutil.disk_usage(directory).free < total + (1 << 30):
                    raise _NoRoom
                store.file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - closed by DenseRows.close
                at = 0
                for name, r in rows.items():
                    store.offsets[name] = at
                    at += data.n * len(r) * r.shape[1] * 4
        for name, r in rows.items():
            if len(r) != store.count[name]:
                raise _Ragged
            if store.file is None:
                store.arrays[name][i * len(r) : (i + 1) * len(r)] = r
            else:
                os.pwrite(store.file.fileno(), r.tobytes(), store.offsets[name] + i * r.nbytes)

    # onnxruntime runs sample i + 1 while a worker draws and writes sample i's rows (one BLAS
    # thread): both cores, at most one sample's tensors waiting
    inflight: Future[None] | None = None
    try:
        with (
            single_threaded_blas(),
            ThreadPoolExecutor(max_workers=1) as pool,
            task("layer inputs of the original model", total=data.n) as progress,
        ):
            for i in range(data.n):
                feed = {k: v for k, v in data.sample(i).items() if k in feeds}
                values = dict(zip(names, sess.run(names, feed)))
                if inflight is not None:
                    inflight.result()
                inflight = pool.submit(job, i, values)
                progress.advance(1)
            if inflight is not None:
                inflight.result()
    except (_Ragged, _NoRoom):
        store.close()
        return None
    return store


class _Ragged(Exception):
    """Samples drew different numbers of rows (dynamic shapes): the rows cannot be laid out per sample."""


class _NoRoom(Exception):
    """The temporary file would not fit on disk (with 1 GB to spare)."""
