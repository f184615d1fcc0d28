"""``drive="coupled"`` (`upscale.coupled`): writers keep what their readers use, readers what their writers
cover. Exact against the masked original; same per-unit counts as the allocation; better output error than
the free choice on a trained residual model at equal parameters."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import canonical, unconstrained_exact

from models.testmodels import TEST_MODELS
from onnxprune.passes.unconstrained import UnconstrainedPass
from onnxprune.upscale.allocate import plan_params
from onnxprune.upscale.config import UnconstrainedConfig
from onnxprune.upscale.plan import build_plan
from onnxprune.verify import random_inputs, run


@pytest.mark.parametrize("name", ["residual", "concat"])
def test_coupled_keeps_the_counts_and_is_exact(name):
    """Every unit keeps exactly the count the free choice gives it (the allocation carries over), and the
    export computes the masked original."""
    model = canonical(TEST_MODELS[name]())
    free = build_plan(model, UnconstrainedConfig(ratio=0.4, drive="free", stream_multiple=1))
    coupled = build_plan(model, UnconstrainedConfig(ratio=0.4, drive="coupled", stream_multiple=1))
    counts = lambda plan: [int(pc.kept.sum()) for gp in plan.groups for pc in gp.pieces if pc.is_unit]
    assert counts(coupled) == counts(free) and len(counts(free)) > 2
    assert plan_params(coupled) == plan_params(free)
    result = UnconstrainedPass(UnconstrainedConfig(ratio=0.4, drive="coupled")).run(model)
    unconstrained_exact(model, result, random_inputs(model, seed=3))


def test_coupled_aligns_writers_and_readers(fashion):
    """On the trained ResNet's residual streams, coupled writers keep more of what the readers they reach
    read (and readers more of what reaches them) than free ones: less wasted and corrupted budget."""
    model, _, _ = fashion

    def mismatch(drive: str) -> int:
        plan = build_plan(model, UnconstrainedConfig(ratio=0.4, criterion="l2", drive=drive))
        total = 0
        for gp in plan.groups:
            writers = {pc.id: pc for pc in gp.pieces if pc.is_unit and pc.has_producer}
            for r in (pc for pc in gp.pieces if pc.is_unit and not pc.has_producer):
                for wid in r.sources or writers:
                    total += int((r.kept != writers[wid].kept).sum())
        return total

    free, coupled = mismatch("free"), mismatch("coupled")
    assert free > 0 and coupled < 0.8 * free, (free, coupled)


def test_coupled_beats_free_on_a_trained_model(fashion):
    """Equal parameter target (60%), l2 + seq repair: held-out logits end closer to the original's with the
    coupled choice than with the free one, and both exports are exact."""
    model, calib, held_out = fashion
    reference = run(model, held_out)[0]
    errors, params = {}, {}
    for drive in ("free", "coupled"):
        config = UnconstrainedConfig(criterion="l2", drive=drive, repair="seq", target_params="60%")
        result = UnconstrainedPass(config, calib=calib).run(model)
        unconstrained_exact(model, result, held_out)
        errors[drive] = float(np.linalg.norm(run(result.model, held_out)[0] - reference))
        params[drive] = result.info["summary"]["effective_params_after"]
    assert abs(params["coupled"] - params["free"]) <= 0.01 * params["free"], params
    assert errors["coupled"] < 0.95 * errors["free"], errors


def _refit_error(w: np.ndarray, x: np.ndarray, keep_features: np.ndarray) -> float:
    """E||W x - W' x_K||^2 after the least-squares refit of W' on the kept features."""
    y = x @ w.T
    coef, *_ = np.linalg.lstsq(x[:, keep_features], y, rcond=None)
    return float(((y - x[:, keep_features] @ coef) ** 2).mean())


def test_reader_least_squares_choice_beats_magnitude():
    """`coupled.ReaderLS` keeps the channels the least-squares refit needs: on inputs where some channels
    are near-copies of others, its choice leaves a smaller refit error than the top column norms
    (the criterion's ranking), with the same count."""
    from onnxprune.upscale.coupled import ReaderLS

    rng = np.random.default_rng(0)
    n_ch, n_out, n_samples, keep_n = 12, 6, 4000, 6
    base = rng.standard_normal((n_samples, 6))
    x = np.concatenate([base, base + 0.05 * rng.standard_normal((n_samples, 6))], axis=1)  # 6 near-copies
    w = rng.standard_normal((n_out, n_ch)) * np.tile([3.0, 3.0, 3.0, 1.0, 1.0, 1.0], 2)  # big columns in pairs
    H = x.T @ x / n_samples
    fit = ReaderLS(w, np.linalg.inv(H + 1e-6 * np.eye(n_ch)), np.arange(n_ch))
    chosen = fit.select(np.ones(n_ch), np.ones(n_ch, dtype=bool), keep_n)
    assert int(chosen.sum()) == keep_n
    magnitude = np.zeros(n_ch, dtype=bool)
    magnitude[np.argsort(-(w**2).sum(axis=0) * np.diag(H))[:keep_n]] = True
    ls_error, mag_error = _refit_error(w, x, chosen), _refit_error(w, x, magnitude)
    assert ls_error < 0.5 * mag_error, (ls_error, mag_error)


def test_reader_least_squares_single_feature_path_matches_the_block_path():
    """One feature per channel (1x1 readers) takes the low-rank path; it must remove the same channels,
    in the same order, as the general block path (here also with features outside the group and a
    channel without any)."""
    from onnxprune.upscale.coupled import ReaderLS

    rng = np.random.default_rng(3)
    n_feat, n_ch, n_out = 90, 64, 12
    x = rng.standard_normal((400, n_feat)) @ rng.standard_normal((n_feat, n_feat)) * 0.3 + rng.standard_normal((400, n_feat))
    inverse = np.linalg.inv(x.T @ x / len(x) + 0.01 * np.eye(n_feat))
    feature_channel = np.full(n_feat, -1)
    feature_channel[: n_ch - 1] = np.arange(n_ch - 1)  # channel n_ch - 1 has no feature; the rest are not the group's
    fit = ReaderLS(rng.standard_normal((n_out, n_feat)), inverse, feature_channel)
    cover, allowed = rng.uniform(0.2, 1.0, n_ch), np.ones(n_ch, dtype=bool)
    allowed[[5, 17]] = False
    feats = {c: np.array([c]) for c in range(n_ch - 1)}
    for n in (1, 20, 50):
        fast = fit.select(cover, allowed, n)
        blocks = fit._select_blocks(cover, allowed.copy(), n, dict(feats))
        assert int(fast.sum()) == n and np.array_equal(fast, blocks)
        assert not fast[n_ch - 1] and not fast[5] and not fast[17]  # no features: cost 0, goes first


def _select_blocks_before(fit, cover, keep, n, feats):
    """`ReaderLS._select_blocks` as it was (session 42): every candidate's block solved against all outputs, the
    whole K updated per removal. The reference the faster version must agree with."""
    K = fit.inverse.copy()
    while int(keep.sum()) > n:
        cand = [int(c) for c in np.flatnonzero(keep)]
        costs = np.zeros(len(cand))
        with_feats = [i for i, c in enumerate(cand) if c in feats]
        if with_feats:
            idx = np.stack([feats[cand[i]] for i in with_feats])
            blocks = K[idx[:, :, None], idx[:, None, :]]
            wf = fit.weight[:, idx].transpose(1, 2, 0)
            costs[with_feats] = np.einsum("cro,cro->c", wf, np.linalg.solve(blocks, wf))
        costs *= cover[cand]
        gone = cand[int(np.argmin(costs))]
        keep[gone] = False
        f = feats.pop(gone, None)
        if f is not None:
            K = K - K[:, f] @ np.linalg.solve(K[np.ix_(f, f)], K[f, :])
    return keep


@pytest.mark.parametrize(("n_ch", "r"), [(24, 9), (40, 4), (12, 25)])
def test_reader_least_squares_block_path_removes_what_it_removed_before(n_ch, r):
    """k x k readers: the same channels removed as the whole-K version, for any count left (features shuffled,
    some outside the group, a channel without features, channels not allowed)."""
    from onnxprune.upscale.coupled import ReaderLS

    rng = np.random.default_rng(n_ch)
    n_feat = n_ch * r + 3
    x = rng.standard_normal((2000, n_feat)) @ rng.standard_normal((n_feat, n_feat)) * 0.2
    x += rng.standard_normal((2000, n_feat))
    inverse = np.linalg.inv(x.T @ x / len(x) + 0.01 * np.eye(n_feat))
    feature_channel = np.full(n_feat, -1)
    feature_channel[: n_ch * r] = rng.permutation(np.repeat(np.arange(n_ch), r))
    fit = ReaderLS(rng.standard_normal((16, n_feat)), inverse, feature_channel)
    feats = {c: np.flatnonzero(feature_channel == c) for c in range(n_ch - 1)}  # the last channel: no features
    cover, allowed = rng.uniform(0.2, 1.0, n_ch), np.ones(n_ch, dtype=bool)
    allowed[2] = False
    for n in (1, n_ch // 3, n_ch // 2, n_ch - 2):
        got = fit._select_blocks(cover, allowed.copy(), n, dict(feats))
        assert int(got.sum()) == n and np.array_equal(got, _select_blocks_before(fit, cover, allowed.copy(), n, dict(feats)))


def test_reader_choice_is_checked():
    from onnxprune.errors import UsageError

    with pytest.raises(UsageError, match="reader_choice"):
        UnconstrainedConfig(reader_choice="obs")
    with pytest.raises(UsageError, match="coupled"):
        UnconstrainedConfig(reader_choice="ls", drive="free")


@pytest.mark.parametrize("name", ["residual", "concat"])
def test_a_parameter_target_takes_the_shortest_prefix_and_skips_the_emptiest_plan(name, monkeypatch):
    """`allocate` with a target: the shortest removal prefix whose plan meets it (checked against every prefix),
    the plan removing every step chosen only when the search ends there (the costliest choice), and an
    unreachable target refused with the smallest count."""
    from onnxprune.errors import UsageError
    from onnxprune.upscale import allocate as alloc
    from onnxprune.upscale.plan import prepare

    model = canonical(TEST_MODELS[name]())
    config = UnconstrainedConfig(allocation="global", stream_multiple=1)
    prep = prepare(model, config)
    steps = alloc.removal_steps(prep, config.allocation)
    every = [alloc.plan_params(alloc.choose(prep, config, counts=alloc.counts_of(prep, steps[:k])))
             for k in range(len(steps) + 1)]
    everything = alloc.counts_of(prep, steps)
    seen: list[dict[int, int]] = []
    choose = alloc.choose
    monkeypatch.setattr(alloc, "choose", lambda prep, config, counts, **kw: seen.append(counts) or
                        choose(prep, config, counts=counts, **kw))
    target = (every[0] + every[-1]) // 2
    plan, counts = alloc.allocate(prep, config, target_params=target)
    k = next(k for k, p in enumerate(every) if p <= target)
    assert alloc.plan_params(plan) == every[k] and counts == alloc.counts_of(prep, steps[:k])
    assert everything not in seen and len(seen) <= 2 + int(np.ceil(np.log2(len(steps))))
    with pytest.raises(UsageError, match=f"unreachable: the smallest this plan can get is {every[-1]}"):
        alloc.allocate(prep, config, target_params=every[-1] - 1)


def test_relu_energy_is_the_normal_models_without_scipy_stats():
    """E[relu(z)^2], z ~ N(mu, sd^2), through scipy.special (scipy.stats costs 0.5 s to import): bit-equal to
    scipy.stats.norm's, and to a sampled estimate."""
    from scipy.stats import norm

    from onnxprune.upscale.scores import _relu_energy

    rng = np.random.default_rng(0)
    mu, sd = rng.standard_normal(500) * 3, rng.uniform(0.0, 2.0, 500)
    sd[:3] = 0.0
    t = mu / np.maximum(sd, 1e-12)
    expected = (mu**2 + np.maximum(sd, 1e-12) ** 2) * norm.cdf(t) + mu * np.maximum(sd, 1e-12) * norm.pdf(t)
    assert np.array_equal(_relu_energy(mu, sd, True), expected)
    z = rng.standard_normal((200_000, 1)) * 1.5 + np.array([-1.0, 0.0, 2.0])
    assert np.allclose(_relu_energy(np.array([-1.0, 0.0, 2.0]), np.full(3, 1.5), True),
                       (np.maximum(z, 0) ** 2).mean(axis=0), rtol=0.02)
    assert np.array_equal(_relu_energy(mu, sd, False), mu**2 + sd**2)


def test_reader_statistics_are_the_full_pass_hessians_of_the_readers_only(fashion, monkeypatch):
    """`plan.reader_statistics` (session 53) collects only what the readers' least-squares fits read: the
    one-weight reader units of groups with several units, no moments, each with the rows a pass over every
    consumer draws. On the trained ResNet's streams its Hessians equal the full pass's bit for bit, and the
    prepared fits (inverse Hessians) are the ones the full statistics give."""
    from onnxprune import calibration
    from onnxprune.calibration import CalibrationData, collect_stats
    from onnxprune.upscale import plan as upscale_plan

    model, images, _ = fashion
    calib = {"image": images["image"][:24]}
    # fewer rows than positions, so that which rows each consumer draws matters
    monkeypatch.setattr(calibration, "ROW_FLOPS", 2e6)
    monkeypatch.setattr(calibration, "ROWS_PER_FEATURE", 2)
    config = UnconstrainedConfig(ratio=0.4, drive="coupled", reader_choice="ls", criterion="l2")
    full = collect_stats(model, CalibrationData(calib))
    seen = {}
    real = upscale_plan.reader_statistics

    def spy(m, found, c):
        seen["stats"] = real(m, found, c)
        return seen["stats"]

    monkeypatch.setattr(upscale_plan, "reader_statistics", spy)
    prepared = upscale_plan.prepare(model, config, calib)
    few = seen["stats"]
    assert 0 < len(few.stats) < len(full.stats)
    for name, st in few.stats.items():
        assert np.array_equal(st.H, full.stats[name].H) and st.rows == full.stats[name].rows
        assert st.rows < calib["image"].shape[0] * 28 * 28  # drawn, not every position
    fits = [(pg, pid, fit) for pg in prepared.groups for pid, fit in pg.least_squares.items()]
    assert fits
    for pg, pid, fit in fits:
        again = upscale_plan.reader_least_squares(pg.pieces[pid], prepared.analysis, pg.group.size, full)
        assert again is not None and np.array_equal(fit.inverse, again.inverse)
