"""Residual-stream targets and held-out ridge damping for the sequential repair (`repair.repair_sequential`).

Start reading at `stream_writes`. Sequential repair refits each consumer layer towards its own original
output on the pruned model's inputs. A layer that *writes into a residual stream* (``Conv -> [BatchNorm]
-> [Add bias] -> Add(., other)``: the last conv of a ResNet block, a projection of a transformer block)
can do better: what the rest of the network reads is the Add's output, and the other Add input (the
shortcut, already pruned and repaired) carries the error every earlier block left on the stream. So the
writer is refitted towards

    y* = W x + (s - s~) / a

the original output plus the stream error ``s - s~`` (original minus current shortcut), mapped back
through the per-channel scale ``a`` of the BatchNorm between them (``gamma / sqrt(var + eps)``; 1 without
one): then ``a (W' x~ + b') + s~`` matches the original stream ``a (W x + b) + s`` as well as the writer's
inputs allow. `stream_writes` finds the writers; `repair.cross_stats` accumulates ``E[x~ r^T]`` for the
stream residual rows ``r = (s - s~) / a`` at the sampled positions; `ridge_fit` folds it into the
least-squares right-hand side. The shortcut must be *final* when the writer is fitted (no consumer of the
same or a later wave upstream of it), else two writers of one Add would both compensate the same error.

`choose_damp` picks the ridge term per layer on held-out calibration samples: the statistics of every
`holdout`-th sample are kept apart, each candidate of `DAMPS` is fitted on the rest and scored by its
squared error on them (closed form from the held-out Hessians), and the winner is refitted on all samples.

Both are options of `repair.repair_sequential` (``stream=``, ``holdout=``) and OFF by default, because neither
helped where it was measured (pretrained CIFAR-10 ResNet20, obs + seq, knapsack allocation fixed, 256
calibration images, all 10,000 test images; top-1 at 20% / 40% of the parameters removed): plain 90.04 / 86.23,
stream target 89.98 / 86.20, held-out damp (every 4th sample held out) 89.78 / 85.87, both 89.88 / 86.06; a
fixed damp of 0.003 or 0.03 instead of 0.01 gave 90.00 / 90.01 at 20%, restoring each refitted output's
variance (a least-squares fit shrinks it) 90.03 / 86.19. The stream error is mostly what the writer's own
input cannot explain (a block cannot see the error of the stream it reads), and the held-out choice picks
larger damps (per layer, on 64 samples) that lower each layer's own error but not the network's. What did
help is more calibration samples (`bench/accuracy_real.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxprune import cblas
from onnxprune.calibration import Consumer
from onnxprune.graph import ModelGraph, attrs

DAMPS = (0.003, 0.01, 0.03, 0.1, 0.3)  # candidates of `choose_damp`, relative to the mean Hessian diagonal


@dataclass(frozen=True)
class StreamWrite:
    """Consumer `consumer` writes into the Add whose other input is `other`; `scale` maps its output onto
    the Add's (per output channel; None = 1)."""

    consumer: str
    add: str
    other: str
    scale: np.ndarray | None


def per_channel(b: np.ndarray, c: Consumer, graph: ModelGraph, n_out: int) -> bool:
    """Whether constant `b` holds one value per output channel of consumer `c`, on the output's channel axis (counted
    from the end: spatial rank + 1 for a conv, 1 for Gemm / MatMul)."""
    from_end = len(graph.initializers[c.weight].dims) - 1 if c.kind == "conv" else 1
    return b.size == n_out and b.ndim >= from_end and b.shape[-from_end] == n_out


def stream_writes(graph: ModelGraph, cons: list[Consumer]) -> dict[str, StreamWrite]:
    """Consumer name -> its `StreamWrite`, for every consumer whose output reaches a two-input Add through
    single-consumer BatchNormalization / constant-bias Add nodes only (per-channel affine maps)."""
    out: dict[str, StreamWrite] = {}
    for c in cons:
        tensor = c.node.output[0]
        n_out = int(graph.initializers[c.weight].dims[c.out_axis])
        scale = np.ones(n_out)
        for _ in range(4):
            uses = graph.consumers.get(tensor, [])
            if len(uses) != 1 or tensor in graph.graph_outputs:
                break
            node, index = uses[0].node, uses[0].index
            if node.op_type == "BatchNormalization" and index == 0 and c.kind == "conv" and len(node.output) == 1:
                gamma, var = graph.const(node.input[1]), graph.const(node.input[4])
                if gamma is None or var is None or gamma.size != n_out or var.size != n_out:
                    break
                eps = float(attrs(node).get("epsilon", 1e-5))
                scale = scale * np.asarray(gamma, np.float64).reshape(-1) / np.sqrt(np.asarray(var, np.float64).reshape(-1) + eps)
                tensor = node.output[0]
                continue
            if node.op_type != "Add" or len(node.input) != 2:
                break
            other = node.input[1 - index]
            bias = graph.const(other)
            if bias is not None:  # a bias Add: per output channel, or it is no per-channel affine map
                if not per_channel(bias, c, graph, n_out):
                    break
                tensor = node.output[0]
                continue
            if graph.shape(other) is not None and graph.shape(other) != graph.shape(tensor):
                break  # a broadcast: the residual rows would not line up with the writer's positions
            usable = np.abs(scale) > 1e-3 * max(float(np.median(np.abs(scale))), 1e-12)
            if not usable.all():
                break  # a channel with ~zero scale cannot carry a compensation
            out[c.name] = StreamWrite(c.name, node.name, other, None if np.all(scale == 1) else scale)
            break
    return out


def ridge_fit(
    wa: np.ndarray, H: np.ndarray, WC: np.ndarray, D: np.ndarray | None, keep: np.ndarray, damp: float,
    overwrite: bool = False,
) -> np.ndarray:
    """``[W'_K b'] = (wa E[x x~_K^T] + E[r x~_K^T] + lambda wa_K)(E[x~_K x~_K^T] + lambda I)^-1``.

    `H` = E[x~ x~^T]; `WC` = ``wa @ C`` with C = E[x x~^T] (features [x 1] or x), [outputs, F]: the caller
    forms it, or accumulates it directly (`LayerStats.P`, fewer multiply-adds when outputs < features / 2);
    `D` = E[x~ r^T] for the stream residual rows r (None: no stream target); `lambda` = `damp` x the mean
    diagonal of H[K, K]; the ridge pulls towards the original weights `wa`. `overwrite`: when `keep` is every
    feature of a C-contiguous `H`, factor `H` itself in place (no copy: ResNet-50's layer4 convs, 109 MB at the
    seq repair's memory peak) instead of a copy.
    """
    in_place = overwrite and H.flags.c_contiguous and np.array_equal(keep, np.arange(len(H)))
    Hk = H if in_place else H[np.ix_(keep, keep)]
    lam = damp * float(np.mean(np.diag(Hk))) + 1e-12
    Hk[np.diag_indices(len(keep))] += lam
    rhs = WC[:, keep] + lam * wa[:, keep]
    if D is not None:
        rhs += D[keep].T
    return symmetric_solve(Hk, rhs.T).T


def symmetric_solve(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A^-1 B`` for a symmetric nonsingular float64 `A`, overwriting `A` when it is C-contiguous.

    LAPACK's gesv (LU) called directly: A's transpose is the Fortran-ordered view it factors without a copy
    (a 4,608-feature conv's Hessian is 170 MB). LU, not Cholesky: OpenBLAS's LU keeps both cores busy where
    its Cholesky stalls on a loaded machine. Not `scipy.linalg.solve`: on ResNet-50's seq repair (53 fits, up
    to ~4,150 features) it took 60 of the repair's 212 CPU s; the same LU through gesv is 3.5-4x faster
    (4,147 features: 5.4 -> 1.4 s), results equal to 1e-14 relative (scipy 1.17's solve adds structure checks,
    a condition estimate and copies). `numpy.linalg.solve`: 1.7 s, and a copy of A.
    """
    lib = cblas.library()  # ctypes: the GIL released (onnxruntime's runs and the products go on meanwhile)
    if lib is not None:
        fortran = A.T if A.dtype == np.float64 and A.flags.c_contiguous else np.asfortranarray(A.T, np.float64)
        x = np.array(B, dtype=np.float64, order="F")
        info = cblas.gesv(lib, fortran, x)
    else:
        from scipy.linalg import lapack

        _, _, x, info = lapack.dgesv(A.T, np.asfortranarray(B), overwrite_a=1, overwrite_b=1)
    if info != 0:  # what scipy.linalg.solve raised; A + lambda I of a PSD A never gets here
        raise np.linalg.LinAlgError(f"singular system (LAPACK gesv info {info})")
    return x


def heldout_error(
    solved: np.ndarray, wa: np.ndarray, H: np.ndarray, C: np.ndarray, D: np.ndarray | None, keep: np.ndarray
) -> float:
    """E||y* - W'_K x~_K||^2 up to a constant (the same for every `solved`), from held-out statistics."""
    Hk = H[np.ix_(keep, keep)]
    cross = wa @ C[:, keep]
    if D is not None:
        cross = cross + D[keep].T
    return float(np.sum((solved @ Hk) * solved) - 2.0 * np.sum(solved * cross))


def choose_damp(
    wa: np.ndarray,
    fit: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    held: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    keep: np.ndarray,
    damps: tuple[float, ...] = DAMPS,
) -> float:
    """The damp of `damps` whose fit on the `fit` statistics (H, C, D) has the lowest error on `held`."""
    H, C, D = fit
    WC = wa @ C
    errors = [heldout_error(ridge_fit(wa, H, WC, D, keep, d), wa, *held, keep) for d in damps]
    return damps[int(np.argmin(errors))]

