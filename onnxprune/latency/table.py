"""Latency tables: what each prunable group's layers cost on a backend, at candidate kept counts.

Start reading at `build_table`. For every group of a `ChannelAnalysis` it finds the compute-heavy nodes the
group slices (`microbench.touched_ops`: Conv, ConvTranspose, Gemm, MatMul with a weight; the ``group``
attribute of depthwise and grouped convs follows the count) and the memory-bound nodes on its feature maps
that run as kernels of their own (`microbench.light_nodes`: SiLU, squeeze-excitation products, pools,
Resize, Concat; activations, batch norms and adds fused into the convolution before them are left out),
asks the backend which kept counts are worth
measuring (`LatencyBackend.probe_counts`), and times one-node micro-models of those nodes with the real
attributes and shapes, the group's dims shrunk to each count. The group's curve is the sum over its nodes.

Measurement is shared and cached:

* nodes that compute the same thing (same op signature: type, attributes, shapes) are timed once, whichever
  groups touch them (ResNet-50: 54 Conv/Gemm nodes, 24 signatures; MobileNetV2: 53 nodes, 31 signatures);
* every count of a signature is timed in one interleaved batch together with the dense node (batches that
  would hold too many weights are split, each with the dense node again; their timings are rescaled to the
  first batch's dense node, so drift between batches cancels too); each timing is the fastest of 5-15
  runs (`timing.Timing.best_ms`), robust on a loaded machine, and each batch gets about 150 ms of runs;
* timings are cached as JSON, one file per (op signature, backend key), written atomically: a second build
  on the same device times nothing. The folder is ``cache_dir``, else ``$ONNXPRUNE_LATENCY_CACHE``, else
  ``~/.cache/onnxprune/latency``.

**What a table costs** (onnxruntime 1.32 CPU, 1 thread, this 2-core AMD EPYC (AVX-512),
`bench/latency_tables.py`; the machine was shared, load average 26-28 on 2 cores, so the CPU seconds are
what a quiet machine needs):

============  ==========  ==================  =====================  ============
model         signatures  first build, CPU    first build, wall      cached build
============  ==========  ==================  =====================  ============
ResNet-50     24          24.6 s              137.5 s (load 26)      0.37 s
MobileNetV2   31          8.4 s               33.6 s (load 28)       0.38 s
============  ==========  ==================  =====================  ============

More than half of it is onnxruntime running the micro-models, an eighth creating their sessions (weight
pre-packing), the rest building them. The probes (`backend.ort_probe_counts`: 30 per 512-2048-channel
dim, 34 per 64-channel dim) keep this well under a minute; every count would take ~40x longer for
ResNet-50.

A single-node model pays layout conversions at its input and output that a chain of NCHWc convolutions in
the real model does not, and does not pay those a misaligned layer forces on its neighbours. Measured
(3x3 convs 16 -> c -> 64 on 28x28, 1 thread, 40 interleaved rounds, load average 23): the chain takes
0.406 ms at c = 64 and 0.595 ms at 63 (1.47x), the sum of the two single-node models 0.472 and 0.649 ms
(1.37x). The steps stay where they are, a little lower; whole models lose more off-grid (see `predict`).

**Memory-bound nodes** (measured with `bench/latency_predict.py`, onnxruntime 1 thread, thread CPU time,
load average 7-8): EfficientNet-B0 gets 131 more priced nodes (its SiLUs and squeeze-excitations),
ResNet-50 2 and MobileNetV2 1 (everything else is fused). Priced one by one they cost more than in the
model (EfficientNet-B0: 7.1 ms of micro-models against ~2.8 ms of QuickGelu, Mul, pooling and layout
conversions in a profile of the 9.7 ms model: each micro-model pays a ~6 us call and NCHW layout), so the
predicted speedup of the pruned model moved from -4%/-18% to -15%/-28% of the measured one at ratios
0.5/0.7 (0.3: +3% to -1%). What they change is the *shape* of the curves: a group whose SiLU is priced
now shows that its time falls only linearly, which `latency_allocation` and the uniform bound use.

`latency.calibrate` rescales these prices against a profile of the whole model (in-model time over
micro-model price, per node, net of the ~4 us each micro-model run pays): the curves keep their measured
steps and get the level the model shows; `LatencyTable.alone` keeps the micro-model prices.

Each curve keeps its per-node series (`GroupCurve.node_ms`), so that `predict.predicted_ms` can scale a
node touched by two groups (its input and output channels) by the product of both ratios; `LatencyTable.at`
is per group (what a knapsack over groups needs).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxprune.channels import ChannelAnalysis
from onnxprune.errors import OnnxPruneError, UsageError
from onnxprune.io import write_atomically
from onnxprune.latency.backend import LatencyBackend
from onnxprune.latency.microbench import (
    HEAVY_OPS,
    OpSpec,
    Touch,
    Variant,
    dense_variant,
    micro_model,
    touched_ops,
    variant,
    variant_macs,
)
from onnxprune.latency.timing import Timing
from onnxprune.progress import Task, task

__all__ = ["GroupCurve", "LatencyTable", "build_table", "default_cache_dir"]

CACHE_VERSION = 2  # bump when micro-models change in a way that changes timings
BATCH_MODELS = 24  # models per interleaved batch (sessions alive at once)
BATCH_WEIGHT_BYTES = 96 << 20  # weight bytes per batch (each session also keeps a pre-packed copy)
WARMUP = 1  # sessions pre-pack their weights when created; one untimed round warms the caches
BATCH_BUDGET_MS = 150.0  # timed rounds of one batch take about this long (more rounds for small layers)
MIN_REPEAT, MAX_REPEAT = 5, 15
CALL_MS = 0.01  # fixed cost of one run call (Python and runtime overhead), for the pace estimate


@dataclass
class GroupCurve:
    """The latency of the layers one group touches at each measured kept count.

    Attributes:
        counts: ascending kept counts; the last one is the group size (dense).
        ms: summed latency of the touched layers at each count (their fastest runs: `Timing.best_ms`).
        spread: relative spread of each sum (interquartile range over median, combined over the layers).
        nodes: the touched nodes.
        node_ms: each node's latency at each count (aligned with `nodes`; their sum is `ms`); empty when
            unknown.
    """

    group: int
    counts: tuple[int, ...]
    ms: tuple[float, ...]
    spread: tuple[float, ...] = ()
    nodes: tuple[str, ...] = ()
    node_ms: tuple[tuple[float, ...], ...] = ()

    @property
    def size(self) -> int:
        return self.counts[-1]

    def at(self, kept: int) -> float:
        """Latency at `kept` channels: exact at measured counts, linear in between, proportional below the
        lowest measured count, the dense value above the size."""
        return _interpolate(self.counts, self.ms, kept)

    def node_ratio(self, index: int, kept: int) -> float:
        """Node `nodes[index]`'s latency at `kept` channels relative to its dense latency."""
        series = self.node_ms[index]
        return _interpolate(self.counts, series, kept) / series[-1] if series[-1] > 0 else 1.0

    def as_dict(self) -> dict:
        return {"group": self.group, "counts": list(self.counts), "ms": [round(v, 5) for v in self.ms],
                "spread": [round(v, 4) for v in self.spread], "nodes": list(self.nodes)}


def _interpolate(counts: tuple[int, ...], ms: tuple[float, ...], kept: int) -> float:
    if kept >= counts[-1]:
        return ms[-1]
    if kept < counts[0]:
        return ms[0] * max(kept, 0) / counts[0]
    return float(np.interp(kept, counts, ms))


@dataclass
class LatencyTable:
    """Per-group latency curves of one model on one backend.

    Attributes:
        backend: the backend's name.
        dense_ms: sum over the measured layers (each node once) at their dense size.
        curves: group id -> curve; groups that touch no measured layer have none.
        node_dense_ms: each measured node's latency at its dense size (their sum is `dense_ms`).
        notices: layers that could not be measured and why.
        measured_ops: op signatures timed by this build (0: everything came from the cache).
        cached_ops: op signatures found in the cache.
        seconds: wall time of the build.
        alignment: the backend's channel alignment (`LatencyBackend.alignment`, 1 if it has none):
            `grid.keep_counts` keeps larger groups on its multiples.
        node_ops: each measured node's kind (op type; ``Conv:grouped`` for grouped and depthwise convs).
        in_model: node -> in-model time over micro-model price, when the prices were calibrated against a
            profile of the whole model (`latency.calibrate`); empty: micro-model prices.
        alone: the uncalibrated table a calibrated one came from (its curves hold the measured steps), or None.
    """

    backend: str
    dense_ms: float
    curves: dict[int, GroupCurve]
    notices: tuple[str, ...] = ()
    measured_ops: int = 0
    cached_ops: int = 0
    seconds: float = 0.0
    backend_key: str = field(default="", repr=False)
    node_dense_ms: dict[str, float] = field(default_factory=dict, repr=False)
    alignment: int = 1
    node_ops: dict[str, str] = field(default_factory=dict, repr=False)
    in_model: dict[str, float] = field(default_factory=dict, repr=False)
    alone: LatencyTable | None = field(default=None, repr=False)

    def at(self, group: int, kept: int) -> float:
        """Latency of `group`'s layers at `kept` channels (interpolated between measured counts, exact at
        them); 0.0 for a group without a curve (no measured layer depends on it)."""
        curve = self.curves.get(group)
        return 0.0 if curve is None else curve.at(kept)

    def as_dict(self) -> dict:
        return {"backend": self.backend, "dense_ms": round(self.dense_ms, 5), "measured_ops": self.measured_ops,
                "cached_ops": self.cached_ops, "seconds": round(self.seconds, 3), "notices": list(self.notices),
                "curves": [c.as_dict() for c in self.curves.values()]}


def default_cache_dir() -> Path:
    """``$ONNXPRUNE_LATENCY_CACHE`` or ``~/.cache/onnxprune/latency``."""
    env = os.environ.get("ONNXPRUNE_LATENCY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "onnxprune" / "latency"


def build_table(
    analysis: ChannelAnalysis,
    backend: LatencyBackend,
    *,
    cache_dir: Path | str | None = None,
    progress: Task | None = None,
    min_keep_ratio: float = 0.1,
    light: bool = True,
) -> LatencyTable:
    """Measure (or read from the cache) the latency curve of every group of `analysis` on `backend`.

    Args:
        analysis: the channel analysis of the model (its `ModelGraph` gives the shapes).
        backend: where to measure; an emulated backend is refused.
        cache_dir: the cache folder (default: `default_cache_dir`).
        progress: a `Task` advanced once per op signature timed; None opens a task of its own.
        min_keep_ratio: no count below this fraction of a group's size is measured.
        light: also price the memory-bound nodes the groups slice (`microbench.light_nodes`), unless the
            backend says ``light_ops = False`` (TVM: it fuses them, and every micro-model is a compile); False:
            only Conv/Gemm/MatMul (the tables before 2026-12-03, for comparing predictions).

    Raises:
        UsageError: the backend is emulated (its numbers are not timing).
    """
    if backend.emulated:
        raise UsageError(f"latency backend {backend.name} is emulated: its numbers are not timing, so no table is built")
    start = time.perf_counter()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    plans: dict[int, tuple[list[Touch], list[int]]] = {}
    notices: list[str] = []
    skipped_by_reason: dict[str, list[str]] = {}
    wanted: dict[str, tuple[OpSpec, dict[str, Variant]]] = {}
    for g in analysis.groups:
        touches, skipped = touched_ops(analysis, g, light=light and getattr(backend, "light_ops", True))
        for node, reason in skipped:
            if node not in skipped_by_reason.setdefault(reason, []):
                skipped_by_reason[reason].append(node)
        if not touches:
            continue
        lowest = max(1, g.min_keep, math.ceil(min_keep_ratio * g.size))
        counts = sorted({c for c in backend.probe_counts(g.size, lowest) if 1 <= c <= g.size} | {g.size})
        plans[g.id] = (touches, counts)
        for t in touches:
            spec, variants = wanted.setdefault(t.spec.digest, (t.spec, {}))
            dense = dense_variant(spec)
            variants[dense.key] = dense
            for c in counts:
                v = variant(t, g.size, c)
                if v is not None:
                    variants[v.key] = v
    for reason, nodes in skipped_by_reason.items():
        more = f" and {len(nodes) - 3} more" if len(nodes) > 3 else ""
        notices.append(f"{len(nodes)} layer(s) not measured ({reason}): {', '.join(nodes[:3])}{more}")
    timings: dict[str, dict[str, Timing]] = {}
    todo: list[tuple[str, OpSpec, list[Variant]]] = []
    for digest, (spec, variants) in wanted.items():
        timings[digest] = _load(folder, spec, backend.key)
        missing = [v for k, v in variants.items() if k not in timings[digest]]
        if missing:
            todo.append((digest, spec, missing))
    if todo:
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
        title = f"latency table on {backend.name}"
        opened = task(title, total=len(todo)) if progress is None else nullcontext(progress)
        pace = _Pace()
        with opened as tk:
            for digest, spec, missing in todo:
                if progress is None:  # a caller's task keeps its own description
                    tk.update(description=f"{title}: {spec.op_type} {_shape_text(spec)}")
                try:
                    timings[digest].update(_measure(spec, missing, timings[digest], backend, pace))
                except OnnxPruneError:
                    raise  # the backend's own refusals (a missing toolchain, a bad option) are the user's to see
                except Exception as exc:  # a runtime that rejects one micro-model costs its layers, not the table
                    notices.append(f"{spec.op_type} {_shape_text(spec)} not measured: {type(exc).__name__}: {_first_line(exc)}")
                else:
                    _store(folder, spec, backend.key, timings[digest])
                tk.advance()
    curves: dict[int, GroupCurve] = {}
    dense_by_node: dict[str, float] = {}
    ops: dict[str, str] = {}
    for gid, (touches, counts) in plans.items():
        curve = _curve(gid, analysis.group(gid).size, touches, counts, timings)
        if curve is None:
            notices.append(f"group {gid}: no count could be timed on every layer it touches")
            continue
        curves[gid] = curve
        for t in touches:
            if t.node in curve.nodes:
                dense_by_node[t.node] = timings[t.spec.digest][dense_variant(t.spec).key].best_ms
                ops[t.node] = t.spec.op_type + (":grouped" if int(t.spec.attr("group", 1)) > 1 else "")  # type: ignore[call-overload]
    return LatencyTable(
        backend=backend.name, dense_ms=float(sum(dense_by_node.values())), curves=curves,
        notices=tuple(dict.fromkeys(notices)), measured_ops=len(todo), cached_ops=len(wanted) - len(todo),
        seconds=time.perf_counter() - start, backend_key=backend.key, node_dense_ms=dense_by_node,
        alignment=int(getattr(backend, "alignment", 1) or 1), node_ops=ops,
    )


def _curve(
    gid: int, size: int, touches: list[Touch], counts: list[int], timings: dict[str, dict[str, Timing]]
) -> GroupCurve | None:
    # a memory-bound node the backend could not time (a notice says so) leaves the curve, not the group
    touches = [t for t in touches if t.spec.op_type in HEAVY_OPS or timings[t.spec.digest]]
    kept_counts, ms, spreads, per_node = [], [], [], []
    for c in counts:
        parts = []
        for t in touches:
            v = variant(t, size, c)
            timing = None if v is None else timings[t.spec.digest].get(v.key)
            if timing is None:
                break
            parts.append(timing)
        else:
            total = sum(p.best_ms for p in parts)
            kept_counts.append(c)
            ms.append(total)
            per_node.append([p.best_ms for p in parts])
            spreads.append(math.sqrt(sum((p.spread * p.best_ms) ** 2 for p in parts)) / total if total > 0 else 0.0)
    if not kept_counts or kept_counts[-1] != size:
        return None
    node_ms = tuple(tuple(row[i] for row in per_node) for i in range(len(touches)))
    return GroupCurve(gid, tuple(kept_counts), tuple(ms), tuple(spreads), tuple(t.node for t in touches), node_ms)


@dataclass
class _Pace:
    """What this build has learnt of the backend's speed, to give every batch about `ROUND_BUDGET_MS`."""

    ms: float = 0.0
    macs: float = 0.0

    def repeat(self, spec: OpSpec, batch: list[Variant]) -> int:
        if self.macs <= 0:
            return MAX_REPEAT
        per_mac = self.ms / self.macs
        round_ms = sum(variant_macs(spec, v) * per_mac + CALL_MS for v in batch)
        return int(np.clip(round(BATCH_BUDGET_MS / max(round_ms, 1e-3)), MIN_REPEAT, MAX_REPEAT))

    def learn(self, spec: OpSpec, batch: list[Variant], timings: list[Timing]) -> None:
        for v, t in zip(batch, timings):
            self.ms += max(t.best_ms - CALL_MS, 0.0)
            self.macs += variant_macs(spec, v)


def _measure(
    spec: OpSpec, variants: list[Variant], cached: dict[str, Timing], backend: LatencyBackend, pace: _Pace
) -> dict[str, Timing]:
    """Time `variants` of `spec`, interleaved with the dense node in every batch, rescaled to one reference."""
    dense = dense_variant(spec)
    reference = cached.get(dense.key)
    out: dict[str, Timing] = {}
    todo = [v for v in variants if v.key != dense.key]
    for batch in list(_batches(todo, spec)) or [[]]:
        variants_timed = [dense, *batch]
        models = [micro_model(spec, v, seed=k) for k, v in enumerate(variants_timed)]
        measured = backend.time_models(models, warmup=WARMUP, repeat=pace.repeat(spec, variants_timed))
        pace.learn(spec, variants_timed, measured)
        if reference is None:
            reference = measured[0]
            out[dense.key] = reference
        scale = reference.best_ms / measured[0].best_ms if measured[0].best_ms > 0 else 1.0
        for v, timing in zip(batch, measured[1:]):
            out[v.key] = timing.scaled(scale)
    return out


def _batches(variants: list[Variant], spec: OpSpec) -> Iterable[list[Variant]]:
    batch: list[Variant] = []
    weight = _weight_bytes(dense_variant(spec), spec)
    used = weight
    for v in variants:
        w = _weight_bytes(v, spec)
        if batch and (len(batch) + 1 >= BATCH_MODELS or used + w > BATCH_WEIGHT_BYTES):
            yield batch
            batch, used = [], weight
        batch.append(v)
        used += w
    if batch:
        yield batch


def _weight_bytes(v: Variant, spec: OpSpec) -> int:
    return sum(4 * int(np.prod(s, dtype=np.int64)) for s, p in zip(v.shapes, spec.params) if p)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def _shape_text(spec: OpSpec) -> str:
    return " ".join("x".join(map(str, s)) for s in spec.shapes[:2])


# ---- cache --------------------------------------------------------------------------------------

def _cache_path(folder: Path, spec: OpSpec, backend_key: str) -> Path:
    digest = hashlib.sha256(f"{CACHE_VERSION}|{backend_key}|{spec.signature}".encode()).hexdigest()[:32]
    return folder / f"{spec.op_type.lower()}-{digest}.json"


def _load(folder: Path, spec: OpSpec, backend_key: str) -> dict[str, Timing]:
    path = _cache_path(folder, spec, backend_key)
    try:
        data = json.loads(path.read_text())
        if data.get("version") != CACHE_VERSION or data.get("backend") != backend_key or data.get("signature") != spec.signature:
            return {}
        return {k: Timing.from_dict(v) for k, v in data["timings"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # absent or unreadable: measure again


def _store(folder: Path, spec: OpSpec, backend_key: str, timings: dict[str, Timing]) -> None:
    data = {"version": CACHE_VERSION, "backend": backend_key, "signature": spec.signature,
            "timings": {k: t.as_dict() for k, t in sorted(timings.items())}}
    payload = json.dumps(data, indent=1).encode()
    with contextlib.suppress(OnnxPruneError, OSError):  # an unwritable cache costs time next run, never the result
        write_atomically(_cache_path(folder, spec, backend_key), lambda f: f.write(payload))
