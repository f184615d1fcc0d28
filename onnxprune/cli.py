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
are defined in `cli_options`; progress of long steps goes to stderr on a terminal (`progress`). What the commands
share and needs no pass (reading the model and calibration data, the pipeline, output, verification) is in
`cli_common`, a core module.

Exit codes: 0 success, 1 model, data or run error (a missing or bad model or calibration file, an output
that cannot be written, a failed verification), 2 usage error; errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxprune import cli_options as opts
from onnxprune import process_settings
from onnxprune.cli_common import (
    WithNotice,
    batch_notice,
    emit,
    load_calibration,
    load_input,
    make_pipeline,
    output_path,
    print_summary,
    verify,
)
from onnxprune.errors import OnnxPruneError, UsageError, missing_calibration
from onnxprune.report import prune_record
from onnxprune.version import __version__

if TYPE_CHECKING:
    import onnx

    from onnxprune.calibration import CalibrationData
    from onnxprune.certificate import Certificate
    from onnxprune.passmanager import Pass

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


def normalize_pass() -> Pass:
    """The pipeline's first pass: the freshly loaded model canonicalised in place."""
    from onnxprune.passes.normalize import NormalizePass

    return NormalizePass(inplace=True)  # the CLI owns the freshly loaded model: no copy of its weights


def cmd_prune(args: argparse.Namespace) -> int:
    from onnxprune.external import has_lazy
    from onnxprune.io import save_model
    from onnxprune.passes.cleanup import CheckPass
    from onnxprune.passes.config import PruneConfig, check_data
    from onnxprune.passes.iterative import IterativeSelectPass
    from onnxprune.passes.latency_select import with_latency_allocation
    from onnxprune.passes.refine import RefinePass
    from onnxprune.passes.remove import PruneSummary, RemoveChannelsPass, RemovedChannels
    from onnxprune.passes.repair import RepairChannelsPass
    from onnxprune.passes.select import ChannelSelection, SelectChannelsPass
    from onnxprune.passmanager import StampInstrument
    from onnxprune.refine import RefineConfig, RefineReport

    src, out = output_path(args)
    ratio = opts.check_prune_flags(args)
    sparse = opts.sparsity_config(args)  # --sparsity: a usage error comes before the model is read
    if sparse is not None:
        sparse.check_data(has_calib=bool(args.calib))
    if args.mode == "unconstrained":
        return _prune_unconstrained(args, ratio, src, out)
    if (args.repair == "mean" or args.share or args.union_cap is not None or args.no_reorder or args.tune
            or args.drive is not None or args.group_budget):
        raise UsageError("--repair mean, --share, --union-cap, --drive, --group-budget, --no-reorder and --tune apply "
                         "to --mode unconstrained only")
    config = PruneConfig(
        ratio=ratio, criterion=args.criterion, global_ranking=args.global_ranking,
        round_to=args.round_to, allow_inexact=args.allow_inexact, seed=args.seed, repair=args.repair,
        relu_refit=args.relu_refit, allocation=args.allocation, target_params=args.target_params, target_macs=args.target_macs,
        calib_samples=args.calib_samples, target_latency=args.target_latency, latency_backend=_backend_name(args),
        latency_threads=args.latency_threads, rpc=args.rpc, device_key=args.device_key, latency_cache=args.latency_cache,
    )
    config = with_latency_allocation(config, has_calib=bool(args.calib))  # --target-latency + --calib: knapsack
    _latency_backends(config)
    shown = tuple(check_data(config, has_calib=bool(args.calib)))  # bad criterion / missing --calib: before loading
    for notice in shown:
        print(f"onnxprune: note: {notice}", file=sys.stderr)
    model = load_input(args)
    calib = load_calibration(args, model)
    batch_note = batch_notice(calib)
    if batch_note:
        shown += (batch_note,)
    # StampInstrument(always=True): the output says what was done even when nothing was removed.
    select = (SelectChannelsPass(config, calib=calib) if args.steps == 1
              else IterativeSelectPass(config, args.steps, calib=calib))  # --steps: gradual, re-scored selection
    refine = ([RefinePass(RefineConfig(epochs=args.refine, loss=args.refine_loss, seed=args.seed), calib, model)]
              if args.refine else [])  # teacher: `model`, which NormalizePass canonicalises in place
    pipeline = make_pipeline([normalize_pass(), select, RepairChannelsPass(calib), RemoveChannelsPass(), *refine,
                              *_sparsify(sparse, calib), CheckPass()], StampInstrument(always=True))
    result = pipeline.run(model)
    normalized = result.steps[0][1].model  # the original, canonicalised in place
    summary_record, removed = result.get(PruneSummary), result.get(RemovedChannels)
    assert summary_record is not None and removed is not None  # RemoveChannelsPass's artifacts
    summary_record = _with_sparsity(result, summary_record)

    def check() -> Certificate:
        from onnxprune.certificate import certify

        # with --sparsity the certificate covers the channel removal (SparsifyPass checks its own patterns)
        return certify(normalized, _channels_model(result), removed.analysis, removed.labels, inputs=calib,
                       input_path=src)

    cert = verify(args, normalized, result.model, check)
    latency = _latency(config, result.get(ChannelSelection), normalized, result.model)
    if latency is not None and "not_measured" in latency:
        notice, latency = f"latency not measured: {latency['not_measured']}", None
        summary_record = WithNotice(summary_record, notice)
    if latency is not None:  # the stored summary says how fast the model measured, too
        from onnxprune.metadata import stamp

        stamp(result.model, {**summary_record.as_dict(), "latency": latency})
    if batch_note:
        summary_record = WithNotice(summary_record, batch_note)
    keep_external = has_lazy(normalized) or None  # weights came in a data file: write them to one too
    save_model(result.model, out, external_data=keep_external)
    refined = result.get(RefineReport)  # --refine: epochs, steps, distillation loss before / after, seconds
    summary = prune_record({"input": str(src), "output": str(out), **summary_record.as_dict(),
                            "verification": cert.as_dict() if cert is not None else None, "latency": latency,
                            "refine": refined.as_dict() if refined is not None else None})
    emit(summary, args, lambda: print_summary(summary, shown))
    return 0


def _backend_name(args: argparse.Namespace) -> str:
    """--latency-backend, where --rpc alone means the TVM RPC backend (onnxruntime cannot measure remotely)."""
    return "rpc" if args.rpc and args.latency_backend == "ort" else args.latency_backend


def _latency_backends(config: Any) -> None:
    """Register the compile targets' latency backends (TVM) when the config names one: the core knows only
    onnxruntime, and importing the targets costs time, so only then."""
    if not config.measures_latency or (config.latency_backend.split(":")[0] == "ort" and config.rpc is None):
        return
    try:
        import onnxprune.targets.latency  # noqa: F401  (registers x86, wasm, arm, cuda, rpc)
    except ImportError as exc:
        raise UsageError(f"--latency-backend {config.latency_backend} needs the compile targets (TVM): {exc}") from None


def _latency(config: Any, selection: Any, original: onnx.ModelProto, pruned: onnx.ModelProto) -> dict | None:
    """The summary's ``latency`` record: the latency target's verified measurement, or after auto rounding the
    written model measured against the original; None when nothing was measured or removed, and
    ``{"not_measured": why}`` when the model cannot be measured (it does not run on the backend)."""
    if selection is not None and selection.latency is not None:  # a latency target's verified measurement
        return selection.latency.as_dict()
    if selection is None or selection.latency_table is None or selection.empty:
        return None
    from onnxprune.passes.latency_select import measure_latency, unmeasurable

    why = unmeasurable(original)
    if why is not None:
        return {"not_measured": why}
    try:
        return measure_latency(config, selection.source, selection.plan, selection.latency_table, original,
                               pruned).as_dict()
    except OnnxPruneError as exc:  # the pruned model itself is fine: the summary says why (stderr stays one line)
        if isinstance(exc, UsageError):
            raise
        return {"not_measured": str(exc)}


def _sparsify(config: Any, calib: CalibrationData | None) -> list[Pass]:
    """[SparsifyPass] when --sparsity asked for fine-grained pruning, else []."""
    if config is None:
        return []
    from onnxprune.passes.sparsify import SparsifyPass

    return [SparsifyPass(config, calib)]


def _channels_model(result: Any) -> onnx.ModelProto:
    """The model as the channel removal left it (before any SparsifyPass)."""
    return next(step.model for name, step in result.steps if name == "RemoveChannelsPass")


@dataclass(frozen=True)
class _WithSparsity:
    """The channel summary with the fine-grained step's report under ``sparsity`` (None without --sparsity)."""

    channels: Any
    sparsity: dict | None

    def as_dict(self) -> dict:
        return {**self.channels.as_dict(), "sparsity": self.sparsity}


def _with_sparsity(result: Any, record: Any) -> _WithSparsity:
    """`record` plus the `SparsityReport` of the run; with one, the merged record is stamped into the model."""
    from onnxprune.metadata import stamp
    from onnxprune.sparsity import SparsityReport

    report = result.get(SparsityReport)
    merged = _WithSparsity(record, report.as_dict() if report is not None else None)
    if report is not None:
        stamp(result.model, merged.as_dict())
    return merged


def _latency_grid(args: argparse.Namespace, model: onnx.ModelProto) -> dict[int, tuple[int, ...]] | None:
    """--round-to auto for --mode unconstrained: the latency grid of the (normalised) model's groups."""
    from onnxprune.passes.config import PruneConfig
    from onnxprune.passes.latency_select import latency_grid
    from onnxprune.passes.select import channel_analysis

    config = PruneConfig(round_to="auto", latency_backend=_backend_name(args), latency_threads=args.latency_threads,
                         rpc=args.rpc, device_key=args.device_key, latency_cache=args.latency_cache)
    _latency_backends(config)
    grid, _, _ = latency_grid(config, channel_analysis(model))
    return {gid: tuple(counts) for gid, counts in grid.items()} if grid else None


def _prune_unconstrained(args: argparse.Namespace, ratio: float, src: Path, out: Path) -> int:
    """`prune --mode unconstrained`: per-layer kept channels, exact export with reordered channels."""
    from onnxprune.allocation import met_target_notice
    from onnxprune.io import save_model
    from onnxprune.passes.unconstrained import UnconstrainedPass, UnconstrainedSummary
    from onnxprune.upscale.config import UnconstrainedConfig

    if args.criterion not in ("l1", "l2", "energy", "bn"):
        raise UsageError("--mode unconstrained scores each layer by its own weights: --criterion energy, bn, l1 or l2")
    # --round-to auto (the default): every unit keeps a count of its group's latency grid; N stays constrained-only
    if args.round_to not in (1, "auto") or args.allow_inexact:
        raise UsageError("--round-to and --allow-inexact apply to --mode constrained only")
    for option in ("target_macs", "target_latency"):
        if getattr(args, option, None) not in (None, "none"):
            raise UsageError(f"--{option.replace('_', '-')} applies to --mode constrained only")
    if args.allocation == "sensitivity":
        raise UsageError("--mode unconstrained allocates with --allocation uniform, global, lamp or knapsack")
    if args.allocation == "knapsack" and not args.calib:
        raise missing_calibration("--mode unconstrained --allocation knapsack")
    if args.repair not in ("none", "mean", "ls", "seq"):
        raise UsageError("--mode unconstrained repairs with --repair none, mean, ls or seq")
    if args.repair != "none" and not args.calib:
        raise missing_calibration(f"--mode unconstrained --repair {args.repair}", fallback="--repair none")
    config = UnconstrainedConfig(ratio=ratio, criterion=args.criterion, share=args.share, union_cap=args.union_cap,
                                 drive=args.drive or "coupled", reorder=not args.no_reorder, tune=args.tune, repair=args.repair,
                                 allocation=args.allocation or ("global" if args.global_ranking else None),
                                 target_params=args.target_params, group_budget=args.group_budget,
                                 reader_choice=args.reader_choice, stream_repair=args.stream_repair,
                                 relu_refit=args.relu_refit)
    model = load_input(args)
    calib = load_calibration(args, model)
    batch_note = batch_notice(calib)
    if args.round_to == "auto" and (ratio > 0 or args.target_params is not None):
        model = make_pipeline([normalize_pass()]).run(model).model  # the grid is keyed by the normalised model's groups
        config = dataclasses.replace(config, keep_counts=_latency_grid(args, model))
    unconstrained = UnconstrainedPass(config, calib=calib.arrays if calib is not None else None)
    result = make_pipeline([normalize_pass(), unconstrained]).run(model)
    normalized = result.steps[0][1].model
    summary_record = result.get(UnconstrainedSummary)
    assert summary_record is not None  # UnconstrainedPass's artifact

    def check() -> Certificate:
        from onnxprune.certificate import certify_against
        from onnxprune.upscale.oracle import mask_model

        # The oracle: the original with every layer's own mask applied (the plan's repaired values after
        # --repair mean); with nothing pruned, the original itself.
        plan = result.info.get("plan")
        expected = mask_model(normalized, plan) if plan is not None else normalized
        return certify_against(normalized, expected, result.model, inputs=calib, input_path=src)

    cert = verify(args, normalized, result.model, check)
    save_model(result.model, out)
    met = met_target_notice(args.target_params, summary_record.params_before, "params")
    summary = prune_record({"input": str(src), "output": str(out), **summary_record.as_dict(),
                            "verification": cert.as_dict() if cert is not None else None,
                            "notices": [n for n in (batch_note, met) if n]})
    emit(summary, args, lambda: print_summary(summary, (batch_note,) if batch_note else ()))
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
    process_settings.apply()  # before anything loads numpy and OpenBLAS
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


if __name__ == "__main__":
    sys.exit(main())
