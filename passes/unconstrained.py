"""The unconstrained pruning pass (UPSCALE): coupled layers keep different channels; exact export.

The algorithm lives in `onnxprune.upscale` (its package docstring explains it and says where to start
reading); `UnconstrainedPass.call` runs its steps in order — plan (per-group counts from the allocation or
the parameter target, `upscale.allocate`), optional calibrated repair (`upscale.repair`), layout, export —
and reports what it did in an `UnconstrainedSummary` (its artifact; ``info["summary"]`` is its `as_dict`,
printed by the CLI and stamped into the model's metadata). The summary holds every key of constrained
pruning's `PruneSummary` that means the same here (sizes and MACs before and after, the input's groups and
barriers), so both modes print and serialise alike; ``info["plan"]`` is what `upscale.oracle.mask_model`
needs to build the model the export must equal.

Best configuration with calibration data (pretrained CIFAR-10 ResNet20/44, all 10,000 test images, 256
calibration images, equal parameters, l2 + ``repair="seq"`` in both modes, `bench/unconstrained_cifar.py`):
``drive="coupled", reader_choice="ls", stream_repair=True`` (CLI ``--drive coupled --reader-choice ls
--stream-repair``): R20 90.07 / 86.27 vs constrained 89.60 / 85.12 at 20% / 40% of parameters removed, R44
89.27 vs 87.73 at 40% (without ``stream_repair``: 90.00 / 86.00 and 88.75; R44 at 20%: 91.89 vs 91.14).
With ``allocation="knapsack"`` as well (`upscale.allocate`: measured error per parameter removed; CLI
``--allocation knapsack``; 2,000 calibration images, session 22): R20 90.83 / 87.47 vs constrained l2 + seq
90.05 / 86.09 (uniform allocation: 90.30 / 86.66), R44 92.34 / 90.17 vs 91.14 / 88.12: the best configuration
(`bench/accuracy_real.py` ``UNCONSTRAINED_BEST``).
``drive="free"`` loses on R20 (89.29 / 83.53): writers keep rows no reader reads and readers read stream
channels some writers dropped (`upscale.coupled` explains it). Data-free (2,000 test images, l1/energy):
``criterion="energy", drive="free"`` beats the same ranking constrained (``share=1``), 67.1 vs 64.3 and 28.3
vs 20.7. Mean repair hurts unconstrained plans (energy free at 40%: 28.3 -> 21.1) while helping constrained
ones (20.7 -> 22.9): it restores each layer's output mean, not the stream channels only some writers dropped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import onnx

from onnxprune.allocation import parse_target
from onnxprune.calibration_data import CalibLike, as_calibration
from onnxprune.errors import UsageError
from onnxprune.graph import ModelGraph
from onnxprune.importer import check_model, infer_shapes
from onnxprune.metadata import stamp
from onnxprune.metrics import count_macs, count_params
from onnxprune.passes.select import channel_analysis
from onnxprune.passmanager import Pass, PassResult, Summary
from onnxprune.quantized import check_no_quantized_weights
from onnxprune.upscale.allocate import allocate, knapsack_curves, split_group_ids
from onnxprune.upscale.config import UnconstrainedConfig
from onnxprune.upscale.export import export
from onnxprune.upscale.layout import optimize_layout
from onnxprune.upscale.plan import Prepared, build_plan, prepare, unit_key
from onnxprune.upscale.records import UnconstrainedPlan
from onnxprune.upscale.repair import repair_plan
from onnxprune.upscale.report import copy_report, effective_params
from onnxprune.upscale.tuning import tune_layout
from onnxprune.version import __version__

__all__ = ["UnconstrainedPass", "UnconstrainedSummary"]

MODE = "unconstrained"


@dataclass(frozen=True)
class UnconstrainedSummary(Summary):
    """What one run of `UnconstrainedPass` did (its `PassResult` artifact); `as_dict` gives ``info["summary"]``."""

    config: UnconstrainedConfig
    params_before: int
    params_after: int  # stored, including the zero rows/columns of absorbed units
    effective_params_after: int  # nonzero
    macs_before: int
    macs_after: int  # of the stored weights (zero rows/columns count), batch 1
    groups: int  # coupled groups of the input (its channel analysis)
    group_sizes: dict[str, int]  # group id -> channels before pruning
    barriers: list[dict]  # of the input's channel analysis
    groups_pruned: int
    units: int
    boundaries: int
    layout: dict[str, int]  # units narrowed / absorbed / contiguous / scattered ({} for the naive export)
    tuned: dict | None  # tune > 0: {"ms": {candidate: median ms}, "chosen": candidate}
    copies: dict  # `upscale.report.copy_report` of the export
    seconds: float
    repair: dict | None = None  # `RepairReport.as_dict` of the repair (None: repair "none" or nothing pruned)

    def as_dict(self) -> dict:
        """The JSON record (keys in the order the CLI prints them)."""
        return {
            "tool": f"onnxprune {__version__}",
            "mode": MODE,
            "config": {k: v for k, v in asdict(self.config).items() if k != "cost"},
            "params_before": self.params_before,
            "params_after": self.params_after,
            "effective_params_after": self.effective_params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "groups": self.groups,
            "group_sizes": self.group_sizes,
            "barriers": self.barriers,
            "repair": self.repair,
            "groups_pruned": self.groups_pruned,
            "units": self.units,
            "boundaries": self.boundaries,
            "layout": self.layout,
            "tuned": self.tuned,
            "copies": self.copies,
            "seconds": self.seconds,
        }


class UnconstrainedPass(Pass):
    """Unconstrained pruning with an exact export; `info` has the summary, the plan and the copy report.

    Args:
        config: the options (`upscale.config.UnconstrainedConfig`).
        keeps: optional ``{(group id, piece id): bool mask}`` fixing units' kept channels (tests).
        calib: calibration inputs ``{input name: array}``, needed by the repairs (mean, ls, seq).
    """

    def __init__(self, config: UnconstrainedConfig | None = None, keeps: dict | None = None,
                 calib: CalibLike | None = None) -> None:  # fmt: skip
        self.config = config or UnconstrainedConfig()
        self.keeps = keeps
        data = as_calibration(calib)  # CalibrationData is welcome too; this pass reads the arrays
        self.calib = data.arrays if data is not None else None
        if self.config.repair != "none" and calib is None:
            raise UsageError(f"unconstrained repair {self.config.repair!r} needs calibration inputs (calib={{input: array}})")

    def allocation_inputs(self, model: onnx.ModelProto, prep: Prepared) -> tuple:
        """`allocate`'s target, allowed counts and (knapsack) error curves for `model`, analysed as `prep`."""
        c = self.config
        target = parse_target(str(c.target_params), count_params(ModelGraph(model)), "params") \
            if c.target_params is not None else None  # fmt: skip
        curves = None
        if c.allocation == "knapsack":
            if self.calib is None:
                raise UsageError("unconstrained allocation 'knapsack' measures errors: it needs calibration inputs")
            curves = knapsack_curves(model, prep, c, self.calib)
        return target, self._allowed(model, prep), curves

    def call(self, model: onnx.ModelProto) -> PassResult:
        start = time.perf_counter()
        c = self.config
        if c.ratio == 0 and c.target_params is None and not self.keeps:
            summary = self._summary(model, model, None, {}, None, start)
            return PassResult(model, False, {"summary": summary.as_dict()}, (summary,))
        check_no_quantized_weights(ModelGraph(model), "--mode unconstrained")
        if self.keeps:
            plan = build_plan(model, c, self.keeps)
        else:
            prep = prepare(model, c, self.calib if c.measure else None)
            plan, _ = allocate(prep, c, *self.allocation_inputs(model, prep))
        report = None
        if c.repair != "none":
            assert self.calib is not None  # checked in __init__
            repaired, report = repair_plan(model, plan, c.repair, self.calib, stream=c.stream_repair,
                                           choose_readers=c.reader_choice == "seq", relu_refit=c.relu_refit)
            # Repair changes values (and may add a bias input), so the re-analysed units are found by name.
            keeps = {unit_key(pc): pc.keep for gp in plan.groups for pc in gp.pieces if pc.is_unit}
            plan = build_plan(repaired, c, keeps)
        if c.reorder and c.tune:
            layout, pruned, tuned = tune_layout(plan, c)
        else:
            layout = optimize_layout(plan, c) if c.reorder else {}
            # The reordered export's few remaining scatters use Pad+Gather (cheaper than ScatterND here).
            scatter = "pad_gather" if c.reorder else c.naive
            pruned = infer_shapes(export(plan, contiguous_ops=c.reorder, scatter=scatter))
            tuned = None
        check_model(pruned)
        # the mean repair keeps no record (it restores every layer's output mean)
        repair = report.as_dict() if report is not None and c.repair != "mean" else None
        summary = self._summary(model, pruned, plan, layout, tuned, start, repair)
        record = summary.as_dict()
        # Stamped here, not by a `StampInstrument`: callers running the pass alone get the record too.
        stamp(pruned, record)
        return PassResult(pruned, True, {"summary": record, "plan": plan, "copies": summary.copies}, (summary,))

    def _allowed(self, model: onnx.ModelProto, prep: Prepared) -> dict[int, tuple[int, ...]] | None:
        """``config.keep_counts`` (keyed by the input's group ids) keyed by the split model's group ids."""
        if not self.config.keep_counts:
            return None
        ids = split_group_ids(channel_analysis(model), prep.analysis)
        return {ids[gid]: tuple(counts) for gid, counts in self.config.keep_counts.items() if gid in ids}

    def _summary(self, model: onnx.ModelProto, pruned: onnx.ModelProto, plan: UnconstrainedPlan | None,
                 layout: dict[str, int], tuned: dict | None, start: float,
                 repair: dict | None = None) -> UnconstrainedSummary:  # fmt: skip
        """The record of one run; `plan` None: nothing was pruned (`pruned` is `model`)."""
        analysis = channel_analysis(model)  # the input's groups and barriers, as constrained pruning sees them
        before, after = ModelGraph(model), ModelGraph(pruned)
        return UnconstrainedSummary(
            config=self.config,
            params_before=count_params(before),
            params_after=count_params(after),
            effective_params_after=effective_params(pruned),
            macs_before=count_macs(before),
            macs_after=count_macs(after),
            groups=len(analysis.groups),
            group_sizes={str(g.id): g.size for g in analysis.groups},
            barriers=[b.as_dict() for b in analysis.barriers],
            groups_pruned=len(plan.groups) if plan is not None else 0,
            units=sum(pc.is_unit for gp in plan.groups for pc in gp.pieces) if plan is not None else 0,
            boundaries=plan.boundaries if plan is not None else 0,
            layout=layout,
            tuned=tuned,
            copies=copy_report(pruned),
            seconds=round(time.perf_counter() - start, 3),
            repair=repair,
        )
