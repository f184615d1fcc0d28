"""The latency knapsack (`onnxprune.latency_allocation.latency_order`) on deterministic fake tables.

Importance is a per-group cost curve (measured error squared, or the data-free share of squared scores
removed) traded against the milliseconds the table says each unit saves: these tests pin that trade, the
per-group floor and the grid, without timing anything.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from models.testmodels import TEST_MODELS
from onnxprune.allocation import plan_from_units
from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.importer import canonicalize
from onnxprune.latency.table import GroupCurve, LatencyTable
from onnxprune.latency_allocation import DATA_FREE_MIN_KEEP, latency_order, plan_for_latency
from onnxprune.sensitivity import SensitivityRow


def _analysis(name: str = "chain"):
    return analyze(ModelGraph(canonicalize(TEST_MODELS[name]())[0]))


def _table(analysis, ms_per_channel: dict[int, float]) -> LatencyTable:
    """Group g costs ``ms_per_channel[g]`` per kept channel (linear: every removed channel saves it)."""
    curves = {}
    for g in analysis.groups:
        counts = tuple(range(1, g.size + 1))
        curves[g.id] = GroupCurve(g.id, counts, tuple(ms_per_channel.get(g.id, 0.0) * c for c in counts))
    return LatencyTable(backend="fake", dense_ms=sum(c.ms[-1] for c in curves.values()), curves=curves)


def _kept(analysis, units) -> dict[int, int]:
    plan = plan_from_units(units)
    return {g.id: g.size - len(plan.removed.get(g.id, ())) for g in analysis.groups}


def _flat_scores(analysis) -> dict[int, np.ndarray]:
    """Every channel scores 1 except a ramp, so removal orders are defined and groups are alike per channel."""
    return {g.id: np.linspace(0.5, 1.5, g.size) for g in analysis.groups}


def test_data_free_cost_halves_no_narrow_group_to_save_what_a_wide_one_saves():
    """chain: groups of 8, 16 and 32 channels, each channel saving the same milliseconds. Group-normalised
    scores priced a channel alike in every group; the share of squared scores removed prices 4 channels of
    the 8-wide group at 4x those of the 32-wide one, so the wide group goes first."""
    analysis = _analysis("chain")
    narrow, wide = analysis.groups[0].id, analysis.groups[2].id
    assert (analysis.groups[0].size, analysis.groups[2].size) == (8, 32)
    table = _table(analysis, {g.id: 1.0 for g in analysis.groups})
    units = latency_order(analysis, _flat_scores(analysis), table, "global")
    budget = table.dense_ms - 8.0  # 8 channels' worth of milliseconds
    kept = _kept(analysis, units[: plan_for_latency(units, analysis, table, budget).units])
    assert kept[narrow] == 8 and kept[wide] <= 32 - 5, kept
    # per unit of the order, the narrow group's first channel costs more than the wide group's
    first = {u.group: u.key for u in reversed(units)}
    assert first[narrow] > 2 * first[wide]


def test_measured_error_curves_steer_the_cut_to_the_insensitive_group():
    analysis = _analysis("chain")
    ids = [g.id for g in analysis.groups]
    ratios = [0.25, 0.5, 0.75]
    errors = {ids[0]: [0.05, 0.1, 0.2], ids[1]: [0.6, 0.9, 1.0], ids[2]: [0.6, 0.9, 1.0]}
    rows = [SensitivityRow(g.id, g.size, 0, "", errors[g.id]) for g in analysis.groups]
    table = _table(analysis, {g.id: 1.0 for g in analysis.groups})
    units = latency_order(analysis, _flat_scores(analysis), table, "knapsack", sensitivity=(rows, ratios))
    kept = _kept(analysis, units[: plan_for_latency(units, analysis, table, table.dense_ms - 4.0).units])
    assert kept == {ids[0]: 4, ids[1]: 16, ids[2]: 32}  # the insensitive 8-wide group pays, despite its width
    # nothing beyond the largest measured fraction: the insensitive group keeps a quarter
    assert _kept(analysis, units)[ids[0]] == 2


@pytest.mark.parametrize("max_group_ratio", [0.5, 0.9])
def test_no_group_is_emptied_and_every_prefix_is_on_the_grid(max_group_ratio):
    analysis = _analysis("depthwise")
    grid = {g.id: tuple(sorted({max(1, g.size * k // 4) for k in (1, 2, 3)} | {g.size})) for g in analysis.groups}
    table = _table(analysis, {g.id: 0.1 * (i + 1) for i, g in enumerate(analysis.groups)})
    scores = {g.id: np.random.default_rng(g.id).random(g.size) for g in analysis.groups}
    units = latency_order(analysis, scores, table, "global", keep_counts=grid, max_group_ratio=max_group_ratio)
    assert units
    for n in range(len(units) + 1):
        kept = _kept(analysis, units[:n])
        assert all(k in grid[g.id] for g in analysis.groups for k in [kept[g.id]])
        assert all(kept[g.id] >= math.ceil((1 - max_group_ratio) * g.size - 1e-9) for g in analysis.groups)
    by_group: dict[int, list[float]] = {}
    for u in units:
        by_group.setdefault(u.group, []).append(u.key)
    assert all(a <= b for keys in by_group.values() for a, b in itertools.pairwise(keys))  # the hull's slopes


def test_units_that_save_no_time_are_never_taken():
    """A group the table prices flat below half its size loses at most half; a group without time, nothing."""
    analysis = _analysis("chain")
    a, b, c = (g.id for g in analysis.groups)
    curves = {
        a: GroupCurve(a, tuple(range(1, 9)), tuple(float(max(k, 4)) for k in range(1, 9))),
        b: GroupCurve(b, tuple(range(1, 17)), tuple(0.0 for _ in range(16))),
        c: GroupCurve(c, tuple(range(1, 33)), tuple(float(k) for k in range(1, 33))),
    }
    table = LatencyTable(backend="fake", dense_ms=40.0, curves=curves)
    units = latency_order(analysis, _flat_scores(analysis), table, "global")
    kept = _kept(analysis, units)
    assert kept[a] == 4 and kept[b] == 16 and kept[c] == math.ceil(DATA_FREE_MIN_KEEP * 32)  # the data-free floor


def test_a_target_the_dense_model_meets_removes_nothing_whatever_the_noise():
    from onnxprune.latency_allocation import solve_latency_target

    analysis = _analysis("chain")
    table = _table(analysis, {g.id: 1.0 for g in analysis.groups})
    units = latency_order(analysis, _flat_scores(analysis), table, "global")
    calls = []

    def noisy(plan):  # the dense model measured 15% slower than itself (a loaded machine)
        calls.append(plan)
        return 10.0, 11.5

    outcome = solve_latency_target(units, analysis, table, 1.0, noisy)
    assert outcome.reached and outcome.plan.channels_removed == 0 and len(calls) == 1


def test_a_coupled_group_costs_every_layer_it_runs_through():
    """residual: the residual stream couples several convs; at equal milliseconds per channel and equal
    scores, a plain group loses channels before the stream does."""
    analysis = _analysis("residual")
    members = {g.id: len(g.param_members) for g in analysis.groups}
    stream = max(members, key=members.get)
    plain = min((g for g in analysis.groups if g.size == analysis.groups[stream].size), key=lambda g: members[g.id]).id
    assert members[stream] > members[plain]
    table = _table(analysis, {stream: 1.0, plain: 1.0})
    units = latency_order(analysis, _flat_scores(analysis), table, "global")
    first = [u.group for u in units]
    assert first.index(plain) < first.index(stream)
    kept = _kept(analysis, units[: plan_for_latency(units, analysis, table, table.dense_ms - 4.0).units])
    assert kept[stream] == analysis.groups[stream].size and kept[plain] < analysis.groups[plain].size
