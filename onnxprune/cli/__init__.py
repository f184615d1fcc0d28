"""Command line: a thin composition of the importer and passes.

    onnxprune MODEL.onnx                 same as `onnxprune prune MODEL.onnx`
    onnxprune analyze MODEL.onnx [--json] [--graph OUT.graphml|OUT.json]
    onnxprune prune MODEL.onnx [-o OUT] [--ratio R | --target-latency 0.6x] [--round-to auto|N] [--criterion C] [--json]
    onnxprune sensitivity MODEL.onnx [--calib FILE.npz] [--ratios R1,R2,...] [--plot OUT.png] [--json]
    onnxprune report MODEL.pruned.onnx [-o OUT.html] [--original MODEL.onnx] [--json]

Each command loads the model (`importer.load_model`), then runs a pipeline of passes through `PassManager`,
starting with `NormalizePass`; `prune` runs normalize -> select channels -> repair -> remove -> check with a
`StampInstrument` writing the summary into the output model, then (`--verify`, on by default for models
whose check is cheap) certifies the result (`certificate`) before writing it. Usage errors that need no
model (a bad criterion, a missing --calib, contradicting flags) come before the model is read. The flags
are defined in `cli_options`; progress of long steps goes to stderr on a terminal (`progress`). `prune` (both
modes, verification, latency of the written model) lives in `cli.prune`, what every command shares (reading the
model and calibration data, the pipeline, JSON or text output) in `cli.common`.

Exit codes: 0 success, 1 model, data or run error (a missing or bad model or calibration file, an output
that cannot be written, a failed verification), 2 usage error; errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from onnxprune import cli_options as opts
from onnxprune.cli.common import emit, load_calibration, load_input, make_pipeline, normalize_pass
from onnxprune.cli.prune import cmd_prune
from onnxprune.errors import OnnxPruneError, UsageError
from onnxprune.version import __version__

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

SUBCOMMANDS = ("analyze", "prune", "compile", "run", "sensitivity", "report")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand (``compile`` and ``run`` come from `onnxprune.targets.cli`)."""
    parser = opts.Parser(prog="onnxprune", description="Structured channel pruning for any ONNX model.",
                         formatter_class=opts.DefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=opts.Parser)
    commands = (
        ("analyze", "coupled channel groups, prunable params and MACs, barriers", opts.add_analyze_options,
         cmd_analyze),
        ("prune", "remove channels and write the pruned model", opts.add_prune_options, cmd_prune),
        ("sensitivity", "per-group output error vs ratio (table and PNG plot)", opts.add_sensitivity_options,
         cmd_sensitivity),
        ("report", "an HTML report of a pruned model (sizes, settings, verification, kept channels)",
         opts.add_report_options, cmd_report),
    )
    for name, text, add_options, func in commands:
        p = sub.add_parser(name, help=text, description=text)
        add_options(p)
        p.set_defaults(func=func)
    try:
        from onnxprune.targets import cli as targets_cli
    except ImportError:
        targets_cli = None
    if targets_cli is not None and hasattr(targets_cli, "register"):
        targets_cli.register(sub)
    for p in sub.choices.values():  # every subcommand's --help states its defaults
        p.formatter_class = opts.DefaultsHelpFormatter
    return parser

def cmd_analyze(args: argparse.Namespace) -> int:
    from onnxprune.channels import ChannelAnalysis
    from onnxprune.metrics import count_macs, count_params
    from onnxprune.passes.select import AnalyzeChannelsPass

    if args.graph:
        from onnxprune.depgraph import FORMATS

        if Path(args.graph).suffix.lower() not in FORMATS:  # fail before reading the model
            raise UsageError(f"--graph {args.graph}: must end in .graphml or .json")
        if not Path(args.graph).parent.is_dir():
            raise OnnxPruneError(f"{args.graph}: output folder does not exist")
    model = load_input(args)
    analysis = make_pipeline([normalize_pass(), AnalyzeChannelsPass(args.allow_inexact)]).run(model).get(ChannelAnalysis)
    assert analysis is not None  # AnalyzeChannelsPass's artifact
    graph = analysis.graph
    result = {
        "input": args.model,
        "params": count_params(graph),
        "macs": count_macs(graph),
        "prunable_params": analysis.prunable_params,
        "groups": [g.as_dict() for g in analysis.groups],
        "barriers": [b.as_dict() for b in analysis.barriers],
        "frozen_weights": analysis.frozen_weights(),
        "graph": None,  # the --graph path when one was written
    }
    if args.graph:
        from onnxprune.depgraph import write_graph

        result["graph"] = str(write_graph(analysis, args.graph))

    def text() -> None:
        from onnxprune.report import print_analysis

        print_analysis(result, analysis)
        if args.graph:
            print(f"graph: {result['graph']}")

    emit(result, args, text)
    return 0

def cmd_sensitivity(args: argparse.Namespace) -> int:
    import numpy as np

    from onnxprune.calibration import CalibrationData, check_calib
    from onnxprune.passes.config import PruneConfig, check_data
    from onnxprune.passes.select import SensitivityReport, calibration_statistics
    from onnxprune.sensitivity import plot, sensitivity

    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        raise UsageError(f"--ratios must be comma-separated numbers, got {args.ratios!r}") from None
    if not ratios or not all(0 < r < 1 for r in ratios):
        raise UsageError(f"--ratios must lie in (0, 1), got {args.ratios!r}")
    src = Path(args.model)
    png = Path(args.plot) if args.plot else src.with_name(src.name.removesuffix(".onnx") + ".sensitivity.png")
    if not png.parent.is_dir():  # fail before the measurement, like every output
        raise OnnxPruneError(f"{png}: output folder does not exist")
    config = PruneConfig(criterion=args.criterion, repair=args.repair)
    check_data(config, has_calib=bool(args.calib))
    model = make_pipeline([normalize_pass()]).run(load_input(args)).model
    data = load_calibration(args, model)
    if data is None:
        from onnxprune.verify import random_inputs

        print("onnxprune: note: no --calib: measuring on 8 random inputs", file=sys.stderr)
        samples = [random_inputs(model, seed=i) for i in range(8)]
        data = check_calib(CalibrationData({k: np.concatenate([s[k] for s in samples]) for k in samples[0]}), model)
    stats = calibration_statistics(config, model, data)
    rows = sensitivity(model, data, ratios, args.criterion, args.repair, stats, args.allow_inexact)
    try:
        plot(rows, ratios, png, title=f"{src.name}: sensitivity ({args.criterion}, repair {args.repair})")
    except OSError as exc:
        raise OnnxPruneError(f"{png}: cannot write ({exc.strerror or exc})") from None
    result = {"input": str(src), "plot": str(png), **SensitivityReport(tuple(ratios), tuple(rows)).as_dict()}

    def text() -> None:
        from onnxprune.report import print_sensitivity

        print_sensitivity(rows, ratios, args.criterion, args.repair)
        print(f"plot: {png}")

    emit(result, args, text)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from onnxprune.html_report import original_mismatch, write_report

    path = write_report(args.model, args.output, args.original)
    mismatch = original_mismatch(args.model, args.original) if args.original else None
    if mismatch:
        print(f"onnxprune: note: {mismatch}", file=sys.stderr)
    emit({"report": str(path)}, args, lambda: print(f"report: {path}"))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Library warnings are silenced: output is results or one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _main(argv)


def _run(args: argparse.Namespace) -> int:
    """The command, with progress of long steps on stderr when it is a terminal and no --json was asked."""
    from onnxprune.progress import progress_to_stderr

    with progress_to_stderr(sys.stderr.isatty() and not getattr(args, "json", False)):
        code = int(args.func(args) or 0)
    sys.stdout.flush()  # inside the handlers below: a closed pipe is seen here, not at exit
    return code


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--version"]:  # answered without building the parser (which imports the targets' table)
        print(f"onnxprune {__version__}")
        return 0
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
        return _run(args)
    except BrokenPipeError:
        # The reader went away (`onnxprune analyze M | head`): not an error. Later writes (and the
        # interpreter's final flush) go to /dev/null, as Python's documentation recommends.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
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
