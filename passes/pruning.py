"""PrunePass: analyse channel groups, score them, plan removals, rewrite the model, re-infer shapes.

The pass's `info["summary"]` is the record written into the model's metadata and printed by the CLI.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import onnx

from onnxprune import __version__
from onnxprune.channels import ChannelAnalysis, analyze
from onnxprune.errors import UsageError
from onnxprune.graph import ModelGraph
from onnxprune.importer import check_model, infer_shapes
from onnxprune.metrics import count_macs, count_params
from onnxprune.passmanager import Pass, PassResult
from onnxprune.plan import PruningPlan, make_plan
from onnxprune.metadata import stamp
from onnxprune.repair import reanalyze
from onnxprune.rewrite import apply_plan

@dataclass(frozen=True)
class PruneConfig:
    """What to remove and how to choose it."""

    ratio: float = 0.3
    criterion: str = "l1"
    global_ranking: bool = False
    round_to: int = 1
    allow_inexact: bool = False  # also prune hidden sizes under LayerNorm / softmax axes
    max_group_ratio: float = 0.9
    seed: int = 0
    repair: str = "none"  # none | bias (data-free, BatchNorm statistics) | ls | seq (calibrated least squares)
    allocation: str | None = None  # uniform | global | lamp | sensitivity; None: global if global_ranking else uniform
    target_params: str | None = None  # keep N parameters, or P% of them (overrides ratio)
    target_macs: str | None = None  # keep N MACs, or P% of them (overrides ratio)
    calib_samples: int | None = None

    def __post_init__(self) -> None:
        from onnxprune.allocation import ALLOCATIONS
        from onnxprune.repair import REPAIRS

        if not 0 <= self.ratio < 1:
            raise UsageError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.round_to < 1:
            raise UsageError(f"round-to must be >= 1, got {self.round_to}")
        if self.repair not in REPAIRS:
            raise UsageError(f"unknown repair {self.repair!r} (choose from {', '.join(REPAIRS)})")
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise UsageError(f"unknown allocation {self.allocation!r} (choose from {', '.join(ALLOCATIONS)})")
        if self.target_params is not None and self.target_macs is not None:
            raise UsageError("give at most one of --target-params and --target-macs")

    @property
    def allocation_name(self) -> str:
        return self.allocation or ("global" if self.global_ranking else "uniform")


class PrunePass(Pass):
    """Analyse, score, allocate, (repair,) remove.

    Args:
        config: what to remove and how.
        criterion: a Criterion instance overriding `config.criterion`.
        calib: calibration samples (`calibration.CalibrationData`) for data criteria and `repair="ls"`.
        stats: precomputed `calibration.collect_stats` of the model (reused across runs, e.g. benchmarks).
    """

    def __init__(self, config: PruneConfig | None = None, criterion=None, calib=None, stats=None) -> None:
        self.config = config or PruneConfig()
        self._criterion = criterion
        self.calib = calib
        self.stats = stats
        self.notices: list[str] = []

    def criterion(self, stats=None):
        if self._criterion is not None:
            return self._criterion
        from onnxprune.criteria import get_criterion

        repair = "ls" if self.config.repair == "seq" else self.config.repair  # OBS: both leave the OBS error
        return get_criterion(self.config.criterion, self.config.seed, stats, repair)

    def check_data(self) -> list[str]:
        """Fail early when data is required but missing; one-line notices for data-free fallbacks."""
        from onnxprune.criteria import CRITERIA, DATA_CRITERIA

        c = self.config
        if self._criterion is None and c.criterion not in CRITERIA:
            raise UsageError(f"unknown criterion {c.criterion!r} (choose from {', '.join(sorted(CRITERIA))})")
        if self.calib is None and c.repair == "seq":
            raise UsageError("repair 'seq' needs calibration samples: pass --calib FILE.npz (or use --repair bias)")
        if self.stats is not None:
            return []
        if self.calib is None and self._criterion is None and c.criterion in DATA_CRITERIA:
            raise UsageError(f"criterion {c.criterion!r} needs calibration data: pass --calib FILE.npz")
        if self.calib is None and c.repair == "ls":
            raise UsageError("repair 'ls' needs calibration data: pass --calib FILE.npz (or use --repair bias)")
        notices = []
        if self.calib is None and self._criterion is None and c.criterion == "obs":
            notices.append("criterion obs without --calib: using the data-free BatchNorm Hessian surrogate")
        return notices

    def statistics(self, model):
        """Calibration statistics when the criterion or the repair reads them, else None."""
        c = self.config
        if self.stats is not None:
            return self.stats
        data_criterion = self._criterion is None and c.criterion in ("activation", "apoz", "obs")
        if self.calib is None or not (data_criterion or c.repair == "ls"):
            return None
        from onnxprune.calibration import check_calib, collect_stats

        data = check_calib(self.calib, model, c.calib_samples)
        return collect_stats(model, data, hessian=c.repair == "ls" or c.criterion == "obs", seed=c.seed)

    def plan(self, analysis: ChannelAnalysis, stats=None) -> PruningPlan:
        from onnxprune import allocation as alloc

        c = self.config
        criterion = self.criterion(stats)
        scores = criterion.score_all(analysis)
        targets = {"params": c.target_params, "macs": c.target_macs}
        if c.allocation_name in ("lamp", "sensitivity") or any(v is not None for v in targets.values()):
            budget = None
            if c.allocation_name == "sensitivity":
                units = self._sensitivity_units(analysis, scores, stats)
            elif c.allocation_name == "lamp":
                # LAMP is layer-adaptive *magnitude* pruning: the per-layer budgets come from LAMP scores
                # of the channel L1 norms, whatever the criterion; the criterion picks which channels go.
                # So every criterion is compared on the same budgets (not on budgets its own score
                # distribution happens to induce, e.g. uniform for random, [0, 1] plateaus for APoZ).
                from onnxprune.criteria import Magnitude

                budget = Magnitude(1).score_all(analysis)
            if c.allocation_name != "sensitivity":
                units = alloc.removal_order(
                    analysis, scores, c.allocation_name, round_to=c.round_to, max_group_ratio=c.max_group_ratio,
                    comparable=getattr(criterion, "comparable", False), budget_scores=budget,
                )
            for metric, text in targets.items():
                if text is not None:
                    total = count_params(analysis.graph) if metric == "params" else count_macs(analysis.graph)
                    return alloc.plan_for_target(units, analysis, alloc.parse_target(text, total, metric), metric)
            return alloc.plan_for_ratio(units, analysis, c.ratio)
        return make_plan(
            analysis, scores, c.ratio, global_ranking=c.global_ranking, round_to=c.round_to,
            max_group_ratio=c.max_group_ratio,
        )

    SENSITIVITY_RATIOS = (0.1, 0.2, 0.3, 0.5, 0.7)
    SENSITIVITY_SAMPLES = 16

    def _sensitivity_units(self, analysis: ChannelAnalysis, scores, stats):
        """Units ordered by each group's measured end-to-end output error (needs calibration samples)."""
        from onnxprune import allocation as alloc
        from onnxprune.calibration import check_calib
        from onnxprune.sensitivity import sensitivity

        c = self.config
        if self.calib is None:
            raise UsageError("allocation 'sensitivity' needs calibration data: pass --calib FILE.npz")
        model = analysis.graph.model
        data = check_calib(self.calib, model, min(self.calib.n, self.SENSITIVITY_SAMPLES))
        rows = sensitivity(model, data, list(self.SENSITIVITY_RATIOS), c.criterion,
                           c.repair, stats, c.allow_inexact)
        return alloc.sensitivity_order(analysis, scores, rows, list(self.SENSITIVITY_RATIOS),
                                       round_to=c.round_to, max_group_ratio=c.max_group_ratio)

    def call(self, model):
        start = time.perf_counter()
        self.notices = self.check_data()
        graph = ModelGraph(model)
        analysis = analyze(graph, allow_inexact=self.config.allow_inexact)
        stats = self.statistics(model)
        plan = self.plan(analysis, stats)
        labels = plan.labels(analysis)
        repair_info = None
        if len(labels):
            work, work_labels = analysis, labels
            if self.config.repair == "seq":
                from onnxprune.repair import repair_sequential

                from onnxprune.calibration import check_calib

                data = check_calib(self.calib, model, self.config.calib_samples)
                repaired, report = repair_sequential(analysis, labels, data, seed=self.config.seed)
                repair_info = report.as_dict()
                work, work_labels = reanalyze(analysis, labels, repaired, self.config.allow_inexact)
            elif self.config.repair != "none":
                from onnxprune.repair import repair_weights

                repaired, report = repair_weights(analysis, labels, self.config.repair, stats)
                repair_info = report.as_dict()
                work, work_labels = reanalyze(analysis, labels, repaired, self.config.allow_inexact)
            pruned = infer_shapes(apply_plan(work, work_labels))
            check_model(pruned)
        else:
            pruned = model
        after = ModelGraph(pruned)
        summary = {
            "tool": f"onnxprune {__version__}",
            "config": asdict(self.config),
            "params_before": count_params(graph),
            "params_after": count_params(after),
            "macs_before": count_macs(graph),
            "macs_after": count_macs(after),
            "groups": len(analysis.groups),
            "groups_pruned": plan.groups_pruned,
            "channels_removed": plan.channels_removed,
            "plan": {str(gid): int(len(idx)) for gid, idx in plan.removed.items() if len(idx)},
            "barriers": [b.as_dict() for b in analysis.barriers],
            "repair": repair_info,
            "notices": list(self.notices),
            "seconds": round(time.perf_counter() - start, 3),
        }
        if len(labels):
            stamp(pruned, summary)
        return PassResult(pruned, bool(len(labels)), {"summary": summary, "analysis": analysis, "plan": plan})
