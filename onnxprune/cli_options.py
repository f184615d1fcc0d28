"""The command line's flags: one `add_*_options` function per subcommand, value types, and the checks of
flag combinations that need no model (`check_prune_flags`).

`onnxprune.cli` builds the parser from these and runs the commands. Every option with a default states it
in ``--help`` (`DefaultsHelpFormatter`); an option whose default is resolved later (``--ratio``, whose
absence matters when a target is given) says its default in its help text. Bad values and contradicting
flags are usage errors: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from onnxprune.errors import UsageError

DEFAULT_RATIO = 0.3  # --ratio when neither it nor a target is given (PruneConfig's and UnconstrainedConfig's default)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are `UsageError`s (one line, exit code 2), never a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option whose default is a value (not None, False or suppressed)
    and whose help does not already say its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            not action.option_strings
            or any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS))  # 0 is a default
            or "default" in text.lower()
            or "%(default)" in text
        ):
            return action.help
        return f"{text} (default: %(default)s)"


def ratio(text: str) -> float:
    """A ratio in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1), got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_analyze_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--allow-inexact", action="store_true", help="include LayerNorm/softmax-coupled groups")
    p.add_argument("--graph", metavar="OUT.graphml|OUT.json",
                   help="also write the dependency graph annotated with the groups (GraphML or node-link JSON)")
    add_shape_option(p)


def add_prune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model")
    p.add_argument("-o", "--output", metavar="OUT", help="output path (default: MODEL.pruned.onnx beside the input)")
    p.add_argument("--ratio", type=ratio, default=None, metavar="R",
                   help=f"fraction of channels to remove per group, in [0, 1) (default: {DEFAULT_RATIO}; "
                        "not with --target-params/--target-macs)")
    p.add_argument("--global", dest="global_ranking", action="store_true",
                   help="rank channels across groups (= --allocation global)")
    p.add_argument("--round-to", type=positive_int, default=1, metavar="N", help="keep a multiple of N channels")
    p.add_argument("--criterion", default="l1",
                   help="importance: l1, l2, bn, random, fpgm, lamp, activation, apoz, obs; "
                        "--mode unconstrained: energy, bn, l1, l2")
    p.add_argument("--seed", type=int, default=0, help="seed for the random criterion")
    p.add_argument("--allow-inexact", action="store_true", help="also prune LayerNorm/softmax-coupled groups")
    p.add_argument("--mode", choices=("constrained", "unconstrained"), default="constrained",
                   help="unconstrained: each coupled layer keeps its own channels (UPSCALE export)")
    p.add_argument("--share", type=float, default=0.0, metavar="S",
                   help="unconstrained: blend of each layer's ranking with the group's shared one (0..1; 1 = constrained)")
    p.add_argument("--union-cap", type=float, default=None, metavar="C",
                   help="unconstrained: the stream keeps at most this x the per-layer kept channels (>= 1)")
    p.add_argument("--drive", choices=("free", "writer", "reader"), default="free",
                   help="unconstrained: free = every layer its own top channels; writer = readers choose among what "
                        "reaches them; reader = writers keep what their readers read")
    p.add_argument("--no-reorder", action="store_true",
                   help="unconstrained: naive export (original order, ScatterND/Gather copies)")
    p.add_argument("--tune", type=int, default=0, metavar="N",
                   help="unconstrained: time a few copy/absorb layouts in onnxruntime (N runs each), keep the fastest")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="check in onnxruntime that the pruned model computes what the original computes with the "
                        "removed channels silenced, and store the certificate in the output (default: on when the "
                        "check is estimated to take under 2 s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_accuracy_options(p, unconstrained=True)
    add_shape_option(p)
    p.add_argument("--allocation", choices=("uniform", "global", "lamp", "sensitivity"),
                   help="how groups share the removal (sensitivity: measured per-group output error, needs --calib; "
                        "default: uniform, or global with --global)")
    p.add_argument("--target-params", metavar="N|P%", help="parameters to keep: a count N or a percentage P%%")
    p.add_argument("--target-macs", metavar="N|P%", help="MACs to keep: a count N or a percentage P%%")


def add_sensitivity_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model")
    p.add_argument("--criterion", default="l1", help="importance criterion used to order channels")
    p.add_argument("--ratios", default="0.1,0.25,0.5,0.75", help="comma-separated ratios in (0, 1)")
    p.add_argument("--plot", help="PNG path (default: MODEL.sensitivity.png beside the input)")
    p.add_argument("--allow-inexact", action="store_true", help="include LayerNorm/softmax-coupled groups")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_accuracy_options(p, samples=32)


def add_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model written by onnxprune prune")
    p.add_argument("-o", "--output", help="HTML path (default: MODEL.report.html beside the model)")
    p.add_argument("--original", metavar="MODEL.onnx", help="the model before pruning: per-layer channels before/after")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_shape_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", action="append", metavar="NAME=D1,D2,...",
                   help="fix a dynamic input's sizes (repeatable); lets run-time shape arithmetic fold")


def add_accuracy_options(p: argparse.ArgumentParser, samples: int | None = None, unconstrained: bool = False) -> None:
    """--repair, --calib, --calib-samples; `unconstrained`: the command has --mode, whose repair is `mean`."""
    repairs = ("none", "bias", "ls", "seq") + (("mean",) if unconstrained else ())
    text = ("after removal: none, bias (data-free, BatchNorm stats), ls (calibrated least squares), "
            "seq (ls fitted layer by layer on the pruned model's own activations)")
    if unconstrained:
        text += "; --mode unconstrained: none or mean (calibrated output means, needs --calib)"
    p.add_argument("--repair", default="none", choices=repairs, help=text)
    p.add_argument("--calib", metavar="FILE.npz", help="calibration inputs: .npz, keys = input names, axis 0 = samples")
    p.add_argument("--calib-samples", type=positive_int, default=samples, metavar="N",
                   help="use the first N samples" + ("" if samples is not None else " (default: all)"))


def check_prune_flags(args: argparse.Namespace) -> float:
    """Refuse contradicting prune flags (UsageError, exit 2) and return the ratio to use.

    ``--ratio`` and a target both say how much to remove; ``--global`` is ``--allocation global`` and
    contradicts any other allocation.
    """
    targets = [f"--{name.replace('_', '-')}" for name in ("target_params", "target_macs") if getattr(args, name)]
    if args.ratio is not None and targets:
        raise UsageError(f"--ratio and {targets[0]} both say how much to remove: give one of them")
    if args.global_ranking and args.allocation not in (None, "global"):
        raise UsageError(f"--global means --allocation global: it contradicts --allocation {args.allocation}")
    return DEFAULT_RATIO if args.ratio is None else args.ratio
