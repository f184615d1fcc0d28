"""The x86 / AArch64 / wasm block-sparse matmul kernel with output blocks (``bn > 1``): ``Y = X @ W + b``.

:func:`.tvm_sparse_conv.cpu_conv_kernel` handles a matmul as a 1x1 convolution, but its generality costs: every
input load decodes the reduction index into (kh, kw, c) with integer divisions, a dozen scalar instructions
per vector FMA. On MiniLM's 128x384 @ 384x384 at 90% block sparsity (``1x16`` blocks) the sparse kernel was
then no faster than the dense one. This kernel addresses ``x[row, k]`` directly.

Work item: one block column ``j`` (``bn`` outputs) by a tile of ``rows`` input rows; block columns are the
outer index so consecutive work items of a thread reuse the column's blocks (read from L1) over every row
tile. For each stored block and each of its ``bk`` reduction rows: one weight vector load per ``lanes``
outputs, ``rows`` broadcasts of the input, ``rows x ceil(bn / lanes)`` FMAs into the register tile. With few
rows (batch 1) the blocks are split over ``chains`` independent accumulator tiles so consecutive FMAs do not
wait on each other. The epilogue is applied as the tile is written: ``+ bias``, ``+ residual`` (a tensor of
the output's shape: a transformer's skip connection), ``clip(lo, hi)`` (ReLU / ReLU6), then GELU (BERT's
erf form). Fused there, the residual add and the GELU of a BERT layer cost no pass over memory of their own
(MiniLM-L6, seq 128, 90% blocks, 1 thread: the separate GELU and bias + residual kernels took 0.35 of
7.8 ms). Start reading at :func:`cpu_block_matmul_kernel`.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .sparse_formats import BSR

__all__ = ["cpu_block_matmul_kernel", "gelu", "rows_tile"]

#: Multiply-adds (stored) before a kernel's tiles run in parallel.
PARALLEL_MIN_WORK = 1 << 16
#: Most input rows in one register tile.
MAX_ROWS = 16
#: Independent accumulator FMAs in flight needed to cover the FMA latency (latency 4 x 2 pipes).
IN_FLIGHT = 8
_BIG = 3.0e38
_INV_SQRT2 = 0.7071067811865476


def rows_tile(extent: int, bn: int, lanes: int, registers: int, max_rows: int = MAX_ROWS) -> int:
    """Largest row tile (at most `max_rows`) dividing ``extent`` whose accumulators + one weight vector + one
    broadcast fit in the vector registers."""
    n_vec = -(-bn // lanes)
    best = 1
    for r in range(1, min(extent, max_rows) + 1):
        if extent % r == 0 and r * n_vec + n_vec + 1 <= registers:
            best = r
    return best


def gelu(v: tirx.PrimExpr) -> tirx.PrimExpr:
    """BERT's exact GELU, ``v * (erf(v / sqrt 2) + 1) / 2`` (``erf`` becomes a vector polynomial when lowered,
    :mod:`.tvm_fastmath`)."""
    return v * (T.erf(v * T.float32(_INV_SQRT2)) + T.float32(1)) * T.float32(0.5)


def cpu_block_matmul_kernel(
    m: int,
    bsr: BSR,
    lanes: int,
    registers: int,
    lo: float = -_BIG,
    hi: float = _BIG,
    residual: bool = False,
    act: str = "",
) -> tirx.PrimFunc:
    """``y[0, 0, m, n] = act(clip(x[0, 0, m, k] @ W + bias [+ res], lo, hi))`` for a BSR weight with ``bn > 1``.

    The 4-D ``[1, 1, rows, features]`` buffers are the ones :func:`.tvm_sparse.sparsify` passes (the same
    call as the 1x1-conv form); the reshapes around the call cost nothing. With ``residual`` the kernel takes
    one more input ``res`` (shape of ``y``, before ``y``); ``act`` is ``""`` or ``"gelu"``.
    """
    k, n = bsr.shape
    bk, bn = bsr.block
    nnzb, nb = bsr.data.shape[0], n // bn
    n_vec = -(-bn // lanes)
    rows = rows_tile(m, bn, lanes, registers)
    chains = max(1, min(4, IN_FLIGHT // (rows * n_vec), (registers - n_vec - 1) // (rows * n_vec)))
    row_tiles = m // rows
    tiles = nb * row_tiles
    outer = T.parallel if bsr.nnz_blocks * bk * bn * m >= PARALLEL_MIN_WORK else T.serial
    finish = gelu if act == "gelu" else (lambda v: v)
    if act not in ("", "gelu"):
        raise ValueError(f"unknown activation {act!r}")

    @T.macro(hygienic=False)
    def accumulate(x, data, indices, indptr, acc, p):
        for a in T.unroll(chains):
            for t in T.unroll(rows):
                for v in T.vectorized(bn):
                    acc[a, t, v] = T.float32(0)
        for e4 in T.serial((indptr[p // row_tiles + 1] - indptr[p // row_tiles]) // chains):
            for a in T.unroll(chains):
                for kk in T.unroll(bk):
                    for t in T.unroll(rows):
                        for v in T.vectorized(bn):
                            acc[a, t, v] = (
                                acc[a, t, v]
                                + x[
                                    0,
                                    0,
                                    p % row_tiles * rows + t,
                                    indices[indptr[p // row_tiles] + e4 * chains + a] * bk + kk,
                                ]
                                * data[indptr[p // row_tiles] + e4 * chains + a, kk, v]
                            )
        for e in T.serial(
            indptr[p // row_tiles] + (indptr[p // row_tiles + 1] - indptr[p // row_tiles]) // chains * chains,
            indptr[p // row_tiles + 1],
        ):
            for kk in T.unroll(bk):
                for t in T.unroll(rows):
                    for v in T.vectorized(bn):
                        acc[0, t, v] = (
                            acc[0, t, v]
                            + x[0, 0, p % row_tiles * rows + t, indices[e] * bk + kk] * data[e, kk, v]
                        )
        for a in T.unroll(1, chains):
            for t in T.unroll(rows):
                for v in T.vectorized(bn):
                    acc[0, t, v] = acc[0, t, v] + acc[a, t, v]

    if residual:

        @T.prim_func(private=True)
        def kernel_res(
            x: T.Buffer((1, 1, m, k), "float32"),
            data: T.Buffer((nnzb, bk, bn), "float32"),
            indices: T.Buffer((nnzb,), "int32"),
            indptr: T.Buffer((nb + 1,), "int32"),
            bias: T.Buffer((n,), "float32"),
            res: T.Buffer((1, 1, m, n), "float32"),
            y: T.Buffer((1, 1, m, n), "float32"),
        ):
            T.func_attr({"tirx.noalias": True})
            for p in outer(tiles):
                acc = T.alloc_buffer((chains, rows, bn), "float32", scope="local")
                accumulate(x, data, indices, indptr, acc, p)
                for t in T.unroll(rows):
                    for v in T.vectorized(bn):
                        y[0, 0, p % row_tiles * rows + t, p // row_tiles * bn + v] = finish(
                            T.min(
                                T.max(
                                    acc[0, t, v]
                                    + bias[p // row_tiles * bn + v]
                                    + res[0, 0, p % row_tiles * rows + t, p // row_tiles * bn + v],
                                    T.float32(lo),
                                ),
                                T.float32(hi),
                            )
                        )

        return kernel_res

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((1, 1, m, k), "float32"),
        data: T.Buffer((nnzb, bk, bn), "float32"),
        indices: T.Buffer((nnzb,), "int32"),
        indptr: T.Buffer((nb + 1,), "int32"),
        bias: T.Buffer((n,), "float32"),
        y: T.Buffer((1, 1, m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for p in outer(tiles):
            acc = T.alloc_buffer((chains, rows, bn), "float32", scope="local")
            accumulate(x, data, indices, indptr, acc, p)
            for t in T.unroll(rows):
                for v in T.vectorized(bn):
                    y[0, 0, p % row_tiles * rows + t, p // row_tiles * bn + v] = finish(
                        T.min(
                            T.max(acc[0, t, v] + bias[p // row_tiles * bn + v], T.float32(lo)), T.float32(hi)
                        )
                    )

    return kernel
