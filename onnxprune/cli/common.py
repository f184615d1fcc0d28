"""What every command of the CLI shares: reading the model and the calibration data, the pass pipeline with
its progress, and printing a result as JSON or text."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

    from onnxprune.calibration import CalibrationData
    from onnxprune.passmanager import Instrument, Pass, PassManager

__all__ = ["batch_notice", "emit", "load_calibration", "load_input", "make_pipeline", "normalize_pass"]


def load_calibration(args: argparse.Namespace, model: onnx.ModelProto) -> CalibrationData | None:
    """--calib (a file, or ``synthetic[:N]`` made from the model), checked against `model`; None without it."""
    if not getattr(args, "calib", None):
        return None
    from onnxprune.calibration import load_calib

    return load_calib(args.calib, model, args.calib_samples, seed=getattr(args, "seed", 0))  # seed: --calib synthetic


def batch_notice(calib) -> str | None:
    """Said before the work: a leading size the model fixes is taken as its batch (None: nothing to say)."""
    note = calib.batch_notice() if calib is not None else None
    if note:
        print(f"onnxprune: note: {note}", file=sys.stderr)
    return note


def load_input(args: argparse.Namespace) -> onnx.ModelProto:
    """The model file as stored, with any --shape sizes fixed (normalisation is the pipeline's first pass)."""
    from onnxprune.importer import fix_input_shapes, load_model, parse_shapes

    shapes = parse_shapes(getattr(args, "shape", None))  # a bad --shape is a usage error, before reading
    model = load_model(args.model)
    if shapes:
        fix_input_shapes(model, shapes)
    return model


def make_pipeline(passes: list[Pass], *instruments: Instrument) -> PassManager:
    """The passes as one `PassManager`, reporting each pass as progress (shown on a terminal, never with
    --json: `main` installs the reporter)."""
    from onnxprune.passmanager import PassManager, ProgressInstrument

    return PassManager(passes, instruments=[*instruments, ProgressInstrument()])


def normalize_pass() -> Pass:
    """The pipeline's first pass: the freshly loaded model canonicalised in place."""
    from onnxprune.passes.normalize import NormalizePass

    return NormalizePass(inplace=True)  # the CLI owns the freshly loaded model: no copy of its weights


def emit(result: dict, args: argparse.Namespace, text: Any) -> None:
    """`result` as one JSON object with --json, else `text()` (human-readable output)."""
    if getattr(args, "json", False):
        print(json.dumps(result))
    else:
        text()
