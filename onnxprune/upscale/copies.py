"""The copy ops a boundary lowers to (step 4): contiguous copies (`Slice` to narrow, `Pad` to widen) here,
the gathers and scatters of non-contiguous sets in `naive`. `export.copy_ops` chooses among them.

Every copy op and constant is named by one `CopyWriter` per export: ``upscale_copy_<Op>_<n>``. That stem is
how `report.copy_report` finds the copies in an exported model (a saved model keeps no other record).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

COPY = "upscale_copy"  # name stem of every op the export inserts
COPY_OPS = ("Gather", "GatherElements", "ScatterND", "ScatterElements", "Slice", "Pad", "Concat")

Ops = tuple[list[onnx.NodeProto], str]  # the ops of one copy, and the tensor holding its result


@dataclass(eq=False)
class CopyWriter:
    """Names the copy ops of one export (numbered across it) and adds their constants to its graph."""

    graph: onnx.GraphProto
    count: int = 0

    def name(self, op: str) -> str:
        self.count += 1
        return f"{COPY}_{op}_{self.count}"

    def const(self, value: np.ndarray, base: str) -> str:
        name = f"{base}_c"
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name


def source_slots(t_in: np.ndarray, t_out: np.ndarray) -> np.ndarray:
    """For each output position (`t_out`, original positions), its slot in the input (`t_in`), -1 if new."""
    pos_in = {int(p): j for j, p in enumerate(t_in.tolist())}
    return np.array([pos_in.get(int(q), -1) for q in t_out.tolist()], dtype=np.int64)


def pads(rank: int, axis: int, before: int, after: int) -> np.ndarray:
    """The `pads` input of a Pad widening only `axis`."""
    out = np.zeros(2 * rank, dtype=np.int64)
    out[axis], out[rank + axis] = before, after
    return out


def slice_copy(w: CopyWriter, x: str, axis: int, start: int, stop: int) -> Ops:
    """Narrowing to one contiguous run ``[start, stop)`` of the input's slots."""
    n = w.name("Slice")
    ins = [x, w.const(np.array([start], np.int64), n + "s"), w.const(np.array([stop], np.int64), n + "e"),
           w.const(np.array([axis], np.int64), n + "a")]  # fmt: skip
    return [helper.make_node("Slice", ins, [n], name=n)], n


def pad_copy(w: CopyWriter, x: str, rank: int, axis: int, before: int, after: int) -> Ops:
    """Widening by zero channels before and after the input's (contiguous) run."""
    n = w.name("Pad")
    return [helper.make_node("Pad", [x, w.const(pads(rank, axis, before, after), n)], [n], name=n, mode="constant")], n
