"""Fused multi-head attention for the CPU: ``softmax(Q K^T * scale + mask) V`` in one TensorIR kernel.

A BERT-like encoder imported from ONNX computes attention as eight Relax ops: per-head reshapes and
transposes of Q, K and V, a batch matmul for the scores, the scale, the mask add, a softmax, a second batch
matmul and a transpose back. Legalized, that is five kernels and four ``[heads, seq, seq]`` / ``[seq, heads,
dim]`` tensors written and read again (MiniLM-L6, seq 128, 1 thread: 0.38 ms a layer; the same in the dense
and the sparse bundle, so it bounds what sparse weights can gain end to end).

:func:`attention_kernel` reads Q, K, V as the projections wrote them (``[batch, seq, heads * dim]``) and
writes the output in the same layout, so no transpose is left. One work item is one (batch, head): its K
slice is transposed once into a scratch ``[dim, seq]`` buffer; then for each query row the scores are
``chains`` vector accumulators over the keys (one broadcast of ``q[d]`` and one FMA per vector per ``d``),
scaled and masked as they are stored, the row's max and the exponentials (:func:`.tvm_fastmath.fast_exp`,
a vector polynomial) and their sum follow, and the output row is ``sum_j p[j] * v[j, :]`` over four
independent accumulators, divided by the sum once at the end (no normalised probability row is written).

:func:`fuse_attention` is the Relax pass (run before the row-wise softmax pass) that finds the pattern and
replaces the final ``reshape`` by ``call_tir`` of the kernel; the ops it replaces become dead code. Start
reading at :func:`fuse_attention`.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from .tvm_fastmath import fast_exp
from .tvm_tiles import const_int

__all__ = ["KERNEL_NAME", "attention_kernel", "fuse_attention"]

#: Name of the kernels this module emits.
KERNEL_NAME = "attention"
#: Most independent score accumulators (vectors of keys) per query row (x ROWS: 16 of the 32 AVX-512
#: registers; measured at seq 128, 12 heads of 32: 8 rows x 2 chains 0.21 ms, 4 x 4 0.23, 1 x 8 0.36).
MAX_CHAINS = 2
#: Independent output accumulators per row (keys taken this many at a time; the rows are independent too).
OUT_CHAINS = 1
#: Query rows computed together (each key / value vector loaded once for all of them).
ROWS = 8
#: Work (batch x heads x seq^2 x dim) before the heads run in parallel.
PARALLEL_MIN = 1 << 16


def attention_kernel(
    batch: int,
    seq: int,
    heads: int,
    dim: int,
    scale: float,
    mask_shape: tuple[int, ...],
    lanes: int,
    registers: int = 32,
) -> tirx.PrimFunc:
    """``out[b, i, h*dim:(h+1)*dim] = softmax(q_h[i] . k_h^T * scale + mask[b, 0, i, :]) @ v_h`` for ``q, k, v``
    of shape ``[batch, seq, heads * dim]`` and an additive ``mask`` of shape ``mask_shape`` = ``(1 | batch, 1,
    1 | seq, seq)`` (broadcast over heads); ``seq`` a whole number of ``lanes``; ``registers``: vector
    registers of the target (bounds the row tile)."""
    width = heads * dim
    nv = seq // lanes
    chains = max(c for c in range(1, min(nv, MAX_CHAINS) + 1) if nv % c == 0)
    groups = nv // chains
    mb, _, mq, _ = mask_shape
    outer = T.parallel if batch * heads * seq * seq * dim >= PARALLEL_MIN else T.serial
    out_chains = max(c for c in range(1, OUT_CHAINS + 1) if seq % c == 0)
    # score and output accumulators each within half the vector registers
    budget = max(1, min(registers // 2 // chains, registers // 2 // (out_chains * -(-dim // lanes))))
    rows = max(r for r in range(1, min(ROWS, budget) + 1) if seq % r == 0)

    @T.prim_func(private=True)
    def kernel(
        q: T.Buffer((batch, seq, width), "float32"),
        k: T.Buffer((batch, seq, width), "float32"),
        v: T.Buffer((batch, seq, width), "float32"),
        mask: T.Buffer(mask_shape, "float32"),
        out: T.Buffer((batch, seq, width), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for p in outer(batch * heads):
            kt = T.alloc_buffer((dim, seq), "float32")
            s = T.alloc_buffer((rows, seq), "float32")
            acc = T.alloc_buffer((rows, chains, lanes), "float32", scope="local")
            o = T.alloc_buffer((rows, out_chains, dim), "float32", scope="local")
            red = T.alloc_buffer((rows, 2), "float32", scope="local")
            for j in T.serial(seq):
                for d in T.serial(dim):
                    kt[d, j] = k[p // heads, j, p % heads * dim + d]
            for i0 in T.serial(seq // rows):
                # scores of `rows` query rows, scaled and masked
                for g in T.serial(groups):
                    for r in T.unroll(rows):
                        for c in T.unroll(chains):
                            for w in T.vectorized(lanes):
                                acc[r, c, w] = T.float32(0)
                    for d in T.serial(dim):
                        for r in T.unroll(rows):
                            for c in T.unroll(chains):
                                for w in T.vectorized(lanes):
                                    acc[r, c, w] = (
                                        acc[r, c, w]
                                        + q[p // heads, i0 * rows + r, p % heads * dim + d]
                                        * kt[d, (g * chains + c) * lanes + w]
                                    )
                    for r in T.unroll(rows):
                        for c in T.unroll(chains):
                            for w in T.vectorized(lanes):
                                s[r, (g * chains + c) * lanes + w] = (
                                    acc[r, c, w] * T.float32(scale)
                                    + mask[
                                        p // heads % mb, 0, (i0 * rows + r) % mq, (g * chains + c) * lanes + w
                                    ]
                                )
                # per row: max, exponentials, their sum
                for r in T.unroll(rows):
                    for w in T.vectorized(lanes):
                        acc[r, 0, w] = s[r, w]
                    for jv in T.serial(1, nv):
                        for w in T.vectorized(lanes):
                            acc[r, 0, w] = T.max(acc[r, 0, w], s[r, jv * lanes + w])
                    red[r, 0] = acc[r, 0, 0]
                    for w in T.serial(1, lanes):
                        red[r, 0] = T.max(red[r, 0], acc[r, 0, w])
                    for w in T.vectorized(lanes):
                        acc[r, 0, w] = T.float32(0)
                    for jv in T.serial(nv):
                        for w in T.vectorized(lanes):
                            s[r, jv * lanes + w] = fast_exp(s[r, jv * lanes + w] - red[r, 0])
                            acc[r, 0, w] = acc[r, 0, w] + s[r, jv * lanes + w]
                    red[r, 1] = T.float32(0)
                    for w in T.serial(lanes):
                        red[r, 1] = red[r, 1] + acc[r, 0, w]
                    red[r, 1] = T.float32(1) / red[r, 1]
                # output rows: sum_j p[j] v[j, :], then / sum
                for r in T.unroll(rows):
                    for c in T.unroll(out_chains):
                        for e in T.vectorized(dim):
                            o[r, c, e] = T.float32(0)
                for j4 in T.serial(seq // out_chains):
                    for c in T.unroll(out_chains):
                        for r in T.unroll(rows):
                            for e in T.vectorized(dim):
                                o[r, c, e] = (
                                    o[r, c, e]
                                    + s[r, j4 * out_chains + c]
                                    * v[p // heads, j4 * out_chains + c, p % heads * dim + e]
                                )
                for r in T.unroll(rows):
                    for c in T.unroll(1, out_chains):
                        for e in T.vectorized(dim):
                            o[r, 0, e] = o[r, 0, e] + o[r, c, e]
                    for e in T.vectorized(dim):
                        out[p // heads, i0 * rows + r, p % heads * dim + e] = o[r, 0, e] * red[r, 1]

    return kernel


def _scheduled(f: tirx.PrimFunc) -> tirx.PrimFunc:
    return f.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)  # opaque: never fused


def _shape(e: relax.Expr) -> list[int] | None:
    ty = getattr(e, "ty", None)
    dims = getattr(ty, "shape", None)
    if dims is None or str(getattr(ty, "dtype", "")) != "float32":
        return None
    out = [const_int(d) for d in dims]
    return None if None in out else out


def _scalar(e: relax.Expr) -> float | None:
    if isinstance(e, tvm.ir.expr.Constant):
        v = e.value.numpy()
        return float(v.reshape(())) if v.size == 1 else None
    return None


def fuse_attention(lanes: int, registers: int = 32) -> tvm.transform.Pass:
    """Relax pass: ``reshape(permute_dims(matmul(softmax(matmul(Qh, Kh^T) * c + mask), Vh), [0, 2, 1, 3]),
    [b, seq, heads * dim])`` with ``Qh = permute_dims(q4, [0, 2, 1, 3])``, ``Kh^T = permute_dims(k4, [0, 2, 3,
    1])``, ``Vh = permute_dims(v4, [0, 2, 1, 3])`` (``q4, k4, v4``: ``[b, seq, heads, dim]``; the scale a
    multiply or a divide by a scalar, either operand order; the mask 4-D, one head) becomes ``call_tir`` of
    :func:`attention_kernel` on ``q4, k4, v4`` viewed as ``[b, seq, heads * dim]``."""

    def is_op(e: relax.Expr | None, name: str) -> bool:
        return isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == name

    def axes(e: relax.Call) -> list[int] | None:
        a = e.attrs.axes
        return None if a is None else [int(x) for x in a]

    @relax.expr_functor.mutator
    class _Attention(relax.PyExprMutator):
        def _bound(self, e: relax.Expr) -> relax.Expr | None:
            return self.lookup_binding(e) if isinstance(e, relax.Var) else None

        def _heads(self, e: relax.Expr, order: list[int]) -> relax.Expr | None:
            """``x4`` when ``e`` is ``permute_dims(x4, order)``."""
            b = self._bound(e)
            return b.args[0] if is_op(b, "relax.permute_dims") and axes(b) == order else None

        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if not is_op(call, "relax.reshape"):
                return call
            found = self._match(call)
            return call if found is None else found

        def _match(self, call: relax.Call) -> relax.Expr | None:
            out_shape = _shape(call)
            o4 = self._heads(call.args[0], [0, 2, 1, 3])
            pv = self._bound(o4) if o4 is not None else None
            if out_shape is None or len(out_shape) != 3 or not is_op(pv, "relax.matmul"):
                return None
            sm = self._bound(pv.args[0])
            v4 = self._heads(pv.args[1], [0, 2, 1, 3])
            if not is_op(sm, "relax.nn.softmax") or int(sm.attrs.axis) not in (-1, 3) or v4 is None:
                return None
            masked = self._bound(sm.args[0])
            if not is_op(masked, "relax.add"):
                return None
            for scaled_var, mask in (masked.args, masked.args[::-1]):  # noqa: B007 (the mask is used after)
                scaled = self._bound(scaled_var)
                if is_op(scaled, "relax.multiply") or is_op(scaled, "relax.divide"):
                    break
            else:
                return None
            a, b = scaled.args
            if is_op(scaled, "relax.multiply") and _scalar(a) is not None:
                a, b = b, a
            c = _scalar(b)
            if c is None or c == 0:
                return None
            scale = c if is_op(scaled, "relax.multiply") else 1.0 / c
            qk = self._bound(a)
            if not is_op(qk, "relax.matmul"):
                return None
            q4 = self._heads(qk.args[0], [0, 2, 1, 3])
            k4 = self._heads(qk.args[1], [0, 2, 3, 1])
            if q4 is None or k4 is None:
                return None
            shapes = [_shape(x) for x in (q4, k4, v4)]
            if any(s is None or len(s) != 4 for s in shapes) or not shapes[0] == shapes[1] == shapes[2]:
                return None
            batch, seq, heads, dim = shapes[0]
            m = _shape(mask)
            if (m is None or len(m) != 4 or m[0] not in (1, batch) or m[1] != 1 or m[2] not in (1, seq)
                    or m[3] != seq or out_shape != [batch, seq, heads * dim] or seq % lanes):  # fmt: skip
                return None
            views = [self.builder_.emit(relax.op.reshape(x, [batch, seq, heads * dim])) for x in (q4, k4, v4)]
            func = _scheduled(attention_kernel(batch, seq, heads, dim, scale, tuple(m), lanes, registers))
            gv = self.builder_.add_func(func, KERNEL_NAME)
            return relax.call_tir(gv, [*views, mask], relax.TensorType(out_shape, "float32"))

    @tvm.transform.module_pass(opt_level=0, name="FuseAttention")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mutator = _Attention(mod)
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
                mod = mutator.builder_.get()
        return relax.transform.DeadCodeElimination()(mod)

    return _pass


def reference(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, heads: int, scale: float
) -> np.ndarray:
    """numpy reference of :func:`attention_kernel` (float64), for tests."""
    b, seq, width = q.shape
    dim = width // heads
    split = lambda x: x.astype(np.float64).reshape(b, seq, heads, dim).transpose(0, 2, 1, 3)
    s = split(q) @ split(k).transpose(0, 1, 3, 2) * scale + mask
    s = np.exp(s - s.max(axis=-1, keepdims=True))
    s /= s.sum(axis=-1, keepdims=True)
    return (s @ split(v)).transpose(0, 2, 1, 3).reshape(b, seq, width)
