"""The original model's side of the sequential repair's statistics, computed once before the waves.

Every wave of `repair.repair_sequential` reads, per consumer and calibration sample, sampled rows of the
consumer's input in two models: the original (x) and the pruned-and-repaired one (x~), at the same positions.
The original model never changes, so its rows are the same in every wave: they are drawn once over the
samples, keeping per fitted consumer either its input rows [x] (F features) or the original outputs at
them ``y = [W b] [x 1]`` (what the fit reads of x: ``E[y x~^T]``), whichever is narrower. The waves then
run only the pruned model (`repair_stats.sequential_stats`), whose frontier cache gets the whole budget.
Where the layer's own output is that y (`output_source`: a Conv, a plain Gemm or MatMul with its own weight),
y is gathered from the forward pass at the drawn positions instead of multiplied out again (ResNet-50, 256
samples: 9 CPU s less in the statistics pass).

Who draws them: `calibration.collect_stats` with a `DenseRowsWriter` (`repair.seq_rows_writer`), when the
obs criterion's statistics pass runs anyway (the selection carries the rows to the repair:
`ChannelSelection.dense_rows`); otherwise `dense_rows` in a forward pass of its own. ResNet-50 obs + seq,
256 samples, 2 quiet cores: one pass instead of two, 173.7 -> 152.4 CPU s, 119 -> 109 s wall, peaks 1,876 /
1,883 MiB (bench/repair_speed_results.txt, round 6).

Rows of consumer c for sample i are drawn at the positions ``hessian_rows`` draws from the generator
``default_rng([seed, i, index of c among the model's consumers])`` (`row_generator`): the pruned side
draws the same positions (they do not depend on the channel count), and so do the statistics' Hessians.
The rows are float32, as the on-the-fly ones were; they live in memory up to `MEMORY_BYTES`, beyond that in
an anonymous temporary file (not resident memory: the page cache holds it and may write it out), read back
one consumer at a time when its wave runs.

ResNet-50 at 224x224, 256 samples, 53 fitted consumers: the narrower form is 1.4 GiB in float32, against
3.9 GiB of plain input rows; the seq repair's peak RSS stayed at 1,862 MiB (1,878 before, with the second
runner).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import onnx

from onnxprune.calibration import (
    CalibrationData,
    Consumer,
    consumers,
    drawn_positions,
    hessian_rows,
    output_rows,
    rows_per_input,
    single_threaded_blas,
)
from onnxprune.graph import ModelGraph, attrs
from onnxprune.layer_inputs import truncated
from onnxprune.progress import task
from onnxprune.verify import session

__all__ = ["DenseRows", "DenseRowsWriter", "consumer_index", "data_key", "dense_rows", "row_generator"]

# Rows kept in memory up to this many bytes (all consumers); more go to a temporary file.
MEMORY_BYTES = 256 << 20
OPTIMIZE = True  # onnxruntime graph optimisations, as `layer_inputs.OPTIMIZE` (the runners this replaces)


@dataclass
class DenseRows:
    """Per consumer: its rows of the original model, all samples in order, ``per_sample[name]`` rows each.

    A consumer in `outputs` has the original outputs ``y = [W b] [x 1]`` as rows ([rows, outputs]); the others
    their inputs ``x`` ([rows, F], no constant feature). `source`, `max_rows` and `data_key` say what the
    rows were drawn from (`serves`).
    """

    seed: int
    index: dict[str, int]  # consumer name -> its place in the row generators' seeds
    per_sample: dict[str, int]  # the row budget per sample `hessian_rows` was given
    count: dict[str, int]  # rows actually drawn per sample (the budget or every position)
    width: dict[str, int]
    outputs: set[str]
    samples: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # in memory
    offsets: dict[str, int] = field(default_factory=dict)  # in `file`
    file: BinaryIO | None = None
    source: onnx.ModelProto | None = None
    max_rows: int = 0
    data_key: str = ""

    def rng(self, name: str, sample: int) -> np.random.Generator:
        """The generator consumer `name`'s rows of `sample` are drawn with (on both sides)."""
        return row_generator(self.seed, sample, self.index[name])

    def serves(self, model: onnx.ModelProto, which: list[Consumer], data: CalibrationData, max_rows: int,
               seed: int) -> bool:
        """True when these are the rows `dense_rows` (model, which, ...) would draw: the same model object,
        samples, budget and seed, every consumer of `which` stored under its index among the model's
        consumers (`consumer_index`)."""
        if self.source is not model or self.seed != seed or self.max_rows != max_rows or self.samples != data.n:
            return False
        index = consumer_index(model)
        if any(self.index.get(c.name) != index.get(c.name) or c.name not in self.count for c in which):
            return False
        return self.data_key == data_key(data)

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


def row_generator(seed: int, sample: int, index: int) -> np.random.Generator:
    """The generator of consumer number `index`'s rows of `sample`: the same positions whichever pass draws
    them (`collect_stats`, `dense_rows`, the pruned side of the waves)."""
    return np.random.default_rng([seed, sample, index])


def consumer_index(model: onnx.ModelProto) -> dict[str, int]:
    """Consumer name -> its place among `calibration.consumers` of `model` (the row generators' index)."""
    return {c.name: j for j, c in enumerate(consumers(ModelGraph(model)))}


def data_key(data: CalibrationData) -> str:
    """A digest of the calibration samples (names, shapes, and up to 8 samples' bytes): rows drawn from other
    samples are not served."""
    h = hashlib.blake2b(digest_size=16)
    step = max(1, data.n // 8)
    for name in sorted(data.arrays):
        arr = np.ascontiguousarray(data.arrays[name][::step])
        h.update(f"{name}{data.arrays[name].shape}{arr.dtype}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


class DenseRowsWriter:
    """Builds a `DenseRows` sample by sample: the drawing side asks `rng` and `per_sample`, draws each sample's
    input rows with `calibration.hessian_rows` and hands them to `add` (in sample order, from one thread);
    `finish` gives the store, or None when the samples drew different row counts (dynamic shapes) or the
    temporary file would not fit on disk. `collect_stats` takes one (`RowSink`), so the statistics pass that
    the obs criterion runs anyway also draws the seq repair's rows (one forward pass of the original, not two).
    """

    def __init__(self, model: onnx.ModelProto, which: list[Consumer],
                 targets: Mapping[str, np.ndarray] | Callable[[Consumer], np.ndarray],
                 data: CalibrationData, max_rows: int, seed: int) -> None:
        data = data.for_model(model)
        graph = ModelGraph(model)
        index = consumer_index(model)
        w_shapes = {c.name: c.weight_shape(graph) for c in which}
        feats = {c.name: c.feature_count(w_shapes[c.name]) for c in which}
        self.per_sample = {c.name: rows_per_input(feats[c.name], max_rows, data) for c in which}
        self.store = DenseRows(seed, {c.name: index[c.name] for c in which}, self.per_sample, {}, {}, set(), data.n,
                               source=model, max_rows=max_rows, data_key=data_key(data))
        self.projections = {}
        self.output_tensors: dict[str, str] = {}  # consumer -> the tensor whose rows are its y (less `y_offsets`)
        self.y_offsets: dict[str, np.ndarray] = {}
        for c in which:
            wa = targets(c) if callable(targets) else targets[c.name]
            if len(wa) < feats[c.name]:  # outputs narrower than the input features: keep y
                source = output_source(graph, c, wa)
                if source is not None:
                    self.output_tensors[c.name], self.y_offsets[c.name] = source
                else:  # float32 only (ResNet-50's float64 [W b] were 200 MB held beside collect_stats' Hessians)
                    self.projections[c.name] = np.ascontiguousarray(wa.T, dtype=np.float32)
                self.store.outputs.add(c.name)
            self.store.width[c.name] = len(wa) if c.name in self.store.outputs else feats[c.name]
            del wa
        self.failed = False

    def rng(self, name: str, sample: int) -> np.random.Generator:
        return self.store.rng(name, sample)

    def add(self, i: int, rows: dict[str, np.ndarray]) -> None:
        """Sample `i`'s rows of every consumer: its input rows (float32 [count, F]), projected to y where kept so,
        or, for a consumer in `output_tensors`, the rows of that tensor at the drawn positions
        (`calibration.output_rows`)."""
        if self.failed:
            return
        out = {}
        for name, r in rows.items():
            proj = self.projections.get(name)
            if name in self.y_offsets:
                r = r + self.y_offsets[name]
            elif proj is not None:
                r = r @ proj[:-1] + proj[-1]
            out[name] = np.ascontiguousarray(r, np.float32)
        try:
            self._write(i, out)
        except (_Ragged, _NoRoom):
            self.failed = True
            self.store.close()

    def finish(self) -> DenseRows | None:
        self.projections = {}  # what the store's readers need of [W b] they take from the model
        return None if self.failed else self.store

    def _write(self, i: int, rows: dict[str, np.ndarray]) -> None:
        store, n = self.store, self.store.samples
        if i == 0:
            store.count.update({name: len(r) for name, r in rows.items()})
            total = sum(n * len(r) * r.shape[1] * 4 for r in rows.values())
            if total <= MEMORY_BYTES:
                store.arrays.update({name: np.empty((n * len(r), r.shape[1]), np.float32) for name, r in rows.items()})
            else:
                directory = tempfile.gettempdir()
                if shutil.disk_usage(directory).free < total + (1 << 30):
                    raise _NoRoom
                store.file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - closed by DenseRows.close
                at = 0
                for name, r in rows.items():
                    store.offsets[name] = at
                    at += n * len(r) * r.shape[1] * 4
        for name, r in rows.items():
            if len(r) != store.count[name]:
                raise _Ragged
            if store.file is None:
                store.arrays[name][i * len(r) : (i + 1) * len(r)] = r
            else:
                view, at = r.reshape(-1).view(np.uint8).data, 0  # the array's own bytes, not a copy
                while at < len(view):
                    at += os.pwrite(store.file.fileno(), view[at:], store.offsets[name] + i * r.nbytes + at)


def dense_rows(
    model: onnx.ModelProto,
    which: list[Consumer],
    targets: Mapping[str, np.ndarray] | Callable[[Consumer], np.ndarray],
    data: CalibrationData,
    max_rows: int,
    seed: int,
) -> DenseRows | None:
    """Sampled rows of `which`'s inputs in `model` over `data` (see the module docstring), in a forward pass
    of its own, or None when the samples draw different row counts (dynamic shapes) or the temporary file
    would not fit on disk. `collect_stats` with a `DenseRowsWriter` draws the same rows in its own pass.

    `targets`: consumer name -> its original ``[W b]`` [outputs, F + 1] (`repair.original_target`), or a
    function of the consumer giving it (one at a time: only the float32 projections of output rows are kept).
    """
    data = data.for_model(model)
    graph = ModelGraph(model)
    w_shapes = {c.name: c.weight_shape(graph) for c in which}
    writer = DenseRowsWriter(model, which, targets, data, max_rows, seed)
    names = sorted({c.x for c in which} | set(writer.output_tensors.values()))
    probe = truncated(model, names)  # only the nodes the consumers' inputs (and the outputs read) need
    # onnxruntime's default threads beside the worker: ResNet-50's pass 21.4 -> 18.8 s wall (quiet, 2 cores)
    sess = session(probe, optimize=OPTIMIZE, spin=False)
    del probe  # onnxruntime holds its own copy (ResNet-50: 100 MB less through the pass)
    feeds = {i.name for i in sess.get_inputs()}

    def job(i: int, values: dict[str, np.ndarray]) -> None:
        drawn = {}
        for c in which:
            y = writer.output_tensors.get(c.name)
            if y is None:
                drawn[c.name] = hessian_rows(np.asarray(values[c.x], np.float32), c, w_shapes[c.name],
                                             writer.per_sample[c.name], writer.rng(c.name, i))
            else:  # only the positions: the input is not unfolded
                picks = drawn_positions(values[y], c, writer.per_sample[c.name], writer.rng(c.name, i))
                drawn[c.name] = output_rows(values[y], c, picks)
        writer.add(i, drawn)

    # onnxruntime runs sample i + 1 while a worker draws and writes sample i's rows (one BLAS
    # thread): both cores, at most one sample's tensors waiting
    inflight: Future[None] | None = None
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
            if writer.failed:
                break
        if inflight is not None:
            inflight.result()
    return writer.finish()


def output_source(graph: ModelGraph, c: Consumer, wa: np.ndarray) -> tuple[str, np.ndarray] | None:
    """(tensor, offset) where consumer `c`'s own output is its original ``y = [W b] [x 1]`` less `offset`
    (`wa` = ``[W b]``, b relative to the layer's own bias: `repair.original_target`), else None.

    The drawing side then gathers y from the forward pass it runs anyway instead of multiplying every drawn
    row by W: the same products the model computed (ResNet-50, 256 samples: 9.0 of the statistics
    worker's ~28 s). Only float32 outputs of a Conv, a Gemm with alpha = beta = 1, or a MatMul, whose bias
    (if any) is a constant broadcast over the rows; the rows agree with the products to float32 rounding.
    """
    node, n = c.node, len(wa)
    if graph.dtype(node.output[0]) != onnx.TensorProto.FLOAT or node.input[1] != c.weight:
        return None
    a = attrs(node)
    if node.op_type == "Gemm" and (a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0)):
        return None
    if node.op_type not in ("Conv", "Gemm", "MatMul"):
        return None
    w = graph.const(c.weight)
    if w is None or not np.array_equal(c.weight_matrix(w), wa[:, :-1]):  # a target other than the layer's own
        return None
    own = np.zeros(n)
    if node.op_type != "MatMul" and len(node.input) > 2 and node.input[2]:
        bias = graph.const(node.input[2])
        if bias is None or bias.size not in (1, n) or (bias.ndim > 1 and bias.shape[-1] != bias.size):
            return None
        own = np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), (n,))
    return node.output[0], (wa[:, -1] - own).astype(np.float32)


class _Ragged(Exception):
    """Samples drew different numbers of rows (dynamic shapes): the rows cannot be laid out per sample."""


class _NoRoom(Exception):
    """The temporary file would not fit on disk (with 1 GB to spare)."""
