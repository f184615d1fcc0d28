"""Relax passes that prepare a model for the CPU schedules: NHWC layout, Clip as element-wise ops, channels
padded to whole vectors, Winograd convolutions, and a legalization that lets Winograd kernels fuse.

Convolutions run in NHWC with HWIO weights, so the channel axis is innermost everywhere: conv, depthwise conv,
pooling and the element-wise epilogues then all vectorise along channels (channel counts are multiples of
the vector width in real models), and the weight transposes fold into constants at compile time. Gemm
weights are likewise pre-transposed to [K, N]. Channel counts that are not whole vectors (pruned models) are
padded with zero weights and sliced off again (:func:`pad_conv_channels`).

Start reading at :func:`relax_layout_passes` (run before legalization) and :func:`legalize_passes`; the
kernels they produce are scheduled by :mod:`.tvm_schedules`.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from . import tvm_rowwise, tvm_winograd
from .tvm_tiles import const_int, vector_lanes, vector_registers

__all__ = ["clip_as_elementwise", "legalize_passes", "pad_conv_channels", "relax_layout_passes"]

#: Depthwise convolutions with an odd channel count get zero channels too (see :func:`pad_conv_channels`).
PAD_DEPTHWISE = True


def relax_layout_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """Relax passes that put convolutions in NHWC/HWIO, fold the weight transposes away, give softmax and
    LayerNorm row-wise kernels (:mod:`.tvm_rowwise`) and pad odd output-channel counts (see
    :func:`pad_conv_channels`)."""
    desired = {"relax.nn.conv2d": ["NHWC", "HWIO"]}
    return [
        relax.transform.FoldConstant(),
        clip_as_elementwise(),
        tvm_rowwise.rowwise_ops(vector_lanes(target)),
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
            wp = np.zeros((*w.shape[:3], padded), dtype=w.dtype)
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
                    or const_int(shape[3]) != out_ch):  # fmt: skip
                return call
            pad = [int(x) for x in attrs.padding]  # top, left, bottom, right
            wp = np.zeros((*w.shape[:3], padded), dtype=w.dtype)
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
