"""Element scores of a layer's weights, and how the sparsity is shared among layers.

Scores (one per weight of the ``[rows, reduction]`` matrix, higher = more important):

* ``magnitude`` (data-free): |W|.
* ``wanda`` (calibrated; Sun et al. 2023): |W_ij| * ||x_j||, the weight times the RMS of the input feature
  it multiplies, over the calibration samples (`calibration.ConsumerStats` mean squares of the layer's
  input channels; a conv feature (c, k) uses channel c's RMS). A layer without statistics falls back to |W|.
* ``obs`` (calibrated): the OBS saliency w^2 / [H^-1]_jj, evaluated inside the SparseGPT solver as the
  weights are updated (`solver.py`); for the allocation it counts as ``wanda``, its diagonal approximation.

Allocations (`allocate`): ``uniform`` (every layer at the requested sparsity), ``global`` (the lowest
scoring units of all layers, compared directly), ``lamp`` (layer-adaptive magnitude pruning, Lee et al.
2021: per layer s_i^2 / sum of s_j^2 >= s_i^2 of the units' magnitudes, ranked across layers). A layer never
loses more than `MAX_LAYER_SPARSITY` of its weights under global and lamp. N:M patterns are uniform by
construction.
"""

from __future__ import annotations

import numpy as np

from onnxprune.calibration import CalibrationStats
from onnxprune.criteria import lamp_transform
from onnxprune.errors import UsageError
from onnxprune.sparsity.layers import SparseLayer
from onnxprune.sparsity.patterns import Pattern, tile_scores

__all__ = ["ALLOCATIONS", "SCORES", "allocate", "element_scores", "input_rms"]

SCORES = ("magnitude", "wanda", "obs")
ALLOCATIONS = ("uniform", "global", "lamp")
MAX_LAYER_SPARSITY = 0.95


def input_rms(layer: SparseLayer, stats: CalibrationStats | None) -> np.ndarray | None:
    """RMS over the calibration samples of each reduction feature of `layer`, or None without statistics."""
    c = layer.consumer
    if c is None or stats is None or c.name not in stats.stats:
        return None
    st = stats.stats[c.name]
    rms = np.sqrt(st.sq_sum / max(1, st.count))
    return rms[layer.feature_channel()]


def element_scores(layer: SparseLayer, matrix: np.ndarray, score: str, stats: CalibrationStats | None) -> np.ndarray:
    """Scores of the ``[rows, reduction]`` `matrix` of `layer` (``obs`` scores as ``wanda`` here)."""
    if score not in SCORES:
        raise UsageError(f"unknown sparse criterion {score!r} (choose from {', '.join(SCORES)})")
    mag = np.abs(matrix.astype(np.float64))
    if score == "magnitude":
        return mag
    rms = input_rms(layer, stats)
    return mag if rms is None else mag * rms[None, :]


def allocate(
    layers: list[SparseLayer],
    scores: dict[str, np.ndarray],
    magnitudes: dict[str, np.ndarray],
    pattern: Pattern,
    sparsity: float,
    allocation: str,
) -> dict[str, float]:
    """Per layer name, the fraction of its weights to zero so that `sparsity` of all of them go.

    Args:
        layers: the layers to prune.
        scores: element scores per layer (what ``global`` ranks).
        magnitudes: |W| per layer (what ``lamp`` ranks, whatever the criterion, as for channels).
        pattern: the pattern (its tiles are the units).
        sparsity: the fraction of the layers' weights to zero.
        allocation: uniform | global | lamp.
    """
    if allocation not in ALLOCATIONS:
        raise UsageError(f"--allocation {allocation} does not apply to --sparsity (choose from {', '.join(ALLOCATIONS)})")
    fixed = pattern.fixed_sparsity
    if fixed is not None:
        return {layer.name: fixed for layer in layers}
    if allocation == "uniform" or not layers:
        return {layer.name: sparsity for layer in layers}
    keys, sizes, owner = [], [], []
    for i, layer in enumerate(layers):
        source = magnitudes if allocation == "lamp" else scores
        sums, tile_sizes = tile_scores(source[layer.name], pattern)
        key = sums.ravel()
        if allocation == "lamp":
            key = lamp_transform(np.sqrt(key))
        # the highest units of each layer never go: the layer keeps at least 1 - MAX_LAYER_SPARSITY
        order = np.argsort(key, kind="stable")
        allowed = np.zeros(len(key), bool)
        allowed[order[: int(np.floor(MAX_LAYER_SPARSITY * len(key)))]] = True
        keys.append(key[allowed])
        sizes.append(tile_sizes.ravel()[allowed])
        owner.append(np.full(int(allowed.sum()), i))
    all_keys, all_sizes, all_owner = np.concatenate(keys), np.concatenate(sizes), np.concatenate(owner)
    order = np.argsort(all_keys, kind="stable")
    total = float(sum(layer.size for layer in layers))
    cum = np.concatenate([[0.0], np.cumsum(all_sizes[order])])
    count = int(np.argmin(np.abs(cum - sparsity * total)))  # the prefix nearest to the target
    zeroed = np.bincount(all_owner[order[:count]], weights=all_sizes[order[:count]], minlength=len(layers))
    return {layer.name: float(zeroed[i] / layer.size) for i, layer in enumerate(layers)}
