"""Per-group kept counts for unconstrained plans: the allocations and parameter targets of constrained pruning.

Start reading at `allocate`. Constrained pruning turns a criterion into one *removal order* of all groups'
channels (`onnxprune.allocation.removal_order`: uniform, global or LAMP budgets) and meets a parameter
target with the shortest prefix of that order whose model is small enough. An unconstrained plan is
driven by the same order: a prefix says how many channels each group keeps (`counts_of`), every unit of the
group keeps that many of its own (`plan.choose`), and the target search measures the *unconstrained*
plan's parameters (`plan_params`, nonzero: what every unit keeps) at each probed prefix. So widening one
stream costs that stream's own budget (with ``group_budget`` its units keep fewer), never a channel of
every producer->consumer chain, and the result meets the target at the same granularity as constrained
pruning (one step of one group).

``keep_counts`` (per group, the kept counts allowed, e.g. `--round-to N` or a latency grid, keyed by the
group ids of the *unsplit* model's analysis; `split_group_ids` maps them) makes the order's steps end on
allowed counts only, and `plan.choose` snaps every unit onto them.

``allocation="knapsack"`` (calibration inputs needed): the order is constrained pruning's greedy knapsack
(`onnxprune.allocation_knapsack`) over cost curves measured on the *input* model with constrained removals
(`knapsack_curves`: each group alone, the unconstrained criterion, the closed-form ``ls`` refit), keyed by the
split model's group ids; the target search then walks that order on the unconstrained plan's parameters as
above. The constrained curve stands in for the unconstrained one (measuring unconstrained plans group by group
would need a plan, a repair and an export per point). Measured (pretrained CIFAR-10 ResNet20, all 10,000 test
images, 2,000 calibration images, l2 + seq, coupled drive, reader ls, stream repair, session 22, load 14-18):
20% removed 90.83 (uniform 90.30; constrained l2 + seq uniform 90.05), 40% 87.47 (uniform 86.66, constrained
86.09; constrained obs + seq knapsack 86.99); ResNet44 20% 92.34 (constrained 91.14), 40% 90.17 (uniform
89.90, constrained 88.12).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import onnx

from onnxprune.allocation import Unit, removal_order
from onnxprune.allocation_knapsack import RATIOS, knapsack_order, measure_curves
from onnxprune.calibration_data import as_calibration
from onnxprune.channels import ChannelAnalysis, DimRef, analyze
from onnxprune.criteria import Magnitude
from onnxprune.errors import UsageError
from onnxprune.graph import ModelGraph
from onnxprune.sensitivity import SensitivityRow
from onnxprune.upscale.config import UnconstrainedConfig
from onnxprune.upscale.oracle import silenced_positions
from onnxprune.upscale.plan import Prepared, choose
from onnxprune.upscale.records import UnconstrainedPlan

MAX_GROUP_RATIO = 0.9  # constrained pruning's default (`PruneConfig.max_group_ratio`)


def split_group_ids(original: ChannelAnalysis, split: ChannelAnalysis) -> dict[int, int]:
    """Group id of the unsplit model's analysis -> the id of the split model's group holding the same
    parameter axes (the split only inserts Identity nodes, so every parameter keeps its name)."""
    where = {DimRef(m.tensor, m.axis): g.id for g in split.groups for m in g.param_members}
    out: dict[int, int] = {}
    for g in original.groups:
        for m in g.param_members:
            gid = where.get(DimRef(m.tensor, m.axis))
            if gid is not None:
                out[g.id] = gid
                break
    return out


def plan_params(plan: UnconstrainedPlan) -> int:
    """Nonzero parameters of the model the plan computes (every unit's kept rows/columns; floats only, as
    constrained pruning counts them)."""
    cut: dict[str, dict[int, set[int]]] = {}
    for name, s in silenced_positions(plan).items():
        for axis, positions in s.cuts:
            cut.setdefault(name, {}).setdefault(axis, set()).update(int(p) for p in positions)
    graph = plan.analysis.graph
    total = 0
    for name, t in graph.initializers.items():
        if t.data_type not in (1, 10, 11, 16):
            continue
        dims = list(t.dims)
        for axis, gone in cut.get(name, {}).items():
            dims[axis] -= len(gone)
        total += int(np.prod(dims, dtype=np.int64))
    return total


def knapsack_curves(model: onnx.ModelProto, prep: Prepared, config: UnconstrainedConfig,
                    calib: dict[str, np.ndarray]) -> list[SensitivityRow]:
    """The knapsack's measured cost curves (`allocation_knapsack.measure_curves`: each group of the input
    pruned alone, *constrained*, with the criterion and the closed-form form of the repair), keyed by the
    split model's group ids. The constrained curve stands in for the unconstrained one: both remove the
    same number of channels per unit of the group, and measuring unconstrained plans group by group would
    cost a plan, repair and export per point."""
    criterion = "bn" if config.criterion == "energy" else config.criterion
    repair = config.repair if config.repair in ("ls", "seq") else "none"
    rows = measure_curves(model, as_calibration(calib), criterion, repair)
    ids = split_group_ids(analyze(ModelGraph(model)), prep.analysis)
    return [replace(r, group=ids[r.group]) for r in rows if r.group in ids]


def removal_steps(prep: Prepared, allocation: str, allowed: dict[int, tuple[int, ...]] | None = None,
                  curves: list[SensitivityRow] | None = None) -> list[Unit]:
    """The removal order of the prepared groups under `allocation` (constrained pruning's, on the groups'
    shared scores; LAMP budgets from channel L1 norms, as `SelectChannelsPass` has them; knapsack: the
    greedy knapsack over measured `curves`, `knapsack_curves`). With `allowed` a group's steps end on its
    allowed kept counts only (each step's key is that of its last channel)."""
    groups = [pg.group for pg in prep.groups]
    view = replace(prep.analysis, groups=groups)
    scores = {pg.group.id: pg.shared for pg in prep.groups}
    if allocation == "knapsack":
        if curves is None:
            raise UsageError("unconstrained allocation 'knapsack' needs measured cost curves (calibration inputs)")
        units = knapsack_order(view, scores, curves, list(RATIOS), max_group_ratio=MAX_GROUP_RATIO)
    else:
        budget = Magnitude(1).score_all(view) if allocation == "lamp" else None
        units = removal_order(view, scores, allocation, max_group_ratio=MAX_GROUP_RATIO, budget_scores=budget)
    if not allowed:
        return units
    sizes = {g.id: g.size for g in groups}
    by_group: dict[int, list[Unit]] = {}
    for u in units:
        by_group.setdefault(u.group, []).append(u)
    steps: list[Unit] = []
    for gid, seq in by_group.items():
        grid = allowed.get(gid)
        if grid is None:
            steps.extend(seq)
            continue
        removed, chunk = 0, []
        for u in seq:
            removed += len(u.channels)
            chunk.append(u.channels)
            if sizes[gid] - removed in grid:
                steps.append(Unit(gid, np.concatenate(chunk), u.key))
                chunk = []
    steps.sort(key=lambda u: (u.key, u.group))
    return steps


def counts_of(prep: Prepared, steps: list[Unit]) -> dict[int, int]:
    """Kept channels per group after removing `steps`."""
    counts = {pg.group.id: pg.group.size for pg in prep.groups}
    for u in steps:
        counts[u.group] -= len(u.channels)
    return counts


def allocate(prep: Prepared, config: UnconstrainedConfig, target_params: int | None = None,
             allowed: dict[int, tuple[int, ...]] | None = None,
             curves: list[SensitivityRow] | None = None) -> tuple[UnconstrainedPlan, dict[int, int]]:  # fmt: skip
    """The plan and its per-group kept counts for the config's allocation and ratio, or for a target.

    Args:
        target_params: parameters to keep (nonzero, `plan_params`): the shortest prefix of the removal
            order whose unconstrained plan has at most this many.
        allowed: per split group id, the kept counts allowed (ascending, ending with the group size).
        curves: allocation "knapsack" only: the measured cost curves (`knapsack_curves`).

    Raises:
        UsageError: the target is below what removing every removable step reaches.
    """
    if target_params is None and config.allocation == "uniform":
        counts = {pg.group.id: _ratio_count(pg.group.size, config.ratio, allowed, pg.group.id) for pg in prep.groups}
        return choose(prep, config, counts=counts, allowed_counts=allowed), counts
    assert config.allocation is not None  # resolved by UnconstrainedConfig.__post_init__
    steps = removal_steps(prep, config.allocation, allowed, curves)
    if target_params is None:  # the prefix removing `ratio` of all channels, as `allocation.plan_for_ratio`
        budget = math.floor(config.ratio * sum(pg.group.size for pg in prep.groups) + 1e-9)
        k, removed = 0, 0
        while k < len(steps) and removed < budget:
            removed += len(steps[k].channels)
            k += 1
        counts = counts_of(prep, steps[:k])
        return choose(prep, config, counts=counts, allowed_counts=allowed), counts

    last: dict[int, tuple[UnconstrainedPlan, dict[int, int], int]] = {}

    def at(k: int) -> tuple[UnconstrainedPlan, dict[int, int], int]:
        # `choose` writes the prep's pieces in place, so only the plan evaluated last is current (an earlier k is
        # recomputed when it is the answer)
        if k not in last:
            last.clear()
            counts = counts_of(prep, steps[:k])
            plan = choose(prep, config, counts=counts, allowed_counts=allowed)
            last[k] = (plan, counts, plan_params(plan))
        return last[k]

    # bisection for the shortest prefix that meets the target; the prefix removing every step (the costliest
    # plan to choose: its readers' greedy choices run almost to the end) is evaluated only if the search ends
    # there, to say the target is unreachable
    lo, hi = 0, len(steps)
    if at(lo)[2] <= target_params:
        return at(lo)[:2]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid)[2] <= target_params:
            hi = mid
        else:
            lo = mid
    plan, counts, params = at(hi)
    if params > target_params:
        raise UsageError(f"target params {target_params} is unreachable: the smallest this plan can get is {params}")
    return plan, counts


def _ratio_count(size: int, ratio: float, allowed: dict[int, tuple[int, ...]] | None, gid: int) -> int:
    """The ratio's kept count (`plan.ratio_keep`), rounded to the nearest allowed count."""
    n = max(1, size - math.floor(ratio * size + 1e-9))
    grid = (allowed or {}).get(gid)
    return min(grid, key=lambda c: (abs(c - n), -c)) if grid else n
