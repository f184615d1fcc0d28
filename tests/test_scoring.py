"""Importance criteria on a handcrafted two-layer MLP whose channel ranking is known by construction.

y = W2 relu(W1 x + b1), six hidden channels (one group):
  c0 = [.5, .5, .5, .5]   L1 2.0, L2 1.0   -> the L2 minimum
  c1 = [1.5, 0, 0, 0]     L1 1.5, L2 1.5   -> the L1 minimum
  c2 = [2, -2, 2, -2], bias -100: never active -> the activation / APoZ / OBS(no repair) minimum
  c3 = [0, 0, 3, 1]
  c4 = c5 = [1, -1, .5, 2]: duplicates -> OBS with the least-squares update can remove one for free
The consumer W2 has identical columns, so magnitude rankings are set by W1 alone. Each criterion's
choice is then pruned for real and run in onnxruntime against the original with that channel zeroed.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ROOT, canonical
from onnx import TensorProto, helper, numpy_helper

from onnxprune import greedy_obs
from onnxprune.calibration import CalibrationData, collect_stats
from onnxprune.channels import analyze
from onnxprune.criteria import channel_saliency, damped_inverse, get_criterion
from onnxprune.graph import ModelGraph
from onnxprune.greedy_obs import GreedyConsumer, greedy_obs_scores
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.verify import max_rel_error, run, session

W1 = np.array(
    [[0.5, 0.5, 0.5, 0.5], [1.5, 0, 0, 0], [2, -2, 2, -2], [0, 0, 3, 1], [1, -1, 0.5, 2], [1, -1, 0.5, 2]],
    dtype=np.float32,
)
B1 = np.array([0.1, 0.1, -100, 0.1, 0.2, 0.2], dtype=np.float32)
W2 = np.ones((3, 6), dtype=np.float32)


def mlp(w1: np.ndarray = W1, b1: np.ndarray = B1) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(W2, "w2")],
    )  # fmt: skip
    return canonical(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.fixture(scope="module")
def setup():
    model = mlp()
    x = np.random.default_rng(0).standard_normal((64, 1, 4)).astype(np.float32)
    stats = collect_stats(model, CalibrationData({"x": x.reshape(64, 4)}))
    analysis = analyze(ModelGraph(model))
    assert len(analysis.groups) == 1 and analysis.groups[0].size == 6
    return model, stats, analysis, x


def scores(setup, name, repair="none"):
    _, stats, analysis, _ = setup
    return get_criterion(name, 0, stats, repair).score(analysis.groups[0], analysis)


def test_l1_and_l2_rank_by_their_own_norm(setup):
    assert np.argmin(scores(setup, "l1")) == 1
    assert np.argmin(scores(setup, "l2")) == 0


def test_lamp_is_in_unit_interval_and_monotone_in_l2(setup):
    lamp, l2 = scores(setup, "lamp"), scores(setup, "l2")
    assert np.isclose(lamp.max(), 1.0) and np.all((lamp > 0) & (lamp <= 1))
    assert np.argmin(lamp) == 0
    assert np.all(np.diff(lamp[np.argsort(l2)]) >= -1e-12)
    assert lamp[4] == lamp[5]  # equal magnitudes, equal LAMP scores (the sum runs over every v_j >= v_i)


def test_activation_and_apoz_find_the_dead_channel(setup):
    act, apoz = scores(setup, "activation"), scores(setup, "apoz")
    assert np.argmin(act) == 2 and act[2] == 0
    assert np.argmin(apoz) == 2 and np.all(np.delete(apoz, 2) > apoz[2])


def test_fpgm_is_the_sum_of_distances_to_the_other_filters(setup):
    d = np.sqrt(((W1[:, None, :].astype(np.float64) - W1[None, :, :]) ** 2).sum(-1)).sum(1)
    s = scores(setup, "fpgm")
    assert np.allclose(s / s.mean(), d / d.mean())  # W2's identical columns add nothing


def test_obs_saliency_follows_the_repair(setup):
    none = scores(setup, "obs", "none")
    assert np.argmin(none) == 2 and none[2] == pytest.approx(0.0, abs=1e-12)  # dead: removing it costs nothing
    ls = scores(setup, "obs", "ls")
    order = [int(k) for k in np.argsort(ls)]
    assert order[0] == 2 and order[1] in (4, 5)  # dead, then a duplicate its twin absorbs (least-squares update)
    assert order[-1] == 9 - order[1]  # greedy: the twin now carries both channels, the last one to go
    assert ls[1] > 5 * ls[order[1]]  # the L1 choice is expensive once the data is seen


@pytest.mark.parametrize("fraction", [1.0, greedy_obs.GREEDY_FRACTION])
def test_greedy_obs_removes_the_cheapest_channel_given_the_ones_already_gone(monkeypatch, fraction):
    """Each greedy step takes the channel whose removal, with the ones before it, costs least by the exact OBS
    error of removing a set S with the optimal update of the rest: tr(W_S (K_SS)^-1 W_S^T), K = H^-1 (brute force);
    past `GREEDY_FRACTION` of the channels the rest go in one step, by that cost given the ones removed."""
    monkeypatch.setattr(greedy_obs, "GREEDY_FRACTION", fraction)
    rng = np.random.default_rng(3)
    channels, width, outputs = 7, 2, 3
    features = channels * width
    x = rng.standard_normal((200, features)) @ rng.standard_normal((features, features))  # correlated features
    x[:, 2:4] = x[:, 8:10] + 0.05 * rng.standard_normal((200, 2))  # channel 1 nearly duplicates channel 4
    xa = np.concatenate([x, np.ones((200, 1))], axis=1)
    H = xa.T @ xa / 200
    W = rng.standard_normal((outputs, features + 1))
    W[:, -1] = 0.0
    feat_ch = np.repeat(np.arange(channels), width)
    K = damped_inverse(H, 0.01)
    s = greedy_obs_scores([GreedyConsumer(W, K, feat_ch, 1.0, channels)], channels)

    def cost(removed):
        f = np.flatnonzero(np.isin(feat_ch, removed))
        return float(np.trace(W[:, f] @ np.linalg.solve(K[np.ix_(f, f)], W[:, f].T)))

    order = [int(k) for k in np.argsort(s)]
    assert np.all(np.diff(s[order]) > 0)  # strictly increasing along the removal order
    steps = int(np.ceil(fraction * channels))  # greedy steps; then the rest by their cost after those
    for k in range(channels - 1):
        done = order[: min(k, steps)]
        rest = [j for j in range(channels) if j not in order[:k]]
        assert order[k] == min(rest, key=lambda j: cost(done + [j]))
    one_shot = channel_saliency(W[:, :-1], K, feat_ch, channels, inverse=True)
    assert s[order[0]] == pytest.approx(one_shot.min())  # the first step is the one-shot saliency
    assert {1, 4} & set(order[:2]) and not {1, 4} <= set(order[:3])  # one of the near-twins goes early, not both


@pytest.mark.parametrize("repair", ["none", "ls"])
def test_obs_scores_a_layer_whose_every_input_is_dead(repair):
    """A consumer whose inputs are all zero on the calibration data (a dead ReLU layer; MobileViT's random-weight
    activations that underflow to 0): its Hessian's features are 0, so the damping (a share of their mean) was 0 and
    the inverse raised ``LinAlgError: Singular matrix``. Every channel costs nothing to remove."""
    model = mlp(b1=np.full(6, -100, np.float32))
    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    stats = collect_stats(model, CalibrationData({"x": x}))
    analysis = analyze(ModelGraph(model))
    s = get_criterion("obs", 0, stats, repair).score(analysis.groups[0], analysis)
    assert np.all(np.isfinite(s)) and np.all(s <= 1e-9)


def test_random_is_reproducible_and_seed_dependent(setup):
    _, _, analysis, _ = setup
    g = analysis.groups[0]
    a, b = get_criterion("random", 0).score(g, analysis), get_criterion("random", 0).score(g, analysis)
    assert np.array_equal(a, b) and not np.array_equal(a, get_criterion("random", 1).score(g, analysis))


@pytest.mark.parametrize(
    "name,repair,expected",
    [("l1", "none", {1}), ("l2", "none", {0}), ("lamp", "none", {0}), ("activation", "none", {2}),
     ("apoz", "none", {2}), ("obs", "none", {2})],
)  # fmt: skip
def test_pruning_removes_the_chosen_channel_in_onnxruntime(setup, name, repair, expected):
    model, stats, _, x = setup
    result = PrunePass(PruneConfig(criterion=name, repair=repair, ratio=1 / 6), stats=stats).run(model)
    pruned_w1 = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "w1"))
    assert pruned_w1.shape == (5, 4)
    removed = [k for k in range(6) if not any(np.array_equal(W1[k], r) for r in pruned_w1)]
    assert set(removed) == expected
    (k,) = removed
    w1, b1 = W1.copy(), B1.copy()
    w1[k], b1[k] = 0, 0
    zeroed = mlp(w1, b1)
    for i in range(8):
        feeds = {"x": x[i]}
        assert max_rel_error(run(zeroed, feeds), run(result.model, feeds)) <= 1e-5
        if k == 2:  # the dead channel: pruning changes nothing at all
            assert max_rel_error(run(model, feeds), run(result.model, feeds)) <= 1e-6


@pytest.mark.parametrize("inverse", [True, False])
def test_batched_channel_saliency_is_the_per_channel_trace(inverse):
    """`criteria.channel_saliency` (channels batched by feature count) equals tr(W_f K_ff^(-1) W_f^T) (or
    tr(W_f K_ff W_f^T)) computed channel by channel, with uneven counts and features of no channel."""
    from onnxprune.criteria import channel_saliency

    rng = np.random.default_rng(3)
    features = 45
    x = rng.standard_normal((200, features))
    K = x.T @ x / 200
    wm = rng.standard_normal((7, features))
    feat_ch = np.repeat(np.arange(5), 9)
    feat_ch[3] = -1  # a feature outside the group (another group's channel)
    feat_ch[10:12] = -1
    expected = np.zeros(6)  # channel 5 has no feature: saliency 0
    for k in range(5):
        f = np.flatnonzero(feat_ch == k)
        wf = wm[:, f]
        block = K[np.ix_(f, f)]
        expected[k] = np.trace(wf @ np.linalg.solve(block, wf.T)) if inverse else np.trace(wf @ block @ wf.T)
    got = channel_saliency(wm, K, feat_ch, 6, inverse=inverse)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert got[5] == 0.0 and np.all(got[:5] > 0)


def test_a_group_with_a_very_wide_consumer_keeps_the_one_shot_order(monkeypatch):
    """Past `GREEDY_MAX_FEATURES` (R3D-18's 13,824-feature 3x3x3 convs) the greedy columns would cost as much memory
    as half the inverse Hessian again: the group is scored one-shot, every channel against the dense layer."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((100, 8))
    x[:, 5] = x[:, 1]  # a duplicate: one-shot scores both (nearly) free
    xa = np.concatenate([x, np.ones((100, 1))], axis=1)
    K = damped_inverse(xa.T @ xa / 100, 0.01)
    W = rng.standard_normal((3, 9))
    feat_ch = np.arange(8)
    one_shot = channel_saliency(W[:, :-1], K, feat_ch, 8, inverse=True)
    monkeypatch.setattr(greedy_obs, "GREEDY_MAX_FEATURES", 7)
    wide = greedy_obs_scores([GreedyConsumer(W, K, feat_ch, 1.0, 8)], 8)
    np.testing.assert_allclose(wide, one_shot, rtol=1e-4)
    monkeypatch.setattr(greedy_obs, "GREEDY_MAX_FEATURES", 8)
    greedy = greedy_obs_scores([GreedyConsumer(W, K, feat_ch, 1.0, 8)], 8)
    assert set(np.argsort(wide)[:2]) == {1, 5} and not {1, 5} <= set(np.argsort(greedy)[:2])


def test_greedy_order_stopped_at_the_channels_taken_gives_the_same_prefix():
    """`greedy_obs_scores(depth=k / size)` stops the costly updates after k channels: its k lowest scores are the
    whole order's first k, in the same order (what a uniform allocation, which takes exactly k, reads)."""
    rng = np.random.default_rng(5)
    channels, width = 12, 3
    features = channels * width
    x = rng.standard_normal((300, features)) @ rng.standard_normal((features, features))
    xa = np.concatenate([x, np.ones((300, 1))], axis=1)
    K = damped_inverse(xa.T @ xa / 300, 0.01)
    weights = [rng.standard_normal((4, features + 1)), rng.standard_normal((2, features + 1))]
    feat_ch = np.repeat(np.arange(channels), width)

    def scores(depth):
        return greedy_obs_scores([GreedyConsumer(w, K, feat_ch, 1.0, channels, depth) for w in weights], channels,
                                 depth)

    whole = np.argsort(scores(None), kind="stable")
    for k in range(channels + 1):
        depth = greedy_obs.greedy_depth(channels, k)
        assert depth == min(greedy_obs.GREEDY_FRACTION, k / channels)
        np.testing.assert_array_equal(np.argsort(scores(depth), kind="stable")[:k], whole[:k])


@pytest.mark.parametrize("target,allocation,repair", [
    ({"ratio": 0.3}, "uniform", "ls"), ({"target_params": "80%"}, "uniform", "ls"), ({"target_params": "80%"}, "lamp", "ls"),
    ({"target_params": "60%"}, "lamp", "ls"), ({"target_params": "60%"}, None, "ls"), ({"target_params": "80%"}, "lamp", "seq")])
def test_obs_plan_with_the_order_stopped_early_is_the_whole_orders(monkeypatch, target, allocation, repair):
    """The selection asks OBS only for the channels a uniform or LAMP allocation takes (`Criterion.prefix_order`;
    neither reads the scores to count, `select.SCORE_FREE_COUNTS`; a parameter target defaults to LAMP), and only
    of the groups that lose some, whose layers alone get calibration Hessians (`select.score_free_counts`, known
    before the statistics): the pruned model is the same, bit for bit, as with every layer's Hessian and every
    group's whole greedy order. With the seq repair its rows of the original model are drawn only for the layers
    it fits (`repair.seq_rows_writer`); the statistics pass then fetches fewer layer outputs, so onnxruntime
    fuses more (a Conv with its BatchNorm) and the activations round differently: the same channels, the
    weights equal to float32 rounding."""
    from onnxprune import calibration
    from onnxprune.criteria import OBS
    from onnxprune.passes import select

    model = canonical(onnx.load(str(ROOT / "models" / "fashion_mnist_resnet.onnx")))
    calib = {"image": np.random.default_rng(0).random((24, 1, 28, 28), dtype=np.float32)}
    config = PruneConfig(criterion="obs", repair=repair, round_to=1, allocation=allocation, **target)
    seen, scored, hessians = [], [], []
    score_all, collect = OBS.score_all, calibration.collect_stats

    def spy(self, analysis, groups=None, needed=None):
        seen.append(needed)
        scored.append(None if groups is None else {g.id for g in groups})
        return score_all(self, analysis, groups, needed)

    def spy_stats(*args, **kwargs):
        stats = collect(*args, **kwargs)
        hessians.append({name for name, st in stats.stats.items() if st.hessian.size})
        return stats

    writers, writer = [], select.seq_rows_writer

    def spy_rows(*args, **kwargs):
        w = writer(*args, **kwargs)
        writers.append(set(w.per_sample))
        return w

    monkeypatch.setattr(OBS, "score_all", spy)
    monkeypatch.setattr(select, "collect_stats", spy_stats)
    monkeypatch.setattr(select, "seq_rows_writer", spy_rows)
    result = PrunePass(config, calib=calib).run(model)
    short = result.model
    monkeypatch.setattr(OBS, "prefix_order", False)
    whole = PrunePass(config, calib=calib).run(model).model
    assert seen[0] and 0 < sum(seen[0].values()) and seen[1] is None
    # only the groups that lose channels are scored (a group that keeps all of them needs no order), and only
    # their readers' Hessians collected
    assert scored[0] == {gid for gid, n in seen[0].items() if n > 0} and scored[1] is None
    assert hessians[0] <= hessians[1]  # (a layer that reads no group, e.g. the stem, needs none either)
    if len(scored[0]) < len(seen[0]):
        assert len(hessians[0]) < len(hessians[1]) - 1
    a = {t.name: numpy_helper.to_array(t) for t in short.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in whole.graph.initializer}
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    if repair == "seq":
        # rows drawn for exactly the layers the repair fits, fewer than every layer when a group keeps all
        assert len(writers[0]) == result.info["summary"]["repair"]["repaired"] <= len(writers[1])
        if len(scored[0]) < len(seen[0]):
            assert len(writers[0]) < len(writers[1])
        # the fits amplify the rounding (a 3x3 conv's weights 1e-3 apart in norm): the outputs agree to ~1e-6
        x = calib["image"]
        outs = [np.concatenate([session(m).run(None, {"image": x[i : i + 1]})[0] for i in range(len(x))])
                for m in (short, whole)]
        assert np.linalg.norm(outs[0] - outs[1]) <= 1e-4 * np.linalg.norm(outs[1])
        assert all(np.linalg.norm(a[k] - b[k]) <= 1e-2 * np.linalg.norm(b[k]) for k in a)
    else:
        assert all(np.array_equal(a[k], b[k]) for k in a)
