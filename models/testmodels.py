"""Small seeded ONNX test models built with ``onnx.helper``.

Every builder in :data:`TEST_MODELS` returns a fresh ``onnx.ModelProto`` (opset 17 unless noted,
IR version 8, fp32 unless noted) whose weights come from a generator seeded per builder, so two calls
give byte-identical models. Biases are non-zero on purpose: a pruner that forgets to slice a bias, or
a BN shift, shows up as a numeric mismatch rather than hiding behind zeros.

Each model covers one family of channel coupling a structured pruner has to get right:

==================== ==========================================================================
``chain``            Conv-BN-Relu x2 -> Conv -> GlobalAveragePool -> Flatten -> Gemm
``residual``         identity and projection skips joined by Add
``concat``           Inception-like branch Concat and a DenseNet-like growing Concat chain
``split``            Split (sizes as an input) and Slice on the channel axis
``depthwise``        MobileNetV2/V3 inverted residuals, ReLU6 (Clip), HardSwish, squeeze-excite
``grouped``          group=4 conv between 1x1 convs (ResNeXt / RegNet)
``gemm_head``        Flatten of an unpooled map (channel x spatial features) into Gemm
``attention``        transformer encoder block, static shapes, head split by Reshape/Transpose
``attention_dynamic`` same with symbolic batch/seq and Shape->Gather->Concat reshape targets
``convtranspose``    U-Net-like decoder: ConvTranspose, skip Concat, Resize and Pad
``norms``            InstanceNormalization, GroupNormalization (opset 21), per-channel PRelu
``groupnorm_torch``  GroupNorm decomposed as torch exports it (Reshape-InstanceNorm-Reshape-Mul-Add)
``constants_as_nodes`` ``chain`` with every weight a Constant node, one behind an Identity
``fp16``             conv chain with fp16 weights, input and output
``mixed_ops``        element-wise / pooling / reduce / reshape-ish ops that pass channels through
==================== ==========================================================================

Use :func:`make_inputs` to get seeded random feeds for any model (symbolic dims become 1 for the
first axis and 8 for the others).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["IR_VERSION", "OPSET", "TEST_MODELS", "make_inputs"]

OPSET = 17
IR_VERSION = 8

_IMAGE = (1, 3, 16, 16)


class _Builder:
    """Accumulates nodes and weights for one graph; weights drawn from a seeded generator.

    Args:
        seed: Seed for every random weight this builder makes.
        dtype: Floating dtype of the weights (``np.float32`` or ``np.float16``).
        constants_as_nodes: Emit weights as ``Constant`` nodes instead of initializers.
    """

    def __init__(self, seed: int, dtype: type = np.float32, constants_as_nodes: bool = False) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.constants_as_nodes = constants_as_nodes
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counter = 0

    # -- naming and raw graph pieces -------------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}_{self._counter}"

    def const(self, value: np.ndarray, prefix: str = "c") -> str:
        """Adds a constant tensor (initializer or Constant node) and returns its name."""
        name = self.fresh(prefix)
        tensor = numpy_helper.from_array(np.asarray(value), name)
        if self.constants_as_nodes:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_const", value=tensor))
        else:
            self.initializers.append(tensor)
        return name

    def ints(self, values: Sequence[int], prefix: str = "i64") -> str:
        return self.const(np.asarray(values, dtype=np.int64), prefix)

    def scalar(self, value: float, prefix: str = "s") -> str:
        return self.const(np.asarray(value, dtype=self.dtype), prefix)

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs: object) -> str | list[str]:
        """Appends one node; returns its output name (or names when ``n_out > 1``)."""
        base = self.fresh(op_type.lower())
        outputs = [base] if n_out == 1 else [f"{base}_o{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=base, **attrs))
        return outputs[0] if n_out == 1 else outputs

    def __call__(self, op_type: str, inputs: Sequence[str], **attrs: object) -> str:
        out = self.op(op_type, inputs, **attrs)
        assert isinstance(out, str)
        return out

    # -- random weights ---------------------------------------------------------------------------
    def weight(self, shape: Sequence[int], fan_in: int, prefix: str = "w") -> str:
        bound = math.sqrt(6.0 / max(fan_in, 1))
        return self.const(self.rng.uniform(-bound, bound, size=tuple(shape)).astype(self.dtype), prefix)

    def bias(self, n: int | Sequence[int], prefix: str = "b") -> str:
        shape = (n,) if isinstance(n, int) else tuple(n)
        return self.const(self.rng.uniform(-0.2, 0.2, size=shape).astype(self.dtype), prefix)

    def positive(self, shape: Sequence[int], lo: float = 0.5, hi: float = 1.5, prefix: str = "p") -> str:
        return self.const(self.rng.uniform(lo, hi, size=tuple(shape)).astype(self.dtype), prefix)

    # -- layers -----------------------------------------------------------------------------------
    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int = 3,
        stride: int = 1,
        group: int = 1,
        pad: int | None = None,
        bias: bool = True,
    ) -> str:
        pad = k // 2 if pad is None else pad
        w = self.weight((cout, cin // group, k, k), fan_in=cin // group * k * k, prefix="conv_w")
        inputs = [x, w] + ([self.bias(cout, "conv_b")] if bias else [])
        return self(
            "Conv", inputs, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group
        )

    def bn(self, x: str, c: int) -> str:
        scale = self.positive((c,), prefix="bn_scale")
        shift = self.bias(c, "bn_bias")
        mean = self.bias(c, "bn_mean")
        var = self.positive((c,), prefix="bn_var")
        return self("BatchNormalization", [x, scale, shift, mean, var], epsilon=1e-5)

    def relu6(self, x: str) -> str:
        return self("Clip", [x, self.scalar(0.0, "clip_min"), self.scalar(6.0, "clip_max")])

    def conv_bn_act(
        self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1, act: str = "Relu"
    ) -> str:
        y = self.bn(self.conv(x, cin, cout, k, stride, group, bias=False), cout)
        if act == "Relu6":
            return self.relu6(y)
        return self(act, [y]) if act else y

    def gemm(self, x: str, fin: int, fout: int, trans_b: int = 1) -> str:
        shape = (fout, fin) if trans_b else (fin, fout)
        w = self.weight(shape, fan_in=fin, prefix="fc_w")
        return self("Gemm", [x, w, self.bias(fout, "fc_b")], transB=trans_b)

    def head(self, x: str, c: int, classes: int = 10) -> str:
        y = self("Flatten", [self("GlobalAveragePool", [x])], axis=1)
        return self.gemm(y, c, classes)

    def matmul_bias(self, x: str, fin: int, fout: int) -> str:
        w = self.weight((fin, fout), fan_in=fin, prefix="mm_w")
        return self("Add", [self("MatMul", [x, w]), self.bias(fout, "mm_b")])

    def layer_norm(self, x: str, c: int) -> str:
        return self(
            "LayerNormalization",
            [x, self.positive((c,), prefix="ln_scale"), self.bias(c, "ln_bias")],
            axis=-1,
            epsilon=1e-5,
        )

    # -- finishing --------------------------------------------------------------------------------
    def model(
        self,
        name: str,
        inputs: Sequence[onnx.ValueInfoProto],
        outputs: Sequence[tuple[str, str]],
        opset: int = OPSET,
        ir_version: int = IR_VERSION,
        output_shapes: dict[str, Sequence[int | str]] | None = None,
    ) -> onnx.ModelProto:
        """Wraps the graph; output shapes are filled in by ONNX shape inference.

        Args:
            name: Graph name.
            inputs: Graph inputs.
            outputs: ``(graph output name, producing tensor)`` pairs; an Identity renames each.
            opset: Default-domain opset.
            ir_version: IR version of the model.
            output_shapes: Declared shapes for outputs that inference cannot pin (symbolic dims).
        """
        elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        out_infos = []
        for out_name, tensor in outputs:
            self.nodes.append(helper.make_node("Identity", [tensor], [out_name], name=f"{out_name}_out"))
            shape = None if output_shapes is None else output_shapes.get(out_name)
            out_infos.append(helper.make_tensor_value_info(out_name, elem, shape))
        graph = helper.make_graph(self.nodes, name, list(inputs), out_infos, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset)],
            ir_version=ir_version,
            producer_name="onnxprune.models.testmodels",
        )
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        model.graph.ClearField("output")
        model.graph.output.extend(inferred.graph.output)
        return model


def _image_input(name: str = "input", shape: Sequence[int | str] = _IMAGE, elem: int = TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, list(shape))


# ------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------
def build_chain() -> onnx.ModelProto:
    """Conv-BN-Relu-Conv-BN-Relu-Conv -> GlobalAveragePool -> Flatten -> Gemm."""
    return _chain(_Builder(seed=1), "chain")


def _chain(b: _Builder, name: str) -> onnx.ModelProto:
    x = b.conv_bn_act("input", 3, 8)
    x = b.conv_bn_act(x, 8, 16, stride=2)
    x = b.conv(x, 16, 32)
    return b.model(name, [_image_input()], [("logits", b.head(x, 32))])


def build_residual() -> onnx.ModelProto:
    """ResNet-like: identity skips, a strided projection skip, Relu after each Add."""
    b = _Builder(seed=2)
    x = b.conv_bn_act("input", 3, 16)
    for _ in range(2):  # identity blocks
        y = b.conv_bn_act(x, 16, 16)
        y = b.conv_bn_act(y, 16, 16, act="")
        x = b("Relu", [b("Add", [y, x])])
    # projection block: 16 -> 32, stride 2
    y = b.conv_bn_act(x, 16, 32, stride=2)
    y = b.conv_bn_act(y, 32, 32, act="")
    skip = b.conv_bn_act(x, 16, 32, k=1, stride=2, act="")
    x = b("Relu", [b("Add", [skip, y])])  # skip first on purpose: operand order must not matter
    y = b.conv_bn_act(x, 32, 32)
    y = b.conv_bn_act(y, 32, 32, act="")
    x = b("Relu", [b("Add", [y, x])])
    return b.model("residual", [_image_input()], [("logits", b.head(x, 32))])


def build_concat() -> onnx.ModelProto:
    """Inception-like branch Concat feeding a conv, then a DenseNet-like growing Concat chain."""
    b = _Builder(seed=3)
    x = b.conv_bn_act("input", 3, 16)
    b1 = b.conv_bn_act(x, 16, 8, k=1)
    b2 = b.conv_bn_act(x, 16, 12, k=3)
    b3 = b.conv(b("MaxPool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]), 16, 4, k=1)
    x = b("Concat", [b1, b2, b3], axis=1)  # 24 channels
    x = b.conv_bn_act(x, 24, 16, k=1)
    # dense block: each layer's output is appended to its input
    c = 16
    for growth in (8, 8):
        y = b.conv_bn_act(x, c, growth)
        x = b("Concat", [x, y], axis=1)
        c += growth
    x = b.conv_bn_act(x, c, 16, k=1)  # transition
    return b.model("concat", [_image_input()], [("logits", b.head(x, 16))])


def build_split() -> onnx.ModelProto:
    """Split on channels (sizes as an input tensor), branches, Concat; then a Slice-based variant."""
    b = _Builder(seed=4)
    x = b.conv_bn_act("input", 3, 16)
    s0, s1 = b.op("Split", [x, b.ints([6, 10], "split")], n_out=2, axis=1)
    s0 = b.conv_bn_act(s0, 6, 6)
    s1 = b("Relu", [b.conv(s1, 10, 10, k=1)])
    x = b("Concat", [s0, s1], axis=1)
    x = b.conv_bn_act(x, 16, 16)
    # Slice variant: two channel ranges, one with a negative start and step 1 given explicitly
    lo = b("Slice", [x, b.ints([0]), b.ints([8]), b.ints([1])])
    hi = b("Slice", [x, b.ints([-8]), b.ints([2**62]), b.ints([1]), b.ints([1])])
    hi = b("Sigmoid", [b.conv(hi, 8, 8, k=1)])
    x = b("Concat", [hi, lo], axis=1)
    x = b.conv(x, 16, 24)
    return b.model("split", [_image_input()], [("logits", b.head(x, 24))])


def _squeeze_excite(b: _Builder, x: str, c: int, reduced: int) -> str:
    s = b("GlobalAveragePool", [x])
    s = b("Relu", [b.conv(s, c, reduced, k=1)])
    s = b("HardSigmoid", [b.conv(s, reduced, c, k=1)], alpha=1.0 / 6.0, beta=0.5)
    return b("Mul", [x, s])


def build_depthwise() -> onnx.ModelProto:
    """MobileNetV2/V3 inverted residuals: expand 1x1, depthwise 3x3, SE, project 1x1."""
    b = _Builder(seed=5)
    x = b.conv_bn_act("input", 3, 16, act="Relu6")
    # block 1 (V2 style, ReLU6, SE, residual): 16 -> 32 -> 16
    y = b.conv_bn_act(x, 16, 32, k=1, act="Relu6")
    y = b.conv_bn_act(y, 32, 32, group=32, act="Relu6")
    y = _squeeze_excite(b, y, 32, 8)
    y = b.conv_bn_act(y, 32, 16, k=1, act="")
    x = b("Add", [x, y])
    # block 2 (V3 style, HardSwish, stride 2, no residual): 16 -> 48 -> 24
    y = b.conv_bn_act(x, 16, 48, k=1, act="HardSwish")
    y = b.conv_bn_act(y, 48, 48, stride=2, group=48, act="HardSwish")
    y = _squeeze_excite(b, y, 48, 12)
    x = b.conv_bn_act(y, 48, 24, k=1, act="")
    # depthwise conv with bias and a plain pointwise conv
    x = b.conv(b.conv(x, 24, 24, group=24), 24, 32, k=1)
    x = b("HardSwish", [x])
    return b.model("depthwise", [_image_input()], [("logits", b.head(x, 32))])


def build_grouped() -> onnx.ModelProto:
    """ResNeXt/RegNet bottleneck: 1x1 -> 3x3 group=4 -> 1x1, identity skip."""
    b = _Builder(seed=6)
    x = b.conv_bn_act("input", 3, 16)
    for _ in range(2):
        y = b.conv_bn_act(x, 16, 32, k=1)
        y = b.conv_bn_act(y, 32, 32, group=4)
        y = b.conv_bn_act(y, 32, 16, k=1, act="")
        x = b("Relu", [b("Add", [x, y])])
    x = b.conv(x, 16, 16, group=4)  # grouped conv with bias, 4 channels per group
    return b.model("grouped", [_image_input()], [("logits", b.head(x, 16))])


def build_gemm_head() -> onnx.ModelProto:
    """Conv -> Flatten of the unpooled map (C*H*W features) -> Gemm(transB=1) -> Relu -> Gemm."""
    b = _Builder(seed=7)
    x = b.conv_bn_act("input", 3, 8, stride=2)  # [1, 8, 8, 8]
    x = b("Flatten", [x], axis=1)  # 512 features, channel-major
    x = b("Relu", [b.gemm(x, 8 * 8 * 8, 32, trans_b=1)])
    x = b.gemm(x, 32, 10, trans_b=0)
    return b.model("gemm_head", [_image_input()], [("logits", x)])


_SEQ, _HIDDEN, _HEADS, _HEAD_DIM, _MLP = 8, 32, 4, 8, 64


def _gelu(b: _Builder, x: str) -> str:
    """Gelu as torch's legacy exporter writes it: 0.5 * x * (1 + erf(x / sqrt(2)))."""
    e = b("Erf", [b("Div", [x, b.scalar(math.sqrt(2.0))])])
    return b("Mul", [b("Mul", [x, b("Add", [e, b.scalar(1.0)])]), b.scalar(0.5)])


def _encoder_block(b: _Builder, x: str, split_shape: Callable[[str], str], merge_shape: Callable[[str], str]):
    """Pre-LN transformer encoder block; the two callables give Reshape targets for a source tensor."""
    h = b.layer_norm(x, _HIDDEN)
    q = b.matmul_bias(h, _HIDDEN, _HIDDEN)
    k = b.matmul_bias(h, _HIDDEN, _HIDDEN)
    v = b.matmul_bias(h, _HIDDEN, _HIDDEN)
    q = b("Transpose", [b("Reshape", [q, split_shape(h)])], perm=[0, 2, 1, 3])  # [B, H, S, D]
    kt = b("Transpose", [b("Reshape", [k, split_shape(h)])], perm=[0, 2, 3, 1])  # [B, H, D, S]
    v = b("Transpose", [b("Reshape", [v, split_shape(h)])], perm=[0, 2, 1, 3])
    scores = b("Mul", [b("MatMul", [q, kt]), b.scalar(1.0 / math.sqrt(_HEAD_DIM))])
    ctx = b("MatMul", [b("Softmax", [scores], axis=-1), v])  # [B, H, S, D]
    ctx = b("Reshape", [b("Transpose", [ctx], perm=[0, 2, 1, 3]), merge_shape(h)])
    x = b("Add", [b.matmul_bias(ctx, _HIDDEN, _HIDDEN), x])
    h = b.layer_norm(x, _HIDDEN)
    h = b.matmul_bias(_gelu(b, b.matmul_bias(h, _HIDDEN, _MLP)), _MLP, _HIDDEN)
    return b("Add", [x, h])


def build_attention() -> onnx.ModelProto:
    """Transformer encoder block on [1, 8, 32]: 4 heads of 8, Reshape targets as initializers."""
    b = _Builder(seed=8)
    split = b.ints([1, _SEQ, _HEADS, _HEAD_DIM], "split_shape")
    merge = b.ints([1, _SEQ, _HIDDEN], "merge_shape")
    y = _encoder_block(b, "input", lambda _: split, lambda _: merge)
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, _SEQ, _HIDDEN])
    return b.model("attention", [inp], [("output", y)])


def build_attention_dynamic() -> onnx.ModelProto:
    """As ``attention`` but [batch, seq, 32]; Reshape targets computed like torch's legacy exporter."""
    b = _Builder(seed=9)

    def dim(src: str, i: int) -> str:
        g = b("Gather", [b("Shape", [src]), b.const(np.asarray(i, dtype=np.int64), "idx")], axis=0)
        return b("Unsqueeze", [g, b.ints([0], "axes")])

    def split_shape(src: str) -> str:
        return b("Concat", [dim(src, 0), dim(src, 1), b.ints([_HEADS]), b.ints([_HEAD_DIM])], axis=0)

    def merge_shape(src: str) -> str:
        return b("Concat", [dim(src, 0), dim(src, 1), b.ints([_HIDDEN])], axis=0)

    y = _encoder_block(b, "input", split_shape, merge_shape)
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "seq", _HIDDEN])
    shapes = {"output": ["batch", "seq", _HIDDEN]}
    return b.model("attention_dynamic", [inp], [("output", y)], output_shapes=shapes)


def build_convtranspose() -> onnx.ModelProto:
    """U-Net-like: down conv, ConvTranspose(stride 2)-BN-Relu, skip Concat; Resize and Pad branches."""
    b = _Builder(seed=10)
    e1 = b.conv_bn_act("input", 3, 8)  # [1, 8, 16, 16]
    e2 = b.conv_bn_act(e1, 8, 16, stride=2)  # [1, 16, 8, 8]
    wt = b.weight((16, 8, 2, 2), fan_in=16 * 4, prefix="convT_w")  # [Cin, Cout / group, kH, kW]
    up = b("ConvTranspose", [e2, wt, b.bias(8, "convT_b")], kernel_shape=[2, 2], strides=[2, 2])
    up = b("Relu", [b.bn(up, 8)])
    x = b.conv_bn_act(b("Concat", [up, e1], axis=1), 16, 8)
    # Resize branch: nearest upsample of the bottleneck, roi left out (empty input name)
    scales = b.const(np.asarray([1, 1, 2, 2], np.float32), "scales")
    r = b("Resize", [e2, "", scales], mode="nearest")
    r = b.conv(r, 16, 8, k=1)
    # Pad branch: constant pad on H/W then a valid 3x3 conv keeps the size
    p = b("Pad", [x, b.ints([0, 0, 1, 1, 0, 0, 1, 1], "pads"), b.scalar(0.0, "pad_value")], mode="constant")
    p = b.conv(p, 8, 8, pad=0)
    y = b.conv(b("Relu", [b("Add", [p, r])]), 8, 4, k=1)
    return b.model("convtranspose", [_image_input()], [("output", y)])


def build_norms() -> onnx.ModelProto:
    """InstanceNormalization, GroupNormalization(num_groups=4) and per-channel PRelu.

    Opset 21 / IR 10: GroupNormalization-18 (per-group scale) is deprecated and the ONNX checker
    rejects it, so this model uses GroupNormalization-21, whose scale and bias are per channel.
    ``groupnorm_torch`` covers the opset-17 form torch's exporter writes instead.
    """
    b = _Builder(seed=11)
    x = b.conv("input", 3, 16)
    x = b("InstanceNormalization", [x, b.positive((16,)), b.bias(16)], epsilon=1e-5)
    x = b("Relu", [x])
    x = b.conv(x, 16, 16)
    x = b("GroupNormalization", [x, b.positive((16,)), b.bias(16)], num_groups=4, epsilon=1e-5)
    x = b("PRelu", [x, b.const(b.rng.uniform(0.05, 0.3, (16, 1, 1)).astype(np.float32), "slope")])
    x = b.conv(x, 16, 16)
    return b.model("norms", [_image_input()], [("logits", b.head(x, 16))], opset=21, ir_version=10)


def build_groupnorm_torch() -> onnx.ModelProto:
    """GroupNorm(4, 16) as torch's opset-17 exporter decomposes it.

    Reshape [N, 4, -1] -> InstanceNormalization(ones, zeros) -> Reshape to the input's shape ->
    Mul per-channel scale [C, 1, 1] -> Add per-channel bias [C, 1, 1].
    """
    b = _Builder(seed=14)
    x = b("Relu", [b.conv("input", 3, 16)])
    for _ in range(2):
        g = b("Reshape", [x, b.ints([0, 4, -1], "group_shape")])
        g = b("InstanceNormalization", [g, b.const(np.ones(4, np.float32)), b.const(np.zeros(4, np.float32))])
        g = b("Reshape", [g, b("Shape", [x])])
        g = b("Mul", [g, b.positive((16, 1, 1), prefix="gn_scale")])
        g = b("Add", [g, b.bias((16, 1, 1), "gn_bias")])
        x = b.conv(b("Relu", [g]), 16, 16)
    return b.model("groupnorm_torch", [_image_input()], [("logits", b.head(x, 16))])


def build_constants_as_nodes() -> onnx.ModelProto:
    """``chain`` with Constant-node weights; the first conv weight also passes through an Identity."""
    b = _Builder(seed=1, constants_as_nodes=True)
    model = _chain(b, "constants_as_nodes")
    first_conv = next(n for n in model.graph.node if n.op_type == "Conv")
    alias = f"{first_conv.input[1]}_identity"
    identity = helper.make_node("Identity", [first_conv.input[1]], [alias], name=f"{alias}_node")
    first_conv.input[1] = alias
    nodes = list(model.graph.node)
    nodes.insert(nodes.index(first_conv), identity)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return model


def build_fp16() -> onnx.ModelProto:
    """Small conv chain in fp16 end to end (weights, input, output)."""
    b = _Builder(seed=12, dtype=np.float16)
    x = b("Relu", [b.conv("input", 3, 8)])
    x = b("Relu", [b.conv(x, 8, 16, stride=2)])
    x = b.conv(x, 16, 8, k=1)
    return b.model("fp16", [_image_input(elem=TensorProto.FLOAT16)], [("output", x)])


def build_mixed_ops() -> onnx.ModelProto:
    """Channel pass-through ops: per-channel Sub/Div, activations, pools, reduce, reshape-ish, Cast."""
    b = _Builder(seed=13)
    mean = b.const(np.asarray([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1), "mean")
    std = b.const(np.asarray([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1), "std")
    x = b("Div", [b("Sub", ["input", mean]), std])
    x = b.conv(x, 3, 16)
    x = b("Mul", [x, b("Sigmoid", [x])])  # SiLU
    x = b("Tanh", [b.conv(x, 16, 16)])
    x = b("LeakyRelu", [b.conv(x, 16, 16)], alpha=0.1)
    x = b("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b("AveragePool", [b.conv(x, 16, 24)], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    # per-channel gate through ReduceMean (keepdims), Squeeze/Unsqueeze and a Cast round trip
    g = b("ReduceMean", [x], axes=[2, 3], keepdims=1)  # [1, 24, 1, 1]
    g = b("Squeeze", [g, b.ints([2, 3], "axes")])  # [1, 24]
    g = b("Cast", [b("Cast", [g], to=TensorProto.DOUBLE)], to=TensorProto.FLOAT)
    g = b("Unsqueeze", [b("Sigmoid", [g]), b.ints([2, 3], "axes")])
    x = b("Mul", [x, g])
    x = b("Dropout", [x, b.scalar(0.5, "ratio"), b.const(np.asarray(False), "training")])
    # NHWC round trip with a per-channel Add on the last axis in between
    x = b("Transpose", [x], perm=[0, 2, 3, 1])
    x = b("Add", [x, b.bias(24)])
    x = b("Transpose", [x], perm=[0, 3, 1, 2])
    x = b.conv(x, 24, 16, k=1)
    return b.model("mixed_ops", [_image_input()], [("logits", b.head(x, 16))])


TEST_MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "chain": build_chain,
    "residual": build_residual,
    "concat": build_concat,
    "split": build_split,
    "depthwise": build_depthwise,
    "grouped": build_grouped,
    "gemm_head": build_gemm_head,
    "attention": build_attention,
    "attention_dynamic": build_attention_dynamic,
    "convtranspose": build_convtranspose,
    "norms": build_norms,
    "groupnorm_torch": build_groupnorm_torch,
    "constants_as_nodes": build_constants_as_nodes,
    "fp16": build_fp16,
    "mixed_ops": build_mixed_ops,
}


def make_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random feeds for every graph input that is not an initializer.

    Symbolic or unknown dims become 1 on the first axis (batch) and 8 elsewhere. Floating inputs are
    standard normal; integer inputs are uniform in [0, 16) (small enough for any vocabulary); bool
    inputs are all True (attention masks).

    Args:
        model: The model whose inputs to feed.
        seed: Seed for the generator.

    Returns:
        Mapping from input name to array.
    """
    rng = np.random.default_rng(seed)
    initializer_names = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        if value.name in initializer_names:
            continue
        tensor_type = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        shape = [
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (1 if i == 0 else 8)
            for i, d in enumerate(tensor_type.shape.dim)
        ]
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            high = 2 if any(k in value.name for k in ("mask", "type")) else 16  # masks, segment ids
            feeds[value.name] = rng.integers(0, high, size=shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = np.ones(shape, dtype=np.bool_)
        else:
            raise TypeError(f"input {value.name!r}: no random generator for dtype {dtype}")
    return feeds
