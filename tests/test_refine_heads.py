"""`onnxprune.refine`'s losses per output (probability outputs get KL), lr warmup, gradient accumulation at a
fixed batch, augmentation only of square images."""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.refine import RefineConfig, build_trainer, heads, learning_rate, refine
from onnxprune.refine import augment as augment_batch
from onnxprune.verify import session

RNG = np.random.default_rng(0)


def _seq_model(batch: int, tail: str = "softmax", seed: int = 0) -> onnx.ModelProto:
    """x [batch, 5, 7] -> MatMul + Add (logits [batch, 5, 6]) -> Softmax on the last axis (`tail`: ``softmax``;
    ``identity``: then an Identity, probabilities no Softmax announces; ``logits``: no Softmax)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["z"])]
    if tail == "softmax":
        nodes.append(helper.make_node("Softmax", ["z"], ["y"], axis=2))
    elif tail == "identity":
        nodes += [helper.make_node("Softmax", ["z"], ["p"], axis=-1), helper.make_node("Identity", ["p"], ["y"])]
    else:
        nodes.append(helper.make_node("Identity", ["z"], ["y"]))
    inits = [numpy_helper.from_array(rng.standard_normal((7, 6)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 5, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return session(model).run(None, {"x": x})[0]


def test_learning_rate_warms_up_linearly_then_decays():
    cfg = RefineConfig(epochs=1, lr=1e-3)
    lrs = [learning_rate(cfg, s, 100) for s in range(1, 101)]
    np.testing.assert_allclose(lrs[:5], [1e-3 * k / 5 for k in range(1, 6)])  # 5% of 100 steps
    assert lrs[5] == 1e-3 and all(a >= b for a, b in itertools.pairwise(lrs[5:])) and 0 < lrs[-1] < 1e-5
    assert [learning_rate(cfg, s, 10) for s in (1, 3)] == [1e-3 / 3, 1e-3]  # at least 3 warmup steps
    assert learning_rate(cfg, 1, 4) == 1e-3 / 2  # at most half of the steps
    old = RefineConfig(epochs=1, lr=1e-3, warmup=0)  # the session-24 schedule: cosine from step 1
    assert all(math.isclose(learning_rate(old, s, 50), 1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 50)))
               for s in range(1, 51))


def test_probability_outputs_are_recognised():
    x = RNG.standard_normal((3, 5, 7)).astype(np.float32)
    for tail, kind in (("softmax", "softmax"), ("identity", "prob"), ("logits", "mse")):
        m = _seq_model(3, tail)
        (head,) = heads(m, [_run(m, x)], RefineConfig())
        assert head.kind == kind, tail
        assert head.logits == ("z" if kind == "softmax" else "")
    (head,) = heads(_seq_model(3), [_run(_seq_model(3), x)], RefineConfig(loss="kl"))
    assert head.kind == "softmax" and head.temperature == 4.0  # kl: at its temperature, on the Softmax's logits


def test_probability_gradients_are_the_kl_gradients():
    """KL(t || s) summed over positions, averaged over the batch: d/dz = (s - t) / batch, whether seeded at the
    Softmax's logits or at the probabilities (-t / s, back through the Softmax); d/db sums it over positions."""
    x = RNG.standard_normal((3, 5, 7)).astype(np.float32)
    t = _run(_seq_model(3, seed=1), x)  # a different model's probabilities as the teacher's
    cfg = RefineConfig(epochs=1)
    for tail in ("softmax", "identity"):
        m = _seq_model(3, tail)
        s = _run(m, x)
        trainer = build_trainer(m, 3, (5, 7), cfg, heads(m, [t], cfg))
        feeds = {"x": x, "refine/teacher/0": t, "w": numpy_helper.to_array(m.graph.initializer[0]),
                 "b": numpy_helper.to_array(m.graph.initializer[1])}
        grads = trainer.session.run(None, feeds)[1:]
        gz = (s.astype(np.float64) - t) / 3
        gw = np.einsum("nti,ntj->ij", x.astype(np.float64), gz)
        np.testing.assert_allclose(grads[trainer.params.index("b")], gz.sum((0, 1)), rtol=1e-4, atol=1e-6,
                                   err_msg=tail)
        np.testing.assert_allclose(grads[trainer.params.index("w")], gw, rtol=1e-4, atol=1e-6, err_msg=tail)


def test_refine_at_a_fixed_batch_of_one_accumulates_and_lowers_the_kl():
    teacher, student = _seq_model(1, seed=1), _seq_model(1)
    x = RNG.standard_normal((32, 5, 7)).astype(np.float32)
    _, report = refine(student, teacher, x, RefineConfig(epochs=10, batch=4, lr=3e-2))
    assert report.accumulate == 4 and report.batch == 4 and report.steps == 10 * 8
    assert report.heads == ["softmax"] and report.kept
    assert report.loss_after < 0.5 * report.loss_before
    # the loss: KL summed over the 5 positions, averaged over the samples
    s, t = np.concatenate([_run(student, x[i:i + 1]) for i in range(32)]), \
        np.concatenate([_run(teacher, x[i:i + 1]) for i in range(32)])
    kl = (t * (np.log(t) - np.log(s))).sum((1, 2)).mean()
    assert math.isclose(report.loss_before, kl, rel_tol=1e-4)


def test_augment_only_square_images():
    rng = np.random.default_rng(0)
    line = RNG.standard_normal((4, 3, 48, 320)).astype(np.float32)
    assert augment_batch(line, rng) is line  # a text line: shifting or cropping it loses characters
    square = RNG.standard_normal((4, 3, 32, 32)).astype(np.float32)
    assert not np.array_equal(augment_batch(square, rng), square)
