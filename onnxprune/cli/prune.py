"""`onnxprune prune`: the constrained pipeline (select -> repair -> remove -> refine / sparsify -> check), the
unconstrained one (`--mode unconstrained`), and what both share: the output path, verification and its
certificate, latency measurement of the written model and the summary."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxprune import cli_options as opts
from onnxprune.cli.common import (
    batch_notice,
    emit,
    load_calibration,
    load_input,
    make_pipeline,
    normalize_pass,
)
from onnxprune.errors import OnnxPruneError, UsageError, missing_calibration
from onnxprune.report import prune_record

if TYPE_CHECKING:
    import onnx

    from onnxprune.calibration import CalibrationData
    from onnxprune.certificate import Certificate
    from onnxprune.passmanager import Pass

__all__ = ["cmd_prune"]


def _output_path(args: argparse.Namespace) -> tuple[Path, Path]:
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

    src, out = _output_path(args)
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

    cert = _verify(args, normalized, result.model, check)
    latency = _latency(config, result.get(ChannelSelection), normalized, result.model)
    if latency is not None and "not_measured" in latency:
        notice, latency = f"latency not measured: {latency['not_measured']}", None
        summary_record = _WithNotice(summary_record, notice)
    if latency is not None:  # the stored summary says how fast the model measured, too
        from onnxprune.metadata import stamp

        stamp(result.model, {**summary_record.as_dict(), "latency": latency})
    if batch_note:
        summary_record = _WithNotice(summary_record, batch_note)
    keep_external = has_lazy(normalized) or None  # weights came in a data file: write them to one too
    save_model(result.model, out, external_data=keep_external)
    refined = result.get(RefineReport)  # --refine: epochs, steps, distillation loss before / after, seconds
    summary = prune_record({"input": str(src), "output": str(out), **summary_record.as_dict(),
                            "verification": cert.as_dict() if cert is not None else None, "latency": latency,
                            "refine": refined.as_dict() if refined is not None else None})
    emit(summary, args, lambda: _print_summary(summary, shown))
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


@dataclass(frozen=True)
class _WithNotice:
    """A summary record with one more notice (why latency was not measured, a fixed batch)."""

    record: Any
    notice: str

    def as_dict(self) -> dict:
        d = self.record.as_dict()
        return {**d, "notices": [*d.get("notices", []), self.notice]}


def _print_summary(summary: dict, shown: tuple[str, ...] = ()) -> None:
    from onnxprune.report import print_prune_summary

    print_prune_summary(summary, shown)


def _verify(
    args: argparse.Namespace, original: onnx.ModelProto, pruned: onnx.ModelProto, check: Callable[[], Certificate]
) -> Certificate | None:
    """Run `check` when verification is on and store its passing certificate in `pruned`; None when off.

    A failed check is an error (exit 1; the caller writes nothing). A check that cannot run at all (the
    original does not run in onnxruntime) is an error only with an explicit --verify, else a note.
    """
    from onnxprune.certificate import VerificationUnavailable
    from onnxprune.progress import task

    if not _wants_verification(args, original):
        return None
    try:
        with task("verifying in onnxruntime"):
            cert = check()
    except VerificationUnavailable as exc:
        if args.verify:
            raise
        print(f"onnxprune: note: not verified: {str(exc).removeprefix('verification: ')}", file=sys.stderr)
        return None
    _store_if_passed(pruned, cert)
    return cert


def _wants_verification(args: argparse.Namespace, model: onnx.ModelProto) -> bool:
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


def _store_if_passed(pruned: onnx.ModelProto, cert: Certificate) -> None:
    """Store the certificate in the pruned model's metadata, or fail (exit 1) so that nothing is written."""
    from onnxprune.certificate import store

    if not cert.passed:
        raise OnnxPruneError(f"verification failed: max error {cert.exact_max_error:.3g} > tolerance "
                             f"{cert.tolerance:.3g} (the pruned model does not compute what the original computes "
                             "with the removed channels silenced; nothing was written)")
    store(pruned, cert)


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
                                 allocation=args.allocation or ("global" if args.global_ranking else "uniform"),
                                 target_params=args.target_params, group_budget=args.group_budget,
                                 reader_choice=args.reader_choice, stream_repair=args.stream_repair)
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

    cert = _verify(args, normalized, result.model, check)
    save_model(result.model, out)
    met = met_target_notice(args.target_params, summary_record.params_before, "params")
    summary = prune_record({"input": str(src), "output": str(out), **summary_record.as_dict(),
                            "verification": cert.as_dict() if cert is not None else None,
                            "notices": [n for n in (batch_note, met) if n]})
    emit(summary, args, lambda: _print_summary(summary, (batch_note,) if batch_note else ()))
    return 0
