"""Group-sparse kernel for runs along the reduction axis (``group:1x4``: 4 consecutive inputs of one output
are zero or not together; BSR blocks ``bk x 1``), for matmuls and 1x1 convolutions (any stride), x86 / wasm.
KxK convolutions with such runs go to :mod:`.tvm_sparse_planes` (same layout, no per-tile transpose).

The layout of SparseByteNN / XNNPACK's sparse kernels: the output tile is ``pixels`` rows (pixels) of one
output channel, held as vectors *over the pixels*; for each stored group of the channel the kernel
broadcasts each of the group's ``bk`` weights and FMAs it into the pixel vectors of the matching inputs. That
needs the inputs channel-major (``[K, pixels]``), so each work item first transposes its tile of the NHWC
input (``pixels x K`` floats, in L1) and then walks every output channel's groups (CSR over groups:
``indptr`` per channel, ``indices`` the group, ``data`` the ``bk`` weights). Groups are taken ``chains`` at a
time into independent accumulators (the FMA latency), each of the ``bk`` weights of a group into its own.
The per-channel result (``+ bias``, clipped) is stored as a column of the NHWC output.

Per FMA: one vector load of the transposed tile (L1) and, per ``pixel_vectors`` FMAs, one weight broadcast;
the dense register-tiled kernel needs about half as many loads per FMA, so the sparse kernel wins once
roughly half the groups are zero (measured per layer by :mod:`.tvm_sparse_choice`, which keeps the layer
dense otherwise). Start reading at :func:`cpu_group_kernel`.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .sparse_formats import BSR

__all__ = ["cpu_group_kernel", "group_kernel_applies"]

#: Stored multiply-adds before a kernel's tiles run in parallel.
PARALLEL_MIN_WORK = 1 << 16
#: Independent group chains (each ``bk`` accumulators of ``pixel_vectors`` vectors).
CHAINS = 2
#: Pixel vectors per tile.
PIXEL_VECTORS = 2
_BIG = 3.0e38


def group_kernel_applies(bsr: BSR, pixels: int, lanes: int, kernel_hw: tuple[int, int]) -> bool:
    """Whether the pixel-vectorised group kernels take this weight (:func:`cpu_group_kernel` for a 1x1 window,
    :func:`.tvm_sparse_planes.cpu_planes_kernel` for KxK): runs along K (``bn == 1``, ``bk > 1``) that never
    straddle two kernel taps (``bk`` divides the channels), and at least one pixel vector."""
    bk, bn = bsr.block
    taps = int(kernel_hw[0]) * int(kernel_hw[1])
    channels = bsr.shape[0] // taps if bsr.shape[0] % taps == 0 else 0
    return bn == 1 and bk > 1 and pixels >= lanes and channels > 0 and channels % bk == 0


def cpu_group_kernel(
    x_shape: tuple[int, int, int, int],
    out_shape: tuple[int, int, int, int],
    strides: tuple[int, int],
    bsr: BSR,
    lanes: int,
    lo: float = -_BIG,
    hi: float = _BIG,
) -> tirx.PrimFunc:
    """``y[n, i, j, :] = clip(x[n, i*sh, j*sw, :] @ W + bias, lo, hi)`` for a ``[K, N]`` BSR weight of
    ``bk x 1`` groups (a matmul is the ``(1, 1, m, k)`` case)."""
    nb_, hp, wp, k = x_shape
    _, oh, ow, n = out_shape
    sh, sw = strides
    bk, _ = bsr.block
    nnzb = bsr.data.shape[0]
    pixels_total = nb_ * oh * ow
    pv = PIXEL_VECTORS if pixels_total >= PIXEL_VECTORS * lanes else 1
    tile = pv * lanes
    # the last tile is moved back to end at the last pixel (it recomputes a few outputs, with equal values)
    tiles = -(-pixels_total // tile)
    last = pixels_total - tile
    chains = CHAINS
    outer = T.parallel if bsr.nnz_blocks * bk * pixels_total >= PARALLEL_MIN_WORK else T.serial
    img = oh * ow

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((nb_, hp, wp, k), "float32"),
        data: T.Buffer((nnzb, bk, 1), "float32"),
        indices: T.Buffer((nnzb,), "int32"),
        indptr: T.Buffer((n + 1,), "int32"),
        bias: T.Buffer((n,), "float32"),
        y: T.Buffer((nb_, oh, ow, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for p in outer(tiles):
            q0: T.int32 = T.min(p * tile, last)  # first pixel of the tile
            xt = T.alloc_buffer((k, tile), "float32")
            acc = T.alloc_buffer((chains, bk, tile), "float32", scope="local")
            res = T.alloc_buffer((tile,), "float32", scope="local")
            for t in T.serial(tile):
                for c in T.serial(k):
                    xt[c, t] = x[(q0 + t) // img, (q0 + t) % img // ow * sh, (q0 + t) % ow * sw, c]
            for j in T.serial(n):
                for a in T.unroll(chains):
                    for kk in T.unroll(bk):
                        for t in T.vectorized(tile):
                            acc[a, kk, t] = T.float32(0)
                for e4 in T.serial((indptr[j + 1] - indptr[j]) // chains):
                    for a in T.unroll(chains):
                        for kk in T.unroll(bk):
                            for t in T.vectorized(tile):
                                acc[a, kk, t] = (
                                    acc[a, kk, t]
                                    + xt[indices[indptr[j] + e4 * chains + a] * bk + kk, t]
                                    * data[indptr[j] + e4 * chains + a, kk, 0]
                                )
                for e in T.serial(indptr[j] + (indptr[j + 1] - indptr[j]) // chains * chains, indptr[j + 1]):
                    for kk in T.unroll(bk):
                        for t in T.vectorized(tile):
                            acc[0, kk, t] = acc[0, kk, t] + xt[indices[e] * bk + kk, t] * data[e, kk, 0]
                for t in T.vectorized(tile):
                    res[t] = bias[j]
                for a in T.unroll(chains):
                    for kk in T.unroll(bk):
                        for t in T.vectorized(tile):
                            res[t] = res[t] + acc[a, kk, t]
                for t in T.serial(tile):
                    y[(q0 + t) // img, (q0 + t) % img // ow, (q0 + t) % ow, j] = T.min(
                        T.max(res[t], T.float32(lo)), T.float32(hi)
                    )

    return kernel
