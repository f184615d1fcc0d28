"""Latency tables, step grids, prediction and measurement (onnxprune.latency).

The grid logic and the table cache run on a deterministic fake backend (exact expectations); one test
measures onnxruntime for real, with interleaved ratios and a generous margin (the machine is loaded).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.channels import analyze
from onnxprune.errors import UsageError
from onnxprune.graph import ModelGraph
from onnxprune.latency.backend import OrtBackend, get_backend, nchwc_block, ort_probe_counts
from onnxprune.latency.grid import aligned, balanced, curve_counts, keep_counts, multiples
from onnxprune.latency.measure import measure_speedup, static_inputs
from onnxprune.latency.microbench import touched_ops, variant
from onnxprune.latency.predict import Predictor, predicted_ms
from onnxprune.latency.table import GroupCurve, LatencyTable, build_table
from onnxprune.latency.timing import Timing, in_blocks, interleaved
from onnxprune.progress import RecordingReporter, reporting
from tests.conftest import canonical

# ---- models -------------------------------------------------------------------------------------


def _conv(name, x, cin, cout, k, group=1, rng=None):
    rng = rng or np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((cout, cin // group, k, k)).astype(np.float32) * 0.1, f"{name}.w")
    b = numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}.b")
    node = helper.make_node("Conv", [x, w.name, b.name], [f"{name}.y"], pads=[k // 2] * 4, group=group, name=name)
    return node, [w, b]


def conv_chain(width=64, hw=16, batch: int | str = 1):
    """Conv 3x3 (8 -> width) -> Relu -> depthwise 3x3 (width) -> Relu -> Conv 1x1 (width -> 16) -> pool -> Gemm."""
    nodes, inits = [], []
    for args in (("c1", "x", 8, width, 3), ("dw", "r1", width, width, 3, width), ("c2", "r2", width, 16, 1)):
        node, ws = _conv(*args)
        nodes.append(node)
        inits += ws
        if args[0] != "c2":
            nodes.append(helper.make_node("Relu", [node.output[0]], ["r1" if args[0] == "c1" else "r2"]))
    nodes.append(helper.make_node("GlobalAveragePool", ["c2.y"], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    fc = numpy_helper.from_array(np.random.default_rng(1).standard_normal((16, 10)).astype(np.float32), "fc.w")
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w"], ["out"], name="fc"))
    inits.append(fc)
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8, hw, hw])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 10])], inits,
    )
    return canonical(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _width_group(analysis, width):
    return next(g for g in analysis.groups if g.size == width and any(m.tensor == "dw.w" for m in g.members))


# ---- a deterministic fake backend ------------------------------------------------------------------


class FakeBackend:
    """Latency = a function of the micro-model's weight shape; counts every model it is asked to time."""

    name = "fake"
    key = "fake|test"
    emulated = False

    def __init__(self, block=16):
        self.block = block
        self.timed = 0

    def ms(self, model: onnx.ModelProto) -> float:
        node = model.graph.node[0]
        if node.op_type not in ("Conv", "Gemm", "MatMul"):  # memory-bound: proportional to the elements read
            x = model.graph.input[0].type.tensor_type.shape.dim
            return 0.001 + 1e-6 * int(np.prod([d.dim_value for d in x]))
        w = next(t for t in model.graph.initializer if t.name == node.input[1])
        x = model.graph.input[0].type.tensor_type.shape.dim
        out_blocks = math.ceil(w.dims[0] / self.block) if node.op_type == "Conv" else w.dims[-1]
        cin = x[1].dim_value
        misaligned = 1.5 if node.op_type == "Conv" and cin % 4 else 1.0  # the slow path of onnxruntime
        return 0.01 * out_blocks * self.block * int(np.prod(w.dims[1:])) * misaligned / 100

    def time_models(self, models, *, warmup=3, repeat=15, progress=None):
        self.timed += len(models)
        return [Timing(self.ms(m), 0.01, repeat) for m in models]

    def probe_counts(self, size, lowest):
        return ort_probe_counts(size, lowest)


def _curve(counts, fn, spread=0.0):
    counts = tuple(counts)
    return GroupCurve(0, counts, tuple(float(fn(c)) for c in counts), tuple(spread for _ in counts))


# ---- grids ----------------------------------------------------------------------------------------


def test_step_curve_gives_the_step_bottoms():
    # output channels in blocks of 16: 113..128 cost as 128
    counts, why = curve_counts(_curve(ort_probe_counts(128, 13), lambda c: 1 + math.ceil(c / 16)))
    assert counts == tuple(range(16, 129, 16))
    assert (why.kind, why.period) == ("period", 16)


def test_step_period_and_misaligned_inputs_combine():
    # input channels: multiples of 4 on the fast path, steps every 16 among them; size not a multiple of 16
    f = lambda c: (1 + math.ceil(c / 16)) * (1.5 if c % 4 else 1.0)
    counts, why = curve_counts(_curve(ort_probe_counts(200, 20), f))
    assert counts == tuple(range(16, 193, 16)) + (200,)
    assert why.period == 16


def test_misaligned_penalty_alone_gives_multiples_of_four():
    f = lambda c: 0.01 * c * (1.5 if c % 4 else 1.0)
    counts, why = curve_counts(_curve(ort_probe_counts(256, 26), f))
    assert counts == tuple(range(4, 257, 4))
    assert why.period == 4


def test_flat_and_linear_curves_allow_every_count():
    flat, why = curve_counts(_curve(ort_probe_counts(96, 10), lambda c: 0.05 + 1e-5 * (c % 3)))
    assert flat == tuple(range(1, 97)) and why.kind == "flat"
    linear, why = curve_counts(_curve(ort_probe_counts(300, 30), lambda c: 0.01 * c))
    assert linear == tuple(range(1, 301)) and why.kind == "linear"


def test_noise_within_tolerance_does_not_change_the_grid():
    rng = np.random.default_rng(7)
    counts = ort_probe_counts(512, 52)
    clean = _curve(counts, lambda c: 1 + math.ceil(c / 16))
    for _ in range(5):
        noise = 1 + rng.uniform(-0.01, 0.01, len(counts))  # +-1%: within the 3% tolerance
        noisy = GroupCurve(0, clean.counts, tuple(np.asarray(clean.ms) * noise), clean.spread)
        assert curve_counts(noisy)[0] == curve_counts(clean)[0]
    assert curve_counts(clean)[0] == tuple(range(16, 513, 16))


def test_sparse_probes_keep_the_measured_plateau_tops():
    counts = tuple(range(8, 129, 8))  # a backend that compiles each count probes sparsely
    got, why = curve_counts(_curve(counts, lambda c: 1 + math.ceil(c / 32)))
    assert why.kind == "measured"
    assert got == (32, 64, 96, 128)


def test_keep_counts_and_multiples_cover_every_group():
    analysis = SimpleNamespace(groups=[SimpleNamespace(id=0, size=64), SimpleNamespace(id=1, size=6)])
    table = LatencyTable("fake", 10.0, {0: _curve(ort_probe_counts(64, 7), lambda c: 1 + math.ceil(c / 16))})
    grids = keep_counts(table, analysis)  # type: ignore[arg-type]
    assert grids == {0: (16, 32, 48, 64), 1: (1, 2, 3, 4, 5, 6)}  # group 1 has no curve: every count
    assert multiples(analysis, 8) == {0: tuple(range(8, 65, 8)), 1: (1, 2, 3, 4, 5, 6)}  # type: ignore[arg-type]


def test_backend_alignment_keeps_larger_groups_on_its_multiples(tmp_path):
    analysis = SimpleNamespace(groups=[SimpleNamespace(id=0, size=64), SimpleNamespace(id=1, size=10)])
    linear = {0: _curve(ort_probe_counts(64, 7), lambda c: 0.1 * c), 1: _curve(range(1, 11), lambda c: 0.1 * c)}
    assert keep_counts(LatencyTable("fake", 10.0, dict(linear)), analysis)[0] == tuple(range(1, 65))  # type: ignore[arg-type]
    grids = keep_counts(LatencyTable("fake", 10.0, dict(linear), alignment=4), analysis)  # type: ignore[arg-type]
    assert grids[0] == tuple(range(4, 65, 4))  # a linear curve: every multiple of 4
    assert grids[1] == tuple(range(1, 11))  # below 16 channels the alignment does not apply
    assert aligned((20, 30, 33), 33, 4) == (20, 33) and aligned((30, 33), 33, 4) == (30, 33)  # never only the size
    assert OrtBackend().alignment == nchwc_block() in (4, 8, 16)
    assert OrtBackend(("CPUExecutionProvider",)).alignment == nchwc_block()
    assert build_table(analyze(ModelGraph(conv_chain())), FakeBackend(), cache_dir=tmp_path).alignment == 1


def test_balanced_drops_five_and_seven_blocks_when_the_next_block_is_allowed():
    grid = tuple(range(16, 257, 16))
    kept = balanced(grid, 256, 16)
    assert 80 not in kept and 112 not in kept  # 5 and 7 NCHWc blocks: one thread gets a light filter set
    assert set(grid) - set(kept) == {80, 112}  # 144 (9 blocks) is a real step at 2 threads too
    assert balanced((16, 32, 48, 64, 80, 128), 128, 16) == (16, 32, 48, 64, 80, 128)  # 96 not allowed: 80 stays
    assert balanced(grid, 256, 8) == grid  # other blocks: not measured, unchanged
    assert balanced((16, 32, 48, 64, 80, 96), 96, 16) == (16, 32, 48, 64, 80, 96)  # below 8 blocks of channels
    analysis = SimpleNamespace(groups=[SimpleNamespace(id=0, size=256)])
    table = LatencyTable("fake", 10.0, {0: _curve(ort_probe_counts(256, 26), lambda c: 1 + math.ceil(c / 16))},
                         alignment=16)
    first = keep_counts(table, analysis)  # type: ignore[arg-type]
    assert first[0] == tuple(c for c in range(16, 257, 16) if c not in (80, 112))
    assert keep_counts(table, analysis) == first  # deterministic for a given table


def test_probe_counts_window_and_sweep():
    counts = ort_probe_counts(2048, 205)
    window = [c for c in counts if c >= 2016]
    assert window == list(range(2016, 2041, 2)) + list(range(2041, 2049))  # even counts, every count at the top
    coarse = [c for c in counts if c < 2016]
    assert coarse[0] == 205 and all(c % 32 == 0 for c in coarse[1:]) and len(coarse) <= 9
    assert ort_probe_counts(40, 5) == [5, *range(6, 33, 2), *range(33, 41)]  # small: the window reaches the lowest


# ---- tables -----------------------------------------------------------------------------------------


def test_table_build_and_cache_round_trip(tmp_path):
    analysis = analyze(ModelGraph(conv_chain()))
    backend = FakeBackend()
    recorder = RecordingReporter()
    with reporting(recorder):
        first = build_table(analysis, backend, cache_dir=tmp_path)
    assert backend.timed > 0 and first.measured_ops == 5 and first.cached_ops == 0  # c1, dw, c2, fc, the pool
    shown = recorder.finished("latency table on fake")
    assert len(shown) == 1 and shown[0].completed == shown[0].total == 5  # one step per op signature
    files = sorted(p.name.split("-")[0] for p in tmp_path.iterdir())
    assert files == ["conv", "conv", "conv", "gemm", "globalaveragepool"]
    group = _width_group(analysis, 64)
    curve = first.curves[group.id]
    assert set(curve.nodes) == {"c1", "dw", "c2"}  # the Relus after c1 and dw are fused: not priced
    assert curve.counts == tuple(ort_probe_counts(64, 7))
    timed = backend.timed
    second = build_table(analysis, backend, cache_dir=tmp_path)
    assert backend.timed == timed  # nothing measured again
    assert second.measured_ops == 0 and second.cached_ops == first.measured_ops
    assert second.curves[group.id].ms == pytest.approx(curve.ms)
    assert second.dense_ms == pytest.approx(first.dense_ms)
    # the fake latency is exact: the curve is the sum of the three layers' fake times
    grid = keep_counts(first, analysis)[group.id]
    assert grid == (16, 32, 48, 64)


def _silu_net():
    """Conv (8 -> 16) -> SiLU (Sigmoid, Mul) -> Conv 1x1 (16 -> 16) -> Relu (the model's output)."""
    c1, w1 = _conv("c1", "x", 8, 16, 3)
    c2, w2 = _conv("c2", "silu", 16, 16, 1)
    nodes = [c1, helper.make_node("Sigmoid", ["c1.y"], ["sig"], name="sig"),
             helper.make_node("Mul", ["c1.y", "sig"], ["silu"], name="mul"), c2,
             helper.make_node("Relu", ["c2.y"], ["out"], name="relu")]
    graph = helper.make_graph(nodes, "silu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 16, 12, 12])], w1 + w2)
    return canonical(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_memory_bound_nodes_are_priced_unless_fused(tmp_path):
    analysis = analyze(ModelGraph(_silu_net()))
    group = next(g for g in analysis.groups if any(m.tensor == "c1.w" for m in g.members))
    touches, _ = touched_ops(analysis, group)
    assert {t.node for t in touches} == {"c1", "sig", "mul", "c2"}  # SiLU runs as kernels of its own
    assert {t.node for t in touched_ops(analysis, group, light=False)[0]} == {"c1", "c2"}
    mul = next(t for t in touches if t.node == "mul")
    assert variant(mul, 16, 8).shapes == ((1, 8, 12, 12), (1, 8, 12, 12))  # both operands shrink
    table = build_table(analysis, FakeBackend(), cache_dir=tmp_path)
    light = table.node_dense_ms["sig"]
    assert light == pytest.approx(0.001 + 1e-6 * 16 * 12 * 12)  # priced as the fake backend times it
    assert predicted_ms(table, {group.id: 8}) < table.dense_ms - 0.5 * light  # and shrinks with the group
    fusing = FakeBackend()
    fusing.light_ops = False  # a backend that fuses them (TVM): Conv/Gemm/MatMul only
    assert set(build_table(analysis, fusing, cache_dir=tmp_path).node_dense_ms) == {"c1", "c2"}


def test_depthwise_variant_changes_the_group_attribute():
    analysis = analyze(ModelGraph(conv_chain()))
    group = _width_group(analysis, 64)
    touches, notices = touched_ops(analysis, group)
    assert not notices
    dw = next(t for t in touches if t.node == "dw")
    v = variant(dw, 64, 40)
    assert v is not None and v.group == 40 and v.shapes[0][1] == 40 and v.shapes[1][:2] == (40, 1)
    assert variant(dw, 64, 64).group is None  # dense: the same key as the dense node


def test_predicted_ms_scales_each_layer_by_its_groups(tmp_path):
    analysis = analyze(ModelGraph(conv_chain()))
    table = build_table(analysis, FakeBackend(block=4), cache_dir=tmp_path)
    assert predicted_ms(table, {}) == pytest.approx(table.dense_ms)
    assert table.dense_ms == pytest.approx(sum(table.node_dense_ms.values()))
    wide = _width_group(analysis, 64).id
    narrow = next(g.id for g in analysis.groups if g.size == 16)  # c2's outputs = fc's inputs
    one = predicted_ms(table, {wide: 32})
    assert one == pytest.approx(table.dense_ms + table.at(wide, 32) - table.at(wide, 64))  # one group: its change
    # c1 and dw halve; c2 halves its inputs (wide) and its outputs (narrow): a quarter of it is left
    dense = table.node_dense_ms
    both = predicted_ms(table, {wide: 32, narrow: 8})
    pool_left = (0.001 + 1e-6 * 8 * 16 * 16) / (0.001 + 1e-6 * 16 * 16 * 16)  # the fake pool at 8 of 16 channels
    assert dense["GlobalAveragePool_5"] == pytest.approx(0.001 + 1e-6 * 16 * 16 * 16)
    assert both == pytest.approx(table.dense_ms - 0.5 * dense["c1"] - 0.5 * dense["dw"] - 0.75 * dense["c2"]
                                 - (1 - pool_left) * dense["GlobalAveragePool_5"])
    curve = table.curves[wide]
    assert table.at(wide, curve.counts[3]) == curve.ms[3]  # exact at a measured count
    assert table.at(10_000, 3) == 0.0  # no curve: no latency


def test_incremental_predictor_matches_predicted_ms(tmp_path):
    analysis = analyze(ModelGraph(conv_chain()))
    table = build_table(analysis, FakeBackend(block=4), cache_dir=tmp_path)
    predictor = Predictor(table)
    kept: dict[int, int] = {}
    rng = np.random.default_rng(3)
    for _ in range(30):  # groups changed one at a time, some several times, some back to dense
        g = analysis.groups[int(rng.integers(len(analysis.groups)))]
        kept[g.id] = int(rng.integers(1, g.size + 1))
        assert predictor.set(g.id, kept[g.id]) == pytest.approx(predicted_ms(table, kept))


def test_off_grid_counts_are_priced_with_the_measured_penalty():
    # multiples of 4 fast, others 1.5x slower; the coarse range (below 224) is measured on multiples of 32 only
    f = lambda c: 0.01 * c * (1.5 if c % 4 else 1.0)
    curve = _curve(ort_probe_counts(256, 26), f)
    curve = GroupCurve(0, curve.counts, curve.ms, curve.spread, ("conv",), (curve.ms,))
    table = LatencyTable("fake", curve.ms[-1], {0: curve}, node_dense_ms={"conv": curve.ms[-1]})
    grids = {0: curve_counts(curve)[0]}
    assert 101 not in curve.counts and 101 not in grids[0]
    assert predicted_ms(table, {0: 101}) == pytest.approx(1.01)  # interpolated between 96 and 128: optimistic
    # as 104, times the measured penalty (the median of f(c) / f(next multiple of 4): 1.5 * c / (c + 1..3))
    assert 1.04 * 1.45 < predicted_ms(table, {0: 101}, grids=grids) < 1.04 * 1.5
    assert predicted_ms(table, {0: 104}, grids=grids) == pytest.approx(1.04)  # on the grid: as measured/interpolated
    assert predicted_ms(table, {0: 255}, grids=grids) == pytest.approx(f(255))  # measured: as measured


def test_dynamic_batch_is_measured_at_one_and_other_dynamic_sizes_are_named(tmp_path):
    analysis = analyze(ModelGraph(conv_chain(batch="N")))
    table = build_table(analysis, FakeBackend(), cache_dir=tmp_path)
    assert not table.notices and _width_group(analysis, 64).id in table.curves
    model = conv_chain()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    del model.graph.value_info[:]
    analysis = analyze(ModelGraph(canonical(model)))
    table = build_table(analysis, FakeBackend(), cache_dir=tmp_path)
    assert any("dynamic (give the model's input sizes with --shape)" in n and "'c1'" in n for n in table.notices)


def test_a_rejected_micro_model_costs_its_layers_not_the_table(tmp_path):
    class PickyBackend(FakeBackend):
        def time_models(self, models, **kwargs):
            if any(m.graph.node[0].op_type == "Gemm" for m in models):
                raise RuntimeError("no Gemm here\nsecond line")
            return super().time_models(models, **kwargs)

    analysis = analyze(ModelGraph(conv_chain()))
    table = build_table(analysis, PickyBackend(), cache_dir=tmp_path)
    assert any("Gemm" in n and "RuntimeError: no Gemm here" in n for n in table.notices), table.notices
    narrow = next(g.id for g in analysis.groups if g.size == 16)  # touches c2 and the Gemm
    assert narrow not in table.curves and _width_group(analysis, 64).id in table.curves
    assert not any(p.name.startswith("gemm-") for p in tmp_path.iterdir())  # nothing cached for it


def test_emulated_backend_and_unknown_backend_are_refused(tmp_path):
    backend = FakeBackend()
    backend.emulated = True
    with pytest.raises(UsageError, match="emulated"):
        build_table(analyze(ModelGraph(conv_chain())), backend, cache_dir=tmp_path)
    with pytest.raises(UsageError, match=r"known: .*ort"):
        get_backend("nosuch")
    assert get_backend("ort", threads=2).key.startswith("ort:CPUExecutionProvider|threads=2|blocks|")


def test_multi_thread_sessions_spin_only_when_timed_alone():
    """Spinning idle pools of sessions alive together steal each other's cores (ResNet-50 at 2 threads: dense
    75.6 ms with five spinning sessions alive, 24.7 ms alone): a kept session does not spin, a session timed
    alone in its block does (what one deployed session does)."""
    backend = get_backend("ort", threads=2)
    kept = backend.session(conv_chain())
    assert kept.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    alone = backend.session(conv_chain(), spin=True)  # onnxruntime's default: no entry, workers spin
    with pytest.raises(RuntimeError, match="does not have configuration"):
        alone.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    assert "blocks" not in get_backend("ort", threads=1).key  # 1-thread tables (no pool) keep their cache


def test_multi_thread_timing_opens_one_session_at_a_time(monkeypatch):
    """`in_blocks` closes each session before the next opens; the backend times multi-thread models that way."""
    import weakref

    from onnxprune.latency import backend as backend_module

    alive: list[weakref.ref] = []
    most_alive = [0]
    real_session = backend_module.OrtBackend.session

    def tracking(self, model, **kw):
        sess = real_session(self, model, **kw)
        assert kw.get("spin") is True
        alive.append(weakref.ref(sess))
        most_alive[0] = max(most_alive[0], sum(r() is not None for r in alive))
        return sess

    monkeypatch.setattr(backend_module.OrtBackend, "session", tracking)
    timings = get_backend("ort", threads=2).time_models([conv_chain(), conv_chain()], warmup=1, repeat=3)
    assert most_alive[0] == 1 and len(alive) == 6
    assert [t.runs for t in timings] == [3 * backend_module.MULTI_THREAD_BLOCK] * 2


def test_in_blocks_rotates_the_order_and_closes_each_block():
    events: list[tuple[str, int]] = []

    def opener(i):
        def open_():
            events.append(("open", i))
            return lambda: events.append(("run", i))
        return open_

    timings = in_blocks([opener(i) for i in range(3)], warmup=1, repeat=2, block=2)
    assert [t.runs for t in timings] == [4, 4, 4]
    opens = [i for kind, i in events if kind == "open"]
    assert opens == [0, 1, 2, 1, 2, 0]
    # each opening: one warm-up run and two timed runs of that function only, before the next opens
    assert events[:4] == [("open", 0), ("run", 0), ("run", 0), ("run", 0)]


# ---- timing and measurement ---------------------------------------------------------------------------


def test_interleaved_rotates_the_order_and_reports_progress():
    calls: list[int] = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    recorder = RecordingReporter()
    with reporting(recorder):
        timings = interleaved(fns, warmup=1, repeat=4)
    assert [t.runs for t in timings] == [4, 4, 4]
    rounds = [calls[k : k + 3] for k in range(3, len(calls), 3)]
    assert rounds == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]
    assert recorder.finished("timing")[0].completed == 4


def test_static_inputs_fixes_batch_and_names_unknown_dims():
    model = conv_chain(batch="N")
    fixed = static_inputs(model, None)
    assert fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # the input is untouched
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(UsageError, match=r"'x'.*--shape x="):
        static_inputs(model, None)
    assert static_inputs(model, {"x": [2, 8, 12, 16]}).graph.input[0].type.tensor_type.shape.dim[2].dim_value == 12
    with pytest.raises(UsageError, match="conflicts"):
        static_inputs(model, {"x": [2, 8, 12, 12]})
    with pytest.raises(UsageError, match="not a model input"):
        static_inputs(model, {"y": [1]})
    with pytest.raises(UsageError, match="rank 4"):
        static_inputs(model, {"x": [1, 8]})


def test_onnxruntime_depthwise_steps_are_real(tmp_path):
    """onnxruntime: a depthwise conv at 63 channels is slower than at 64 (measured 2-3x, asserted 1.25x),
    and the table's grid for that group keeps 64 and drops 63."""
    backend = OrtBackend(threads=1)
    m63, m64 = conv_chain(width=63, hw=28), conv_chain(width=64, hw=28)
    speed = measure_speedup(m63, m64, backend, repeat=25)
    assert speed.speedup > 1.25, speed
    analysis = analyze(ModelGraph(conv_chain(width=64, hw=28)))
    table = build_table(analysis, backend, cache_dir=tmp_path)
    grid = keep_counts(table, analysis)[_width_group(analysis, 64).id]
    assert 64 in grid and 63 not in grid and 61 not in grid


# ---- latency-weighted ratios -----------------------------------------------------------------------


def test_weighted_fractions_keep_the_channel_budget_and_follow_density():
    from onnxprune.latency.weighted import weighted_fractions

    f = weighted_fractions({0: 100, 1: 100}, {0: 1.0, 1: 4.0}, 0.3, alpha=1.0)
    assert f[0] == pytest.approx(0.12) and f[1] == pytest.approx(0.48)  # 12 + 48 = 30% of 200 channels
    capped = weighted_fractions({0: 100, 1: 100}, {0: 1.0, 1: 100.0}, 0.5, alpha=2.0, max_group_ratio=0.9)
    assert capped[1] == pytest.approx(0.9) and capped[0] == pytest.approx(0.1)  # the cap moves the rest
    assert weighted_fractions({0: 10}, {0: 3.0}, 0.0) == {0: 0.0}
    assert weighted_fractions({0: 10, 1: 30}, {}, 0.25) == pytest.approx({0: 0.25, 1: 0.25})  # no density: uniform
    from onnxprune.latency.weighted import _scalable_ms

    assert _scalable_ms(_curve(range(2, 11), lambda c: 1.0)) == 0.0  # a flat curve: its channels buy no time
    assert _scalable_ms(_curve(range(2, 11), lambda c: 0.1 * c)) == pytest.approx(1.0)  # linear: all of it
    assert _scalable_ms(_curve(range(2, 11), lambda c: 0.5 + 0.05 * c)) == pytest.approx(0.5)  # a fixed part


def test_weighted_plan_removes_the_ratio_where_time_per_mac_is_high(tmp_path):
    from onnxprune.criteria import Magnitude
    from onnxprune.latency.weighted import time_density, weighted_plan
    from onnxprune.passes.config import PruneConfig
    from onnxprune.passes.latency_select import weighted_ratio_plan

    analysis = analyze(ModelGraph(conv_chain()))
    table = build_table(analysis, FakeBackend(), cache_dir=tmp_path)
    density = time_density(table, analysis)
    assert all(d > 0 for d in density.values())
    scores = Magnitude(1).score_all(analysis)
    total = sum(g.size for g in analysis.groups)
    plan = weighted_plan(analysis, scores, table, 0.5)
    assert abs(plan.channels_removed - 0.5 * total) <= 0.1 * total
    for gid, removed in plan.removed.items():  # lowest scores first
        kept = np.setdiff1d(np.arange(len(scores[gid])), removed)
        assert scores[gid][removed].max() <= scores[gid][kept].min()
    assert weighted_plan(analysis, scores, table, 0.0).channels_removed == 0
    from onnxprune.latency.predict import uniform_bound

    table.node_dense_ms["dw"] *= 100  # a depthwise conv that takes most of the time with few MACs
    bound = uniform_bound(table, analysis, 0.7)
    assert bound.efficiency < 0.9 and bound.linear_share > 0.9  # its time falls as 0.3, c2's MACs as 0.09
    assert bound.macs_reduction > bound.speedup > 1
    made = weighted_ratio_plan(PruneConfig(ratio=0.7, round_to="auto"), analysis, scores, table, None)
    assert made is not None and made.channels_removed == weighted_plan(analysis, scores, table, 0.7).channels_removed
    assert uniform_bound(table, analysis, 0.1).efficiency >= 0.9  # a bound that reaches 0.9: uniform stays
    assert weighted_ratio_plan(PruneConfig(ratio=0.1, round_to="auto"), analysis, scores, table, None) is None
    for other in (PruneConfig(ratio=0.5, round_to=1), PruneConfig(ratio=0.5, round_to="auto", allocation="uniform"),
                  PruneConfig(ratio=0.5, round_to="auto", global_ranking=True), PruneConfig(ratio=0.0, round_to="auto")):
        assert weighted_ratio_plan(other, analysis, scores, table, None) is None  # explicit choices stay


def test_tvm_latency_cache_key_covers_every_kernel_module():
    pytest.importorskip("tvm")
    from pathlib import Path

    from onnxprune.targets import tvm_latency

    here = Path(tvm_latency.__file__).parent
    modules = tvm_latency._compile_modules(here)
    # today's row-wise and fast-math kernels decide compiled kernels too, through tvm_layout / tvm_schedules
    for name in ("tvm_backend.py", "tvm_layout.py", "tvm_schedules.py", "tvm_rowwise.py", "tvm_fastmath.py",
                 "tvm_winograd.py", "tvm_tiles.py"):
        assert name in modules
    assert "bundle.py" not in modules and "tvm_latency.py" not in modules
    key_hash = tvm_latency._schedule_hash()
    assert key_hash.startswith(f"v{tvm_latency.KERNEL_VERSION}-") and len(key_hash.split("-")[1]) == 12
