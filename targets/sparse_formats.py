"""Compressed sparse weight formats for the sparse kernels: block-sparse rows (BSR) over a ``[K, N]`` weight
(reduction axis K first, output axis N last, the layout the dense kernels use), and the choice of a block
shape for a weight that was pruned with some pattern.

A weight ``W[K, N]`` is cut into blocks of ``bk`` reduction rows by ``bn`` output columns. For each *block
column* ``j`` (outputs ``j*bn .. j*bn+bn``) the format lists the non-zero blocks:

    indptr[j] .. indptr[j+1]   the entries of block column j
    indices[e]                 the block row (K block) of entry e
    data[e, :, :]              the block itself, ``[bk, bn]`` (outputs innermost: one vector per reduction row)

so a kernel walks a block column and, per reduction row of each non-zero block, does one broadcast of an input
value and one vector FMA over ``bn`` outputs (see :mod:`.tvm_sparse`). Every pattern is a BSR of some block
shape: block sparsity ``block:16x1`` (16 outputs by 1 input, ONNX ``[out, in]`` notation) is ``bk=1, bn=16``;
group sparsity along the reduction axis (``group:1x4``, runs of 4 inputs for one output) is ``bk=4, bn=1``;
``group:4x1`` (4 outputs share one input) is ``bk=1, bn=4``.

:func:`choose_block` picks the storage block for a weight from the zero pattern it actually has (the pattern
the pruner used is not recorded in plain ONNX): the block that stores the fewest explicit zeros per useful
FMA, preferring whole vectors along N. Start reading at :class:`BSR`. Nothing here imports tvm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BSR", "BlockChoice", "block_density", "choose_block", "sparsity", "to_bsr"]

#: Reduction-axis block heights tried by :func:`choose_block`.
BLOCK_ROWS = (1, 2, 4, 8, 16)
#: Estimated cost of one stored element of a run in the pixel-vectorised group kernel, relative to dense
#: (plus the run's index load, shared by its ``bk`` elements).
PIXEL_RUN_COST = 1.1
#: Cost per stored element, relative to dense, of the output-row-blocked kernel (:mod:`.tvm_sparse_rows`) by
#: block width: 0.69 loads per FMA at 8 outputs, 0.88 at 4, against the dense tile's 0.5
#: (``bench/sparse_pointwise_results.txt``: ``group:8x1`` at 30% 1.3-1.5x over dense on 56x56 / 28x28 layers).
ROW_BLOCK_COST = {8: 1.1, 4: 1.25}


@dataclass(frozen=True)
class BSR:
    """A ``[K, N]`` weight as block-sparse columns (see the module docstring).

    Attributes:
        shape: ``(K, N)`` of the dense weight.
        block: ``(bk, bn)``.
        data: ``[nnz_blocks, bk, bn]`` float values.
        indices: ``[nnz_blocks]`` int32 K-block index of each entry.
        indptr: ``[N / bn + 1]`` int32 offsets of each block column's entries.
    """

    shape: tuple[int, int]
    block: tuple[int, int]
    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray

    @property
    def nnz_blocks(self) -> int:
        return int(self.indptr[-1])

    @property
    def density(self) -> float:
        """Fraction of blocks stored."""
        k, n = self.shape
        bk, bn = self.block
        return self.nnz_blocks / max(1, (k // bk) * (n // bn))

    @property
    def nbytes(self) -> int:
        """Bytes of the three arrays (what the bundle's weights file holds for this weight)."""
        return int(self.data.nbytes + self.indices.nbytes + self.indptr.nbytes)

    def to_dense(self) -> np.ndarray:
        """The ``[K, N]`` weight back (zeros where no block is stored)."""
        k, n = self.shape
        bk, bn = self.block
        blocks = np.zeros((k // bk, n // bn, bk, bn), dtype=self.data.dtype)
        cols = np.repeat(np.arange(n // bn), np.diff(self.indptr))
        blocks[self.indices[: len(cols)], cols] = self.data[: len(cols)]
        return blocks.transpose(0, 2, 1, 3).reshape(k, n)


def _blocks(w: np.ndarray, bk: int, bn: int) -> np.ndarray:
    k, n = w.shape
    return w.reshape(k // bk, bk, n // bn, bn).transpose(0, 2, 1, 3)  # [K/bk, N/bn, bk, bn]


def to_bsr(w: np.ndarray, block: tuple[int, int]) -> BSR:
    """Compress a ``[K, N]`` weight into :class:`BSR` with ``block = (bk, bn)`` (both must divide the axes).

    Raises:
        ValueError: The block does not tile the weight.
    """
    bk, bn = block
    k, n = w.shape
    if k % bk or n % bn:
        raise ValueError(f"block {bk}x{bn} does not tile a {k}x{n} weight")
    blocks = _blocks(w, bk, bn)
    nonzero = np.any(blocks != 0, axis=(2, 3))  # [K/bk, N/bn]
    # column-major walk: entries of block column j are contiguous, in increasing K-block order
    cols, rows = np.nonzero(nonzero.T)
    data = np.ascontiguousarray(blocks[rows, cols])
    indptr = np.zeros(n // bn + 1, dtype=np.int32)
    np.cumsum(np.bincount(cols, minlength=n // bn), out=indptr[1:])
    if data.shape[0] == 0:  # an all-zero weight: one unused zero block (indptr all 0), so no buffer is empty
        data = np.zeros((1, bk, bn), dtype=w.dtype)
        rows = np.zeros(1, dtype=np.int64)
    return BSR((k, n), (bk, bn), data.astype(w.dtype), rows.astype(np.int32), indptr)


def sparsity(w: np.ndarray) -> float:
    """Fraction of exactly-zero elements."""
    return float(np.count_nonzero(w == 0)) / max(1, w.size)


def block_density(w: np.ndarray, block: tuple[int, int]) -> float:
    """Fraction of ``block``-shaped tiles of a ``[K, N]`` weight holding any non-zero."""
    bk, bn = block
    return float(np.mean(np.any(_blocks(w, bk, bn) != 0, axis=(2, 3))))


@dataclass(frozen=True)
class BlockChoice:
    """The storage block chosen for a weight, with its block density and the estimated cost relative to the
    dense kernel (1.0: as slow as dense; below 1: expected to win)."""

    block: tuple[int, int]
    density: float
    relative_cost: float


def choose_block(
    w: np.ndarray, lanes: int, align: int | None = None, pixel_runs: bool = False, row_blocks: bool = False
) -> BlockChoice:
    """Pick the block shape that makes the sparse kernel cheapest for this weight's zero pattern.

    Cost model (per dense FMA, in vector instructions): a stored block of ``bk x bn`` costs ``bk *
    ceil(bn / lanes)`` vector FMAs plus one index load (a run, ``bn == 1``: ``bk / 4 + 1``); the dense kernel costs ``1 / lanes`` per element.
    Narrow blocks (``bn < lanes``) waste lanes; wide blocks store more zeros. The estimate only ranks
    shapes; whether the sparse kernel is kept is decided by measuring it (:mod:`.tvm_sparse_choice`).
    ``align``: block heights must divide it (a conv's input channels: a block never straddles two window
    positions). ``pixel_runs``: runs (``bn == 1``) go to the group kernel that vectorises over pixels
    (:mod:`.tvm_sparse_group` for a matmul or 1x1 conv, :mod:`.tvm_sparse_planes` for KxK, with at least one
    vector of rows), whose FMAs are as wide
    as the dense kernel's but need about one more load each: ``PIXEL_RUN_COST`` per stored element.
    ``row_blocks``: output blocks of 4 or 8 (``bk == 1``; ``group:4x1`` / ``group:8x1``) go to the
    output-row-blocked kernel of a 1x1 conv (:mod:`.tvm_sparse_rows`): ``ROW_BLOCK_COST`` per stored element.
    """
    k, n = w.shape
    widths = [b for b in (4 * lanes, 2 * lanes, lanes, 8, 4, 1) if n % b == 0 and b <= n]
    best: BlockChoice | None = None
    for bn in dict.fromkeys(widths):
        for bk in BLOCK_ROWS:
            if k % bk or (align is not None and align % bk):
                continue
            d = block_density(w, (bk, bn))
            # bn > 1: bk vector FMAs of bn lanes; bn == 1: the run itself is the vector (partial sums), whose
            # cost grows with the run's stored zeros (measured, 768x3072 at 90% in runs of 4: runs of 4 stored
            # 344 us, runs of 16 768 us)
            vec_ops = bk * -(-bn // lanes) + 0.5 if bn > 1 else bk / 4 + 1
            cost = d * vec_ops / (bk * bn) * lanes  # per element, relative to dense (1/lanes each)
            if bn == 1 and bk > 1 and pixel_runs:
                cost = d * (PIXEL_RUN_COST + 0.4 / bk)  # + one index load per run
            if bk == 1 and bn in ROW_BLOCK_COST and row_blocks:
                cost = d * ROW_BLOCK_COST[bn]
            if best is None or cost < best.relative_cost - 1e-9:
                best = BlockChoice((bk, bn), d, cost)
    assert best is not None  # bn = 1 and bk = 1 always tile
    return best
