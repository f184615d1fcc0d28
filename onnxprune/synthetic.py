"""Synthetic calibration inputs distilled from the model itself (``--calib synthetic[:N]``).

Start reading at `synthesize`. Data-free pruning needs data for the calibrated machinery (OBS Hessians,
sequential least-squares repair); ZeroQ / DeepInversion show that a BatchNorm network stores enough about its
training data to recreate inputs that look like it *to the network*: random inputs are optimised so that the
batch statistics at every BatchNormalization input match the stored running mean and variance::

    loss = sum over BN layers of ||mean_batch(x_l) - running_mean||_2 + ||var_batch(x_l) - running_var||_2
           + prior(x)          (images: total variation + a small l2; other inputs: l2)

Gradients without torch: `_build_objective` writes one ONNX model holding the forward graph, the statistics
loss with its analytic gradient at every BN input, and the backward pass (`autodiff.append_backward`:
Conv -> ConvTranspose, BN -> per-channel scale, Relu/Clip masks, ...), so onnxruntime returns the loss and
d loss / d input in one run. Adam (numpy) updates the inputs; the prior's gradient is added in numpy.
Only BN layers whose input depends on the model input count, and only the ops between the input and the
last of them need a gradient rule. A model with no BN statistics on its input's path (BN folded into the
convolutions, LayerNorm transformers) has nothing to match: synthesis falls back to smoothed noise and says
so in one line. An op without a gradient rule on the path stops synthesis (`UnsupportedModelError`, exit 1).

The input layout comes from the model input's shape: rank 4 with 1/3/4 channels first (NCHW) or last (NHWC)
is an image, which gets the total-variation prior; the samples start as N(0, 1), i.e. normalised pixels.
Every size but the batch must be static (fix dynamic sizes with ``--shape``). Deterministic for a seed.

Gradient ops (34, `gradients.supported_ops()`): Add, AveragePool, BatchNormalization, Cast, Clip, Concat, Conv,
Div, Dropout, Flatten, Gemm, GlobalAveragePool, HardSigmoid, HardSwish, Identity, LeakyRelu, MatMul, MaxPool,
Mul, Pad, Pow, ReduceMean, ReduceSum, Relu, Reshape, Sigmoid, Slice, Softmax, Sqrt, Squeeze, Sub, Tanh,
Transpose, Unsqueeze. Zoo models whose objective builds: CIFAR ResNet20/44, DenseNet-121, EfficientNet-B0 and
-Lite0, GoogLeNet, MobileNetV2, MobileNetV3-small, RegNetY-400MF, PP-OCR mobile cls, PP-OCRv4 rec (``--shape
x=1,3,48,320``: 6 BN layers on the path), the Fashion-MNIST models. Stopped (one line, exit 1): PP-OCRv4 det
(``no gradient for Resize``); token-id and multi-input models. MobileNetV2 exported by dynamo has its BN folded:
smoothed-noise fallback with a note. Dynamic spatial sizes ask for ``--shape``.

Budget: steps are planned from MACs (`MACS_PER_SECOND`, `SynthesisConfig.budget` = 90 s, at least 20 steps),
so the run is deterministic. CIFAR ResNet20, 64 samples at batch 64: 0.22 s per step on the quiet 2-core machine
(100 steps ~25 s); ResNet44 ~2.4x that; ResNet-50 at 224 (16 samples, 20 steps) is estimated at ~110 s, the
default 64 samples ~4x more: use ``synthetic:16`` there. Under the load of this session (load average 20-24)
every number is 5-8x slower (ResNet20 prune with synthesis: 468 s).

Measured (CIFAR-10, stratified 2,000 test images, ``--round-to 1`` so the channel counts do not depend on
measured latency; ``bench/synthetic_accuracy.py``; 100 Adam steps at lr 0.25, 64 samples, no class term)::

    ResNet20 (92.05)        20% removed   40% removed
    l2 + bias (data-free)      73.35         29.10
    obs + seq, synthetic       88.00         80.65
    obs + seq, real 256        89.90         85.20

    ResNet44 (93.10)        20% removed   40% removed
    l2 + bias (data-free)      71.55         36.70
    obs + seq, synthetic       90.35         84.65

128 samples instead of 64 (``synthetic:128``, twice the time): 88.75 at 20% on ResNet20. Synthetic data
recovers 88% (20%) and 92% (40%) of what real calibration gains over l2 + bias on ResNet20; the gap to the
acceptance bars (drop <= 2 / 6 pt) is shared with the calibrated rows (real calibration itself drops 2.15 /
6.85 pt on ResNet20 here).
An optional cross-entropy pull toward balanced random labels (``SynthesisConfig.classes``, DeepInversion) was
neutral (88.45 vs 88.00 at 20%, 78.90 vs 80.65 at 40%) and stays off.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxprune.autodiff import append_backward, differentiated_nodes, float_tensor_names, static_shapes
from onnxprune.canonical import normalize, remove_dead_code
from onnxprune.errors import DataError, UnsupportedModelError
from onnxprune.external import tensor_array
from onnxprune.gradients import Emitter
from onnxprune.graph import ModelGraph
from onnxprune.importer import fix_input_shapes
from onnxprune.metrics import count_macs
from onnxprune.onnx_utils import opset_of
from onnxprune.progress import task
from onnxprune.shape_inference import infer_shapes
from onnxprune.verify import session

__all__ = ["DEFAULT_SAMPLES", "SynthesisConfig", "bn_loss", "parse_spec", "synthesize"]

DEFAULT_SAMPLES = 64
SPEC = "synthetic"


@dataclass(frozen=True)
class SynthesisConfig:
    """How to distil inputs: Adam `steps` per batch of `batch` samples, learning rate, prior weights."""

    steps: int = 100
    batch: int = 64
    lr: float = 0.25
    tv: float = 1e-4
    l2: float = 1e-5
    classes: float = 0.0  # weight of a cross-entropy pull toward balanced random labels (classifier outputs)
    budget: float = 90.0  # seconds on the reference 2-core machine: fewer steps for large models (`_steps`)
    min_steps: int = 20


#: Multiply-accumulates per second of a forward + backward step on the reference 2-core machine (CIFAR
#: ResNet20 at batch 64: 3 x 41 MMAC x 64 = 7.9 GMAC per step in 0.22 s, quiet machine). Steps are planned
#: from MACs, not timed, so the result does not depend on the machine's load.
MACS_PER_SECOND = 3.5e10


def parse_spec(spec: str) -> int | None:
    """``synthetic`` -> DEFAULT_SAMPLES, ``synthetic:N`` -> N; None when `spec` is not a synthetic spec.

    Raises:
        DataError: ``synthetic:`` followed by something that is not a positive integer.
    """
    head, _, tail = spec.partition(":")
    if head != SPEC:
        return None
    if not tail:
        return DEFAULT_SAMPLES
    if not tail.isdigit() or int(tail) < 1:
        raise DataError(f"--calib {spec}: expected synthetic or synthetic:N with N >= 1 samples")
    return int(tail)


@dataclass
class _Objective:
    session: object
    input_name: str
    shape: tuple[int, ...]  # with the batch
    taps: int
    macs: int  # one forward pass of the batch
    classes: int = 0  # > 0: the objective takes one-hot targets of this many classes as TARGETS


TARGETS = "synthetic/targets"


def _input_of(model: onnx.ModelProto) -> tuple[onnx.ValueInfoProto, tuple[int, ...]]:
    inits = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    if len(inputs) != 1:
        raise UnsupportedModelError(f"synthetic calibration supports models with one input (this one has {len(inputs)}: "
                                    f"{', '.join(vi.name for vi in inputs)})")
    vi = inputs[0]
    if vi.type.tensor_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        raise UnsupportedModelError(f"synthetic calibration: input {vi.name!r} is not floating point "
                                    "(token ids cannot be optimised by gradient)")
    dims = []
    for i, d in enumerate(vi.type.tensor_type.shape.dim):
        if i and not (d.HasField("dim_value") and d.dim_value > 0):
            raise DataError(f"synthetic calibration: input {vi.name!r} has a dynamic size on axis {i}; "
                            f"fix it with --shape {vi.name}=...")
        dims.append(d.dim_value if d.HasField("dim_value") else 0)
    return vi, tuple(dims[1:])


def _bn_taps(model: onnx.ModelProto, name: str, floats: set[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(BN input, running mean, running var) of every inference BN whose input depends on the model input."""
    inits = {t.name: t for t in model.graph.initializer}
    _, active = differentiated_nodes(model.graph, name, set(), floats)
    taps = []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or node.input[0] not in active:
            continue
        if node.input[3] in inits and node.input[4] in inits:
            taps.append((node.input[0], tensor_array(inits[node.input[3]]), tensor_array(inits[node.input[4]])))
    return taps


def _emit_bn_loss(em: Emitter, x: str, shape: tuple[int, ...], mean: np.ndarray, var: np.ndarray) -> tuple[str, str]:
    """Nodes computing ``||mean_b - mean|| + ||var_b - var||`` at `x` and its gradient (analytic)."""
    rank = len(shape)
    axes = [0, *range(2, rank)]
    count = float(np.prod([shape[i] for i in axes]))
    stat_shape = (1, -1) + (1,) * (rank - 2)
    mu = em.reduce("ReduceMean", x, axes)
    d = em.op("Sub", [x, mu])
    var_b = em.reduce("ReduceMean", em.mul(d, d), axes)
    parts, grads = [], []
    for stat, target in ((mu, mean), (var_b, var)):
        err = em.op("Sub", [stat, em.const(target.astype(np.float32).reshape(stat_shape), "target")])
        norm = em.op("Sqrt", [em.op("Add", [em.reduce("ReduceSum", em.mul(err, err), list(range(rank)), False),
                                            em.const(1e-12)])])
        parts.append(norm)
        grads.append(em.op("Div", [err, norm]))
    # d||mu - m||/dx = g_mu / count (every element moves the mean); d var_b/dx = 2 (x - mu) / count
    gx = em.op("Add", [em.scale(grads[0], 1.0 / count), em.mul(em.scale(grads[1], 2.0 / count), d)])
    return em.op("Add", parts), gx


def _classifier_output(m: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], batch: int) -> tuple[str, int] | None:
    """The model's logits (its first output when shaped [batch, classes]), else None."""
    out = m.graph.output[0].name
    shape = shapes.get(out)
    if shape is not None and len(shape) == 2 and shape[0] == batch and shape[1] >= 2:
        return out, shape[1]
    return None


def _emit_class_loss(em: Emitter, logits: str, classes: int, batch: int, weight: float) -> tuple[str, str]:
    """Cross-entropy toward the one-hot TARGETS input, and its gradient ``(softmax - targets) / batch``."""
    p = em.op("Softmax", [logits], axis=1)
    loss = em.scale(em.op("ReduceSum", [em.mul(em.op("Log", [em.op("Add", [p, em.const(1e-12)])]), TARGETS)],
                          keepdims=0), -weight / batch)
    return loss, em.scale(em.op("Sub", [p, TARGETS]), weight / batch)


def _build_objective(model: onnx.ModelProto, batch: int, class_weight: float = 0.0) -> _Objective | None:
    """The ONNX model returning (BN statistics loss, d loss / d input) for a batch; None without BN taps."""
    vi, dims = _input_of(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for graph_input in m.graph.input:  # the batch axis is ours, even when --shape fixed it (to 1, usually)
        if graph_input.name == vi.name:
            graph_input.type.tensor_type.shape.dim[0].Clear()
    fix_input_shapes(m, {vi.name: [batch, *dims]})
    for graph_output in m.graph.output:  # declared outputs keep a symbolic batch: let inference fill them
        graph_output.type.tensor_type.ClearField("shape")
    m, _ = normalize(m, inplace=True)
    m = infer_shapes(m, symbolic=False)
    macs = count_macs(ModelGraph(m))  # the forward pass at this batch, before the backward nodes join
    floats = float_tensor_names(m)
    shapes = static_shapes(m)
    taps = _bn_taps(m, vi.name, floats)
    if not taps:
        return None
    em = Emitter(m.graph, opset_of(m), prefix="synthetic")
    losses: list[str] = []
    seeds: dict[str, str] = {}
    for x, mean, var in taps:
        if x not in shapes:
            raise UnsupportedModelError(f"synthetic calibration: BatchNormalization input {x!r} has no static shape")
        loss, gx = _emit_bn_loss(em, x, shapes[x], mean, var)
        losses.append(loss)
        seeds[x] = gx if x not in seeds else em.op("Add", [seeds[x], gx])
    classes = 0
    head = _classifier_output(m, shapes, batch) if class_weight else None
    if head is not None:
        logits, classes = head
        m.graph.input.append(helper.make_tensor_value_info(TARGETS, onnx.TensorProto.FLOAT, [batch, classes]))
        loss, gl = _emit_class_loss(em, logits, classes, batch, class_weight)
        losses.append(loss)
        seeds[logits] = gl if logits not in seeds else em.op("Add", [seeds[logits], gl])
    grad = append_backward(m, vi.name, seeds, em, shapes, floats)
    total = losses[0] if len(losses) == 1 else em.op("Sum", losses)
    del m.graph.output[:]
    m.graph.output.extend([helper.make_tensor_value_info(total, onnx.TensorProto.FLOAT, []),
                           helper.make_tensor_value_info(grad, onnx.TensorProto.FLOAT, [batch, *dims])])
    del m.graph.value_info[:]
    remove_dead_code(m.graph)
    return _Objective(session(m, optimize=True), vi.name, (batch, *dims), len(taps), macs, classes)


def _image_axes(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The (H, W) axes of an image input (NCHW or NHWC with 1, 3 or 4 channels), else None."""
    if len(shape) != 4:
        return None
    if shape[1] in (1, 3, 4):
        return (2, 3)
    if shape[3] in (1, 3, 4):
        return (1, 2)
    return None


def _prior(x: np.ndarray, cfg: SynthesisConfig, image: tuple[int, int] | None) -> np.ndarray:
    """Gradient of ``l2 * sum(x^2) / 2 + tv * sum of squared neighbour differences / 2`` (per sample)."""
    g = cfg.l2 * x
    if image is not None and cfg.tv:
        for ax in image:
            diff = np.diff(x, axis=ax)
            pad_lo = [(0, 0)] * x.ndim
            pad_hi = [(0, 0)] * x.ndim
            pad_lo[ax], pad_hi[ax] = (1, 0), (0, 1)
            g += cfg.tv * (np.pad(diff, pad_lo) - np.pad(diff, pad_hi))
    return g


def _smoothed_noise(rng: np.random.Generator, shape: tuple[int, ...], image: tuple[int, int] | None) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    if image is not None:  # a 3x3 box blur twice: image-like spatial correlation
        for _ in range(2):
            for ax in image:
                x = (np.roll(x, 1, ax) + x + np.roll(x, -1, ax)) / 3.0
        x /= x.std() + 1e-8
    return x


def _steps(cfg: SynthesisConfig, macs: int, batches: int) -> int:
    """Adam steps per batch: `cfg.steps`, fewer when the estimated time (forward + backward ~ 3x the forward
    MACs) would exceed `cfg.budget`, never fewer than `cfg.min_steps`."""
    affordable = int(cfg.budget * MACS_PER_SECOND / (3.0 * max(macs, 1) * batches))
    return max(cfg.min_steps, min(cfg.steps, affordable))


def bn_loss(model: onnx.ModelProto, x: np.ndarray) -> float:
    """The BatchNorm-statistics loss of the batch `x` (for tests and diagnostics)."""
    objective = _build_objective(model, len(x))
    if objective is None:
        raise UnsupportedModelError("the model has no BatchNormalization statistics on its input's path")
    loss, _ = objective.session.run(None, {objective.input_name: x.astype(np.float32)})  # type: ignore[attr-defined]
    return float(loss)


def synthesize(model: onnx.ModelProto, n: int = DEFAULT_SAMPLES, seed: int = 0,
               config: SynthesisConfig | None = None) -> dict[str, np.ndarray]:
    """`n` calibration inputs distilled from `model`'s BatchNorm statistics: {input name: array [n, ...]}.

    Args:
        model: the model as loaded (dynamic sizes other than the batch fixed with ``--shape``).
        n: number of samples; they are optimised in batches of ``config.batch``.
        seed: the random start (the result is deterministic for a seed).
        config: steps, learning rate and prior weights (defaults: `SynthesisConfig`).

    Raises:
        UnsupportedModelError: more than one input, a non-float input, or an op without a gradient rule.
        DataError: a dynamic input size other than the batch.
    """
    cfg = config or SynthesisConfig()
    vi, dims = _input_of(model)
    batch = max(1, min(n, cfg.batch))
    image = _image_axes((batch, *dims))
    rng = np.random.default_rng(seed)
    objective = _build_objective(model, batch, cfg.classes)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    if objective is None:
        print("onnxprune: note: synthetic calibration: the model has no BatchNormalization statistics on its input's "
              "path (folded or LayerNorm): using smoothed noise, a weak substitute for data", file=sys.stderr)
        return {vi.name: _smoothed_noise(rng, (n, *dims), image).astype(dtype)}
    batches = -(-n // batch)
    steps = _steps(cfg, objective.macs, batches)
    out = []
    sess, name = objective.session, objective.input_name
    with task(f"synthetic calibration data ({n} samples, {objective.taps} BatchNorm layers)",
              total=batches * steps) as t:
        for _ in range(batches):
            x = rng.standard_normal(objective.shape).astype(np.float32)
            feed = {name: x}
            if objective.classes:  # balanced random labels, one per sample
                labels = rng.permutation(np.arange(batch) % objective.classes)
                feed[TARGETS] = np.eye(objective.classes, dtype=np.float32)[labels]
            m1, m2 = np.zeros_like(x), np.zeros_like(x)
            for step in range(1, steps + 1):
                feed[name] = x
                _, g = sess.run(None, feed)  # type: ignore[attr-defined]
                g = g + _prior(x, cfg, image)
                m1 = 0.9 * m1 + 0.1 * g
                m2 = 0.999 * m2 + 0.001 * g * g
                lr = cfg.lr * 0.5 * (1 + np.cos(np.pi * (step - 1) / steps))  # cosine decay
                x = x - (lr * (m1 / (1 - 0.9**step)) / (np.sqrt(m2 / (1 - 0.999**step)) + 1e-8)).astype(np.float32)
                t.advance()
            out.append(x)
    return {vi.name: np.concatenate(out)[:n].astype(dtype)}
