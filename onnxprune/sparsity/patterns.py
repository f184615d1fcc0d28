"""Sparsity patterns: what a pruning unit is, how a mask is chosen from scores, and how a mask is checked.

Every pattern works on a weight seen as a matrix ``[rows, reduction]`` (`layers.SparseLayer.matrix`): a row is
one output (an output channel of a Conv, a column of a Gemm/MatMul output), the reduction axis runs over
what that output sums (input channel x kernel position for a Conv, in weight memory order).

* ``unstructured``: every weight is its own unit (a 1x1 tile).
* ``group:RxC`` / ``block:RxC``: tiles of R consecutive rows x C consecutive reduction positions are kept or
  zeroed whole. ``group:1x4`` is a run of 4 along the reduction axis of one output (SparseByteNN's
  fine-grained groups), ``group:4x1`` the same input position in 4 consecutive outputs; ``block:16x1``,
  ``block:4x4``, ``block:8x8`` are the block-sparse (BSR) tiles of sparse GEMM kernels. Group and block
  differ only in name and size (a group has at most 8 weights); tiles at the matrix's edges are smaller.
* ``nm:N:M``: in every run of M consecutive reduction positions of a row, at most N weights are non-zero
  (2:4, 4:8). The sparsity is fixed at 1 - N/M; a trailing run shorter than M keeps min(N, its length).

Start reading at `parse_pattern`, then `tile_mask` / `nm_mask`; `check_mask` verifies a mask's structure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from onnxprune.errors import UsageError

__all__ = ["Pattern", "check_mask", "mask_for", "nm_mask", "parse_pattern", "tile_mask", "tile_scores"]

PATTERN_HELP = "unstructured, group:RxC (e.g. 1x4, 4x1), nm:N:M (e.g. 2:4, 4:8) or block:RxC (e.g. 16x1, 4x4, 8x8)"


@dataclass(frozen=True)
class Pattern:
    """A parsed ``--pattern``: kind ``unstructured`` | ``group`` | ``block`` | ``nm`` and its sizes.

    Attributes:
        kind: the pattern family.
        rows, cols: the tile (R rows x C reduction positions); 1x1 for unstructured, 1xM for N:M.
        n, m: for N:M, at most `n` non-zero in every `m` consecutive reduction positions.
    """

    kind: str
    rows: int = 1
    cols: int = 1
    n: int = 0
    m: int = 0

    @property
    def text(self) -> str:
        if self.kind == "unstructured":
            return "unstructured"
        if self.kind == "nm":
            return f"nm:{self.n}:{self.m}"
        return f"{self.kind}:{self.rows}x{self.cols}"

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (1 - N/M); None for tile patterns (any sparsity)."""
        return 1 - self.n / self.m if self.kind == "nm" else None

    @property
    def tile_size(self) -> int:
        return self.rows * self.cols


def parse_pattern(text: str) -> Pattern:
    """``unstructured`` | ``group:RxC`` | ``block:RxC`` | ``nm:N:M`` as a `Pattern`.

    Raises:
        UsageError: anything else (one line naming the accepted forms).
    """
    t = text.strip().lower()
    if t == "unstructured":
        return Pattern("unstructured")
    tile = re.fullmatch(r"(group|block):(\d+)x(\d+)", t)
    if tile:
        kind, r, c = tile.group(1), int(tile.group(2)), int(tile.group(3))
        if r < 1 or c < 1:
            raise UsageError(f"--pattern {text}: tile sizes must be >= 1")
        if kind == "group" and r * c > 8:
            raise UsageError(f"--pattern {text}: a group has at most 8 weights (use block:{r}x{c})")
        if r * c == 1:
            raise UsageError(f"--pattern {text}: a 1x1 tile is --pattern unstructured")
        return Pattern(kind, r, c)
    nm = re.fullmatch(r"nm:(\d+):(\d+)", t)
    if nm:
        n, m = int(nm.group(1)), int(nm.group(2))
        if not 0 < n < m:
            raise UsageError(f"--pattern {text}: N:M needs 0 < N < M")
        return Pattern("nm", 1, m, n, m)
    raise UsageError(f"bad --pattern {text!r}: expected {PATTERN_HELP}")


# ---------------------------------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------------------------------
def tile_scores(scores: np.ndarray, pattern: Pattern) -> tuple[np.ndarray, np.ndarray]:
    """Per tile of the ``[rows, cols]`` element `scores`: the mean squared score, and the tile's size.

    Squares, because the output error of removing a unit is a sum of squares (the OBS saliency
    w^2 / [H^-1]_jj is already a square: pass its square root); the mean, so that the smaller tiles at the
    matrix's edges compete on equal terms (their sums would be lower just for their size). Returns two
    arrays of shape ``[ceil(rows/R), ceil(cols/C)]``.
    """
    r, c = pattern.rows, pattern.cols
    nr, nc = -(-scores.shape[0] // r), -(-scores.shape[1] // c)
    padded = np.zeros((nr * r, nc * c))
    padded[: scores.shape[0], : scores.shape[1]] = np.square(scores, dtype=np.float64)
    ones = np.zeros((nr * r, nc * c))
    ones[: scores.shape[0], : scores.shape[1]] = 1
    sums = padded.reshape(nr, r, nc, c).sum(axis=(1, 3))
    sizes = ones.reshape(nr, r, nc, c).sum(axis=(1, 3))
    return sums / sizes, sizes


def expand_tiles(keep_tiles: np.ndarray, pattern: Pattern, shape: tuple[int, int]) -> np.ndarray:
    """A tile-level keep mask broadcast to the element mask of a ``shape`` matrix."""
    full = np.repeat(np.repeat(keep_tiles, pattern.rows, axis=0), pattern.cols, axis=1)
    return full[: shape[0], : shape[1]]


def pick_lowest(values: np.ndarray, count: int) -> np.ndarray:
    """Boolean array: True for the `count` lowest `values` (ties broken by position, deterministic)."""
    out = np.zeros(values.shape, bool)
    if count > 0:
        order = np.argsort(values, axis=None, kind="stable")[:count]
        out.flat[order] = True
    return out


def tile_mask(scores: np.ndarray, pattern: Pattern, sparsity: float) -> np.ndarray:
    """Keep mask (True = kept) of a ``[rows, cols]`` matrix: the lowest-scoring tiles zeroed, as many as make
    `sparsity` of the weights zero (tile counts rounded to the nearest; exact when tiles divide the matrix)."""
    sums, sizes = tile_scores(scores, pattern)
    count = tiles_for(sizes, sums, sparsity)
    return expand_tiles(~pick_lowest(sums, count), pattern, scores.shape)


def tiles_for(sizes: np.ndarray, sums: np.ndarray, sparsity: float) -> int:
    """How many of the lowest tiles to zero so that the zeroed weights come closest to `sparsity` of them."""
    order = np.argsort(sums, axis=None, kind="stable")
    cum = np.concatenate([[0.0], np.cumsum(sizes.flat[order])])
    target = sparsity * float(sizes.sum())
    return int(np.argmin(np.abs(cum - target)))


# ---------------------------------------------------------------------------------------------------
# N:M
# ---------------------------------------------------------------------------------------------------
def nm_mask(scores: np.ndarray, pattern: Pattern) -> np.ndarray:
    """Keep mask of a ``[rows, cols]`` matrix: in each run of M reduction positions, the N highest scores."""
    rows, cols = scores.shape
    m, n = pattern.m, pattern.n
    full = cols // m * m
    keep = np.ones(scores.shape, bool)
    if full:
        runs = scores[:, :full].reshape(rows, full // m, m)
        drop = np.argsort(runs, axis=2, kind="stable")[:, :, : m - n]  # the M-N lowest of every run
        k = np.ones(runs.shape, bool)
        np.put_along_axis(k, drop, False, axis=2)
        keep[:, :full] = k.reshape(rows, full)
    tail = cols - full
    if tail > n:
        part = scores[:, full:]
        drop = np.argsort(part, axis=1, kind="stable")[:, : tail - n]
        k = np.ones(part.shape, bool)
        np.put_along_axis(k, drop, False, axis=1)
        keep[:, full:] = k
    return keep


def mask_for(scores: np.ndarray, pattern: Pattern, sparsity: float) -> np.ndarray:
    """The keep mask of one layer's ``[rows, cols]`` element scores for `pattern` at `sparsity`."""
    if pattern.kind == "nm":
        return nm_mask(scores, pattern)
    return tile_mask(scores, pattern, sparsity)


# ---------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------
def check_mask(keep: np.ndarray, pattern: Pattern) -> bool:
    """Whether a ``[rows, cols]`` keep mask has the pattern's structure.

    N:M: at most N kept in every run of M reduction positions (and in the trailing run). Tiles: every tile
    is all kept or all zeroed. Unstructured: always.
    """
    if pattern.kind == "unstructured":
        return True
    rows, cols = keep.shape
    if pattern.kind == "nm":
        m, n = pattern.m, pattern.n
        full = cols // m * m
        if full and keep[:, :full].reshape(rows, full // m, m).sum(axis=2).max(initial=0) > n:
            return False
        return not (cols > full and keep[:, full:].sum(axis=1).max(initial=0) > n)
    kept, _ = tile_scores(keep.astype(np.float64), pattern)
    return bool(np.all((kept == 0) | (kept == 1)))


def zero_tiles(values: np.ndarray, pattern: Pattern) -> int:
    """Weights in units the pattern counts as removed: whole zero tiles, or the zeros of N:M runs."""
    if pattern.kind in ("unstructured", "nm"):
        return int(np.count_nonzero(values == 0))
    nonzero, sizes = tile_scores((values != 0).astype(np.float64), pattern)
    return int(sizes[nonzero == 0].sum())
