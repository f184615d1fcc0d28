"""RefinePass: end-to-end refinement of the pruned model toward the dense model (`onnxprune.refine`).

Runs after `RemoveChannelsPass` (and before any `SparsifyPass`, whose zeros refinement would fill again): a few
epochs of distillation of the dense model's outputs into the pruned model's remaining weights on the
calibration inputs (``--calib FILE`` or ``--calib synthetic[:N]``), no labels. Contract: only initializer values
change (nodes, names, shapes and the outputs' meaning stay); with ``epochs == 0`` the model passes through
untouched (the same object). The `RefineReport` is the pass's artifact (the JSON report's ``refine`` entry).
"""

from __future__ import annotations

import onnx

from onnxprune.calibration_data import CalibLike, as_calibration
from onnxprune.errors import ModelError, UsageError
from onnxprune.passmanager import Pass, PassResult
from onnxprune.refine import RefineConfig, refine


class RefinePass(Pass):
    """Distil `teacher` (the dense model) into the pruned model on `calib`.

    Args:
        config: epochs (0: off), loss, learning rate, batch, seed.
        calib: the calibration inputs (the same ones the repair used); required when refining.
        teacher: the dense model whose outputs the pruned model learns; it may be normalised in place by an
            earlier pass of the same pipeline (the CLI passes the loaded model, which `NormalizePass` canonicalises).
    """

    def __init__(self, config: RefineConfig, calib: CalibLike | None, teacher: onnx.ModelProto) -> None:
        self.config = config
        self.calib = as_calibration(calib)
        self.teacher = teacher
        self._before: tuple | None = None

    def requires(self, model: onnx.ModelProto) -> None:
        if self.config.epochs and (self.calib is None or not self.calib.arrays):
            raise UsageError("--refine needs calibration inputs: pass --calib FILE.npz or --calib synthetic[:N]")
        if self.config.epochs and len(self.calib.arrays) != 1:  # type: ignore[union-attr]
            raise UsageError("--refine supports models with one input")

    def ensures(self, model: onnx.ModelProto) -> None:
        if self._before is not None and _structure(model) != self._before:
            raise ModelError("refine changed the graph's structure (only initializer values may change)")

    def call(self, model: onnx.ModelProto) -> PassResult:
        if self.config.epochs == 0:
            self._before = None
            return PassResult(model, False)
        self._before = _structure(model)
        assert self.calib is not None
        (x,) = self.calib.arrays.values()
        refined, report = refine(model, self.teacher, x, self.config)
        return PassResult(refined, refined is not model, artifacts=(report,))


def _structure(model: onnx.ModelProto) -> tuple:
    """Everything refinement must keep: the nodes and the initializers' names, shapes and types."""
    return ([(n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node],
            [(t.name, tuple(t.dims), t.data_type) for t in model.graph.initializer])
