"""Sparse kernels in TensorIR and the Relax pass that puts them in place of dense layers.

A layer whose constant weight has many zeros (``onnxprune prune --sparsity``, or any pruned model) can run as
a block-sparse kernel over the compressed weight (:class:`.sparse_formats.BSR`: values, K-block indices,
block-column pointers). Three kernels are written here as TIR, scheduled by hand (register tile, vector
width of the target):

* :func:`cpu_matmul_kernel`: ``Y[M, N] = X[M, K] @ W[K, N]`` (Gemm / MatMul with a constant weight). One
  work item is a tile of ``rows`` inputs by one block column (``bn`` outputs); the accumulator tile
  ``[rows, bn]`` lives in registers; for each stored block and each of its ``bk`` reduction rows the kernel
  broadcasts ``rows`` input values and issues ``rows`` vector FMAs of width ``bn``. Zero blocks cost nothing.
* :func:`cpu_conv_kernel`: a direct NHWC convolution (1x1 pointwise and KxK, any stride/dilation, groups 1)
  with the same inner loop: the reduction index ``k`` of the ``[KH*KW*C, N]`` weight is decoded into
  ``(kh, kw, c)`` once per reduction row (im2col without the copy); the tile is ``rows`` neighbouring output
  pixels of one output row. The input is zero-padded by a separate ``nn.pad``.
* :func:`cuda_matmul_kernel`: the matmul for CUDA, one thread per output (block column on ``blockIdx.x``,
  input rows on ``blockIdx.y``, the block's ``bn`` outputs on ``threadIdx.x``).

Each kernel has a fused epilogue: ``+ bias`` then ``max(lo)`` / ``min(hi)`` (ReLU, ReLU6), so the sparse
kernel replaces the dense kernel *with* its epilogue (:func:`fuse_epilogues`).

:func:`sparsify` is the Relax pass (run after the NHWC layout conversion, before the Winograd pass and
channel padding): for each ``matmul`` / ``conv2d`` with a constant weight it asks a ``decide`` callback
(:mod:`.tvm_sparse_choice` times dense against sparse) and, when told, replaces the op by ``call_tir`` of a
sparse kernel whose compressed weights are constants, which :func:`.tvm_backend.lift_weights` then moves
into the bundle's weights file (so the file shrinks with the sparsity). Start reading at :func:`sparsify`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from .sparse_formats import BSR, to_bsr
from .tvm_sparse_group import cpu_group_kernel, group_kernel_applies
from .tvm_sparse_matmul import cpu_block_matmul_kernel, rows_tile

__all__ = [
    "KERNEL_PREFIX",
    "Layer",
    "cpu_conv_kernel",
    "cpu_matmul_kernel",
    "cuda_matmul_kernel",
    "fuse_epilogues",
    "sparsify",
]

#: Name prefix of every sparse kernel (the manifest, the schedules and the tests find them by it).
KERNEL_PREFIX = "sparse_"
#: Multiply-adds (stored) before a kernel's tiles run in parallel.
PARALLEL_MIN_WORK = 1 << 16
#: Most input rows in one register tile (more unrolls for little gain).
MAX_ROWS = 8
#: Independent accumulators per output vector (covers the FMA latency when the row tile is short).
CHAINS = 4
_BIG = 3.0e38


@dataclass(frozen=True)
class Layer:
    """A dense layer the pass could make sparse, as :func:`sparsify` found it.

    Attributes:
        index: Order in the model (0, 1, …), the manifest's layer id with ``kind``.
        kind: ``"matmul"`` or ``"conv2d"``.
        weight: The constant weight as ``[K, N]`` (a conv's HWIO flattened to ``[KH*KW*C, N]``).
        x_shape: The input's static shape (NHWC for a conv).
        conv: For a conv: ``(KH, KW, strides, padding (top, left, bottom, right), dilation)``.
        out_shape: The output's static shape.
    """

    index: int
    kind: str
    weight: np.ndarray
    x_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    conv: tuple | None = None

    @property
    def name(self) -> str:
        k, n = self.weight.shape
        if self.conv is None:
            return f"matmul{self.index}[{k}x{n}]"
        kh, kw = self.conv[:2]
        return f"conv{self.index}[{kh}x{kw}x{k // (kh * kw)}->{n}]"

    @property
    def rows(self) -> int:
        """Input rows of the matmul the layer is (batch x pixels)."""
        return int(np.prod(self.out_shape[:-1]))


def cpu_matmul_kernel(
    m: int, bsr: BSR, lanes: int, registers: int, lo: float = -_BIG, hi: float = _BIG
) -> tirx.PrimFunc:
    """``y[1, 1, m, n] = clip(x[1, 1, m, k] @ W + bias, lo, hi)`` for a BSR weight: with output blocks
    (``bn > 1``) :func:`.tvm_sparse_matmul.cpu_block_matmul_kernel`, with runs along K the conv kernel with a
    1x1 window over an ``m``-pixel image (the Relax side reshapes to and from 4-D, which costs nothing)."""
    k, n = bsr.shape
    if bsr.block[1] > 1:  # output blocks: the direct kernel (no conv index decoding)
        return cpu_block_matmul_kernel(m, bsr, lanes, registers, lo, hi)
    return cpu_conv_kernel((1, 1, m, k), (1, 1, m, n), (1, 1, (1, 1), (0, 0, 0, 0), (1, 1)), bsr, lanes,
                           registers, lo, hi)  # fmt: skip


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


# ------------------------------------------------------------------------------------------------
# The Relax pass
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """What :func:`sparsify`'s ``decide`` callback answers for a layer it wants sparse: the block shape."""

    block: tuple[int, int]


@dataclass
class _Made:
    """A sparse call the pass emitted (so epilogue ops can be fused into it)."""

    layer: Layer
    bsr: BSR
    lo: float = -_BIG
    hi: float = _BIG
    has_bias: bool = False


@dataclass
class KernelFactory:
    """Makes the PrimFunc of a sparse call for the target (CPU or CUDA)."""

    lanes: int
    registers: int
    gpu: bool = False
    made: dict[str, _Made] = field(default_factory=dict)

    def func(self, made: _Made) -> tirx.PrimFunc:
        layer = made.layer
        if self.gpu:
            f = cuda_matmul_kernel(layer.rows, made.bsr, made.lo, made.hi)
        elif group_kernel_applies(made.bsr, layer.rows, self.lanes, (1, 1) if layer.conv is None else layer.conv[:2]):
            k, n = layer.weight.shape
            x_shape, out_shape = ((1, 1, layer.rows, k), (1, 1, layer.rows, n)) if layer.conv is None else (
                _padded(layer), layer.out_shape)  # fmt: skip
            strides = (1, 1) if layer.conv is None else layer.conv[2]
            f = cpu_group_kernel(x_shape, out_shape, strides, made.bsr, self.lanes, made.lo, made.hi)
        elif layer.conv is None:
            f = cpu_matmul_kernel(layer.rows, made.bsr, self.lanes, self.registers, made.lo, made.hi)
        else:
            f = cpu_conv_kernel(_padded(layer), layer.out_shape, layer.conv, made.bsr, self.lanes,
                                self.registers, made.lo, made.hi)  # fmt: skip
        return f.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)  # opaque: never fused


def _padded(layer: Layer) -> tuple[int, ...]:
    n, h, w, c = layer.x_shape
    top, left, bottom, right = layer.conv[3]
    return (n, h + top + bottom, w + left + right, c)


def _static(shape: object) -> tuple[int, ...] | None:
    try:
        return tuple(int(d) for d in shape.values)  # type: ignore[attr-defined]
    except (TypeError, AttributeError):
        return None


def _const(call_arg: relax.Expr) -> np.ndarray | None:
    return call_arg.value.numpy() if isinstance(call_arg, tvm.ir.expr.Constant) else None


def sparsify(
    decide: Callable[[Layer, str], Decision | None],
    lanes: int,
    registers: int,
    gpu: bool = False,
    record: list | None = None,
) -> tvm.transform.Pass:
    """Relax pass: replace each ``matmul`` / NHWC ``conv2d`` (groups 1) with a constant float32 weight by a
    sparse kernel when ``decide(layer, function name)`` returns a :class:`Decision` for it, then fuse bias / ReLU / ReLU6 epilogues
    into the sparse kernels (:func:`fuse_epilogues`). On CUDA only matmuls are considered.

    ``record`` (when given) receives every :class:`Layer` offered to ``decide``, in model order.
    """
    factory = KernelFactory(lanes, registers, gpu)
    seen: list[Layer] = record if record is not None else []

    @relax.expr_functor.mutator
    class _Sparsify(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op):
                return call
            layer = self._layer(call)
            if layer is None:
                return call
            seen.append(layer)
            decision = decide(layer, self.func_name)
            if decision is None:
                return call
            bsr = to_bsr(layer.weight, decision.block)
            x = call.args[0]
            if layer.conv is not None:
                top, left, bottom, right = layer.conv[3]
                if top or left or bottom or right:
                    x = self.builder_.normalize(relax.op.nn.pad(x, [0, 0, top, bottom, left, right, 0, 0]))
            elif not gpu:
                x = self.builder_.normalize(relax.op.reshape(x, [1, 1, layer.rows, layer.weight.shape[0]]))
            elif len(layer.x_shape) != 2:
                x = self.builder_.normalize(relax.op.reshape(x, [layer.rows, layer.weight.shape[0]]))
            return self._emit(_Made(layer, bsr), x, relax.const(np.zeros(layer.weight.shape[1], np.float32)))

        def _emit(self, made: _Made, x: relax.Expr, bias: relax.Expr) -> relax.Expr:
            gv = self.builder_.add_func(factory.func(made), f"{KERNEL_PREFIX}{made.layer.kind}")
            factory.made[gv.name_hint] = made
            layer = made.layer
            n = layer.weight.shape[1]
            out_shape = (
                layer.out_shape
                if layer.conv is not None
                else (layer.rows, n)
                if gpu
                else (1, 1, layer.rows, n)
            )
            args = [x, relax.const(made.bsr.data), relax.const(made.bsr.indices), relax.const(made.bsr.indptr),
                    bias]  # fmt: skip
            y = relax.call_tir(gv, args, relax.TensorType(out_shape, "float32"))
            if tuple(out_shape) != tuple(layer.out_shape):
                y = relax.op.reshape(self.builder_.normalize(y), layer.out_shape)
            return y

        def _layer(self, call: relax.Call) -> Layer | None:
            name = call.op.name
            if name not in ("relax.matmul", "relax.nn.conv2d") or (gpu and name != "relax.matmul"):
                return None
            w = _const(call.args[1])
            x_shape = _static(getattr(call.args[0].ty, "shape", None))
            out_shape = _static(getattr(call.ty, "shape", None))
            if w is None or w.dtype != np.float32 or x_shape is None or out_shape is None:
                return None
            if str(call.args[0].ty.dtype) != "float32":
                return None
            if name == "relax.matmul":
                if w.ndim != 2 or len(x_shape) < 2:
                    return None
                return Layer(len(seen), "matmul", w, x_shape, out_shape)
            a = call.attrs
            if (a.data_layout != "NHWC" or a.kernel_layout != "HWIO" or int(a.groups) != 1
                    or (a.out_layout or "NHWC") != "NHWC" or len(x_shape) != 4):  # fmt: skip
                return None
            kh, kw, c, n = w.shape
            conv = (kh, kw, tuple(int(s) for s in a.strides), tuple(int(p) for p in a.padding),
                    tuple(int(d) for d in a.dilation))  # fmt: skip
            return Layer(len(seen), "conv2d", w.reshape(kh * kw * c, n), x_shape, out_shape, conv)

    @tvm.transform.module_pass(opt_level=0, name="SparsifyWeights")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mutator = _Sparsify(mod)
                mutator.func_name = gv.name_hint
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
                mod = mutator.builder_.get()
        mod = relax.transform.DeadCodeElimination()(mod)
        return fuse_epilogues(factory)(mod) if factory.made else mod

    return _pass


def _scalar(e: relax.Expr) -> float | None:
    v = _const(e)
    return float(v) if v is not None and v.size == 1 else None


def fuse_epilogues(factory: KernelFactory) -> tvm.transform.Pass:
    """Relax pass: fold ``add(sparse, bias)``, ``maximum(sparse, lo)``, ``minimum(sparse, hi)`` into the sparse
    kernel that produced the value (a bias that is constant along all but the last axis; scalar bounds), when
    the sparse value has no other use. The replaced call becomes dead code."""

    def uses(func: relax.Function) -> dict[relax.Var, int]:
        count: dict[relax.Var, int] = {}

        def visit(e: relax.Expr) -> None:
            if isinstance(e, relax.Call):
                for a in list(e.args) + [f for t in e.args if isinstance(t, relax.Tuple) for f in t.fields]:
                    if isinstance(a, relax.Var):
                        count[a] = count.get(a, 0) + 1

        relax.analysis.post_order_visit(func, visit)
        return count

    @relax.expr_functor.mutator
    class _Fuse(relax.PyExprMutator):
        def __init__(self, mod: tvm.IRModule, n_uses: dict) -> None:
            super().__init__(mod)
            self.n_uses = n_uses

        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or call.op.name not in (
                "relax.add", "relax.maximum", "relax.minimum", "relax.nn.relu"
            ):  # fmt: skip
                return call
            value, other = call.args[0], (call.args[1] if len(call.args) > 1 else None)
            if call.op.name == "relax.add" and _const(value) is not None:
                value, other = other, value  # bias + x (Hugging Face exports)
            src = value
            inner = self.lookup_binding(src) if isinstance(src, relax.Var) else None
            reshape_to = None
            if isinstance(inner, relax.Call) and inner.op == tvm.ir.Op.get("relax.reshape"):
                reshape_to, src = inner.args[1], inner.args[0]
                inner = self.lookup_binding(src) if isinstance(src, relax.Var) else None
            if not (isinstance(inner, relax.Call) and inner.op == tvm.ir.Op.get("relax.call_tir")):
                return call
            made = factory.made.get(inner.args[0].name_hint)
            # only the sparse value's one consumer (vars made in this round have no count yet: next round)
            if made is None or self.n_uses.get(src) != 1 or self.n_uses.get(value) != 1:
                return call
            n = made.layer.weight.shape[1]
            new = _Made(made.layer, made.bsr, made.lo, made.hi, made.has_bias)
            fields = list(inner.args[1].fields)
            if call.op.name == "relax.add":
                b = _const(other)
                if made.has_bias or made.lo > -_BIG or made.hi < _BIG or b is None or b.size != n:
                    return call
                if b.shape[-1] != n:
                    return call
                fields[4] = relax.const(b.reshape(n).astype(np.float32))
                new.has_bias = True
            else:
                bound = 0.0 if call.op.name == "relax.nn.relu" else _scalar(other)
                if bound is None:
                    return call
                if call.op.name in ("relax.maximum", "relax.nn.relu") and made.hi >= _BIG:
                    new.lo = max(made.lo, bound)
                elif call.op.name == "relax.minimum":
                    new.hi = min(made.hi, bound)
                else:
                    return call
            gv = self.builder_.add_func(factory.func(new), f"{KERNEL_PREFIX}{made.layer.kind}")
            factory.made[gv.name_hint] = new
            y = relax.call_tir(gv, fields, inner.ty)
            if reshape_to is not None:
                y = relax.op.reshape(self.builder_.normalize(y), reshape_to)
            return y

    @tvm.transform.module_pass(opt_level=0, name="FuseSparseEpilogues")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for _round in range(4):  # bias, then lo, then hi: one op per round (each needs the previous fused)
            for gv, func in list(mod.functions_items()):
                if isinstance(func, relax.Function):
                    mutator = _Fuse(mod, uses(func))
                    mutator.builder_.update_func(gv, mutator.visit_expr(func))
                    mod = mutator.builder_.get()
            mod = relax.transform.DeadCodeElimination()(mod)
        return _drop_uncalled(mod)

    return _pass


def _drop_uncalled(mod: tvm.IRModule) -> tvm.IRModule:
    """Remove the sparse kernels no call refers to any more (those an epilogue was fused past)."""
    called: set[str] = set()

    def visit(e: relax.Expr) -> None:
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir":
            called.add(e.args[0].name_hint)

    for _gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    keep = {gv: f for gv, f in mod.functions_items()
            if not (gv.name_hint.startswith(KERNEL_PREFIX) and gv.name_hint not in called)}  # fmt: skip
    return tvm.IRModule(keep, attrs=mod.attrs)
