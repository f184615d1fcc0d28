"""Whole-model timings kept on disk, so that a choice made on measurements is made again on a re-run.

`passes.latency_select.confirmed` times a shortlist of pruned plans (the table's choice and the next best by
predicted score) against the unrounded plan and the dense model, and keeps the one that measured best. Timed
afresh on every run, the same command could write another model the next time: the candidates' scores lie
within a few percent of each other, about the run-to-run spread of a fastest-of-40 time on a shared machine
(CI, session 42: the bundled Fashion-MNIST CNN at ``--ratio 0.3`` kept 96 channels of ``top`` in one run and
64 in the next). These timings are cached the way the table's micro-model timings are (`latency.table`): one
JSON file per (model structure, backend key, the kept counts timed, the rounds), written atomically in the
latency cache folder, so the same command on the same device gives the same model (and times nothing the
second time); another folder (``--latency-cache``) or another device measures again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx

from onnxprune.errors import OnnxPruneError
from onnxprune.io import write_atomically
from onnxprune.latency.timing import Timing

__all__ = ["cached_model_timings", "structure_digest"]

MODEL_TIMINGS_VERSION = 1  # bump when what is timed changes


def structure_digest(model: onnx.ModelProto, *salt: str) -> str:
    """What a model's run time depends on: the nodes, the initializers' shapes and types (not their values),
    the inputs; `salt` (versions, backend keys) is hashed in front."""
    h = hashlib.sha256("|".join(salt).encode() + b"|")
    for n in model.graph.node:
        h.update(n.SerializeToString())
    for t in model.graph.initializer:
        h.update(f"{t.name}:{list(t.dims)}:{t.data_type};".encode())
    for vi in model.graph.input:
        h.update(vi.SerializeToString())
    return h.hexdigest()[:32]


def cached_model_timings(
    folder: Path,
    backend_key: str,
    model: onnx.ModelProto,
    timed: Sequence[object],
    measure: Callable[[], list[Timing]],
    how: object = None,
) -> list[Timing]:
    """`measure()`'s timings of the models described by `timed` (one entry per model timed, in order, whose
    ``repr`` says which variant of `model` it is: its kept counts), measured as `how` says (the rounds), read
    from `folder` when this device timed them before; else measured and stored.

    An unreadable or foreign file measures again; an unwritable folder costs time on the next run, never the
    result."""
    what = repr([list(timed), how])
    path = folder / f"models-{structure_digest(model, str(MODEL_TIMINGS_VERSION), backend_key, what)}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(path.read_text())
        if data["version"] == MODEL_TIMINGS_VERSION and data["backend"] == backend_key and data["timed"] == what:
            found = [Timing.from_dict(t) for t in data["timings"]]
            if len(found) == len(timed):
                return found
    timings = measure()
    payload = json.dumps({"version": MODEL_TIMINGS_VERSION, "backend": backend_key, "timed": what,
                          "timings": [t.as_dict() for t in timings]}, indent=1).encode()
    with contextlib.suppress(OnnxPruneError, OSError):
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: f.write(payload))
    return timings
