"""Default CPU schedules: fast kernels for x86 and AArch64 without a tuning run.

TVM's default CPU pipeline schedules nothing (every kernel is a naive loop nest, 30-100x slower than
onnxruntime). After the Relax passes of :mod:`.tvm_layout` (NHWC/HWIO layout, channels padded to whole
vectors, Winograd convolutions) this module gives every fused kernel a schedule chosen from its shape:

1. **Reductions** (:meth:`Kernel.schedule_reduction`): in each fused PrimFunc, element-wise blocks are
   inlined and the one reduction block (conv, depthwise, matmul/dense, pooling) is *register tiled*: the
   innermost output axis (channels / N) is split into ``lanes * k`` and vectorised, the next output axis
   (width / M) into a small unrolled tile, the reduction loops go in between, the accumulator tile lives in
   a local buffer (registers), and the epilogue (bias, BN, ReLU, residual add) is applied as the tile is
   written back. The outer output loops are fused and run in parallel when the kernel is big enough to pay
   for a fork. Padding stays a separate vectorised copy so the inner loop has no conditionals. The tile
   shape is chosen for the most FMAs per load that fit the register file (:func:`.tvm_tiles.register_tile`).
   Constant conv weights are **repacked at compile time** to ``[O / vec, H, W, I, vec]`` (each tile's weight
   slice contiguous, read front to back; :meth:`Kernel._pack_weights`, :func:`_pack_constants`).
2. **Winograd** kernels (:mod:`.tvm_winograd`) get their own schedule (the batched GEMM register tiled like
   every other reduction).
3. Whatever is left (transposes, concat, softmax …) gets the generic rule: fuse the loops, vectorise the
   innermost run, parallelise the rest.

A rule that fails (an unexpected shape) leaves its block as the naive loop nest; that is never silent: the
kernel is listed in :attr:`ApplyCPUSchedules.unscheduled` (the manifest's ``unscheduled_kernels``).

Start reading at :class:`ApplyCPUSchedules`. :mod:`.tvm_tune` runs MetaSchedule instead, with these
schedules as the candidates to beat.
"""

from __future__ import annotations

import contextlib

import numpy as np
import tvm
from tvm import relax, s_tir, tirx

from onnxprune import progress

from . import tvm_fastmath, tvm_winograd
from .tvm_tiles import const_int, largest_divisor, register_tile, vector_lanes, vector_registers

__all__ = ["ApplyCPUSchedules", "Kernel"]

#: Minimum work (multiply-adds) before a reduction kernel (conv, matmul) is run in parallel; below it the fork
#: costs more. Measured on the bundled Fashion-MNIST model (convs of 0.1-5.4 M MACs, 2 threads, warm runner):
#: all convs parallel 0.065 ms, those >= 1 M MACs 0.066, >= 4 M 0.083, none 0.099.
PARALLEL_MIN_WORK = 1 << 15
#: Minimum elements before an elementwise/pooling kernel is run in parallel.
SPATIAL_PARALLEL_MIN = 1 << 17


def _written_shape(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> list[int | None]:
    """Shape of the buffer a block writes (``TensorRegion.source`` is the buffer in TVM 0.27)."""
    region = sch.get(block).writes[0]
    buf = region.source if hasattr(region, "source") else region.buffer
    return [const_int(d) for d in buf.shape]


class Kernel:
    """Schedules one PrimFunc. Each public step leaves the schedule valid; a failure skips only itself and is
    recorded in :attr:`naive_blocks` (that block stays the naive loop nest)."""

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
        #: Output tiles ordered weight panel first, row tile second (set with a packed matmul weight).
        self.panel_major = False
        #: Blocks no rule could schedule, each with the reason: ``"conv2d_nhwc: ValueError: ..."``.
        self.naive_blocks: list[str] = []

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
                    except Exception:
                        continue
                    changed = True
                    break
                if changed:
                    break

    def schedule_reduction(self, block: s_tir.schedule.SBlockRV) -> bool:
        """Register-tile a reduction block (conv / depthwise / matmul / pooling), see the module doc.

        Returns:
            False (schedule untouched) when the block's loop nest is not one the rule handles.
        """
        sch = self.sch
        iters = sch.get(block).iter_vars
        loops = sch.get_loops(block)
        if len(loops) != len(iters):
            return False
        extents = [const_int(iv.dom.extent) for iv in iters]
        if any(e is None for e in extents):
            return False
        spatial = [i for i, iv in enumerate(iters) if iv.iter_type == tirx.IterVar.DataPar]
        reduce = [i for i, iv in enumerate(iters) if iv.iter_type == tirx.IterVar.CommReduce]
        if not spatial or len(spatial) + len(reduce) != len(iters):
            return False
        work = 1
        for e in extents:
            work *= e
        # Vector axis: the innermost spatial axis; tile axis: the next one out with extent > 1.
        v_axis = spatial[-1]
        t_axis = next((i for i in reversed(spatial[:-1]) if extents[i] > 1), None)
        vec, tile = register_tile(
            extents[v_axis], extents[t_axis] if t_axis is not None else 1, self.lanes, self.registers
        )
        self.panel_major = False
        if self._pack_weights(block, spatial, reduce, extents, vec):
            loops = sch.get_loops(block)
        v_out, v_in = sch.split(loops[v_axis], [None, vec])
        outer = [loops[i] for i in spatial if i not in (v_axis, t_axis)]
        if t_axis is not None:
            t_out, t_in = sch.split(loops[t_axis], [None, tile])
            # a matmul with a packed weight walks one weight panel ([K, vec], contiguous) over every row tile
            # before the next panel: the panel stays in L2 (128x384 @ 384x1536: 4.98 -> see _pack_weights)
            outer += [v_out, t_out] if self.panel_major else [t_out, v_out]
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
            with contextlib.suppress(Exception):
                sch.reverse_compute_inline(c)
        sch.reverse_compute_at(cache, outer[-1], preserve_unit_loops=True)
        self._vectorize_tail(cache, len(inner))
        if red:
            init = sch.decompose_reduction(block, red[0])
            self._vectorize_tail(init, len(inner))
        return True

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
        if not self.packable or vec % self.lanes:
            return False
        v_ext, i_ext = extents[spatial[-1]], extents[reduce[-1]]
        if len(reduce) == 1 and 2 <= len(spatial) <= 3:
            return self._pack_matmul_weight(block, i_ext, v_ext, vec)
        if len(spatial) != 4 or len(reduce) != 3 or v_ext <= vec:
            return False
        reads = self.sch.get(block).reads
        for i, region in enumerate(reads):
            buf = region.source
            shape = [const_int(d) for d in buf.shape]
            if buf.name in self.packable and len(shape) == 4 and shape[2:] == [i_ext, v_ext]:
                self.sch.transform_layout(block, ("read", i), lambda h, w, c, o: (o // vec, h, w, c, o % vec))
                self.packed[self.params.index(buf.name)] = vec
                return True
        return False

    def _pack_matmul_weight(self, block: s_tir.schedule.SBlockRV, k_ext: int, n_ext: int, vec: int) -> bool:
        """Repack a matmul's constant ``[K, N]`` weight as ``[N / vec, K, vec]`` (one register tile's panel
        contiguous) and walk the tiles panel by panel (:attr:`panel_major`).

        In ``[K, N]`` each reduction step of a tile reads ``vec`` floats ``N`` floats after the previous step's,
        and row tile after row tile streams the whole weight from L3 again. Packed and panel-major, a panel
        (``K * vec`` floats: 96 KiB for K=384, vec=64) is read front to back and then reused from L2 by every
        row tile. Measured (znver5, 2 threads, quiet): 128x384 @ 384x1536 4.98 -> 1.05 ms; 1x768 @ 768x3072
        265 -> 96 us (onnxruntime 114 us).
        """
        if n_ext <= vec:
            return False
        for i, region in enumerate(self.sch.get(block).reads):
            buf = region.source
            shape = [const_int(d) for d in buf.shape]
            if buf.name in self.packable and shape == [k_ext, n_ext]:
                self.sch.transform_layout(block, ("read", i), lambda k, n: (n // vec, k, n % vec))
                self.packed[self.params.index(buf.name)] = vec
                self.panel_major = True
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
        except Exception:
            pass

    def schedule_spatial(self, block: s_tir.schedule.SBlockRV) -> bool:
        """Generic rule: fuse all loops, vectorise the innermost ``lanes``, parallelise the rest.

        Returns:
            False (schedule untouched) when a loop extent is not static.
        """
        sch = self.sch
        loops = sch.get_loops(block)
        if not loops:
            return True  # a scalar: nothing to schedule
        extents = [const_int(sch.get(lp).extent) for lp in loops]
        if any(e is None for e in extents):
            return False
        total = 1
        for e in extents:
            total *= e
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        inner = extents[-1]
        vec = self.lanes if inner % self.lanes == 0 else largest_divisor(inner, self.lanes)
        if vec > 1 and total % vec == 0:
            outer, v = sch.split(fused, [None, vec])
            sch.vectorize(v)
        else:
            outer = fused
        if total >= SPATIAL_PARALLEL_MIN:
            sch.parallel(outer)
        return True

    def _try(self, rule, block: s_tir.schedule.SBlockRV, what: str) -> None:
        """Apply one rule to one block; on failure restore the schedule and record the block as naive."""
        name = self.sch.get(block).name_hint
        saved, packed = self.sch.copy(), dict(self.packed)
        try:
            if rule(block):
                return
            reason = f"{what} rule does not apply to its loop nest"
        except Exception as e:
            reason = f"{what} rule failed: {type(e).__name__}: {_last_line(e)}"
        self.sch, self.packed = saved, packed
        self.naive_blocks.append(f"{name}: {reason}")

    def run(self) -> tirx.PrimFunc:
        """Schedule the kernel and return it (a Winograd schedule failure raises: nothing was applied)."""
        self.inline_elementwise()
        if tvm_winograd.is_winograd(self.sch):
            tvm_winograd.schedule(self.sch, self.lanes, self.registers)
            return self.sch.mod["main"]
        for b in [b for b in self.blocks() if self.is_reduction(b)]:
            self._try(self.schedule_reduction, b, "register-tile")
        for b in self.blocks():
            if self.is_reduction(b):
                continue
            if self.sch.get_loops(b) and any(
                self.sch.get(lp).kind != tirx.ForKind.SERIAL for lp in self.sch.get_loops(b)
            ):
                continue
            self._try(self.schedule_spatial, b, "generic")
        return self.sch.mod["main"]


@tvm.transform.module_pass(opt_level=0, name="ApplyCPUSchedules")
class ApplyCPUSchedules:
    """Module pass: give every unscheduled PrimFunc the default CPU schedule for ``target``.

    Args:
        target: The LLVM target (vector width and register count come from it).
        unscheduled: Filled with every kernel left (wholly or in part) as a naive loop nest, by kernel
            name, with the reason; a schedule failure never fails the compile, and is never silent.
    """

    def __init__(self, target: tvm.target.Target, unscheduled: dict[str, str] | None = None) -> None:
        self.lanes = vector_lanes(target)
        self.registers = vector_registers(target)
        self.unscheduled = unscheduled if unscheduled is not None else {}
        tvm_fastmath.install()  # float32 exp / erf as vectorisable polynomials when the kernels are lowered

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        packs: dict[tvm.ir.GlobalVar, tuple[tirx.PrimFunc, dict[int, int]]] = {}
        constant = _constant_params(mod)
        todo = [
            (gv, func) for gv, func in mod.functions_items()
            if isinstance(func, tirx.PrimFunc) and not func.attrs.get("tirx.is_scheduled", 0)
        ]  # fmt: skip
        with progress.task("scheduling kernels", total=len(todo)) as job:
            for gv, func in job.track(todo):
                try:
                    kernel = Kernel(func, self.lanes, self.registers, constant.get(gv.name_hint, frozenset()))
                    new = kernel.run()
                except Exception as e:
                    self.unscheduled[gv.name_hint] = f"no schedule: {type(e).__name__}: {_last_line(e)}"
                    continue
                if kernel.naive_blocks:
                    self.unscheduled[gv.name_hint] = "; ".join(kernel.naive_blocks)
                new = new.with_attr("tirx.is_scheduled", True)
                if kernel.packed:
                    packs[gv] = (new, kernel.packed)
                else:
                    updates[gv] = new
        for gv, func in updates.items():
            mod[gv] = func
        return _pack_constants(mod, packs) if packs else mod


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


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
        if w.ndim == 2:  # a matmul weight [K, N] -> [N / vec, K, vec]
            k, n = w.shape
            return relax.const(np.ascontiguousarray(w.reshape(k, n // vec, vec).transpose(1, 0, 2)))
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
