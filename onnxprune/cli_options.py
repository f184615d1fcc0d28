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


def _int_at_least(text: str, lowest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"must be >= {lowest}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _int_at_least(text, 0)


def round_to(text: str) -> int | str:
    """``auto`` or an integer >= 1."""
    return "auto" if text.strip().lower() == "auto" else positive_int(text)


def add_analyze_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--allow-inexact", action="store_true", help="include LayerNorm/softmax-coupled groups and MoE experts")
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
    p.add_argument("--round-to", type=round_to, default="auto", metavar="auto|N",
                   help="auto: keep each group at the bottom of a latency step measured on --latency-backend "
                        "(a latency table per model, cached); N: keep a multiple of N channels (1: any count)")
    p.add_argument("--criterion", default="l1",
                   help="importance: l1, l2, bn, random, fpgm, lamp, activation, apoz, obs; "
                        "--mode unconstrained: energy, bn, l1, l2")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="random seed (>= 0): the random criterion, synthetic inputs, row sampling, --refine")
    p.add_argument("--allow-inexact", action="store_true", help="also prune LayerNorm/softmax-coupled groups and MoE experts (inexact)")
    p.add_argument("--mode", choices=("constrained", "unconstrained"), default="constrained",
                   help="unconstrained: each coupled layer keeps its own channels (UPSCALE export)")
    p.add_argument("--share", type=float, default=0.0, metavar="S",
                   help="unconstrained: blend of each layer's ranking with the group's shared one (0..1; 1 = constrained)")
    p.add_argument("--union-cap", type=float, default=None, metavar="C",
                   help="unconstrained: the stream keeps at most this x the per-layer kept channels (>= 1)")
    p.add_argument("--drive", choices=("free", "writer", "reader", "coupled"), default=None,
                   help="unconstrained (default coupled): free = every layer its own top channels; writer = readers choose among what "
                        "reaches them; reader = writers keep what their readers read; coupled = writers keep what "
                        "their readers use, readers what their writers cover")
    p.add_argument("--reader-choice", choices=("score", "ls", "seq"), default="score",
                   help="unconstrained --drive coupled with --calib: ls = each reader keeps the input channels its "
                        "least-squares refit needs (OBS on its calibration Hessian); seq (--repair seq) = ls, then "
                        "readers of multi-writer streams choose again during the repair; score = its criterion ranking")
    p.add_argument("--stream-repair", action="store_true",
                   help="unconstrained --repair seq: writers into a residual stream refit toward the original stream "
                        "minus what the skip now carries (later writers compensate channels earlier ones dropped)")
    p.add_argument("--relu-refit", action="store_true",
                   help="--repair seq: then refit every layer that feeds a ReLU on the error after the ReLU, not "
                        "before it (rows both models clamp cost nothing); both modes")
    p.add_argument("--group-budget", action="store_true",
                   help="unconstrained: a group's layers keep fewer channels until it holds no more parameters than "
                        "constrained pruning keeps there (a reader-driven writer keeps its readers' union)")
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
    p.add_argument("--allocation", choices=("uniform", "global", "lamp", "sensitivity", "knapsack"),
                   help="how groups share the removal (lamp: layer-adaptive budgets from the weights' magnitudes; "
                        "sensitivity: measured per-group output error; knapsack: measured output error per "
                        "parameter removed; both need --calib, synthetic works; default: lamp with --target-params, "
                        "global with --global or --target-latency, else uniform)")
    p.add_argument("--target-params", metavar="N|P%", help="parameters to keep: a count N or a percentage P%%")
    p.add_argument("--target-macs", metavar="N|P%", help="MACs to keep: a count N or a percentage P%%")
    p.add_argument("--steps", type=positive_int, default=1, metavar="N",
                   help="reach the removal in N steps, re-scoring the channels on the repaired model after each "
                        "(every repair fits the original model; same kept counts as 1 step; default: 1)")
    p.add_argument("--refine", type=non_negative_int, default=0, metavar="EPOCHS",
                   help="after removal, distil the original model's outputs into the pruned weights for EPOCHS "
                        "epochs on the calibration inputs (--calib FILE or synthetic; no labels; 0: off)")
    p.add_argument("--refine-loss", choices=("mse", "kl"), default="mse",
                   help="--refine's loss: mse on the outputs or kl on softmax(logits / 4)")
    add_sparsity_options(p)
    add_latency_options(p)


def add_latency_options(p: argparse.ArgumentParser) -> None:
    """--target-latency and where latency is measured (--latency-backend, --rpc, ...)."""
    p.add_argument("--target-latency", metavar="Fx|Tms",
                   help="latency to reach: a fraction of the dense latency (0.6x) or milliseconds (12ms); chooses "
                        "channels by importance per millisecond saved and verifies by measuring the pruned model")
    p.add_argument("--latency-backend", default="ort", metavar="NAME",
                   help="where latency is measured: ort, ort:EPName (an onnxruntime execution provider), or a "
                        "compile target (x86, wasm, cuda; rpc with --rpc)")
    p.add_argument("--latency-threads", type=positive_int, default=1, metavar="N", help="threads when measuring")
    p.add_argument("--rpc", metavar="HOST:PORT", help="measure on a remote device through this TVM RPC tracker")
    p.add_argument("--device-key", metavar="KEY", help="with --rpc: the key the device registered with the tracker")
    p.add_argument("--latency-cache", metavar="DIR",
                   help="folder of cached latency tables (default: $ONNXPRUNE_LATENCY_CACHE or "
                        "~/.cache/onnxprune/latency)")


def add_sparsity_options(p: argparse.ArgumentParser) -> None:
    """--sparsity, --pattern, --sparse-criterion: fine-grained pruning after the channels (`onnxprune.sparsity`)."""
    p.add_argument("--sparsity", type=ratio, default=None, metavar="S",
                   help="then zero this fraction of the prunable weights in --pattern (weights stay, plain ONNX; "
                        "without --ratio or a target no channels are removed; 0: off)")
    p.add_argument("--pattern", metavar="P",
                   help="fine-grained pattern along each weight's reduction axis: unstructured (default), group:RxC "
                        "(1x4, 4x1), nm:N:M (2:4, 4:8; zeroes 1-N/M, so --sparsity may be left out), block:RxC "
                        "(16x1, 4x4, 8x8)")
    p.add_argument("--sparse-criterion", choices=("magnitude", "wanda", "obs"),
                   help="which weights --sparsity zeroes: magnitude, wanda (|W| x input RMS, needs --calib) or obs "
                        "(SparseGPT's second-order choice, needs --calib) (default: magnitude without --calib, wanda "
                        "with it, obs with --repair ls or seq)")
    p.add_argument("--sparse-layers", choices=("inner", "all"), default="inner",
                   help="which layers --sparsity prunes: inner (default: the first layers and a last layer holding "
                        "at most a fifth of the weights stay dense) or all (every candidate layer, e.g. every "
                        "linear of an encoder for a compiled sparse bundle)")


def sparsity_config(args: argparse.Namespace):  # -> SparsityConfig | None (imported only when asked for)
    """The fine-grained pruning asked for by --sparsity/--pattern, or None (also for --sparsity 0).

    --repair, --allocation (uniform, global, lamp), --seed and --calib-samples apply to it as to the channels.
    """
    if getattr(args, "sparsity", None) is None and not getattr(args, "pattern", None):
        return None
    from onnxprune.sparsity.config import SparsityConfig
    from onnxprune.sparsity.patterns import parse_pattern

    pattern = parse_pattern(args.pattern or "unstructured")
    sparsity = args.sparsity if args.sparsity is not None else pattern.fixed_sparsity
    if sparsity is None:
        raise UsageError(f"--pattern {pattern.text} needs --sparsity S (the fraction of the weights to zero)")
    if args.mode == "unconstrained":
        raise UsageError("--sparsity and --pattern apply to --mode constrained only")
    if not sparsity:
        return None
    allocation = args.allocation or ("global" if args.global_ranking else "uniform")
    from onnxprune.sparsity.layers import LayerRules

    every = getattr(args, "sparse_layers", "inner") == "all"
    rules = LayerRules(skip_first=False, skip_last=False) if every else LayerRules()
    return SparsityConfig(sparsity=sparsity, pattern=pattern.text, criterion=args.sparse_criterion,
                          allocation=allocation, repair=args.repair, seed=args.seed, calib_samples=args.calib_samples,
                          rules=rules)


def add_sensitivity_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model")
    p.add_argument("--criterion", default="l1", help="importance criterion used to order channels")
    p.add_argument("--ratios", default="0.1,0.25,0.5,0.75", help="comma-separated ratios in (0, 1)")
    p.add_argument("--plot", help="PNG path (default: MODEL.sensitivity.png beside the input)")
    p.add_argument("--allow-inexact", action="store_true", help="include LayerNorm/softmax-coupled groups and MoE experts")
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
    """--repair, --calib, --calib-samples; `unconstrained`: the command has --mode, which adds repair `mean`."""
    repairs = ("none", "bias", "ls", "seq") + (("mean",) if unconstrained else ())
    text = ("after removal: none, bias (data-free, BatchNorm stats), ls (calibrated least squares), "
            "seq (ls fitted layer by layer on the pruned model's own activations)")
    if unconstrained:
        text += ("; --mode unconstrained: none, mean (calibrated output means), ls or seq (each layer's kept "
                 "channels refitted), all need --calib")
    p.add_argument("--repair", default="none", choices=repairs, help=text)
    p.add_argument("--calib", metavar="FILE.npz", help="calibration inputs: .npz, keys = input names, axis 0 = samples; "
                   "or synthetic[:N]: N inputs distilled from the model's BatchNorm statistics (data-free; default: "
                   "as many as fit a 90 s budget, up to 256)")
    p.add_argument("--calib-samples", type=positive_int, default=samples, metavar="N",
                   help="use the first N samples" + ("" if samples is not None else " (default: all)"))


def check_prune_flags(args: argparse.Namespace) -> float:
    """Refuse contradicting prune flags (UsageError, exit 2) and return the ratio to use.

    ``--ratio`` and a target (or two targets) both say how much to remove; ``--rpc`` needs
    ``--device-key``; ``--global`` is ``--allocation global`` and
    contradicts any other allocation.
    """
    names = ("target_params", "target_macs", "target_latency")
    targets = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name, None)]
    if args.ratio is not None and targets:
        raise UsageError(f"--ratio and {targets[0]} both say how much to remove: give one of them")
    if len(targets) > 1:
        raise UsageError(f"{targets[0]} and {targets[1]} both say how much to remove: give one of them")
    if getattr(args, "rpc", None) and not getattr(args, "device_key", None):
        raise UsageError("--rpc needs --device-key (the key the device registered with the tracker)")
    if getattr(args, "steps", 1) != 1 and getattr(args, "mode", None) == "unconstrained":
        raise UsageError("--steps applies to constrained pruning only (not --mode unconstrained)")
    if getattr(args, "relu_refit", False) and getattr(args, "repair", None) != "seq":
        raise UsageError("--relu-refit refines the sequential repair: it needs --repair seq")
    if getattr(args, "refine", 0) and getattr(args, "mode", None) == "unconstrained":
        raise UsageError("--refine applies to constrained pruning only (not --mode unconstrained)")
    if getattr(args, "refine", 0) and not getattr(args, "calib", None):
        raise UsageError("--refine needs calibration inputs: pass --calib FILE.npz or --calib synthetic[:N]")
    if args.global_ranking and args.allocation not in (None, "global"):
        raise UsageError(f"--global means --allocation global: it contradicts --allocation {args.allocation}")
    if args.ratio is None and not targets and (getattr(args, "sparsity", None) is not None or getattr(args, "pattern", None)):
        return 0.0  # --sparsity alone zeroes weights and removes no channel
    return DEFAULT_RATIO if args.ratio is None else args.ratio
