"""What the CLI's commands share that needs no pass or target (core: `onnxprune.cli` composes the passes):
reading the model and the calibration data, the pipeline with its progress, JSON or text output, the output path
of `prune`, and verification with its certificate."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxprune.errors import OnnxPruneError, UsageError

if TYPE_CHECKING:
    import onnx

    from onnxprune.calibration import CalibrationData
    from onnxprune.certificate import Certificate
    from onnxprune.passmanager import Instrument, Pass, PassManager

__all__ = ["WithNotice", "batch_notice", "emit", "load_calibration", "load_input", "make_pipeline", "output_path",
           "print_summary", "verify"]


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


def emit(result: dict, args: argparse.Namespace, text: Any) -> None:
    """`result` as one JSON object with --json, else `text()` (human-readable output)."""
    if getattr(args, "json", False):
        print(json.dumps(result))
    else:
        text()


def output_path(args: argparse.Namespace) -> tuple[Path, Path]:
    """(input, output) paths of `prune`; refuses an output that would overwrite the input or its data."""
    from onnxprune.external import referenced_files

    src = Path(args.model)
    out = Path(args.output) if args.output else src.with_name(src.name.removesuffix(".onnx") + ".pruned.onnx")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise UsageError("output path equals the input path; the input is never overwritten")
    # External data lives inside the model's folder (`external.attach` refuses anything else): only an
    # existing output there can be one, and only then is the input's proto read for its references.
    inside = out.exists() and src.parent.resolve() in out.resolve().parents
    if inside and out.resolve() in referenced_files(src):
        raise UsageError("output path is an external data file of the input; the input is never overwritten")
    if not out.parent.is_dir():  # before the work, not after it
        raise OnnxPruneError(f"{out}: output folder does not exist")
    return src, out


@dataclass(frozen=True)
class WithNotice:
    """A summary record with one more notice (why latency was not measured, a fixed batch)."""

    record: Any
    notice: str

    def as_dict(self) -> dict:
        d = self.record.as_dict()
        return {**d, "notices": [*d.get("notices", []), self.notice]}


def print_summary(summary: dict, shown: tuple[str, ...] = ()) -> None:
    from onnxprune.report import print_prune_summary

    print_prune_summary(summary, shown)


def verify(
    args: argparse.Namespace, original: onnx.ModelProto, pruned: onnx.ModelProto, check: Callable[[], Certificate]
) -> Certificate | None:
    """Run `check` when verification is on and store its passing certificate in `pruned`; None when off.

    A failed check is an error (exit 1; the caller writes nothing). A check that cannot run at all (the
    original does not run in onnxruntime) is an error only with an explicit --verify, else a note.
    """
    from onnxprune.certificate import VerificationUnavailable
    from onnxprune.progress import task

    if not wants_verification(args, original):
        return None
    try:
        with task("verifying in onnxruntime"):
            cert = check()
    except VerificationUnavailable as exc:
        if args.verify:
            raise
        print(f"onnxprune: note: not verified: {str(exc).removeprefix('verification: ')}", file=sys.stderr)
        return None
    store_if_passed(pruned, cert)
    return cert


def wants_verification(args: argparse.Namespace, model: onnx.ModelProto) -> bool:
    """--verify / --no-verify, else on when the check is estimated to be cheap (a one-line note when not)."""
    if args.verify is not None:
        return bool(args.verify)
    from onnxprune.certificate import CHEAP_SECONDS, estimate_seconds

    seconds = estimate_seconds(model)
    if seconds <= CHEAP_SECONDS:
        return True
    print(f"onnxprune: note: not verified (the check would take about {seconds:.0f} s): pass --verify to run it",
          file=sys.stderr)
    return False


def store_if_passed(pruned: onnx.ModelProto, cert: Certificate) -> None:
    """Store the certificate in the pruned model's metadata, or fail (exit 1) so that nothing is written."""
    from onnxprune.certificate import store

    if not cert.passed:
        raise OnnxPruneError(f"verification failed: max error {cert.exact_max_error:.3g} > tolerance "
                             f"{cert.tolerance:.3g} (the pruned model does not compute what the original computes "
                             "with the removed channels silenced; nothing was written)")
    store(pruned, cert)
