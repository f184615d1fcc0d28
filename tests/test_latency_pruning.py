"""Latency-aware pruning (issue 13): allocation on channel grids, --round-to auto, --target-latency.

The allocation logic runs on deterministic fake grids and tables; the CLI runs on a small real conv net
with a temporary latency cache (conftest), and every timing claim is checked by an interleaved
measurement with generous margins (the machine is shared).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest

from models.testmodels import TEST_MODELS, _Builder, _image_input
from onnxprune import allocation as alloc
from onnxprune.channels import analyze
from onnxprune.cli import main
from onnxprune.criteria import Magnitude
from onnxprune.errors import UsageError
from onnxprune.graph import ModelGraph
from onnxprune.importer import canonicalize
from onnxprune.latency.table import GroupCurve, LatencyTable
from onnxprune.latency_allocation import (
    latency_order,
    parse_latency_target,
    plan_for_latency,
    solve_latency_target,
)
from onnxprune.passes.config import PruneConfig
from onnxprune.plan import make_plan, snap_keep
from onnxprune.verify import max_rel_error, random_inputs, run


def _analysis(name: str = "residual"):
    return analyze(ModelGraph(canonicalize(TEST_MODELS[name]())[0]))


def _kept(analysis, plan) -> dict[int, int]:
    return {g.id: g.size - len(plan.removed.get(g.id, ())) for g in analysis.groups}


def _fake_grid(analysis) -> dict[int, tuple[int, ...]]:
    """Every group: a quarter-size step grid (a deterministic stand-in for a latency grid)."""
    return {g.id: tuple(sorted({max(1, g.size * k // 4) for k in (1, 2, 3)} | {g.size})) for g in analysis.groups}


# -- grids in allocation --------------------------------------------------------------------------------------------


def test_snap_goes_up_and_nearest_only_at_the_top():
    allowed = np.array([8, 16])
    assert snap_keep(9, allowed) == 16 and snap_keep(8, allowed) == 8 and snap_keep(3, allowed) == 8
    assert snap_keep(15, allowed, "nearest") == 16  # 1 channel asked: 8 is much farther than 16
    assert snap_keep(12, allowed, "nearest") == 8  # equally near: the ratio still removes something
    assert snap_keep(10, np.array([4, 8, 12, 16]), "nearest") == 12  # below the top: always up


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.8])
def test_uniform_ratio_snaps_every_group_up_to_its_grid(ratio):
    analysis = _analysis()
    scores = Magnitude(1).score_all(analysis)
    grid = _fake_grid(analysis)
    kept = _kept(analysis, make_plan(analysis, scores, ratio, keep_counts=grid))
    for g in analysis.groups:
        asked = g.size - math.floor(ratio * g.size + 1e-9)
        assert kept[g.id] == min(c for c in grid[g.id] if c >= asked)


def test_global_ranking_and_orders_stay_on_the_grid():
    analysis = _analysis("depthwise")
    scores = Magnitude(1).score_all(analysis)
    grid = _fake_grid(analysis)
    plan = make_plan(analysis, scores, 0.4, global_ranking=True, keep_counts=grid)
    assert all(k in grid[g] for g, k in _kept(analysis, plan).items())
    for allocation in ("uniform", "global", "lamp"):
        units = alloc.removal_order(analysis, scores, allocation, keep_counts=grid)
        assert units and min(len(u.channels) for u in units) >= 1
        for n in range(len(units) + 1):  # every prefix is a plan on the grid
            kept = _kept(analysis, alloc.plan_from_units(units[:n]))
            assert all(k in grid[g] for g, k in kept.items())


def test_round_to_n_keeps_its_results():
    """--round-to N is the multiples grid: a uniform ratio keeps ceil(asked / N) * N (or the group size),
    exactly as before grids existed, and equals the explicit multiples grid."""
    from onnxprune.latency.grid import multiples

    analysis = _analysis()
    scores = Magnitude(1).score_all(analysis)
    for n in (2, 4, 8):
        for ratio in (0.2, 0.5, 0.9):
            plan = make_plan(analysis, scores, ratio, round_to=n)
            same = make_plan(analysis, scores, ratio, keep_counts=multiples(analysis, n))
            assert {g: list(i) for g, i in plan.removed.items()} == {g: list(i) for g, i in same.removed.items()}
            for g in analysis.groups:
                asked = g.size - math.floor(ratio * g.size + 1e-9)
                assert _kept(analysis, plan)[g.id] == min(g.size, math.ceil(asked / n) * n)


def test_nonzero_ratio_on_a_wide_top_step_still_removes_channels():
    analysis = _analysis()
    scores = Magnitude(1).score_all(analysis)
    grid = {g.id: (g.size // 2, g.size) for g in analysis.groups}
    assert make_plan(analysis, scores, 0.3, keep_counts=grid).channels_removed == 0  # "up": nothing
    plan = make_plan(analysis, scores, 0.3, keep_counts=grid, top="nearest")
    assert all(k in (g.size // 2, g.size) for g in analysis.groups for k in [_kept(analysis, plan)[g.id]])
    assert plan.channels_removed > 0 and make_plan(analysis, scores, 0.05, keep_counts=grid, top="nearest").channels_removed == 0


# -- the latency knapsack --------------------------------------------------------------------------------------------


def _fake_table(analysis, slow: int) -> LatencyTable:
    """Group `slow` costs 10 ms per 4 channels kept (steps of 4); the others cost nothing."""
    curves = {}
    for g in analysis.groups:
        counts = tuple(range(1, g.size + 1))
        per = 10.0 if g.id == slow else 0.0
        curves[g.id] = GroupCurve(g.id, counts, tuple(per * math.ceil(c / 4) for c in counts))
    dense = sum(c.ms[-1] for c in curves.values())
    return LatencyTable(backend="fake", dense_ms=dense, curves=curves)


def test_latency_order_spends_importance_where_milliseconds_are():
    analysis = _analysis()
    slow = max(analysis.groups, key=lambda g: g.size).id
    table = _fake_table(analysis, slow)
    scores = Magnitude(1).score_all(analysis)
    units = latency_order(analysis, scores, table, "global")
    found = plan_for_latency(units, analysis, table, 0.7 * table.dense_ms)
    assert found.predicted_ms <= 0.7 * table.dense_ms
    assert set(found.plan.removed) == {slow}  # only the group that costs time loses channels
    assert _kept(analysis, found.plan)[slow] % 4 == 0  # at the bottom of a step


def test_solve_iterates_to_the_measured_target_and_says_when_it_cannot():
    analysis = _analysis()
    slow = max(analysis.groups, key=lambda g: g.size).id
    table = _fake_table(analysis, slow)
    units = latency_order(analysis, Magnitude(1).score_all(analysis), table, "global")

    def measure(plan):  # the whole model: 40% of the time is outside the table, savings realised at 80%
        predicted = table.dense_ms - sum(table.at(g, table.curves[g].size) - table.at(g, k)
                                         for g, k in plan.kept(analysis).items())
        return 100.0, 100.0 * (0.4 + 0.6 * (1 - 0.8 * (1 - predicted / table.dense_ms)))

    outcome = solve_latency_target(units, analysis, table, 0.7, measure)
    assert outcome.reached and abs(outcome.chosen.measured_ratio / 0.7 - 1) <= 0.1
    assert 2 <= len(outcome.attempts) <= 4  # the first guess (0.7 predicted) measures 0.856: corrected
    unreachable = solve_latency_target(units, analysis, table, 0.3, measure)
    assert not unreachable.reached and "cannot reach 0.30x" in unreachable.message
    assert "smallest model the caps allow" in unreachable.message


def test_predicted_sizes_count_layers_inside_control_flow_bodies():
    """`allocation.predicted` (MAC and parameter targets) on a model whose convs live in If branches."""
    from onnxprune.metrics import count_macs, count_params
    from onnxprune.rewrite import apply_plan
    from onnxprune.shape_inference import infer_shapes
    from tests.test_control_flow import if_model

    analysis = analyze(ModelGraph(if_model()))
    plan = make_plan(analysis, Magnitude(1).score_all(analysis), 0.5)
    pruned = ModelGraph(infer_shapes(apply_plan(analysis, plan.labels(analysis))))
    assert alloc.predicted(analysis, plan) == (count_params(pruned), count_macs(pruned))
    assert alloc.predicted(analysis, plan)[1] < count_macs(analysis.graph)


def test_config_and_target_parsing():
    assert parse_latency_target("0.6x").fraction == 0.6 and parse_latency_target("12ms").ms == 12.0
    for bad in ("fast", "1.5x", "0x", "-3ms"):
        with pytest.raises(UsageError):
            parse_latency_target(bad)
    with pytest.raises(UsageError):
        PruneConfig(round_to="sometimes")
    with pytest.raises(UsageError):
        PruneConfig(round_to=0)
    with pytest.raises(UsageError):
        PruneConfig(target_latency="0.5x", target_macs="50%")
    with pytest.raises(UsageError):
        PruneConfig(rpc="127.0.0.1:9190")
    assert PruneConfig().round_to == 1 and not PruneConfig().measures_latency  # the library measures nothing


# -- the command line on a real conv net --------------------------------------------------------------------------


def _convnet() -> onnx.ModelProto:
    """A small VGG-like net at 56x56: enough work per layer (about 3 ms) for channel counts to matter."""
    b = _Builder(seed=13)
    x = b.conv_bn_act("input", 3, 32, stride=2)
    x = b.conv_bn_act(x, 32, 64)
    x = b.conv_bn_act(x, 64, 64)
    x = b.conv_bn_act(x, 64, 128, stride=2)
    x = b.conv_bn_act(x, 128, 128)
    return b.model("convnet", [_image_input(shape=(1, 3, 56, 56))], [("logits", b.head(x, 128))])


@pytest.fixture(scope="module")
def convnet(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("latency") / "convnet.onnx"
    onnx.save(_convnet(), str(path))
    return path


def _prune(capsys, *args) -> tuple[int, dict | None, str]:
    code = main(["prune", *map(str, args), "--json"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else None), captured.err


def _interleaved(*paths: Path, repeat: int = 40) -> list[float]:
    from onnxprune.latency.backend import OrtBackend

    timings = OrtBackend().time_models([onnx.load(str(p)) for p in paths], warmup=5, repeat=repeat)
    return [t.median_ms for t in timings]


@pytest.mark.exclusive
def test_auto_is_never_slower_than_unrounded(convnet, tmp_path, capsys):
    code, auto, err = _prune(capsys, convnet, "-o", tmp_path / "auto.onnx", "--ratio", "0.3")
    assert code == 0, err
    code, plain, err = _prune(capsys, convnet, "-o", tmp_path / "plain.onnx", "--ratio", "0.3", "--round-to", "1")
    assert code == 0, err
    assert plain["latency"] is None  # --round-to N measures nothing
    record = auto["latency"]
    assert set(record) >= {"backend", "dense_ms", "pruned_ms", "speedup", "predicted_speedup", "macs_reduction",
                           "efficiency", "iterations", "reached"}
    assert record["backend"].startswith("ort") and record["reached"] and record["iterations"] == 1
    assert record["speedup"] == pytest.approx(record["dense_ms"] / record["pruned_ms"], rel=1e-3)
    assert record["efficiency"] == pytest.approx(record["speedup"] / record["macs_reduction"], rel=1e-3)
    assert record["macs_reduction"] == pytest.approx(auto["macs_before"] / auto["macs_after"], rel=1e-3)
    assert auto["config"]["round_to"] == "auto"
    dense, t_auto, t_plain = _interleaved(convnet, tmp_path / "auto.onnx", tmp_path / "plain.onnx")
    assert t_auto <= t_plain * 1.1, (dense, t_auto, t_plain)
    assert t_auto < dense, (dense, t_auto)  # and faster than the dense model
    # the pruned model computes what the original computes with the removed channels silenced
    assert auto["verification"]["passed"]


@pytest.mark.exclusive
def test_target_latency_lands_within_ten_percent(convnet, tmp_path, capsys):
    out = tmp_path / "target.onnx"
    code, summary, err = _prune(capsys, convnet, "-o", out, "--target-latency", "0.6x")
    assert code == 0, err
    record = summary["latency"]
    assert record["reached"] and record["target"] == "0.6x" and 1 <= record["iterations"] <= 4
    assert abs(record["pruned_ms"] / record["dense_ms"] / 0.6 - 1) <= 0.10, record
    assert record["macs_reduction"] == pytest.approx(summary["macs_before"] / summary["macs_after"], rel=1e-3)
    dense, pruned = _interleaved(convnet, out)
    assert abs(pruned / dense / 0.6 - 1) <= 0.25, (dense, pruned)  # re-measured independently, loaded machine
    x = random_inputs(onnx.load(str(out)), seed=0)
    assert run(onnx.load(str(out)), x)[0].shape == run(onnx.load(str(convnet)), x)[0].shape


@pytest.mark.parametrize("extra", [["--criterion", "bn", "--repair", "bias"], ["--allocation", "lamp", "--criterion", "fpgm"],
                                   ["--allocation", "uniform"]])
@pytest.mark.exclusive
def test_target_latency_with_other_criteria_repairs_and_allocations(convnet, tmp_path, capsys, extra):
    code, summary, err = _prune(capsys, convnet, "-o", tmp_path / "o.onnx", "--target-latency", "0.7x", *extra)
    assert code == 0, err
    assert summary["latency"]["reached"] and summary["groups_pruned"] > 0
    assert summary["latency"]["pruned_ms"] / summary["latency"]["dense_ms"] <= 0.7 * 1.1
    assert summary["verification"]["passed"]  # the repair ran on the chosen channels and the result is exact


def test_target_in_milliseconds_and_the_cache_folder(convnet, tmp_path, capsys):
    cache = tmp_path / "tables"
    out = tmp_path / "ms.onnx"
    code, summary, err = _prune(capsys, convnet, "-o", out, "--target-latency", "10000ms", "--latency-cache", cache)
    assert code == 0, err
    assert summary["groups_pruned"] == 0 and summary["params_after"] == summary["params_before"]
    assert "already measures" in summary["latency"]["message"] and summary["latency"]["reached"]
    assert any(cache.rglob("*.json"))  # the latency table went to --latency-cache


def test_unreachable_target_says_why_and_writes_nothing(convnet, tmp_path, capsys):
    out = tmp_path / "never.onnx"
    code, _, err = _prune(capsys, convnet, "-o", out, "--target-latency", "0.02x")
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "cannot reach 0.02x" in err and "measures" in err
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--target-latency", "0.6x", "--ratio", "0.3"], "--ratio and --target-latency"),
    (["--target-latency", "0.6x", "--target-params", "50%"], "--target-params and --target-latency"),
    (["--target-latency", "0.6x", "--target-macs", "50%"], "--target-macs and --target-latency"),
    (["--rpc", "127.0.0.1:9190"], "--device-key"),
    (["--target-latency", "soon"], "target-latency"),
    (["--round-to", "0"], "round-to"),
    (["--round-to", "often"], "round-to"),
    (["--latency-backend", "abacus"], "unknown latency backend"),
    (["--mode", "unconstrained", "--round-to", "4"], "--round-to"),
    (["--mode", "unconstrained", "--target-latency", "0.5x"], "--target-latency"),
])  # fmt: skip
def test_usage_errors(convnet, tmp_path, capsys, args, needle):
    code, _, err = _prune(capsys, convnet, "-o", tmp_path / "x.onnx", *args)
    assert code == 2 and needle in err, err
    assert not (tmp_path / "x.onnx").exists()


def test_dynamic_inputs_need_shape_for_a_latency_target(tmp_model, tmp_path, capsys):
    path = tmp_model(TEST_MODELS["attention_dynamic"](), "dyn.onnx")
    code, _, err = _prune(capsys, path, "-o", tmp_path / "d.onnx", "--target-latency", "0.8x")
    assert code == 2 and "--shape" in err


def test_ratio_zero_reproduces_the_original(convnet, tmp_path, capsys):
    out = tmp_path / "same.onnx"
    code, summary, err = _prune(capsys, convnet, "-o", out, "--ratio", "0")
    assert code == 0, err
    assert summary["params_after"] == summary["params_before"] and summary["groups_pruned"] == 0
    assert summary["latency"] is None  # nothing removed: nothing to measure
    x = random_inputs(onnx.load(str(convnet)), seed=1)
    assert max_rel_error(run(onnx.load(str(convnet)), x), run(onnx.load(str(out)), x)) < 1e-6


def test_unconstrained_mode_accepts_the_auto_default(convnet, tmp_path, capsys):
    code, summary, err = _prune(capsys, convnet, "-o", tmp_path / "u.onnx", "--mode", "unconstrained")
    assert code == 0, err
    assert summary["mode"] == "unconstrained"
    grid = summary["config"]["keep_counts"]  # auto: every unit keeps a count of its group's latency grid
    assert grid and all(counts == sorted(counts) for counts in grid.values())
    assert main(["prune", str(convnet), "-o", str(tmp_path / "u1.onnx"), "--mode", "unconstrained", "--round-to", "1",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["keep_counts"] is None


def test_text_report_has_one_latency_line(convnet, tmp_path, capsys):
    assert main(["prune", str(convnet), "-o", str(tmp_path / "t.onnx"), "--ratio", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "latency" in out and "faster on ort" in out and "efficiency" in out
    stored = {p.key: p.value for p in onnx.load(str(tmp_path / "t.onnx")).metadata_props}
    assert json.loads(stored["onnxprune.summary"])["latency"]["speedup"] > 0  # the output remembers it
