"""Winograd convolution for 3x3 stride-1 convolutions on CPU: F(m x m, 3 x 3), weights transformed at compile time.

A direct 3x3 convolution does 9 multiply-adds per output and input channel. Winograd's minimal filtering
algorithm computes an ``m x m`` output tile from an ``(m + 2) x (m + 2)`` input tile with ``(m + 2)^2``
multiply-adds per channel pair instead of ``9 m^2``: 2.25x fewer for F(2, 3), 4x fewer for F(4, 3). Per
tile it is three small linear maps around one big batched matrix product:

1. **input transform** ``V[e, n, p, ci] = (B^T d_p B)[e, n]`` for every tile ``p`` (vectorised over ``ci``);
2. **batched GEMM** ``M[e, n, p, co] = sum_ci V[e, n, p, ci] U[e, n, ci, co]``: ``(m + 2)^2`` independent
   matrix products, register tiled like every other reduction here (vector over ``co``, rows over ``p``);
3. **output transform** ``Y_p = A^T M_p A``, written to the NHWC output with the epilogue (bias, ReLU,
   residual add) fused into that write.

``U = G g G^T`` is computed once in numpy at compile time (:func:`transform_weight`), already in the
GEMM's register-tile order ``[e, n, co / vec, ci, vec]``, so a run pays nothing for it.

Where it is used (:func:`winograd_conv2d`, a Relax pass run after the NHWC layout conversion): NHWC
``conv2d`` with a constant 3x3 HWIO weight, stride 1, dilation 1, one group, at least
:data:`MIN_IN_CHANNELS` input channels and an output-channel count that fills whole vectors. The tile size
is :func:`tile_size`: F(4, 3) on maps of 14 and more, F(2, 3) below (a 7x7 map in 4x4 tiles pads to 8x8
and leaves the GEMM only 4 rows). ResNet-50's 3x3 convs in the model, 2-vCPU AVX-512 VM, 1 thread (direct
default schedule -> Winograd): 56x56x64 0.97 -> 0.41 ms, 28x28x128 0.95 -> 0.38, 14x14x256 1.01 -> 0.59,
7x7x512 1.31 -> 1.07 (its transformed weights, 16 MB, stream from memory); at 2 threads onnxruntime's
take 0.44 / 0.45 / 0.48 / 0.63 ms, these 0.20 / 0.19 / 0.33 / 0.62. Rounding: max error 2-5e-6 of the
output's magnitude for one F(4, 3) conv (points 0, +-1, +-1/2, +-2), 1e-6 for all of ResNet-50: well
inside the 1e-4 the bundles are checked to.

The kernel is scheduled by :func:`schedule` (called from :class:`~.tvm_schedules.ApplyCPUSchedules` for any
PrimFunc holding a ``winograd_bgemm`` block); it reaches that point fused with its epilogue because
:func:`mark_fusable` declares it "output element-wise fusable" to Relax's FuseOps, like a plain conv2d.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx
from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

from .tvm_tiles import register_tile

__all__ = ["mark_fusable", "schedule", "tile_size", "transform_weight", "winograd_conv2d"]

#: Use Winograd for eligible convolutions (a switch for A/B measurements).
ENABLED = True
#: Below this many input channels the GEMM is too short to pay for the two transforms.
MIN_IN_CHANNELS = 16
#: Block names (the TE stage names) the scheduler looks for.
PAD, PACK_ROWS, PACK, GEMM = "winograd_pad", "winograd_pack_rows", "winograd_data_pack", "winograd_bgemm"
INVERSE_ROWS, INVERSE, OUTPUT = "winograd_inverse_rows", "winograd_inverse", "winograd_output"
#: Stages kept as they are by the generic element-wise inlining (inlining would undo the separable transforms).
STAGES = (PAD, PACK_ROWS, PACK, INVERSE_ROWS, INVERSE)
#: Smallest batched GEMM (multiply-adds) whose five stages all run in parallel; below it each fork/join
#: costs more than the stage, and only the GEMM does (from GEMM_PARALLEL_MIN_WORK, like any reduction).
PARALLEL_MIN_WORK = 1 << 22
GEMM_PARALLEL_MIN_WORK = 1 << 15
#: Relax's op pattern kind "output element-wise fusable" (conv2d's): elementwise consumers fuse into it.
OUT_ELEMWISE_FUSABLE = 4


def tile_size(out_h: int, out_w: int) -> int:
    """Output tile edge ``m``: F(4, 3) where the map holds at least 14 x 14 outputs, else F(2, 3)."""
    return 4 if min(out_h, out_w) >= 14 else 2


def matrices(m: int, r: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cook-Toom transform matrices ``(A, B, G)`` for F(m, r) (TVM's interpolation points)."""
    a, b, g = _cook_toom_convolution(_interpolation_points(m + r - 2), m, r)
    return np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(g, np.float64)


def transform_weight(w_hwio: np.ndarray, m: int, vec: int) -> np.ndarray:
    """``U = G g G^T`` per (ci, co), laid out ``[alpha, alpha, co / vec, ci, vec]`` (float32)."""
    _, _, g = matrices(m)
    u = np.einsum("ek,fl,klio->efio", g, g, w_hwio.astype(np.float64))
    alpha, _, ci, co = u.shape
    u = u.reshape(alpha, alpha, ci, co // vec, vec).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(u, dtype=np.float32)


def _sum_by(index: tirx.PrimExpr, extent: int, term) -> tirx.PrimExpr:
    """``Select(index == 0, term(0), Select(index == 1, term(1), ...))``: once the loop over ``index`` is
    unrolled the chain folds to the one explicit sum, so zero coefficients cost nothing."""
    expr = term(extent - 1)
    for k in range(extent - 2, -1, -1):
        expr = tirx.Select(index == k, term(k), expr)
    return expr


def _linear(mat: np.ndarray, col: int, load) -> tirx.PrimExpr:
    """``sum_r mat[r, col] * load(r)`` over the nonzero coefficients only."""
    total = None
    for r in np.flatnonzero(mat[:, col]):
        c = float(mat[r, col])
        t = load(int(r)) if c == 1.0 else (-load(int(r)) if c == -1.0 else load(int(r)) * tirx.const(c, "float32"))
        total = t if total is None else total + t
    return total if total is not None else tirx.const(0.0, "float32")


def _compute(data: te.Tensor, u: te.Tensor, pads: tuple[int, int, int, int], m: int, lanes: int) -> te.Tensor:
    """TE compute of an NHWC 3x3 stride-1 conv from the transformed weight ``u`` (see the module doc).

    The padding copy also pads the channels to whole vectors (a pruned layer's 37 input channels become 48,
    the extra ones zero) so the input transform vectorises; the GEMM reduces over the real channels only.
    Both transforms are separable (``B^T d B`` = rows, then columns) and written as explicit sums of the
    nonzero coefficients.
    """
    n_, h_, w_, ci_ = (int(d) for d in data.shape)
    ci_pad = -(-ci_ // lanes) * lanes
    alpha, vec = m + 2, int(u.shape[-1])
    co_ = int(u.shape[2]) * vec
    pt, pl, pb, pr = pads
    oh, ow = h_ + pt + pb - 2, w_ + pl + pr - 2
    nh, nw = -(-oh // m), -(-ow // m)
    tiles = n_ * nh * nw
    a_mat, b_mat, _ = matrices(m)
    zero = tirx.const(0.0, data.dtype)
    padded = te.compute(
        (n_, nh * m + 2, nw * m + 2, ci_pad),
        lambda n, h, w, c: tirx.if_then_else(
            tirx.all(h >= pt, h < h_ + pt, w >= pl, w < w_ + pl, c < ci_), data[n, h - pt, w - pl, c], zero
        ),
        name=PAD,
    )

    def tile(p, a, b, c):
        return padded[p // (nh * nw), p // nw % nh * m + a, p % nw * m + b, c]

    rows = te.compute(  # B^T d: [e, b]
        (alpha, alpha, tiles, ci_pad),
        lambda e, b, p, c: _sum_by(e, alpha, lambda k: _linear(b_mat, k, lambda a: tile(p, a, b, c))),
        name=PACK_ROWS,
    )
    packed = te.compute(  # (B^T d) B: [e, v]
        (alpha, alpha, tiles, ci_pad),
        lambda e, v, p, c: _sum_by(v, alpha, lambda k: _linear(b_mat, k, lambda b: rows[e, b, p, c])),
        name=PACK,
    )
    rc = te.reduce_axis((0, ci_), "rc")
    gemm = te.compute(
        (alpha, alpha, tiles, co_),
        lambda e, v, p, o: te.sum(packed[e, v, p, rc] * u[e, v, o // vec, rc, o % vec], axis=[rc]),
        name=GEMM,
    )
    inv_rows = te.compute(  # A^T M: [i, b]
        (m, alpha, tiles, co_),
        lambda i, b, p, o: _sum_by(i, m, lambda k: _linear(a_mat, k, lambda a: gemm[a, b, p, o])),
        name=INVERSE_ROWS,
    )
    inverse = te.compute(  # (A^T M) A: [i, j]
        (m, m, tiles, co_),
        lambda i, j, p, o: _sum_by(j, m, lambda k: _linear(a_mat, k, lambda b: inv_rows[i, b, p, o])),
        name=INVERSE,
    )
    return te.compute(
        (n_, oh, ow, co_),
        lambda n, h, w, o: inverse[h % m, w % m, n * nh * nw + h // m * nw + w // m, o],
        name=OUTPUT,
    )


def _eligible(call: relax.Call, lanes: int) -> np.ndarray | None:
    """The HWIO weight of a conv2d call Winograd applies to, else None."""
    if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d":
        return None
    attrs, weight = call.attrs, call.args[1]
    if (attrs.data_layout != "NHWC" or attrs.kernel_layout != "HWIO" or int(attrs.groups) != 1
            or not isinstance(weight, tvm.ir.expr.Constant)
            or [int(s) for s in attrs.strides] != [1, 1] or [int(d) for d in attrs.dilation] != [1, 1]
            or (attrs.out_layout not in ("", "NHWC"))):  # fmt: skip
        return None
    w = weight.value.numpy()
    if w.dtype != np.float32 or w.shape[:2] != (3, 3) or w.shape[2] < MIN_IN_CHANNELS or w.shape[3] % lanes:
        return None
    shape = getattr(call.args[0].ty, "shape", None)
    if shape is None or len(shape) != 4 or any(not isinstance(d, tirx.IntImm) for d in shape):
        return None
    return w


def winograd_conv2d(lanes: int, registers: int) -> tvm.transform.Pass:
    """Relax pass: eligible 3x3 convolutions become a ``call_tir`` of the Winograd kernel (module doc).

    The GEMM's vector tile (the transformed weight's chunk width) comes from the same register-tile rule as
    every other reduction (:func:`.tvm_tiles.register_tile`).
    """

    @relax.expr_functor.mutator
    class _Winograd(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            w = _eligible(call, lanes)
            if w is None:
                return call
            pads = tuple(int(p) for p in call.attrs.padding)  # top, left, bottom, right
            _, h, wd, _ = (int(d) for d in call.args[0].ty.shape)
            oh, ow = h + pads[0] + pads[2] - 2, wd + pads[1] + pads[3] - 2
            m = tile_size(oh, ow)
            tiles = -(-oh // m) * -(-ow // m)
            vec, _ = register_tile(w.shape[3], tiles, lanes, registers)
            u = relax.const(transform_weight(w, m, vec))
            return self.builder_.call_te(
                lambda x, uu: _compute(x, uu, pads, m, lanes), call.args[0], u,
                primfunc_name_hint="conv2d_winograd",
            )

    @tvm.transform.module_pass(opt_level=0, name="WinogradConv2d")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not ENABLED:
            return mod
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mutator = _Winograd(mod)
                new = mutator.visit_expr(func)
                mod = mutator.builder_.get()
                mod[gv] = new
        return mod

    return _pass


def _has_block(sch: s_tir.Schedule, name: str) -> bool:
    try:
        sch.get_sblock(name)
    except Exception:
        return False
    return True


@tvm.transform.module_pass(opt_level=0, name="MarkWinogradFusable")
def mark_fusable(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Run after AnnotateTIROpPattern: Winograd kernels fuse with their element-wise epilogue like conv2d."""
    for gv, func in list(mod.functions_items()):
        if isinstance(func, tirx.PrimFunc) and is_winograd_func(func):
            mod[gv] = func.with_attr("op_pattern", OUT_ELEMWISE_FUSABLE)
    return mod


def is_winograd_func(func: tirx.PrimFunc) -> bool:
    return is_winograd(s_tir.Schedule(func))


def is_stage(sch: s_tir.Schedule, block) -> bool:
    """A Winograd stage the generic element-wise inlining must leave alone."""
    return sch.get(block).name_hint in STAGES


def is_output_stage(sch: s_tir.Schedule, block) -> bool:
    """The tile-to-NHWC write: it may be inlined into its epilogue, never into the output transform."""
    return sch.get(block).name_hint == OUTPUT


def is_winograd(sch: s_tir.Schedule) -> bool:
    return _has_block(sch, GEMM)


def schedule(sch: s_tir.Schedule, lanes: int, registers: int) -> None:
    """Schedule a (fused) Winograd PrimFunc in place; element-wise blocks must already be inlined."""
    # Five stages, five fork/join points: in a small kernel (the bundled model's 14x14x32 convs) only the
    # GEMM runs in parallel, so it forks once like a direct conv.
    gemm_block = sch.get_sblock(GEMM)
    work = 1
    for lp in sch.get_loops(gemm_block):
        work *= _extent(sch, lp)
    threaded = work >= PARALLEL_MIN_WORK

    def parallel(loop) -> None:
        if threaded:
            sch.parallel(loop)

    def vectorised_split(loop, parallel_loops):
        outer, inner = sch.split(loop, [None, lanes])
        sch.vectorize(inner)
        parallel(sch.fuse(*parallel_loops) if len(parallel_loops) > 1 else parallel_loops[0])
        return outer

    # zero padding: a vectorised copy, parallel over rows
    n, h, _, c = sch.get_loops(sch.get_sblock(PAD))
    vectorised_split(c, [n, h])

    def transform(rows_name: str, name: str) -> None:
        # (tile, channel vector) in parallel; per tile the row pass into a small local buffer, then the
        # column pass, both unrolled so the explicit sums are straight-line vector code.
        b = sch.get_sblock(name)
        i, j, p, c = sch.get_loops(b)
        c_o, c_i = sch.split(c, [None, lanes])
        sch.reorder(p, c_o, i, j, c_i)
        parallel(sch.fuse(p, c_o))
        sch.unroll(i)
        sch.unroll(j)
        sch.vectorize(c_i)
        rows = sch.get_sblock(rows_name)
        sch.compute_at(rows, sch.get_loops(b)[0], preserve_unit_loops=True)
        sch.set_scope(rows, 0, "local")
        loops = sch.get_loops(rows)
        sch.vectorize(loops[-1])
        for lp in loops[1:-2]:
            sch.unroll(lp)

    transform(PACK_ROWS, PACK)
    transform(INVERSE_ROWS, INVERSE)

    # batched GEMM: vector tile over co (the weight's chunk width), row tile over tiles p
    b = sch.get_sblock(GEMM)
    e, v, p, o, rc = sch.get_loops(b)
    vec = _weight_vec(sch, b)
    _, rows = register_tile(vec, _extent(sch, p), lanes, registers)
    o_o, o_i = sch.split(o, [None, vec])
    p_o, p_i = sch.split(p, [None, rows])
    sch.reorder(e, v, p_o, o_o, rc, p_i, o_i)
    sch.unroll(p_i)
    sch.vectorize(o_i)
    fused = sch.fuse(e, v, p_o, o_o)
    if threaded or work >= GEMM_PARALLEL_MIN_WORK:
        sch.parallel(fused)
    cache = sch.cache_write(b, 0, "local")
    sch.reverse_compute_at(cache, fused)
    loops = sch.get_loops(cache)
    sch.vectorize(loops[-1])
    sch.unroll(loops[-2])
    init = sch.decompose_reduction(b, rc)
    loops = sch.get_loops(init)
    sch.vectorize(loops[-1])
    sch.unroll(loops[-2])

    # the output write (with the fused epilogue): vectorised over channels, parallel over rows
    for b in sch.get_output_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(b)
        if len(loops) == 4 and _extent(sch, loops[-1]) % lanes == 0:
            vectorised_split(loops[-1], loops[:2])


def _extent(sch: s_tir.Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _weight_vec(sch: s_tir.Schedule, block) -> int:
    """The GEMM's vector tile: the transformed weight's innermost chunk (5-d ``[a, a, co/vec, ci, vec]``)."""
    for region in sch.get(block).reads:
        shape = region.source.shape
        if len(shape) == 5:
            return int(shape[-1])
    raise ValueError("winograd GEMM without a transformed weight")
