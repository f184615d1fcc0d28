"""Row-wise kernels for the CPU: softmax and LayerNorm over the innermost axis, written as scheduled TensorIR.

TVM legalizes ``softmax`` and ``layer_norm`` into reduction blocks that the generic register-tile rule
(:mod:`.tvm_schedules`) vectorises *across* rows, so every element is a strided gather, and the exponential
is evaluated twice as a scalar libm call. In a BERT-like encoder they then took a quarter of the time
(MiniLM-L6, seq 128: softmax 14.5 of 100 ms, LayerNorm 8.9 ms), the same in the dense and the sparse bundle.

Here each row is one work item (rows run in parallel): the row is walked in whole vectors with per-lane
partial results (max / sum / sum of squares), reduced once per row; the exponential is a vectorisable
polynomial (:func:`.tvm_fastmath.fast_exp`) instead of a libm call. Softmax makes
three passes over the row (max, exp + sum, scale), LayerNorm three (mean, variance about the mean, normalise:
two-pass for the same accuracy as the reference).

:func:`rowwise_ops` is the Relax pass (run with the layout passes of :mod:`.tvm_layout`) that replaces
``nn.softmax`` / ``nn.layer_norm`` over the last axis by ``call_tir`` of these kernels when the row length is
a whole number of vectors. Start reading at :func:`softmax_kernel`.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from .tvm_fastmath import fast_exp
from .tvm_tiles import const_int

__all__ = ["layer_norm_kernel", "rowwise_ops", "softmax_kernel"]

#: Rows x row length before a row-wise kernel runs its rows in parallel.
PARALLEL_MIN = 1 << 14
#: Name prefix of the kernels this module emits.
KERNEL_PREFIX = "rowwise_"

def softmax_kernel(rows: int, length: int, lanes: int) -> tirx.PrimFunc:
    """``y[r, :] = softmax(x[r, :])`` for a ``[rows, length]`` input, ``length % lanes == 0``."""
    nv = length // lanes
    outer = T.parallel if rows * length >= PARALLEL_MIN else T.serial

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((rows, length), "float32"), y: T.Buffer((rows, length), "float32")):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):  # a root block: RewriteDataflowReshape inspects one-in one-out kernels
            for r in outer(rows):
                part = T.alloc_buffer((lanes,), "float32", scope="local")
                red = T.alloc_buffer((2,), "float32", scope="local")
                for v in T.vectorized(lanes):
                    part[v] = x[r, v]
                for j in T.serial(1, nv):
                    for v in T.vectorized(lanes):
                        part[v] = T.max(part[v], x[r, j * lanes + v])
                red[0] = part[0]
                for v in T.serial(1, lanes):
                    red[0] = T.max(red[0], part[v])
                for v in T.vectorized(lanes):
                    part[v] = T.float32(0)
                for j in T.serial(nv):
                    for v in T.vectorized(lanes):
                        y[r, j * lanes + v] = fast_exp(x[r, j * lanes + v] - red[0])
                        part[v] = part[v] + y[r, j * lanes + v]
                red[1] = T.float32(0)
                for v in T.serial(lanes):
                    red[1] = red[1] + part[v]
                red[1] = T.float32(1) / red[1]
                for j in T.serial(nv):
                    for v in T.vectorized(lanes):
                        y[r, j * lanes + v] = y[r, j * lanes + v] * red[1]

    return kernel


def layer_norm_kernel(rows: int, length: int, lanes: int, epsilon: float) -> tirx.PrimFunc:
    """``y[r, :] = (x[r, :] - mean) / sqrt(var + eps) * gamma + beta`` for a ``[rows, length]`` input."""
    nv = length // lanes
    outer = T.parallel if rows * length >= PARALLEL_MIN else T.serial
    inv_len = 1.0 / length

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((rows, length), "float32"),
        gamma: T.Buffer((length,), "float32"),
        beta: T.Buffer((length,), "float32"),
        y: T.Buffer((rows, length), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for r in outer(rows):
            part = T.alloc_buffer((lanes,), "float32", scope="local")
            red = T.alloc_buffer((2,), "float32", scope="local")
            for v in T.vectorized(lanes):
                part[v] = T.float32(0)
            for j in T.serial(nv):
                for v in T.vectorized(lanes):
                    part[v] = part[v] + x[r, j * lanes + v]
            red[0] = T.float32(0)
            for v in T.serial(lanes):
                red[0] = red[0] + part[v]
            red[0] = red[0] * T.float32(inv_len)
            for v in T.vectorized(lanes):
                part[v] = T.float32(0)
            for j in T.serial(nv):
                for v in T.vectorized(lanes):
                    part[v] = part[v] + (x[r, j * lanes + v] - red[0]) * (x[r, j * lanes + v] - red[0])
            red[1] = T.float32(0)
            for v in T.serial(lanes):
                red[1] = red[1] + part[v]
            red[1] = T.float32(1) / T.sqrt(red[1] * T.float32(inv_len) + T.float32(epsilon))
            for j in T.serial(nv):
                for v in T.vectorized(lanes):
                    y[r, j * lanes + v] = (x[r, j * lanes + v] - red[0]) * red[1] * gamma[j * lanes + v] + beta[
                        j * lanes + v
                    ]

    return kernel


def _scheduled(f: tirx.PrimFunc) -> tirx.PrimFunc:
    return f.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)  # opaque: never fused


def rowwise_ops(lanes: int) -> tvm.transform.Pass:
    """Relax pass: ``nn.softmax`` and ``nn.layer_norm`` (scale and center) over the last axis of a static
    float32 tensor whose last axis is a whole number of ``lanes`` become ``call_tir`` of the kernels above
    (the input is viewed as ``[rows, length]``; the reshapes cost nothing)."""

    @relax.expr_functor.mutator
    class _Rowwise(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or call.op.name not in ("relax.nn.softmax", "relax.nn.layer_norm"):
                return call
            ty = call.args[0].ty
            shape = [const_int(d) for d in getattr(ty, "shape", None) or []]
            if not shape or None in shape or str(ty.dtype) != "float32":
                return call
            length, rank = shape[-1], len(shape)
            rows = int(np.prod(shape[:-1]))
            if length % lanes or length < lanes:
                return call
            a = call.attrs
            x = self.builder_.normalize(relax.op.reshape(call.args[0], [rows, length]))
            if call.op.name == "relax.nn.softmax":
                if int(a.axis) not in (-1, rank - 1):
                    return call
                func, args = softmax_kernel(rows, length, lanes), [x]
            else:
                axes = [int(ax) % rank for ax in a.axes]
                if axes != [rank - 1] or not (a.center and a.scale):
                    return call
                gamma, beta = call.args[1], call.args[2]
                if any([const_int(d) for d in g.ty.shape] != [length] for g in (gamma, beta)):
                    return call
                func, args = layer_norm_kernel(rows, length, lanes, float(a.epsilon)), [x, gamma, beta]
            gv = self.builder_.add_func(_scheduled(func), KERNEL_PREFIX + call.op.name.split(".")[-1])
            y = self.builder_.normalize(relax.call_tir(gv, args, relax.TensorType((rows, length), "float32")))
            return relax.op.reshape(y, shape)

    @tvm.transform.module_pass(opt_level=0, name="RowwiseKernels")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mutator = _Rowwise(mod)
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
                mod = mutator.builder_.get()
        return mod

    return _pass
