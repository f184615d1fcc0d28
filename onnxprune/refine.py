"""End-to-end refinement: distil the dense model's outputs into the pruned model's remaining weights.

Layer-wise repair (`onnxprune.repair`, `onnxprune.repair_stream`) refits each layer to the dense layer's output;
nothing there optimises the network end to end, so small per-layer errors still compound. `refine` closes that
gap the way post-training reconstruction (BRECQ) and data-free knowledge distillation (DeepInversion's second
stage) do: a few epochs of gradient descent on the calibration inputs (real or synthetic), no labels, with the
ORIGINAL dense model as the teacher.

Start reading at `refine`. The steps:

1. `heads`: the loss per output. Logits: ``mse`` (squared error) or ``kl`` (``T^2 KL`` of the softmaxes at
   temperature T, the first output only). Outputs that are already probabilities get KL(teacher || student) on
   the probabilities whatever `RefineConfig.loss` says: a trailing Softmax over the last axis (PP-OCRv4 rec's CTC
   output [1, 40, 6625]) is differentiated at its logits (``softmax``), other probabilities (non-negative, summing
   to 1 on the last axis, recognised on the teacher's outputs) through ``-t / s`` (``prob``). Every loss is summed
   over a sample's positions and averaged over the samples (an MSE averaged over 40 x 6625 probabilities put the
   gradients near Adam's eps: PP-OCRv4 refine raised its loss, session 24).
2. `build_trainer`: one ONNX training graph, run by onnxruntime (torch is not a run-time dependency): the
   pruned forward pass at a fixed batch, the loss gradient at its outputs (``mse``: ``2 (s - t) / batch``
   toward the teacher's outputs, fed as inputs; ``kl`` / ``softmax``: ``T (softmax(z/T) - softmax(t/T)) / batch``
   at the logits z, with the teacher's probabilities fed; ``prob``: ``-t / s / batch``), and the backward pass to
   every trainable parameter (`onnxprune.param_gradients`: Conv / Gemm / MatMul weights and biases, BatchNorm
   scale and bias, bias Adds). The parameters are graph *inputs* of the training graph, so one session serves
   every step.
3. Per step: a mini-batch of the calibration inputs, augmented for square images (random horizontal flip and
   pad-and-crop; the teacher sees the same augmented batch; text lines and other non-square inputs are not
   augmented), the teacher's outputs from the dense model, one run of the training graph (a model fixed to a
   smaller batch, e.g. imported at batch 1, runs several times and accumulates the gradients), an Adam step in
   numpy with a linear warmup (5% of the steps, at least 3) and then a cosine learning rate.
4. The result is the pruned model with new initializer values: same nodes, names and shapes.

The loss before / after is measured on the unaugmented calibration inputs (`distillation_loss`); when refinement
did not lower it, the pruned model comes back unchanged (`RefineReport.kept`). Deterministic for a seed.

Measured (CIFAR-10 ResNet20, dense 91.73%, obs + seq + knapsack as bench/accuracy_real.py, all 10,000 test images,
one onnxruntime thread; bench/accuracy_real_results.txt, session 24), top-1 at 20% / 40% of parameters removed:
calibrated (2,000 images, 10 epochs, lr 1e-3, MSE) 90.25 / 86.98 -> 91.03 / 89.02; data-free (256 synthetic inputs,
80 epochs) 89.72 / 85.04 -> 90.18 / 86.62. One step (batch 64) costs ~0.35 s, about 8x the pruned forward pass
(the weight gradients are one GEMM per Conv, `onnxprune.param_gradients`); 10 epochs of 2,000 images ~3 min.
Session 25 (the warmup; losses now summed per sample: R20's MSE reads 10x the session-24 values): calibrated 20%,
3 epochs, lr 1e-3: warmup 90.69 (loss 24.5 -> 18.8), none 90.66 (24.5 -> 19.7): the warmup does not hurt;
1 epoch raised the loss with or without it (3 warmup steps of 31; the guard kept 90.25).

PP-OCRv4 rec (data-free 20%, obs + seq, lamp, 256 synthetic inputs: 91.5% exact match, original 99.5%; batch 1
model, so 8 runs accumulated per step; session 25): the KL gradients are right to first order (a 1e-7 SGD step
along them: loss change -0.00917, predicted -0.00927) but the loss surface is very sharp: a sign step (what
Adam's first steps are) of 1e-5 on every weight lowers one sample's loss 1.53 -> 0.96, 1e-4 raises it to 9.8.
Adam at lr 1e-3 / 3e-5 / 1e-5 (2-3 epochs) raised the loss on the synthetic inputs (2.21 -> 8.95 / 2.54 / 2.54):
all discarded by the guard, 91.5% unchanged. At lr 3e-6 / 1e-6 (2 epochs, 64 steps, ~12 min niced under load)
the loss drops 2.21 -> 1.88 / 1.94 and exact match rises 91.5 -> 92.0 / 92.0; 4 epochs at 3e-6 reach the lowest
loss (1.81) at 91.5: the loss on synthetic inputs does not carry over to text (the KL on 64 real rendered lines stays
14.83-14.93 vs 14.89 pruned, ~7x the synthetic inputs' 2.21), the bar (94.5) is far (session 25,
bench/accuracy_real_results.txt). The CIFAR-tuned default lr (1e-3) is ~300x too high for this model.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.autodiff import float_tensor_names, static_shapes
from onnxprune.canonical import remove_dead_code
from onnxprune.errors import UnsupportedModelError, UsageError
from onnxprune.external import tensor_array
from onnxprune.gradients import Emitter
from onnxprune.importer import fix_input_shapes
from onnxprune.onnx_utils import opset_of, softmax_logits
from onnxprune.param_gradients import parameter_backward, trainable_parameters
from onnxprune.progress import task
from onnxprune.shape_inference import infer_shapes
from onnxprune.verify import session

__all__ = ["LOSSES", "Head", "RefineConfig", "RefineReport", "Trainer", "build_trainer", "distillation_loss", "heads",
           "learning_rate", "refine"]

LOSSES = ("mse", "kl")
TEACHER = "refine/teacher"


@dataclass(frozen=True)
class RefineConfig:
    """How to refine.

    Attributes:
        epochs: passes over the calibration inputs; 0 leaves the model untouched.
        batch: samples per Adam step (the remainder of an epoch is dropped, a different one each epoch). A model
            fixed to a smaller batch (imported at batch 1: the batch is folded into its Reshapes) runs at its own
            batch and accumulates the gradients of ``batch // fixed`` runs per step.
        lr: Adam's peak learning rate (linear warmup over the first `warmup` of the steps, then cosine decay to 0).
        warmup: fraction of the steps (at least 3, at most half) with a linear warmup; 0: none.
        loss: ``mse`` on the outputs or ``kl`` at `temperature` on the first output's last axis (classifiers).
            Outputs that are already probabilities (a trailing Softmax, or the teacher's outputs are non-negative
            and sum to 1 on the last axis) always get KL(teacher || student) instead (at `temperature` with
            ``kl``, at 1 with ``mse``).
        temperature: the KL temperature.
        augment: flip and pad-crop square image inputs ([N, C, H, W], H == W); other inputs (text lines) are
            left as they are.
        seed: shuffling and augmentation.
        threads: onnxruntime intra-op threads (None: its default).
    """

    epochs: int = 0
    batch: int = 64
    lr: float = 1e-3  # R20 40%: 5 epochs at 5e-4 88.23%, 10 at 1e-3 89.02% (from 86.98)
    warmup: float = 0.05
    loss: str = "mse"
    temperature: float = 4.0
    augment: bool = True
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise UsageError(f"refine loss must be one of {', '.join(LOSSES)} (got {self.loss!r})")
        if (self.epochs < 0 or self.batch < 1 or not self.lr > 0 or not self.temperature > 0
                or not 0 <= self.warmup < 1 or self.seed < 0):
            raise UsageError("refine: epochs >= 0, batch >= 1, lr > 0, temperature > 0, 0 <= warmup < 1 and seed >= 0")


@dataclass
class RefineReport:
    """What `refine` did: the JSON report's ``refine`` entry."""

    epochs: int
    steps: int
    loss: str
    lr: float
    batch: int
    samples: int
    parameters: int  # trainable tensors
    loss_before: float
    loss_after: float
    seconds: float
    history: list[float] = field(default_factory=list)  # mean training loss per epoch
    kept: bool = True  # False: the refined weights did not lower the loss, the pruned model was returned as is
    heads: list[str] = field(default_factory=list)  # the loss per output: mse, kl, softmax (KL on its logits), prob
    accumulate: int = 1  # model runs per step (a model fixed to a batch smaller than `batch`)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Head:
    """The loss on one output. `kind`: ``mse`` (squared error), ``kl`` (KL at `temperature` of the softmaxes of
    logits), ``softmax`` (the output is a Softmax over its last axis: KL on the probabilities, the gradient
    seeded at the logits before it, `logits`), ``prob`` (other probability outputs: KL, seeded at the output)."""

    output: str
    index: int  # position among the model's outputs
    kind: str
    temperature: float = 1.0
    logits: str = ""


@dataclass
class Trainer:
    """The training graph's session and what feeding it needs."""

    session: Any  # onnxruntime.InferenceSession
    input_name: str
    batch: int
    params: list[str]
    outputs: list[str]  # the student's outputs (first outputs of a run)
    config: RefineConfig
    heads: list[Head] = field(default_factory=list)


def _input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    if len(inputs) != 1:
        raise UnsupportedModelError(f"refine supports models with one input (this one has {len(inputs)})")
    return inputs[0]


def _is_probability(t: np.ndarray) -> bool:
    return t.ndim >= 2 and t.shape[-1] > 1 and float(t.min()) >= 0 and bool(
        np.allclose(t.astype(np.float64).sum(-1), 1.0, atol=1e-3))


def heads(model: onnx.ModelProto, teacher_outputs: list[np.ndarray], config: RefineConfig) -> list[Head]:
    """The loss of each float output of `model` (in graph order; ``kl``: the first only). `teacher_outputs`: the
    teacher's outputs on some inputs, to recognise probabilities that no trailing Softmax announces."""
    temp = config.temperature if config.loss == "kl" else 1.0
    names = [o.name for o in model.graph.output]
    out: list[Head] = []
    for index, (name, t) in enumerate(zip(names, teacher_outputs)):
        if not np.issubdtype(t.dtype, np.floating):
            continue
        logits = softmax_logits(model, name, t.ndim)
        if logits is not None:
            out.append(Head(name, index, "softmax", temp, logits))
        elif _is_probability(t):
            out.append(Head(name, index, "prob"))
        else:
            out.append(Head(name, index, config.loss, temp))
    return out[:1] if config.loss == "kl" else out


def build_trainer(pruned: onnx.ModelProto, batch: int, dims: tuple[int, ...], config: RefineConfig,
                  loss_heads: list[Head] | None = None) -> Trainer:
    """The training graph (forward, loss gradient, backward to the parameters) of `pruned` at ``[batch, *dims]``.

    `loss_heads` (`heads`): the loss per output; default: `config.loss` on every float output (the first with
    ``kl``)."""
    vi = _input(pruned)
    m = onnx.ModelProto()
    m.CopyFrom(pruned)
    for graph_input in m.graph.input:
        if graph_input.name == vi.name:
            graph_input.type.tensor_type.shape.dim[0].Clear()
    fix_input_shapes(m, {vi.name: [batch, *dims]})
    for graph_output in m.graph.output:  # declared outputs keep a symbolic batch: let inference fill them
        graph_output.type.tensor_type.ClearField("shape")
    m = infer_shapes(m, symbolic=False)
    shapes = static_shapes(m)
    floats = float_tensor_names(m)
    params = trainable_parameters(m)
    if not params:
        raise UnsupportedModelError("refine: the model has no trainable weights (Conv / Gemm / MatMul / BatchNorm)")
    if loss_heads is None:
        temp = config.temperature if config.loss == "kl" else 1.0
        loss_heads = [Head(o.name, i, config.loss, temp) for i, o in enumerate(m.graph.output) if o.name in floats]
        loss_heads = loss_heads[:1] if config.loss == "kl" else loss_heads
    outputs = [h.output for h in loss_heads]
    em = Emitter(m.graph, opset_of(m), prefix="refine")
    seeds: dict[str, str] = {}
    # every loss is summed over a sample's positions and averaged over the batch: a [40, 6625] output averaged
    # per element put the gradients near Adam's eps (PP-OCRv4 rec, session 24)
    for i, h in enumerate(loss_heads):
        if h.output not in shapes:
            raise UnsupportedModelError(f"refine: output {h.output!r} has no static shape")
        target = f"{TEACHER}/{i}"
        m.graph.input.append(helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, list(shapes[h.output])))
        if h.kind == "mse":
            seeds[h.output] = em.scale(em.op("Sub", [h.output, target]), 2.0 / batch)
        elif h.kind in ("kl", "softmax"):
            # d (T^2 KL(p_t || softmax(z / T))) / d z = T (softmax(z / T) - p_t) / batch; z: the logits
            z = h.output if h.kind == "kl" else h.logits
            p = em.op("Softmax", [em.scale(z, 1.0 / h.temperature)], axis=-1)
            seeds[z] = em.scale(em.op("Sub", [p, target]), h.temperature / batch)
        else:  # prob: d KL(t || s) / d s = -t / s
            s = em.op("Max", [h.output, em.const(1e-12, "eps")])
            seeds[h.output] = em.scale(em.op("Div", [target, s]), -1.0 / batch)
    grads = parameter_backward(m, params, seeds, em, shapes, floats)
    params = [p for p in params if grads[p] is not None]
    # the parameters become inputs: one session, fed the current values every step
    keep = [t for t in m.graph.initializer if t.name not in set(params)]
    values = {t.name: t for t in m.graph.initializer if t.name in set(params)}
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    for p in params:
        m.graph.input.append(helper.make_tensor_value_info(p, values[p].data_type, list(values[p].dims)))
    del m.graph.output[:]
    for out in outputs:
        m.graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, list(shapes[out])))
    for p in params:
        grad = grads[p]
        assert grad is not None  # params without a gradient were dropped above
        m.graph.output.append(helper.make_tensor_value_info(grad, onnx.TensorProto.FLOAT, list(shapes[p])))
    del m.graph.value_info[:]
    remove_dead_code(m.graph)
    return Trainer(session(m, optimize=True, threads=config.threads), vi.name, batch, params, outputs, config,
                   list(loss_heads))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _logits(h: Head, y: np.ndarray) -> np.ndarray:
    """Logits of an output (probabilities: their logs, which a softmax maps back to them)."""
    return np.log(np.maximum(y, 1e-30)) if h.kind in ("softmax", "prob") else y


def _target(h: Head, t: np.ndarray) -> np.ndarray:
    """What the training graph is fed for the teacher's output `t` of head `h`."""
    if h.kind == "mse" or (h.kind in ("softmax", "prob") and h.temperature == 1.0):
        return t
    return _softmax(_logits(h, t.astype(np.float64)) / h.temperature).astype(np.float32)


def _loss(student: list[np.ndarray], teacher: list[np.ndarray], loss_heads: list[Head]) -> float:
    """The distillation loss of one batch (the value whose gradient the training graph computes): per sample,
    summed over the outputs and their positions; averaged over the samples. `student`, `teacher`: every output
    of the models, in order."""
    total = 0.0
    for h in loss_heads:
        s, t = student[h.index].astype(np.float64), teacher[h.index].astype(np.float64)
        if h.kind == "mse":
            per = (s - t) ** 2
        else:
            temp = h.temperature
            log_pt = _log_softmax(_logits(h, t) / temp)
            per = temp * temp * np.exp(log_pt) * (log_pt - _log_softmax(_logits(h, s) / temp))
        total += float(per.reshape(len(s), -1).sum(-1).mean())
    return total


def _run_batches(sess, name: str, x: np.ndarray, batch: int) -> list[np.ndarray]:
    parts = [sess.run(None, {name: x[i : i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def _outputs(model: onnx.ModelProto, x: np.ndarray, config: RefineConfig, batch: int = 64) -> list[np.ndarray]:
    """`model`'s outputs on `x`, in batches (a model fixed to a batch runs at that batch)."""
    vi = _input(model)
    dim = vi.type.tensor_type.shape.dim
    static = dim[0].dim_value if len(dim) and dim[0].HasField("dim_value") else 0
    if static:  # whole batches only: the remainder cannot run
        x = x[: len(x) - len(x) % static]
    return _run_batches(session(model, threads=config.threads), vi.name, x, static or batch)


def distillation_loss(student: onnx.ModelProto, teacher: onnx.ModelProto, x: np.ndarray,
                      config: RefineConfig = RefineConfig(), batch: int = 64) -> float:
    """The distillation loss of `student` toward `teacher` on inputs `x` (no augmentation; the losses of
    `heads`)."""
    reference = _outputs(teacher, x, config, batch)
    return _loss(_outputs(student, x, config, batch), reference, heads(student, reference, config))


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal flip and zero-pad-by-H/8-and-crop of a square image batch [N, C, H, H]; any other
    input comes back as it is (a text line 48 x 320 shifted by 6 rows loses the tops of its glyphs, and a crop
    of its ends loses characters)."""
    if x.ndim != 4 or x.shape[2] != x.shape[3] or x.shape[2] < 8:
        return x
    n, _, h, w = x.shape
    out = x.copy()
    flip = rng.random(n) < 0.5
    out[flip] = out[flip][..., ::-1]
    p = max(1, h // 8)
    padded = np.pad(out, ((0, 0), (0, 0), (p, p), (p, p)))
    dy, dx = rng.integers(0, 2 * p + 1, n), rng.integers(0, 2 * p + 1, n)
    for i in range(n):
        out[i] = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
    return out


def learning_rate(config: RefineConfig, step: int, total: int) -> float:
    """The learning rate of step `step` (1-based) of `total`: linear warmup, then cosine decay (without the
    warmup, Adam's first steps at full lr raised the loss: R20 20%, 1 epoch, 2.45 -> 2.86, session 24)."""
    warm = min(max(3, math.ceil(config.warmup * total)), total // 2) if config.warmup > 0 else 0
    if step <= warm:
        return config.lr * step / warm
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warm - 1) / max(1, total - warm)))


def _with_values(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(values[t.name].astype(np.float32), t.name))
    return out


def refine(pruned: onnx.ModelProto, teacher: onnx.ModelProto, x: np.ndarray,
           config: RefineConfig) -> tuple[onnx.ModelProto, RefineReport]:
    """Distil `teacher`'s outputs into `pruned`'s weights on the inputs `x` ([samples, *dims]).

    Returns the refined model (the pruned graph with new initializer values; `pruned` itself when
    ``config.epochs == 0`` or when the refined weights did not lower the distillation loss on `x`) and the report.

    Raises:
        UnsupportedModelError: a node between a parameter and the outputs has no gradient rule, or the model has
            more than one input.
    """
    t0 = time.perf_counter()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    dim0 = _input(pruned).type.tensor_type.shape.dim[0]
    # a model imported at a fixed batch has it folded into its shape constants: run at that batch, accumulate
    fixed = dim0.dim_value if dim0.HasField("dim_value") and dim0.dim_value > 0 else 0
    if fixed:  # whole batches only (the remainder of fewer than `fixed` inputs is not used)
        x = x[: n - n % fixed]
        n = len(x)
    micro = fixed or min(config.batch, n)
    accumulate = max(1, min(config.batch, n) // micro) if fixed else 1
    if config.epochs == 0 or n == 0:
        return pruned, RefineReport(0, 0, config.loss, config.lr, micro, n, 0, float("nan"), float("nan"), 0.0)
    reference = _outputs(teacher, x, config)  # the teacher's outputs on `x`, for the loss before and after
    loss_heads = heads(pruned, reference, config)
    trainer = build_trainer(pruned, micro, tuple(x.shape[1:]), config, loss_heads)
    teacher_sess = session(teacher, optimize=True, threads=config.threads)
    teacher_input = _input(teacher).name
    inits = {t.name: t for t in pruned.graph.initializer}
    values = {p: tensor_array(inits[p]).astype(np.float32).copy() for p in trainer.params}
    loss_before = _loss(_outputs(pruned, x, config), reference, loss_heads)
    rng = np.random.default_rng(config.seed)
    per_step = micro * accumulate
    steps_per_epoch = n // per_step
    total = config.epochs * steps_per_epoch
    m1 = {p: np.zeros_like(v) for p, v in values.items()}
    m2 = {p: np.zeros_like(v) for p, v in values.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    history: list[float] = []
    step = 0
    k = len(trainer.outputs)
    with task("refine (distillation from the dense model)", total) as progress:
        for _ in range(config.epochs):
            order = rng.permutation(n)
            losses = []
            for b in range(steps_per_epoch):
                grads: list[np.ndarray] = []
                for j in range(accumulate):
                    start = b * per_step + j * micro
                    xb = x[order[start : start + micro]]
                    if config.augment:
                        xb = augment(xb, rng)
                    targets = teacher_sess.run(None, {teacher_input: xb})
                    feeds = {trainer.input_name: xb, **values}
                    feeds.update({f"{TEACHER}/{i}": _target(h, targets[h.index]) for i, h in enumerate(loss_heads)})
                    out = trainer.session.run(None, feeds)
                    student = list(targets)
                    for h, y in zip(loss_heads, out[:k]):
                        student[h.index] = y
                    losses.append(_loss(student, targets, loss_heads))
                    if grads:
                        for acc, g in zip(grads, out[k:]):
                            acc += g
                    else:
                        grads = list(out[k:])
                step += 1
                lr = learning_rate(config, step, total)
                c1, c2 = 1 - beta1 ** step, 1 - beta2 ** step
                for p, g in zip(trainer.params, grads):
                    if accumulate > 1:
                        g /= accumulate
                    m1[p] *= beta1
                    m1[p] += (1 - beta1) * g
                    m2[p] *= beta2
                    m2[p] += (1 - beta2) * g * g
                    values[p] -= lr * (m1[p] / c1) / (np.sqrt(m2[p] / c2) + eps)
                progress.advance()
            history.append(float(np.mean(losses)) if losses else float("nan"))
    refined = _with_values(pruned, values)
    loss_after = _loss(_outputs(refined, x, config), reference, loss_heads)
    kept = loss_after < loss_before  # never hand back a model further from the teacher than it came
    report = RefineReport(config.epochs, step, config.loss, config.lr, per_step, n, len(trainer.params), loss_before,
                          loss_after, time.perf_counter() - t0, history, kept, [h.kind for h in loss_heads],
                          accumulate)
    return (refined if kept else pruned), report
