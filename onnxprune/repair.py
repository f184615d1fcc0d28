"""Weight repair after channel removal, without training.

Start reading at `repair_weights`. Removing channels deletes input columns of every *consumer* layer
(Conv group 1, Gemm, MatMul with an initializer weight) that reads them. Repair rewrites each such
consumer's remaining weights and bias **in the original model** (same shapes), so the physical removal
that follows (`rewrite.apply_plan`) deletes exactly the columns repair accounted for:

* ``bias`` (data-free): a removed channel c carried E[x_c] on average. BatchNorm running statistics
  upstream give that expectation (`moments.channel_moments`: BN output ~ N(beta, gamma^2), rectified
  by Relu, passed through pooling/Add/Concat/Flatten), and ``sum_k W[:, c, k] * E[x_c]`` is folded into
  the consumer's bias. This is the least-squares solution under the data-free Hessian surrogate
  (independent channels with BN moments): the kept weights stay, only the mean is restored. When the
  consumer feeds a BatchNorm, that BN's running variance is also scaled by the fraction of the output
  variance the kept channels carry under the same surrogate (``sum_kept W^2 var / sum_all W^2 var``),
  so the BN keeps normalising its output to the variance the next layers were trained on.
* ``seq`` (calibrated, sequential; `repair_sequential`): the same least squares, but each consumer is
  fitted on the inputs it will really see, those of the *pruned* model whose earlier consumers are already
  repaired (Optimal Brain Compression / SparseGPT order), so errors do not compound through depth.
  Options (`repair_stream`, off by default: measured without gain on the CIFAR ResNets): residual-stream
  writers refitted towards the original stream, and the ridge damp chosen per layer on held-out samples.
* ``ls`` (calibrated): ridge least squares on the calibration Hessian H = E[[x 1][x 1]^T] of the
  consumer's input (im2col for convolutions): ``[W_K b'] = [W b] H[:, K] (H[K, K] + lambda I)^-1``, the
  Optimal Brain Surgeon update of the kept columns K; the constant feature makes it correct the mean
  shift in the bias at the same time.

Where the bias goes: an existing Conv/Gemm bias; else the running mean of a BatchNorm that is the
conv's only consumer (BN(y + d) equals BN with running_mean - d); else a new zero bias input (Conv/Gemm);
for MatMul, a following Add of a constant vector. With no channel removed nothing changes (a no-op).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.calibration import (
    CalibrationData,
    CalibrationStats,
    Consumer,
    consumers,
)
from onnxprune.channels import ChannelAnalysis, DimRef, analyze
from onnxprune.dense_rows import DenseRows, DenseRowsWriter, dense_rows
from onnxprune.errors import UsageError, missing_calibration
from onnxprune.graph import ModelGraph, attrs
from onnxprune.layer_inputs import DEFAULT_BUDGET, FrontierRunner
from onnxprune.model_values import WorkingCopy, with_values
from onnxprune.moments import channel_moments
from onnxprune.progress import task
from onnxprune.repair_stats import sequential_stats
from onnxprune.repair_stream import choose_damp, ridge_fit, stream_writes, symmetric_solve
from onnxprune.rules.facts import linear_axes

REPAIRS = ("none", "bias", "ls", "seq")
SEQ_STREAM = False  # `repair_sequential` default: refit residual-stream writers towards the stream
SEQ_HOLDOUT = 0  # `repair_sequential` default: choose the damp per layer on every N-th sample held out (0: off)
SEQ_COMPACT = True  # `repair_sequential`: statistics of x~ over its kept features only (exact; False: all features)
# `repair_sequential`: the original model's rows drawn once before the waves (`dense_rows`), not by a second runner in
# every wave (streams and held-out folds keep the runner)
SEQ_DENSE_ROWS = True
NO_STATISTICS = "no BatchNorm statistics upstream"  # why `bias` skips a layer


@dataclass
class RepairReport:
    """What repair changed: consumer layers repaired, skipped (with reason), biases added."""

    repaired: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    added_biases: list[str] = field(default_factory=list)
    stream_targets: list[str] = field(default_factory=list)  # seq: refitted towards the residual stream
    damps: dict[str, float] = field(default_factory=dict)  # seq with held-out damping: the damp chosen per layer
    relu_refit: dict | None = None  # seq with `PruneConfig.relu_refit`: `repair_relu.ReluRefitReport.as_dict`
    requantized: dict | None = None  # QDQ weights quantized again: `quantized_repair.RequantizeReport.as_dict`

    def as_dict(self) -> dict:
        out = {"repaired": len(self.repaired), "skipped": dict(self.skipped), "added_biases": len(self.added_biases)}
        if self.relu_refit is not None:
            out["relu_refit"] = self.relu_refit
        if self.requantized is not None:
            out["requantized"] = self.requantized
        return out


@dataclass
class BiasSlot:
    """Where a layer's per-output bias change goes: its own bias input, the mean of the BatchNorm right after
    it (sign -1), the constant of the Add right after it, or a new bias input."""

    kind: str  # "bias" | "bn_mean" | "add" | "new"
    tensor: str
    node: onnx.NodeProto
    sign: float = 1.0


def bias_slot(graph: ModelGraph, c: Consumer, n_out: int) -> BiasSlot | None:
    """The `BiasSlot` of consumer `c` with `n_out` outputs, or None when its bias cannot change alone."""
    node = c.node
    if c.kind in ("conv", "gemm"):
        if len(node.input) > 2 and node.input[2]:
            b = graph.const(node.input[2])
            if b is not None and b.size == n_out and len(graph.consumers.get(node.input[2], [])) == 1:
                return BiasSlot("bias", node.input[2], node)
            return None
        uses = graph.consumers.get(node.output[0], [])
        if c.kind == "conv" and len(uses) == 1 and uses[0].node.op_type == "BatchNormalization" and uses[0].index == 0:
            bn = uses[0].node
            mean = graph.const(bn.input[3]) if len(bn.input) > 3 else None
            if mean is not None and len(graph.consumers.get(bn.input[3], [])) == 1:
                return BiasSlot("bn_mean", bn.input[3], bn, -1.0)
        return BiasSlot("new", f"{node.name or node.output[0]}_repair_bias", node)
    uses = graph.consumers.get(node.output[0], [])
    if len(uses) == 1 and uses[0].node.op_type == "Add":
        add = uses[0].node
        other = add.input[1 - uses[0].index]
        b = graph.const(other)
        if b is not None and b.size == n_out and b.shape[-1] == n_out and len(graph.consumers.get(other, [])) == 1:
            return BiasSlot("add", other, add)
    return None


def repair_weights(
    analysis: ChannelAnalysis,
    removed_labels: np.ndarray,
    method: str,
    stats: CalibrationStats | None = None,
    damp: float = 0.01,
) -> tuple[onnx.ModelProto, RepairReport]:
    """The analysed model with consumers of the removed channels repaired (shapes unchanged but for new biases).

    Args:
        analysis: channel analysis of the model to repair.
        removed_labels: component labels of the channels that will be removed.
        method: "none", "bias" (data-free) or "ls" (calibrated; needs `stats`).
        stats: calibration statistics of the same model (`calibration.collect_stats`).
        damp: ridge term, relative to the mean diagonal of the kept block of H.
    """
    if method not in REPAIRS:
        raise UsageError(f"unknown repair {method!r} (choose from {', '.join(REPAIRS)})")
    if method == "seq":
        raise UsageError("repair 'seq' runs the model on calibration samples: use repair_sequential")
    if method == "ls" and stats is None:
        raise missing_calibration("repair 'ls'", fallback="--repair bias")
    graph = analysis.graph
    report = RepairReport()
    removed = analysis.removed_positions(removed_labels)
    if method == "none" or not removed:
        return graph.model, report
    new_values: dict[str, np.ndarray] = {}
    new_biases: list[tuple[onnx.NodeProto, str, np.ndarray]] = []
    cuts: list[tuple[Consumer, np.ndarray]] = []  # the consumers losing input columns, and which ones
    for c in consumers(graph):
        cut = removed.get(DimRef(c.weight, c.in_axis))
        if cut is not None and len(cut) > 0:
            cuts.append((c, cut))
    report.skipped.update(shared_weight_layers(graph, removed))
    with task(f"repair ({method})", total=len(cuts)) as progress:
        for c, cut in progress.track(cuts):
            if len(graph.consumers.get(c.weight, [])) != 1:
                report.skipped[c.name] = SHARED
                continue
            w = graph.initializer_value(c.weight)
            wm = c.weight_matrix(w).astype(np.float64)
            n_out = wm.shape[0]
            slot = bias_slot(graph, c, n_out)
            feat_pos = c.feature_channel(w.shape)
            gone = np.isin(feat_pos, cut)
            if method == "bias":
                mom = channel_moments(graph, c.x, c.x_axis)
                if mom is None:
                    report.skipped[c.name] = NO_STATISTICS
                    continue
                if slot is None:
                    report.skipped[c.name] = "no bias to compensate into"
                    continue
                delta = wm[:, gone] @ mom[0][feat_pos[gone]]
                new_w = None
                if slot.kind == "bn_mean":
                    # The BatchNorm after the consumer normalised the full output variance; estimate the part
                    # the removed channels carried (independent channels) and renormalise what is left.
                    bn = slot.node
                    var_name = bn.input[4]
                    stored_var = graph.initializer_value(var_name)
                    run_var = np.asarray(new_values.get(var_name, stored_var), dtype=np.float64)
                    contrib = (wm**2) * mom[1][feat_pos][None, :]
                    frac = contrib[:, ~gone].sum(1) / np.maximum(contrib.sum(1), 1e-30)
                    new_var = run_var * np.clip(frac, 0.05, 1.0)
                    new_values[var_name] = new_var.astype(stored_var.dtype)
            else:
                st = stats.stats.get(c.name) if stats is not None else None  # not None: checked above
                if st is None:
                    report.skipped[c.name] = "no calibration statistics"
                    continue
                H = st.H
                keep = np.flatnonzero(~gone)
                if slot is not None:
                    keep = np.append(keep, len(H) - 1)  # the constant feature: solves the bias too
                    b0 = slot_value(graph, slot, n_out)
                    wa = np.concatenate([wm, (slot.sign * b0)[:, None] if slot.kind == "bn_mean" else b0[:, None]], axis=1)
                else:
                    H = H[:-1, :-1]
                    wa = wm
                solved = _ridge_solve(H, keep, wa, damp)
                new_w = wm.copy()
                n_feat = int((~gone).sum())
                new_w[:, ~gone] = solved[:, :n_feat]
                # for bn_mean, wa carried the conv's implicit zero bias
                delta = solved[:, -1] - wa[:, -1] if slot is not None else None
            if new_w is not None:
                new_values[c.weight] = c.from_matrix(new_w, w)
            if delta is not None and slot is not None and np.any(delta != 0):
                if slot.kind == "new":
                    new_biases.append((c.node, slot.tensor, delta.astype(w.dtype)))
                    report.added_biases.append(slot.tensor)
                else:
                    base = new_values.get(slot.tensor, graph.initializer_value(slot.tensor))
                    new_values[slot.tensor] = (base + (slot.sign * delta).reshape(base.shape)).astype(base.dtype)
            report.repaired.append(c.name)
    return with_values(graph.model, new_values, new_biases), report


def _ridge_solve(H: np.ndarray, keep: np.ndarray, wa: np.ndarray, damp: float) -> np.ndarray:
    """``wa H[:, K] (H[K, K] + lambda I)^-1`` for a symmetric H, `lambda` = `damp` x mean diagonal of H[K, K].

    Rows of H are gathered once (contiguous copies), the ridge is added in place and the system is solved in
    place (`repair_stream.symmetric_solve`).
    """
    rows = H[keep]  # = H[:, K]^T
    rhs = rows @ wa.T  # [K, outputs]
    Hk = np.ascontiguousarray(rows[:, keep], dtype=np.float64)
    Hk[np.diag_indices(len(keep))] += damp * float(np.mean(np.diag(Hk))) + 1e-12
    return symmetric_solve(Hk, rhs).T


def slot_value(graph: ModelGraph, slot: BiasSlot, n_out: int) -> np.ndarray:
    """The slot's current per-output bias (zero for a new bias and a BatchNorm mean, which shift relatively)."""
    if slot.kind in ("new", "bn_mean"):
        return np.zeros(n_out)  # the conv itself has no bias; the BN mean shift is applied with sign -1
    return np.asarray(graph.const(slot.tensor), dtype=np.float64).reshape(-1)


# ---------------------------------------------------------------------------------------------------
# Sequential repair
# ---------------------------------------------------------------------------------------------------
@dataclass
class FitWaves:
    """The order of a sequential repair: every consumer whose input or weight the pruning changed, in waves
    (a wave's consumers read tensors that only earlier waves change, so one forward pass feeds a wave).

    Attributes:
        consumers: the consumers with an unshared weight (a shared one is in the report's `skipped`).
        cut_of: consumer name -> its removed input positions (None: only its input changed).
        level: tensor -> the wave after which it no longer changes.
        wave_of: consumer name -> its wave (only consumers to fit).
        waves: wave -> its consumers, in graph order.
    """

    consumers: list[Consumer]
    cut_of: dict[str, np.ndarray | None]
    level: dict[str, int]
    wave_of: dict[str, int]
    waves: dict[int, list[Consumer]]


SHARED = "weight shared with other nodes"


def shared_weight_layers(graph: ModelGraph, removed: dict) -> dict[str, str]:
    """The layers reading a cut weight that other nodes read too (a tie: ALBERT's layers, RetinaNet's heads, a tied
    embedding's output projection), directly or through a layout op: no refit, as one would change every reader.
    Layer name -> the reason, for the report's ``skipped``."""
    out: dict[str, str] = {}
    for ref in removed:
        uses = graph.consumers.get(ref.tensor, []) if ref.tensor in graph.initializers else []
        for use in uses if len(uses) > 1 else []:
            node, name, axis = use.node, ref.tensor, ref.axis
            if node.op_type == "Transpose":  # the layer reads the weight transposed: follow the cut axis
                perm = list(attrs(node).get("perm", range(len(graph.shape(name) or ()))[::-1]))
                name, axis = node.output[0], perm.index(axis) if axis in perm else -1
                node = next((u.node for u in graph.consumers.get(name, [])), node)
            axes = linear_axes(node, graph) if len(node.input) > 1 and node.input[1] == name else None
            if axes is not None and axes[0] == axis:  # its input channels were cut
                out[node.name] = SHARED
    return out


def fit_waves(graph: ModelGraph, removed: dict, report: RepairReport) -> FitWaves:
    """The consumers a sequential repair fits and their waves (`FitWaves`); shared weights go to
    ``report.skipped``."""
    cons = [c for c in consumers(graph) if len(graph.consumers.get(c.weight, [])) == 1]
    report.skipped.update(shared_weight_layers(graph, removed))
    by_node = {id(c.node): c for c in cons}
    cut_of = {c.name: removed.get(DimRef(c.weight, c.in_axis)) for c in cons}
    changed = {ref.tensor for ref in removed}  # tensors that differ from the original
    level: dict[str, int] = {}
    wave_of: dict[str, int] = {}
    for node in graph.nodes:
        ins = [i for i in node.input if i]
        lv = max([level.get(i, 0) for i in ins], default=0)
        dirty = any(i in changed for i in ins)
        fit = by_node.get(id(node))
        if fit is not None and (fit.x in changed or cut_of[fit.name] is not None):
            wave_of[fit.name] = level.get(fit.x, 0)
            lv = max(lv, wave_of[fit.name] + 1)
            dirty = True
        for o in node.output:
            level[o] = lv
            if dirty:
                changed.add(o)
    waves: dict[int, list[Consumer]] = {}
    for c in cons:
        if c.name in wave_of:
            waves.setdefault(wave_of[c.name], []).append(c)
    return FitWaves(cons, cut_of, level, wave_of, waves)


def repair_sequential(
    analysis: ChannelAnalysis,
    removed_labels: np.ndarray,
    data: CalibrationData,
    damp: float = 0.01,
    max_rows: int = 65536,
    seed: int = 0,
    *,
    stream: bool | None = None,
    holdout: int | None = None,
    dense: DenseRows | None = None,
) -> tuple[onnx.ModelProto, RepairReport]:
    """Least-squares repair of every consumer on the pruned model's own inputs, in waves through depth.

    The pruned model is simulated at the original shapes (`rewrite.apply_mask`: removed channels are zero).
    Consumers whose input differs from the original's (downstream of a removal) or whose columns are cut
    are fitted in *waves*: wave k holds the consumers with k fitted consumers on their deepest input path,
    so when a wave runs, everything upstream is final. For each consumer, with x the original input and
    x~ the current pruned-and-repaired input (same sampled rows; [x 1] with the constant feature):

        [W'_K b'] = ([W b] E[x x~_K^T] + lambda [W_K b]) (E[x~_K x~_K^T] + lambda I)^-1

    the ridge solution of min E||W x + b - W'_K x~_K - b'||^2 + lambda ||W'_K - W_K||^2, pulled towards
    the original weights, so a consumer whose input did not change and loses nothing stays exactly as it
    was. `lambda` is `damp` x the mean diagonal of the Hessian block. With nothing removed it is a no-op.

    The original model's side (x, or the original outputs ``[W b] [x 1]`` where narrower) is drawn once
    before the waves (`dense_rows`, `SEQ_DENSE_ROWS`); each wave then runs only the pruned model. ResNet-50,
    256 samples at 224x224, 20% of parameters removed, 2 quiet cores: 158 -> 110 CPU s, 104 -> 74 s wall,
    peak RSS 1,878 -> 1,862 MiB, together with the ridge solves through LAPACK directly
    (`repair_stream.symmetric_solve`; bench/repair_speed_results.txt, round 5). With the obs criterion the
    statistics pass draws those rows (`dense`), and the products take whole buffers off the main thread
    (`repair_stats.QUEUE_BYTES`): the whole obs + seq prune 173.7 -> 147.1 CPU s, 119 -> 98 s wall (round 6).

    Args:
        analysis: channel analysis of the model to repair.
        removed_labels: component labels of the channels that will be removed.
        data: calibration samples (`calibration.CalibrationData`).
        damp: ridge term, relative to the mean diagonal of the kept block of the pruned input's Hessian.
        max_rows: row budget per consumer and wave (`calibration.row_budget`).
        seed: sampling of the rows (convolution positions).
        stream: refit layers that write into a residual stream towards the original stream
            (`repair_stream`); None: `SEQ_STREAM`.
        holdout: when > 1, every `holdout`-th sample is held out to choose the damp per layer among
            `repair_stream.DAMPS` (`damp` is then unused), the winner refitted on every sample; None:
            `SEQ_HOLDOUT`.
        dense: the original model's rows drawn by the statistics pass (`seq_rows_writer`, `collect_stats`),
            used when they are the rows this call would draw (`DenseRows.serves`), else drawn here; closed
            after use either way.
    """
    data = data.for_model(analysis.graph.model)
    from onnxprune.rewrite import apply_mask

    stream = SEQ_STREAM if stream is None else stream
    holdout = SEQ_HOLDOUT if holdout is None else holdout

    graph = analysis.graph
    report = RepairReport()
    removed = analysis.removed_positions(removed_labels)
    if not removed:
        return graph.model, report
    fits = fit_waves(graph, removed, report)
    cons, cut_of, level, wave_of, waves = fits.consumers, fits.cut_of, fits.level, fits.wave_of, fits.waves
    base = apply_mask(analysis, removed_labels)
    new_values: dict[str, np.ndarray] = {}
    new_biases: list[tuple[onnx.NodeProto, str, np.ndarray]] = []
    cur_values: dict[str, np.ndarray] = {}  # the same values with the removed positions masked again
    cur_biases: list[tuple[onnx.NodeProto, str, np.ndarray]] = []
    base_values = {t.name: t for t in base.graph.initializer}
    slots = {c.name: consumer_slot(graph, c) for c in cons if c.name in wave_of}
    writes = stream_writes(graph, [c for c in cons if c.name in wave_of]) if stream else {}
    given, dense = dense, None
    fitted = [c for c in cons if c.name in wave_of]
    if not fitted:  # nothing reads the removed channels through a layer the repair can refit
        if given is not None:
            given.close()
        return graph.model, report
    if SEQ_DENSE_ROWS and not stream and holdout <= 1:  # the original model's rows once, not in every wave
        if given is not None and given.serves(graph.model, fitted, data, max_rows, seed):
            dense, given = given, None
        else:
            dense = dense_rows(graph.model, fitted, lambda c: original_target(graph, c, slots[c.name]),
                               data, max_rows, seed)
    if given is not None:
        given.close()
    # frontier tensors cached from wave to wave; one onnxruntime thread each: the two run at once (`sequential_stats`).
    # With the dense rows only the pruned model's runner runs, with both runners' budget and onnxruntime's default
    # threads (ResNet-50, 256 samples, quiet 2 cores: the waves 52.5 -> 47.7 s wall, the same CPU)
    runners = (FrontierRunner(data, threads=1),
               FrontierRunner(data, budget=2 * DEFAULT_BUDGET, threads=1, concurrent=2) if dense is not None
               else FrontierRunner(data, threads=1))
    working = WorkingCopy(base)  # one copy of the masked model, brought up to date wave by wave
    with contextlib.ExitStack() as cleanup, task("sequential repair", total=len(wave_of)) as progress:
        if dense is not None:
            cleanup.callback(dense.close)  # its temporary file
        for number, k in enumerate(sorted(waves), 1):
            wave = waves[k]
            progress.update(f"sequential repair: wave {number}/{len(waves)}")
            current = working.update(cur_values, cur_biases)  # the weights fitted so far
            # a stream target only where the shortcut is final: nothing of this wave or later upstream of it
            streams = {c.name: writes[c.name] for c in wave
                       if c.name in writes and level.get(writes[c.name].other, 0) <= k}
            targets = {}  # consumers whose fit reads [W b] E[x x~^T] accumulated directly (`sequential_stats`)
            if holdout <= 1:
                for c in wave:
                    wa = original_target(graph, c, slots[c.name])
                    if 2 * len(wa) < wa.shape[1]:
                        targets[c.name] = wa
            # x~ only at its kept input positions where some are cut (exact: the others are zeros in x~); not
            # with a held-out fold, whose damp choice reads the statistics at the original features
            kept = {} if holdout > 1 or not SEQ_COMPACT else {
                c.name: np.setdiff1d(np.arange(c.weight_shape(graph)[c.in_axis]), cut)
                for c in wave if (cut := cut_of[c.name]) is not None and len(cut)}
            folds = sequential_stats(graph.model, current, wave, data, max_rows, seed + 7919 * k, runners,
                                     streams=streams, holdout=holdout, targets=targets, kept=kept, dense=dense)
            for c in progress.track(wave):
                folded = folds.pop(c.name)  # released after its fit: a wave's statistics are not all alive at once
                total = folded.total()
                w = graph.initializer_value(c.weight)
                wm = c.weight_matrix(w).astype(np.float64)
                slot = slots[c.name]
                feat_pos = c.feature_channel(w.shape)
                cut = cut_of[c.name]
                gone = np.isin(feat_pos, cut) if cut is not None else np.zeros(len(feat_pos), bool)
                keep = np.flatnonzero(~gone)
                wa = original_target(graph, c, slot)
                if slot is not None:
                    keep = np.append(keep, wa.shape[1] - 1)  # the constant feature
                else:
                    wa = wa[:, :-1]
                layer_damp = damp
                if folded.held is not None:
                    with_bias = slot is not None
                    layer_damp = choose_damp(wa, folded.fit.parts(with_bias), folded.held.parts(with_bias), keep)
                    report.damps[c.name] = layer_damp
                H, WC, D = total.projected_parts(wa, slot is not None)
                if c.name in kept:  # statistics over the kept features only, in `keep`'s order
                    # H is this wave's own sum, read by nothing after: factored in place
                    solved = ridge_fit(wa[:, keep], H, WC, D, np.arange(len(keep)), layer_damp, overwrite=True)
                else:
                    solved = ridge_fit(wa, H, WC, D, keep, layer_damp)
                if total.D is not None:
                    report.stream_targets.append(c.name)
                n_feat = int((~gone).sum())
                new_w = wm.copy()
                new_w[:, ~gone] = solved[:, :n_feat]
                new_values[c.weight] = c.from_matrix(new_w, w)
                cur_values[c.weight] = remask(removed, base_values, c.weight, new_values[c.weight])
                if slot is not None:
                    add_bias_delta(graph, c, slot, solved[:, -1] - wa[:, -1], removed, base_values,
                                   (new_values, cur_values), (new_biases, cur_biases), report)
                report.repaired.append(c.name)
                del folded, total, H, WC, D  # not held through the next wave's statistics
    return with_values(graph.model, new_values, new_biases), report


def seq_rows_writer(model: onnx.ModelProto, data: CalibrationData, seed: int,
                    max_rows: int = 65536, cut: Iterable[DimRef] | None = None) -> DenseRowsWriter | None:
    """A `DenseRowsWriter` for `collect_stats` that draws the rows `repair_sequential` (with its defaults) reads
    of the original model, for every consumer it could fit; None where the seq repair would not read them
    (`SEQ_DENSE_ROWS` off, stream or held-out fits).

    `cut`: the only dims that can lose positions, where that is known before the statistics (the groups that
    lose channels under score-free counts): only the consumers a removal there makes the repair fit
    (`fit_waves`), each under its number among all consumers, so its rows are those of a full pass. ResNet-50
    under LAMP (random weights): 26 of 54 consumers, the others' rows (the large early maps) not drawn."""
    if not SEQ_DENSE_ROWS or SEQ_STREAM or SEQ_HOLDOUT > 1:
        return None
    graph = ModelGraph(model)
    cons = [c for c in consumers(graph) if len(graph.consumers.get(c.weight, [])) == 1]
    if cut is not None:  # fit_waves reads which dims are cut, not where
        fitted = fit_waves(graph, dict.fromkeys(cut, np.zeros(0, np.int64)), RepairReport()).wave_of
        cons = [c for c in cons if c.name in fitted]

    # one target at a time: the writer keeps float32 copies of those it needs
    return DenseRowsWriter(model, cons, lambda c: original_target(graph, c, consumer_slot(graph, c)), data,
                           max_rows, seed)


def consumer_slot(graph: ModelGraph, c: Consumer) -> BiasSlot | None:
    """`bias_slot` of consumer `c` at its own output count: the slot `repair_sequential` fits and
    `seq_rows_writer` projects with (the two must agree)."""
    return bias_slot(graph, c, c.weight_matrix(graph.initializer_value(c.weight)).shape[0])


def original_target(graph: ModelGraph, c: Consumer, slot: BiasSlot | None) -> np.ndarray:
    """Consumer `c`'s original ``[W b]`` as [outputs, features + 1], float64 (b = 0 without a bias slot, and
    relative for a new bias or a BatchNorm mean: `slot_value`)."""
    wm = c.weight_matrix(graph.initializer_value(c.weight)).astype(np.float64)
    b0 = slot_value(graph, slot, len(wm)) if slot is not None else np.zeros(len(wm))
    return np.concatenate([wm, b0[:, None]], axis=1)


def add_bias_delta(
    graph: ModelGraph,
    c: Consumer,
    slot: BiasSlot,
    delta: np.ndarray,
    removed: dict,
    base_values: dict,
    values: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
    biases: tuple[list, list],
    report: RepairReport,
) -> None:
    """Record a refitted bias change `delta` of consumer `c` in its `slot`: into the written model
    (``values[0]`` / ``biases[0]``) and the masked model the next waves run (``values[1]`` / ``biases[1]``:
    removed output positions stay as masked)."""
    if not np.any(delta != 0):
        return
    (new_values, cur_values), (new_biases, cur_biases) = values, biases
    dtype = graph.initializer_value(c.weight).dtype
    if slot.kind == "new":
        new_biases.append((c.node, slot.tensor, delta.astype(dtype)))
        cut_out = removed.get(DimRef(c.weight, c.out_axis))
        masked_delta = delta.copy()
        if cut_out is not None:
            masked_delta[cut_out] = 0.0
        cur_biases.append((c.node, slot.tensor, masked_delta.astype(dtype)))
        report.added_biases.append(slot.tensor)
    else:
        src = new_values.get(slot.tensor, graph.initializer_value(slot.tensor))
        val = (src + (slot.sign * delta).reshape(src.shape)).astype(src.dtype)
        new_values[slot.tensor] = val
        cur_values[slot.tensor] = remask(removed, base_values, slot.tensor, val)


def remask(removed: dict, base_values: dict, name: str, value: np.ndarray) -> np.ndarray:
    """`value` with every removed position of tensor `name` reset to the masked model's value there."""
    out = np.array(value, copy=True)
    masked = None
    for ref, pos in removed.items():
        if ref.tensor != name:
            continue
        if masked is None:
            masked = numpy_helper.to_array(base_values[name])
        index = [slice(None)] * out.ndim
        index[ref.axis] = pos
        out[tuple(index)] = masked[tuple(index)]
    return out


def reanalyze(analysis: ChannelAnalysis, labels: np.ndarray, model: onnx.ModelProto, allow_inexact: bool):
    """Analysis of the repaired model and the labels there of the same removed positions.

    Repair only changes values, never the graph's structure, so every removed position still exists; a
    coupling change would mean the repair broke the model, hence the check.
    """
    if model is analysis.graph.model:
        return analysis, labels
    new = analyze(ModelGraph(model), allow_inexact=allow_inexact)
    removed = analysis.removed_positions(labels)
    parts = [new.dim_labels(ref)[pos] for ref, pos in removed.items() if ref in new.dims]
    new_labels = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    check = new.removed_positions(new_labels)
    for ref, pos in removed.items():
        if ref in new.dims and not np.array_equal(check.get(ref, np.zeros(0)), pos):
            raise RuntimeError(f"repair changed the channel coupling of {ref}")
    return new, new_labels
