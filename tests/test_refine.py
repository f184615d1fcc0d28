"""End-to-end refinement: parameter gradients against torch autograd, then `onnxprune.refine` itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.autodiff import float_tensor_names, static_shapes
from onnxprune.gradients import Emitter
from onnxprune.param_gradients import parameter_backward, trainable_parameters
from onnxprune.shape_inference import infer_shapes
from onnxprune.verify import session

ROOT = Path(__file__).resolve().parents[1]
FASHION_CNN = ROOT / "models" / "fashion_mnist_cnn.onnx"
RNG = np.random.default_rng(0)
X = (3, 4, 7, 7)


def _w(*shape: int, scale: float = 0.5) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], shape: tuple = X) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _n(op: str, inputs: list[str], output: str = "y", **kw: object) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], **kw)


# ---------------------------------------------------------------------------------------------------
# a tiny ONNX -> torch interpreter for the reference gradients (torch is a test-only dependency)
def _torch_forward(model: onnx.ModelProto, x, params: dict):
    import torch
    import torch.nn.functional as F

    env = {"x" if model.graph.input[0].name == "x" else model.graph.input[0].name: x, **params}
    for node in model.graph.node:
        a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
        ins = [env[i] if i else None for i in node.input]
        op = node.op_type
        if op == "Conv":
            nd = ins[1].dim() - 2
            pads = list(a.get("pads", [0] * 2 * nd))
            xin = F.pad(ins[0], [p for i in reversed(range(nd)) for p in (pads[i], pads[nd + i])])
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
            y = conv(xin, ins[1], ins[2] if len(ins) > 2 else None, stride=a.get("strides", 1),
                     dilation=a.get("dilations", 1), groups=a.get("group", 1))
        elif op == "BatchNormalization":
            y = F.batch_norm(ins[0], ins[3], ins[4], ins[1], ins[2], False, 0.0, a.get("epsilon", 1e-5))
        elif op == "Relu":
            y = torch.relu(ins[0])
        elif op == "MaxPool":
            y = F.max_pool2d(ins[0], a["kernel_shape"], a.get("strides"), 0)
        elif op == "Add":
            y = ins[0] + ins[1]
        elif op == "Mul":
            y = ins[0] * ins[1]
        elif op == "Concat":
            y = torch.cat(ins, dim=a["axis"])
        elif op == "GlobalAveragePool":
            y = ins[0].mean(dim=(2, 3), keepdim=True)
        elif op == "Flatten":
            y = ins[0].flatten(a.get("axis", 1))
        elif op == "Identity":
            y = ins[0]
        elif op == "Gemm":
            w = ins[1].t() if a.get("transB", 0) else ins[1]
            y = a.get("alpha", 1.0) * ins[0] @ w + (a.get("beta", 1.0) * ins[2] if len(ins) > 2 else 0)
        elif op == "MatMul":
            y = ins[0] @ ins[1]
        else:
            raise NotImplementedError(op)
        env[node.output[0]] = y
    return env[model.graph.output[0].name]


def _check_against_torch(model: onnx.ModelProto, x: np.ndarray, rtol: float = 2e-3) -> dict[str, np.ndarray]:
    """Loss sum(y * R): the ONNX parameter gradients equal torch autograd's for every trainable parameter."""
    import torch

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for out in m.graph.output:  # declared outputs may keep a symbolic batch: let inference fill them
        out.type.tensor_type.ClearField("shape")
    m = infer_shapes(m, symbolic=False)
    shapes = static_shapes(m)
    params = trainable_parameters(m)
    assert params
    r = RNG.standard_normal(shapes[m.graph.output[0].name]).astype(np.float32)
    em = Emitter(m.graph, 17, prefix="pg")
    grads = parameter_backward(m, params, {m.graph.output[0].name: em.const(r, "seed")}, em, shapes,
                               float_tensor_names(m))
    for p in params:
        assert grads[p] is not None, p
        m.graph.output.append(helper.make_tensor_value_info(grads[p], TensorProto.FLOAT, list(shapes[p])))
    onnx.checker.check_model(m)
    got = session(m).run(None, {m.graph.input[0].name: x})
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    tparams = {k: torch.tensor(v, dtype=torch.float64, requires_grad=k in params) for k, v in inits.items()}
    y = _torch_forward(model, torch.tensor(x, dtype=torch.float64), tparams)
    (y * torch.tensor(r, dtype=torch.float64)).sum().backward()
    out = {}
    for p, g in zip(params, got[1:]):
        ref = tparams[p].grad.numpy()
        assert g.shape == ref.shape, p
        np.testing.assert_allclose(g, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max() + 1e-6), err_msg=p)
        out[p] = g
    return out


GRAD_CASES = {
    "conv_strided_padded": lambda: _model([_n("Conv", ["x", "w", "b"], strides=[2, 2], pads=[1, 0, 1, 1],
                                              dilations=[1, 2])], {"w": _w(5, 4, 3, 3), "b": _w(5)}),
    "conv_stride1_same": lambda: _model([_n("Conv", ["x", "w", "b"], pads=[1, 1, 1, 1])],
                                        {"w": _w(6, 4, 3, 3), "b": _w(6)}),
    "conv_grouped_strided": lambda: _model([_n("Conv", ["x", "w"], strides=[2, 1], pads=[0, 1, 1, 0], group=2)],
                                           {"w": _w(6, 2, 3, 2)}),
    "conv_depthwise": lambda: _model([_n("Conv", ["x", "w", "b"], pads=[2, 2, 2, 2], group=4)],
                                     {"w": _w(8, 1, 5, 5), "b": _w(8)}),
    "conv_chain_live_input_grad": lambda: _model(  # the second Conv's input gradient uses its live weight
        [_n("Conv", ["x", "w1"], "h", pads=[1, 1, 1, 1], group=2), _n("Relu", ["h"], "r"),
         _n("Conv", ["r", "w2"], "c", strides=[2, 2], pads=[1, 1, 0, 0]),
         _n("Conv", ["c", "w3"], pads=[1, 1, 1, 1], group=3)],
        {"w1": _w(6, 2, 3, 3), "w2": _w(6, 6, 3, 3), "w3": _w(6, 2, 3, 3)}),
    "bn_scale_bias": lambda: _model([_n("Conv", ["x", "w"], "c"), _n("BatchNormalization", ["c", "s", "b", "m", "v"])],
                                    {"w": _w(4, 4, 1, 1), "s": _w(4), "b": _w(4), "m": _w(4), "v": np.abs(_w(4)) + 0.5}),
    "gemm": lambda: _model([_n("Flatten", ["x"], "f"), _n("Gemm", ["f", "w", "b"], alpha=0.5, transB=1)],
                           {"w": _w(7, 196, scale=0.1), "b": _w(7)}),
    "matmul_bias_add": lambda: _model([_n("MatMul", ["x", "w"], "h"), _n("Add", ["h", "b"])],
                                      {"w": _w(7, 5), "b": _w(5)}),
}


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_parameter_gradients_match_torch(case):
    pytest.importorskip("torch")
    _check_against_torch(GRAD_CASES[case](), RNG.standard_normal(X).astype(np.float32))


def test_parameter_gradients_of_a_real_model_match_torch():
    pytest.importorskip("torch")
    if not FASHION_CNN.exists():
        pytest.skip("bundled Fashion-MNIST CNN missing")
    from onnxprune.importer import fix_input_shapes

    model = onnx.load(str(FASHION_CNN))
    fix_input_shapes(model, {model.graph.input[0].name: [4, 1, 28, 28]})
    grads = _check_against_torch(model, RNG.standard_normal((4, 1, 28, 28)).astype(np.float32))
    kinds = {n.op_type for n in model.graph.node for i in n.input if i in grads}
    assert {"Conv", "BatchNormalization", "Gemm"} <= kinds


def test_trainable_parameters_pick_weights_and_biases_only():
    m = _model([_n("Conv", ["x", "w", "b"], "c"), _n("BatchNormalization", ["c", "s", "sb", "m", "v"], "n"),
                _n("Reshape", ["n", "shape"], "r"), _n("MatMul", ["r", "w2"], "h"), _n("Add", ["h", "b2"], "a"),
                _n("Add", ["a", "k"])],
               {"w": _w(2, 4, 1, 1), "b": _w(2), "s": _w(2), "sb": _w(2), "m": _w(2), "v": _w(2),
                "shape": np.array([3, 98], np.int64), "w2": _w(98, 3), "b2": _w(3), "k": _w(3)})
    assert trainable_parameters(m) == ["w", "b", "s", "sb", "w2", "b2"]


# ---------------------------------------------------------------------------------------------------
# refine itself
def _pruned_fashion_cnn(fraction: float = 0.4):
    """(dense, pruned with l1 and no repair, train images, test images) of the bundled Fashion-MNIST CNN."""
    if not FASHION_CNN.exists():
        pytest.skip("bundled Fashion-MNIST CNN missing")
    from models import fashion_mnist
    from onnxprune.importer import import_model
    from onnxprune.passes.iterative import IterativePrunePass
    from onnxprune.passes.pruning import PruneConfig

    if not fashion_mnist.is_available():
        pytest.skip(f"Fashion-MNIST not installed: apt-get install -y {fashion_mnist.DEBIAN_PACKAGE}")
    dense = import_model(str(FASHION_CNN))
    cfg = PruneConfig(criterion="l1", repair="none", target_params=f"{(1 - fraction) * 100:.0f}%", round_to=1)
    pruned = IterativePrunePass(cfg, 1).run(dense).model
    train, _ = fashion_mnist.load_fashion_mnist("train")
    test, labels = fashion_mnist.load_fashion_mnist("test")
    return dense, pruned, train[:512], test[:1000], labels[:1000]


def _structure(m: onnx.ModelProto) -> tuple:
    return ([(n.op_type, tuple(n.input), tuple(n.output), n.SerializeToString()) for n in m.graph.node],
            [(t.name, tuple(t.dims), t.data_type) for t in m.graph.initializer],
            [vi.SerializeToString() for vi in [*m.graph.input, *m.graph.output]])


def test_refine_with_zero_epochs_is_the_identity():
    from onnxprune.passes.refine import RefinePass
    from onnxprune.refine import RefineConfig, refine

    m = GRAD_CASES["conv_stride1_same"]()
    x = RNG.standard_normal((8, *X[1:])).astype(np.float32)
    out, report = refine(m, m, x, RefineConfig(epochs=0))
    assert out is m and report.steps == 0
    res = RefinePass(RefineConfig(epochs=0), None, m).run(m)
    assert res.model is m and not res.modified


def test_refine_lowers_the_held_out_distillation_loss_and_keeps_the_graph():
    from onnxprune.calibration import CalibrationData
    from onnxprune.passes.refine import RefinePass
    from onnxprune.refine import RefineConfig, RefineReport, distillation_loss

    dense, pruned, calib, held_out, _ = _pruned_fashion_cnn()
    config = RefineConfig(epochs=3, batch=64, lr=1e-3, threads=1)
    res = RefinePass(config, CalibrationData({dense.graph.input[0].name: calib}), dense).run(pruned)
    refined, report = res.model, res.get(RefineReport)
    assert res.modified and report is not None and report.steps == 3 * (512 // 64)
    assert report.loss_after < report.loss_before  # on the calibration inputs
    before = distillation_loss(pruned, dense, held_out, config)
    after = distillation_loss(refined, dense, held_out, config)
    assert after < 0.8 * before, (before, after)  # and on images it never saw
    onnx.checker.check_model(refined, full_check=True)
    assert _structure(refined) == _structure(pruned)  # only initializer values changed
    changed = sum(not np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
                  for a, b in zip(refined.graph.initializer, pruned.graph.initializer))
    assert changed >= 10
    name = dense.graph.input[0].name
    y_pruned = session(pruned).run(None, {name: held_out})[0]
    y_refined = session(refined).run(None, {name: held_out})[0]
    y_dense = session(dense).run(None, {name: held_out})[0]
    assert y_refined.shape == y_pruned.shape == y_dense.shape
    # the refined model agrees with the dense model's decisions more often than the pruned one
    def agree(y: np.ndarray) -> float:
        return float((y.argmax(1) == y_dense.argmax(1)).mean())

    assert agree(y_refined) >= agree(y_pruned)


def test_refine_kl_loss_and_determinism():
    from onnxprune.refine import RefineConfig, refine

    dense, pruned, calib, _, _ = _pruned_fashion_cnn()
    config = RefineConfig(epochs=1, batch=64, lr=1e-3, loss="kl", threads=1)
    a, ra = refine(pruned, dense, calib[:256], config)
    b, rb = refine(pruned, dense, calib[:256], config)
    assert ra.loss_after < ra.loss_before and ra.loss == "kl"
    assert ra.history == rb.history
    for ta, tb in zip(a.graph.initializer, b.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(ta), numpy_helper.to_array(tb))


def test_cli_refine_zero_is_bit_for_bit_and_refine_needs_calib(tmp_path):
    import subprocess
    import sys

    if not FASHION_CNN.exists():
        pytest.skip("bundled Fashion-MNIST CNN missing")
    outs = []
    for extra in ([], ["--refine", "0"]):
        out = tmp_path / f"p{len(outs)}.onnx"
        subprocess.run([sys.executable, "-m", "onnxprune.cli", "prune", str(FASHION_CNN), "--ratio", "0.3",
                        "-o", str(out), "--no-verify", *extra], check=True, capture_output=True)
        outs.append(onnx.load(str(out)))
    assert outs[0].graph.SerializeToString() == outs[1].graph.SerializeToString()  # metadata holds timings
    bad = subprocess.run([sys.executable, "-m", "onnxprune.cli", "prune", str(FASHION_CNN), "--ratio", "0.3",
                          "-o", str(tmp_path / "x.onnx"), "--refine", "2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--refine needs calibration inputs" in bad.stderr


def test_refine_hands_back_the_pruned_model_when_the_loss_does_not_drop():
    from onnxprune.refine import RefineConfig, refine

    teacher = GRAD_CASES["conv_stride1_same"]()
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    student.graph.initializer[0].CopyFrom(numpy_helper.from_array(_w(6, 4, 3, 3), "w"))
    x = RNG.standard_normal((12, *X[1:])).astype(np.float32)  # the model's batch is 3
    out, report = refine(student, teacher, x, RefineConfig(epochs=1, batch=3, lr=1e3, augment=False))
    assert not report.kept and report.loss_after > report.loss_before and out is student
    good, report = refine(student, teacher, x, RefineConfig(epochs=20, batch=3, lr=1e-2, augment=False))
    assert report.kept and report.loss_after < 0.5 * report.loss_before and good is not student


@pytest.mark.parametrize("bad", [{"seed": -1}, {"epochs": -1}, {"lr": 0.0}, {"warmup": 1.0}, {"loss": "l7"}])
def test_refine_config_refuses_bad_values(bad):
    from onnxprune.errors import UsageError
    from onnxprune.refine import RefineConfig

    with pytest.raises(UsageError):
        RefineConfig(**bad)

