"""Calibration data and activation statistics, computed with onnxruntime on the original model.

Start reading at `collect_stats`. A copy of the model exposes the input tensor of every *consumer layer*
(a Conv with group 1, a Gemm or a MatMul whose weight is an initializer) as an extra graph output. The
calibration samples are fed one at a time (``arr[i:i+1]``) and, for each consumer, streamed into

* the input Hessian ``H = [X 1]^T [X 1]`` (conv inputs unfolded with im2col, so features are
  ``(c_in, kh, kw)``; a row budget subsamples spatial positions so large models stay fast), and
* per input position: mean ``|x|``, the fraction of exact zeros (APoZ), mean and mean square.

Only the statistics are kept, never the activations, so memory is bounded by the Hessians.
Importance criteria (`criteria.py`) and the calibrated repair (`repair.py`) read them. The samples themselves
(`CalibrationData`, `load_calib`, `check_calib`) live in `calibration_data`, re-exported here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Set
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from onnxprune.calibration_data import CalibrationData, check_calib, load_calib
from onnxprune.concurrency import AT_ONCE, in_order
from onnxprune.conv_rows import conv_geometry, conv_rows
from onnxprune.gram import add_gram, fill_upper
from onnxprune.graph import ModelGraph, attrs, subgraph_reads
from onnxprune.progress import task
from onnxprune.rules.facts import linear_axes
from onnxprune.verify import session

__all__ = [
    "CalibrationData",
    "CalibrationStats",
    "Consumer",
    "ConsumerStats",
    "RowSink",
    "check_calib",
    "collect_stats",
    "consumers",
    "hessian_rows",
    "load_calib",
    "output_rows",
    "row_budget",
    "rows_per_input",
]


# ---------------------------------------------------------------------------------------------------
# Consumer layers
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Consumer:
    """A linear layer reading a channel axis: y = W x (+ b), with W an initializer.

    `in_axis` is the weight axis that runs over the input features, `x_axis` the matching axis of the
    activation `x`. For a Conv the Hessian features are (c_in, kh, kw) in weight memory order.
    """

    node: onnx.NodeProto
    kind: str  # "conv" | "gemm" | "matmul"
    x: str
    weight: str
    in_axis: int
    out_axis: int
    x_axis: int

    @property
    def name(self) -> str:
        return self.node.name

    def weight_matrix(self, w: np.ndarray) -> np.ndarray:
        """W as [outputs, features] with features in Hessian order."""
        if self.kind == "conv":
            return w.reshape(w.shape[0], -1)
        return w.T if self.in_axis == 0 else w

    def from_matrix(self, m: np.ndarray, like: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return m.reshape(like.shape).astype(like.dtype)
        return (m.T if self.in_axis == 0 else m).astype(like.dtype)

    def weight_shape(self, graph: ModelGraph) -> tuple[int, ...]:
        """The weight's shape (an initializer's, so every size is static)."""
        return tuple(int(d) for d in graph.initializers[self.weight].dims)

    def feature_count(self, w_shape: tuple[int, ...]) -> int:
        """Hessian features F of a weight of shape `w_shape`: (c_in, kh, kw) for a conv, inputs otherwise."""
        if self.kind == "conv":
            return int(np.prod(w_shape[1:], dtype=np.int64))
        return w_shape[self.in_axis]

    def feature_channel(self, w_shape: tuple[int, ...]) -> np.ndarray:
        """Input position (on `in_axis`) of each Hessian feature."""
        if self.kind == "conv":
            return np.repeat(np.arange(w_shape[1]), int(np.prod(w_shape[2:], dtype=np.int64)))
        return np.arange(w_shape[self.in_axis])


def consumers(graph: ModelGraph) -> list[Consumer]:
    """Every linear layer whose weight is a float initializer (Conv group 1, Gemm transA 0, 2-D MatMul).

    Which operators are linear layers, and their weight's input/output axes, come from the rules
    (`rules.facts.linear_axes`); the conditions here are what the statistics support: an ungrouped conv
    (im2col features), a Gemm reading samples on its first axis, a matrix weight for MatMul.
    """
    out = []
    # A weight also read inside an If/Loop/Scan body is not repaired: new values would change the body too.
    read_in_bodies = set().union(*(subgraph_reads(n) for n in graph.nodes))
    for node in graph.nodes:
        axes = linear_axes(node, graph)
        if axes is None:
            continue
        in_axis, out_axis = axes
        x, w = node.input[0], node.input[1]
        wv = graph.const(w)
        if wv is None or wv.dtype.kind != "f" or graph.const(x) is not None or w in read_in_bodies:
            continue
        op, a = node.op_type, attrs(node)
        x_rank = graph.rank(x)
        if op == "Conv" and a.get("group", 1) == 1 and wv.ndim >= 3 and x_rank == wv.ndim:
            out.append(Consumer(node, "conv", x, w, in_axis, out_axis, 1))
        elif op == "Gemm" and not a.get("transA", 0) and wv.ndim == 2:
            out.append(Consumer(node, "gemm", x, w, in_axis, out_axis, 1))
        elif op == "MatMul" and wv.ndim == 2 and x_rank is not None and x_rank >= 2:
            out.append(Consumer(node, "matmul", x, w, in_axis, out_axis, x_rank - 1))
    return out


# ---------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------
@dataclass
class ConsumerStats:
    """Streaming statistics of one consumer's input."""

    hessian: np.ndarray  # [F+1, F+1], last feature is the constant 1
    rows: int = 0
    abs_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per input position (on x_axis)
    zero_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sq_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    count: int = 0

    @property
    def H(self) -> np.ndarray:
        """E[[x 1][x 1]^T], float64 (a fresh array: the sums are kept in float32)."""
        return np.divide(self.hessian, max(1, self.rows), dtype=np.float64)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(1, self.count)

    @property
    def apoz(self) -> np.ndarray:
        return self.zero_sum / max(1, self.count)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(1, self.count)

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.sq_sum / max(1, self.count) - self.mean**2, 0.0)


@dataclass
class CalibrationStats:
    """Statistics per consumer node name, from `collect_stats`; `rows`: what its `RowSink` finished with
    (`dense_rows.DenseRows`, or None)."""

    consumers: dict[str, Consumer]
    stats: dict[str, ConsumerStats] = field(default_factory=dict)
    samples: int = 0
    rows: Any = None


class RowSink(Protocol):
    """Receives per sample the drawn input rows of the consumers in `per_sample` (`dense_rows.DenseRowsWriter`)."""

    per_sample: dict[str, int]
    output_tensors: dict[str, str]  # consumers whose rows `add` takes from this tensor (`output_rows`), not the input

    def rng(self, name: str, sample: int) -> np.random.Generator: ...

    def add(self, i: int, rows: dict[str, np.ndarray]) -> None: ...

    def finish(self) -> Any: ...


def hessian_rows(
    x: np.ndarray,
    c: Consumer,
    w_shape: tuple[int, ...],
    per_sample: int,
    rng: np.random.Generator,
    positions: list[np.ndarray | None] | None = None,
    channels: np.ndarray | None = None,
) -> np.ndarray:
    """Hessian rows of `x` (a batch) for consumer `c`: at most `per_sample` uniformly drawn positions per
    sample, conv inputs unfolded (im2col) only at the drawn positions, features in weight memory order.
    `channels`: only these positions of x's `c.x_axis` (a pruned consumer's inputs in a masked run).

    `positions`, when given, receives per sample the flat indices of the drawn positions among the layer's
    *output* positions (convolution output pixels; the rows of a Gemm/MatMul), or None where every position
    was kept (in order): what lines other per-position values up with these rows (`output_rows`).
    """
    parts = []
    # one geometry for the batch: per sample, parsing the node's attributes and the cache lookup were ~2 of
    # ResNet-50's ~15 CPU s of row gathering (256 samples, 53 consumers, statistics and seq repair)
    geo = conv_geometry(c.node, x.shape[2:], tuple(w_shape[2:])) if c.kind == "conv" else None
    total = geo.positions if geo is not None else 0
    if channels is not None and geo is None:
        x = np.take(x, channels, axis=c.x_axis)
    for i in range(x.shape[0]):
        if geo is not None:
            pick = None if total <= per_sample else np.sort(rng.choice(total, per_sample, replace=False))
            if positions is not None:
                positions.append(pick)
            rows = conv_rows(x[i], geo, pick, channels)
        else:
            xi = np.moveaxis(x[i : i + 1], c.x_axis, -1)
            rows = xi.reshape(-1, xi.shape[-1])
            pick = np.sort(rng.choice(len(rows), per_sample, replace=False)) if len(rows) > per_sample else None
            if pick is not None:
                rows = rows[pick]
            if positions is not None:
                positions.append(pick)
        parts.append(rows)
    return np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(parts[0])


def drawn_positions(y: np.ndarray, c: Consumer, per_sample: int, rng: np.random.Generator) -> list[np.ndarray | None]:
    """The `positions` `hessian_rows` would draw with `rng` for the batch whose consumer-`c` output is `y`
    (conv: [N, C_out, *out]; otherwise [..., outputs]), read off the output's shape without unfolding the input."""
    out: list[np.ndarray | None] = []
    for i in range(y.shape[0]):
        total = int(np.prod(y.shape[2:] if c.kind == "conv" else y[i : i + 1].shape[:-1], dtype=np.int64))
        out.append(None if total <= per_sample else np.sort(rng.choice(total, per_sample, replace=False)))
    return out


def output_rows(y: np.ndarray, c: Consumer, positions: list[np.ndarray | None]) -> np.ndarray:
    """Rows [positions, outputs] of `y`, a tensor shaped like consumer `c`'s output (a batch), at the
    `positions` `hessian_rows` drew for the same batch: row i lines up with Hessian row i."""
    parts = []
    for i, pick in enumerate(positions):
        yi = y[i : i + 1]
        # conv: channels on axis 1; Gemm [N, out] and MatMul [..., out]: on the last axis, like the input's
        rows = yi[0].reshape(yi.shape[1], -1).T if c.kind == "conv" else yi.reshape(-1, yi.shape[-1])
        parts.append(rows if pick is None else rows[pick])
    return np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(parts[0])


def _cached_moments(cache: dict, values: dict, name: str, axis: int) -> tuple[np.ndarray, ...]:
    if (name, axis) not in cache:
        cache[name, axis] = _position_moments(np.asarray(values[name], dtype=np.float32), axis)
    return cache[name, axis]


def _position_moments(x: np.ndarray, axis: int) -> tuple[np.ndarray, ...]:
    """Per position on `axis`: mean |x|, fraction of zeros, mean, mean square (float64)."""
    v = x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), x.shape[axis], -1)
    ax = (0, 2)
    return (
        np.abs(v).mean(axis=ax, dtype=np.float64),
        (v == 0).mean(axis=ax, dtype=np.float64),
        v.mean(axis=ax, dtype=np.float64),
        np.square(v).mean(axis=ax, dtype=np.float64),
    )


def activation_source(graph: ModelGraph, tensor: str, axis: int) -> str:
    """The tensor a channel's activation is read from for mean |x| and APoZ.

    A consumer reading pooled features (``Flatten(GlobalAveragePool(relu))``) sees averages that are
    almost never exactly zero, so APoZ there is meaningless; walk back through pooling and a Flatten of
    1x1 maps (channel axis 1 is kept position for position) to the activation map itself.
    """
    if axis != 1:
        return tensor
    for _ in range(8):
        node = graph.producer.get(tensor)
        if node is None or not node.input:
            break
        src = node.input[0]
        if node.op_type in ("GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool"):
            tensor = src
        elif node.op_type == "Flatten" and attrs(node).get("axis", 1) == 1:
            shape = graph.shape(src)
            if shape is None or len(shape) < 2 or any(d != 1 for d in shape[2:]):
                break
            tensor = src
        else:
            break
    return tensor


# `row_budget`'s defaults: multiply-adds of one consumer's ``X^T X``, and the fewest rows per feature.
ROW_FLOPS = 2e10
ROWS_PER_FEATURE = 4


def row_budget(features: int, max_rows: int = 65536, flops: float | None = None) -> int:
    """Hessian rows kept for a consumer with `features` inputs: at most `max_rows`, and at most what an
    ``X^T X`` of `flops` multiply-adds allows (None: `ROW_FLOPS`), but never fewer than `ROWS_PER_FEATURE`
    rows per feature (a well-posed ridge fit). Small layers keep everything; a 3x3 conv over 512 channels
    keeps ~18k rows instead of 65k."""
    flops = ROW_FLOPS if flops is None else flops
    return int(min(max_rows, max(ROWS_PER_FEATURE * features, flops // max(1, features) ** 2)))


def rows_per_input(features: int, max_rows: int, data: CalibrationData) -> int:
    """Hessian rows drawn per calibration input of a consumer with `features` inputs: its `row_budget` spread over
    the inputs the runs feed (each input of a fixed-batch run draws its own, as `hessian_rows` does)."""
    return max(1, -(-row_budget(features, max_rows) // max(1, data.n * data.batch)))


def sample_parts(x: np.ndarray, k: int) -> list[np.ndarray]:
    """A layer input computed for a batch of `k` samples, one part per sample: the whole of `x` for one
    sample (``x[0:1]`` took the first token only of a ``[seq, F]`` input: GPT-2's Gemm), else its slices along
    the batch axis, which must lead (`collect_stats` runs one sample at a time otherwise)."""
    if k == 1:
        return [x]
    if len(x) != k:
        raise ValueError(f"a layer input of shape {x.shape} does not lead with the batch of {k} samples")
    return [x[j : j + 1] for j in range(k)]


def single_threaded_blas() -> threadpool_limits:
    """Every loaded BLAS (numpy's and scipy's OpenBLAS copies, MKL, BLIS) limited to one thread inside
    the ``with`` block, restored after (threadpoolctl).

    Statistics alternate onnxruntime runs with many mid-sized BLAS calls; OpenBLAS's worker threads
    busy-wait between calls and fight onnxruntime's threads (and anything else on the machine) for the
    cores: measured on 2 cores, one BLAS thread made the whole collection 2-3x faster.
    """
    return threadpool_limits(limits=1, user_api="blas")


class _RowBlocks:
    """Hessian rows of one consumer written straight into float32 blocks [BLOCK_ROWS, F+1] (last column: the
    constant feature); a full block is summed into the Hessian as ``rows^T rows`` by the caller."""

    def __init__(self, features: int) -> None:
        self.features = features
        self.block = self._new()
        self.used = 0

    def _new(self) -> np.ndarray:
        block = np.empty((BLOCK_ROWS, self.features + 1), np.float32)
        block[:, -1] = 1.0
        return block

    def add(self, rows: np.ndarray) -> list[np.ndarray]:
        """Append `rows`; the blocks that filled up (views, never written again)."""
        full = []
        at = 0
        while at < len(rows):
            take = min(len(rows) - at, BLOCK_ROWS - self.used)
            self.block[self.used : self.used + take, :-1] = rows[at : at + take]
            self.used += take
            at += take
            if self.used == BLOCK_ROWS:
                full.append(self.block)
                self.block, self.used = self._new(), 0
        return full

    def rest(self) -> np.ndarray:
        return self.block[: self.used]


# Rows per Hessian update (`add_gram`): the blocks of every consumer together are what collection holds beyond the
# sums (ResNet-50: ~60 MB at 256 rows, ~250 at 1,024). Added in place, 256 rows multiply as fast as 1,024 (one core,
# ssyrk: 93 / 92 GMAC/s at 4,609 features, 98 / 93 at 2,305); numpy's ``H += X.T @ X`` needed ~1,024 (29 / 74).
BLOCK_ROWS = 256
QUEUE_BYTES = 64 << 20  # full blocks (and drawn rows) waiting for the worker, at most (but one sample's)
# onnxruntime's graph optimisations in the probe session (BatchNorm folded into Conv, fused activations; exposed
# tensors stay computed): ResNet-50's forward 0.085 -> 0.065 CPU s per sample, outputs within 1.5e-6 (float32
# rounding of the folded weights).
OPTIMIZE = True


def collect_stats(
    model: onnx.ModelProto,
    data: CalibrationData,
    which: list[Consumer] | None = None,
    *,
    hessian: bool | Set[str] = True,
    moments: bool = True,
    max_rows: int = 65536,
    seed: int = 0,
    batch: int = 16,
    rows: RowSink | None = None,
    index: dict[str, int] | None = None,
) -> CalibrationStats:
    """Run the calibration samples through `model` and accumulate every consumer's input statistics.

    Samples are fed ``arr[i:i+1]`` one at a time, or `batch` at a time when every model input has a
    dynamic first axis (statistics are reductions over every axis but the channel one, so batching does
    not change them). Hessian rows are float32, subsampled uniformly per sample to `row_budget` rows per
    consumer, written into per-consumer blocks of `BLOCK_ROWS`; each full block is one float32 ``X^T X``
    (numpy's syrk, in a worker thread overlapping the next forward pass) added to a float32 sum. float32 sums (not
    float64, as before) halve what collection and every later step hold: ResNet-50's 54 Hessians are 475 MB
    instead of 951 MB (with float64 sums collection peaked at 2.0 GB RSS on 16 samples at 224x224).

    `hessian`: the Hessians of every consumer (True), of none (False), or of the named consumers only (the
    others' rows still go to `rows`; with `moments` False they get no entry). `moments` False skips the
    per-position moments (mean |x|, APoZ, mean, mean square: their arrays stay empty) and the pooled activations
    they read: what a criterion reading only the Hessian (obs) needs. ResNet-50, 256 samples: the moments were
    ~13% of collection's CPU time.

    Rows of consumer number j (in `which`, or `index`'s number for it) for sample i are drawn with
    ``default_rng([seed, i, j])``, as the sequential repair draws them: a pass over a few consumers numbered as
    in the whole list (`dense_rows.consumer_index`) draws the rows a pass over all of them would. `rows` (a
    `dense_rows.DenseRowsWriter`) also receives, per sample, the rows of the consumers it names, drawn with its
    generators and budget: the seq repair's original-model side from this pass instead of a second forward
    pass (ResNet-50, 256 samples: ~17 CPU s of onnxruntime and the im2col of ~1.4 GB of rows).
    """
    data = data.for_model(model)  # a fixed batch runs its inputs B at a time
    graph = ModelGraph(model)
    which = consumers(graph) if which is None else which
    by_name = {c.name: c for c in which}
    source = {c.name: activation_source(graph, c.x, c.x_axis) if moments else c.x for c in which}
    # the rows handed to `rows` of these consumers are their outputs', at the drawn positions
    y_of = {} if rows is None else {n: t for n, t in rows.output_tensors.items() if n in by_name}
    tensors = sorted({c.x for c in which} | set(source.values()) | set(y_of.values()))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    fed = [i.type.tensor_type.shape.dim for i in probe.graph.input if i.name in data.arrays]
    dynamic = bool(fed) and all(len(d) and not d[0].HasField("dim_value") for d in fed)
    # one sample a run: `AT_ONCE` runs at once on one onnxruntime thread each (`concurrency`)
    sess = session(probe, optimize=OPTIMIZE, spin=False, threads=None if dynamic or AT_ONCE <= 1 else 1)
    del probe  # onnxruntime holds its own copy (ResNet-50: 100 MB less through the pass)
    names = [o.name for o in sess.get_outputs()]
    feeds = {i.name for i in sess.get_inputs() if i.name in data.arrays}
    step = max(1, batch) if dynamic else 1
    result = CalibrationStats(by_name, samples=data.n)
    w_shapes = {c.name: c.weight_shape(graph) for c in which}
    feats_of = {c.name: c.feature_count(w_shapes[c.name]) for c in which}
    per_sample = {k: rows_per_input(f, max_rows, data) for k, f in feats_of.items()}
    shared = set() if rows is None else {c.name for c in which} & set(rows.per_sample)
    if rows is not None:
        per_sample.update({name: rows.per_sample[name] for name in shared})
    index = {c.name: j for j, c in enumerate(which)} if index is None else index
    blocks: dict[str, _RowBlocks] = {}  # rows buffered until a block is full (few large F x F products)

    def _generator(name: str, sample: int) -> np.random.Generator:
        if name in shared:
            assert rows is not None
            return rows.rng(name, sample)
        return np.random.default_rng([seed, sample, index[name]])

    def _add_blocks(jobs: list[tuple[ConsumerStats, np.ndarray]],
                    kept: list[tuple[int, dict[str, np.ndarray]]] | None = None) -> None:
        for st, block in jobs:
            add_gram(st.hessian, block)  # the lower triangle: `fill_upper` below
            st.rows += len(block)
        for sample, its_rows in kept or []:
            assert rows is not None
            rows.add(sample, its_rows)

    # Hessian updates run in one worker thread (one BLAS thread) while the next samples' forward passes run
    # on onnxruntime's threads; full blocks wait for it up to `QUEUE_BYTES` (a block's product is ~100x a
    # sample's forward pass, and blocks of many consumers fill at the same sample), so memory stays bounded.
    queue: deque[tuple[Future[None], int]] = deque()
    queued = 0
    with (
        single_threaded_blas(),
        ThreadPoolExecutor(max_workers=1) as pool,
        task("calibration statistics", total=data.n) as progress,
    ):
        def run_sample(s: int) -> dict[str, np.ndarray]:
            return dict(zip(names, sess.run(None, {n: v for n, v in data.sample(s).items() if n in feeds})))

        ahead = None if dynamic else in_order(run_sample, range(data.n))  # the next samples' runs under way
        i = 0
        while i < data.n:
            k = min(step, data.n - i)
            if ahead is not None:
                values = next(ahead)
            else:
                whole = data.sample(i) if k == 1 else {n: v[i : i + k] for n, v in data.arrays.items()}
                values = dict(zip(names, sess.run(None, {n: v for n, v in whole.items() if n in feeds})))
            if k > 1 and any(len(values[c.x]) != k for c in which):
                # a layer input without the batch in front ([batch x seq, F], time-major [T, batch, F]) cannot be
                # split per sample: one sample per run, as the repair's own passes draw them
                step = 1
                continue
            cache: dict[tuple[str, int], tuple[np.ndarray, ...]] = {}  # moments of a tensor several consumers read
            jobs: list[tuple[ConsumerStats, np.ndarray]] = []
            kept: list[tuple[int, dict[str, np.ndarray]]] = [(i + j, {}) for j in range(k)] if shared else []
            for c in which:
                x = np.asarray(values[c.x], dtype=np.float32)
                wants_h = hessian is True or (hessian is not False and c.name in hessian)
                found = result.stats.get(c.name)
                if not (wants_h or moments):  # only its rows, for `rows`
                    st = ConsumerStats(np.zeros((0, 0)))
                elif found is not None:
                    st = found
                else:
                    feats = feats_of[c.name]
                    n_pos = x.shape[c.x_axis]
                    st = ConsumerStats(np.zeros((feats + 1, feats + 1), np.float32) if wants_h else np.zeros((0, 0)))
                    if moments:
                        st.abs_sum, st.zero_sum, st.sum, st.sq_sum = (np.zeros(n_pos) for _ in range(4))
                    result.stats[c.name] = st
                    if wants_h:
                        blocks[c.name] = _RowBlocks(feats)
                if moments:
                    m_x = _cached_moments(cache, values, c.x, c.x_axis)
                    m_act = _cached_moments(cache, values, source[c.name], 1) if source[c.name] != c.x else m_x
                    st.abs_sum += k * m_act[0]
                    st.zero_sum += k * m_act[1]
                    st.sum += k * m_x[2]
                    st.sq_sum += k * m_x[3]
                st.count += k
                if wants_h or c.name in shared:
                    picks: list[list[np.ndarray | None]] = [[] for _ in range(k)]  # drawn positions, per part
                    drawn = [hessian_rows(part, c, w_shapes[c.name], per_sample[c.name], _generator(c.name, i + j),
                                          picks[j]) for j, part in enumerate(sample_parts(x, k))]
                    if c.name in shared:
                        y = y_of.get(c.name)
                        for j, part in enumerate(drawn):
                            kept[j][1][c.name] = part if y is None else output_rows(
                                sample_parts(values[y], k)[j], c, picks[j])

                    if wants_h:
                        for part in drawn:
                            jobs.extend((st, full) for full in blocks[c.name].add(part))
            del values, cache
            if jobs or kept:
                size = sum(block.nbytes for _, block in jobs) + sum(a.nbytes for _, r in kept for a in r.values())
                queue.append((pool.submit(_add_blocks, jobs, kept), size))
                queued += size
                while len(queue) > 1 and queued > QUEUE_BYTES:
                    done, freed = queue.popleft()
                    done.result()
                    queued -= freed
            progress.advance(k)
            i += k
        while queue:
            queue.popleft()[0].result()
    if blocks:  # the rows still buffered: seconds on large models, so a step of its own
        with task("calibration statistics: Hessians", total=len(blocks)) as progress:
            for name, block in progress.track(blocks.items()):
                st = result.stats[name]
                if block.used:
                    _add_blocks([(st, block.rest())])
                fill_upper(st.hessian)
    if rows is not None:
        result.rows = rows.finish()
    return result
