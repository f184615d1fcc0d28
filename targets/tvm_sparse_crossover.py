"""Measure a model's dense-vs-sparse crossover table for a target ahead of its compile.

The per-layer choice (:mod:`.tvm_sparse_choice`) measures candidate layers when the backend hands it a
``build`` callable for the target, and otherwise reads the crossover table (the timing cache) before falling
back to the cost model. :func:`measure_crossovers` fills that table for one model and one target that
executes here (x86 in this process, wasm under node): it imports the model, runs the layout passes that come
before the sparse pass in the backend's CPU pipeline (:func:`.tvm_backend._relax_pipeline`: constant folding
and the NHWC layout, up to channel padding), and lets :func:`.tvm_sparse_choice.apply` time every candidate
with the backend's dense pipeline. A compile that follows reads the timings, whatever builder it was given,
so its manifest says ``decided_by: "measured"``.

Start reading at :func:`measure_crossovers`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import tvm
from tvm import relax

from . import bundle as B
from . import tvm_backend, tvm_layout, tvm_sparse_choice
from .spec import TargetSpec
from .table import get_target
from .tvm_tiles import vector_lanes, vector_registers

__all__ = ["at_sparse_point", "measure_crossovers"]


def at_sparse_point(
    model: str | Path | onnx.ModelProto, target: str, shapes: dict[str, tuple[int, ...]] | None = None
) -> tuple[tvm.IRModule, TargetSpec, tvm.target.Target]:
    """The model as the backend's CPU pipeline hands it to the sparse choice (imported, constants folded,
    NHWC layout), with the target's row and TVM target."""
    spec = get_target(target)
    proto = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
    inputs, _ = B.model_signature(proto, shapes, batch_default=1)
    mod = tvm_backend.import_onnx(proto, inputs)
    tvm_target = tvm_backend.build_target(spec)
    with tvm_target:
        layout = tvm_layout.relax_layout_passes(tvm_target)
        at = next(i for i, p in enumerate(layout) if p.info.name == "PadConvChannels")
        mod = tvm.transform.Sequential([relax.transform.FoldConstant(), *layout[:at]])(mod)
    return mod, spec, tvm_target


def measure_crossovers(
    model: str | Path | onnx.ModelProto, target: str, shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, Any]:
    """Time every sparse candidate of ``model`` dense vs sparse on ``target`` (cached timings are reused);
    return the choice's report (the manifest's ``sparse`` field a compile of this model will write)."""
    mod, spec, tvm_target = at_sparse_point(model, target, shapes)
    lanes, registers = vector_lanes(tvm_target), vector_registers(tvm_target)
    report: dict[str, Any] = {}
    with tvm_target:
        tvm_sparse_choice.apply(mod, "auto", spec, tvm_target, lanes, registers,
                                lambda m: tvm_backend.build_executable(m, spec, sparse="off"), report)  # fmt: skip
    return report
