"""ReLU-aware refit after the sequential repair: fit what the activation passes, not what it clamps.

The sequential repair (`repair.repair_sequential`) fits each layer's *pre-activation* output to the
original's. Where a ReLU (or a Clip: ReLU6) follows, the error on rows that both models clamp (original and
pruned value <= 0) costs nothing downstream, yet the least-squares fit spends weights on it: in the CIFAR
ResNets 40-75% of a layer's (row, channel) pairs are clamped in both. `refit_relu` refits every such layer of
the sequential repair's waves on the post-activation error instead, in depth order, on the repaired model's
own inputs:

1. Find the activation each layer reaches through per-channel affine maps (BatchNormalization, a constant bias
   Add) and at most one two-input Add (a residual stream): ``z = s * u + t (+ a * other)``, u the layer's output
   (`ReluPoint`). Layers without one keep the sequential repair's weights, unless a refitted layer is upstream
   of them: those are refitted by plain least squares on their changed inputs (a classifier head).
2. One pass of the original model draws, per sample and layer, z at seeded output positions; per wave the
   masked repaired model (`layer_inputs.FrontierRunner`, resumed from wave to wave) gives, at the same
   positions, the rows of the layer's input ``x~`` and of the stream input, from which the current z follows.
   (Asking the runner for z itself would cache tensors downstream of the layers the wave changes.)
3. Per layer, with ``r = (z_orig - z_cur) / s`` (what the layer's output should add), solve for the weight and
   bias change ``D`` (kept features and output channels only):
   ``min sum over (row, channel) not clamped in both of (x~ D - r)^2 + lambda |D|^2``
   by majorize-minimize steps that share ONE Hessian (``x~^T x~``, factored once): clamped pairs take the
   current prediction as their target, so each step lowers the objective for the clamped set it starts from;
   a pair joins or leaves that set as the pruned value crosses the bound. `RELU_ITERATIONS` steps; a layer
   whose post-activation error on its rows does not fall keeps its weights.
4. Write the change into the weights and the layer's bias slot (`repair.bias_slot`: its bias, the following
   BatchNorm's mean or bias Add); a layer with no slot but a new bias refits its weights only.

Measured (CIFAR-10, all 10,000 test images, obs + seq + knapsack, bench/accuracy_real_results.txt, session 31):
ResNet20 (91.73%) calibrated on the 2,000 training images, 20% / 40% of the parameters removed 90.19 / 86.88 ->
90.34 / 87.46 (with --steps 3: 90.68 / 88.13), data-free (`--calib synthetic`) 89.71 / 84.99 -> 89.89 / 85.65;
a control that refits the same layers on every row (plain least squares again) leaves the 40% row at 86.91. Exact per-channel Hessians
instead of the shared one (an off-tree experiment): +0.1, at 1.6x the time. ResNet44 +0.03 / +0.42. Not everywhere:
the bundled Fashion-MNIST ResNet (256 images) loses 0.07-0.14 pt, and ResNet-50 calibrated on noise (no ImageNet
images here) gets 25% less post-activation error per layer but not closer logits, in 2x the time (206 s on 2 cores,
bench/repair_speed_results.txt): an option (`PruneConfig.relu_refit`, `--relu-refit`), not the seq default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.calibration import CalibrationData, Consumer, consumers, hessian_rows, output_rows
from onnxprune.channels import ChannelAnalysis, DimRef
from onnxprune.concurrency import in_order
from onnxprune.graph import ModelGraph, attrs
from onnxprune.layer_inputs import FrontierRunner
from onnxprune.model_values import WorkingCopy, with_values
from onnxprune.progress import task
from onnxprune.repair import RepairReport, bias_slot, fit_waves, remask
from onnxprune.repair_stream import per_channel
from onnxprune.rewrite import apply_mask

RELU_ITERATIONS = 10  # majorize-minimize steps per layer (CIFAR ResNet20 40%, off-tree: 10 -> 87.57, 30 -> 87.66)
RELU_ROWS = 32768  # rows per layer, at most (the fit keeps them in memory) ...
RELU_ROW_BYTES = 256 << 20  # ... and at most this many bytes of float32 rows per layer during its fit
RELU_HELD_BYTES = 384 << 20  # the original model's output rows of all layers, drawn before the waves: at most
RELU_DAMP = 0.01  # ridge on the change, relative to the mean diagonal of the kept Hessian block
RELU_STEP_FLOPS = 40_000_000_000  # multiply-adds of the majorize-minimize steps per layer, at most (but 2 steps)
STEP_BLOCK = 1 << 18  # elements per row block of a step's elementwise passes (`_step_targets`)


@dataclass
class ReluPoint:
    """The ReLU input ``tensor`` a layer reaches: ``z = scale * u + shift (+ other_scale * other)``, u the layer's
    output (its own bias included, `bias`), `other` the residual stream's other input, if any."""

    tensor: str
    scale: np.ndarray
    shift: np.ndarray
    bias: np.ndarray
    other: str | None = None
    other_scale: np.ndarray | None = None
    low: float = 0.0  # the activation clamps z to [low, high]: a ReLU, or a Clip (ReLU6: [0, 6]) ...
    high: float = np.inf  # ... -inf / inf: no activation, every row counts (plain least squares on current inputs)

    def act(self, z: np.ndarray) -> np.ndarray:
        return np.clip(z, self.low, self.high)

    def z_rows(self, u: np.ndarray, other: np.ndarray | None) -> np.ndarray:
        """z (float32) at rows whose layer output is `u`, bias included (and stream input `other`)."""
        z = u * self.scale.astype(np.float32) + self.shift.astype(np.float32)
        if self.other is not None:
            assert other is not None and self.other_scale is not None
            z += other * self.other_scale.astype(np.float32)
        return z


@dataclass
class ReluRefitReport:
    """Layers refitted on the post-ReLU error, and the mean squared post-ReLU error on their rows before / after."""

    refitted: list[str] = field(default_factory=list)
    error_before: dict[str, float] = field(default_factory=dict)
    error_after: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        before = sum(self.error_before.values())
        after = sum(self.error_after.values())
        return {"refitted": len(self.refitted), "error_before": before, "error_after": after}


def relu_point(graph: ModelGraph, c: Consumer) -> ReluPoint | None:
    """The `ReluPoint` of consumer `c` (its constants read from `graph`), or None: no ReLU through per-channel
    affine maps (BatchNormalization, a constant bias Add) and at most one two-input Add, or a grouped conv."""
    if c.kind == "conv" and int(attrs(c.node).get("group", 1)) != 1:
        return None
    n_out = int(graph.initializers[c.weight].dims[c.out_axis])
    bias = own_bias(graph, c, n_out)
    if bias is None:
        return None
    scale, shift = np.ones(n_out), np.zeros(n_out)
    other, other_scale = None, None
    tensor = c.node.output[0]
    for _ in range(6):
        uses = graph.consumers.get(tensor, [])
        if len(uses) != 1 or tensor in graph.graph_outputs:
            return None
        node, index = uses[0].node, uses[0].index
        if node.op_type == "Relu":
            return ReluPoint(tensor, scale, shift, bias, other, other_scale)
        if node.op_type == "Clip" and index == 0:
            bounds = clip_bounds(graph, node)
            return None if bounds is None else ReluPoint(tensor, scale, shift, bias, other, other_scale, *bounds)
        if node.op_type == "BatchNormalization" and index == 0 and c.kind == "conv" and len(node.output) == 1:
            values = [graph.const(node.input[i]) for i in (1, 2, 3, 4)]
            if any(v is None or v.size != n_out for v in values):
                return None
            gamma, beta, mean, var = (np.asarray(v, np.float64).reshape(-1) for v in values)
            s = gamma / np.sqrt(var + float(attrs(node).get("epsilon", 1e-5)))
            scale, shift = scale * s, shift * s + beta - s * mean
            other_scale = None if other_scale is None else other_scale * s
        elif node.op_type == "Add" and len(node.input) == 2:
            term = node.input[1 - index]
            b = graph.const(term)
            if b is None:  # a residual stream: its other input
                if other is not None or (graph.shape(term) is not None and graph.shape(term) != graph.shape(tensor)):
                    return None  # two streams, or a broadcast whose rows would not line up with the layer's
                other, other_scale = term, np.ones(n_out)
            elif b.size == 1 or per_channel(b, c, graph, n_out):
                shift = shift + np.broadcast_to(np.asarray(b, np.float64).reshape(-1), (n_out,))
            else:
                return None
        else:
            return None
        tensor = node.output[0]
    return None


def clip_bounds(graph: ModelGraph, node: onnx.NodeProto) -> tuple[float, float] | None:
    """A Clip's (min, max) (-inf / inf where absent), or None where a bound is not a constant."""
    a = attrs(node)
    if "min" in a or "max" in a:  # opset < 11
        return float(a.get("min", -np.inf)), float(a.get("max", np.inf))
    out = []
    for i, default in ((1, -np.inf), (2, np.inf)):
        if len(node.input) <= i or not node.input[i]:
            out.append(default)
            continue
        v = graph.const(node.input[i])
        if v is None or v.size != 1:
            return None
        out.append(float(np.asarray(v).reshape(-1)[0]))
    return out[0], out[1]


def own_bias(graph: ModelGraph, c: Consumer, n_out: int) -> np.ndarray | None:
    """Consumer `c`'s own bias (zeros without one), or None where its output is not ``x W^T + b``."""
    node = c.node
    if c.kind == "gemm" and any(float(attrs(node).get(k, 1.0)) != 1.0 for k in ("alpha", "beta")):
        return None
    if c.kind in ("conv", "gemm") and len(node.input) > 2 and node.input[2]:
        b = graph.const(node.input[2])
        if b is None or b.size != n_out:
            return None
        return np.asarray(b, np.float64).reshape(-1)
    return np.zeros(n_out)


def refit_relu(
    analysis: ChannelAnalysis,
    removed_labels: np.ndarray,
    repaired: ChannelAnalysis,
    repaired_labels: np.ndarray,
    data: CalibrationData,
    *,
    iterations: int = RELU_ITERATIONS,
    damp: float = RELU_DAMP,
    seed: int = 0,
) -> tuple[onnx.ModelProto, ReluRefitReport]:
    """The repaired model with every layer of the sequential repair's waves that feeds a ReLU refitted on the
    post-ReLU error (module docstring).

    Args:
        analysis: channel analysis of the ORIGINAL model; `removed_labels` its removed components.
        repaired: channel analysis of the repaired model (`repair.reanalyze`); `repaired_labels` the same removal.
        data: the calibration samples the sequential repair used.
        iterations: majorize-minimize steps per layer; 0 returns the repaired model unchanged.
        damp: ridge term, relative to the mean diagonal of the kept block of the layer's input Hessian.
        seed: sampling of the rows.
    """
    report = ReluRefitReport()
    graph = analysis.graph
    data = data.for_model(graph.model)  # a fixed batch: B inputs a run, rows drawn per input as `hessian_rows` does
    removed = analysis.removed_positions(removed_labels)
    out_model = repaired.graph.model
    if not removed or iterations <= 0:
        return out_model, report
    fits = fit_waves(graph, removed, RepairReport())
    current = apply_mask(repaired, repaired_labels)  # the pruned model at the original shapes
    cgraph = ModelGraph(current)  # the constants of the ReLU points: BatchNorm means the repair moved
    points = {c.name: p for c in fits.consumers if c.name in fits.wave_of and (p := relu_point(cgraph, c)) is not None
              # a stream input that later waves still change cannot be read from the pruned model's frontier
              and (p.other is None or fits.level.get(p.other, 0) <= fits.wave_of[c.name])}
    if not points:
        return out_model, report
    # layers without a ReLU after the first refitted wave: refitted on every row to their (changed) inputs
    first = min(fits.wave_of[name] for name in points)
    for c in fits.consumers:
        if c.name in fits.wave_of and c.name not in points and fits.wave_of[c.name] > first:
            n_out = int(graph.initializers[c.weight].dims[c.out_axis])
            bias = own_bias(cgraph, c, n_out)
            if bias is not None:
                points[c.name] = ReluPoint(c.node.output[0], np.ones(n_out), np.zeros(n_out), bias,
                                           low=-np.inf, high=np.inf)
    rgraph = repaired.graph
    rcons = {c.name: c for c in consumers(rgraph)}
    rremoved = repaired.removed_positions(repaired_labels)
    base_values = {t.name: t for t in current.graph.initializer}
    cur_values: dict[str, np.ndarray] = {}
    new_values: dict[str, np.ndarray] = {}
    waves = {k: [c for c in wave if c.name in points] for k, wave in sorted(fits.waves.items())}
    waves = {k: wave for k, wave in waves.items() if wave}
    order = [c for wave in waves.values() for c in wave]
    index = {c.name: j for j, c in enumerate(order)}
    per_sample = {c.name: _per_sample(graph, c, data.n * data.batch) for c in order}
    # the original model's rows of every layer are held from the first wave to each layer's own: within a budget
    held = sum(per_sample[c.name] * data.n * data.batch * 4 * c.weight_shape(graph)[c.out_axis] for c in order)
    if held > RELU_HELD_BYTES:
        per_sample = {name: max(1, int(n * RELU_HELD_BYTES / held)) for name, n in per_sample.items()}
    original = _original_rows(graph, order, points, data, per_sample, seed)
    # the pruned model resumed from wave to wave (`FrontierRunner`): a wave asks only for tensors no later wave
    # changes (layer inputs, final stream inputs) and computes its ReLU inputs from them
    runner = FrontierRunner(data)
    working = WorkingCopy(current)
    with task("ReLU-aware refit", total=len(order)) as progress:
        for wave in waves.values():
            rows = _draw(graph, wave, index, points, runner, working.update(cur_values, []), per_sample, seed)
            for c in wave:
                x, other = rows.pop(c.name)
                z_orig = np.concatenate(original.pop(c.name))
                assert len(z_orig) == len(x), f"{c.name}: rows of the two models do not line up"
                rc = rcons.get(c.name)
                if rc is None:
                    continue
                point = points[c.name]
                w_cur = rc.weight_matrix(cgraph.initializer_value(rc.weight)).astype(np.float32)
                z_cur = point.z_rows(x @ w_cur.T + point.bias.astype(np.float32), other)
                change = _fit(rgraph, rc, rremoved, base_values, point, x, z_orig, z_cur, iterations, damp, report)
                if change is None:
                    continue
                for name, (written, masked) in change.items():
                    new_values[name] = written
                    cur_values[name] = masked
                report.refitted.append(c.name)
            progress.advance(len(wave))
    return with_values(out_model, new_values, []), report


def _per_sample(graph: ModelGraph, c: Consumer, samples: int) -> int:
    """Rows drawn per sample for consumer `c`: `RELU_ROWS` in all, within `RELU_ROW_BYTES` of float32 per layer."""
    shape = c.weight_shape(graph)
    # per row: the input features, and ~6 output-wide float32 arrays during the fit (z twice, target, ...)
    width = c.feature_count(shape) + 1 + 6 * shape[c.out_axis]
    total = min(RELU_ROWS, RELU_ROW_BYTES // (4 * width))
    return max(1, -(-total // max(1, samples)))


def _positions(z: np.ndarray, c: Consumer, per_sample: int, rng: np.random.Generator) -> np.ndarray | None:
    """The output positions `calibration.hessian_rows` draws for one sample with the same generator state."""
    total = int(np.prod(z.shape[2:])) if c.kind == "conv" else int(np.prod(z.shape[:-1]))
    return None if total <= per_sample else np.sort(rng.choice(total, per_sample, replace=False))


def _original_rows(graph: ModelGraph, order: list[Consumer], points: dict[str, ReluPoint], data: CalibrationData,
                   per_sample: dict[str, int], seed: int) -> dict[str, list[np.ndarray]]:
    """Per consumer and sample, the original model's z rows at the positions the waves will draw: one pass of
    the original model for every wave (not one per wave)."""
    names = sorted({points[c.name].tensor for c in order})
    out: dict[str, list[np.ndarray]] = {c.name: [] for c in order}
    runner = FrontierRunner(data, budget=0)
    with task("ReLU-aware refit: original outputs", total=data.n) as progress:
        for i, values in enumerate(progress.track(runner.run(graph.model, names))):
            for j, c in enumerate(order):
                z = np.asarray(values[points[c.name].tensor], np.float32)
                rng = np.random.default_rng([seed, i, j])  # per input of the run, in order, as `hessian_rows` draws
                picks = [_positions(z[b : b + 1], c, per_sample[c.name], rng) for b in range(len(z))]
                out[c.name].append(output_rows(z, c, picks))
    return out


def _draw(graph: ModelGraph, wave: list[Consumer], index: dict[str, int], points: dict[str, ReluPoint],
          runner: FrontierRunner, current: onnx.ModelProto, per_sample: dict[str, int],
          seed: int) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Per consumer of the wave: (rows of the pruned input x~, its stream input's rows or None), float32, at the
    positions `_original_rows` drew (the same generator per sample and consumer)."""
    w_shapes = {c.name: c.weight_shape(graph) for c in wave}
    names = sorted({c.x for c in wave} | {p.other for c in wave if (p := points[c.name]).other is not None})
    parts: dict[str, list[tuple[np.ndarray, np.ndarray | None]]] = {c.name: [] for c in wave}
    for i, values in enumerate(runner.run(current, names)):
        for c in wave:
            picks: list[np.ndarray | None] = []
            rng = np.random.default_rng([seed, i, index[c.name]])
            rows = hessian_rows(np.asarray(values[c.x], np.float32), c, w_shapes[c.name], per_sample[c.name], rng, picks)
            other = points[c.name].other
            parts[c.name].append((rows, None if other is None else
                                  output_rows(np.asarray(values[other], np.float32), c, picks)))
    return {name: (np.concatenate([p[0] for p in ps]),
                   None if ps[0][1] is None else np.concatenate([p[1] for p in ps]))
            for name, ps in parts.items()}


def _fit(rgraph: ModelGraph, rc: Consumer, removed: dict, base_values: dict, point: ReluPoint,
         x: np.ndarray, z_orig: np.ndarray, z_cur: np.ndarray, iterations: int, damp: float,
         report: ReluRefitReport) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """The refitted tensors of one layer: name -> (value written, value with the removed positions masked).

    `removed` and `base_values` are the repaired analysis' removed positions and the masked model's
    initializers (`repair.remask`)."""
    w = rgraph.initializer_value(rc.weight)
    wm = rc.weight_matrix(w).astype(np.float64)
    n_out = wm.shape[0]
    gone_out = removed.get(DimRef(rc.weight, rc.out_axis))
    cut = removed.get(DimRef(rc.weight, rc.in_axis))
    outs = np.setdiff1d(np.arange(n_out), gone_out if gone_out is not None else [])
    outs = outs[np.abs(point.scale[outs]) > 1e-12]
    feat_pos = rc.feature_channel(w.shape)
    feats = np.flatnonzero(~np.isin(feat_pos, cut)) if cut is not None else np.arange(len(feat_pos))
    if len(outs) == 0 or len(feats) == 0 or len(x) == 0:
        return None
    slot = bias_slot(rgraph, rc, n_out)
    if slot is not None and slot.kind == "new":
        slot = None  # a new bias input is the sequential repair's to add; this refit changes weights only there
    X = np.ascontiguousarray(x[:, feats], np.float32)
    if slot is not None:
        X = np.concatenate([X, np.ones((len(X), 1), np.float32)], axis=1)
    s = point.scale[outs].astype(np.float32)
    zo = np.ascontiguousarray(z_orig[:, outs])
    zc = np.ascontiguousarray(z_cur[:, outs], dtype=np.float32)
    target = (zo - zc) / s  # what the layer's output should add
    H = (X.T @ X).astype(np.float64)
    H[np.diag_indices(len(H))] += damp * float(np.mean(np.diag(H))) + 1e-12
    factor = _cholesky(H)
    delta = np.zeros((len(outs), X.shape[1]), np.float32)
    lo, hi = point.low, point.high
    before = float(np.mean((point.act(zc) - point.act(zo)) ** 2))
    clamps = np.isfinite(lo) or np.isfinite(hi)
    # each step is two products of the rows with the change: bounded by RELU_STEP_FLOPS per layer, >= 2 steps
    steps = min(iterations, max(2, RELU_STEP_FLOPS // max(1, 2 * X.shape[0] * X.shape[1] * len(outs))))
    pred = np.zeros_like(zc)
    mixed = np.empty_like(zc)  # reused by every step (no fresh pages per step)
    # where the original model clamps: fixed over the steps (a bound at infinity clamps nothing)
    below, above = (zo <= lo) if np.isfinite(lo) else None, (zo >= hi) if np.isfinite(hi) else None
    for _ in range(steps if clamps else 1):
        _step_targets(mixed, pred, zc, s, target, below, above, lo, hi)
        rhs = X.T @ mixed
        delta = _cho_solve(factor, rhs.astype(np.float64)).T.astype(np.float32)
        np.matmul(X, delta.T, out=pred)
    after = float(np.mean((point.act(zc + s * pred) - point.act(zo)) ** 2))
    if not after < before:  # nothing gained on its own rows: the sequential repair's weights stay
        return None
    report.error_before[rc.name], report.error_after[rc.name] = before, after
    new = wm.copy()
    new[np.ix_(outs, feats)] += delta[:, : len(feats)].astype(np.float64)
    written = rc.from_matrix(new, w)
    change = {rc.weight: (written, remask(removed, base_values, rc.weight, written))}
    if slot is not None:
        value = rgraph.initializer_value(slot.tensor)
        full = np.zeros(n_out)
        full[outs] = delta[:, -1].astype(np.float64)
        biased = (np.asarray(value, np.float64) + (slot.sign * full).reshape(value.shape)).astype(value.dtype)
        change[slot.tensor] = (biased, remask(removed, base_values, slot.tensor, biased))
    return change


def _step_targets(out: np.ndarray, pred: np.ndarray, zc: np.ndarray, s: np.ndarray, target: np.ndarray,
                  below: np.ndarray | None, above: np.ndarray | None, lo: float, hi: float) -> None:
    """One step's targets into `out`: `pred` (the current prediction) where the refitted output ``zc + s * pred``
    is clamped to the same bound as the original (`below` / `above`: the original's clamped entries, None for a
    bound at infinity), since such pairs cost nothing; `target` elsewhere.

    Row blocks of `STEP_BLOCK` elements, which stay in cache through the five passes, the two halves of the rows
    in two threads (numpy's ufuncs release the GIL): 133 -> 37 ms a step for 8,388 rows x 1,280 channels, 32 -> 16
    ms for 131,072 x 32, against whole-array passes (2 cores); the same values bit for bit. These passes, not the
    step's two BLAS products, were the largest part of the fit's time: EfficientNet-Lite0 in the unconstrained best
    configuration (session 53, py-spy) ~8 of the fits' 20 s, ~4.7 s after; the CLI run 54.0 / 51.3 -> 51.8 / 49.8 s
    in two interleaved pairs, the pruned model bit-identical (`bench/repair_speed_results.txt`).
    """
    n, width = pred.shape
    block = max(1, STEP_BLOCK // max(1, width))

    def rows(span: tuple[int, int]) -> None:
        zn = np.empty((block, width), np.float32)
        both, other = np.empty((block, width), bool), np.empty((block, width), bool)
        for i in range(span[0], span[1], block):
            j = min(span[1], i + block)
            z, c, t = zn[: j - i], both[: j - i], other[: j - i]
            np.multiply(s, pred[i:j], out=z)
            z += zc[i:j]
            c.fill(False)
            if below is not None:
                np.less_equal(z, lo, out=c)
                c &= below[i:j]
            if above is not None:
                np.greater_equal(z, hi, out=t)
                t &= above[i:j]
                c |= t
            out[i:j] = np.where(c, pred[i:j], target[i:j])

    half = n // 2
    if half < block:
        rows((0, n))
    else:
        list(in_order(rows, [(0, half), (half, n)]))


def _cholesky(H: np.ndarray) -> np.ndarray:
    """The lower Cholesky factor of a symmetric positive definite `H` (LAPACK potrf), for `_cho_solve`."""
    from scipy.linalg import lapack

    factor, info = lapack.dpotrf(H, lower=1, clean=0, overwrite_a=1)
    if info != 0:  # H + lambda I of a Gram matrix is positive definite; a NaN in the rows gets here
        raise np.linalg.LinAlgError(f"Hessian not positive definite (LAPACK potrf info {info})")
    return factor


def _cho_solve(factor: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``H^-1 B`` from `_cholesky`'s factor (LAPACK potrs: two triangular solves, not a factorisation)."""
    from scipy.linalg import lapack

    x, info = lapack.dpotrs(factor, B, lower=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK potrs info {info}")
    return x
