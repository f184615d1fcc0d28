"""A model with some initializers replaced and biases added: `with_values` makes a copy; `WorkingCopy` keeps one
copy up to date across the waves of a sequential repair.

Every sequential repair (`repair.repair_sequential`, `upscale.stream_repair`, `sparsity.sparsify`,
`repair_relu`) runs the pruned model once per wave with the weights fitted so far. A fresh copy per wave copied
the whole model each time (ResNet-50: 49 waves x 100 MB of protobuf, ~1.5 s of the main thread and ~5 GB of
fresh pages faulted in); `WorkingCopy` writes only the tensors that changed since the wave before.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["WorkingCopy", "with_values"]

# (node, bias name, value): a bias input added to a Conv / Gemm that had none
NewBias = tuple[onnx.NodeProto, str, np.ndarray]


def with_values(model: onnx.ModelProto, values: dict[str, np.ndarray], new_biases: list[NewBias]) -> onnx.ModelProto:
    """A copy of `model` with initializers replaced by `values` and the `new_biases` (node, name, value) added."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(values[t.name]), t.name))
    _add_biases(out, new_biases)
    return out


def _add_biases(model: onnx.ModelProto, new_biases: list[NewBias]) -> None:
    """Each bias as a new initializer (its name made unique) and the third input of its node."""
    if not new_biases:
        return
    names = {n.name: n for n in model.graph.node}
    existing = {t.name for t in model.graph.initializer}
    for node, name, value in new_biases:
        while name in existing:
            name += "_"
        existing.add(name)
        model.graph.initializer.append(numpy_helper.from_array(value, name))
        target = names[node.name]
        while len(target.input) < 3:
            target.input.append("")
        target.input[2] = name


class WorkingCopy:
    """One copy of `model`, brought to ``with_values(model, values, new_biases)`` by `update` in place.

    `values` maps an initializer to its current array; an entry is written again only when it is a different
    array object from the one written before (the repairs store a new array for every change). `new_biases`
    only grows: the entries after those already added are added. The model `update` returns is the same
    object every time: a caller that holds it across an `update` sees the new values.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self._index = {t.name: i for i, t in enumerate(self.model.graph.initializer)}
        self._written: dict[str, int] = {}  # initializer -> id() of the array last written into it
        self._held: dict[str, np.ndarray] = {}  # those arrays, kept alive so their ids stay theirs
        self._biases = 0  # entries of `new_biases` already added

    def update(self, values: dict[str, np.ndarray], new_biases: list[NewBias]) -> onnx.ModelProto:
        inits = self.model.graph.initializer
        for name, value in values.items():
            if name not in self._index or self._written.get(name) == id(value):
                continue
            inits[self._index[name]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
            self._written[name], self._held[name] = id(value), value
        if len(new_biases) < self._biases:
            raise ValueError("new biases were taken back: a WorkingCopy only adds biases")
        _add_biases(self.model, new_biases[self._biases :])
        self._biases = len(new_biases)
        return self.model
