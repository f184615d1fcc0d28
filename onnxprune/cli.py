"""Command line: a thin composition of the importer and passes.

    onnxprune MODEL.onnx                 same as `onnxprune prune MODEL.onnx`
    onnxprune analyze MODEL.onnx [--json] [--graph OUT.graphml|OUT.json]
    onnxprune prune MODEL.onnx [-o OUT] [--ratio R] [--global] [--round-to N] [--criterion C] [--json]

Each command loads the model (`importer.load_model`), then runs a pipeline of passes through `PassManager`,
starting with `NormalizePass`; `prune` runs normalize -> select channels -> repair -> remove -> check with a
`StampInstrument` writing the summary into the output model. Usage errors that need no model (a bad
criterion, a missing --calib) come before the model is read.

Exit codes: 0 success, 1 model or run error, 2 usage error; errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from onnxprune.errors import OnnxPruneError, UsageError
from onnxprune.version import __version__

SUBCOMMANDS = ("analyze", "prune", "compile", "run", "sensitivity")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        raise UsageError(message)


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1), got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxprune", description="Structured channel pruning for any ONNX model.")
    parser.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("analyze", help="coupled channel groups, prunable params and MACs, barriers")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--allow-inexact", action="store_true", help="include LayerNorm/softmax-coupled groups")
    p.add_argument("--graph", metavar="OUT.graphml|OUT.json",
                   help="also write the dependency graph annotated with the groups (GraphML or node-link JSON)")
    _add_shape_option(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("prune", help="remove channels and write the pruned model")
    p.add_argument("model")
    p.add_argument("-o", "--output", help="output path (default: MODEL.pruned.onnx beside the input)")
    p.add_argument("--ratio", type=_ratio, default=0.3, help="fraction of channels to remove per group [0, 1)")
    p.add_argument("--global", dest="global_ranking", action="store_true", help="rank channels across groups")
    p.add_argument("--round-to", type=_positive_int, default=1, help="keep a multiple of N channels")
    p.add_argument("--criterion", default="l1",
                   help="importance: l1, l2, bn, random, fpgm, lamp, activation, apoz, obs")
    p.add_argument("--seed", type=int, default=0, help="seed for the random criterion")
    p.add_argument("--allow-inexact", action="store_true", help="also prune LayerNorm/softmax-coupled groups")
    p.add_argument("--mode", choices=("constrained", "unconstrained"), default="constrained",
                   help="unconstrained: each coupled layer keeps its own channels (UPSCALE export)")
    p.add_argument("--share", type=float, default=0.0,
                   help="unconstrained: blend of each layer's ranking with the group's shared one (0..1; 1 = constrained)")
    p.add_argument("--union-cap", type=float, default=None,
                   help="unconstrained: the stream keeps at most this x the per-layer kept channels (>= 1)")
    p.add_argument("--drive", choices=("free", "writer", "reader"), default="free",
                   help="unconstrained: free = every layer its own top channels; writer = readers choose among what "
                        "reaches them; reader = writers keep what their readers read")
    p.add_argument("--no-reorder", action="store_true",
                   help="unconstrained: naive export (original order, ScatterND/Gather copies)")
    p.add_argument("--tune", type=int, default=0, metavar="N",
                   help="unconstrained: time a few copy/absorb layouts in onnxruntime (N runs each), keep the fastest")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_accuracy_options(p)
    _add_shape_option(p)
    p.add_argument("--allocation", choices=("uniform", "global", "lamp", "sensitivity"),
                   help="how groups share the removal (sensitivity: measured per-group output error, needs --calib)")
    p.add_argument("--target-params", help="parameters to keep: a count N or a percentage P%%")
    p.add_argument("--target-macs", help="MACs to keep: a count N or a percentage P%%")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("sensitivity", help="per-group output error vs ratio (table and PNG plot)")
    p.add_argument("model")
    p.add_argument("--criterion", default="l1", help="importance criterion used to order channels")
    p.add_argument("--ratios", default="0.1,0.25,0.5,0.75", help="comma-separated ratios in (0, 1)")
    p.add_argument("--plot", help="PNG path (default: MODEL.sensitivity.png beside the input)")
    p.add_argument("--allow-inexact", action="store_true", help="include LayerNorm/softmax-coupled groups")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_accuracy_options(p, samples=32)
    p.set_defaults(func=cmd_sensitivity)

    try:
        from onnxprune.targets import cli as targets_cli
    except ImportError:
        targets_cli = None
    if targets_cli is not None and hasattr(targets_cli, "register"):
        targets_cli.register(sub)
    return parser


def _add_shape_option(p) -> None:
    p.add_argument("--shape", action="append", metavar="NAME=D1,D2,...",
                   help="fix a dynamic input's sizes (repeatable); lets run-time shape arithmetic fold")


def _add_accuracy_options(p, samples: int | None = None) -> None:
    p.add_argument("--repair", default="none", choices=("none", "bias", "ls", "seq", "mean"),
                   help="after removal: none, bias (data-free, BatchNorm stats), ls (calibrated least squares), "
                        "seq (ls fitted layer by layer on the pruned model's own activations); "
                        "--mode unconstrained: none or mean (calibrated output means, needs --calib)")
    p.add_argument("--calib", help="calibration inputs: .npz, keys = input names, axis 0 = samples")
    p.add_argument("--calib-samples", type=_positive_int, default=samples, help="use the first N samples")


def _calib(args, model):
    if not getattr(args, "calib", None):
        return None
    from onnxprune.calibration import load_calib

    return load_calib(args.calib, model, args.calib_samples)


def _load(args):
    """The model file as stored, with any --shape sizes fixed (normalisation is the pipeline's first pass)."""
    from onnxprune.importer import fix_input_shapes, load_model, parse_shapes

    shapes = parse_shapes(getattr(args, "shape", None))  # a bad --shape is a usage error, before reading
    model = load_model(args.model)
    if shapes:
        fix_input_shapes(model, shapes)
    return model


def _pipeline(passes, args, *instruments):
    """The passes as one `PassManager`, with a progress line on a terminal (never with --json)."""
    from onnxprune.passmanager import PassManager, ProgressInstrument

    progress = ProgressInstrument(enabled=None if not getattr(args, "json", False) else False)
    return PassManager(passes, instruments=[*instruments, progress])


def _normalize():
    from onnxprune.passes.normalize import NormalizePass

    return NormalizePass(inplace=True)  # the CLI owns the freshly loaded model: no copy of its weights


def cmd_analyze(args) -> int:
    from onnxprune.channels import ChannelAnalysis
    from onnxprune.metrics import count_macs, count_params
    from onnxprune.passes.select import AnalyzeChannelsPass

    if args.graph:
        from onnxprune.depgraph import FORMATS

        if Path(args.graph).suffix.lower() not in FORMATS:  # fail before reading the model
            raise UsageError(f"--graph {args.graph}: must end in .graphml or .json")
    model = _load(args)
    result = _pipeline([_normalize(), AnalyzeChannelsPass(args.allow_inexact)], args).run(model)
    analysis = result.get(ChannelAnalysis)
    graph = analysis.graph
    result = {
        "input": args.model,
        "params": count_params(graph),
        "macs": count_macs(graph),
        "prunable_params": analysis.prunable_params,
        "groups": [g.as_dict() for g in analysis.groups],
        "barriers": [b.as_dict() for b in analysis.barriers],
        "frozen_weights": analysis.frozen_weights(),
    }
    if args.graph:
        from onnxprune.depgraph import write_graph

        result["graph"] = str(write_graph(analysis, args.graph))
    if args.json:
        print(json.dumps(result))
    else:
        from onnxprune.report import print_analysis

        print_analysis(result, analysis)
        if args.graph:
            print(f"graph: {result['graph']}")
    return 0


def cmd_prune(args) -> int:
    from onnxprune.external import has_lazy, referenced_files
    from onnxprune.io import save_model
    from onnxprune.passes.cleanup import CheckPass
    from onnxprune.passes.config import PruneConfig, check_data
    from onnxprune.passes.remove import PruneSummary, RemoveChannelsPass
    from onnxprune.passes.repair import RepairChannelsPass
    from onnxprune.passes.select import SelectChannelsPass
    from onnxprune.passmanager import StampInstrument

    src = Path(args.model)
    out = Path(args.output) if args.output else src.with_name(src.name.removesuffix(".onnx") + ".pruned.onnx")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise UsageError("output path equals the input path; the input is never overwritten")
    if out.exists() and out.resolve() in referenced_files(src):
        raise UsageError("output path is an external data file of the input; the input is never overwritten")
    if args.mode == "unconstrained":
        return _prune_unconstrained(args, src, out)
    if (args.repair == "mean" or args.share or args.union_cap is not None or args.no_reorder or args.tune
            or args.drive != "free"):
        raise UsageError("--repair mean, --share, --union-cap, --drive, --no-reorder and --tune apply to --mode "
                         "unconstrained only")
    config = PruneConfig(
        ratio=args.ratio, criterion=args.criterion, global_ranking=args.global_ranking,
        round_to=args.round_to, allow_inexact=args.allow_inexact, seed=args.seed, repair=args.repair,
        allocation=args.allocation, target_params=args.target_params, target_macs=args.target_macs,
        calib_samples=args.calib_samples,
    )
    for notice in check_data(config, has_calib=bool(args.calib)):  # bad criterion / missing --calib: before loading
        print(f"onnxprune: note: {notice}", file=sys.stderr)
    model = _load(args)
    calib = _calib(args, model)
    # StampInstrument(always=True): the output says what was done even when nothing was removed.
    pipeline = _pipeline([_normalize(), SelectChannelsPass(config, calib=calib), RepairChannelsPass(calib),
                     RemoveChannelsPass(), CheckPass()], args, StampInstrument(always=True))
    result = pipeline.run(model)
    normalized = result.steps[0][1].model
    keep_external = has_lazy(normalized) or None  # weights came in a data file: write them to one too
    save_model(result.model, out, external_data=keep_external)
    summary = {"input": str(src), "output": str(out), **result.get(PruneSummary).as_dict()}
    if args.json:
        print(json.dumps(summary))
    else:
        from onnxprune.report import print_prune_summary

        print_prune_summary(summary)
    return 0


def cmd_sensitivity(args) -> int:
    import numpy as np

    from onnxprune.calibration import CalibrationData, check_calib
    from onnxprune.passes.config import PruneConfig, check_data
    from onnxprune.passes.select import calibration_statistics
    from onnxprune.sensitivity import plot, sensitivity

    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        raise UsageError(f"--ratios must be comma-separated numbers, got {args.ratios!r}") from None
    if not ratios or not all(0 < r < 1 for r in ratios):
        raise UsageError(f"--ratios must lie in (0, 1), got {args.ratios!r}")
    config = PruneConfig(criterion=args.criterion, repair=args.repair)
    check_data(config, has_calib=bool(args.calib))
    model = _pipeline([_normalize()], args).run(_load(args)).model
    data = _calib(args, model)
    if data is None:
        from onnxprune.verify import random_inputs

        print("onnxprune: note: no --calib: measuring on 8 random inputs", file=sys.stderr)
        samples = [random_inputs(model, seed=i) for i in range(8)]
        data = check_calib(CalibrationData({k: np.concatenate([s[k] for s in samples]) for k in samples[0]}), model)
    stats = calibration_statistics(config, model, data)
    rows = sensitivity(model, data, ratios, args.criterion, args.repair, stats, args.allow_inexact)
    src = Path(args.model)
    png = Path(args.plot) if args.plot else src.with_name(src.name.removesuffix(".onnx") + ".sensitivity.png")
    plot(rows, ratios, png, title=f"{src.name}: sensitivity ({args.criterion}, repair {args.repair})")
    result = {"input": str(src), "plot": str(png), "ratios": ratios,
              "groups": [{"id": r.group, "channels": r.channels, "params": r.params, "members": r.members,
                          "errors": [None if np.isnan(e) else e for e in r.errors]} for r in rows]}
    if args.json:
        print(json.dumps(result))
    else:
        from onnxprune.report import print_sensitivity

        print_sensitivity(rows, ratios, args.criterion, args.repair)
        print(f"plot: {png}")
    return 0


def _prune_unconstrained(args, src: Path, out: Path) -> int:
    """`prune --mode unconstrained`: per-layer kept channels, exact export with reordered channels."""
    from onnxprune.io import save_model
    from onnxprune.passes.unconstrained import UnconstrainedPass
    from onnxprune.upscale.config import UnconstrainedConfig

    if args.criterion not in ("l1", "l2", "energy", "bn"):
        raise UsageError("--mode unconstrained scores each layer by its own weights: --criterion energy, bn, l1 or l2")
    if args.global_ranking or args.round_to != 1 or args.allow_inexact:
        raise UsageError("--global, --round-to and --allow-inexact apply to --mode constrained only")
    for option in ("allocation", "target_params", "target_macs"):
        if getattr(args, option, None) not in (None, "none"):
            raise UsageError(f"--{option.replace('_', '-')} applies to --mode constrained only")
    if args.repair not in ("none", "mean"):
        raise UsageError("--mode unconstrained repairs with --repair none or mean")
    if args.repair == "mean" and not args.calib:
        raise UsageError("--repair mean needs --calib (calibration inputs)")
    config = UnconstrainedConfig(ratio=args.ratio, criterion=args.criterion, share=args.share, union_cap=args.union_cap,
                                 drive=args.drive, reorder=not args.no_reorder, tune=args.tune, repair=args.repair)
    model = _load(args)
    calib = _calib(args, model)
    unconstrained = UnconstrainedPass(config, calib=calib.arrays if calib is not None else None)
    result = _pipeline([_normalize(), unconstrained], args).run(model)
    save_model(result.model, out)
    s = {"input": str(src), "output": str(out), **result.info["summary"]}
    if args.json:
        print(json.dumps(s))
    else:
        from onnxprune.report import print_unconstrained_summary

        print_unconstrained_summary(s)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Library warnings are silenced: output is results or one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _main(argv)


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        argv.insert(0, "prune")  # `onnxprune MODEL.onnx` = `onnxprune prune MODEL.onnx`
    try:
        parser = build_parser()
        if not argv:
            parser.print_help(sys.stderr)
            return 2
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            raise UsageError("missing command")
        return int(args.func(args) or 0)
    except OnnxPruneError as exc:
        print(f"onnxprune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxprune: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("onnxprune: error: out of memory", file=sys.stderr)
        return 1
    except Exception as exc:  # last line of defence: never a traceback (ONNXPRUNE_DEBUG=1 shows it)
        if os.environ.get("ONNXPRUNE_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"onnxprune: internal error: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
