"""Group-sparse KxK convolution (runs of ``bk`` input channels at one kernel tap, ``group:1x4``), x86 / wasm:
pixels in the vector lanes, read straight from a channel-major copy of the input, no per-tile transpose.

Why: the pointwise group kernel (:mod:`.tvm_sparse_group`) transposes each tile of the NHWC input to
``[K, pixels]`` before its FMAs. For a 3x3 convolution that transpose is ``9*C`` scalar copies per pixel, as
many as the sparse FMAs of a 64-channel layer at 90% sparsity: measured on ResNet-18's 3x3 shapes (x86,
AVX-512, im2col per tile) the kernel lost to dense at every layer below 90% and won only on the 512-channel
layer (at 90%); a tap-by-tap variant (one ``C x pixels`` transpose per tap, a per-tile ``[N, pixels]``
accumulator) was no better (``bench/sparse_results_b.txt``).

How: the padded input is rearranged once per call (a Relax ``pad`` + ``reshape`` + ``permute_dims``,
:func:`planes_input`) into *phase planes* ``[sh, sw, C, H2, W2]``: plane ``(a, b, c)`` holds channel ``c`` at
padded rows ``a, a+sh, ..`` and columns ``b, b+sw, ..``. An output pixel ``(i, j)`` is the slot ``q = i*W2 + j``
(columns ``j >= OW`` are computed and dropped), and for kernel tap ``(r, s)`` its input is plane
``((r*dh) % sh, (s*dw) % sw, c)`` at slot ``q + ((r*dh) // sh) * W2 + (s*dw) // sw``: for every tap and channel
a run of consecutive slots is a contiguous vector load, whatever the stride and dilation. The compressed
weight's ``indices`` are these offsets, resolved ahead of time (:func:`plane_offsets`): one index load per
group, then ``bk`` vector loads and FMAs per pixel vector.

Walking the reduction in L1-sized chunks (a CSR row per (64 K-rows, output channel), the tile's outputs
accumulated chunk by chunk) was measured and not kept: ResNet-18 at 90%, 3x3 layers of 128-512 channels
0.68-2.15x vs 0.72-2.49x without (loads 7 vs 14-18), at 70% the 512-channel layers 0.78-1.00x vs 0.65-0.79x.

Work item: ``pv * lanes`` consecutive slots of one image; for each output channel its groups are taken
``chains`` at a time into independent accumulators (:func:`tile_shape`), summed with the bias and clipped into the tile's
``[N, slots]`` buffer, which is then written pixel by pixel (contiguous channels) to the NHWC output: a
store per output channel straight into the NHWC column (a strided scalar store with the slot's div/mod each)
cost as much as the FMAs of a 90%-sparse 64-channel layer. Start reading at :func:`cpu_planes_kernel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax, tirx
from tvm.script import tirx as T

from .sparse_formats import BSR

__all__ = ["Planes", "cpu_planes_kernel", "plane_offsets", "planes_input", "tile_shape"]

#: Stored multiply-adds before a kernel's tiles run in parallel.
PARALLEL_MIN_WORK = 1 << 16
#: Most pixel vectors per tile (each group's ``bk`` broadcasts are shared by this many FMAs).
MAX_PIXEL_VECTORS = 4
_BIG = 3.0e38


@dataclass(frozen=True)
class Planes:
    """The phase-plane geometry of one convolution (see the module docstring).

    Attributes:
        batch, channels: of the input.
        window, strides, dilation: of the convolution.
        padding: ``(top, left, bottom, right)`` as the convolution pads (more zero rows and columns are
            added below and to the right, so every plane has ``h2 x w2`` slots and every read is in bounds).
        out_hw: the output's ``(OH, OW)``.
        h2, w2: rows and columns of a plane.
    """

    batch: int
    channels: int
    window: tuple[int, int]
    strides: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int, int, int]
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]

    @property
    def w2(self) -> int:
        (_, w), (_top, left, _bottom, right), sw = self.in_hw, self.padding, self.strides[1]
        return -(-(w + left + right) // sw)

    @property
    def h2(self) -> int:
        (h, _), (top, _l, bottom, _r), sh = self.in_hw, self.padding, self.strides[0]
        reach = (self.window[0] - 1) * self.dilation[0] // sh
        return max(-(-(h + top + bottom) // sh), self.out_hw[0] + reach + 1)  # + 1: the dropped columns' reads

    @property
    def plane(self) -> int:
        return self.h2 * self.w2

    @property
    def length(self) -> int:
        """Floats per image of the rearranged input."""
        return self.strides[0] * self.strides[1] * self.channels * self.plane

    @property
    def slots(self) -> int:
        """Output slots per image (``OH * W2``)."""
        return self.out_hw[0] * self.w2


def planes_input(builder: relax.BlockBuilder, x: relax.Expr, g: Planes) -> relax.Expr:
    """The NHWC input ``x`` (unpadded) as ``[N, sh*sw*C*H2*W2]`` phase planes (Relax ops, emitted here)."""
    h, w = g.in_hw
    sh, sw = g.strides
    top, left, _, _ = g.padding
    bottom, right = g.h2 * sh - h - top, g.w2 * sw - w - left
    x = builder.normalize(relax.op.nn.pad(x, [0, 0, top, bottom, left, right, 0, 0]))
    x = builder.normalize(relax.op.reshape(x, [g.batch, g.h2, sh, g.w2, sw, g.channels]))
    x = builder.normalize(relax.op.permute_dims(x, [0, 2, 4, 5, 1, 3]))
    return builder.normalize(relax.op.reshape(x, [g.batch, g.length]))


def plane_offsets(bsr: BSR, g: Planes) -> np.ndarray:
    """The BSR's K-block indices of a ``[KH*KW*C, N]`` weight (HWIO flattened, ``bk`` dividing C) as the
    offset of each run's first input in an image's phase planes, minus the output slot (int32)."""
    bk = bsr.block[0]
    k = bsr.indices.astype(np.int64) * bk
    c = k % g.channels
    tap = k // g.channels
    r, s = tap // g.window[1], tap % g.window[1]
    (sh, sw), (dh, dw) = g.strides, g.dilation
    phase = (r * dh % sh) * sw + s * dw % sw
    off = (phase * g.channels + c) * g.plane + (r * dh // sh) * g.w2 + s * dw // sw
    return off.astype(np.int32)


def tile_shape(bk: int, slots: int, lanes: int, registers: int) -> tuple[int, int]:
    """``(pixel vectors, chains)`` of a tile: ``bk * pv * chains`` accumulators in at most half the vector
    registers (the rest: broadcasts, addresses), as many pixel vectors as fit first (each vector load of
    the input is one FMA, each broadcast is shared by ``pv``), then chains. Measured on ResNet-18's
    56x56x64 3x3 layer at 50% (x86, AVX-512, 1 thread, loaded machine): pv 4 x 1 chain 4.7-5.3 ms, 2 x 2
    6.1-7.4 ms, 2 x 1 5.1-5.6 ms."""
    budget = max(1, registers // 2 // bk)
    pv = 1
    while pv * 2 <= min(MAX_PIXEL_VECTORS, budget, slots // lanes):
        pv *= 2  # a power of two: a 3-vector tile (48 lanes) was scalarised (7x7x512: 16x slower)
    return pv, max(1, budget // pv)


def cpu_planes_kernel(
    g: Planes, bsr: BSR, lanes: int, registers: int = 32, lo: float = -_BIG, hi: float = _BIG
) -> tirx.PrimFunc:
    """``y = clip(conv(x, W) + bias, lo, hi)`` (NHWC out) from the phase planes of ``x`` (:func:`planes_input`)
    and a ``[KH*KW*C, N]`` BSR of ``bk x 1`` runs whose ``indices`` are :func:`plane_offsets`."""
    nb_, n = g.batch, bsr.shape[1]
    oh, ow = g.out_hw
    w2, plane, length, slots = g.w2, g.plane, g.length, g.slots
    bk, _ = bsr.block
    nnzb = bsr.data.shape[0]
    pv, chains = tile_shape(bk, slots, lanes, registers)
    tile = pv * lanes
    assert slots >= tile, "fewer output slots than one vector"
    per_img = -(-slots // tile)
    last = slots - tile  # the last tile of an image ends at its last slot (recomputes a few, equal values)
    outer = T.parallel if bsr.nnz_blocks * bk * nb_ * oh * ow >= PARALLEL_MIN_WORK else T.serial

    @T.prim_func(private=True)
    def kernel(
        xp: T.Buffer((nb_, length), "float32"),
        data: T.Buffer((nnzb, bk, 1), "float32"),
        indices: T.Buffer((nnzb,), "int32"),
        indptr: T.Buffer((n + 1,), "int32"),
        bias: T.Buffer((n,), "float32"),
        y: T.Buffer((nb_, oh, ow, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for p in outer(nb_ * per_img):
            q0: T.int32 = T.min(p % per_img * tile, last)
            acc = T.alloc_buffer((chains, bk, tile), "float32", scope="local")
            res = T.alloc_buffer((tile,), "float32", scope="local")
            yt = T.alloc_buffer((n, tile), "float32")
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
                                    + xp[p // per_img, indices[indptr[j] + e4 * chains + a] + kk * plane + q0 + t]
                                    * data[indptr[j] + e4 * chains + a, kk, 0]
                                )
                for e in T.serial(indptr[j] + (indptr[j + 1] - indptr[j]) // chains * chains, indptr[j + 1]):
                    for kk in T.unroll(bk):
                        for t in T.vectorized(tile):
                            acc[0, kk, t] = acc[0, kk, t] + xp[p // per_img, indices[e] + kk * plane + q0 + t] * data[e, kk, 0]
                for t in T.vectorized(tile):
                    res[t] = bias[j]
                for a in T.unroll(chains):
                    for kk in T.unroll(bk):
                        for t in T.vectorized(tile):
                            res[t] = res[t] + acc[a, kk, t]
                for t in T.vectorized(tile):
                    yt[j, t] = T.min(T.max(res[t], T.float32(lo)), T.float32(hi))
            # the tile's outputs, pixel by pixel (contiguous channels of the NHWC output; dropped columns skipped)
            for t in T.serial(tile):
                if (q0 + t) % w2 < ow:
                    for j in T.serial(n):
                        y[p // per_img, (q0 + t) // w2, (q0 + t) % w2, j] = yt[j, t]

    return kernel
