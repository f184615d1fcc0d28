"""Direct NHWC block-sparse convolution (x86 / AArch64 / wasm) and the block-sparse matmul for CUDA.

* :func:`cpu_conv_kernel`: a direct NHWC convolution (1x1 pointwise and KxK, any stride/dilation, groups 1)
  over a BSR ``[KH*KW*C, N]`` weight. One work item is a tile of ``rows`` neighbouring output pixels of one
  output row by one block column; the reduction index ``k`` is decoded into ``(kh, kw, c)`` once per
  reduction row (im2col without the copy); the accumulator tile lives in registers. The input is
  zero-padded by a separate ``nn.pad``. Matmuls whose blocks are runs along K use it as a 1x1 convolution.
* :func:`cuda_matmul_kernel`: the matmul for CUDA, one thread per output (block column on ``blockIdx.x``,
  input rows on ``blockIdx.y``, the block's ``bn`` outputs on ``threadIdx.x``).

Both end with the fused epilogue ``clip(acc + bias, lo, hi)``. The Relax pass that places them is
:func:`.tvm_sparse.sparsify`.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .sparse_formats import BSR
from .tvm_sparse_matmul import rows_tile

__all__ = ["cpu_conv_kernel", "cuda_matmul_kernel"]

#: Multiply-adds (stored) before a kernel's tiles run in parallel.
PARALLEL_MIN_WORK = 1 << 16
#: Most input rows in one register tile (more unrolls for little gain).
MAX_ROWS = 8
#: Independent accumulators per output vector (covers the FMA latency when the row tile is short).
CHAINS = 4
_BIG = 3.0e38


def cpu_conv_kernel(
    x_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    conv: tuple,
    bsr: BSR,
    lanes: int,
    registers: int,
    lo: float = -_BIG,
    hi: float = _BIG,
) -> tirx.PrimFunc:
    """Direct NHWC convolution over an already padded input ``x`` with a BSR ``[KH*KW*C, N]`` weight.

    Two inner loops: blocks with ``bn > 1`` vectorise along the block's outputs (one broadcast + one vector
    FMA per reduction row and tile row); blocks with ``bn == 1`` (runs along the reduction axis, group
    sparsity ``1xR``) vectorise along the run (contiguous input channels) into per-lane partial sums, added up
    once per output. ``bk`` divides the input channels, so a block never straddles two window positions.
    """
    nb_, hp, wp, c = x_shape
    _, oh, ow, n = out_shape
    kh, kw, strides, _pad, dilation = conv
    sh, sw = strides
    dh, dw = dilation
    bk, bn = bsr.block
    assert kh * kw * c == bsr.shape[0] and c % bk == 0
    nnzb, nb = bsr.data.shape[0], n // bn
    by_outputs = bn > 1 or bk == 1
    width = bn if by_outputs else bk
    rows = rows_tile(ow, width, lanes, registers, MAX_ROWS)
    # independent accumulator chains: with a short tile the FMAs of consecutive blocks would otherwise wait
    # on each other (4-cycle latency); blocks are taken `chains` at a time, each into its own accumulators
    chains = max(1, CHAINS // rows)
    per_row = ow // rows
    tiles = nb_ * oh * per_row * nb
    outer = T.parallel if bsr.nnz_blocks * bk * bn * nb_ * oh * ow >= PARALLEL_MIN_WORK else T.serial
    img, win = nb * per_row * oh, nb * per_row  # tile index p -> (image, output row, column tile, block col)

    if by_outputs:

        @T.prim_func(private=True)
        def kernel(
            x: T.Buffer((nb_, hp, wp, c), "float32"),
            data: T.Buffer((nnzb, bk, bn), "float32"),
            indices: T.Buffer((nnzb,), "int32"),
            indptr: T.Buffer((nb + 1,), "int32"),
            bias: T.Buffer((n,), "float32"),
            y: T.Buffer((nb_, oh, ow, n), "float32"),
        ):
            T.func_attr({"tirx.noalias": True})
            for p in outer(tiles):
                acc = T.alloc_buffer((chains, rows, bn), "float32", scope="local")
                for a in T.unroll(chains):
                    for t in T.unroll(rows):
                        for v in T.vectorized(bn):
                            acc[a, t, v] = T.float32(0)
                for e4 in T.serial((indptr[p % nb + 1] - indptr[p % nb]) // chains):
                    for a in T.unroll(chains):
                        for kk in T.unroll(bk):
                            for t in T.unroll(rows):
                                for v in T.vectorized(bn):
                                    acc[a, t, v] = (
                                        acc[a, t, v]
                                        + x[
                                            p // img,
                                            p // win % oh * sh
                                            + indices[indptr[p % nb] + e4 * chains + a] * bk // (kw * c) * dh,
                                            (p // nb % per_row * rows + t) * sw
                                            + indices[indptr[p % nb] + e4 * chains + a] * bk // c % kw * dw,
                                            indices[indptr[p % nb] + e4 * chains + a] * bk % c + kk,
                                        ]
                                        * data[indptr[p % nb] + e4 * chains + a, kk, v]
                                    )
                for e in T.serial(
                    indptr[p % nb] + (indptr[p % nb + 1] - indptr[p % nb]) // chains * chains,
                    indptr[p % nb + 1],
                ):
                    for kk in T.unroll(bk):
                        for t in T.unroll(rows):
                            for v in T.vectorized(bn):
                                acc[0, t, v] = (
                                    acc[0, t, v]
                                    + x[
                                        p // img,
                                        p // win % oh * sh + indices[e] * bk // (kw * c) * dh,
                                        (p // nb % per_row * rows + t) * sw + indices[e] * bk // c % kw * dw,
                                        indices[e] * bk % c + kk,
                                    ]
                                    * data[e, kk, v]
                                )
                for a in T.unroll(1, chains):
                    for t in T.unroll(rows):
                        for v in T.vectorized(bn):
                            acc[0, t, v] = acc[0, t, v] + acc[a, t, v]
                for t in T.unroll(rows):
                    for v in T.vectorized(bn):
                        y[p // img, p // win % oh, p // nb % per_row * rows + t, p % nb * bn + v] = T.min(
                            T.max(acc[0, t, v] + bias[p % nb * bn + v], T.float32(lo)), T.float32(hi)
                        )

        return kernel

    @T.prim_func(private=True)
    def kernel_runs(
        x: T.Buffer((nb_, hp, wp, c), "float32"),
        data: T.Buffer((nnzb, bk, 1), "float32"),
        indices: T.Buffer((nnzb,), "int32"),
        indptr: T.Buffer((nb + 1,), "int32"),
        bias: T.Buffer((n,), "float32"),
        y: T.Buffer((nb_, oh, ow, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for p in outer(tiles):
            acc = T.alloc_buffer((chains, rows, bk), "float32", scope="local")
            total = T.alloc_buffer((rows,), "float32", scope="local")
            for a in T.unroll(chains):
                for t in T.unroll(rows):
                    for kk in T.vectorized(bk):
                        acc[a, t, kk] = T.float32(0)
            for e4 in T.serial((indptr[p % nb + 1] - indptr[p % nb]) // chains):
                for a in T.unroll(chains):
                    for t in T.unroll(rows):
                        for kk in T.vectorized(bk):
                            acc[a, t, kk] = (
                                acc[a, t, kk]
                                + x[
                                    p // img,
                                    p // win % oh * sh
                                    + indices[indptr[p % nb] + e4 * chains + a] * bk // (kw * c) * dh,
                                    (p // nb % per_row * rows + t) * sw
                                    + indices[indptr[p % nb] + e4 * chains + a] * bk // c % kw * dw,
                                    indices[indptr[p % nb] + e4 * chains + a] * bk % c + kk,
                                ]
                                * data[indptr[p % nb] + e4 * chains + a, kk, 0]
                            )
            for e in T.serial(
                indptr[p % nb] + (indptr[p % nb + 1] - indptr[p % nb]) // chains * chains, indptr[p % nb + 1]
            ):
                for t in T.unroll(rows):
                    for kk in T.vectorized(bk):
                        acc[0, t, kk] = (
                            acc[0, t, kk]
                            + x[
                                p // img,
                                p // win % oh * sh + indices[e] * bk // (kw * c) * dh,
                                (p // nb % per_row * rows + t) * sw + indices[e] * bk // c % kw * dw,
                                indices[e] * bk % c + kk,
                            ]
                            * data[e, kk, 0]
                        )
            for t in T.unroll(rows):
                total[t] = bias[p % nb]
                for a in T.serial(chains):
                    for kk in T.serial(bk):
                        total[t] = total[t] + acc[a, t, kk]
                y[p // img, p // win % oh, p // nb % per_row * rows + t, p % nb] = T.min(
                    T.max(total[t], T.float32(lo)), T.float32(hi)
                )

    return kernel_runs


def cuda_matmul_kernel(m: int, bsr: BSR, lo: float = -_BIG, hi: float = _BIG) -> tirx.PrimFunc:
    """The BSR matmul for CUDA: one thread per output element, the block columns across thread blocks."""
    k, n = bsr.shape
    bk, bn = bsr.block
    nnzb, nb = bsr.data.shape[0], n // bn

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((m, k), "float32"),
        data: T.Buffer((nnzb, bk, bn), "float32"),
        indices: T.Buffer((nnzb,), "int32"),
        indptr: T.Buffer((nb + 1,), "int32"),
        bias: T.Buffer((n,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for j in T.thread_binding(nb, thread="blockIdx.x"):
            for i in T.thread_binding(m, thread="blockIdx.y"):
                for v in T.thread_binding(bn, thread="threadIdx.x"):
                    acc = T.alloc_buffer((1,), "float32", scope="local")
                    acc[0] = T.float32(0)
                    for e in T.serial(indptr[j], indptr[j + 1]):
                        for kk in T.serial(bk):
                            acc[0] = acc[0] + x[i, indices[e] * bk + kk] * data[e, kk, v]
                    y[i, j * bn + v] = T.min(T.max(acc[0] + bias[j * bn + v], T.float32(lo)), T.float32(hi))

    return kernel
