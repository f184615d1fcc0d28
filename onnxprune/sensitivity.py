"""Per-group sensitivity: output error of the model when only one group is pruned, at several ratios.

For each channel group and each ratio, the lowest-scoring ``floor(ratio * size)`` channels of that group
alone are removed (optionally repaired), and the relative L2 error of all outputs against the original
model is measured on the calibration samples. Flat curves mark groups that can lose many channels.

How it is measured: with repair "none", "bias" or "ls" the pruned model is never built. The removal is the
original model with the group's channels silenced (the pruning oracle, `rewrite.apply_mask`) and the readers'
repaired weights, so only the nodes downstream of the changed initializers run, from the original values
cached at the cut, in one onnxruntime session per group (`sensitivity_runs.GroupScan`). The "seq" repair,
inexact groups and models with subgraphs build the pruned model for every point (`_pruned_error`).
Measured (bench/sensitivity_speed.py, 64 N(0, 1) samples, the 7 knapsack ratios, CPU s of the scan, loaded
2-core machine; bench/repair_speed_results.txt): ResNet-50 at 224x224 obs + ls 2,905 -> 876 (3.3x; 11.2 ->
3.4 s a point, ~90% of it now the downstream forward passes: on average 52% of the model's multiply-adds lie
downstream of a group), CIFAR ResNet-20 obs + ls 20.0 -> 6.2, l1 + none 17.5 -> 4.9; errors within 1.4e-8
(ResNet-50) / 1.2e-7 (ResNet-20) of the pruned models' (relative <= 3.3e-6 where an error is above 1e-5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxprune.calibration import CalibrationData, CalibrationStats
from onnxprune.channels import ChannelAnalysis, ChannelGroup, analyze
from onnxprune.graph import ModelGraph
from onnxprune.plan import PruningPlan
from onnxprune.progress import task


@dataclass
class SensitivityRow:
    group: int
    channels: int
    params: int
    members: str
    errors: list[float]  # one per ratio (nan where the ratio removes no channel)


def relative_error(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    num = sum(float(((r.astype(np.float64) - g.astype(np.float64)) ** 2).sum()) for r, g in zip(ref, got))
    den = sum(float((r.astype(np.float64) ** 2).sum()) for r in ref)
    return math.sqrt(num / max(den, 1e-30))


def _outputs(model: onnx.ModelProto, data: CalibrationData) -> list[np.ndarray]:
    data = data.for_model(model)
    from onnxprune.verify import session

    sess = session(model)
    feeds = {i.name for i in sess.get_inputs()}
    runs = [sess.run(None, {k: v for k, v in data.sample(i).items() if k in feeds}) for i in range(data.n)]
    return [np.concatenate([r[j] for r in runs]) for j in range(len(runs[0]))]


def sensitivity(
    model: onnx.ModelProto,
    data: CalibrationData,
    ratios: list[float],
    criterion: str = "l1",
    repair: str = "none",
    stats: CalibrationStats | None = None,
    allow_inexact: bool = False,
) -> list[SensitivityRow]:
    """One row per channel group: the relative output error with only that group pruned, per ratio.

    Args:
        model: the model to measure (normalised).
        data: calibration samples the errors are measured on.
        ratios: fractions of each group's channels to remove, in (0, 1).
        criterion: importance criterion ordering each group's channels (`criteria.CRITERIA`).
        repair: "none", "bias", "ls" or "seq", applied after each removal.
        stats: calibration statistics of `model`, for data-driven criteria and the "ls" repair.
        allow_inexact: include LayerNorm/softmax-coupled groups.
    """
    data = data.for_model(model)
    from onnxprune.criteria import get_criterion
    from onnxprune.sensitivity_runs import GroupScan, supported

    analysis = analyze(ModelGraph(model), allow_inexact=allow_inexact)
    scores = get_criterion(criterion, 0, stats, "ls" if repair == "seq" else repair).score_all(analysis)
    scan = GroupScan(analysis, data, repair, stats) if repair != "seq" and supported(model) else None
    reference: list[np.ndarray] | None = None
    groups = analysis.groups
    # the scan walks the graph in order: groups sorted by where their changes start (rows keep analysis order)
    order_of = {g.id: scan.region(g).first for g in groups} if scan is not None else {}
    measured: dict[int, SensitivityRow] = {}
    with task("sensitivity", total=len(groups) * len(ratios)) as progress:
        for number, g in enumerate(sorted(groups, key=lambda g: order_of.get(g.id, 0)), 1):
            progress.update(f"sensitivity: group {number}/{len(groups)}")
            order = np.argsort(scores[g.id], kind="stable")
            counts = [min(g.size - g.min_keep, int(math.floor(r * g.size + 1e-9))) for r in ratios]  # >= k experts stay
            removals = [np.sort(order[:n]) if n > 0 else None for n in counts]
            if scan is not None and not g.inexact:
                errors = list(progress.track(scan.errors(g, removals)))
            else:  # the pruned model itself: sequential repair, inexact groups, models with subgraphs
                if reference is None:
                    reference = _outputs(model, data)
                errors = []
                for removal in progress.track(removals):
                    errors.append(float("nan") if removal is None else
                                  _pruned_error(analysis, g, removal, data, reference, repair, stats, allow_inexact))
            members = ", ".join(str(m) for m in g.param_members[:2]) + (" …" if len(g.param_members) > 2 else "")
            measured[g.id] = SensitivityRow(g.id, g.size, g.params, members, errors)
    return [measured[g.id] for g in groups]


def _pruned_error(
    analysis: ChannelAnalysis,
    group: ChannelGroup,
    removal: np.ndarray,
    data: CalibrationData,
    reference: list[np.ndarray],
    repair: str,
    stats: CalibrationStats | None,
    allow_inexact: bool,
) -> float:
    """The relative output error of the physically pruned (and repaired) model without `removal` of `group`."""
    from onnxprune.repair import reanalyze, repair_sequential, repair_weights
    from onnxprune.rewrite import apply_plan
    from onnxprune.shape_inference import infer_shapes

    labels = PruningPlan({group.id: removal}).labels(analysis)
    work, work_labels = analysis, labels
    if repair == "seq":
        repaired, _ = repair_sequential(analysis, labels, data)
        work, work_labels = reanalyze(analysis, labels, repaired, allow_inexact)
    elif repair != "none":
        repaired, _ = repair_weights(analysis, labels, repair, stats)
        work, work_labels = reanalyze(analysis, labels, repaired, allow_inexact)
    pruned = infer_shapes(apply_plan(work, work_labels))
    return relative_error(reference, _outputs(pruned, data))


def plot(rows: list[SensitivityRow], ratios: list[float], path: str | Path, title: str = "") -> None:
    """PNG: output error vs ratio, one line per group.

    Draws on a standalone `Figure` (Agg canvas), never through pyplot: the caller's matplotlib backend and
    open figures are left alone.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.subplots()
    for row in rows:
        ax.plot([r * 100 for r in ratios], row.errors, marker="o", label=f"group {row.group} ({row.channels} ch)")
    ax.set_xlabel("channels removed from the group (%)")
    ax.set_ylabel("relative output error")
    ax.set_yscale("log")
    ax.set_title(title or "per-group pruning sensitivity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
