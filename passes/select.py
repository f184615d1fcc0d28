"""Channel selection: analyse the coupled channel groups, score them, allocate the removal; change nothing.

`SelectChannelsPass` is the first pass of constrained pruning (select -> repair -> remove, composed as
`onnxprune.passes.pruning.PrunePass`). Start at `SelectChannelsPass.call`:

1. `channel_analysis` - the model's `ChannelAnalysis` (`channels.analyze`), computed once per model object
   and kept in the running PassManager's `AnalysisCache`, so the passes after it reuse it;
2. `calibration_statistics` - activation statistics, only when the criterion or the repair reads them;
3. `measure_sensitivity` - only for the sensitivity allocation: each group's measured output error
   (`sensitivity.sensitivity`), kept in the selection as a `SensitivityReport` for the summary;
4. `latency_select.latency_grid` - the allowed kept counts per group: every count, the multiples of
   ``round_to``, or with ``round_to="auto"`` the bottoms of the latency steps of the model's latency table
   (built once per model and backend, cached on disk); a latency target builds the table too;
5. `choose_plan` - criterion scores (`criteria`), then the allocation (`plan.make_plan` for uniform/global
   ratios, `allocation` for LAMP budgets, measured sensitivity and parameter/MAC targets): a `PruningPlan`
   whose kept counts lie on the grid; with a latency target `choose_latency_plan` instead (importance per
   millisecond, verified by measurement: `latency_allocation`).

The decision is a `ChannelSelection`: returned as an artifact, and recorded in the cache as the pending
selection of this very model object, which `RepairChannelsPass` and `RemoveChannelsPass` read
(`pending_selection`). The model itself is returned untouched (`modified=False`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxprune import allocation as alloc
from onnxprune import allocation_knapsack as knapsack
from onnxprune.calibration import CalibrationData, CalibrationStats, check_calib, collect_stats, consumers
from onnxprune.calibration_data import CalibLike, as_calibration, fixed_batch
from onnxprune.channels import ChannelAnalysis, ChannelGroup, DimRef, analyze
from onnxprune.criteria import CRITERIA, DATA_CRITERIA, Criterion, Magnitude, get_criterion, member
from onnxprune.dense_rows import DenseRows
from onnxprune.errors import PreconditionError, missing_calibration
from onnxprune.graph import ModelGraph
from onnxprune.latency_allocation import latency_order
from onnxprune.metrics import count_macs, count_params
from onnxprune.passes.config import PruneConfig, check_data
from onnxprune.passes.latency_select import (
    LatencyReport,
    latency_grid,
    plan_for_target_latency,
    rounding_notice,
    weighted_ratio_plan,
    with_latency_allocation,
)
from onnxprune.passmanager import Pass, PassResult, analyses
from onnxprune.plan import KeepCounts, PruningPlan, make_plan
from onnxprune.quantized import FLOAT_WEIGHT_CRITERIA, check_float_weights
from onnxprune.quantized_repair import float_view
from onnxprune.repair import RepairReport, seq_rows_writer
from onnxprune.report import SENSITIVITY_METRIC
from onnxprune.sensitivity import SensitivityRow, sensitivity

if TYPE_CHECKING:
    from onnxprune.latency.table import LatencyTable

    #: `latency_select.latency_grid`'s (kept counts per group, latency table, notices)
    Grid = tuple[KeepCounts | None, LatencyTable | None, tuple[str, ...]]


@dataclass(frozen=True)
class SensitivityReport:
    """Per-group output error measured at a few ratios (`sensitivity.sensitivity`), one row per group."""

    ratios: tuple[float, ...]
    rows: tuple[SensitivityRow, ...]

    def as_dict(self) -> dict:
        """The record ``onnxprune sensitivity --json`` prints and the summary's ``sensitivity`` entry holds
        (the shape `html_report` reads); a ratio that removes no channel has a null error."""
        return {
            "metric": SENSITIVITY_METRIC,
            "ratios": list(self.ratios),
            "groups": [
                {"id": r.group, "channels": r.channels, "params": r.params, "members": r.members,
                 "errors": [None if math.isnan(e) else e for e in r.errors]}
                for r in self.rows
            ],
        }


@dataclass(frozen=True, eq=False)  # holds arrays and analyses: compared by identity
class ChannelSelection:
    """The channels chosen for removal from one model, pending until `RemoveChannelsPass` removes them.

    Attributes:
        config: the config the selection was made with (the repair reads its method here).
        analysis: channel analysis of the model the selection is pending on (re-analysed after a repair).
        labels: component labels, in `analysis`, of the channels to remove.
        plan: group id -> removed channel indices, in the groups of `source`.
        source: channel analysis of the model the selection was made on (before any repair).
        stats: calibration statistics the ``ls`` repair reads, or None (dropped after selection otherwise).
        notices: one-line notices (data-free fallbacks).
        repair: what the repair did, once it ran.
        sensitivity: the measured per-group errors, when the sensitivity allocation ran.
        started: `time.perf_counter()` when the selection began (the summary's `seconds`).
        latency_table: the model's latency table, when auto rounding or a latency target built one.
        latency: the measured latency of the plan, when a latency target verified it.
        dense_rows: the seq repair's rows of the original model, drawn by the statistics pass
            (`repair.seq_rows_writer`); the repair uses them once and closes them.
    """

    config: PruneConfig
    analysis: ChannelAnalysis
    labels: np.ndarray
    plan: PruningPlan
    source: ChannelAnalysis
    stats: CalibrationStats | None = None
    notices: tuple[str, ...] = ()
    repair: RepairReport | None = None
    sensitivity: SensitivityReport | None = None
    started: float = 0.0
    latency_table: LatencyTable | None = None
    latency: LatencyReport | None = None
    dense_rows: DenseRows | None = None

    @property
    def empty(self) -> bool:
        return len(self.labels) == 0


def channel_analysis(model: onnx.ModelProto, allow_inexact: bool = False) -> ChannelAnalysis:
    """The model's channel analysis, from the running PassManager's cache when an earlier pass made it."""
    cache = analyses()
    key = (ChannelAnalysis, allow_inexact)
    found = cache.get(model, key)
    if found is None:
        found = analyze(ModelGraph(model), allow_inexact=allow_inexact)
        cache.put(model, key, found)
    return found


def pending_selection(model: onnx.ModelProto) -> ChannelSelection:
    """The selection pending on this model object in the running PassManager.

    Raises:
        PreconditionError: no `SelectChannelsPass` ran on this model object in the same PassManager (or a
            pass other than the repair changed the model in between).
    """
    found = analyses().get(model, ChannelSelection)
    if found is None:
        raise PreconditionError("no channel selection pending on this model: run SelectChannelsPass before it "
                                "in the same PassManager (only RepairChannelsPass may run in between)")
    return found


def calibration_statistics(
    config: PruneConfig,
    model: onnx.ModelProto,
    calib: CalibrationData | None,
    custom_criterion: bool = False,
    seq_rows: bool = False,
    losing: list[ChannelGroup] | None = None,
) -> CalibrationStats | None:
    """Calibration statistics of `model` when the criterion or the repair reads them, else None.

    `seq_rows`: with the seq repair, also draw its rows of the original model in the same pass
    (`CalibrationStats.rows`, for a repair of this very model object: `ChannelSelection.dense_rows`).
    `losing`: the only groups that lose channels, where that is known before the scores (`score_free_counts`):
    Hessians only of the layers that read them, which are all that OBS and the ls repair then read, and the seq
    repair's rows only of the layers it will fit (`repair.seq_rows_writer`).
    """
    data_criterion = not custom_criterion and config.criterion in ("activation", "apoz", "obs")
    if calib is None or not (data_criterion or config.repair == "ls"):
        return None
    data = check_calib(calib, model, config.calib_samples)
    # per-position moments only for the criteria that read them (obs and the ls repair read the Hessians alone)
    moments = custom_criterion or config.criterion in ("activation", "apoz")
    # quantized (QDQ) weights: the layers read them as floats here, as the repairs refit them (`quantized_repair`)
    view, dequantized = float_view(model)
    # the seq repair's rows of the original model drawn in this pass too (`ChannelSelection.dense_rows`)
    # with the losing groups known, only the rows of the layers a removal there makes the repair fit
    cut = None if losing is None else [DimRef(m.tensor, m.axis) for g in losing for m in g.members]
    rows = (seq_rows_writer(view, data, config.seed, cut=cut) if seq_rows and config.repair == "seq"
            and not dequantized else None)
    hessian: bool | frozenset[str] = config.repair == "ls" or config.criterion == "obs"
    if hessian and losing is not None:
        hessian = frozenset(c.name for c in consumers(ModelGraph(view))
                            if any(member(g, c.weight, c.in_axis) is not None for g in losing))
    return collect_stats(view, data, hessian=hessian, moments=moments, seed=config.seed, rows=rows)


def criterion_for(config: PruneConfig, stats: CalibrationStats | None = None) -> Criterion:
    """The named criterion; OBS measures the error left after the configured repair."""
    repair = "ls" if config.repair == "seq" else config.repair  # both leave the OBS error
    return get_criterion(config.criterion, config.seed, stats, repair)


SENSITIVITY_RATIOS = (0.1, 0.2, 0.3, 0.5, 0.7)
SENSITIVITY_SAMPLES = 16
#: Allocations whose per-group counts do not read the criterion's scores (LAMP's budgets come from the channels'
#: magnitudes, `_lamp_budget`): a criterion with a prefix order ranks only as deep as each group loses.
SCORE_FREE_COUNTS = frozenset({"uniform", "lamp"})
#: The named criteria with `Criterion.prefix_order` (made without statistics, OBS's data-free surrogate).
PREFIX_ORDER_CRITERIA = frozenset(name for name, c in CRITERIA.items() if c.prefix_order and name not in DATA_CRITERIA)


def choose_plan(
    config: PruneConfig,
    analysis: ChannelAnalysis,
    criterion: Criterion,
    stats: CalibrationStats | None = None,
    calib: CalibrationData | None = None,
    measured: SensitivityReport | None = None,
    *,
    keep_counts: KeepCounts | None = None,
    top: str = "up",
    needed: dict[int, int] | None = None,
) -> PruningPlan:
    """Which channels of which group go: scores, then the configured allocation and target.

    Args:
        measured: for the sensitivity allocation, the measured errors (`measure_sensitivity`); None
            measures them here (needs `calib`).
        keep_counts: allowed kept counts per group (`latency_select.latency_grid`); None: multiples of an
            integer ``config.round_to``.
        top: how a uniform or global ratio snaps kept counts to the grid (`plan.snap_keep`).
        needed: `score_free_counts` of these arguments, if the caller already has them.
    """

    def plan_from(scores: dict[int, np.ndarray]) -> PruningPlan:
        return _plan_from(config, analysis, criterion, scores, stats, calib, measured, keep_counts, top)

    if needed is None:
        needed = score_free_counts(config, analysis, criterion, keep_counts=keep_counts, top=top)
    if needed is not None:
        # a group that loses nothing keeps every channel in any order: not scored (OBS: no Hessian inverted for
        # it; ResNet-50 under LAMP, random weights: 35 of 37 groups)
        scores = criterion.score_all(analysis, [g for g in analysis.groups if needed[g.id]], needed=needed)
        return plan_from({g.id: scores.get(g.id, np.zeros(g.size)) for g in analysis.groups})
    return plan_from(criterion.score_all(analysis))


def score_free_counts(config: PruneConfig, analysis: ChannelAnalysis, criterion: Criterion, *,
                      keep_counts: KeepCounts | None = None, top: str = "up") -> dict[int, int] | None:
    """Group id -> the channels it loses, where they are known before any score: uniform and LAMP counts do
    not read the scores (LAMP's budgets are the channels' magnitudes), so a placeholder ranking gives them and
    a criterion with a prefix order (`Criterion.prefix_order`: OBS's greedy order, ~ depth^2) ranks only that
    deep. None for other allocations and criteria."""
    if not (criterion.prefix_order and config.allocation_name in SCORE_FREE_COUNTS and not config.global_ranking):
        return None
    placeholder = _plan_from(config, analysis, criterion, {g.id: np.zeros(g.size) for g in analysis.groups},
                             None, None, None, keep_counts, top)
    return {g.id: len(placeholder.removed.get(g.id, ())) for g in analysis.groups}


def _plan_from(config: PruneConfig, analysis: ChannelAnalysis, criterion: Criterion, scores: dict[int, np.ndarray],
               stats: CalibrationStats | None, calib: CalibrationData | None, measured: SensitivityReport | None,
               keep_counts: KeepCounts | None, top: str) -> PruningPlan:
    """The plan of `choose_plan` for given scores."""
    c = config
    round_to = c.round_to if isinstance(c.round_to, int) else 1
    targets = {"params": c.target_params, "macs": c.target_macs}
    if c.allocation_name not in ("lamp", "sensitivity", "knapsack") and all(v is None for v in targets.values()):
        return make_plan(analysis, scores, c.ratio, global_ranking=c.global_ranking, round_to=round_to,
                         max_group_ratio=c.max_group_ratio, keep_counts=keep_counts, top=top)
    units = _removal_units(config, analysis, criterion, scores, stats, calib, measured, keep_counts)
    for metric, text in targets.items():
        if text is not None:
            total = count_params(analysis.graph) if metric == "params" else count_macs(analysis.graph)
            target = alloc.parse_target(text, total, metric)
            assert target is not None  # text is not None
            return alloc.plan_for_target(units, analysis, target, metric, tight=c.allocation_name == "knapsack")
    return alloc.plan_for_ratio(units, analysis, c.ratio)


def target_notices(config: PruneConfig, analysis: ChannelAnalysis) -> tuple[str, ...]:
    """`allocation.met_target_notice` for the config's parameter or MAC target."""
    notes = (alloc.met_target_notice(config.target_params, count_params(analysis.graph), "params"),
             alloc.met_target_notice(config.target_macs, count_macs(analysis.graph), "macs"))
    return tuple(n for n in notes if n)


def _lamp_budget(config: PruneConfig, analysis: ChannelAnalysis) -> dict[int, np.ndarray] | None:
    # LAMP is layer-adaptive *magnitude* pruning: the per-layer budgets come from LAMP scores of the
    # channel L1 norms, whatever the criterion; the criterion picks which channels go. So every criterion
    # is compared on the same budgets (not on budgets its own score distribution happens to induce, e.g.
    # uniform for random, [0, 1] plateaus for APoZ).
    return Magnitude(1).score_all(analysis) if config.allocation_name == "lamp" else None


def _removal_units(
    config: PruneConfig,
    analysis: ChannelAnalysis,
    criterion: Criterion,
    scores: dict[int, np.ndarray],
    stats: CalibrationStats | None,
    calib: CalibrationData | None,
    measured: SensitivityReport | None,
    keep_counts: KeepCounts | None,
) -> list[alloc.Unit]:
    """The allocation's order of removal units (LAMP budgets, measured sensitivity, or normalised scores)."""
    c = config
    round_to = c.round_to if isinstance(c.round_to, int) else 1
    if c.allocation_name == "knapsack":
        measured = measured or measure_sensitivity(config, analysis, stats, calib)
        weight = (None if c.target_params is not None else knapsack.macs_per_channel(analysis)
                  if c.target_macs is not None else {g.id: 1.0 for g in analysis.groups})
        return knapsack.knapsack_order(analysis, scores, list(measured.rows), list(measured.ratios), weight=weight,
                                       round_to=round_to, max_group_ratio=c.max_group_ratio, keep_counts=keep_counts)
    if c.allocation_name == "sensitivity":
        measured = measured or measure_sensitivity(config, analysis, stats, calib)
        return alloc.sensitivity_order(analysis, scores, list(measured.rows), list(measured.ratios),
                                       round_to=round_to, max_group_ratio=c.max_group_ratio, keep_counts=keep_counts)
    return alloc.removal_order(
        analysis, scores, c.allocation_name, round_to=round_to, max_group_ratio=c.max_group_ratio,
        comparable=getattr(criterion, "comparable", False), budget_scores=_lamp_budget(config, analysis),
        keep_counts=keep_counts,
    )


def choose_latency_plan(
    config: PruneConfig,
    analysis: ChannelAnalysis,
    criterion: Criterion,
    table: LatencyTable,
    stats: CalibrationStats | None = None,
    calib: CalibrationData | None = None,
    measured: SensitivityReport | None = None,
    *,
    keep_counts: KeepCounts | None = None,
) -> tuple[PruningPlan, LatencyReport]:
    """The plan meeting ``config.target_latency``: units ordered by importance lost per predicted
    millisecond saved (`latency_allocation.latency_order`; an explicit uniform allocation keeps its own
    order and only the amount follows the latency), verified by measurement.

    Raises:
        OnnxPruneError: the target cannot be reached (`latency_select.plan_for_target_latency`).
    """
    c = config
    round_to = c.round_to if isinstance(c.round_to, int) else 1
    scores = criterion.score_all(analysis)
    if c.allocation_name == "uniform":
        units = _removal_units(config, analysis, criterion, scores, stats, calib, measured, keep_counts)
    else:
        rows = None
        if c.allocation_name in ("sensitivity", "knapsack"):
            measured = measured or measure_sensitivity(config, analysis, stats, calib)
            rows = (list(measured.rows), list(measured.ratios))
        units = latency_order(
            analysis, scores, table, c.allocation_name, round_to=round_to, keep_counts=keep_counts,
            max_group_ratio=c.max_group_ratio, comparable=getattr(criterion, "comparable", False),
            budget_scores=_lamp_budget(config, analysis), sensitivity=rows,
        )
    return plan_for_target_latency(config, analysis, table, units)


def measure_sensitivity(
    config: PruneConfig,
    analysis: ChannelAnalysis,
    stats: CalibrationStats | None,
    calib: CalibrationData | None,
) -> SensitivityReport:
    """Each group's measured end-to-end output error at `SENSITIVITY_RATIOS` (needs calibration samples);
    for the knapsack allocation its finer curves (`allocation_knapsack.measure_curves`)."""
    c = config
    if calib is None:
        raise missing_calibration(f"allocation {c.allocation_name!r}")
    model = analysis.graph.model
    # QDQ: measured on the float view, where the measurement's repair can refit the quantized layers too
    view, measured_on = _float_view_of(analysis, c.allow_inexact)
    if c.allocation_name == "knapsack":
        data = check_calib(calib, model)
        rows = knapsack.measure_curves(view.graph.model, data, c.criterion, c.repair, stats, c.allow_inexact)
        return SensitivityReport(tuple(knapsack.RATIOS), tuple(_rows_for(analysis, measured_on, rows)))
    data = check_calib(calib, model, max(fixed_batch(model), min(calib.inputs, SENSITIVITY_SAMPLES)))  # inputs
    ratios = list(SENSITIVITY_RATIOS)
    rows = sensitivity(view.graph.model, data, ratios, c.criterion, c.repair, stats, c.allow_inexact)
    return SensitivityReport(tuple(ratios), tuple(_rows_for(analysis, measured_on, rows)))


def _float_view_of(analysis: ChannelAnalysis, allow_inexact: bool) -> tuple[ChannelAnalysis, dict[int, int]]:
    """(the analysis of `analysis`'s model as the repairs see it, its group id -> `analysis`'s group id): the
    QDQ float view (`quantized_repair.float_view`) when every group of the view is one of `analysis`'s groups
    (the same weights on the same axes), else `analysis` itself."""
    view, dequantized = float_view(analysis.graph.model)
    same = {g.id: g.id for g in analysis.groups}
    if not dequantized:
        return analysis, same
    floats = channel_analysis(view, allow_inexact)
    tensors = {m.tensor for g in floats.groups for m in g.param_members}

    def key(group: ChannelGroup) -> frozenset:
        return frozenset((m.tensor, m.axis) for m in group.param_members if m.tensor in tensors)

    ids = {key(g): g.id for g in analysis.groups}
    matched = {g.id: ids.get(key(g)) for g in floats.groups}
    if len(floats.groups) != len(analysis.groups) or any(v is None for v in matched.values()):
        return analysis, same
    return floats, {k: v for k, v in matched.items() if v is not None}


def _rows_for(analysis: ChannelAnalysis, ids: dict[int, int], rows: list[SensitivityRow]) -> list[SensitivityRow]:
    """Curves measured on another analysis of the model (`_float_view_of`), as rows of `analysis`'s groups."""
    out = []
    for r in rows:
        g = analysis.groups[ids[r.group]]
        out.append(replace(r, group=g.id, channels=g.size, params=g.params))
    return out


def float_weight_options(config: PruneConfig, custom_criterion: bool = False, calibrated: bool = True) -> list[str]:
    """The options of `config` that read float weights at the consumers without a float view of them (refused on
    QDQ weights): the data criteria without calibration data (their data-free surrogates find only float layers).
    With calibration data the statistics are collected on the float view (`calibration_statistics`), and every
    repair refits on it and quantizes again (`quantized_repair`)."""
    c = config
    data_free = not calibrated and not custom_criterion
    return [f"--criterion {c.criterion} without --calib"] if data_free and c.criterion in FLOAT_WEIGHT_CRITERIA else []


class AnalyzeChannelsPass(Pass):
    """Analyse the coupled channel groups; the `ChannelAnalysis` is the artifact. Changes nothing."""

    def __init__(self, allow_inexact: bool = False) -> None:
        self.allow_inexact = allow_inexact

    def call(self, model):
        return PassResult(model, False, artifacts=(channel_analysis(model, self.allow_inexact),))


class SelectChannelsPass(Pass):
    """Choose the channels to remove (analyse, score, allocate); the model is returned unchanged.

    Args:
        config: what to remove and how.
        criterion: a `Criterion` instance overriding `config.criterion`.
        calib: calibration samples for data criteria, `repair="ls"`/`"seq"` and the sensitivity allocation.
        stats: precomputed `calibration.collect_stats` of the model (reused across runs, e.g. benchmarks).
    """

    def __init__(
        self,
        config: PruneConfig | None = None,
        *,
        criterion: Criterion | None = None,
        calib: CalibLike | None = None,
        stats: CalibrationStats | None = None,
    ) -> None:
        # a latency target with samples and no allocation: the knapsack's measured curves (as the CLI does)
        calib = as_calibration(calib)  # a plain {input name: array} is welcome too
        self.config = with_latency_allocation(config or PruneConfig(), has_calib=calib is not None)
        self.criterion = criterion
        self.calib = calib
        self.stats = stats

    def check_data(self) -> list[str]:
        """Raise UsageError when the config needs data this pass was not given; notices for fallbacks."""
        return check_data(self.config, has_calib=self.calib is not None, has_stats=self.stats is not None,
                          custom_criterion=self.criterion is not None)

    def requires(self, model):
        self.check_data()

    def statistics(self, model: onnx.ModelProto, losing: list[ChannelGroup] | None = None) -> CalibrationStats | None:
        if self.stats is not None:
            return self.stats
        return calibration_statistics(self.config, model, self.calib, self.criterion is not None, seq_rows=True,
                                      losing=losing)

    def score_free_counts(self, analysis: ChannelAnalysis, grid: Grid) -> dict[int, int] | None:
        """The channels each group loses when that is known before any statistics (`score_free_counts`, no
        latency table or target), else None. Only the groups that lose some then get Hessians: ResNet-50 under
        LAMP (random weights, 2 of 37 groups lose channels) skips the other layers' products (session 53)."""
        keep_counts, table, _ = grid
        if self.stats is not None or table is not None or self.config.target_latency is not None:
            return None
        if self.criterion is None and self.config.criterion not in PREFIX_ORDER_CRITERIA:
            return None  # (the data criteria cannot be made before their statistics)
        criterion = self.criterion or criterion_for(self.config)
        top = "nearest" if self.config.round_to == "auto" else "up"
        return score_free_counts(self.config, analysis, criterion, keep_counts=keep_counts, top=top)

    def plan(
        self,
        analysis: ChannelAnalysis,
        stats: CalibrationStats | None = None,
        measured: SensitivityReport | None = None,
    ) -> PruningPlan:
        return self.choose(analysis, stats, measured)[0]

    def choose(
        self,
        analysis: ChannelAnalysis,
        stats: CalibrationStats | None = None,
        measured: SensitivityReport | None = None,
        grid: Grid | None = None,
        needed: dict[int, int] | None = None,
    ) -> tuple[PruningPlan, LatencyTable | None, LatencyReport | None, tuple[str, ...]]:
        """(the plan, the latency table, the verified latency, notices) for an analysed model; `grid`: its
        `latency_grid`, and `needed` its `score_free_counts`, if already made."""
        criterion = self.criterion or criterion_for(self.config, stats)
        keep_counts, table, notices = grid or latency_grid(self.config, analysis)
        if self.config.target_latency is not None:
            assert table is not None  # a latency target always builds the table
            plan, report = choose_latency_plan(self.config, analysis, criterion, table, stats, self.calib, measured,
                                               keep_counts=keep_counts)
            notices += (report.message,) if report.message else ()
            return plan, table, report, notices
        weighted = weighted_ratio_plan(self.config, analysis, lambda: criterion.score_all(analysis), table,
                                       keep_counts)
        if weighted is not None:
            return weighted, table, None, notices
        top = "nearest" if self.config.round_to == "auto" else "up"
        plan = choose_plan(self.config, analysis, criterion, stats, self.calib, measured, keep_counts=keep_counts,
                           top=top, needed=needed)
        return plan, table, None, notices

    def call(self, model):
        started = time.perf_counter()
        notices = tuple(self.check_data())
        analysis = channel_analysis(model, self.config.allow_inexact)
        params = (m.tensor for g in analysis.groups for m in g.param_members)
        check_float_weights(analysis.graph, params,
                            float_weight_options(self.config, self.criterion is not None, self.calib is not None))
        grid = latency_grid(self.config, analysis)
        needed = self.score_free_counts(analysis, grid)
        stats = self.statistics(model, None if needed is None else [g for g in analysis.groups if needed[g.id]])
        measured = None
        if self.config.allocation_name in ("sensitivity", "knapsack"):
            measured = measure_sensitivity(self.config, analysis, stats, self.calib)
        plan, table, latency, more = self.choose(analysis, stats, measured, grid, needed)
        more += target_notices(self.config, analysis) + rounding_notice(self.config, analysis, plan)
        if not analysis.groups:
            more += (f"no channel group can be pruned ({len(analysis.barriers)} barriers): the output is the model "
                     "as imported; `onnxprune analyze` gives every frozen weight axis its reason",)
        # Only the ls repair reads the statistics after selection: the seq repair computes its own per wave, and
        # ResNet-50's Hessians (~475 MB) would otherwise stay alive in the selection artifact through it.
        kept_stats = stats if self.config.repair == "ls" else None
        rows = stats.rows if stats is not None and self.config.repair == "seq" else None
        del stats
        # the scores read every weight through the analysis graph's cache; the analysis lives on in the selection
        # through the repair, which reads its own copies (ResNet-50: 97 MB released for the seq repair's peak)
        analysis.graph.forget_values()
        selection = ChannelSelection(self.config, analysis, plan.labels(analysis), plan, analysis, kept_stats,
                                     notices + more, sensitivity=measured, started=started, latency_table=table,
                                     latency=latency, dense_rows=rows)
        analyses().put(model, ChannelSelection, selection)
        return PassResult(model, False, artifacts=(selection,))
