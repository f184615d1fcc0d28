"""How much synthetic calibration work fits the time budget: the cost model of one step, and the plan.

Start reading at `plan`. ``--calib synthetic`` without N gets as many optimised samples and Adam steps as fit
`SynthesisConfig.budget` (90 s). The cost of one step of one sample (forward, BN-statistics loss, backward;
`onnxprune.synthetic_objective`) is *modelled*, not timed, so the plan does not depend on the machine's load::

    seconds per sample-step = SECONDS_PER_MAC * dense MACs
                              + SECONDS_PER_ACTIVATION * layer activation elements
                              + SECONDS_PER_ELEMENTWISE * other activation elements

over the forward nodes the objective runs (input to the last BN tap). Dense MACs are those of Conv (except
depthwise: one input channel per group), Gemm and MatMul; *layer* activations are the outputs of Conv, BN,
MatMul/Gemm, pooling and Concat: each carries a backward convolution or a statistics loss, layout reorders,
gradient sums; depthwise convolutions are priced here, by the bytes they move, not by their few MACs. Other
activations (Relu, Clip, Add, Mul, ...) cost a mask or a pass in the backward. The old model (MACs only,
3.5e10 MAC/s) was 2x pessimistic on ResNet-50 and 3x optimistic on EfficientNet-Lite0 / MobileNetV2 (Lite0's
plan "90 s" ran > 8.5 min under load, at a batch that needed ~8 GB).

Calibration (least squares on relative error; measured CPU seconds of one onnxruntime thread per sample-step,
batch 1-64, load ~11 on the 2 cores, with the backward graph of this session)::

    model                 dense MMAC   layer act   other act   measured ms   model / measured
    CIFAR ResNet20              41       0.37 M      0.30 M          2.05         1.08
    CIFAR ResNet44              97       0.83 M      0.64 M          4.84         1.04
    ResNet-50 (224)           4087      22.3 M      14.9 M         174           0.91
    EfficientNet-Lite0         349      13.4 M      11.1 M          58.4         1.05
    MobileNetV2                279      13.3 M       6.3 M          56.2         1.04
    EfficientNet-B0            350      13.4 M      14.7 M          68.0         0.92
    DenseNet-121              2833      33.4 M      15.6 M         168           1.08
    RegNetY-400MF              401       7.8 M       5.1 M          46.2         0.83
    PP-OCRv4 rec (48x320)      625       5.7 M      43.8 M          45.9         1.01
    Fashion-MNIST ResNet        22       0.16 M      0.09 M           1.01        0.99

(within 17%; MACs alone: off by up to 3.5x; MACs + all activations alike: 2.7x on PP-OCRv4 rec, whose
hard-swish is written as Add/Clip/Mul/Div). The budget and `Plan.seconds` are one onnxruntime thread's CPU
seconds (`SynthesisConfig.threads` = 1); `onnxprune.synthetic` runs two batches at once, so on 2 quiet cores the
wall time is about half (EfficientNet-Lite0: plan ~88 s, 75 s wall, session 46's host, whose steps run 1.4x
slower than this table's); a loaded machine is slower by its load, which no plan can know.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.graph import attrs

__all__ = ["AUTO_SAMPLES", "BATCH_BYTES", "DEFAULT_SAMPLES", "MIN_OPTIMISED", "SECONDS_PER_ACTIVATION",
           "SECONDS_PER_ELEMENTWISE", "SECONDS_PER_MAC", "Plan", "forward_cost", "plan", "step_seconds"]

#: ``synthetic`` without N: the number of samples is planned from the time budget (`plan`), at most this many.
DEFAULT_SAMPLES = 256
#: Fewest samples optimised when the budget is tight (a huge model: 4 x min_steps, over the budget).
MIN_OPTIMISED = 4
#: The sample count `onnxprune.synthetic.parse_spec` returns for plain ``synthetic`` (= let `plan` choose).
AUTO_SAMPLES = 0
#: Seconds per dense multiply-accumulate of a forward pass, for the whole step (forward + backward ~ 3x).
SECONDS_PER_MAC = 1.64e-11
#: Seconds per layer activation element (Conv, BN, MatMul, pooling, Concat outputs), for the whole step.
SECONDS_PER_ACTIVATION = 3.88e-9
#: Seconds per other activation element (elementwise ops), for the whole step.
SECONDS_PER_ELEMENTWISE = 3.15e-10
#: Outputs priced at SECONDS_PER_ACTIVATION.
LAYER_OPS = frozenset({"Conv", "ConvTranspose", "BatchNormalization", "MatMul", "Gemm", "MaxPool", "AveragePool",
                       "GlobalAveragePool", "Concat"})
#: Bytes of forward activations one batch may hold: the batch shrinks to fit (the process peaks at ~2.4x the
#: forward activations of a batch: ResNet-50 at 224, batch 7 = 1.05 GB of activations: 2.5 GB RSS). The old
#: plan ran EfficientNet-Lite0 at batch 26, ~6 GB.
BATCH_BYTES = 1 << 29


def step_seconds(dense_macs: float, layer_activations: float, other_activations: float = 0.0) -> float:
    """Modelled seconds of one optimisation step for one sample (see the module docstring)."""
    return (SECONDS_PER_MAC * dense_macs + SECONDS_PER_ACTIVATION * layer_activations
            + SECONDS_PER_ELEMENTWISE * other_activations)


def forward_cost(nodes: list[onnx.NodeProto], shapes: dict[str, tuple[int, ...]]) -> tuple[int, int, int]:
    """(dense MACs, layer activation elements, other activation elements) of `nodes` at the batch their static
    `shapes` were inferred for (`LAYER_OPS`).

    A Conv whose weight has one input channel per group and more than one group is depthwise: its MACs are
    not dense (it is priced by its activations)."""
    dense = layer = other = 0
    for node in nodes:
        out = shapes.get(node.output[0]) if node.output else None
        if out is None:
            continue
        numel = int(np.prod(out))
        if node.op_type in LAYER_OPS:
            layer += numel
        else:
            other += numel
        if node.op_type in ("Conv", "ConvTranspose") and node.input[1] in shapes:
            w = shapes[node.input[1]]
            if not (w[1] == 1 and int(attrs(node).get("group", 1)) > 1):
                dense += numel * int(np.prod(w[1:])) if node.op_type == "Conv" else int(np.prod(shapes.get(
                    node.input[0], (0,)))) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul") and node.input[0] in shapes:
            a = shapes[node.input[0]]
            transposed = node.op_type == "Gemm" and int(attrs(node).get("transA", 0))
            dense += numel * int(a[0] if transposed else a[-1])
    return dense, layer, other


@dataclass(frozen=True)
class Plan:
    """What `synthesize` will do: `optimised` samples by Adam (`steps` per batch of `batch`), grown to `samples`
    calibration inputs by augmented views; `seconds` is the estimate on the reference machine."""

    samples: int
    optimised: int
    batch: int
    steps: int
    seconds: float


def plan(cfg, n: int, seconds_per_sample_step: float, views: int, activations: int = 0) -> Plan:
    """How many samples to optimise, and for how many steps, to fit `cfg.budget`. Deterministic: planned
    from the cost model (`step_seconds`), not clocks.

    `n` = AUTO_SAMPLES: optimise as many samples as the budget affords at `cfg.steps` steps; when that is
    under `cfg.min_samples` the steps shrink (never under `cfg.min_steps`), then the samples (never under
    MIN_OPTIMISED, the one case that may exceed the budget); return up to `views` times as many samples, at
    most DEFAULT_SAMPLES. `n` >= 1 forces the number returned; at least n / `views` are optimised.

    Args:
        cfg: a `onnxprune.synthetic.SynthesisConfig` (steps, batch, budget, floors).
        n: calibration samples wanted (AUTO_SAMPLES: planned).
        seconds_per_sample_step: `step_seconds` of the objective for one sample.
        views: calibration samples per optimised sample at most (1 when the input is not an image).
        activations: forward activation elements per sample (float32): caps the batch at BATCH_BYTES.
    """
    step_cost = max(seconds_per_sample_step, 1e-9)
    affordable = cfg.budget / step_cost  # sample-steps
    auto = n == AUTO_SAMPLES
    if auto:
        optimised = int(min(DEFAULT_SAMPLES, affordable // cfg.steps))
        if optimised < cfg.min_samples:  # a large model: fewer steps first, then fewer samples (>= MIN_OPTIMISED)
            optimised = int(max(MIN_OPTIMISED, min(cfg.min_samples, affordable // cfg.min_steps)))
        n = min(DEFAULT_SAMPLES, optimised * views)
    else:
        optimised = int(min(n, max(-(-n // views), min(cfg.min_samples, affordable // cfg.min_steps),
                                   affordable // cfg.steps)))
    batch = max(1, min(optimised, cfg.batch, BATCH_BYTES // max(4 * activations, 1)))
    batches = -(-optimised // batch)
    batch = -(-optimised // batches)  # as even as the batch count allows
    steps = max(cfg.min_steps, min(cfg.steps, int(affordable // (batches * batch))))
    if auto and batches > 1 and steps * batches * batch * step_cost > cfg.budget:
        batches -= 1  # whole batches only: a partial one costs as much as a full one
    if auto:
        optimised = batches * batch
        n = min(DEFAULT_SAMPLES, optimised * views)
    return Plan(n, optimised, batch, steps, steps * batches * batch * step_cost)
