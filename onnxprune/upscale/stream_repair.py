"""Stream-aware sequential repair of an unconstrained plan (``repair="seq"`` with ``stream_repair=True``).

Start reading at `repair_stream`. Sequential repair (`onnxprune.repair.repair_sequential`) refits every
consumer, wave by wave through depth, toward its *own* original output: ``W' x~ ~= W x``. On a residual
stream that leaves each writer blind to the others: after the Add the stream is
``s~ = skip~ + bn(W' x~)``, and the error the earlier writers left in ``skip~`` (channels they dropped,
their own imperfect refits) stays on the stream however well this writer matches its own output. In an
unconstrained plan the writers of one stream keep *different* channels, so a later writer that keeps a
channel an earlier one dropped can put part of it back, if it is asked to.

Here a *writer* (a consumer whose output reaches an Add of two activations through per-channel affine
nodes only: ``conv -> BatchNormalization -> Add(., skip)``) refits toward the original stream value minus
what the other Add input carries now:

    bn(W' x~) ~= s - skip~ = bn(W x) + (skip - skip~)   =>   W' x~ ~= W x + (skip - skip~) / a

with ``a`` the BatchNorm's per-channel scale (1 without one). Solved like the sequential repair (same rows,
same ridge toward the original weights), the extra term adds ``E[d x~^T]`` to the right-hand side, with
``d = (skip - skip~) / a`` sampled at the same output positions as the conv's input rows. The skip is
final when the writer is fitted: everything upstream of it is in earlier waves (a writer whose skip is
produced by a consumer of the same wave fits its own output, as before). Readers then refit on the
repaired stream as in `repair_sequential`. Only the rows (output channels) the writer keeps matter: the
others are masked again.

``reader_choice="seq"`` (`choose_columns`) also lets every reader of a stream with several writers choose
its input channels again when it is fitted, by greedy OBS on what the writers really left on the stream.

Measured (pretrained CIFAR-10 ResNet20/44, l2, coupled drive, ``reader_choice="ls"``, 256 calibration images,
all 10,000 test images; `bench/unconstrained_cifar_results.txt`): R20 at 20% / 40% of parameters removed
90.00 -> 90.07 / 86.00 -> 86.27, R44 at 40% 88.75 -> 89.27 (constrained l2 + seq: 89.60 / 85.12 / 87.73; the
same stream-aware repair on the constrained plan: 89.66 / 85.67 / 87.95). ``reader_choice="seq"``: 86.28 and
89.44, within noise of ``ls``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import zip_longest

import numpy as np
import onnx

from onnxprune.calibration import (
    CalibrationData,
    Consumer,
    hessian_rows,
    rows_per_input,
    single_threaded_blas,
)
from onnxprune.channels import ChannelAnalysis, DimRef
from onnxprune.gram import add_gram, add_product, fill_upper, with_one
from onnxprune.graph import ModelGraph
from onnxprune.layer_inputs import FrontierRunner
from onnxprune.model_values import WorkingCopy, with_values
from onnxprune.progress import task
from onnxprune.repair import (
    RepairReport,
    add_bias_delta,
    bias_slot,
    fit_waves,
    remask,
    slot_value,
)
from onnxprune.repair_stats import FLUSH_ROWS

_AFFINE = ("BatchNormalization",)  # per-channel affine nodes a writer's output may pass before the Add


def stream_writer(graph: ModelGraph, c: Consumer) -> tuple[str, np.ndarray] | None:
    """(skip tensor, per-output-channel scale a) of a writer into a residual Add, else None.

    The output of `c` must reach an Add of two activations through single-consumer BatchNormalization
    nodes only (each scales channel j by gamma_j / sqrt(var_j + eps)); the Add's other input is the skip.
    """
    if c.kind != "conv":
        return None
    w_shape = c.weight_shape(graph)
    scale = np.ones(w_shape[0])
    tensor = c.node.output[0]
    for _ in range(4):
        uses = graph.consumers.get(tensor, [])
        if len(uses) != 1:
            return None
        node = uses[0].node
        if node.op_type in _AFFINE and uses[0].index == 0:
            gamma, var = graph.const(node.input[1]), graph.const(node.input[4])
            if gamma is None or var is None:
                return None
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            scale = scale * np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
            tensor = node.output[0]
            continue
        if node.op_type != "Add" or len(node.input) != 2:
            return None
        skip = node.input[1 - uses[0].index]
        if graph.const(skip) is not None:
            return None
        return skip, scale
    return None


@dataclass
class ColumnChoice:
    """A reader whose input channels are chosen during the repair (`choose_columns`): which input positions
    (on the weight's input axis) hold which of its group's channels, and how many channels it keeps."""

    weight: str
    axis: int
    positions: np.ndarray
    channel_of: np.ndarray
    keep: int
    kept: np.ndarray | None = None  # bool over `positions`: set by the repair


def choose_columns(Ht: np.ndarray, rhs: np.ndarray, lam: float, feature_position: np.ndarray,
                   choices: list[ColumnChoice], cut: np.ndarray | None) -> np.ndarray:  # fmt: skip
    """The features a reader keeps: greedy Optimal Brain Surgeon removal on its *pruned* input.

    The sequential fit minimises ``E||W x + b - W' x~||^2 + lam ||W' - W||^2``, a quadratic with Hessian
    ``Hd = E[x~ x~^T] + lam I`` whose unconstrained minimum is ``W* = rhs Hd^-1``. Removing the features F of
    one channel raises it by ``tr(W*_F (G_FF)^-1 W*_F^T)`` with ``G = Hd^-1``; the cheapest channel goes,
    W* and G are updated (``W* -= W*_F G_FF^-1 G_F:``, ``G -= G_:F G_FF^-1 G_F:``) and the next is chosen,
    until every choice (one per group the weight reads) keeps its count. A stream channel no writer reaching
    the reader keeps is zero in x~ and costs nothing: it goes first. Features of positions outside every
    choice keep their current state (removed when their position is in `cut`); the constant stays.

    Returns:
        bool over the features (True: kept).
    """
    n_pos = int(feature_position.max()) + 1
    owner = np.full(n_pos, -1)  # position -> key into `keys`
    keys: list[tuple[int, int]] = []
    for ci, choice in enumerate(choices):
        for i, pos in enumerate(choice.positions):
            owner[pos] = len(keys)
            keys.append((ci, i))  # (choice, index into its positions)
    feature_owner = np.append(owner[feature_position], -1)[: len(Ht)]
    fixed_gone = np.zeros(len(Ht), bool)
    if cut is not None and len(cut):
        fixed_gone[: len(feature_position)] = np.isin(feature_position, cut) & (owner[feature_position] < 0)
    live = np.flatnonzero(~fixed_gone)
    local_owner = feature_owner[live]
    feats = {key: np.flatnonzero(local_owner == key) for key in np.unique(local_owner[local_owner >= 0])}
    remaining = [0] * len(choices)
    for key in feats:
        remaining[keys[key][0]] += 1
    Hd = Ht[np.ix_(live, live)]
    Hd[np.diag_indices(len(live))] += lam
    G = np.linalg.inv(Hd)
    Ws = rhs[:, live] @ G
    while True:
        names = [key for key in feats if remaining[keys[key][0]] > choices[keys[key][0]].keep]
        if not names:
            break
        idx = np.stack([feats[key] for key in names])  # [C, r]: every channel has r features
        blocks = G[idx[:, :, None], idx[:, None, :]]
        wf = Ws[:, idx].transpose(1, 2, 0)  # [C, r, out]
        costs = np.einsum("cro,cro->c", wf, np.linalg.solve(blocks, wf))
        gone = names[int(np.argmin(costs))]
        f = feats.pop(gone)
        remaining[keys[gone][0]] -= 1
        step = np.linalg.solve(G[np.ix_(f, f)], G[f, :])
        Ws = Ws - Ws[:, f] @ step
        G = G - G[:, f] @ step
    kept = ~fixed_gone
    dropped = [key for key in np.unique(feature_owner[feature_owner >= 0]) if key not in feats]
    kept[np.isin(feature_owner, dropped)] = False
    for choice in choices:
        choice.kept = np.zeros(len(choice.positions), bool)
    for key in feats:
        ci, i = keys[key]
        choices[ci].kept[i] = True
    return kept


def repair_stream(analysis: ChannelAnalysis, data: CalibrationData, damp: float = 0.01, max_rows: int = 65536,
                  seed: int = 0, stream: bool = True, choices: dict[str, list[ColumnChoice]] | None = None,
                  ) -> tuple[onnx.ModelProto, RepairReport]:  # fmt: skip
    """Sequential repair of `analysis`'s model with stream-aware writers (see the module docstring).

    `analysis` is an `upscale.repair.PlanRemovals` (its removed positions are the plan's silenced ones); the
    result is the original model with new values (same shapes, possibly new bias inputs).

    Args:
        stream: False: writers fit their own outputs (plain sequential repair, with `choices`).
        choices: readers (by weight name: one choice per group the weight reads) that choose their input
            channels when they are fitted (`choose_columns`); each choice's `kept` is set.
    """
    data = data.for_model(analysis.graph.model)
    from onnxprune.rewrite import apply_mask

    labels = np.zeros(1, dtype=np.int64)  # PlanRemovals ignores the labels
    graph = analysis.graph
    report = RepairReport()
    removed = analysis.removed_positions(labels)
    if not removed:
        return graph.model, report
    fits = fit_waves(graph, removed, report)
    cons, cut_of, level, wave_of, waves = fits.consumers, fits.cut_of, fits.level, fits.wave_of, fits.waves
    # Stream writers whose skip is final when they are fitted (every consumer upstream of it in an earlier wave).
    writers: dict[str, tuple[str, np.ndarray]] = {}
    for c in cons:
        found = stream_writer(graph, c) if stream and c.name in wave_of else None
        if found is not None and level.get(found[0], 0) <= wave_of[c.name]:
            writers[c.name] = found
    base = apply_mask(analysis, labels)
    base_values = {t.name: t for t in base.graph.initializer}
    new_values: dict[str, np.ndarray] = {}
    new_biases: list[tuple[onnx.NodeProto, str, np.ndarray]] = []
    cur_values: dict[str, np.ndarray] = {}
    cur_biases: list[tuple[onnx.NodeProto, str, np.ndarray]] = []
    slots = {c.name: bias_slot(graph, c, c.weight_shape(graph)[c.out_axis]) for c in cons if c.name in wave_of}
    runners = (FrontierRunner(data), FrontierRunner(data))
    working = WorkingCopy(base)
    with task("stream-aware sequential repair", total=len(wave_of)) as progress:
        for number, k in enumerate(sorted(waves), 1):
            wave = waves[k]
            progress.update(f"stream-aware sequential repair: wave {number}/{len(waves)}")
            current = working.update(cur_values, cur_biases)
            acc = _stream_stats(graph, current, wave, writers, data, max_rows, seed + 7919 * k, runners)
            for c in progress.track(wave):
                Ht, C, D = acc[c.name]
                w = graph.initializer_value(c.weight)
                wm = c.weight_matrix(w).astype(np.float64)
                n_out = wm.shape[0]
                slot = slots[c.name]
                cut = cut_of[c.name]
                gone = np.isin(c.feature_channel(w.shape), cut) if cut is not None else np.zeros(wm.shape[1], bool)
                keep = np.flatnonzero(~gone)
                if slot is not None:
                    keep = np.append(keep, len(Ht) - 1)
                    wa = np.concatenate([wm, slot_value(graph, slot, n_out)[:, None]], axis=1)
                else:
                    Ht, C, D = Ht[:-1, :-1], C[:-1, :-1], D[:, :-1]
                    wa = wm
                mine = [ch for ch in (choices or {}).get(c.weight, []) if ch.axis == c.in_axis]
                if mine:
                    lam = damp * float(np.mean(np.diag(Ht))) + 1e-12
                    rhs_all = wa @ C + D + lam * wa
                    kept_feat = choose_columns(Ht, rhs_all, lam, c.feature_channel(w.shape), mine, cut)
                    gone = ~kept_feat[: wm.shape[1]]
                    removed[DimRef(c.weight, c.in_axis)] = np.unique(c.feature_channel(w.shape)[gone])
                    keep = np.flatnonzero(kept_feat)
                Hk = Ht[np.ix_(keep, keep)]
                lam = damp * float(np.mean(np.diag(Hk))) + 1e-12
                Hk[np.diag_indices(len(keep))] += lam
                rhs = wa @ C[:, keep] + D[:, keep] + lam * wa[:, keep]
                solved = np.linalg.solve(Hk, rhs.T).T
                n_feat = int((~gone).sum())
                new_w = wm.copy()
                new_w[:, ~gone] = solved[:, :n_feat]
                new_values[c.weight] = c.from_matrix(new_w, w)
                cur_values[c.weight] = remask(removed, base_values, c.weight, new_values[c.weight])
                if mine:  # its masked value: the removed columns are zero
                    cur = c.weight_matrix(cur_values[c.weight]).copy()
                    cur[:, gone] = 0.0
                    cur_values[c.weight] = c.from_matrix(cur, w)
                if slot is not None:
                    add_bias_delta(graph, c, slot, solved[:, -1] - wa[:, -1], removed, base_values,
                                   (new_values, cur_values), (new_biases, cur_biases), report)
                report.repaired.append(c.name)
    return with_values(graph.model, new_values, new_biases), report


def output_rows(d: np.ndarray, per_sample: int, rng: np.random.Generator) -> np.ndarray:
    """Rows [positions, channels] of a conv output `d` ([batch, channels, *spatial]) at the positions
    `calibration.hessian_rows` draws with the same generator state (same calls, same order)."""
    parts = []
    for i in range(d.shape[0]):
        flat = d[i].reshape(d.shape[1], -1)
        total = flat.shape[1]
        pick = None if total <= per_sample else np.sort(rng.choice(total, per_sample, replace=False))
        parts.append((flat if pick is None else flat[:, pick]).T)
    return np.concatenate(parts)


def _stream_stats(graph: ModelGraph, current: onnx.ModelProto, wave: list[Consumer],
                  writers: dict[str, tuple[str, np.ndarray]], data: CalibrationData, max_rows: int, seed: int,
                  runners: tuple[FrontierRunner, FrontierRunner]) -> dict[str, tuple[np.ndarray, ...]]:  # fmt: skip
    """Per consumer of `wave`: (E[x~ x~^T], E[x x~^T], E[d x~^T]) over the same rows, [x 1] features; d is
    a writer's stream correction ``(skip - skip~) / a`` at its output positions (zero for the others).

    The rows of several samples are multiplied in at once (`FLUSH_ROWS`), as float32 BLAS products into float32
    sums (`gram`), as the constrained sequential repair's statistics are (`repair_stats`): one product of
    ~1,000 rows instead of a float64 one per sample (EfficientNet-Lite0, 256 samples at 224x224: these sums
    took 15 of the unconstrained command's 70 s)."""
    skips = {writers[c.name][0] for c in wave if c.name in writers}
    names = sorted({c.x for c in wave} | skips)
    run_o, run_c = runners
    w_shapes = {c.name: c.weight_shape(graph) for c in wave}
    feats = {c.name: c.feature_count(w_shapes[c.name]) for c in wave}
    per_sample = {k: rows_per_input(f, max_rows, data) for k, f in feats.items()}
    hess = {c.name: np.zeros((feats[c.name] + 1,) * 2, np.float32) for c in wave}
    cross = {c.name: np.zeros((feats[c.name] + 1,) * 2, np.float32) for c in wave}
    stream = {c.name: np.zeros((w_shapes[c.name][c.out_axis], feats[c.name] + 1), np.float32) for c in wave}
    counts = dict.fromkeys(hess, 0)
    pending: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]] = {c.name: [] for c in wave}

    def flush(name: str) -> None:
        parts = pending[name]
        if not parts:
            return
        rc = with_one([p[1] for p in parts])
        add_gram(hess[name], rc)  # its lower triangle: `fill_upper` below
        add_product(cross[name], with_one([p[0] for p in parts]), rc)
        if parts[0][2] is not None:
            add_product(stream[name], np.concatenate([p[2] for p in parts]), rc)
        counts[name] += len(rc)
        parts.clear()

    samples = zip_longest(run_o.run(graph.model, names), run_c.run(current, names))
    with single_threaded_blas(), task("layer inputs and streams, original and pruned", total=data.n) as progress:
        for i, (xo, xc) in enumerate(progress.track(samples)):
            for j, c in enumerate(wave):
                ro = hessian_rows(np.asarray(xo[c.x], np.float32), c, w_shapes[c.name], per_sample[c.name],
                                  np.random.default_rng([seed, i, j]))
                rc = hessian_rows(np.asarray(xc[c.x], np.float32), c, w_shapes[c.name], per_sample[c.name],
                                  np.random.default_rng([seed, i, j]))
                rows = None
                if c.name in writers:
                    skip, scale = writers[c.name]
                    d = np.asarray(xo[skip], np.float64) - np.asarray(xc[skip], np.float64)
                    d /= _safe(scale).reshape((1, -1) + (1,) * (d.ndim - 2))
                    rows = output_rows(d, per_sample[c.name], np.random.default_rng([seed, i, j]))
                pending[c.name].append((ro, rc, rows))
                if sum(len(p[1]) for p in pending[c.name]) >= FLUSH_ROWS:
                    flush(c.name)
        for name in pending:
            flush(name)
    out = {}
    for name, k in counts.items():
        h = fill_upper(hess[name])
        out[name] = tuple(np.divide(a, max(1, k), dtype=np.float64) for a in (h, cross[name], stream[name]))
    return out


def _safe(scale: np.ndarray) -> np.ndarray:
    """The BatchNorm scale with near-zero entries kept away from 0 (sign kept)."""
    floor = 1e-6 * max(float(np.abs(scale).max()), 1e-12)
    return np.where(np.abs(scale) < floor, np.where(scale < 0, -floor, floor), scale)
