"""The default ``--ratio`` plan under auto rounding (`onnxprune.latency.ratio_choice`) and the latency
target's allocation with calibration data (`passes.latency_select.with_latency_allocation`).

Everything runs on deterministic fake backends: the choice is a property of the table's predictions, and
the latency target is verified by a backend whose "latency" is the model's MAC count.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace

import numpy as np
import onnx
import pytest

from onnxprune.channels import analyze
from onnxprune.criteria import Magnitude
from onnxprune.graph import ModelGraph
from onnxprune.latency import calibrate, ratio_choice
from onnxprune.latency.backend import BACKENDS, ort_probe_counts
from onnxprune.latency.grid import keep_counts
from onnxprune.latency.predict import predicted_ms
from onnxprune.latency.ratio_choice import SAFETY, UNIFORM_ANY, UNIFORM_GRID, choose_ratio_plan
from onnxprune.latency.table import build_table
from onnxprune.latency.timing import Timing
from onnxprune.metrics import count_macs
from onnxprune.plan import PruningPlan, make_plan
from tests.test_latency import FakeBackend
from tests.test_latency_calibrate import _three_groups


def _setup(tmp_path):
    analysis = analyze(ModelGraph(_three_groups()))
    table = build_table(analysis, FakeBackend(), cache_dir=tmp_path)
    return analysis, table, keep_counts(table, analysis), Magnitude(1).score_all(analysis)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.7])
def test_the_choice_is_never_predicted_slower_than_unrounded_and_wins_on_score(tmp_path, ratio):
    analysis, table, grid, scores = _setup(tmp_path)
    choice = choose_ratio_plan(analysis, scores, table, ratio, keep_counts=grid)
    ref = choice.reference
    assert ref.name == UNIFORM_ANY and ref.plan.kept(analysis) == make_plan(analysis, scores, ratio).kept(analysis)
    assert ref.predicted_ms == pytest.approx(predicted_ms(table, ref.plan.kept(analysis), grids=grid))
    assert choice.chosen.predicted_ms <= ref.predicted_ms * (1 + 1e-9)
    per_source = len(ratio_choice.ALPHAS) * len(ratio_choice.BLENDS)
    assert len(choice.candidates) == 2 + per_source  # an uncalibrated table: one price source
    eligible = [c for c in choice.candidates[1:]
                if c.predicted_ms <= ref.predicted_ms * (1 + 1e-9) * (1 if c.name == UNIFORM_GRID else 1 - SAFETY)]
    if eligible:
        assert choice.chosen.score == max(c.score for c in eligible)
    total = sum(g.size for g in analysis.groups)
    for c in choice.candidates:  # every candidate keeps the --ratio promise (up to snapping to the grid)
        assert abs(c.plan.channels_removed / total - ratio) <= 0.2, c.name
    factors = dict.fromkeys(table.node_dense_ms, 1.0)
    factors["dw"] = 0.3  # in the model the depthwise conv costs a third of its price (latency.calibrate)
    both = choose_ratio_plan(analysis, scores, calibrate.calibrated(table, factors), ratio, keep_counts=grid)
    assert len(both.candidates) == 2 + 2 * per_source  # micro-model and in-model weights
    assert both.chosen.predicted_ms <= both.reference.predicted_ms * (1 + 1e-9)
    only_uniform = choose_ratio_plan(analysis, scores, table, ratio, keep_counts=grid, weighted=False)
    assert {c.name for c in only_uniform.candidates} == {UNIFORM_ANY, UNIFORM_GRID}


def test_a_weighted_plan_predicted_slower_than_unrounded_is_never_chosen(tmp_path, monkeypatch):
    """The failure this guards against (CIFAR ResNet20 at 0.5: the weighted plan left the residual streams
    whole and ran at 0.81x of the dense latency against 0.62x unrounded): weighted plans that remove
    little time must lose to the uniform ones however efficient they look."""
    analysis, table, grid, scores = _setup(tmp_path)
    dw = next(g for g in analysis.groups if "dw" in table.curves[g.id].nodes)
    step = int(sorted(grid[dw.id])[-2])  # one step down the depthwise group: time without MACs, little of it
    lazy = PruningPlan({dw.id: np.arange(dw.size - step)})
    monkeypatch.setattr(ratio_choice, "weighted_plan", lambda *a, **k: lazy)
    choice = choose_ratio_plan(analysis, scores, table, 0.5, keep_counts=grid)
    weighted = [c for c in choice.candidates if c.name.startswith("weighted")]
    assert weighted and all(c.predicted_ms > choice.reference.predicted_ms for c in weighted)
    assert max(c.efficiency for c in weighted) > choice.chosen.efficiency  # it would have won on score alone
    assert choice.chosen.name in (UNIFORM_GRID, UNIFORM_ANY)

    def grid_plan_slow(analysis, scores, ratio, keep_counts=None, **k):  # the grid plan predicted slower too
        return lazy if keep_counts is not None else make_plan(analysis, scores, ratio, **k)

    monkeypatch.setattr(ratio_choice, "make_plan", grid_plan_slow)
    nothing = choose_ratio_plan(analysis, scores, table, 0.5, keep_counts=grid)  # nothing beats the reference
    assert nothing.chosen is nothing.reference


# -- --target-latency with --calib and no --allocation: the knapsack's measured curves ------------------------


class MacsBackend:
    """Deterministic "latency": a model's MACs (plus a fixed call cost), so targets are reachable exactly."""

    name = "macs"
    key = "macs|test"
    emulated = False

    def time_models(self, models, *, warmup=3, repeat=15, progress=None):
        return [Timing(1e-3 + 1e-6 * count_macs(ModelGraph(onnx.shape_inference.infer_shapes(m))), 0.0, repeat)
                for m in models]

    def probe_counts(self, size, lowest):
        return ort_probe_counts(size, lowest)


@pytest.fixture()
def macs_cli(monkeypatch, tmp_path):
    from onnxprune import cli

    monkeypatch.setitem(BACKENDS, "macs", lambda option, **kw: MacsBackend())
    monkeypatch.setattr(cli, "_latency_backends", lambda config: None)  # no compile targets to load
    from tests.test_latency_pruning import _convnet

    model = tmp_path / "convnet.onnx"
    onnx.save(_convnet(), str(model))
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.random.default_rng(0).standard_normal((8, 3, 56, 56)).astype(np.float32))

    def prune(capsys, *args):
        code = cli.main(["prune", str(model), "--latency-backend", "macs", "--latency-cache", str(tmp_path / "t"),
                         "--no-verify", "--json", *map(str, args)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return json.loads(captured.out)

    return prune, calib, tmp_path


def _weights(path) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.exclusive
def test_target_latency_with_calib_allocates_by_measured_curves(macs_cli, capsys, monkeypatch):
    from onnxprune.passes import select

    prune, calib, tmp = macs_cli
    measured: list[str] = []
    original = select.measure_sensitivity

    def counting(config, *args):
        measured.append(config.allocation_name)
        return original(config, *args)

    monkeypatch.setattr(select, "measure_sensitivity", counting)
    default = prune(capsys, "-o", tmp / "d.onnx", "--target-latency", "0.6x", "--calib", calib)
    assert measured == ["knapsack"]  # the curves were measured once, for the knapsack
    assert default["config"]["allocation"] == "knapsack"
    explicit = prune(capsys, "-o", tmp / "k.onnx", "--target-latency", "0.6x", "--calib", calib,
                     "--allocation", "knapsack")
    assert _weights(tmp / "d.onnx") == _weights(tmp / "k.onnx")  # the same plan as asking for it
    for summary in (default, explicit):
        assert summary["latency"]["reached"]
        assert abs(summary["latency"]["pruned_ms"] / summary["latency"]["dense_ms"] / 0.6 - 1) <= 0.1

    measured.clear()
    data_free = prune(capsys, "-o", tmp / "g.onnx", "--target-latency", "0.6x")  # no samples: data-free cost
    assert measured == [] and data_free["config"]["allocation"] in (None, "global")
    chosen = prune(capsys, "-o", tmp / "c.onnx", "--target-latency", "0.6x", "--calib", calib, "--allocation", "global")
    assert measured == [] and chosen["config"]["allocation"] == "global"  # an explicit allocation stays


# -- the table shortlists, the measurement chooses ---------------------------------------------------------------


class ScriptedBackend:
    """Times each call's models as scripted (ms by position: [dense,] reference, shortlist...), and records them."""

    name = "scripted"
    key = FakeBackend.key  # where the table was measured
    emulated = False

    def __init__(self, ms):
        self.ms, self.calls = ms, []

    def time_models(self, models, *, warmup=3, repeat=15, progress=None):
        self.calls.append(list(models))
        assert len(models) <= len(self.ms)
        return [Timing(m, 0.0, repeat, m) for m in self.ms[: len(models)]]


def _confirm(tmp_path, monkeypatch, ms, *, only_chosen=False, table_chose_reference=False, cache=None):
    """`latency_select.confirmed` on a real multi-candidate choice, timed by `ScriptedBackend(ms)`; its timings
    cached in `cache` (default: a new folder)."""
    from onnxprune.passes import latency_select
    from onnxprune.passes.config import PruneConfig

    analysis, table, grid, scores = _setup(tmp_path)
    choices = [choose_ratio_plan(analysis, scores, table, r, keep_counts=grid) for r in (0.3, 0.7, 0.4, 0.6)]
    choice = next(c for c in choices  # a real choice to measure: the plan differs from the unrounded one
                  if c.chosen.plan.kept(analysis) != c.reference.plan.kept(analysis))
    if only_chosen:
        choice = ratio_choice.RatioChoice(choice.chosen, choice.reference, (choice.reference, choice.chosen))
    if table_chose_reference:
        choice = ratio_choice.RatioChoice(choice.reference, choice.reference, choice.candidates)
    backend = ScriptedBackend(ms)
    monkeypatch.setattr(latency_select, "latency_backend", lambda config: backend)
    # a folder of its own per call: the shortlist's timings are cached (`latency.model_timings`)
    config = PruneConfig(ratio=0.5, round_to="auto", latency_cache=cache or tempfile.mkdtemp(dir=tmp_path))
    got = latency_select.confirmed(config, analysis, choice, table.backend_key)
    return got, choice, backend, analysis, table


def _pruned_model(analysis, candidate):
    """The model a candidate's plan gives, as `confirmed` times it."""
    from onnxprune.passes import latency_select

    return latency_select.timed_model(analysis, candidate.plan)


@pytest.mark.parametrize(("ms", "keeps"), [((1.0, 1.5), False), ((1.0, 1.01), True), ((1.0, 0.5), True)])
def test_a_lone_choice_measured_slower_than_unrounded_falls_back_to_it(tmp_path, monkeypatch, ms, keeps):
    from onnxprune.passes import latency_select
    from onnxprune.passes.config import PruneConfig

    got, choice, backend, analysis, table = _confirm(tmp_path, monkeypatch, ms, only_chosen=True)
    assert got is (choice.chosen if keeps else choice.reference)
    [models] = backend.calls  # one candidate: the reference and it, timed together (no dense model needed)
    assert len(models) == 2
    sizes = [{t.name: tuple(t.dims) for t in m.graph.initializer} for m in models]
    assert sizes[0] != sizes[1] and all(m.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1 for m in models)
    config = PruneConfig(ratio=0.5, round_to="auto")
    same = ratio_choice.RatioChoice(choice.reference, choice.reference, (choice.reference,))
    assert latency_select.confirmed(config, analysis, same, table.backend_key) is choice.reference
    assert latency_select.confirmed(config, analysis, choice, "elsewhere") is choice.chosen  # not the table's device
    assert len(backend.calls) == 1  # neither was timed


def test_a_backend_that_compiles_each_model_times_one_plan(tmp_path, monkeypatch):
    """TVM compiles every model it times: the choice is timed against --round-to 1 alone, as before shortlists."""
    from onnxprune.targets.tvm_latency import TvmBackend

    assert TvmBackend.compiles_models
    monkeypatch.setattr(ScriptedBackend, "compiles_models", True, raising=False)
    got, choice, backend, analysis, _ = _confirm(tmp_path, monkeypatch, (1.0, 0.9))
    [models] = backend.calls
    assert len(models) == 2 and got is choice.chosen
    assert len([c for c in choice.candidates if c.plan.kept(analysis) != choice.reference.plan.kept(analysis)]) > 2


def test_the_measurement_chooses_among_the_shortlist(tmp_path, monkeypatch):
    """The table's choice measured slower than --round-to 1, a lower-ranked candidate faster: the faster one wins
    (the table predicted it worse); every timed model is a distinct plan, the dense model first."""
    from onnxprune.graph import ModelGraph
    from onnxprune.passes import latency_select

    # dense, reference, then the shortlist in predicted order: only the third is no slower than the reference
    got, choice, backend, analysis, _ = _confirm(tmp_path, monkeypatch, (10.0, 5.0, 6.0, 7.0, 4.5, 8.0))
    [models] = backend.calls
    shortlist = list(choice.by_score())[: latency_select.SHORTLIST]
    assert len(models) >= 4 and shortlist[0] is choice.chosen
    assert count_macs(ModelGraph(models[0])) == count_macs(ModelGraph(_three_groups()))  # the dense model
    kept = {tuple(sorted(c.plan.kept(analysis).items())) for c in (choice.reference, *shortlist)}
    assert len(kept) == len(models) - 1  # one timing per distinct plan
    assert got is not choice.chosen and got is not choice.reference
    assert got.plan.kept(analysis) != choice.chosen.plan.kept(analysis)
    # all slower than the reference: the reference
    slow, choice, _, _, _ = _confirm(tmp_path, monkeypatch, (10.0, 5.0, 6.0, 7.0, 8.0, 9.0))
    assert slow is choice.reference


def test_a_rerun_on_the_same_device_makes_the_same_choice(tmp_path, monkeypatch):
    """The shortlist's timings are cached (`latency.model_timings`): a second run whose timings would differ (noise
    on a loaded machine: CI saw the bundled CNN keep 96 channels of a layer in one run, 64 in the next) reads the
    first run's and chooses what it chose; another folder measures again."""
    folder = str(tmp_path / "shared")
    first, choice, backend, analysis, _ = _confirm(tmp_path, monkeypatch, (10.0, 5.0, 6.0, 7.0, 4.5, 8.0), cache=folder)
    assert len(backend.calls) == 1 and first is not choice.chosen
    noisy = (10.0, 5.0, 4.0, 7.0, 8.0, 8.0)  # now the table's choice would win
    again, _, backend2, analysis2, _ = _confirm(tmp_path, monkeypatch, noisy, cache=folder)
    assert backend2.calls == []  # nothing timed
    assert (again.name, again.plan.kept(analysis2)) == (first.name, first.plan.kept(analysis))
    elsewhere, choice3, backend3, _, _ = _confirm(tmp_path, monkeypatch, noisy)
    assert len(backend3.calls) == 1 and elsewhere is choice3.chosen


def test_cached_model_timings_read_only_what_was_timed(tmp_path):
    from onnxprune.latency.model_timings import cached_model_timings

    model = _three_groups()
    calls = []

    def measure(ms):
        calls.append(ms)
        return [Timing(ms, 0.1, 15, ms * 0.9), Timing(ms * 2, 0.2, 15, ms * 1.8)]

    first = cached_model_timings(tmp_path, "cpu", model, ["a", "b"], lambda: measure(1.0), how={"repeat": 15})
    assert cached_model_timings(tmp_path, "cpu", model, ["a", "b"], lambda: measure(2.0), how={"repeat": 15}) == first
    assert calls == [1.0]
    # other models, rounds or device: timed again
    cached_model_timings(tmp_path, "cpu", model, ["a", "c"], lambda: measure(3.0), how={"repeat": 15})
    cached_model_timings(tmp_path, "cpu", model, ["a", "b"], lambda: measure(4.0), how={"repeat": 40})
    cached_model_timings(tmp_path, "gpu", model, ["a", "b"], lambda: measure(5.0), how={"repeat": 15})
    assert calls == [1.0, 3.0, 4.0, 5.0]
    for path in tmp_path.glob("models-*.json"):  # unreadable: timed again, and stored again
        path.write_text("{")
    assert cached_model_timings(tmp_path, "cpu", model, ["a", "b"], lambda: measure(6.0), how={"repeat": 15})[0].median_ms == 6.0
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert cached_model_timings(blocked, "cpu", model, ["a"], lambda: measure(7.0))[0].median_ms == 7.0  # not stored


def test_measured_ties_on_speed_go_to_the_plan_that_removed_fewer_macs(tmp_path, monkeypatch):
    """Equal measured times: the score (efficiency capped at 1, to the 8th, times speedup) prefers the plan that got
    as much faster with fewer MACs removed, counted on the timed models."""
    from onnxprune.graph import ModelGraph

    got, _choice, backend, analysis, _ = _confirm(tmp_path, monkeypatch, (10.0, 9.0) + (8.0,) * 4)
    [models] = backend.calls
    dense_macs = count_macs(ModelGraph(models[0]))
    macs = [count_macs(ModelGraph(m)) for m in models[2:]]
    efficiency = [10.0 / 8.0 * m / dense_macs for m in macs]
    assert max(efficiency) < 1  # not capped: the score orders them by MACs kept
    best = max(range(len(macs)), key=lambda i: macs[i])
    chosen_macs = count_macs(ModelGraph(_pruned_model(analysis, got)))
    assert chosen_macs == macs[best] and len(set(macs)) > 1


def test_measured_efficiency_outweighs_a_little_more_speed(tmp_path, monkeypatch):
    """A plan that removed fewer MACs and is a little slower beats one that removed more for slightly more speed:
    timings chosen between the weights (efficiency squared would take the faster one, to the 8th the other)."""
    from onnxprune.graph import ModelGraph
    from onnxprune.passes import latency_select

    _, _, backend, analysis, _ = _confirm(tmp_path, monkeypatch, (10.0, 9.0) + (8.0,) * 4)
    macs = [count_macs(ModelGraph(m)) for m in backend.calls[0][2:]]
    lean, heavy = int(np.argmin(macs)), int(np.argmax(macs))  # fewest MACs kept (most removed), most kept
    r = macs[lean] / macs[heavy]
    assert r < 0.9
    speed = r**-0.7  # between r^(-2/3) and r^(-8/9): the weights disagree
    ms = [10.0, 9.0] + [9.5] * len(macs)  # the others slower than the two
    ms[2 + heavy], ms[2 + lean] = 8.0, 8.0 / speed
    assert latency_select.MEASURED_EFFICIENCY_WEIGHT == 8
    got, _, backend, analysis, _ = _confirm(tmp_path, monkeypatch, tuple(ms))
    assert count_macs(ModelGraph(_pruned_model(analysis, got))) == macs[heavy]


def test_the_tables_choice_stands_unless_measured_clearly_better(tmp_path, monkeypatch):
    """Another shortlisted plan replaces the table's choice only `REPLACE_MARGIN` above it in measured score."""
    from onnxprune.graph import ModelGraph
    from onnxprune.passes import latency_select

    _, choice, backend, analysis, _ = _confirm(tmp_path, monkeypatch, (10.0, 9.0) + (8.0,) * 4)
    models = backend.calls[0]
    dense_macs = count_macs(ModelGraph(models[0]))
    macs = [count_macs(ModelGraph(m)) for m in models[2:]]  # [the table's choice, the next ...]
    w = latency_select.MEASURED_EFFICIENCY_WEIGHT

    def score(m, ms):
        speedup = 10.0 / ms
        return min(speedup * m / dense_macs, 1.0) ** w * speedup

    assert all(10.0 / 8.0 * m / dense_macs < 1 for m in macs)  # uncapped at these times
    for gain, replaced in ((1.03, False), (1.08, True)):
        # time of the second candidate at which it scores `gain` x the table's choice at 8.0 ms (score ~ t^-(w+1))
        t = 8.0 * (score(macs[1], 8.0) / (gain * score(macs[0], 8.0))) ** (1 / (w + 1))
        got, choice, _, _, _ = _confirm(tmp_path, monkeypatch, (10.0, 9.0, 8.0, t) + (9.5,) * (len(macs) - 2))
        assert (got is not choice.chosen) == replaced, gain
        assert got is choice.chosen or got.plan.kept(analysis) != choice.chosen.plan.kept(analysis)


def test_a_plan_the_table_never_offered_wins_when_measured_faster(tmp_path, monkeypatch):
    """The table predicted every other plan slower than --round-to 1 and kept the reference (the Fashion-MNIST
    ResNet at 0.7: 4.01x predicted, 3.21x measured); they are still timed, and one measured faster wins."""
    got, choice, backend, _analysis, _ = _confirm(tmp_path, monkeypatch, (10.0, 5.0, 6.0, 3.0, 7.0, 8.0),
                                                 table_chose_reference=True)
    assert choice.chosen is choice.reference and len(backend.calls) == 1
    assert got is not choice.reference and got in choice.candidates


def test_the_select_pass_gives_a_latency_target_with_samples_the_knapsack_allocation():
    """Library users get the CLI's default: `--target-latency` + calibration data and no allocation chosen ->
    knapsack curves; no samples, an explicit allocation or no latency target -> the config as given."""
    from onnxprune.calibration import CalibrationData
    from onnxprune.passes.config import PruneConfig
    from onnxprune.passes.select import SelectChannelsPass

    calib = CalibrationData({"x": np.zeros((2, 3), np.float32)})
    assert SelectChannelsPass(PruneConfig(target_latency="0.6x"), calib=calib).config.allocation == "knapsack"
    assert SelectChannelsPass(PruneConfig(target_latency="0.6x")).config.allocation is None
    explicit = PruneConfig(target_latency="0.6x", allocation="uniform")
    assert SelectChannelsPass(explicit, calib=calib).config.allocation == "uniform"
    assert SelectChannelsPass(PruneConfig(ratio=0.3), calib=calib).config.allocation is None


def test_auto_rounding_that_removes_little_of_the_ratio_says_so(tmp_path):
    """The bundled Fashion-MNIST CNN at --ratio 0.1 kept every group whole under auto rounding, silently."""
    from onnxprune.passes.config import PruneConfig
    from onnxprune.passes.latency_select import rounding_notice

    analysis, _, _, scores = _setup(tmp_path)
    total = sum(g.size for g in analysis.groups)
    nothing = PruningPlan({})
    half = make_plan(analysis, scores, 0.3)
    assert 0.15 * total <= half.channels_removed
    auto = PruneConfig(ratio=0.3, round_to="auto")
    [note] = rounding_notice(auto, analysis, nothing)
    assert "removed 0.0% of the channels, not the 30% asked" in note and "--round-to 1" in note
    assert rounding_notice(auto, analysis, half) == ()  # at least half the ratio went
    assert rounding_notice(PruneConfig(ratio=0.3, round_to=1), analysis, nothing) == ()
    assert rounding_notice(PruneConfig(ratio=0.3, round_to="auto", target_params="50%"), analysis, nothing) == ()


def test_the_shortlist_timing_fits_a_budget_on_slow_models(tmp_path):
    """40 rounds where they fit the budget by the table's prices; fewer, never below 10, on a slow model."""
    from onnxprune.passes import latency_select

    analysis, table, grid, scores = _setup(tmp_path)
    choice = choose_ratio_plan(analysis, scores, table, 0.5, keep_counts=grid)
    timed = list(choice.by_score())[:4]
    assert latency_select._shortlist_rounds(choice.reference, timed) == latency_select.SHORTLIST_REPEAT  # fast model
    slow = [replace(c, predicted_ms=c.predicted_ms * 1e4, dense_ms=c.dense_ms * 1e4) for c in (choice.reference, *timed)]
    one_round = slow[0].dense_ms + sum(c.predicted_ms for c in slow)
    expected = max(10, int(latency_select.SHORTLIST_BUDGET_MS // one_round))
    assert expected < latency_select.SHORTLIST_REPEAT
    assert latency_select._shortlist_rounds(slow[0], slow[1:]) == expected
    huge = [replace(c, predicted_ms=1e6, dense_ms=1e6) for c in slow]
    assert latency_select._shortlist_rounds(huge[0], huge[1:]) == 10
