"""The Relax pass that puts block-sparse TensorIR kernels in place of dense layers, with their epilogues.

A layer whose constant weight has many zeros (``onnxprune prune --sparsity``, or any pruned model) can run as
a block-sparse kernel over the compressed weight (:class:`.sparse_formats.BSR`: values, K-block indices,
block-column pointers). The kernels, scheduled by hand (register tile, vector width of the target):

* :func:`cpu_matmul_kernel`: ``Y[M, N] = X[M, K] @ W[K, N]`` (Gemm / MatMul with a constant weight): with
  output blocks :func:`.tvm_sparse_matmul.cpu_block_matmul_kernel`, with runs along K the conv kernel as a
  1x1 convolution, or the group kernel (:mod:`.tvm_sparse_group`) where it applies;
* :func:`.tvm_sparse_conv.cpu_conv_kernel`: a direct NHWC convolution (1x1 and KxK) for output blocks and
  runs too short for the pixel vectors; runs along the input channels (``group:1x4``) go to the
  pixel-vectorised group kernels: :mod:`.tvm_sparse_group` (1x1), :mod:`.tvm_sparse_planes` (KxK);
* :func:`.tvm_sparse_conv.cuda_matmul_kernel`: the matmul for CUDA.

Each kernel has a fused epilogue: ``+ bias`` then ``max(lo)`` / ``min(hi)`` (ReLU, ReLU6); the block matmul
also ``+ residual`` (before the bounds) and GELU (after them). :func:`fuse_epilogues` folds the Relax ops
that follow a sparse call into it, so the sparse kernel replaces the dense kernel *with* its epilogue.

:func:`sparsify` is the Relax pass (run after the NHWC layout conversion, before the Winograd pass and
channel padding): for each ``matmul`` / ``conv2d`` with a constant weight it asks a ``decide`` callback
(:mod:`.tvm_sparse_choice` times dense against sparse) and, when told, replaces the op by ``call_tir`` of a
sparse kernel whose compressed weights are constants, which :func:`.tvm_backend.lift_weights` then moves
into the bundle's weights file (so the file shrinks with the sparsity). Start reading at :func:`sparsify`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import tvm
from tvm import relax, tirx

from .sparse_formats import BSR, to_bsr
from .tvm_sparse_conv import cpu_conv_kernel, cuda_matmul_kernel
from .tvm_sparse_group import cpu_group_kernel, group_kernel_applies
from .tvm_sparse_matmul import cpu_block_matmul_kernel
from .tvm_sparse_planes import Planes, cpu_planes_kernel, plane_offsets, planes_input
from .tvm_sparse_rows import cpu_rows_kernel, rows_kernel_applies

__all__ = ["KERNEL_PREFIX", "Decision", "Layer", "cpu_matmul_kernel", "fuse_epilogues", "sparsify"]

#: Name prefix of every sparse kernel (the manifest, the schedules and the tests find them by it).
KERNEL_PREFIX = "sparse_"
_BIG = 3.0e38
_SQRT2 = 1.4142135623730951


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
    m: int,
    bsr: BSR,
    lanes: int,
    registers: int,
    lo: float = -_BIG,
    hi: float = _BIG,
    residual: bool = False,
    act: str = "",
) -> tirx.PrimFunc:
    """``y[1, 1, m, n] = act(clip(x[1, 1, m, k] @ W + bias [+ res], lo, hi))`` for a BSR weight: with output
    blocks (``bn > 1``) :func:`.tvm_sparse_matmul.cpu_block_matmul_kernel`, with runs along K the conv kernel
    with a 1x1 window over an ``m``-pixel image (the Relax side reshapes to and from 4-D, which costs
    nothing; that kernel has no residual or activation)."""
    k, n = bsr.shape
    if bsr.block[1] > 1:  # output blocks: the direct kernel (no conv index decoding)
        return cpu_block_matmul_kernel(m, bsr, lanes, registers, lo, hi, residual, act)
    if residual or act:
        raise ValueError("the 1x1-conv form of the sparse matmul has no residual / activation epilogue")
    return cpu_conv_kernel((1, 1, m, k), (1, 1, m, n), (1, 1, (1, 1), (0, 0, 0, 0), (1, 1)), bsr, lanes,
                           registers, lo, hi)  # fmt: skip


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
    #: The kernel adds a residual input (a tensor of the output's shape) before the bounds.
    residual: bool = False
    #: Activation after the bounds: "" or "gelu".
    act: str = ""
    #: For a KxK convolution with runs along C: the phase planes its input is read from
    #: (:mod:`.tvm_sparse_planes`; ``bsr.indices`` are then plane offsets).
    planes: Planes | None = None


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
        elif made.planes is not None:
            f = cpu_planes_kernel(made.planes, made.bsr, self.lanes, self.registers, made.lo, made.hi)
        elif layer.conv is not None and rows_kernel_applies(made.bsr, layer.rows, self.lanes, layer.conv[:2]):
            f = cpu_rows_kernel(_padded(layer), layer.out_shape, layer.conv[2], made.bsr, self.lanes,
                                self.registers, made.lo, made.hi)  # fmt: skip
        elif group_kernel_applies(
            made.bsr, layer.rows, self.lanes, (1, 1) if layer.conv is None else layer.conv[:2]
        ):
            k, n = layer.weight.shape
            x_shape, out_shape = ((1, 1, layer.rows, k), (1, 1, layer.rows, n)) if layer.conv is None else (
                _padded(layer), layer.out_shape)  # fmt: skip
            strides = (1, 1) if layer.conv is None else layer.conv[2]
            f = cpu_group_kernel(x_shape, out_shape, strides, made.bsr, self.lanes, made.lo, made.hi)
        elif layer.conv is None:
            f = cpu_matmul_kernel(layer.rows, made.bsr, self.lanes, self.registers, made.lo, made.hi,
                                  made.residual, made.act)  # fmt: skip
        else:
            f = cpu_conv_kernel(_padded(layer), layer.out_shape, layer.conv, made.bsr, self.lanes,
                                self.registers, made.lo, made.hi)  # fmt: skip
        return f.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)  # opaque: never fused

    def compress(self, layer: Layer, block: tuple[int, int]) -> _Made:
        """The layer's weight compressed for the kernel :meth:`func` will pick: :func:`.sparse_formats.to_bsr`,
        with the K-block indices resolved to phase-plane offsets for a KxK convolution with runs along C."""
        bsr = to_bsr(layer.weight, block)
        if self.gpu or layer.conv is None or tuple(layer.conv[:2]) == (1, 1):
            return _Made(layer, bsr)
        if not group_kernel_applies(bsr, layer.rows, self.lanes, layer.conv[:2]):
            return _Made(layer, bsr)
        kh, kw, strides, padding, dilation = layer.conv
        g = Planes(layer.x_shape[0], layer.x_shape[3], (kh, kw), tuple(strides), tuple(dilation), tuple(padding),
                   tuple(layer.x_shape[1:3]), tuple(layer.out_shape[1:3]))  # fmt: skip
        return _Made(layer, replace(bsr, indices=plane_offsets(bsr, g)), planes=g)

    def full_epilogue(self, made: _Made) -> bool:
        """Whether the call's kernel takes a residual and GELU too (the CPU block matmul)."""
        layer = made.layer
        return (not self.gpu and layer.conv is None and made.bsr.block[1] > 1
                and not group_kernel_applies(made.bsr, layer.rows, self.lanes, (1, 1)))  # fmt: skip


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
            made = factory.compress(layer, decision.block)
            x = call.args[0]
            if made.planes is not None:
                x = planes_input(self.builder_, x, made.planes)
            elif layer.conv is not None:
                top, left, bottom, right = layer.conv[3]
                if top or left or bottom or right:
                    x = self.builder_.normalize(relax.op.nn.pad(x, [0, 0, top, bottom, left, right, 0, 0]))
            elif not gpu:
                x = self.builder_.normalize(relax.op.reshape(x, [1, 1, layer.rows, layer.weight.shape[0]]))
            elif len(layer.x_shape) != 2:
                x = self.builder_.normalize(relax.op.reshape(x, [layer.rows, layer.weight.shape[0]]))
            return self._emit(made, x, relax.const(np.zeros(layer.weight.shape[1], np.float32)))

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
    return float(v.reshape(())) if v is not None and v.size == 1 else None


def fuse_epilogues(factory: KernelFactory) -> tvm.transform.Pass:
    """Relax pass: fold the element-wise ops that follow a sparse call into its kernel, when the sparse value
    has no other use; the replaced ops become dead code.

    Folded: ``add(sparse, bias)`` (a constant along the last axis, either operand order; added to the bias
    the kernel already has), ``maximum(sparse, lo)`` / ``nn.relu`` / ``minimum(sparse, hi)`` (scalar bounds);
    for the CPU block matmul also ``add(sparse, r)`` with a tensor ``r`` of the same shape (a residual
    connection, before any bound) and the exact GELU ``x * (erf(x / sqrt 2) + 1) * 0.5`` as BERT exports it
    (after the bounds, the last op a kernel takes). Each round folds one op per sparse call.
    """

    def uses(func: relax.Function) -> dict[relax.Var, int]:
        count: dict[relax.Var, int] = {}

        def visit(e: relax.Expr) -> None:
            if isinstance(e, relax.Call):
                for a in list(e.args) + [f for t in e.args if isinstance(t, relax.Tuple) for f in t.fields]:
                    if isinstance(a, relax.Var):
                        count[a] = count.get(a, 0) + 1

        relax.analysis.post_order_visit(func, visit)
        return count

    def is_op(e: relax.Expr | None, name: str) -> bool:
        return isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == name

    @relax.expr_functor.mutator
    class _Fuse(relax.PyExprMutator):
        def __init__(self, mod: tvm.IRModule, n_uses: dict) -> None:
            super().__init__(mod)
            self.n_uses = n_uses

        def _bound(self, e: relax.Expr) -> relax.Expr | None:
            return self.lookup_binding(e) if isinstance(e, relax.Var) else None

        def _sparse(self, value: relax.Expr, n_uses: int = 1) -> tuple | None:
            """``(call_tir, made, reshape_to)`` when ``value`` (used ``n_uses`` times) is a sparse call's
            only use, through at most one reshape (vars made in this round have no count yet: next round)."""
            if not isinstance(value, relax.Var) or self.n_uses.get(value) != n_uses:
                return None
            src, inner, reshape_to = value, self._bound(value), None
            if is_op(inner, "relax.reshape"):
                reshape_to, src = inner.args[1], inner.args[0]
                inner = self._bound(src)
                if self.n_uses.get(src) != 1:
                    return None
            if not is_op(inner, "relax.call_tir"):
                return None
            made = factory.made.get(inner.args[0].name_hint)
            return None if made is None else (inner, made, reshape_to)

        def _emit(self, found: tuple, new: _Made, fields: list[relax.Expr]) -> relax.Expr:
            inner, made, reshape_to = found
            gv = self.builder_.add_func(factory.func(new), f"{KERNEL_PREFIX}{made.layer.kind}")
            factory.made[gv.name_hint] = new  # kernels are shared by equal shapes: same flags, same name
            y = relax.call_tir(gv, fields, inner.ty)
            if reshape_to is not None:
                y = relax.op.reshape(self.builder_.normalize(y), reshape_to)
            return y

        def _gelu_input(self, call: relax.Call) -> relax.Expr | None:
            """``x`` when ``call`` is ``(x * (erf(x / sqrt 2) + 1)) * 0.5`` (operands in either order)."""
            a, b = call.args
            if _scalar(a) == 0.5:
                a, b = b, a
            prod = self._bound(a)
            if _scalar(b) != 0.5 or not is_op(prod, "relax.multiply") or self.n_uses.get(a) != 1:
                return None
            for x, one_plus in (prod.args, prod.args[::-1]):
                add = self._bound(one_plus)
                if not is_op(add, "relax.add") or self.n_uses.get(one_plus) != 1:
                    continue
                erf_var = add.args[0] if _scalar(add.args[1]) == 1.0 else add.args[1]
                if _scalar(add.args[0]) != 1.0 and _scalar(add.args[1]) != 1.0:
                    continue
                erf = self._bound(erf_var)
                if not is_op(erf, "relax.erf") or self.n_uses.get(erf_var) != 1:
                    continue
                scaled = self._bound(erf.args[0])
                if self.n_uses.get(erf.args[0]) != 1 or not (
                    (is_op(scaled, "relax.divide") and _close(_scalar(scaled.args[1]), _SQRT2))
                    or (is_op(scaled, "relax.multiply") and _close(_scalar(scaled.args[1]), 1 / _SQRT2))
                ):
                    continue
                if scaled.args[0].same_as(x):
                    return x
            return None

        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op):
                return call
            name = call.op.name
            if name == "relax.multiply":
                x = self._gelu_input(call)
                found = self._sparse(x, n_uses=2) if x is not None else None
                if found is None or not factory.full_epilogue(found[1]) or found[1].act:
                    return call
                return self._emit(found, replace(found[1], act="gelu"), list(found[0].args[1].fields))
            if name == "relax.add":
                return self._add(call)
            if name not in ("relax.maximum", "relax.minimum", "relax.nn.relu"):
                return call
            found = self._sparse(call.args[0])
            if found is None or found[1].act:
                return call
            made = found[1]
            bound = 0.0 if name == "relax.nn.relu" else _scalar(call.args[1])
            if bound is None:
                return call
            if name in ("relax.maximum", "relax.nn.relu") and made.hi >= _BIG:
                new = replace(made, lo=max(made.lo, bound))
            elif name == "relax.minimum":
                new = replace(made, hi=min(made.hi, bound))
            else:
                return call
            return self._emit(found, new, list(found[0].args[1].fields))

        def _add(self, call: relax.Call) -> relax.Expr:
            for value, other in (call.args, call.args[::-1]):
                found = self._sparse(value)
                if found is None:
                    continue
                inner, made, _ = found
                if made.lo > -_BIG or made.hi < _BIG or made.act:
                    return call
                n = made.layer.weight.shape[1]
                fields = list(inner.args[1].fields)
                b = _const(other)
                if b is not None:  # a bias, constant along all but the last axis
                    if made.residual or b.size != n or b.shape[-1] != n:
                        return call
                    old = _const(fields[4])
                    fields[4] = relax.const((old + b.reshape(n)).astype(np.float32))
                    return self._emit(found, made, fields)
                # a residual: a tensor of the sparse value's own shape (no broadcasting)
                if (made.residual or not factory.full_epilogue(made)
                        or _static(getattr(other.ty, "shape", None)) != _static(value.ty.shape)
                        or str(other.ty.dtype) != "float32"):  # fmt: skip
                    return call
                out_shape = [int(d) for d in inner.ty.shape.values]
                fields.insert(5, self.builder_.emit(relax.op.reshape(other, out_shape)))
                return self._emit(found, replace(made, residual=True), fields)
            return call

    @tvm.transform.module_pass(opt_level=0, name="FuseSparseEpilogues")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for _round in range(4):  # e.g. bias, residual, lo, hi: one op per round (each needs the one before)
            for gv, func in list(mod.functions_items()):
                if isinstance(func, relax.Function):
                    mutator = _Fuse(mod, uses(func))
                    mutator.builder_.update_func(gv, mutator.visit_expr(func))
                    mod = mutator.builder_.get()
            mod = relax.transform.DeadCodeElimination()(mod)
        return _drop_uncalled(mod)

    return _pass


def _close(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= 1e-6 * abs(b)


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
