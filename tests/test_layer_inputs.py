"""Frontier caching of layer inputs (onnxprune/layer_inputs.py): the values never depend on the cache."""

from __future__ import annotations

import numpy as np
from conftest import canonical
from onnx import TensorProto, helper, numpy_helper

from onnxprune import layer_inputs
from onnxprune.calibration import CalibrationData
from onnxprune.layer_inputs import FrontierRunner


def _chain(depth: int = 4, width: int = 4):
    """x -> (Conv 1x1 -> Relu) x depth with a residual Add around each block."""
    rng = np.random.default_rng(0)
    nodes, inits, t = [], [], "x"
    for k in range(depth):
        w = numpy_helper.from_array(rng.standard_normal((width, width, 1, 1)).astype(np.float32) * 0.5, f"w{k}")
        inits.append(w)
        nodes += [helper.make_node("Conv", [t, f"w{k}"], [f"c{k}"], name=f"conv{k}"),
                  helper.make_node("Relu", [f"c{k}"], [f"r{k}"], name=f"relu{k}"),
                  helper.make_node("Add", [t, f"r{k}"], [f"a{k}"], name=f"add{k}")]
        t = f"a{k}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width, 3, 3])],
                              [helper.make_tensor_value_info(t, TensorProto.FLOAT, None)], inits)
    return canonical(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _with_weight(model, name: str, value: np.ndarray):
    out = model.__class__()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(value, name))
    return out


def test_cached_runs_match_plain_runs_while_downstream_weights_change(monkeypatch):
    monkeypatch.setattr(layer_inputs, "OPTIMIZE", False)  # one graph, so cached and plain runs agree bit for bit
    model = _chain()
    data = CalibrationData({"x": np.random.default_rng(1).standard_normal((5, 1, 4, 3, 3)).astype(np.float32)[:, 0]})
    cached, plain, tiny = FrontierRunner(data), FrontierRunner(data, budget=0), FrontierRunner(data, budget=200)
    together = FrontierRunner(data, threads=1, concurrent=3)  # samples run at once, yielded in order
    current = model
    for k in range(4):
        names = [f"a{k - 1}", f"r{k - 1}"] if k else ["x"]  # inputs of the wave's consumer (conv k)
        got = [list(r.run(current, names)) for r in (cached, plain, tiny, together)]
        assert all(len(g) == 5 for g in got)
        for a, b, c, d in zip(*got):
            for name in names:
                np.testing.assert_array_equal(a[name], b[name])
                np.testing.assert_array_equal(c[name], b[name])
                np.testing.assert_array_equal(d[name], b[name])
        if k:
            assert cached.cache and all(v.shape[0] == 5 for v in cached.cache.values())
        assert sum(v.nbytes for v in tiny.cache.values()) <= 200
        # the wave's consumer is "repaired": only nodes downstream of what was asked for change (as in
        # sequential repair, which asks for consumer inputs and then rewrites those consumers)
        current = _with_weight(current, f"w{k}", np.full((4, 4, 1, 1), 0.1 * (k + 1), np.float32))
    assert not plain.cache


def test_a_tensor_fitting_only_in_float16_is_cached_so_and_fed_back_as_float32(monkeypatch):
    monkeypatch.setattr(layer_inputs, "OPTIMIZE", False)
    model = _chain()
    data = CalibrationData({"x": np.random.default_rng(2).standard_normal((5, 4, 3, 3)).astype(np.float32)})
    # one frontier tensor: 5 x 36 floats = 720 bytes in float32, 360 in float16
    half, plain = FrontierRunner(data, budget=400), FrontierRunner(data, budget=0)
    current = model
    for k in range(4):
        names = [f"a{k - 1}", f"r{k - 1}"] if k else ["x"]
        for a, b in zip(half.run(current, names), plain.run(current, names)):
            for name in names:
                assert a[name].dtype == np.float32
                np.testing.assert_allclose(a[name], b[name], rtol=2e-3, atol=2e-3 * float(np.abs(b[name]).max()))
        assert sum(v.nbytes for v in half.cache.values()) <= 400
        if k:
            assert half.cache and all(v.dtype == np.float16 for v in half.cache.values())
        current = _with_weight(current, f"w{k}", np.full((4, 4, 1, 1), 0.1 * (k + 1), np.float32))
    monkeypatch.setattr(layer_inputs, "HALF_CACHE", False)  # off: nothing that size is cached
    off = FrontierRunner(data, budget=400)
    list(off.run(model, ["a0", "r0"]))
    assert not off.cache


def test_the_float16_cache_holds_exactly_numpys_rounding_of_the_float32_values(monkeypatch):
    """onnxruntime casts to and from the float16 cache (faster than numpy): the stored values are bit for
    bit numpy's round-to-nearest-even of the float32 ones, and the values read back are those widened."""
    monkeypatch.setattr(layer_inputs, "OPTIMIZE", False)
    model = _chain()
    data = CalibrationData({"x": np.random.default_rng(3).standard_normal((6, 4, 3, 3)).astype(np.float32) * 30})
    half = FrontierRunner(data, budget=6 * 36 * 2)  # one frontier tensor, only in float16
    list(half.run(model, ["x"]))
    list(half.run(model, ["a0", "r0"]))  # computed from the graph input: float32 values as in a plain run
    assert list(half.cache) == ["a0"] and half.cache["a0"].dtype == np.float16
    exact = np.stack([v["a0"] for v in FrontierRunner(data, budget=0).run(model, ["a0"])])
    np.testing.assert_array_equal(half.cache["a0"].view(np.uint16), exact.astype(np.float16).view(np.uint16))
    assert np.any(half.cache["a0"].astype(np.float32) != exact)  # the test data does round
    # a cached tensor asked for again comes back through onnxruntime's Cast: the float16 values widened
    again = np.stack([v["a0"] for v in half.run(model, ["a0"])])
    assert again.dtype == np.float32
    np.testing.assert_array_equal(again, half.cache["a0"].astype(np.float32))


def _bottlenecks(depth: int = 4, width: int = 4):
    """x -> stem Conv -> depth x [a + Conv(Relu(Conv(a)))]: a stream beside each block's inner tensor."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "ws"], ["a-1"], name="stem")]
    inits = [numpy_helper.from_array(rng.standard_normal((width, width, 1, 1)).astype(np.float32) * 0.5, "ws")]
    for k in range(depth):
        for part in "ab":
            w = rng.standard_normal((width, width, 1, 1)).astype(np.float32) * 0.5
            inits.append(numpy_helper.from_array(w, f"w{part}{k}"))
        nodes += [helper.make_node("Conv", [f"a{k - 1}", f"wa{k}"], [f"c{k}"], name=f"conva{k}"),
                  helper.make_node("Relu", [f"c{k}"], [f"m{k}"], name=f"relu{k}"),
                  helper.make_node("Conv", [f"m{k}", f"wb{k}"], [f"r{k}"], name=f"convb{k}"),
                  helper.make_node("Add", [f"a{k - 1}", f"r{k}"], [f"a{k}"], name=f"add{k}")]
    graph = helper.make_graph(nodes, "bottlenecks",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width, 3, 3])],
                              [helper.make_tensor_value_info(f"a{depth - 1}", TensorProto.FLOAT, None)], inits)
    return canonical(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_when_the_frontier_does_not_fit_the_cache_keeps_what_saves_most_recomputation(monkeypatch):
    """Room for one of a block's inner tensor and the stream beside it: keeping the inner one (nearest the cut)
    sends the next wave back to the graph input for the stream; the cheapest choice keeps the stream."""
    monkeypatch.setattr(layer_inputs, "OPTIMIZE", False)
    monkeypatch.setattr(layer_inputs, "HALF_CACHE", False)
    model = _bottlenecks()
    data = CalibrationData({"x": np.random.default_rng(4).standard_normal((5, 4, 3, 3)).astype(np.float32)})
    runs: list[int] = []
    submodel = FrontierRunner._submodel

    def counted(self, model, nodes, needed, outputs):
        runs.append(len(needed))
        return submodel(self, model, nodes, needed, outputs)

    monkeypatch.setattr(FrontierRunner, "_submodel", counted)
    nodes_run = {}
    search = layer_inputs.MAX_CHOICES
    for choices in (search, 0):  # 0: the greedy choice, nearest the cut first
        monkeypatch.setattr(layer_inputs, "MAX_CHOICES", choices)
        runner, plain = FrontierRunner(data, budget=5 * 36 * 4), FrontierRunner(data, budget=0)
        runs.clear()
        current = model
        for k in range(4):  # waves: each block's first conv (reads the stream), then its second (reads m)
            for names, weight in (([f"a{k - 1}"], f"wa{k}"), ([f"m{k}"], f"wb{k}")):
                for a, b in zip(runner.run(current, names), plain.run(current, names)):
                    np.testing.assert_array_equal(a[names[0]], b[names[0]])
                assert sum(v.nbytes for v in runner.cache.values()) <= 5 * 36 * 4
                current = _with_weight(current, weight, np.full((4, 4, 1, 1), 0.1 * (k + 1), np.float32))
        nodes_run[choices] = sum(runs)  # nodes the cached runner ran (the plain one runs whole prefixes)
    assert nodes_run[search] < nodes_run[0], nodes_run


def test_a_dropped_cache_array_is_reused_for_the_next_tensor_of_its_shape(monkeypatch):
    """A wave reading the cached stream caches the next one: written into the same array (one per model alive,
    not two), with the values of an uncached run."""
    monkeypatch.setattr(layer_inputs, "OPTIMIZE", False)
    monkeypatch.setattr(layer_inputs, "HALF_CACHE", False)  # float32 only: bit for bit
    model = _chain()
    data = CalibrationData({"x": np.random.default_rng(5).standard_normal((5, 4, 3, 3)).astype(np.float32)})
    runner, plain = FrontierRunner(data, budget=5 * 36 * 4), FrontierRunner(data, budget=0)
    reused = 0
    for k in range(4):
        names = [f"r{k - 1}"] if k else ["x"]  # the stream a_k is cached, never asked for (not yielded)
        before = list(runner.cache.values())
        for a, b in zip(runner.run(model, names), plain.run(model, names)):
            np.testing.assert_array_equal(a[names[0]], b[names[0]])
        reused += any(np.shares_memory(v, w) for v in runner.cache.values() for w in before)
        assert sum(v.nbytes for v in runner.cache.values()) <= 5 * 36 * 4
    assert reused >= 2


def test_in_order_yields_every_result_in_key_order_with_calls_overlapping():
    """`concurrency.in_order`: results in the keys' order whatever order the calls finish in, at most `at_once`
    running, and an iterator closed early leaves no call running."""
    import threading
    import time

    from onnxprune.concurrency import in_order

    running, peak, lock = [0], [0], threading.Lock()

    def slow(k: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02 if k % 2 == 0 else 0.001)  # even keys finish after the odd one behind them
        with lock:
            running[0] -= 1
        return k * k

    assert list(in_order(slow, range(9), 3)) == [k * k for k in range(9)]
    assert 2 <= peak[0] <= 3
    assert list(in_order(slow, range(4), 1)) == [0, 1, 4, 9]
    it = in_order(slow, range(100), 2)
    assert next(it) == 0
    it.close()
    assert running[0] == 0
