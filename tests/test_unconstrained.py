"""Unconstrained pruning (UPSCALE): exact export against the per-layer masked original, reordering."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import canonical
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.testmodels import TEST_MODELS
from onnxprune.channels import analyze
from onnxprune.cli import main
from onnxprune.graph import ModelGraph
from onnxprune.metrics import count_params
from onnxprune.ordering import choose_order, runs
from onnxprune.passes.reorder import ReorderPass
from onnxprune.passes.unconstrained import UnconstrainedPass
from onnxprune.upscale.config import UnconstrainedConfig
from onnxprune.upscale.oracle import mask_model
from onnxprune.upscale.plan import build_plan
from onnxprune.upscale.report import copy_report
from onnxprune.verify import max_rel_error, random_inputs, run

TOPOLOGIES = ["residual", "concat", "depthwise"]


def rel_error(expected, got) -> float:
    """Max |difference| over max |expected|, with no absolute floor (some random-weight zoo models
    produce outputs around 1e-14, where `max_rel_error`'s 1e-6 floor would hide any mismatch)."""
    worst = 0.0
    for a, b in zip(expected, got):
        a, b = a.astype(np.float64), b.astype(np.float64)
        scale = np.abs(a).max(initial=0.0)
        assert scale > 0, "an all-zero output cannot check exactness"
        worst = max(worst, float(np.abs(a - b).max(initial=0.0) / scale))
    return worst


def _check(model, result, inputs):
    oracle = mask_model(model, result.info["plan"])
    expected, got = run(oracle, inputs), run(result.model, inputs)
    assert [o.shape for o in expected] == [o.shape for o in got]
    assert rel_error(expected, got) <= 1e-5
    return oracle, expected


@pytest.mark.parametrize("reorder", [False, True])
@pytest.mark.parametrize("name", TOPOLOGIES + ["split", "attention", "chain", "gemm_head", "mixed_ops"])
def test_export_equals_masked_original(name, reorder):
    model = canonical(TEST_MODELS[name]())
    inputs = random_inputs(model, seed=1)
    result = UnconstrainedPass(UnconstrainedConfig(ratio=0.5, reorder=reorder)).run(model)
    assert result.modified
    _oracle, expected = _check(model, result, inputs)
    # The oracle really is pruned (not the original), and the export is smaller.
    assert max_rel_error(run(model, inputs), expected) > 1e-3
    assert count_params(ModelGraph(result.model)) < count_params(ModelGraph(model))


def test_units_choose_different_channels_on_a_residual_stream():
    model = canonical(TEST_MODELS["residual"]())
    plan = build_plan(model, UnconstrainedConfig(ratio=0.5))
    streams = [gp for gp in plan.groups if sum(pc.is_unit for pc in gp.pieces) >= 3]
    assert streams, "the residual model has a stream with several writers and readers"
    gp = streams[0]
    keeps = {tuple(np.flatnonzero(pc.keep)) for pc in gp.pieces if pc.is_unit}
    assert len(keeps) > 1  # unconstrained: not all the same set
    assert gp.union.sum() > max(len(k) for k in keeps)  # the stream keeps the union


def test_boundaries_are_recognised_by_record_not_by_name():
    """Nodes of the input model named like the inserted boundaries (as in a model split before) are ordinary
    nodes: the plan, the copies and the function are those of the same model with other names."""
    import onnx

    model = canonical(TEST_MODELS["residual"]())
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    for i, node in enumerate(renamed.graph.node):
        node.name = f"upscale_boundary_{i + 1}"
    inputs = random_inputs(model, seed=8)
    config = UnconstrainedConfig(ratio=0.5)
    plain, odd = UnconstrainedPass(config).run(model), UnconstrainedPass(config).run(renamed)
    _check(renamed, odd, inputs)
    assert odd.info["summary"]["boundaries"] == plain.info["summary"]["boundaries"] > 0
    assert odd.info["copies"] == plain.info["copies"]
    assert rel_error(run(plain.model, inputs), run(odd.model, inputs)) <= 1e-6


@pytest.mark.parametrize("criterion", ["l1", "bn"])
@pytest.mark.parametrize("name", ["residual", "concat"])
def test_share_one_is_constrained_pruning(name, criterion):
    """share=1: every unit keeps the group's shared ranking = PrunePass with the same criterion."""
    from onnxprune.passes.pruning import PruneConfig, PrunePass

    model = canonical(TEST_MODELS[name]())
    inputs = random_inputs(model, seed=2)
    constrained = PrunePass(PruneConfig(ratio=0.4, criterion=criterion)).run(model).model
    result = UnconstrainedPass(UnconstrainedConfig(ratio=0.4, criterion=criterion, share=1.0)).run(model)
    assert result.info["copies"]["copy_ops"] == 0
    assert count_params(ModelGraph(result.model)) == count_params(ModelGraph(constrained))
    assert rel_error(run(constrained, inputs), run(result.model, inputs)) <= 1e-6


@pytest.mark.parametrize("drive", ["writer", "reader"])
@pytest.mark.parametrize("name", TOPOLOGIES + ["chain", "split", "mixed_ops"])
def test_drive_modes_export_equals_masked_original(name, drive):
    model = canonical(TEST_MODELS[name]())
    inputs = random_inputs(model, seed=11)
    for cap in (None, 1.125):
        result = UnconstrainedPass(UnconstrainedConfig(ratio=0.5, drive=drive, union_cap=cap)).run(model)
        _check(model, result, inputs)
    zero = UnconstrainedPass(UnconstrainedConfig(ratio=0.0, drive=drive)).run(model)
    assert not zero.modified and rel_error(run(model, inputs), run(zero.model, inputs)) == 0


def _units(gp):
    writers = [pc for pc in gp.pieces if pc.is_unit and pc.has_producer]
    readers = [pc for pc in gp.pieces if pc.is_unit and not pc.has_producer]
    return writers, readers


@pytest.mark.parametrize("name", ["residual", "concat"])
def test_writer_drive_reads_only_what_is_written(name):
    """drive=writer: a reader keeps only channels some writer reaching it keeps, a writer only channels
    some reader reads (so no kept parameter is wasted), and a single-writer fork is never narrowed twice:
    its readers keep exactly the writer's channels."""
    from onnxprune.upscale.plan import find_pieces, reaching_writers

    model = canonical(TEST_MODELS[name]())
    plan = build_plan(model, UnconstrainedConfig(ratio=0.5, criterion="l1", drive="writer"))
    checked = 0
    for gp in plan.groups:
        writers, readers = _units(gp)
        if not writers or not readers:
            continue
        pieces, piece_of = find_pieces(plan.analysis, gp.group, plan.split)
        reach = reaching_writers(plan.analysis, gp.group, pieces, piece_of)
        for r in readers:
            srcs = reach[r.id]
            assert srcs, "every reader of these models is reached by writer units"
            written = np.logical_or.reduce([gp.pieces[w].keep for w in srcs])
            assert not (r.keep & ~written).any()
            if len(srcs) == 1:
                assert np.array_equal(r.keep, gp.pieces[next(iter(srcs))].keep)
            checked += 1
        read = np.logical_or.reduce([r.keep for r in readers])
        assert all(not (w.keep & ~read).any() for w in writers)
    assert checked >= 2


def test_reader_drive_writes_what_is_read():
    model = canonical(TEST_MODELS["residual"]())
    plan = build_plan(model, UnconstrainedConfig(ratio=0.5, criterion="l1", drive="reader", stream_multiple=1))
    stream = [gp for gp in plan.groups if len(_units(gp)[0]) >= 2]
    assert stream
    for gp in stream:
        writers, readers = _units(gp)
        read = np.logical_or.reduce([r.keep for r in readers])
        assert all(not (w.keep & ~read).any() for w in writers)
        assert np.array_equal(np.logical_or.reduce([w.keep for w in writers]), read)


@pytest.mark.parametrize("name", ["residual", "concat"])
def test_reader_drive_group_budget_keeps_constrained_params(name):
    """group_budget: readers give up channels until no group holds more parameters than constrained
    pruning at the same ratio; the export stays exact."""
    from onnxprune.passes.pruning import PruneConfig, PrunePass
    from onnxprune.upscale.report import effective_params

    model = canonical(TEST_MODELS[name]())
    constrained = effective_params(PrunePass(PruneConfig(ratio=0.4, criterion="l1")).run(model).model)
    free = UnconstrainedPass(UnconstrainedConfig(ratio=0.4, criterion="l1", drive="reader", stream_multiple=1)).run(model)
    config = UnconstrainedConfig(ratio=0.4, criterion="l1", drive="reader", group_budget=True, stream_multiple=1)
    budgeted = UnconstrainedPass(config).run(model)
    _check(model, budgeted, random_inputs(model, seed=12))
    assert effective_params(budgeted.model) <= constrained < effective_params(free.model)


def test_drive_must_be_known():
    from onnxprune.errors import UsageError

    with pytest.raises(UsageError, match="drive"):
        UnconstrainedConfig(drive="both")


def test_share_narrows_the_stream_union():
    model = canonical(TEST_MODELS["residual"]())

    def widest(share):
        config = UnconstrainedConfig(ratio=0.5, criterion="l1", share=share, stream_multiple=1, drive="free")
        plan = build_plan(model, config)
        return max(int(gp.union.sum()) for gp in plan.groups)

    assert widest(1.0) <= widest(0.5) <= widest(0.0)
    assert widest(1.0) < widest(0.0)


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_union_cap_bounds_the_stream_and_stays_exact(name):
    model = canonical(TEST_MODELS[name]())
    inputs = random_inputs(model, seed=6)
    for cap in (1.0, 1.5):
        config = UnconstrainedConfig(ratio=0.5, union_cap=cap, stream_multiple=1)
        result = UnconstrainedPass(config).run(model)
        _check(model, result, inputs)
        for gp in result.info["plan"].groups:
            units = [pc for pc in gp.pieces if pc.is_unit]
            k = max(int(pc.keep.sum()) for pc in units)
            assert all(int(pc.keep.sum()) == k for pc in units)
            if len(units) > 1:
                assert int(gp.union.sum()) <= max(k, round(cap * k))
                assert all(not (pc.keep & ~gp.union).any() for pc in units)
    uncapped = build_plan(model, UnconstrainedConfig(ratio=0.5, stream_multiple=1))
    capped = build_plan(model, UnconstrainedConfig(ratio=0.5, stream_multiple=1, union_cap=1.0))
    assert sum(int(gp.union.sum()) for gp in capped.groups) <= sum(int(gp.union.sum()) for gp in uncapped.groups)


def test_union_cap_below_one_is_a_usage_error():
    from onnxprune.errors import UsageError

    with pytest.raises(UsageError, match="union_cap"):
        UnconstrainedConfig(union_cap=0.5)


def test_tuned_layout_is_exact_and_keeps_the_fastest_candidate():
    model = canonical(TEST_MODELS["residual"]())
    result = UnconstrainedPass(UnconstrainedConfig(ratio=0.5, tune=3)).run(model)
    _check(model, result, random_inputs(model, seed=7))
    tuned = result.info["summary"]["tuned"]
    assert tuned["chosen"] in tuned["ms"] and tuned["ms"][tuned["chosen"]] == min(tuned["ms"].values())


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_mean_repair_is_exact_and_restores_output_means(share):
    model = canonical(TEST_MODELS["residual"]())
    calib = random_inputs(model, seed=3)
    config = UnconstrainedConfig(ratio=0.5, criterion="l1", share=share)
    plain = UnconstrainedPass(config).run(model)
    repaired = UnconstrainedPass(UnconstrainedConfig(ratio=0.5, criterion="l1", share=share, repair="mean"), calib=calib).run(model)
    _check(model, repaired, calib)  # the export equals the masked repaired original
    def mean(m):  # per output channel, over batch and space (what the repair restores)
        y = run(m, calib)[0]
        return y.mean(axis=tuple(a for a in range(y.ndim) if a != 1))

    before = np.abs(mean(plain.model) - mean(model)).max()
    after = np.abs(mean(repaired.model) - mean(model)).max()
    assert after < 0.1 * before


def test_mean_repair_without_calibration_is_a_usage_error():
    from onnxprune.errors import UsageError

    with pytest.raises(UsageError, match="calibration"):
        UnconstrainedPass(UnconstrainedConfig(repair="mean"))


def test_share_out_of_range_is_a_usage_error():
    from onnxprune.errors import UsageError

    with pytest.raises(UsageError, match="share"):
        UnconstrainedConfig(share=1.5)


def test_naive_export_copies_and_reordering_reduces_them():
    model = canonical(TEST_MODELS["residual"]())
    naive = UnconstrainedPass(UnconstrainedConfig(ratio=0.5, reorder=False)).run(model)
    reordered = UnconstrainedPass(UnconstrainedConfig(ratio=0.5, reorder=True)).run(model)
    n, r = copy_report(naive.model), copy_report(reordered.model)
    assert n["gather_scatter"] > 0 and n["bytes"] > 0
    assert r["gather_scatter"] < n["gather_scatter"] and r["bytes"] < n["bytes"]
    assert naive.info["summary"]["copies"] == n


@pytest.mark.parametrize("naive", ["scatter", "pad_gather"])
@pytest.mark.parametrize("name", TOPOLOGIES)
def test_naive_exports_are_exact_and_scatter_is_scatternd(name, naive):
    """UPSCALE's naive export writes each writer's channels into a zero stream with ScatterND; the
    pad_gather variant appends one zero channel and gathers. Both equal the masked original."""
    model = canonical(TEST_MODELS[name]())
    # drive="free": every unit its own channels, so every topology has copies (coupled ones may agree)
    result = UnconstrainedPass(UnconstrainedConfig(ratio=0.5, reorder=False, naive=naive, drive="free")).run(model)
    _check(model, result, random_inputs(model, seed=4))
    ops = copy_report(result.model)["ops"]
    assert ops.get("Gather", 0) > 0
    if naive == "scatter":
        assert ops.get("ScatterND", 0) > 0 and "Pad" not in ops
    else:
        assert "ScatterND" not in ops and ops.get("Pad", 0) > 0


def _unit_ids(model):
    plan = build_plan(model, UnconstrainedConfig(ratio=0.5))
    return [(gp.group.id, pc.id, gp.group.size) for gp in plan.groups for pc in gp.pieces if pc.is_unit]


_UNITS = {name: _unit_ids(canonical(TEST_MODELS[name]())) for name in TOPOLOGIES}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(TOPOLOGIES), seed=st.integers(0, 2**31 - 1), reorder=st.booleans(),
       density=st.floats(0.1, 0.95))
def test_random_kept_sets_are_exact(name, seed, reorder, density):
    model = canonical(TEST_MODELS[name]())
    rng = np.random.default_rng(seed)
    keeps = {(g, p): rng.random(size) < density for g, p, size in _UNITS[name]}
    result = UnconstrainedPass(UnconstrainedConfig(ratio=0.5, reorder=reorder), keeps=keeps).run(model)
    _check(model, result, random_inputs(model, seed=seed % 1000))


def test_no_gather_when_a_reordering_removes_them():
    """Kept sets that are intervals of a hidden channel order: reordering finds it, no Gather remains."""
    model = canonical(TEST_MODELS["residual"]())
    rng = np.random.default_rng(3)
    keeps = {}
    hidden = {}
    for g, p, size in _UNITS["residual"]:
        perm = hidden.setdefault(g, rng.permutation(size))
        start = p % max(1, size // 2)
        mask = np.zeros(size, dtype=bool)
        mask[perm[start : start + size // 2]] = True
        keeps[(g, p)] = mask
    naive = UnconstrainedPass(UnconstrainedConfig(reorder=False), keeps=keeps).run(model)
    config = UnconstrainedConfig(reorder=True, absorb=False)  # copies only: the order alone must do it
    reordered = UnconstrainedPass(config, keeps=keeps).run(model)
    inputs = random_inputs(model, seed=2)
    _check(model, naive, inputs)
    _check(model, reordered, inputs)
    assert copy_report(naive.model)["gather_scatter"] > 0
    report = copy_report(reordered.model)
    assert report["gather_scatter"] == 0
    assert report["copy_ops"] > 0  # the copies are there, as Slice/Pad


def test_choose_order_finds_consecutive_ones_order():
    rng = np.random.default_rng(0)
    n = 24
    hidden = rng.permutation(n)
    intervals = [(0, 10), (5, 15), (12, 24), (3, 7), (0, 24)]
    sets = []
    for a, b in intervals:
        m = np.zeros(n, dtype=bool)
        m[hidden[a:b]] = True
        sets.append(m)
    union = np.ones(n, dtype=bool)
    order = choose_order(union, sets)
    assert sorted(order.tolist()) == list(range(n))
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    for m in sets:
        where = np.sort(pos[m])
        assert where[-1] - where[0] + 1 == len(where)


def test_choose_order_prefers_heavy_sets_when_not_all_fit():
    # Three pairwise-overlapping sets with every region nonempty: at most two can be intervals.
    member = np.array([[1, 1, 0, 1, 0, 1, 1], [1, 0, 1, 1, 1, 0, 1], [0, 1, 1, 1, 1, 1, 0]], dtype=bool)
    sets = [np.repeat(row, 2) for row in member]
    union = np.ones(14, dtype=bool)
    order = choose_order(union, sets, weights=[1.0, 5.0, 5.0])
    pos = np.empty(14, dtype=np.int64)
    pos[order] = np.arange(14)
    contiguous = []
    for m in sets:
        where = np.sort(pos[m])
        contiguous.append(where[-1] - where[0] + 1 == len(where))
    assert contiguous[1] and contiguous[2]
    assert runs([0, 1], np.array([[True, False]])).tolist() == [1]


@pytest.mark.parametrize("name", ["residual", "concat", "depthwise", "attention", "split", "gemm_head", "grouped"])
def test_reorder_pass_preserves_semantics(name):
    model = canonical(TEST_MODELS[name]())
    analysis = analyze(ModelGraph(model))
    rng = np.random.default_rng(5)
    orders = {g.id: rng.permutation(g.size) for g in analysis.groups}
    result = ReorderPass(orders).run(model)
    assert result.modified
    inputs = random_inputs(model, seed=4)
    assert max_rel_error(run(model, inputs), run(result.model, inputs)) <= 1e-5
    changed = sum(
        not np.array_equal(ModelGraph(model).const(t.name), ModelGraph(result.model).const(t.name))
        for t in model.graph.initializer
    )
    assert changed > 0  # the permutation was folded into the weights
    again = ReorderPass({g.id: np.arange(g.size) for g in analysis.groups}).run(model)
    assert again.modified is False


def test_reorder_pass_rejects_a_non_permutation():
    from onnxprune.errors import UsageError

    model = canonical(TEST_MODELS["residual"]())
    with pytest.raises(UsageError):
        ReorderPass({0: np.zeros(16, dtype=np.int64)}).run(model)


def test_cli_mode_unconstrained(tmp_model, tmp_path, capsys):
    src = tmp_model(canonical(TEST_MODELS["residual"]()))
    out = tmp_path / "u.onnx"
    assert main(["prune", str(src), "-o", str(out), "--mode", "unconstrained", "--ratio", "0.5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mode"] == "unconstrained" and out.exists()
    assert summary["params_after"] < summary["params_before"]
    assert main(["prune", str(src), "-o", str(out), "--mode", "unconstrained", "--criterion", "random"]) == 2
    assert main(["prune", str(src), "-o", str(out), "--mode", "unconstrained", "--criterion", "energy"]) == 0
    assert "error" in capsys.readouterr().err
    assert main(["prune", str(src), "-o", str(tmp_path / "c.onnx"), "--mode", "constrained"]) == 0


def test_cli_unconstrained_flags(tmp_model, tmp_path, capsys):
    model = canonical(TEST_MODELS["residual"]())
    src = tmp_model(model)
    out = tmp_path / "u.onnx"
    base = ["prune", str(src), "-o", str(out), "--mode", "unconstrained", "--ratio", "0.5", "--json"]
    assert main(base + ["--share", "0.5", "--union-cap", "1.25"]) == 0
    capped = json.loads(capsys.readouterr().out)
    assert capped["config"]["share"] == 0.5 and capped["config"]["union_cap"] == 1.25
    assert main(base + ["--drive", "reader"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["drive"] == "reader"
    assert main(base + ["--no-reorder"]) == 0
    naive = json.loads(capsys.readouterr().out)
    assert naive["copies"]["ops"].get("ScatterND", 0) > 0 and naive["layout"] == {}
    # the naive export is exact: same function as the reordered one at the same plan
    inputs = random_inputs(model, seed=5)
    import onnx

    naive_out = run(onnx.load(str(out)), inputs)
    assert main(base) == 0
    capsys.readouterr()
    assert rel_error(naive_out, run(onnx.load(str(out)), inputs)) <= 1e-5
    assert main(base + ["--repair", "mean"]) == 2  # needs --calib
    assert "--calib" in capsys.readouterr().err
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{k: np.concatenate([random_inputs(model, seed=i)[k] for i in range(4)]) for k in inputs})
    assert main(base + ["--repair", "mean", "--calib", str(calib), "--share", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["repair"] == "mean"
    assert main(base + ["--repair", "ls"]) == 2
    constrained = ["prune", str(src), "-o", str(tmp_path / "c.onnx"), "--mode", "constrained"]
    assert main(constrained + ["--share", "0.5"]) == 2
    assert main(constrained + ["--drive", "writer"]) == 2
    assert main(constrained + ["--repair", "mean"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "densenet121", "mobilenet_v2", "efficientnet_b0"])
def test_zoo_export_equals_masked_original(name):
    zoo = pytest.importorskip("models.zoo")
    try:
        path = zoo.zoo_model(name)
    except zoo.ZooError as exc:
        pytest.skip(f"{name}: {exc}")
    from onnxprune.importer import import_model

    model = import_model(path)
    inputs = random_inputs(model, seed=0)
    configs = [UnconstrainedConfig(ratio=0.5, reorder=False), UnconstrainedConfig(ratio=0.5),
               UnconstrainedConfig(ratio=0.5, union_cap=1.125, tune=2)]
    for config in configs:
        result = UnconstrainedPass(config).run(model)
        _check(model, result, inputs)
