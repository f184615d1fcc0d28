"""Default CPU schedules: fast kernels for x86 and AArch64 without a tuning run, plus MetaSchedule tuning.

TVM's default CPU pipeline schedules nothing (every kernel is a naive loop nest, 30-100x slower than
onnxruntime). This module gives every kernel a schedule chosen from its shape:

1. **Layout** (:func:`relax_layout_passes`): convolutions run in NHWC with HWIO weights, so the channel axis
   is innermost everywhere: conv, depthwise conv, pooling and the element-wise epilogues then all vectorise
   along channels (channel counts are multiples of the vector width in real models), and the weight
   transposes fold into constants at compile time. Gemm weights are likewise pre-transposed to [K, N].
2. **Kernels** (:class:`ApplyCPUSchedules`): in each fused PrimFunc, element-wise blocks are inlined and the
   one reduction block (conv, depthwise, matmul/dense, pooling) is *register tiled*: the innermost output
   axis (channels / N) is split into ``lanes * k`` and vectorised, the next output axis (width / M) into a
   small unrolled tile, the reduction loops go in between, the accumulator tile lives in a local buffer
   (registers), and the epilogue (bias, BN, ReLU, residual add) is applied as the tile is written back. The
   outer output loops are fused and run in parallel when the kernel is big enough to pay for a fork.
   Padding stays a separate vectorised copy so the inner loop has no conditionals. The tile shape is
   chosen for the most FMAs per load that fit the register file (:func:`_register_tile`).
   Constant conv weights are **repacked at compile time** to ``[O / vec, H, W, I, vec]`` (each tile's weight
   slice contiguous, read front to back; :meth:`_Kernel._pack_weights`, :func:`_pack_constants`).
3. **Winograd** (:mod:`.tvm_winograd`): 3x3 stride-1 convolutions become F(4,3) / F(2,3) Winograd kernels
   (a quarter / 4/9 of the multiply-adds; weights transformed at compile time) before legalization, and get
   their own schedule here (the batched GEMM register tiled like every other reduction).
4. Whatever is left (transposes, concat, softmax …) gets the generic rule: fuse the loops, vectorise the
   innermost run, parallelise the rest.

Start reading at :class:`ApplyCPUSchedules`. :func:`tune` runs MetaSchedule instead, with its database
cached per target under the tuning cache folder and reused across compiles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tvm
from tvm import relax, s_tir, tirx

from . import tvm_winograd

__all__ = ["ApplyCPUSchedules", "legalize_passes", "relax_layout_passes", "tune", "vector_lanes", "vector_registers"]

#: Minimum work (multiply-adds) before a reduction kernel (conv, matmul) is run in parallel; below it the fork
#: costs more. Measured on the bundled Fashion-MNIST model (convs of 0.1-5.4 M MACs, 2 threads, warm runner):
#: all convs parallel 0.065 ms, those >= 1 M MACs 0.066, >= 4 M 0.083, none 0.099.
PARALLEL_MIN_WORK = 1 << 15
#: Minimum elements before an elementwise/pooling kernel is run in parallel.
SPATIAL_PARALLEL_MIN = 1 << 17
#: Most weight vectors in one register tile row.
MAX_TILE_VECTORS = 4
#: Depthwise convolutions with an odd channel count get zero channels too (see :func:`pad_conv_channels`).
PAD_DEPTHWISE = True


def relax_layout_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """Relax passes that put convolutions in NHWC/HWIO, fold the weight transposes away, and pad odd
    output-channel counts (see :func:`pad_conv_channels`)."""
    desired = {"relax.nn.conv2d": ["NHWC", "HWIO"]}
    return [
        relax.transform.FoldConstant(),
        clip_as_elementwise(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.ConvertLayout(desired),
        relax.transform.FoldConstant(),
        pad_conv_channels(vector_lanes(target)),
        tvm_winograd.winograd_conv2d(vector_lanes(target), vector_registers(target)),
        relax.transform.CanonicalizeBindings(),
        relax.transform.DeadCodeElimination(),
    ]


def clip_as_elementwise() -> tvm.transform.Pass:
    """Turn ONNX ``Clip`` (ReLU6 …) back into Relax ``maximum`` / ``minimum`` with a scalar bound.

    TVM's ONNX importer emits Clip as ``call_tir`` of TE maximum/minimum kernels, which ConvertLayout cannot
    see through: each ReLU6 of an NHWC model then ran as transpose -> clip -> transpose in a kernel of its
    own, outside the conv's epilogue (MobileNetV2: 35 of them, 0.57 of 5.5 ms at 1 thread). As Relax ops
    with a constant scalar bound (the NaN-bound handling folded away by FoldConstant) they are layout-free
    element-wise ops and fuse into the conv.
    """

    @relax.expr_functor.mutator
    class _Clip(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.call_tir":
                return call
            callee, args = call.args[0], call.args[1]
            name = callee.name_hint if isinstance(callee, tvm.ir.GlobalVar) else ""
            op = {"maximum": relax.op.maximum, "minimum": relax.op.minimum}.get(name.rstrip("0123456789"))
            fields = getattr(args, "fields", None)
            if op is None or fields is None or len(fields) != 2:
                return call
            bound = fields[1]
            if not isinstance(bound, tvm.ir.expr.Constant) or bound.value.numpy().ndim != 0:
                return call
            return op(fields[0], bound)

    @tvm.transform.module_pass(opt_level=0, name="ClipAsElementwise")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gv] = _Clip(mod).visit_expr(func)
        return relax.transform.DeadCodeElimination()(mod)

    return _pass


def legalize_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """TVM's CPU legalization (``cpu_generic.legalize_passes``) with the Winograd kernels declared fusable
    with their epilogue (:func:`~.tvm_winograd.mark_fusable`) between op-pattern annotation and fusion."""
    from tvm.relax.backend import cpu_generic

    passes = list(cpu_generic.legalize_passes(target))
    at = next(i for i, p in enumerate(passes) if p.info.name == "AnnotateTIROpPattern") + 1
    return [*passes[:at], tvm_winograd.mark_fusable, *passes[at:]]


def pad_conv_channels(lanes: int) -> tvm.transform.Pass:
    """Give NHWC convolutions whose output-channel count is not a multiple of the vector width (pruned
    models: 23, 45 … channels) zero-padded weights, and slice the extra channels off the result; likewise
    matmuls by a constant weight (a 1000-class head: 1008 columns).

    The kernel then vectorises over whole registers instead of falling back to scalar code (a prime channel
    count has no divisor to vectorise by); the slice is a cheap copy fused with the epilogue that follows.
    Depthwise convolutions (any odd channel count) also get zero input channels, added by one ``nn.pad`` that
    does the spatial padding too (pruned MobileNetV2, depthwise 23 … 672 channels, 2 threads: 4.33 -> 3.06
    ms, onnxruntime 2.16 ms). Other grouped convolutions and non-constant weights are left alone.
    """

    @relax.expr_functor.mutator
    class _Pad(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul":
                return self._pad_dense(call)
            if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d":
                return call
            attrs = call.attrs
            weight = call.args[1]
            if (attrs.data_layout != "NHWC" or attrs.kernel_layout != "HWIO"
                    or not isinstance(weight, tvm.ir.expr.Constant)):  # fmt: skip
                return call
            w = weight.value.numpy()
            out_ch = w.shape[3]
            if out_ch % lanes == 0:
                return call
            padded = -(-out_ch // lanes) * lanes
            if int(attrs.groups) != 1:
                return self._pad_depthwise(call, w, padded) if PAD_DEPTHWISE else call
            if out_ch <= lanes:
                return call
            wp = np.zeros(w.shape[:3] + (padded,), dtype=w.dtype)
            wp[..., :out_ch] = w
            conv = relax.op.nn.conv2d(
                call.args[0], relax.const(wp), strides=attrs.strides, padding=attrs.padding,
                dilation=attrs.dilation, groups=1, data_layout="NHWC", kernel_layout="HWIO",
                out_layout=attrs.out_layout, out_dtype=attrs.out_dtype,
            )  # fmt: skip
            return relax.op.strided_slice(self.builder_.normalize(conv), axes=[3], begin=[0], end=[out_ch])

        def _pad_dense(self, call: relax.Call) -> relax.Expr:
            # x @ W with a constant [K, N] weight (Gemm, pre-transposed): N = 1000 classes would vectorise by
            # 8 or 10 lanes; zero columns up to a whole number of vectors, then slice.
            weight = call.args[1]
            if not isinstance(weight, tvm.ir.expr.Constant):
                return call
            w = weight.value.numpy()
            if w.ndim != 2 or w.shape[1] % lanes == 0 or w.shape[1] <= lanes:
                return call
            n = w.shape[1]
            wp = np.zeros((w.shape[0], -(-n // lanes) * lanes), dtype=w.dtype)
            wp[:, :n] = w
            out = self.builder_.normalize(
                relax.op.matmul(call.args[0], relax.const(wp), out_dtype=call.attrs.out_dtype)
            )
            rank = len(out.ty.shape)
            return relax.op.strided_slice(out, axes=[rank - 1], begin=[0], end=[n])

        def _pad_depthwise(self, call: relax.Call, w: np.ndarray, padded: int) -> relax.Expr:
            # Depthwise (groups == in == out channels, weight [kh, kw, 1, C]): the input gets zero channels
            # too, in the same copy that does the spatial padding, so the conv itself has no padding.
            attrs = call.attrs
            out_ch = w.shape[3]
            shape = getattr(call.args[0].ty, "shape", None)
            if (w.shape[2] != 1 or int(attrs.groups) != out_ch or shape is None or len(shape) != 4
                    or _const_int(shape[3]) != out_ch):  # fmt: skip
                return call
            pad = [int(x) for x in attrs.padding]  # top, left, bottom, right
            wp = np.zeros(w.shape[:3] + (padded,), dtype=w.dtype)
            wp[..., :out_ch] = w
            data = self.builder_.normalize(
                relax.op.nn.pad(call.args[0], [0, 0, pad[0], pad[2], pad[1], pad[3], 0, padded - out_ch])
            )
            conv = relax.op.nn.conv2d(
                data, relax.const(wp), strides=attrs.strides, padding=[0, 0, 0, 0],
                dilation=attrs.dilation, groups=padded, data_layout="NHWC", kernel_layout="HWIO",
                out_layout=attrs.out_layout, out_dtype=attrs.out_dtype,
            )  # fmt: skip
            return relax.op.strided_slice(self.builder_.normalize(conv), axes=[3], begin=[0], end=[out_ch])

    @tvm.transform.module_pass(opt_level=0, name="PadConvChannels")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mutator = _Pad(mod)
                mod[gv] = mutator.visit_expr(func)
        return mod

    return _pass


def vector_lanes(target: tvm.target.Target, bits: int = 32) -> int:
    """float32 lanes of the target's SIMD registers (16 with AVX-512, 8 with AVX2, 4 with NEON/SSE)."""
    try:
        width = int(tvm.target.codegen.llvm_get_vector_width(target))
    except Exception:  # noqa: BLE001 - non-LLVM targets
        width = 128
    if width <= 0:
        width = 128
    return max(1, width // bits)


def vector_registers(target: tvm.target.Target) -> int:
    """SIMD registers of the target: 32 with AVX-512 and on AArch64 (NEON/SVE), else 16 (AVX2, SSE)."""
    triple = str(target.attrs.get("mtriple", "")) if hasattr(target, "attrs") else ""
    if vector_lanes(target) >= 16 or triple.startswith(("aarch64", "arm64")):
        return 32
    return 16


def _const_int(x: object) -> int | None:
    return int(x.value) if isinstance(x, tirx.IntImm) else (x if isinstance(x, int) else None)


def _written_shape(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> list[int | None]:
    """Shape of the buffer a block writes (``TensorRegion.source`` is the buffer in TVM 0.27)."""
    region = sch.get(block).writes[0]
    buf = region.source if hasattr(region, "source") else region.buffer
    return [_const_int(d) for d in buf.shape]


def _largest_divisor(n: int, limit: int) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def _register_tile(v_ext: int, t_ext: int, lanes: int, registers: int = 32) -> tuple[int, int]:
    """(vector tile, row tile) for a register-tiled reduction, both dividing their axes.

    Each reduction step loads ``n_vec`` weight vectors and broadcasts ``rows`` input values into registers, then
    issues ``n_vec * rows`` FMAs into the accumulator tile. The tile must fit the register file (accumulators +
    the weight vectors + one broadcast <= ``registers``, else LLVM spills inside the loop) and should do as
    many FMAs per load as possible: the score is ``n_vec * rows / (n_vec + rows)``, ties going to the larger
    tile. (16 x 14 and 32 x 7 both make 14 accumulators, but the first issues one load per FMA.)
    """
    if v_ext < lanes or v_ext % lanes:
        vecs = [_largest_divisor(v_ext, lanes)]
    else:
        # powers of two only: LLVM scalarises parts of a <48 x float> tile (3 AVX-512 vectors), 20x slower
        vecs = [lanes * k for k in (1, 2, 4) if k <= MAX_TILE_VECTORS and (v_ext // lanes) % k == 0]
    best: tuple[float, int, int, int] = (0.0, 0, 0, 0)
    for vec in vecs:
        n_vec = -(-vec // lanes)
        for rows in range(1, t_ext + 1):
            if t_ext % rows or n_vec * rows + n_vec + 1 > registers:
                continue
            score = n_vec * rows / (n_vec + rows)
            best = max(best, (round(score, 6), n_vec * rows, vec, rows))
    return best[2], best[3]


class _Kernel:
    """Schedules one PrimFunc. Each public step leaves the schedule valid; a failure skips only itself."""

    def __init__(
        self, func: tirx.PrimFunc, lanes: int, registers: int = 32, packable: frozenset[str] = frozenset()
    ) -> None:
        self.sch = s_tir.Schedule(func)
        self.lanes = lanes
        self.registers = registers
        #: Parameters (by name) that are compile-time constants, so their layout may change (see
        #: :meth:`_pack_weights`); ``packed`` maps the index of each repacked parameter to its chunk width.
        self.packable = packable
        self.params = [p.name for p in func.params]
        self.packed: dict[int, int] = {}

    # -- analysis ---------------------------------------------------------------------------------
    def blocks(self) -> list[s_tir.schedule.SBlockRV]:
        root = self.sch.get_sblock("root")
        return list(self.sch.get_child_blocks(root))

    def iter_kinds(self, block: s_tir.schedule.SBlockRV) -> list[int]:
        return [int(iv.iter_type) for iv in self.sch.get(block).iter_vars]

    def is_reduction(self, block: s_tir.schedule.SBlockRV) -> bool:
        return any(k == tirx.IterVar.CommReduce for k in self.iter_kinds(block))

    def is_padding(self, block: s_tir.schedule.SBlockRV) -> bool:
        return "if_then_else" in str(self.sch.get(block).body)

    # -- steps ------------------------------------------------------------------------------------
    def inline_elementwise(self) -> None:
        """Inline every spatial block into its consumer (or producer) except padding and the outputs."""
        changed = True
        while changed:
            changed = False
            for b in self.blocks():
                if self.is_reduction(b) or self.is_padding(b) or tvm_winograd.is_stage(self.sch, b):
                    continue
                ops = (self.sch.compute_inline, self.sch.reverse_compute_inline)
                if tvm_winograd.is_output_stage(self.sch, b) or any(
                    tvm_winograd.is_stage(self.sch, p) for p in self.sch.get_producers(b)
                ):  # Winograd's tile-to-NHWC write goes into its epilogue, never into the output transform
                    ops = ops[:1]
                for op in ops:
                    try:
                        op(b)
                    except Exception:  # noqa: BLE001 - "cannot inline" is the common, expected case
                        continue
                    changed = True
                    break
                if changed:
                    break

    def schedule_reduction(self, block: s_tir.schedule.SBlockRV) -> None:
        """Register-tile a reduction block (conv / depthwise / matmul / pooling), see the module doc."""
        sch = self.sch
        iters = sch.get(block).iter_vars
        loops = sch.get_loops(block)
        if len(loops) != len(iters):
            return
        extents = [_const_int(iv.dom.extent) for iv in iters]
        if any(e is None for e in extents):
            return
        spatial = [i for i, iv in enumerate(iters) if iv.iter_type == tirx.IterVar.DataPar]
        reduce = [i for i, iv in enumerate(iters) if iv.iter_type == tirx.IterVar.CommReduce]
        if not spatial or len(spatial) + len(reduce) != len(iters):
            return
        work = 1
        for e in extents:
            work *= e
        # Vector axis: the innermost spatial axis; tile axis: the next one out with extent > 1.
        v_axis = spatial[-1]
        t_axis = next((i for i in reversed(spatial[:-1]) if extents[i] > 1), None)
        vec, tile = _register_tile(
            extents[v_axis], extents[t_axis] if t_axis is not None else 1, self.lanes, self.registers
        )
        if self._pack_weights(block, spatial, reduce, extents, vec):
            loops = sch.get_loops(block)
        v_out, v_in = sch.split(loops[v_axis], [None, vec])
        outer = [loops[i] for i in spatial if i not in (v_axis, t_axis)]
        if t_axis is not None:
            t_out, t_in = sch.split(loops[t_axis], [None, tile])
            outer += [t_out, v_out]
            inner = [t_in, v_in]
        else:
            outer += [v_out]
            inner = [v_in]
        red = [loops[i] for i in reduce]
        sch.reorder(*outer, *red, *inner)

        # Vectorise/unroll the tile first: after decompose_reduction the update block no longer counts as a
        # reduction block and the loops cannot be annotated any more.
        if len(inner) == 2:
            sch.unroll(inner[0])
        sch.vectorize(inner[-1])
        # One parallel loop over all output tiles (channel chunk innermost, so a thread's consecutive tiles
        # share their input rows): a 7x7 output then has 7 x (channels / vec) work items instead of 7 rows,
        # which two or four threads split evenly.
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        outer = [fused]
        if work >= PARALLEL_MIN_WORK:
            sch.parallel(fused)
        # Accumulate the tile in a local buffer and write it back (with the epilogue) per tile.
        consumers = list(sch.get_consumers(block))
        out_shape = _written_shape(sch, block)
        cache = sch.cache_write(block, 0, "local")
        for c in consumers:
            # Only consumers writing the same shape (the epilogue): TVM also lets a slicing consumer be
            # inlined (padded channels, see pad_conv_channels) and then writes the tile out of bounds.
            if _written_shape(sch, c) != out_shape:
                continue
            try:
                sch.reverse_compute_inline(c)
            except Exception:  # noqa: BLE001 - e.g. a consumer that reads other tiles; left for later
                pass
        sch.reverse_compute_at(cache, outer[-1], preserve_unit_loops=True)
        self._vectorize_tail(cache, len(inner))
        if red:
            init = sch.decompose_reduction(block, red[0])
            self._vectorize_tail(init, len(inner))

    def _pack_weights(
        self,
        block: s_tir.schedule.SBlockRV,
        spatial: list[int],
        reduce: list[int],
        extents: list[int],
        vec: int,
    ) -> bool:
        """Repack a convolution's constant HWIO weight as ``[O / vec, H, W, I, vec]``.

        The register tile reads ``vec`` output channels of one (h, w, i) weight row per reduction step; in HWIO
        those rows are ``O`` floats apart (a new cache line and, every few rows, a new page for each step), in
        the packed layout one tile's whole weight slice is contiguous and read front to back. The relayout
        is done on the constant at compile time (:func:`_pack_constants`), so a run pays nothing.
        """
        if not self.packable or len(spatial) != 4 or len(reduce) != 3 or vec % self.lanes:
            return False
        v_ext, i_ext = extents[spatial[-1]], extents[reduce[-1]]
        if v_ext <= vec:
            return False
        reads = self.sch.get(block).reads
        for i, region in enumerate(reads):
            buf = region.source
            shape = [_const_int(d) for d in buf.shape]
            if buf.name in self.packable and len(shape) == 4 and shape[2:] == [i_ext, v_ext]:
                self.sch.transform_layout(block, ("read", i), lambda h, w, c, o: (o // vec, h, w, c, o % vec))
                self.packed[self.params.index(buf.name)] = vec
                return True
        return False

    def _vectorize_tail(self, block: s_tir.schedule.SBlockRV, n_inner: int) -> None:
        """Vectorise the innermost loop of a write-back/init block (unrolling the one before)."""
        loops = self.sch.get_loops(block)
        if not loops:
            return
        try:
            self.sch.vectorize(loops[-1])
            if n_inner == 2 and len(loops) >= 2:
                self.sch.unroll(loops[-2])
        except Exception:  # noqa: BLE001
            pass

    def schedule_spatial(self, block: s_tir.schedule.SBlockRV) -> None:
        """Generic rule: fuse all loops, vectorise the innermost ``lanes``, parallelise the rest."""
        sch = self.sch
        loops = sch.get_loops(block)
        if not loops:
            return
        extents = [_const_int(sch.get(lp).extent) for lp in loops]
        if any(e is None for e in extents):
            return
        total = 1
        for e in extents:
            total *= e
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        inner = extents[-1]
        vec = self.lanes if inner % self.lanes == 0 else _largest_divisor(inner, self.lanes)
        if vec > 1 and total % vec == 0:
            outer, v = sch.split(fused, [None, vec])
            sch.vectorize(v)
        else:
            outer = fused
        if total >= SPATIAL_PARALLEL_MIN:
            sch.parallel(outer)

    def run(self) -> tirx.PrimFunc | None:
        self.inline_elementwise()
        if tvm_winograd.is_winograd(self.sch):
            tvm_winograd.schedule(self.sch, self.lanes, self.registers)
            return self.sch.mod["main"]
        reductions = [b for b in self.blocks() if self.is_reduction(b)]
        for b in reductions:
            saved, packed = self.sch.copy(), dict(self.packed)
            try:
                self.schedule_reduction(b)
            except Exception:  # noqa: BLE001 - an unexpected shape: keep the kernel unscheduled
                self.sch, self.packed = saved, packed
        for b in self.blocks():
            if self.is_reduction(b):
                continue
            if self.sch.get_loops(b) and any(
                self.sch.get(lp).kind != tirx.ForKind.SERIAL for lp in self.sch.get_loops(b)
            ):
                continue
            saved = self.sch.copy()
            try:
                self.schedule_spatial(b)
            except Exception:  # noqa: BLE001
                self.sch = saved
        return self.sch.mod["main"]


@tvm.transform.module_pass(opt_level=0, name="ApplyCPUSchedules")
class ApplyCPUSchedules:
    """Module pass: give every unscheduled PrimFunc the default CPU schedule for ``target``."""

    def __init__(self, target: tvm.target.Target) -> None:
        self.lanes = vector_lanes(target)
        self.registers = vector_registers(target)

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        packs: dict[tvm.ir.GlobalVar, tuple[tirx.PrimFunc, dict[int, int]]] = {}
        constant = _constant_params(mod)
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", 0):
                continue
            try:
                kernel = _Kernel(func, self.lanes, self.registers, constant.get(gv.name_hint, frozenset()))
                new = kernel.run()
            except Exception:  # noqa: BLE001 - never fail a compile over a schedule
                continue
            if new is None:
                continue
            new = new.with_attr("tirx.is_scheduled", True)
            if kernel.packed:
                packs[gv] = (new, kernel.packed)
            else:
                updates[gv] = new
        for gv, func in updates.items():
            mod[gv] = func
        return _pack_constants(mod, packs) if packs else mod


_CALL_TIR = "relax.call_tir"


def _tir_calls(mod: tvm.IRModule):
    """(caller, call) for every ``call_tir`` in the module's Relax functions."""
    found = []
    for _gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func,
                lambda e: (
                    found.append(e)
                    if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == _CALL_TIR
                    else None
                ),
            )
    return found


def _constant_params(mod: tvm.IRModule) -> dict[str, frozenset[str]]:
    """For each PrimFunc, the names of its parameters that every ``call_tir`` passes a constant."""
    result: dict[str, frozenset[str]] = {}
    for call in _tir_calls(mod):
        name = call.args[0].name_hint
        func = mod[call.args[0]]
        args = list(call.args[1].fields) if isinstance(call.args[1], relax.Tuple) else [call.args[1]]
        const = frozenset(p.name for p, a in zip(func.params, args) if isinstance(a, tvm.ir.expr.Constant))
        result[name] = result[name] & const if name in result else const
    return result


def _pack_constants(
    mod: tvm.IRModule, packs: dict[tvm.ir.GlobalVar, tuple[tirx.PrimFunc, dict[int, int]]]
) -> tvm.IRModule:
    """Swap in kernels whose weight parameters were repacked and relayout the constants their calls pass
    (HWIO -> ``[O / vec, H, W, I, vec]``).

    A kernel's signature changed, so it gets a new GlobalVar (a GlobalVar carries its function's type).
    """
    bb = relax.BlockBuilder(mod)
    swap = {old: (bb.add_func(func, old.name_hint), todo) for old, (func, todo) in packs.items()}
    mod = bb.get()

    def packed(const: tvm.ir.expr.Constant, vec: int) -> tvm.ir.expr.Constant:
        w = const.value.numpy()
        h, kw, c, o = w.shape
        return relax.const(np.ascontiguousarray(w.reshape(h, kw, c, o // vec, vec).transpose(3, 0, 1, 2, 4)))

    @relax.expr_functor.mutator
    class _Pack(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == _CALL_TIR):
                return call
            hit = swap.get(call.args[0])
            if hit is None:
                return call
            gv, todo = hit
            fields = list(call.args[1].fields)
            for i, vec in todo.items():
                fields[i] = packed(fields[i], vec)
            return relax.Call(call.op, [gv, relax.Tuple(fields), *call.args[2:]], call.attrs, call.ty_args)

    funcs = {}
    for gv, func in mod.functions_items():
        if gv in swap:
            continue
        funcs[gv] = _Pack(mod).visit_expr(func) if isinstance(func, relax.Function) else func
    return tvm.IRModule(funcs, attrs=mod.attrs)


def tune(mod: tvm.IRModule, target: tvm.target.Target, trials: int, work_dir: Path | None) -> tvm.IRModule:
    """MetaSchedule-tune the module's kernels (``trials`` in total); see :mod:`.tvm_tune`."""
    from .tvm_tune import tune as _tune

    return _tune(mod, target, trials, work_dir)
