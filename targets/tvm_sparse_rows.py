"""Output-row-blocked group-sparse kernel for 1x1 convolutions and matmuls (``group:4x1`` / ``group:8x1``:
``bn`` consecutive output channels share each kept input channel; BSR blocks ``1 x bn``), x86 / wasm.

XNNPACK's ``mr x nr`` sparse SpMM layout, in TensorIR. Per stored block (one kept input channel ``c`` of
``bn`` outputs) the kernel does one vector load of the channel-major input per pixel vector and broadcasts
each of the ``bn`` weights into ``pixel_vectors`` FMAs: with ``bn = 8`` and 2 pixel vectors, 2 loads + 8
broadcasts + 1 index feed 16 FMAs (0.69 loads per FMA; the dense register tile of 4 weight vectors x 4
pixels: 0.5), where the ``group:1x4`` kernel (:mod:`.tvm_sparse_group`, runs along K) needs 13 loads per 8
FMAs (1.6: load-bound).

Two phases in one PrimFunc:

1. the NHWC input (any stride) is transposed once per call into a channel-major scratch ``xt[K, P]`` (``P``
   output pixels), so every stored index addresses one contiguous row of pixels;
2. work item = a tile of ``pixel_vectors * lanes`` pixels by one block column: one ``[bn, lanes]``
   accumulator buffer per pixel vector (separate *global-scope* buffers under 1 KiB: LowerTVMBuiltin puts
   those on the stack, where LLVM keeps them in registers; a ``"local"`` buffer, or one of 1 KiB, becomes a
   ``TVMBackendAllocWorkspace`` call per work item, which made the first version 2x slower), then
   ``clip(acc + bias, lo, hi)`` stored into the NHWC output, ``bn`` contiguous floats per pixel (a
   vectorised store over the block: LLVM transposes the accumulators with ``vpermt2ps`` shuffles; scalar
   stores were 10-25% slower). Pixel tiles are the outer index, so a thread's consecutive work items reuse
   the tile's ``xt`` rows over every block column. The last tile is moved back to end at the last pixel.

Measured (``bench/sparse_pointwise.py``, results in ``bench/sparse_pointwise_results.txt``; AVX-512, 1 thread,
MobileNet-v1's pointwise shapes): ``group:8x1`` at 30% runs 1.3-1.5x faster than the dense TVM kernel on the
56x56 and 28x28 layers, ~1.0x on 14x14 and 0.7x on the 112x112x32 and 7x7 layers: the transposes cost
``(K + N) * P`` element moves (a real share at K = 32), the 7x7 layers compute 64 pixels for 49, and with
K >= 512 the ``xt`` tile and the weights live in L2. A per-layer choice (:mod:`.tvm_sparse_choice`) keeps
those dense. Start reading at :func:`cpu_rows_kernel`.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .sparse_formats import BSR

__all__ = ["cpu_rows_kernel", "pixel_vectors_for", "rows_kernel_applies"]

#: Stored multiply-adds before a kernel's tiles run in parallel.
PARALLEL_MIN_WORK = 1 << 16
_BIG = 3.0e38


def pixel_vectors_for(bn: int, lanes: int, registers: int) -> int:
    """Pixel vectors per tile: 2 when the ``bn x 2`` accumulators, the 2 input vectors and one broadcast fit
    the register file, else 1. (Measured on AVX-512, 28x28x256->256 at 30%: ``bn=8`` with 2 pixel vectors
    1.28x dense, with 3 1.09x; ``bn=4`` with 2 1.08x, with 4 0.67x: wider tiles spill or thrash L1.)"""
    return 2 if bn * 2 + 2 + 1 <= registers else 1


def rows_kernel_applies(bsr: BSR, pixels: int, lanes: int, kernel_hw: tuple[int, int]) -> bool:
    """Whether :func:`cpu_rows_kernel` takes this weight: blocks of 2-8 outputs (``bk == 1``, ``1 < bn <=
    8``; wider output blocks are whole vectors for :mod:`.tvm_sparse_conv`), a 1x1 window, and at least one
    pixel vector."""
    bk, bn = bsr.block
    return bk == 1 and 1 < bn <= 8 and tuple(kernel_hw) == (1, 1) and pixels >= lanes


def cpu_rows_kernel(
    x_shape: tuple[int, int, int, int],
    out_shape: tuple[int, int, int, int],
    strides: tuple[int, int],
    bsr: BSR,
    lanes: int,
    registers: int = 32,
    lo: float = -_BIG,
    hi: float = _BIG,
    pixel_vectors: int | None = None,
) -> tirx.PrimFunc:
    """``y[n, i, j, :] = clip(x[n, i*sh, j*sw, :] @ W + bias, lo, hi)`` for a ``[K, N]`` BSR weight of
    ``1 x bn`` blocks (a matmul is the ``(1, 1, m, k)`` case). Arguments: ``x, data [nnzb, 1, bn], indices
    [nnzb], indptr [N / bn + 1], bias [N], y``: the :class:`.sparse_formats.BSR` arrays as they are."""
    nb_, hp, wp, k = x_shape
    _, oh, ow, n = out_shape
    sh, sw = strides
    bk, bn = bsr.block
    assert bk == 1 and n % bn == 0
    nnzb = bsr.data.shape[0]
    ncols = n // bn
    pixels = nb_ * oh * ow
    pv = min(4, pixel_vectors or pixel_vectors_for(bn, lanes, registers))  # 4 accumulator buffers below
    while pv > 1 and pixels < pv * lanes:
        pv -= 1
    tile = pv * lanes
    tiles = -(-pixels // tile)
    last = pixels - tile
    img = oh * ow
    work = bsr.nnz_blocks * bn * pixels
    outer = T.parallel if work >= PARALLEL_MIN_WORK else T.serial

    # accumulators: one [bn, lanes] buffer per pixel vector (a local buffer of 1024 bytes or more goes to a
    # heap workspace, allocated per work item; separate buffers stay on the stack and in registers)
    pv1, pv2, pv3 = int(pv > 1), int(pv > 2), int(pv > 3)
    sizes = [bn if i < pv else 1 for i in range(4)]  # unused ones: one vector

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((nb_, hp, wp, k), "float32"),
        data: T.Buffer((nnzb, 1, bn), "float32"),
        indices: T.Buffer((nnzb,), "int32"),
        indptr: T.Buffer((ncols + 1,), "int32"),
        bias: T.Buffer((n,), "float32"),
        y: T.Buffer((nb_, oh, ow, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        xt = T.alloc_buffer((k * pixels,), "float32")
        yf = T.decl_buffer((pixels * n,), "float32", data=y.data)
        for p in outer(tiles):
            q0 = T.meta_var(T.min(p * tile, last))
            for c in T.serial(k):
                for t in T.vectorized(tile):
                    xt[c * pixels + q0 + t] = x[
                        (q0 + t) // img, (q0 + t) % img // ow * sh, (q0 + t) % ow * sw, c
                    ]
        for pj in outer(tiles * ncols):
            q1 = T.meta_var(T.min(pj // ncols * tile, last))
            j = T.meta_var(pj % ncols)
            a0 = T.alloc_buffer((bn, lanes), "float32")
            a1 = T.alloc_buffer((sizes[1], lanes), "float32")
            a2 = T.alloc_buffer((sizes[2], lanes), "float32")
            a3 = T.alloc_buffer((sizes[3], lanes), "float32")
            for r in T.unroll(bn):
                for t in T.vectorized(lanes):
                    a0[r, t] = T.float32(0)
                for _u in T.unroll(pv1):
                    for t in T.vectorized(lanes):
                        a1[r, t] = T.float32(0)
                for _u in T.unroll(pv2):
                    for t in T.vectorized(lanes):
                        a2[r, t] = T.float32(0)
                for _u in T.unroll(pv3):
                    for t in T.vectorized(lanes):
                        a3[r, t] = T.float32(0)
            for e in T.serial(indptr[j], indptr[j + 1]):
                row = T.meta_var(indices[e] * pixels + q1)
                for r in T.unroll(bn):
                    for t in T.vectorized(lanes):
                        a0[r, t] = a0[r, t] + xt[row + t] * data[e, 0, r]
                    for _u in T.unroll(pv1):
                        for t in T.vectorized(lanes):
                            a1[r, t] = a1[r, t] + xt[row + lanes + t] * data[e, 0, r]
                    for _u in T.unroll(pv2):
                        for t in T.vectorized(lanes):
                            a2[r, t] = a2[r, t] + xt[row + 2 * lanes + t] * data[e, 0, r]
                    for _u in T.unroll(pv3):
                        for t in T.vectorized(lanes):
                            a3[r, t] = a3[r, t] + xt[row + 3 * lanes + t] * data[e, 0, r]
            for t in T.unroll(lanes):
                for r in T.vectorized(bn):
                    yf[(q1 + t) * n + j * bn + r] = T.min(
                        T.max(a0[r, t] + bias[j * bn + r], T.float32(lo)), T.float32(hi)
                    )
            for _u in T.unroll(pv1):
                for t in T.unroll(lanes):
                    for r in T.vectorized(bn):
                        yf[(q1 + lanes + t) * n + j * bn + r] = T.min(
                            T.max(a1[r, t] + bias[j * bn + r], T.float32(lo)), T.float32(hi)
                        )
            for _u in T.unroll(pv2):
                for t in T.unroll(lanes):
                    for r in T.vectorized(bn):
                        yf[(q1 + 2 * lanes + t) * n + j * bn + r] = T.min(
                            T.max(a2[r, t] + bias[j * bn + r], T.float32(lo)), T.float32(hi)
                        )
            for _u in T.unroll(pv3):
                for t in T.unroll(lanes):
                    for r in T.vectorized(bn):
                        yf[(q1 + 3 * lanes + t) * n + j * bn + r] = T.min(
                            T.max(a3[r, t] + bias[j * bn + r], T.float32(lo)), T.float32(hi)
                        )

    return kernel
