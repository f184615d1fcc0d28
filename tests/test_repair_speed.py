"""Speed-ups of the sequential repair (issue 17's time bar) that must not change its result: statistics of the
pruned input over its kept features only (`repair.SEQ_COMPACT`), checked against all features, and the
repaired model against onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import canonical

from models.testmodels import TEST_MODELS
from onnxprune import repair
from onnxprune.calibration import CalibrationData
from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.repair import reanalyze, repair_sequential
from onnxprune.rewrite import apply_mask, apply_plan
from onnxprune.shape_inference import infer_shapes
from onnxprune.verify import max_rel_error, random_inputs, run


def _calib(model, n, seed=0) -> CalibrationData:
    samples = [random_inputs(model, seed=seed + i) for i in range(n)]
    return CalibrationData({k: np.concatenate([s[k] for s in samples]) for k in samples[0]})


@pytest.mark.parametrize("name", ["residual", "chain", "gemm_head", "attention"])
def test_kept_feature_statistics_give_the_weights_of_all_feature_statistics(name, monkeypatch):
    """The removed features of x~ are zeros nothing reads: fitting on the kept ones only gives the same
    weights up to float32 summation order (measured: max relative difference per weight <= 2.1e-4, a
    Gemm behind a chain of refitted layers; most 0 to 1e-5), and the pruned model
    equals the masked one in onnxruntime."""
    model = canonical(TEST_MODELS[name]())
    calib = _calib(model, 16)
    analysis = analyze(ModelGraph(model))
    labels = PrunePass(PruneConfig(ratio=0.4)).plan(analysis).labels(analysis)
    results = {}
    for compact in (False, True):
        monkeypatch.setattr(repair, "SEQ_COMPACT", compact)
        repaired, report = repair_sequential(analysis, labels, calib)
        assert report.repaired
        results[compact] = {t.name: np.asarray(onnx_value(t), np.float64) for t in repaired.graph.initializer}
        work, work_labels = reanalyze(analysis, labels, repaired, False)
        inputs = random_inputs(model, seed=99)
        pruned = infer_shapes(apply_plan(work, work_labels))
        assert max_rel_error(run(apply_mask(work, work_labels), inputs), run(pruned, inputs)) <= 1e-5
    assert results[True].keys() == results[False].keys()
    changed = 0
    for k, full in results[False].items():
        got = results[True][k]
        scale = max(1e-12, float(np.abs(full).max()))
        assert float(np.abs(got - full).max()) / scale <= 1e-3, k
        changed += int(not np.array_equal(full, np.asarray(onnx_value(_init(model, k)), np.float64))
                       if _init(model, k) is not None else 1)
    assert changed  # the repair did change weights (the comparison is not between two no-ops)


@pytest.mark.parametrize("name", ["residual", "chain", "depthwise", "gemm_head", "attention", "concat"])
def test_dense_rows_drawn_once_give_the_weights_of_the_per_wave_runner(name, monkeypatch):
    """The original model's rows drawn once before the waves (`repair.SEQ_DENSE_ROWS`; in memory, and in
    the temporary file) fit the same weights as the second runner drawing them in every wave, where every
    position is kept (these small maps: the rows are then the same sets in the same order); the pruned model
    equals the masked one in onnxruntime."""
    from onnxprune import dense_rows

    model = canonical(TEST_MODELS[name]())
    calib = _calib(model, 12)
    analysis = analyze(ModelGraph(model))
    labels = PrunePass(PruneConfig(ratio=0.4)).plan(analysis).labels(analysis)
    results = []
    for use_dense, memory in ((False, None), (True, 1 << 30), (True, 0)):
        monkeypatch.setattr(repair, "SEQ_DENSE_ROWS", use_dense)
        if memory is not None:
            monkeypatch.setattr(dense_rows, "MEMORY_BYTES", memory)
        repaired, report = repair_sequential(analysis, labels, calib)
        assert report.repaired
        results.append({t.name: np.asarray(onnx_value(t), np.float64) for t in repaired.graph.initializer})
        work, work_labels = reanalyze(analysis, labels, repaired, False)
        inputs = random_inputs(model, seed=99)
        assert max_rel_error(run(apply_mask(work, work_labels), inputs),
                             run(infer_shapes(apply_plan(work, work_labels)), inputs)) <= 1e-5
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for k, want in results[0].items():
            scale = max(1e-12, float(np.abs(want).max()))
            assert float(np.abs(other[k] - want).max()) / scale <= 1e-3, k
    assert any(not np.array_equal(v, np.asarray(onnx_value(_init(model, k)), np.float64))
               for k, v in results[0].items() if _init(model, k) is not None)


def test_dense_rows_are_the_inputs_or_the_outputs_whichever_is_narrower():
    """Per consumer the store keeps [x] or y = [W b] [x 1]; the y rows equal the product of the x rows."""
    from onnxprune.calibration import consumers
    from onnxprune.dense_rows import dense_rows

    model = canonical(TEST_MODELS["residual"]())
    calib = _calib(model, 4)
    graph = ModelGraph(model)
    cons = consumers(graph)
    rng = np.random.default_rng(0)
    targets = {}
    for c in cons:  # every other consumer gets a target wider than its features: its x rows are kept
        f = c.feature_count(c.weight_shape(graph))
        targets[c.name] = rng.standard_normal((f + 3 if len(targets) % 2 else max(1, f // 2), f + 1))
    store = dense_rows(model, cons, targets, calib, 65536, seed=5)
    assert store is not None
    wide = dense_rows(model, cons, {k: np.zeros((10**6, 1)) for k in targets}, calib, 65536, seed=5)  # never y
    assert wide is not None and not wide.outputs
    assert store.outputs and len(store.outputs) < len(cons)
    for c in cons:
        rows = store.load(c.name)
        x = wide.load(c.name)
        assert len(rows) == calib.n * store.count[c.name]
        if c.name in store.outputs:
            wa = targets[c.name]
            np.testing.assert_allclose(rows, x @ wa[:, :-1].T + wa[:, -1], rtol=1e-4, atol=1e-4)
        else:
            np.testing.assert_array_equal(rows, x)


def onnx_value(t):
    from onnx import numpy_helper

    return numpy_helper.to_array(t)


def _init(model, name):
    return next((t for t in model.graph.initializer if t.name == name), None)


def test_paired_is_zip_longest_with_the_first_iterator_stepped_in_a_thread():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from onnxprune.repair_stats import paired

    threads: set[str] = set()

    def gen(n: int, tag: str):
        for i in range(n):
            threads.add(f"{tag}:{threading.current_thread().name}")
            yield (tag, i)
        threads.add(f"{tag}-end")  # the code after the last yield runs too (a runner's cache refresh)

    with ThreadPoolExecutor(max_workers=1) as pool:
        got = list(paired(gen(3, "a"), gen(5, "b"), pool))
    assert got == [(("a", 0), ("b", 0)), (("a", 1), ("b", 1)), (("a", 2), ("b", 2)), (None, ("b", 3)), (None, ("b", 4))]
    assert {"a-end", "b-end"} <= threads
    assert f"b:{threading.current_thread().name}" in threads and not any(t.startswith("a:Main") for t in threads)

    def broken():
        yield 1
        raise ValueError("runner failed")

    with ThreadPoolExecutor(max_workers=1) as pool, pytest.raises(ValueError, match="runner failed"):
        list(paired(broken(), gen(3, "b"), pool))


@pytest.mark.parametrize("name", ["residual", "gemm_head", "attention"])
def test_statistics_pass_draws_the_rows_the_seq_repair_would_draw(name, monkeypatch):
    """`collect_stats` with `repair.seq_rows_writer` keeps the same rows as `dense_rows`' own forward pass
    (inputs, or the original outputs where narrower; in memory and in the temporary file), and its Hessians
    are the ones it collects without the writer."""
    from onnxprune import dense_rows as dr
    from onnxprune.calibration import collect_stats, consumers

    model = canonical(TEST_MODELS[name]())
    calib = _calib(model, 6)
    graph = ModelGraph(model)
    for memory in (1 << 30, 0):
        monkeypatch.setattr(dr, "MEMORY_BYTES", memory)
        writer = repair.seq_rows_writer(model, calib, seed=3)
        assert writer is not None
        stats = collect_stats(model, calib, seed=3, moments=False, rows=writer)
        shared = stats.rows
        assert isinstance(shared, dr.DenseRows) and (shared.file is None) == bool(memory)
        cons = [c for c in consumers(graph) if c.name in shared.count]
        assert cons
        targets = {c.name: _target(c, graph) for c in cons}
        own = dr.dense_rows(model, cons, targets, calib, 65536, seed=3)
        assert own is not None and shared.serves(model, cons, calib, 65536, 3)
        for c in cons:
            assert (c.name in shared.outputs) == (c.name in own.outputs)
            np.testing.assert_allclose(shared.load(c.name), own.load(c.name), rtol=1e-5, atol=1e-5)
        if name == "residual":  # both kinds of rows exercised
            assert shared.outputs and len(shared.outputs) < len(cons)
        plain = collect_stats(model, calib, seed=3, moments=False)
        for k, st in plain.stats.items():
            # the same rows; exposing the layers' outputs the writer reads keeps onnxruntime from folding a
            # BatchNorm into the conv before it, so the inputs differ by float32 rounding
            np.testing.assert_allclose(stats.stats[k].hessian, st.hessian, rtol=1e-5,
                                       atol=1e-6 * float(np.abs(st.hessian).max()))
        shared.close()


def test_rows_are_served_only_to_the_model_samples_and_seed_they_were_drawn_from():
    from onnxprune.calibration import collect_stats, consumers

    model = canonical(TEST_MODELS["residual"]())
    calib = _calib(model, 4)
    stats = collect_stats(model, calib, rows=repair.seq_rows_writer(model, calib, seed=0))
    rows = stats.rows
    cons = [c for c in consumers(ModelGraph(model)) if c.name in rows.count]
    assert rows.serves(model, cons, calib, 65536, 0)
    copy = type(model)()
    copy.CopyFrom(model)
    assert not rows.serves(copy, cons, calib, 65536, 0)  # another model object (it may have been edited)
    assert not rows.serves(model, cons, _calib(model, 4, seed=50), 65536, 0)
    assert not rows.serves(model, cons, calib, 65536, 1)
    assert not rows.serves(model, cons, calib, 4096, 0)


@pytest.mark.parametrize("name", ["residual", "depthwise", "gemm_head"])
def test_prune_with_rows_from_the_statistics_pass_equals_the_prune_drawing_its_own(name, monkeypatch):
    """obs + seq through `PrunePass`: the selection carries the statistics pass's rows to the repair, which
    gives the weights of the repair drawing them in a pass of its own (the writer switched off)."""
    from onnxprune.passes import select

    model = canonical(TEST_MODELS[name]())
    calib = _calib(model, 8)
    used = []
    original = repair.repair_sequential

    def spy(*args, **kwargs):
        used.append(kwargs.get("dense"))
        return original(*args, **kwargs)

    drawn = []
    own_pass = repair.dense_rows

    def counted(*args, **kwargs):
        drawn.append(1)
        return own_pass(*args, **kwargs)

    monkeypatch.setattr("onnxprune.passes.repair.repair_sequential", spy)
    monkeypatch.setattr(repair, "dense_rows", counted)
    cfg = PruneConfig(ratio=0.4, criterion="obs", repair="seq", round_to=1)
    shared = PrunePass(cfg, calib=calib).call(model).model
    assert used[0] is not None and not drawn  # served: no forward pass of its own
    monkeypatch.setattr(select, "seq_rows_writer", lambda *a, **k: None)
    own = PrunePass(cfg, calib=calib).call(model).model
    assert used[1] is None and len(drawn) == 1
    a = {t.name: onnx_value(t) for t in shared.graph.initializer}
    b = {t.name: onnx_value(t) for t in own.graph.initializer}
    assert a.keys() == b.keys()
    for k, v in b.items():  # the rows agree to float32 rounding (two onnxruntime sessions), which the ridge
        # solves amplify to ~1e-4 of the weights' scale
        np.testing.assert_allclose(a[k], v, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(v).max())))
    inputs = random_inputs(model, seed=7)
    assert max_rel_error(run(shared, inputs), run(own, inputs)) <= 1e-4


def _target(c, graph):
    """Consumer `c`'s original [W b], as the seq repair's writer takes it."""
    n_out = c.weight_matrix(graph.initializer_value(c.weight)).shape[0]
    return repair.original_target(graph, c, repair.bias_slot(graph, c, n_out))


def test_in_place_products_equal_numpy():
    """`gram`: the BLAS sums into their accumulators give numpy's products; only the lower triangle is summed
    until `fill_upper`, over sizes around its block."""
    from onnxprune.gram import add_gram, add_product, fill_upper

    rng = np.random.default_rng(0)
    for n in (1, 7, 256, 300):
        rows = [rng.standard_normal((m, n)).astype(np.float32) for m in (5, 40)]
        acc = np.zeros((n, n), np.float32)
        for r in rows:
            add_gram(acc, r)
        want = sum(r.T.astype(np.float64) @ r for r in rows)
        np.testing.assert_allclose(np.tril(acc), np.tril(want), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(fill_upper(acc), want, rtol=1e-4, atol=1e-4)
        y = rng.standard_normal((40, 3))  # float64: cast to float32 on the way
        p = np.ones((n, 3), np.float32)
        add_product(p, rows[1], y)
        np.testing.assert_allclose(p, 1 + rows[1].T @ y, rtol=1e-4, atol=1e-4)


def test_outputs_stand_for_projected_rows_only_where_they_are_the_layers_product():
    """`dense_rows.output_source`: a Conv / plain Gemm's own output, less its own bias, is [W b][x 1]; a scaled
    Gemm, a bias computed at run time, or a target that is not the layer's weight keep the projection."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxprune.calibration import consumers
    from onnxprune.dense_rows import output_source

    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)

    def gemm_model(alpha, bias_const):
        nodes = [helper.make_node("Gemm", ["x", "w", "b" if bias_const else "bb"], ["y"], transB=1, alpha=alpha,
                                  name="fc")]
        inits = [numpy_helper.from_array(w, "w")]
        if bias_const:
            inits.append(numpy_helper.from_array(b, "b"))
        else:
            nodes.insert(0, helper.make_node("Relu", ["b_in"], ["bb"]))
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])]
        if not bias_const:
            inputs.append(helper.make_tensor_value_info("b_in", TensorProto.FLOAT, [4]))
        graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                                  inits)
        return infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))

    wa = np.concatenate([w, (b + 1.0)[:, None]], axis=1).astype(np.float64)  # b relative: own bias + 1
    model = gemm_model(1.0, True)
    graph = ModelGraph(model)
    (c,) = consumers(graph)
    tensor, offset = output_source(graph, c, wa)
    assert tensor == "y"
    np.testing.assert_allclose(offset, np.ones(4), atol=1e-6)
    assert output_source(graph, c, wa + 0.5) is None  # another W than the layer's
    scaled = gemm_model(2.0, True)
    assert output_source(ModelGraph(scaled), consumers(ModelGraph(scaled))[0], wa) is None
    computed = gemm_model(1.0, False)
    cons = consumers(ModelGraph(computed))
    assert cons and output_source(ModelGraph(computed), cons[0], wa) is None


def test_obs_scores_groups_in_threads_as_one_at_a_time(monkeypatch):
    """`OBS.score_all` scores groups two at a time: the scores are those of one group after the other."""
    from onnxprune import criteria
    from onnxprune.calibration import collect_stats

    model = canonical(TEST_MODELS["residual"]())
    stats = collect_stats(model, _calib(model, 6), moments=False)
    analysis = analyze(ModelGraph(model))
    crit = criteria.get_criterion("obs", stats=stats, repair="ls")
    monkeypatch.setattr(criteria, "SCORE_THREADS", 2)
    both = crit.score_all(analysis)
    monkeypatch.setattr(criteria, "SCORE_THREADS", 1)
    one = crit.score_all(analysis)
    assert both.keys() == one.keys() and len(one) > 1
    for k, v in one.items():
        np.testing.assert_array_equal(both[k], v)


def _strided_model():
    """Convs with stride, padding, dilation and SAME padding, then a MatMul over [1, positions, channels]: the
    layouts whose output positions must line up with the drawn input windows."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                         name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[3, 3], dilations=[2, 2], pads=[2, 2, 2, 2],
                         name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], kernel_shape=[3, 3], strides=[2, 2],
                         auto_pad="SAME_UPPER", name="conv3"),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("Reshape", ["r3", "shape"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["seq"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["seq", "w4"], ["y"], name="proj"),
    ]
    inits = [init("w1", 8, 3, 3, 3), init("b1", 8), init("w2", 8, 8, 3, 3), init("w3", 6, 8, 3, 3), init("b3", 6),
             init("w4", 6, 2), numpy_helper.from_array(np.array([1, 6, 9], np.int64), "shape")]
    graph = helper.make_graph(nodes, "strided", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 9, 2])], inits)
    return infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_output_rows_are_the_projected_rows_for_strided_dilated_and_same_padded_layers(monkeypatch):
    """The seq repair's original-side rows gathered from the layers' outputs (`dense_rows.output_source`) equal
    the drawn input rows multiplied by [W b], both in the statistics pass and in `dense_rows`' own pass, with
    positions sampled (a small row budget) and whole."""
    from onnxprune import dense_rows as dr
    from onnxprune.calibration import collect_stats, consumers

    model = _strided_model()
    graph = ModelGraph(model)
    cons = consumers(graph)
    assert {c.name for c in cons} == {"conv1", "conv2", "conv3", "proj"}
    targets = {c.name: _target(c, graph) for c in cons}
    calib = _calib(model, 5)
    for max_rows in (10, 65536):
        own = dr.dense_rows(model, cons, targets, calib, max_rows, seed=2)
        writer = dr.DenseRowsWriter(model, cons, targets, calib, max_rows, seed=2)
        assert set(writer.output_tensors) == {c.name for c in cons}  # every layer here is narrower than its input
        shared = collect_stats(model, calib, seed=2, moments=False, max_rows=max_rows, rows=writer).rows
        monkeypatch.setattr(dr, "output_source", lambda *a: None)  # the reference: input rows times [W b]
        projected = dr.dense_rows(model, cons, targets, calib, max_rows, seed=2)
        monkeypatch.undo()
        assert own is not None and shared is not None and projected is not None
        # a small budget draws some of the positions (conv1: 36 of them), a large one all
        assert (projected.count["conv1"] < 36) == (max_rows == 10)
        for c in cons:
            want = projected.load(c.name)
            assert c.name in projected.outputs and len(want) == calib.n * projected.count[c.name]
            np.testing.assert_allclose(own.load(c.name), want, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(shared.load(c.name), want, rtol=1e-4, atol=1e-5)
        for store in (own, shared, projected):
            store.close()
