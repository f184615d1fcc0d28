"""Weight repair after channel removal, without training.

Start reading at `repair_weights`. Removing channels deletes input columns of every *consumer* layer
(Conv group 1, Gemm, MatMul with an initializer weight) that reads them. Repair rewrites each such
consumer's remaining weights and bias **in the original model** (same shapes), so the physical removal
that follows (`rewrite.apply_plan`) deletes exactly the columns repair accounted for:

* ``bias`` (data-free): a removed channel c carried E[x_c] on average. BatchNorm running statistics
  upstream give that expectation (`calibration.channel_moments`: BN output ~ N(beta, gamma^2), rectified
  by Relu, passed through pooling/Add/Concat/Flatten), and ``sum_k W[:, c, k] * E[x_c]`` is folded into
  the consumer's bias. This is the least-squares solution under the data-free Hessian surrogate
  (independent channels with BN moments): the kept weights stay, only the mean is restored. When the
  consumer feeds a BatchNorm, that BN's running variance is also scaled by the fraction of the output
  variance the kept channels carry under the same surrogate (``sum_kept W^2 var / sum_all W^2 var``),
  so the BN keeps normalising its output to the variance the next layers were trained on.
* ``ls`` (calibrated): ridge least squares on the calibration Hessian H = E[[x 1][x 1]^T] of the
  consumer's input (im2col for convolutions): ``[W_K b'] = [W b] H[:, K] (H[K, K] + lambda I)^-1``, the
  Optimal Brain Surgeon update of the kept columns K; the constant feature makes it correct the mean
  shift in the bias at the same time.

Where the bias goes: an existing Conv/Gemm bias; else the running mean of a BatchNorm that is the
conv's only consumer (BN(y + d) equals BN with running_mean - d); else a new zero bias input (Conv/Gemm);
for MatMul, a following Add of a constant vector. With no channel removed nothing changes (a no-op).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.calibration import CalibrationStats, Consumer, channel_moments, consumers
from onnxprune.channels import ChannelAnalysis, DimRef
from onnxprune.errors import UsageError
from onnxprune.graph import ModelGraph

REPAIRS = ("none", "bias", "ls")


@dataclass
class RepairReport:
    """What repair changed: consumer layers repaired, skipped (with reason), biases added."""

    repaired: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    added_biases: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"repaired": len(self.repaired), "skipped": dict(self.skipped), "added_biases": len(self.added_biases)}


@dataclass
class _BiasSlot:
    kind: str  # "bias" | "bn_mean" | "add" | "new"
    tensor: str
    node: onnx.NodeProto
    sign: float = 1.0


def _bias_slot(graph: ModelGraph, c: Consumer, n_out: int) -> _BiasSlot | None:
    node = c.node
    if c.kind in ("conv", "gemm"):
        if len(node.input) > 2 and node.input[2]:
            b = graph.const(node.input[2])
            if b is not None and b.size == n_out and len(graph.consumers.get(node.input[2], [])) == 1:
                return _BiasSlot("bias", node.input[2], node)
            return None
        uses = graph.consumers.get(node.output[0], [])
        if c.kind == "conv" and len(uses) == 1 and uses[0].node.op_type == "BatchNormalization" and uses[0].index == 0:
            bn = uses[0].node
            mean = graph.const(bn.input[3]) if len(bn.input) > 3 else None
            if mean is not None and len(graph.consumers.get(bn.input[3], [])) == 1:
                return _BiasSlot("bn_mean", bn.input[3], bn, -1.0)
        return _BiasSlot("new", f"{node.name or node.output[0]}_repair_bias", node)
    uses = graph.consumers.get(node.output[0], [])
    if len(uses) == 1 and uses[0].node.op_type == "Add":
        add = uses[0].node
        other = add.input[1 - uses[0].index]
        b = graph.const(other)
        if b is not None and b.size == n_out and b.shape[-1] == n_out and len(graph.consumers.get(other, [])) == 1:
            return _BiasSlot("add", other, add)
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
    if method == "ls" and stats is None:
        raise UsageError("repair 'ls' needs calibration data: pass --calib FILE.npz (or use --repair bias)")
    graph = analysis.graph
    report = RepairReport()
    removed = analysis.removed_positions(removed_labels)
    if method == "none" or not removed:
        return graph.model, report
    new_values: dict[str, np.ndarray] = {}
    new_biases: list[tuple[onnx.NodeProto, str, np.ndarray]] = []
    for c in consumers(graph):
        cut = removed.get(DimRef(c.weight, c.in_axis))
        if cut is None or len(cut) == 0:
            continue
        if len(graph.consumers.get(c.weight, [])) != 1:
            report.skipped[c.name] = "weight shared with other nodes"
            continue
        w = graph.const(c.weight)
        wm = c.weight_matrix(w).astype(np.float64)
        n_out = wm.shape[0]
        slot = _bias_slot(graph, c, n_out)
        feat_pos = c.feature_channel(w.shape)
        gone = np.isin(feat_pos, cut)
        if method == "bias":
            mom = channel_moments(graph, c.x, c.x_axis)
            if mom is None:
                report.skipped[c.name] = "no BatchNorm statistics upstream"
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
                run_var = np.asarray(new_values.get(var_name, graph.const(var_name)), dtype=np.float64)
                contrib = (wm**2) * mom[1][feat_pos][None, :]
                frac = contrib[:, ~gone].sum(1) / np.maximum(contrib.sum(1), 1e-30)
                new_var = run_var * np.clip(frac, 0.05, 1.0)
                new_values[var_name] = new_var.astype(graph.const(var_name).dtype)
        else:
            st = stats.stats.get(c.name)
            if st is None:
                report.skipped[c.name] = "no calibration statistics"
                continue
            H = st.H
            keep = np.flatnonzero(~gone)
            if slot is not None:
                keep = np.append(keep, len(H) - 1)  # the constant feature: solves the bias too
                b0 = _slot_value(graph, slot, n_out)
                wa = np.concatenate([wm, (slot.sign * b0)[:, None] if slot.kind == "bn_mean" else b0[:, None]], axis=1)
            else:
                H = H[:-1, :-1]
                wa = wm
            solved = _ridge_solve(H, keep, wa, damp)
            new_w = wm.copy()
            n_feat = int((~gone).sum())
            new_w[:, ~gone] = solved[:, :n_feat]
            if slot is not None:
                delta = solved[:, -1] - wa[:, -1]  # for bn_mean, wa carried the conv's implicit zero bias
            else:
                delta = None
        if new_w is not None:
            new_values[c.weight] = c.from_matrix(new_w, w)
        if delta is not None and slot is not None and np.any(delta != 0):
            if slot.kind == "new":
                new_biases.append((c.node, slot.tensor, delta.astype(w.dtype)))
                report.added_biases.append(slot.tensor)
            else:
                base = new_values.get(slot.tensor, graph.const(slot.tensor))
                new_values[slot.tensor] = (base + (slot.sign * delta).reshape(base.shape)).astype(base.dtype)
        report.repaired.append(c.name)
    return _with_values(graph.model, new_values, new_biases), report


def _ridge_solve(H: np.ndarray, keep: np.ndarray, wa: np.ndarray, damp: float) -> np.ndarray:
    """``wa H[:, K] (H[K, K] + lambda I)^-1`` for a symmetric H, `lambda` = `damp` x mean diagonal of H[K, K].

    Rows of H are gathered once (contiguous copies) and the ridge is added in place. LU, not Cholesky:
    OpenBLAS's LU keeps both cores busy where its Cholesky stalls on a loaded machine.
    """
    rows = H[keep]  # = H[:, K]^T
    rhs = rows @ wa.T  # [K, outputs]
    Hk = rows[:, keep]
    Hk[np.diag_indices(len(keep))] += damp * float(np.mean(np.diag(Hk))) + 1e-12
    return np.linalg.solve(Hk, rhs).T


def _slot_value(graph: ModelGraph, slot: _BiasSlot, n_out: int) -> np.ndarray:
    if slot.kind in ("new", "bn_mean"):
        return np.zeros(n_out)  # the conv itself has no bias; the BN mean shift is applied with sign -1
    return np.asarray(graph.const(slot.tensor), dtype=np.float64).reshape(-1)


def _with_values(model: onnx.ModelProto, values: dict[str, np.ndarray], new_biases) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(values[t.name]), t.name))
    if new_biases:
        names = {n.name: n for n in out.graph.node}
        existing = {t.name for t in out.graph.initializer}
        for node, name, value in new_biases:
            while name in existing:
                name += "_"
            existing.add(name)
            out.graph.initializer.append(numpy_helper.from_array(value, name))
            target = names[node.name]
            while len(target.input) < 3:
                target.input.append("")
            target.input[2] = name
    return out
