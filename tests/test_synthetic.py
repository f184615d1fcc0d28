"""Synthetic calibration (``--calib synthetic[:N]``): the ONNX backward graph, BN-statistics matching, the CLI."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.autodiff import append_backward, float_tensor_names, static_shapes
from onnxprune.calibration import load_calib
from onnxprune.errors import DataError, UnsupportedModelError
from onnxprune.gradients import Emitter, supported_ops
from onnxprune.shape_inference import infer_shapes
from onnxprune.synthetic import SynthesisConfig, bn_loss, parse_spec, synthesize
from onnxprune.synthetic_plan import AUTO_SAMPLES
from onnxprune.verify import session

ROOT = Path(__file__).resolve().parents[1]
FASHION_RESNET = ROOT / "models" / "fashion_mnist_resnet.onnx"
X = (2, 4, 6, 6)
RNG = np.random.default_rng(0)


def _w(*shape: int, scale: float = 0.5) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], out: str = "y", shape: tuple = X,
           opset: int = 17, out_shape: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _n(op: str, inputs: list[str], output: str = "y", **kw: object) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], **kw)


def _i64(*v: int) -> np.ndarray:
    return np.array(v, np.int64)


# one small model per supported op (or family); x is [2, 4, 6, 6] unless the case says otherwise
CASES: dict[str, Callable[[], onnx.ModelProto]] = {
    "Conv": lambda: _model([_n("Conv", ["x", "w", "b"], strides=[2, 2], pads=[1, 0, 1, 1], dilations=[1, 2],
                               group=2)], {"w": _w(6, 2, 3, 3), "b": _w(6)}),
    "Conv_stride1_grouped": lambda: _model([_n("Conv", ["x", "w"], pads=[2, 1, 0, 1], dilations=[1, 2], group=2)],
                                           {"w": _w(6, 2, 3, 3)}),
    "Conv_depthwise_5x5": lambda: _model([_n("Conv", ["x", "w"], pads=[2, 2, 2, 2], group=4)], {"w": _w(4, 1, 5, 5)}),
    "Conv_depthwise_stride2": lambda: _model([_n("Conv", ["x", "w"], pads=[1, 1, 1, 1], strides=[2, 2], group=4)],
                                             {"w": _w(8, 1, 3, 3)}),
    "Conv_same": lambda: _model([_n("Conv", ["x", "w"], auto_pad="SAME_UPPER", strides=[2, 2])], {"w": _w(3, 4, 2, 2)}),
    "BatchNormalization": lambda: _model([_n("BatchNormalization", ["x", "s", "b", "m", "v"])],
                                         {"s": _w(4), "b": _w(4), "m": _w(4), "v": np.abs(_w(4)) + 0.5}),
    "Relu": lambda: _model([_n("Relu", ["x"])], {}),
    "LeakyRelu": lambda: _model([_n("LeakyRelu", ["x"], alpha=0.1)], {}),
    "Clip": lambda: _model([_n("Clip", ["x", "lo", "hi"])], {"lo": np.float32(-0.5), "hi": np.float32(0.7)}),
    "Sigmoid": lambda: _model([_n("Sigmoid", ["x"])], {}),
    "Tanh": lambda: _model([_n("Tanh", ["x"])], {}),
    "Erf": lambda: _model([_n("Erf", ["x"])], {}),
    "HardSigmoid": lambda: _model([_n("HardSigmoid", ["x"], alpha=0.3)], {}),
    "HardSwish": lambda: _model([_n("HardSwish", ["x"])], {}),
    "Sqrt+Pow": lambda: _model([_n("Sigmoid", ["x"], "s"), _n("Sqrt", ["s"], "r"), _n("Pow", ["r", "p"])],
                               {"p": np.float32(3.0)}),
    "Mul+Div+Sub (broadcast, both active)": lambda: _model(
        [_n("GlobalAveragePool", ["x"], "g"), _n("Sigmoid", ["g"], "s"), _n("Mul", ["x", "s"], "m"),
         _n("Add", ["s", "k"], "d"), _n("Div", ["m", "d"], "q"), _n("Sub", ["q", "g"])], {"k": np.float32(1.5)}),
    "AveragePool": lambda: _model([_n("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
                                  {}),
    "AveragePool_include_pad": lambda: _model([_n("AveragePool", ["x"], kernel_shape=[2, 3], strides=[1, 2],
                                                  pads=[0, 1, 1, 1], count_include_pad=1)], {}),
    "MaxPool": lambda: _model([_n("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])], {}),
    "Pad": lambda: _model([_n("Pad", ["x", "p"])], {"p": _i64(0, 1, 0, 2, 0, 1, 1, 0)}),
    "Slice": lambda: _model([_n("Slice", ["x", "s", "e", "a"])], {"s": _i64(1, 2), "e": _i64(3, 100), "a": _i64(1, 3)}),
    "Slice_strided": lambda: _model([_n("Slice", ["x", "s", "e", "a", "t"])],
                                    {"s": _i64(0, 1), "e": _i64(100, 100), "a": _i64(2, 3), "t": _i64(2, 2)}),
    "Concat": lambda: _model([_n("Relu", ["x"], "r"), _n("Concat", ["x", "c", "r"], axis=1)], {"c": _w(2, 3, 6, 6)}),
    "ReduceMean+ReduceSum": lambda: _model([_n("ReduceMean", ["x", "a"], "m", keepdims=0),
                                            _n("ReduceSum", ["m", "b"], keepdims=1)], {"a": _i64(2, 3), "b": _i64(0)},
                                           opset=18),
    "Softmax": lambda: _model([_n("Softmax", ["x"], axis=2)], {}),
    "LayerNormalization": lambda: _model([_n("LayerNormalization", ["x", "s", "b"], axis=2, epsilon=1e-3)],
                                         {"s": _w(6, 6), "b": _w(6, 6)}),
    "MatMul (weight and both active)": lambda: _model(
        [_n("Reshape", ["x", "s"], "r"), _n("MatMul", ["r", "w"], "q"), _n("Transpose", ["q"], "t", perm=[0, 2, 1]),
         _n("MatMul", ["q", "t"])], {"s": _i64(2, 4, 36), "w": _w(36, 5)}),
    "Gemm+Flatten": lambda: _model([_n("Flatten", ["x"], "f"), _n("Gemm", ["f", "w", "b"], alpha=0.5, transB=1)],
                                   {"w": _w(7, 144, scale=0.1), "b": _w(7)}),
    "ConvTranspose": lambda: _model([_n("ConvTranspose", ["x", "w", "b"], strides=[2, 2], pads=[1, 0, 1, 1],
                                        output_padding=[1, 0], dilations=[1, 2], group=2)],
                                    {"w": _w(4, 3, 3, 3), "b": _w(6)}),
    "ConvTranspose_plain": lambda: _model([_n("ConvTranspose", ["x", "w"], strides=[2, 2])], {"w": _w(4, 5, 2, 2)}),
    "Resize_linear_scales": lambda: _model([_n("Resize", ["x", "", "s"], mode="linear")],
                                           {"s": np.array([1, 1, 2, 1.5], np.float32)}),
    "Resize_nearest_sizes_asymmetric": lambda: _model(
        [_n("Resize", ["x", "", "", "z"], mode="nearest", coordinate_transformation_mode="asymmetric",
            nearest_mode="floor")], {"z": _i64(2, 4, 13, 9)}),
    "Resize_cubic_align_corners_downsample": lambda: _model(
        [_n("Resize", ["x", "", "s"], mode="cubic", coordinate_transformation_mode="align_corners")],
        {"s": np.array([1, 1, 0.5, 1.5], np.float32)}),
    "Resize_computed_sizes (linear, sizes from Shape)": lambda: _model(
        [_n("Shape", ["x"], "sh"), _n("Mul", ["sh", "two"], "z"),
         _n("Resize", ["x", "", "", "z"], mode="linear", coordinate_transformation_mode="pytorch_half_pixel")],
        {"two": _i64(1, 1, 2, 2)}),
    # x as 4 heads of 6 positions x 6 features: K and V made from it too, a causal and a constant mask
    "Attention_4d_causal_masked": lambda: _model(
        [_n("Mul", ["x", "wk"], "k"), _n("Add", ["x", "bv"], "v"),
         _n("Attention", ["x", "k", "v", "m"], is_causal=1, scale=0.3)],
        {"wk": _w(6), "bv": _w(6), "m": _w(1, 1, 6, 6)}, opset=23),
    # [2, 4, 36] as 6 query heads of 6 over 2 key/value heads (values of 3): grouped-query attention
    "Attention_3d_grouped": lambda: _model(
        [_n("Reshape", ["x", "shape"], "r"), _n("MatMul", ["r", "wk"], "k"), _n("MatMul", ["r", "wv"], "v"),
         _n("Attention", ["r", "k", "v"], q_num_heads=6, kv_num_heads=2)],
        {"shape": _i64(2, 4, 36), "wk": _w(36, 12), "wv": _w(36, 6)}, opset=23),
    "Squeeze+Unsqueeze+Identity+Dropout+Cast": lambda: _model(
        [_n("Unsqueeze", ["x", "a"], "u"), _n("Identity", ["u"], "i"), _n("Dropout", ["i"], "d"),
         _n("Cast", ["d"], "c", to=TensorProto.FLOAT), _n("Squeeze", ["c", "a"])], {"a": _i64(0)}),
}


def _gradient_session(model: onnx.ModelProto, seed_value: np.ndarray | None = None):
    """Session returning (y, d sum(y * R) / dx) for a fixed random R."""
    m = infer_shapes(model, symbolic=False)
    shapes = static_shapes(m)
    y_shape = shapes[m.graph.output[0].name]
    r = seed_value if seed_value is not None else np.random.default_rng(1).standard_normal(y_shape).astype(np.float32)
    em = Emitter(m.graph, m.opset_import[0].version)
    g = append_backward(m, "x", {"y": em.const(r, "seed")}, em, shapes, float_tensor_names(m))
    m.graph.output.append(helper.make_tensor_value_info(g, TensorProto.FLOAT, None))
    return session(m), r


@pytest.mark.parametrize("case", sorted(CASES))
def test_backward_graph_matches_finite_differences(case):
    model = CASES[case]()
    sess, r = _gradient_session(model)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(X).astype(np.float32)
    _, g = sess.run(None, {"x": x})
    assert g.shape == x.shape
    plain = session(model)
    for _ in range(3):  # directional derivatives: <g, v> against central differences in float64 accumulation
        v = rng.standard_normal(X).astype(np.float32)
        eps = 1e-3
        lp = float((plain.run(None, {"x": x + eps * v})[0].astype(np.float64) * r).sum())
        lm = float((plain.run(None, {"x": x - eps * v})[0].astype(np.float64) * r).sum())
        fd, an = (lp - lm) / (2 * eps), float((g.astype(np.float64) * v).sum())
        assert abs(fd - an) <= 2e-2 * max(1.0, abs(fd)), (case, fd, an)


def test_every_rule_has_a_case():
    covered = {op for name in CASES for op in name.split(" ")[0].replace("_", "+").split("+")}
    covered |= {"Add", "Transpose", "Reshape", "Sub", "Div", "GlobalAveragePool"}
    assert set(supported_ops()) <= covered, set(supported_ops()) - covered


def test_backward_graph_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    model = CASES["Conv"]()
    sess, r = _gradient_session(model)
    x = np.random.default_rng(3).standard_normal(X).astype(np.float32)
    _, g = sess.run(None, {"x": x})
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    xt = torch.from_numpy(x).requires_grad_(True)
    xp = torch.nn.functional.pad(xt, (0, 1, 1, 1))  # ONNX pads [top, left, bottom, right] = [1, 0, 1, 1]
    y = torch.nn.functional.conv2d(xp, inits["w"], inits["b"], stride=2, dilation=(1, 2), groups=2)
    (y * torch.from_numpy(r)).sum().backward()
    np.testing.assert_allclose(g, xt.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_synthetic_inputs_reduce_the_bn_statistics_loss():
    model = onnx.load(FASHION_RESNET)
    cfg = SynthesisConfig(steps=40, batch=8)
    x = synthesize(model, 8, seed=0, config=cfg)["image"]
    start = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)  # synthesis starts from this
    assert bn_loss(model, x) < 0.3 * bn_loss(model, start)


def test_an_fpn_with_upsampling_and_a_transposed_conv_head_synthesises():
    """PP-OCRv4's detector (DBNet) stopped at "no gradient for Resize" (its FPN), then at ConvTranspose (its head).
    A miniature of it: BatchNorms after a nearest 2x upsampling added to a skip path and after a ConvTranspose; the
    synthesis must lower their statistics loss through both."""
    bn = lambda c: {"s": np.abs(_w(c)) + 0.5, "b": _w(c), "m": _w(c, scale=0.2), "v": np.abs(_w(c)) + 0.5}
    inits = {"w1": _w(8, 4, 3, 3), "w2": _w(8, 8, 3, 3), "wt": _w(8, 4, 2, 2), "sc": np.array([1, 1, 2, 2], np.float32)}
    for k, v in bn(8).items():
        inits[f"a{k}"] = v
    for k, v in bn(4).items():
        inits[f"t{k}"] = v
    nodes = [_n("Conv", ["x", "w1"], "c1", pads=[1, 1, 1, 1]), _n("Relu", ["c1"], "r1"),
             _n("Conv", ["r1", "w2"], "c2", pads=[1, 1, 1, 1], strides=[2, 2]),
             _n("Resize", ["c2", "", "sc"], "up", mode="nearest"), _n("Add", ["up", "r1"], "sum"),
             _n("BatchNormalization", ["sum", "as", "ab", "am", "av"], "bn1"), _n("Relu", ["bn1"], "r2"),
             _n("ConvTranspose", ["r2", "wt"], "ct", strides=[2, 2]),
             _n("BatchNormalization", ["ct", "ts", "tb", "tm", "tv"])]
    model = _model(nodes, inits, shape=("N", 4, 8, 8), out_shape=["N", 4, 16, 16])
    x = synthesize(model, 8, seed=0, config=SynthesisConfig(steps=40, batch=8))["x"]
    start = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    assert bn_loss(model, x) < 0.5 * bn_loss(model, start)


def test_a_batchnorm_network_with_fused_attention_synthesises(tmp_path):
    """A BatchNorm CNN with a self-attention block, exported as users do at opset 23 (``Attention``; BNs kept with
    optimize=False; a dynamic batch, so its reshapes compute their sizes from Shape): the synthesis differentiates
    through the Attention node and lowers the BN statistics loss, in batches (the sizes fold at the batch)."""
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    class Hybrid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.qkv, self.proj = nn.Conv2d(16, 48, 1), nn.Conv2d(16, 16, 1)
            self.c2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())

        def forward(self, x):
            x = self.c1(x)
            b, c, h, w = x.shape
            q, k, v = self.qkv(x).flatten(2).transpose(1, 2).reshape(b, h * w, 3, 2, 8).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).permute(0, 1, 3, 2).reshape(b, c, h, w)
            return self.c2(x + self.proj(a)).mean((2, 3))

    torch.manual_seed(0)
    net = Hybrid().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    program = torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), dynamo=True, opset_version=23, optimize=False,
                                dynamic_shapes=({0: torch.export.Dim.AUTO},))
    program.save(str(tmp_path / "hybrid.onnx"))
    model = onnx.load(tmp_path / "hybrid.onnx")
    assert "Attention" in {n.op_type for n in model.graph.node}
    name = model.graph.input[0].name
    x = synthesize(model, 8, seed=0, config=SynthesisConfig(steps=40, batch=8))[name]
    start = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    assert bn_loss(model, x) < 0.75 * bn_loss(model, start)  # random running statistics: 15.2 -> 10.2 (9.5 at 100)


def test_deterministic_for_a_seed():
    model = onnx.load(FASHION_RESNET)
    cfg = SynthesisConfig(steps=5, batch=4)
    a = synthesize(model, 6, seed=3, config=cfg)["image"]
    b = synthesize(model, 6, seed=3, config=cfg)["image"]
    c = synthesize(model, 6, seed=4, config=cfg)["image"]
    assert a.shape == (6, 1, 28, 28) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_spec_parsing():
    assert parse_spec("synthetic") == AUTO_SAMPLES and parse_spec("synthetic:8") == 8 and parse_spec("calib.npz") is None
    for bad in ("synthetic:0", "synthetic:x", "synthetic:-3"):
        with pytest.raises(DataError, match="synthetic:N"):
            parse_spec(bad)


def test_model_without_batchnorm_falls_back_with_a_notice(capsys):
    """Convolutions without any BatchNorm: folded by the exporter (torch.onnx.export's default), and the note says
    how to keep them; a model without convolutions (LayerNorm, MLP) gets the general note."""
    model = _model([_n("Conv", ["x", "w"]), ], {"w": _w(3, 4, 3, 3)}, shape=(1, 4, 6, 6))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    data = load_calib("synthetic:5", model)
    assert data.arrays["x"].shape == (5, 4, 6, 6)
    err = capsys.readouterr().err
    assert "folded the BatchNorms" in err and "optimize=False" in err and len(err.splitlines()) == 1
    mlp = _model([_n("MatMul", ["x", "w"])], {"w": _w(6, 3)}, shape=(1, 6))
    mlp.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    assert load_calib("synthetic:5", mlp).arrays["x"].shape == (5, 6)
    err = capsys.readouterr().err
    assert "no BatchNormalization statistics" in err and "optimize=False" not in err


def test_dynamic_spatial_size_asks_for_shape():
    model = _model([_n("BatchNormalization", ["x", "s", "b", "m", "v"])],
                   {"s": _w(4), "b": _w(4), "m": _w(4), "v": np.abs(_w(4)) + 0.5})
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(DataError, match="--shape x="):
        synthesize(model, 2)


def _cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxprune.cli", *map(str, args)], capture_output=True, text=True)


def test_unsupported_op_on_the_path_is_one_line_exit_1(tmp_path):
    model = _model([_n("Sin", ["x"], "e"), _n("BatchNormalization", ["e", "s", "b", "m", "v"], "bn"),
                    _n("Conv", ["bn", "w"])],
                   {"s": _w(4), "b": _w(4), "m": _w(4), "v": np.abs(_w(4)) + 0.5, "w": _w(8, 4, 3, 3)},
                   shape=("N", 4, 6, 6), out_shape=["N", 8, 4, 4])
    path = tmp_path / "sin.onnx"
    onnx.save(model, path)
    proc = _cli("prune", path, "-o", tmp_path / "out.onnx", "--round-to", "1", "--criterion", "obs", "--repair", "seq",
                "--calib", "synthetic:4")
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "no gradient for Sin" in err[0], proc.stderr


def _accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    logits = session(onnx.load(path)).run(None, {"image": images})[0]
    return float((logits.argmax(1) == labels).mean())


def test_cli_synthetic_calibration_end_to_end(tmp_path):
    out = tmp_path / "syn.onnx"
    proc = _cli("prune", FASHION_RESNET, "-o", out, "--ratio", "0.3", "--round-to", "1", "--criterion", "obs",
                "--repair", "seq", "--calib", "synthetic:8", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    pruned = onnx.load(out)
    assert sum(numpy_helper.to_array(t).size for t in pruned.graph.initializer) < sum(
        numpy_helper.to_array(t).size for t in onnx.load(FASHION_RESNET).graph.initializer)
    from models.fashion_mnist import is_available, load_fashion_mnist

    if not is_available():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist): accuracy not compared")
    images, labels = load_fashion_mnist("test")
    pick = np.random.default_rng(0).permutation(len(labels))[:1000]
    images, labels = images[pick], labels[pick]
    l1 = tmp_path / "l1.onnx"
    assert _cli("prune", FASHION_RESNET, "-o", l1, "--ratio", "0.3", "--round-to", "1", "--criterion", "l1").returncode == 0
    assert _accuracy(out, images, labels) > _accuracy(l1, images, labels)


def test_unsupported_error_is_typed():
    model = _model([_n("Sin", ["x"], "e"), _n("BatchNormalization", ["e", "s", "b", "m", "v"])],
                   {"s": _w(4), "b": _w(4), "m": _w(4), "v": np.abs(_w(4)) + 0.5})
    with pytest.raises(UnsupportedModelError, match="no gradient for Sin"):
        synthesize(model, 2, config=SynthesisConfig(steps=1))


def test_start_options_shape_the_initial_images():
    """``smooth_init`` lowers the neighbour-difference energy of the start (image-like correlation),
    ``offset`` spreads the per-image mean colour as real batches have it; the default stays N(0, 1)."""
    from onnxprune.synthetic import _start

    shape, image = (64, 3, 16, 16), (2, 3)
    white = _start(np.random.default_rng(0), shape, SynthesisConfig(), image)
    assert np.array_equal(white, np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    smooth = _start(np.random.default_rng(0), shape, SynthesisConfig(smooth_init=True), image)
    assert np.mean(np.diff(smooth, axis=3) ** 2) < 0.5 * np.mean(np.diff(white, axis=3) ** 2)
    shifted = _start(np.random.default_rng(0), shape, SynthesisConfig(offset=0.6), image)
    assert shifted.mean(axis=(2, 3)).std(axis=0).min() > 3 * white.mean(axis=(2, 3)).std(axis=0).max()
    assert shifted.dtype == np.float32


def _sequence_model() -> onnx.ModelProto:
    """x [2, 4, 6, 6] -> BN -> mean over H -> [2, 6 positions, 4] -> MatMul -> Softmax over 5 classes."""
    return _model([_n("BatchNormalization", ["x", "s", "b", "m", "v"], "bn"),
                   _n("ReduceMean", ["bn"], "r", axes=[2], keepdims=0), _n("Transpose", ["r"], "t", perm=[0, 2, 1]),
                   _n("MatMul", ["t", "w"], "l"), _n("Softmax", ["l"], axis=2)],
                  {"s": _w(4), "b": _w(4), "m": _w(4), "v": np.abs(_w(4)) + 0.5, "w": _w(4, 5, scale=2.0)},
                  opset=13, out_shape=[2, 6, 5])


def test_sequence_targets_cross_entropy_gradient():
    """A [batch, positions, classes] Softmax output takes one target per position (CTC text lines); the
    objective's input gradient of BN loss + cross-entropy matches central differences."""
    from onnxprune.synthetic import _sequence_targets
    from onnxprune.synthetic_objective import TARGETS, build_objective

    model = _sequence_model()
    objective = build_objective(model, 2, class_weight=2.0)
    assert objective is not None and (objective.positions, objective.classes) == (6, 5)
    rng = np.random.default_rng(0)
    t = _sequence_targets(rng, 2, 6, 5, SynthesisConfig(blank_rate=0.5, target_classes=(2, 3)))
    assert t.shape == (2, 6, 5) and np.all(t.sum(-1) == 1) and set(np.unique(t.argmax(-1))) <= {0, 2, 3}
    x = rng.standard_normal(X).astype(np.float32)
    feed = {objective.input_name: x, TARGETS: t}
    _, g = objective.session.run(None, feed)
    d = (rng.standard_normal(X) * 1e-3).astype(np.float32)
    la, _ = objective.session.run(None, {**feed, objective.input_name: x + d})
    lb, _ = objective.session.run(None, {**feed, objective.input_name: x - d})
    assert abs(float(la - lb) / 2 - float((g * d).sum())) < 0.05 * abs(float((g * d).sum())) + 1e-6
    plain = build_objective(model, 2)
    assert plain is not None and plain.positions == 0 and plain.classes == 0
    out = synthesize(model, 4, config=SynthesisConfig(steps=3, batch=2, classes=1.0, views=1))["x"]
    assert out.shape == (4, 4, 6, 6) and np.isfinite(out).all()


def test_bright_start_is_paper_with_dark_strokes():
    from onnxprune.synthetic import _start

    x = _start(np.random.default_rng(0), (8, 3, 16, 32), SynthesisConfig(start_mean=1.0), (2, 3))
    assert 0.7 < x.mean() < 0.9 and 0.05 < (x < 0).mean() < 0.15


def test_a_batch_baked_into_a_reshape_falls_back_to_one_sample_at_a_time(capsys):
    """A Reshape whose target holds the export's batch of 1 ([1, 4, 36] for a [1, 4, 6, 6] input: MobileViT's
    unfolding) builds at any batch but does not run at 8: a probe run finds out, and synthesis matches the
    statistics one sample at a time (an onnxruntime traceback before)."""
    model = _model([_n("Reshape", ["x", "t"], "r"), _n("BatchNormalization", ["r", "s", "b", "m", "v"], "bn"),
                    _n("MatMul", ["bn", "w"])],
                   {"s": _w(4), "b": _w(4), "m": _w(4), "v": np.abs(_w(4)) + 0.5, "t": _i64(1, 4, 36), "w": _w(36, 3)},
                   shape=(1, 4, 6, 6), out_shape=[1, 4, 3])  # fmt: skip
    x = synthesize(model, 3, config=SynthesisConfig(steps=2))["x"]
    assert x.shape == (3, 4, 6, 6) and np.isfinite(x).all()
    assert "one sample at a time" in capsys.readouterr().err


def test_the_probe_runs_at_the_batch_the_plan_optimises(monkeypatch):
    """The probe run that checks the objective runs at all used the starting batch (64), not the planned one:
    EfficientNet-Lite0 at 224x224 then spent 19 s and peaked at 6.1 GB in that run before optimising 5 at a time.
    Here the plan's activation cap makes a batch of 2 out of a starting batch of 8: the probe must see 2."""
    import onnxprune.synthetic as synthetic_mod
    import onnxprune.synthetic_plan as plan_mod

    model = _model([_n("Conv", ["x", "w"], "c", pads=[1, 1, 1, 1]), _n("BatchNormalization", ["c", "s", "b", "m", "v"])],
                   {"w": _w(4, 4, 3, 3), "s": _w(4), "b": _w(4), "m": _w(4), "v": np.abs(_w(4)) + 0.5},
                   shape=(1, 4, 6, 6))  # fmt: skip
    probed: list[int] = []
    planned: list[int] = []
    real_probe, real_plan = synthetic_mod._probe, synthetic_mod.plan
    monkeypatch.setattr(synthetic_mod, "_probe", lambda obj, cfg, image: (probed.append(obj.shape[0]),
                                                                          real_probe(obj, cfg, image))[1])
    monkeypatch.setattr(synthetic_mod, "plan", lambda *a, **k: (p := real_plan(*a, **k), planned.append(p.batch))[0])
    one_sample = 4 * 4 * 6 * 6  # float32 bytes of one sample's forward activations as the objective counts them
    monkeypatch.setattr(plan_mod, "BATCH_BYTES", 2 * one_sample)  # room for 2 samples a batch
    x = synthesize(model, 16, config=SynthesisConfig(steps=2, batch=8, views=1))["x"]
    assert x.shape == (16, 4, 6, 6) and np.isfinite(x).all()
    assert planned and planned[-1] < 8  # the cap made the plan's batch smaller than the starting 8
    assert probed == [planned[-1]], (probed, planned)


def test_batches_side_by_side_give_the_sequential_result_and_count_every_step(monkeypatch):
    """Two batches at once (one onnxruntime thread each) must give bit for bit what one batch after another
    gives (the starts are drawn in batch order first), report every step from the calling thread, and raise a
    worker's error instead of waiting for steps that never come."""
    import onnxprune.synthetic as synthetic_mod
    from onnxprune.progress import RecordingReporter, reporting

    model = onnx.load(FASHION_RESNET)
    cfg = SynthesisConfig(steps=5, min_steps=5, batch=4, views=1)
    assert synthetic_mod.batches_at_once(cfg, 3) == 2
    assert synthetic_mod.batches_at_once(replace(cfg, flip=True), 3) == 1  # per-step draws: sequential
    with reporting(RecordingReporter()) as reporter:
        side_by_side = synthesize(model, 12, seed=1, config=cfg)["image"]
    (total,) = {e[3] for e in reporter.events if e[1].startswith("synthetic calibration")}
    finished = [e for e in reporter.events if e[0] == "finish" and e[1].startswith("synthetic calibration")]
    assert total == 3 * 5 and finished[-1][2] == total
    monkeypatch.setattr(synthetic_mod, "AT_ONCE", 1)
    assert synthetic_mod.batches_at_once(cfg, 3) == 1
    np.testing.assert_array_equal(side_by_side, synthesize(model, 12, seed=1, config=cfg)["image"])

    monkeypatch.setattr(synthetic_mod, "AT_ONCE", 2)
    real = synthetic_mod._descend
    calls: list[int] = []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("worker failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic_mod, "_descend", second_fails)
    with pytest.raises(RuntimeError, match="worker failed"):
        synthesize(model, 24, seed=1, config=cfg)  # 6 batches: the 4 not yet started never start
    assert len(calls) == 2
