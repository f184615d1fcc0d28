"""The latency side of channel selection: the backend, the latency table, the channel grid, the verified
latency target and the measured `LatencyReport`.

`SelectChannelsPass` (`select.py`) calls `latency_grid` for ``round_to="auto"`` (or a latency target):
the model's latency table (`latency.table.build_table`: per-op micro-benchmarks on the configured backend,
cached on disk per op signature and device) is built once per model object and kept in the running
PassManager's `AnalysisCache`; the grid (`latency.grid.keep_counts`) is what allocation snaps to. An
explicit ``round_to=N`` needs no table (`latency.grid.multiples`). `plan_for_target_latency` runs
`latency_allocation.solve_latency_target` with a measurement of the pruned model (the selection's plan
applied to the dense model, both with static input sizes) against the dense one. `measure_latency` measures
a finished model for the summary (the CLI does this after auto rounding, so the reported speedup is that of
the model written).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxprune.channels import ChannelAnalysis
from onnxprune.errors import OnnxPruneError, UsageError
from onnxprune.graph import ModelGraph
from onnxprune.latency_allocation import LatencyOutcome, parse_latency_target, solve_latency_target
from onnxprune.metrics import count_macs
from onnxprune.passes.config import PruneConfig
from onnxprune.passmanager import analyses
from onnxprune.plan import KeepCounts, PruningPlan

if TYPE_CHECKING:
    from onnxprune.allocation import Unit
    from onnxprune.latency.backend import LatencyBackend
    from onnxprune.latency.ratio_choice import Candidate, RatioChoice
    from onnxprune.latency.table import LatencyTable


@dataclass(frozen=True)
class LatencyReport:
    """Measured latency of the pruned model against the dense one (the summary's ``latency`` entry).

    Attributes:
        backend: where it was measured (`LatencyBackend.name`).
        dense_ms, pruned_ms: median latencies, measured interleaved.
        speedup: dense_ms / pruned_ms.
        predicted_speedup: what the latency table predicted.
        macs_reduction: MACs before / MACs after.
        efficiency: speedup / macs_reduction (1: the model got as much faster as it got smaller).
        iterations: measurements of candidate plans (1 without a latency target).
        reached: the latency target was met (True without a target).
        target: the ``--target-latency`` asked, or None.
        message: why the target was not met exactly, or "".
    """

    backend: str
    dense_ms: float
    pruned_ms: float
    speedup: float
    predicted_speedup: float
    macs_reduction: float
    efficiency: float
    iterations: int = 1
    reached: bool = True
    target: str | None = None
    message: str = ""

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def latency_backend(config: PruneConfig) -> LatencyBackend:
    """The configured measurement backend (`latency.backend.get_backend`)."""
    from onnxprune.latency.backend import get_backend

    return get_backend(config.latency_backend, threads=config.latency_threads, rpc=config.rpc,
                       device_key=config.device_key)


def with_latency_allocation(config: PruneConfig, *, has_calib: bool) -> PruneConfig:
    """`config` with ``allocation="knapsack"`` when a latency target comes with calibration data and no
    allocation was chosen (neither ``--allocation`` nor ``--global``); else `config` itself.

    With samples the latency knapsack prices importance by each group's measured end-to-end error curve
    (`allocation_knapsack.measure_curves`, `latency_allocation.latency_order`) rather than the data-free
    share of squared scores, which cannot see a group collapse (hence its floor,
    `latency_allocation.DATA_FREE_MIN_KEEP`). The samples are there anyway (a data criterion or repair reads
    them); the curves cost one sweep of end-to-end errors per group. ``--allocation global`` keeps the
    data-free cost.
    """
    if config.target_latency is None or config.allocation is not None or config.global_ranking or not has_calib:
        return config
    return replace(config, allocation="knapsack")


def _cache_dir(config: PruneConfig) -> Path | None:
    return Path(config.latency_cache) if config.latency_cache else None


def latency_table(config: PruneConfig, analysis: ChannelAnalysis, backend: LatencyBackend) -> LatencyTable:
    """The model's latency table on `backend`, built once per model object in the running PassManager.

    Raises:
        UsageError: the backend is an emulator (its numbers are not timing), or an input has a dynamic size.
    """
    from onnxprune.latency.table import build_table

    model = analysis.graph.model
    key = ("latency-table", backend.key, config.allow_inexact)
    table = analyses().get(model, key)
    if table is None:
        if backend.emulated:
            raise UsageError(f"latency backend {backend.name} is emulated: its numbers are not timing, so it "
                             "cannot choose channel counts (pass --round-to N, or measure on the device with --rpc)")
        table = build_table(analysis, backend, cache_dir=_cache_dir(config))
        analyses().put(model, key, table)
    return table


def unmeasurable(model: onnx.ModelProto) -> str | None:
    """Why `model` cannot be measured as it is (an input size other than the batch is dynamic), or None."""
    from onnxprune.latency.measure import static_inputs

    try:
        static_inputs(model, None)
    except UsageError as exc:
        return str(exc)
    return None


def latency_grid(
    config: PruneConfig, analysis: ChannelAnalysis
) -> tuple[KeepCounts | None, LatencyTable | None, tuple[str, ...]]:
    """(allowed kept counts per group, the latency table, notices) of the configured rounding.

    ``round_to=N``: the multiples of N, no table (a latency target still builds one to predict with).
    ``"auto"``: the bottoms of the measured latency steps (layers whose sizes are not fixed are not
    measured: the table's notices say which, and their groups keep every count). A dynamic batch is
    measured at 1.

    Raises:
        UsageError: a latency target on a model with a dynamic input size (the model cannot be measured).
    """
    from onnxprune.latency.grid import keep_counts, multiples

    explicit = config.round_to != "auto"
    grid = multiples(analysis, int(config.round_to)) if explicit and config.round_to != 1 else None
    if not config.measures_latency:
        return grid, None, ()
    why = unmeasurable(analysis.graph.model) if config.target_latency is not None else None
    if why is not None:
        raise UsageError(f"--target-latency measures the model: {why}")
    if not explicit and config.target_latency is None and _weight_bytes(analysis.graph.model) > AUTO_TABLE_LIMIT:
        return grid, None, (f"auto rounding skipped: the model holds over {AUTO_TABLE_LIMIT >> 30} GiB of weights and "
                            "its latency table would need several times that in memory; channel counts are not "
                            "rounded (pass --round-to N, or --target-latency to measure anyway)",)
    backend = latency_backend(config)
    try:
        table = latency_table(config, analysis, backend)
    except OnnxPruneError:
        raise
    except Exception as exc:  # a model onnxruntime cannot run piecewise (custom domains, broken weights, ...)
        if config.target_latency is not None:
            raise OnnxPruneError(f"--target-latency: cannot measure this model on {backend.name}: {_first_line(exc)}") \
                from None
        return grid, None, (f"auto rounding could not measure this model on {backend.name} ({_first_line(exc)}): "
                            "channel counts are not rounded",)
    if explicit:
        return grid, table, table.notices
    return never_slower(keep_counts(table, analysis), table), table, table.notices


# Measured (2026-12-03): a 1.03 B-parameter decoder (3.85 GiB of weights) pruned with the default auto
# rounding peaked at 12.8 GiB RSS (the table's micro-benchmarks of its large MatMuls), against 2.99 GiB with
# --round-to 1; models this large keep exact counts unless the user asks for measurement.
AUTO_TABLE_LIMIT = 1 << 30


def _weight_bytes(model) -> int:
    """Bytes of the main graph's initializers, from their dims (external data is never read)."""
    from onnx.helper import tensor_dtype_to_np_dtype

    total = 0
    for t in model.graph.initializer:
        try:
            size = np.dtype(tensor_dtype_to_np_dtype(t.data_type)).itemsize
        except Exception:
            continue
        total += int(np.prod(t.dims, dtype=np.int64)) * size
    return total


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def never_slower(grid: KeepCounts, table: LatencyTable) -> dict[int, tuple[int, ...]]:
    """`grid` without the counts the table predicts slower than (or as slow as) a larger allowed count.

    Keeping fewer channels must buy latency: a count that costs as much as a larger one loses accuracy for
    nothing (measured on a small residual net: 12 of 16 channels at 0.189 ms, all 16 at 0.179 ms).
    """
    out: dict[int, tuple[int, ...]] = {}
    for gid, counts in grid.items():
        if gid not in table.curves:
            out[gid] = tuple(counts)
            continue
        kept: list[int] = []
        fastest = float("inf")
        for c in sorted(counts, reverse=True):
            ms = table.at(gid, int(c))
            if ms < fastest or not kept:
                kept.append(int(c))
                fastest = ms
        out[gid] = tuple(sorted(kept))
    return out


#: a uniform ratio whose efficiency bound reaches this stays uniform (`weighted_ratio_plan`)
UNIFORM_ENOUGH = 0.9


def weighted_ratio_plan(
    config: PruneConfig,
    analysis: ChannelAnalysis,
    scores: dict[int, np.ndarray] | Callable[[], dict[int, np.ndarray]],
    table: LatencyTable | None,
    keep_counts: KeepCounts | None,
) -> PruningPlan | None:
    """The plan of a plain ``--ratio`` under auto rounding (`latency.ratio_choice.choose_ratio_plan`), or
    None when the configuration asks for something else or the uniform ratio on the grid is the choice
    (the caller's `plan.make_plan` builds that one).

    It applies when the rounding is ``auto`` with a table, the allocation was not chosen (``allocation`` is
    None, no ``--global``) and no parameter, MAC or latency target replaces the ratio. Every candidate
    removes the same fraction of channels; the table's choice and the next best by predicted score are timed
    against the unrounded uniform ratio (``--round-to 1``), and the table's choice stands unless measured
    slower than it or clearly beaten (`confirmed`). Latency-weighted candidates compete only where the uniform
    ratio cannot track its MACs (`latency.predict.uniform_bound` below `UNIFORM_ENOUGH`): measured on
    ResNet-50 (bound 0.98-1.0; thread CPU time, load 7), weighting made the model slower at the same ratio
    (0.3: 1.69x against 1.88x; 0.7: 6.41x against 7.46x), while on EfficientNet-B0 (bound 0.83/0.69/0.52 at
    0.3/0.5/0.7) it made it faster (1.81x against 1.37x, 2.48x against 2.22x, 3.73x against 3.48x; the table in
    `latency.weighted`). Predictions read the table calibrated in-model (`latency.calibrate`: one profile of
    the dense model, cached).
    """
    from onnxprune.latency.ratio_choice import UNIFORM_ANY, UNIFORM_GRID
    from onnxprune.plan import make_plan

    @functools.cache
    def scored() -> dict[int, np.ndarray]:  # data criteria such as obs are not cheap: score once, if at all
        return scores() if callable(scores) else scores

    choice = ratio_choice(config, analysis, scored, table, keep_counts)
    if choice is None:
        return None
    assert table is not None
    chosen = confirmed(config, analysis, choice, table.backend_key)
    if chosen.name == UNIFORM_GRID:
        return None
    if chosen.name == UNIFORM_ANY:
        return make_plan(analysis, scored(), config.ratio)
    return chosen.plan


def ratio_choice(
    config: PruneConfig,
    analysis: ChannelAnalysis,
    scores: Callable[[], dict[int, np.ndarray]],
    table: LatencyTable | None,
    keep_counts: KeepCounts | None,
) -> RatioChoice | None:
    """The table's candidates and choice for a plain ``--ratio`` under auto rounding, before any measurement
    (`weighted_ratio_plan` then measures them; bench/ratio_candidates.py times every one), or None when the
    configuration asks for something else (the conditions of `weighted_ratio_plan`)."""
    from onnxprune.latency.calibrate import in_model_table
    from onnxprune.latency.predict import uniform_bound
    from onnxprune.latency.ratio_choice import choose_ratio_plan

    if (not _plain_auto_ratio(config) or table is None or not table.curves or config.allocation is not None
            or config.global_ranking):
        return None
    # the bound as tuned (micro-model prices: in-model ones lift MobileNetV2@0.3 to 0.92, whose uniform
    # ratio measured 0.84); the plan reads in-model prices (a profile of the dense model, cached)
    weighted = uniform_bound(table, analysis, config.ratio).efficiency < UNIFORM_ENOUGH
    table = in_model_table(table, analysis, latency_backend(config), cache_dir=_cache_dir(config))
    # The uniform candidates' kept counts do not depend on the scores: score only when a weighted plan may win
    flat = {g.id: np.zeros(g.size) for g in analysis.groups}
    return choose_ratio_plan(analysis, scores() if weighted else flat, table, config.ratio, keep_counts=keep_counts,
                             weighted=weighted, max_group_ratio=config.max_group_ratio)


#: the chosen plan may measure this much slower than the unrounded one and stand (timing noise)
CONFIRM_TOLERANCE = 0.02
#: plans timed against the unrounded one: the table's choice and the next best by predicted score
SHORTLIST = 4
#: the measured score is efficiency ** this * speedup (efficiency capped at 1): efficiency first, as the default is
#: judged (realized speedup / MACs reduction): 1% less efficient must buy 8% more speed. Candidates trade the two
#: nearly in proportion (EfficientNet-B0@0.7, measured when chosen: 3.56x at 0.945, 4.24x at 0.923, 4.38x at
#: 0.914), so a weight of 2 or 4 left the choice to timing noise, and the faster plans measured 0.87-0.92 in later
#: runs; the table's score weighs 2 (`latency.weighted.EFFICIENCY_WEIGHT`) against predictions that underestimate
#: efficiency (0.79-0.85 predicted, 0.89-0.97 measured at 0.7)
MEASURED_EFFICIENCY_WEIGHT = 8.0
#: a measured candidate replaces the table's choice only when it scores this much higher (the run-to-run spread of
#: a model's fastest-of-40 time is a few percent; the score goes as time^-9)
REPLACE_MARGIN = 0.05
#: interleaved rounds when a shortlist is timed (15 for a lone candidate against the reference, as before), fewer
#: (down to 10) where `SHORTLIST_BUDGET_MS` of predicted time would not fit them: it runs on the first --ratio prune
#: of a model on a device, then its timings are read from the cache (MobileNetV2: 40 rounds of six models in ~1 s)
SHORTLIST_REPEAT = 40
SHORTLIST_BUDGET_MS = 10_000.0


def confirmed(config: PruneConfig, analysis: ChannelAnalysis, choice: RatioChoice, table_key: str) -> Candidate:
    """The table's choice, unless a candidate of its `SHORTLIST` measures clearly better; never a plan measured slower
    than the reference (the uniform ratio at any count, ``--round-to 1``) beyond `CONFIRM_TOLERANCE`.

    The table prices each layer alone; a whole model can disagree, and at high ratios it does by more than the
    candidates differ. So the table's choice and the next best by predicted score (including plans it predicted
    slower than the reference, which it then never offered) are applied to the model and timed interleaved with
    the reference and the dense model (fastest runs: robust on a loaded machine). Measured score: efficiency
    capped at 1, to the power `MEASURED_EFFICIENCY_WEIGHT`, times speedup (MACs counted on the models). The
    table's choice stands if it measured no slower than the reference (else the reference stands in for it)
    unless another candidate no slower than the reference scores `REPLACE_MARGIN` higher. One candidate is only
    timed against the reference; a backend that compiles each model it times (``compiles_models``: TVM) times
    only the table's choice (or its best other plan when it chose the reference). The timings are cached with the
    table's (`latency.model_timings`: per model structure, device and kept counts timed), so a re-run on the same
    device chooses again what it chose. A plan equal to the reference is not timed; a table measured elsewhere
    (`table_key`, the table's backend key, is not the configured backend's) or a failed measurement keeps the
    table's choice.

    What the measurement saw when it chose (onnxruntime 1 thread, quiet machine, `onnxprune prune MODEL --ratio 0.7`;
    speedup (efficiency), fastest of 40 interleaved runs; all candidates: bench/latency_results_quiet.txt, session 38):

    =====================  ========================  ========================  =====================
    model, --ratio         table's choice            measured choice           unrounded (reference)
    =====================  ========================  ========================  =====================
    Fashion-MNIST ResNet   the reference             weighted a=4 micro-model  3.38x (0.33)
    0.7                    3.38x (0.33)              3.65x (0.84)
    MobileNetV2 0.7        a=4 micro-model blend     a=2 micro-model           2.54x (0.30)
                           4.15x (0.91)              4.26x (0.95)
    EfficientNet-B0 0.7    a=4 in-model              the same (a=4 micro-model 2.21x (0.26)
                           3.56x (0.95)              4.24x (0.92) scores less)
    =====================  ========================  ========================  =====================

    The table predicted 3.56-3.62x for the MobileNetV2@0.7 candidates (measured 3.91-4.26x) and 4.01x for the
    Fashion-MNIST ResNet's reference (measured 3.21-3.38x): differences of a few percent between candidates are
    below its error. The first confirmation (CIFAR ResNet20 at 0.5): the table priced its first residual
    stream slower at 8 channels than at 16, so the grid kept 16; the model with 8 ran 2.06x faster than dense,
    the grid plan 1.71x: the reference stands.
    """
    from onnxprune.latency.model_timings import cached_model_timings
    from onnxprune.latency.ratio_choice import EFFICIENCY_CAP
    from onnxprune.latency.table import default_cache_dir

    reference = choice.reference
    try:
        backend = latency_backend(config)
    except Exception:  # the prediction stands when there is nothing to time on
        return choice.chosen
    if backend.key != table_key:
        return choice.chosen
    # a backend that compiles every model it times (TVM: ~10-30 s a CNN) times the table's choice alone
    size = 1 if getattr(backend, "compiles_models", False) else SHORTLIST
    seen = {_counts_key(reference.plan.kept(analysis))}
    timed: list[Candidate] = []
    for candidate in choice.by_score():
        key = _counts_key(candidate.plan.kept(analysis))
        if key not in seen and len(timed) < size:
            seen.add(key)
            timed.append(candidate)
    if not timed:
        return choice.chosen
    try:
        models = [timed_model(analysis, c.plan) for c in timed]
        unrounded = timed_model(analysis, reference.plan)
        dense = [_static(analysis.graph.model)] if len(timed) > 1 else []
        rounds = {"repeat": _shortlist_rounds(reference, timed)} if dense else {}
        # cached per model structure, device and kept counts: the same command here writes the same model again
        timings = cached_model_timings(
            _cache_dir(config) or default_cache_dir(), backend.key, analysis.graph.model,
            [*(["dense"] if dense else []), *(_counts_key(c.plan.kept(analysis)) for c in (reference, *timed))],
            lambda: backend.time_models([*dense, unrounded, *models], **rounds), how=rounds)
    except Exception:  # the prediction stands when the models cannot be timed (a dynamic input size, ...)
        return choice.chosen
    ref_ms = timings[len(dense)].best_ms
    fast = [(c, m, t.best_ms) for c, m, t in zip(timed, models, timings[len(dense) + 1:])
            if t.best_ms <= ref_ms * (1 + CONFIRM_TOLERANCE)]
    if not dense:
        return fast[0][0] if fast else reference
    dense_ms, dense_macs = timings[0].best_ms, count_macs(ModelGraph(dense[0]))

    def measured_score(entry: tuple[Candidate, onnx.ModelProto, float]) -> float:
        _, model, ms = entry
        speedup = dense_ms / ms
        efficiency = speedup * count_macs(ModelGraph(model)) / max(dense_macs, 1)
        return min(efficiency, EFFICIENCY_CAP) ** MEASURED_EFFICIENCY_WEIGHT * speedup

    # the table's choice stands (the reference when it chose nothing or measured slower) unless beaten clearly
    incumbent = next((e for e in fast if e[0] is choice.chosen), (reference, unrounded, ref_ms))
    best = max(fast, key=measured_score, default=incumbent)
    return best[0] if measured_score(best) >= measured_score(incumbent) * (1 + REPLACE_MARGIN) else incumbent[0]


def rounding_notice(config: PruneConfig, analysis: ChannelAnalysis, plan: PruningPlan) -> tuple[str, ...]:
    """A notice when auto rounding removed less than half the channels a plain ``--ratio`` asked for.

    Auto rounding keeps each group at the bottom of a latency step, rounding its kept count up unless the
    step below is about as near; where a model's steps are coarse against the ratio, little or nothing goes
    (the bundled Fashion-MNIST CNN at ``--ratio 0.1``: no channel of its 6 groups). The user should hear that
    rather than read an unchanged model, and how to remove the ratio exactly."""
    if not _plain_auto_ratio(config):
        return ()
    total = sum(g.size for g in analysis.groups)
    removed = plan.channels_removed
    if total == 0 or removed >= 0.5 * config.ratio * total:
        return ()
    return (f"auto rounding removed {removed / total:.1%} of the channels, not the {config.ratio:.0%} asked: this "
            f"model's latency steps on {config.latency_backend} are coarser than that (a group keeps the count at "
            "the bottom of its step); --round-to 1 removes the ratio exactly",)


def _shortlist_rounds(reference: Candidate, timed: list[Candidate]) -> int:
    """Rounds of the shortlist's timing: `SHORTLIST_REPEAT`, fewer (>= 10) where the table's prices of one round
    (the dense model, the reference and every timed plan) would not fit `SHORTLIST_BUDGET_MS`."""
    one_round = reference.dense_ms + reference.predicted_ms + sum(c.predicted_ms for c in timed)
    return int(min(SHORTLIST_REPEAT, max(10, SHORTLIST_BUDGET_MS // max(one_round, 1e-3))))


def _plain_auto_ratio(config: PruneConfig) -> bool:
    """A ``--ratio`` under auto rounding that no parameter, MAC or latency target replaces."""
    return (config.round_to == "auto" and config.ratio > 0 and config.target_latency is None
            and config.target_params is None and config.target_macs is None)


def _counts_key(kept: dict[int, int]) -> tuple[tuple[int, int], ...]:
    return tuple(sorted(kept.items()))


def timed_model(analysis: ChannelAnalysis, plan: PruningPlan) -> onnx.ModelProto:
    """`plan` applied to the analysed model, with static input sizes (for timing)."""
    from onnxprune.rewrite import apply_plan
    from onnxprune.shape_inference import infer_shapes

    return _static(infer_shapes(apply_plan(analysis, plan.labels(analysis))))


def _static(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxprune.latency.measure import static_inputs

    return static_inputs(model, None)


def macs_reduction(dense: onnx.ModelProto, pruned: onnx.ModelProto) -> float:
    """MACs of `dense` / MACs of `pruned` (counted on the models, so layers inside If/Loop/Scan bodies count)."""
    after = count_macs(ModelGraph(pruned))
    return count_macs(ModelGraph(dense)) / after if after > 0 else 1.0


def plan_for_target_latency(
    config: PruneConfig, analysis: ChannelAnalysis, table: LatencyTable, units: list[Unit]
) -> tuple[PruningPlan, LatencyReport]:
    """The plan meeting ``config.target_latency``, verified by measurement, and its report.

    Raises:
        OnnxPruneError: the target cannot be reached (the message says what the closest plan measures).
    """
    from onnxprune.latency.measure import measure_speedup
    from onnxprune.progress import task
    from onnxprune.rewrite import apply_plan
    from onnxprune.shape_inference import infer_shapes

    assert config.target_latency is not None
    backend = latency_backend(config)
    dense = _static(analysis.graph.model)
    target = parse_latency_target(config.target_latency)
    fraction, met = target.fraction, ""
    if fraction is None:  # milliseconds: a fraction of the dense latency measured here
        dense_ms = backend.time_models([dense])[0].median_ms
        fraction = target.fraction_of(dense_ms)
        if fraction >= 1:  # a budget the dense model already meets asks for no pruning
            fraction, met = 1.0, f"the dense model already measures {dense_ms:.3g} ms: nothing to remove"

    reductions: dict[int, float] = {}  # id of a measured plan -> its MACs reduction

    with task("verifying latency", total=4) as progress:
        def measure(plan: PruningPlan) -> tuple[float, float]:
            # shapes re-inferred, as `RemoveChannelsPass` does: the MACs are counted on them
            pruned = _static(infer_shapes(apply_plan(analysis, plan.labels(analysis)))) if plan.removed else dense
            found = measure_speedup(dense, pruned, backend)
            reductions[id(plan)] = macs_reduction(dense, pruned)
            progress.advance()
            return found.dense.median_ms, found.pruned.median_ms

        outcome = solve_latency_target(units, analysis, table, fraction, measure,
                                       max_group_ratio=config.max_group_ratio)
    if not outcome.reached:
        raise OnnxPruneError(f"--target-latency {target.text} on {backend.name}: {outcome.message} "
                             "(nothing was written)")
    report = _report(backend.name, outcome, reductions.get(id(outcome.plan), 1.0), config.target_latency)
    return outcome.plan, replace(report, message=met) if met else report


def _report(backend: str, outcome: LatencyOutcome, reduction: float, target: str) -> LatencyReport:
    chosen = outcome.chosen
    predicted_ratio = chosen.plan.predicted_ratio
    return LatencyReport(
        backend=backend, dense_ms=chosen.dense_ms, pruned_ms=chosen.pruned_ms, speedup=chosen.speedup,
        predicted_speedup=1 / predicted_ratio if predicted_ratio > 0 else 1.0, macs_reduction=reduction,
        efficiency=chosen.speedup / reduction, iterations=len(outcome.attempts), reached=outcome.reached,
        target=target, message=outcome.message,
    )


def measure_latency(
    config: PruneConfig,
    analysis: ChannelAnalysis,
    plan: PruningPlan,
    table: LatencyTable,
    dense: onnx.ModelProto,
    pruned: onnx.ModelProto,
) -> LatencyReport:
    """Measure `pruned` against `dense` (interleaved) on the configured backend: the summary's record.

    Raises:
        OnnxPruneError: the measurement failed (the models do not run on the backend); the message is one line.
    """
    from onnxprune.latency.measure import measure_speedup
    from onnxprune.latency.predict import predicted_ms
    from onnxprune.progress import task

    backend = latency_backend(config)
    try:
        with task("measuring the pruned model's latency"):
            found = measure_speedup(_static(dense), _static(pruned), backend)
    except OnnxPruneError:
        raise
    except Exception as exc:  # the model does not run on the backend: the pruned model is still fine
        raise OnnxPruneError(_first_line(exc)) from None
    predicted_ratio = predicted_ms(table, plan.kept(analysis)) / table.dense_ms if table.dense_ms > 0 else 1.0
    reduction = macs_reduction(dense, pruned)
    return LatencyReport(
        backend=backend.name, dense_ms=found.dense.median_ms, pruned_ms=found.pruned.median_ms,
        speedup=found.speedup, predicted_speedup=1 / predicted_ratio if predicted_ratio > 0 else 1.0,
        macs_reduction=reduction, efficiency=found.speedup / reduction,
    )
