"""SparseGPT (Frantar & Alistarh 2023): row-wise second-order pruning with weight updates, for any pattern.

Start reading at `sparsegpt`. A layer computes ``y = W x`` with ``W`` the ``[rows, reduction]`` matrix and
H = E[x x^T] the Hessian of its input (`calibration.collect_stats`, conv inputs unfolded in the matrix's
reduction order). Pruning weight j of a row and updating the row's later weights by the Optimal Brain
Surgeon step ``delta = -(w_j / [H^-1]_jj) [H^-1]_j,:`` minimises that row's output error ``E||(W - W') x||^2``.
SparseGPT makes this cheap for every row at once: the columns are processed left to right, and the
inverse Hessians of the remaining columns are the rows of one upper Cholesky factor ``U`` of ``H^-1`` (the
"inverse-Hessian Cholesky trick"), so column i's update is ``W[:, i:] -= err_i U[i, i:]`` with
``err_i = (w_i - q_i) / U[i, i]``. Columns go in blocks of `block`: inside a block the updates are applied
eagerly, to later blocks lazily (one matrix product per block).

Masks are chosen as the solver goes, on the OBS saliency ``w^2 / U_ii^2`` of the current (already updated)
weights: tile patterns (unstructured, group, block) pick their tiles for a whole block of columns at its
start (adaptive mask selection), spreading the layer's tile count evenly over blocks; N:M patterns pick
at the first column of every run of M. A fixed `mask` (magnitude or Wanda selection) skips the choice and
keeps only the updates. An extra trailing column (the bias, a constant feature 1 in H) is never pruned
and receives the updates like any later column: the bias correction comes for free. Convolution and
small-model layers can afford what SparseGPT avoids on LLMs: once the mask is chosen, `refit_rows` solves
each row's kept weights exactly (a Cholesky per distinct row mask, within a cost budget).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from onnxprune.calibration import single_threaded_blas
from onnxprune.sparsity.patterns import Pattern, expand_tiles, nm_mask, pick_lowest, tile_scores, tiles_for

__all__ = ["inverse_cholesky", "sparsegpt"]


def sparsegpt(
    w: np.ndarray,
    hessian: np.ndarray,
    pattern: Pattern,
    sparsity: float,
    *,
    prunable: int | None = None,
    mask: np.ndarray | None = None,
    damp: float = 0.01,
    block: int = 128,
    refit_budget: float = 2e10,
) -> tuple[np.ndarray, np.ndarray]:
    """Prune `w` to `pattern` at `sparsity` with second-order updates; returns (new weights, keep mask).

    Args:
        w: ``[rows, cols]`` weights (the reduction axis last; an optional bias column after `prunable`).
        hessian: ``[cols, cols]`` E[x x^T] of the layer's input features in the same order.
        pattern: the pattern; its tiles must not straddle `prunable`.
        sparsity: fraction of the prunable weights to zero (N:M patterns ignore it).
        prunable: the first `prunable` columns may be pruned (default: all); later ones are only updated.
        mask: a fixed ``[rows, prunable]`` keep mask instead of the solver's own choice.
        damp: ridge added to H's diagonal, relative to its mean (SparseGPT's percdamp).
        block: columns per block (rounded up to the pattern's run length).
        refit_budget: after the pass, refit every row's kept weights exactly (`refit_rows`) when that costs at
            most this many multiply-adds (0: never).
    """
    with single_threaded_blas():  # OpenBLAS threads stall on a loaded machine (4x slower measured on 2 cores)
        return _sparsegpt(w, hessian, pattern, sparsity, prunable, mask, damp, block, refit_budget)


def _sparsegpt(w: np.ndarray, hessian: np.ndarray, pattern: Pattern, sparsity: float, prunable: int | None,
               mask: np.ndarray | None, damp: float, block: int, refit_budget: float) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = w.shape
    f = cols if prunable is None else prunable
    run = pattern.m if pattern.kind == "nm" else pattern.cols
    block = -(-block // run) * run
    W = np.array(w, dtype=np.float64)
    H = np.array(hessian, dtype=np.float64)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0  # an input that is always zero: its weights do not matter
    H[np.diag_indices(cols)] += damp * float(np.mean(np.diag(H))) + 1e-12
    U = inverse_cholesky(H)
    keep = np.ones((rows, f), bool) if mask is None else np.array(mask, bool)
    # Tile patterns: how many tiles go in the layer, spread evenly over the blocks.
    tiled = mask is None and pattern.kind != "nm"
    if tiled:
        r = pattern.rows
        tiles_per_col = -(-rows // r)
        _, sizes = tile_scores(np.ones((rows, f)), pattern)
        total_tiles = tiles_for(sizes, np.zeros(sizes.shape), sparsity)
        tile_cols = sizes.shape[1]
        done_cols = 0
        done_tiles = 0
    for i1 in range(0, f, block):
        i2 = min(i1 + block, f)
        n = i2 - i1
        W1 = W[:, i1:i2].copy()
        U1 = U[i1:i2, i1:i2]
        d = np.diag(U1)
        err = np.zeros((rows, n))
        if tiled:
            block_cols = -(-n // pattern.cols)
            done_cols += block_cols
            target = int(round(total_tiles * done_cols / tile_cols))
            k = target - done_tiles
            done_tiles = target
            saliency = np.abs(W1) / d[None, :]
            sums, _ = tile_scores(saliency, pattern)
            sub = ~pick_lowest(sums[:tiles_per_col], k)
            keep[:, i1:i2] = expand_tiles(sub, pattern, (rows, n))
        for i in range(n):
            col = i1 + i
            if mask is None and pattern.kind == "nm" and (col % pattern.m) == 0:
                j2 = min(i + pattern.m, n)
                saliency = np.abs(W1[:, i:j2]) / d[None, i:j2]
                keep[:, col : i1 + j2] = nm_mask(saliency, pattern)
            wi = W1[:, i]
            q = np.where(keep[:, col], wi, 0.0)
            e = (wi - q) / d[i]
            W1[:, i:] -= np.outer(e, U1[i, i:])
            W1[:, i] = q
            err[:, i] = e
        W[:, i1:i2] = W1
        if i2 < cols:
            W[:, i2:] -= err @ U[i1:i2, i2:]
    W[:, :f][~keep] = 0.0
    if refit_budget > 0:
        W = refit_rows(np.asarray(w, dtype=np.float64), H, keep, refit_budget, fallback=W)
    return W, keep


def refit_rows(w: np.ndarray, H: np.ndarray, keep: np.ndarray, budget: float, fallback: np.ndarray) -> np.ndarray:
    """The exact least-squares weights for the mask: per row, ``w'_K = (H_KK)^-1 H_K,: w`` over its kept columns K
    (and the unprunable ones after ``keep``'s width), the optimum that SparseGPT's one-pass update approximates.

    Rows sharing a mask (the rows of a tile) share one factorisation. When the solves would cost more than
    `budget` multiply-adds, `fallback` (SparseGPT's weights) is returned.
    """
    rows, f = keep.shape
    extra = np.ones((rows, w.shape[1] - f), bool)
    full = np.concatenate([keep, extra], axis=1)
    groups: dict[bytes, list[int]] = {}
    for i in range(rows):
        groups.setdefault(np.packbits(full[i]).tobytes(), []).append(i)
    cost = sum(float(full[members[0]].sum()) ** 3 / 3 for members in groups.values())
    if cost > budget:
        return fallback
    out = np.zeros_like(w)
    rhs_all = w @ H  # row i: (H w_i)^T, H symmetric
    for group in groups.values():
        members = np.asarray(group)
        cols = np.flatnonzero(full[members[0]])
        if len(cols) == 0:
            continue
        Hk = H[np.ix_(cols, cols)]
        try:
            factor = scipy.linalg.cho_factor(Hk, lower=True, check_finite=False)
            out[np.ix_(members, cols)] = scipy.linalg.cho_solve(factor, rhs_all[np.ix_(members, cols)].T,
                                                                check_finite=False).T
        except np.linalg.LinAlgError:
            out[members] = fallback[members]
    return out


def inverse_cholesky(H: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor U of H^-1 (U^T U = H^-1), with more damping if H is not positive definite.

    One factorisation and one triangular inverse: with J the order reversal, J H J = L L^T gives
    H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper triangular.
    """
    extra = 0.0
    for _ in range(8):
        try:
            L = scipy.linalg.cholesky(H[::-1, ::-1] + extra * np.eye(len(H)), lower=True)
            inv, info = scipy.linalg.lapack.dtrtri(L, lower=1)
            if info == 0:
                return np.ascontiguousarray(inv[::-1, ::-1])
        except np.linalg.LinAlgError:
            pass
        extra = max(extra * 10, 1e-6 * float(np.mean(np.diag(H))) + 1e-12)
    raise np.linalg.LinAlgError("Hessian is not positive definite even after damping")
