"""Whole-model latency: the realized speedup of a pruned model, measured interleaved with the dense one.

`measure_speedup` runs both models round-robin on one backend (`timing.interleaved`), so drift of a busy
machine hits both alike; the speedup is the ratio of the medians. Models with dynamic input sizes are
fixed first with `static_inputs`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx

from onnxprune.errors import UsageError
from onnxprune.latency.backend import LatencyBackend
from onnxprune.latency.timing import Timing
from onnxprune.progress import Task

__all__ = ["Speedup", "measure_speedup", "static_inputs"]


@dataclass(frozen=True)
class Speedup:
    """Dense and pruned timings and the speedup ``dense.median_ms / pruned.median_ms``."""

    dense: Timing
    pruned: Timing
    speedup: float

    def as_dict(self) -> dict:
        return {"dense_ms": round(self.dense.median_ms, 4), "pruned_ms": round(self.pruned.median_ms, 4),
                "speedup": round(self.speedup, 4), "dense_spread": round(self.dense.spread, 4),
                "pruned_spread": round(self.pruned.spread, 4), "runs": self.dense.runs}


def measure_speedup(
    dense: onnx.ModelProto,
    pruned: onnx.ModelProto,
    backend: LatencyBackend,
    *,
    repeat: int = 30,
    warmup: int = 3,
    progress: Task | None = None,
) -> Speedup:
    """Time `dense` and `pruned` interleaved on `backend` (static input shapes: see `static_inputs`)."""
    d, p = backend.time_models([dense, pruned], warmup=warmup, repeat=repeat, progress=progress)
    return Speedup(d, p, d.median_ms / p.median_ms if p.median_ms > 0 else float("inf"))


#: Elements of one input (or of one micro-model's input) beyond which nothing is timed: 2^28 floats are 1 GiB, more
#: than any real layer's activation (an LLM's LM-head weight, 2048 x 128256, has 2^28.0).
MAX_MEASURED_ELEMENTS = 1 << 28


def static_inputs(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]] | None = None) -> onnx.ModelProto:
    """A copy of `model` whose graph inputs have static sizes, for measurement.

    `shapes` (``--shape``) gives sizes by input name; otherwise a symbolic first axis is the batch and
    becomes 1. `model` is not modified.

    Raises:
        UsageError: `shapes` names no input or gives the wrong rank, or a size stays unknown (the message
            names the input and ``--shape``).
    """
    shapes = dict(shapes or {})
    inits = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    names = {vi.name for vi in inputs}
    for name in shapes:
        if name not in names:
            raise UsageError(f"--shape names {name!r}, which is not a model input ({', '.join(sorted(names))})")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in out.graph.input:
        if vi.name not in names:
            continue
        dims = vi.type.tensor_type.shape.dim
        given = shapes.get(vi.name)
        if given is not None and len(given) != len(dims):
            raise UsageError(f"--shape {vi.name}: the input has rank {len(dims)}, got {len(given)} sizes")
        for axis, d in enumerate(dims):
            static = d.HasField("dim_value") and d.dim_value > 0
            if given is not None:
                if static and d.dim_value != given[axis]:
                    raise UsageError(f"--shape {vi.name}: size {given[axis]} on axis {axis} conflicts with the model's {d.dim_value}")
                value = int(given[axis])
            elif static:
                continue
            elif axis == 0:
                value = 1  # the batch
            else:
                what = d.dim_param or "unknown"
                raise UsageError(
                    f"input {vi.name!r} has a dynamic size ({what}) on axis {axis}: give its sizes with "
                    f"--shape {vi.name}=" + ",".join("N" for _ in dims)
                )
            if value < 1:
                raise UsageError(f"--shape {vi.name}: sizes must be positive, got {value}")
            d.Clear()
            d.dim_value = value
        elements = math.prod(d.dim_value for d in dims)
        if elements > MAX_MEASURED_ELEMENTS:  # random inputs of that size would take minutes and gigabytes
            raise UsageError(f"input {vi.name!r} has {elements} elements, too many to measure: give smaller sizes "
                             f"with --shape {vi.name}=" + ",".join("N" for _ in dims))  # fmt: skip
    return out
