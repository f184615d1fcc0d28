"""How much synthetic calibration work fits the time budget: the cost model of one step, and the plan.

Start reading at `plan`. ``--calib synthetic`` without N gets as many optimised samples and Adam steps as fit
`SynthesisConfig.budget` (90 s). The cost of one step of one sample (forward, BN-statistics loss, backward;
`onnxprune.synthetic_objective`) is *modelled*, not timed, so the plan does not depend on the machine's load::

    seconds per sample-step = SECONDS_PER_MAC * dense MACs + SECONDS_PER_ACTIVATION * activation elements

Dense MACs are those of Conv (group 1 or grouped with more than one input channel per group), Gemm and MatMul;
activation elements are the output sizes of every forward node the objective runs. The second term prices what
the MAC count misses: elementwise work (BN, activations, their masks, the statistics loss at every tap, the
gradient sums), layout reorders, and depthwise convolutions, which move as many bytes as an elementwise op and
do few MACs. The old model (MACs only, 3.5e10 MAC/s) was 2x pessimistic on ResNet-50 and 3x optimistic on
EfficientNet-Lite0 / MobileNetV2 (Lite0's plan "90 s" ran > 8.5 min under load).

Calibration (`fit` below; measured CPU time of one onnxruntime thread per sample-step, batch 4-64, load ~11 on
the 2 cores, after the backward-graph speedups of this session)::

    model                 dense MMAC   activations   measured ms   model ms
    CIFAR ResNet20              41        0.68 M          2.05        2.3
    CIFAR ResNet44              97        1.48 M          4.84        5.2
    ResNet-50 (224)           4089       37.6 M          174         160
    EfficientNet-Lite0         351       24.6 M           58.4        63
    MobileNetV2                280       19.7 M           56.2        50
    EfficientNet-B0            351       28.3 M           68.0        71
    DenseNet-121              2834       49.2 M          168         164
    RegNetY-400MF              402       12.9 M           46.2        37

(within 20% for all; MACs alone: off by up to 3.5x). The plan treats one thread's CPU seconds as wall seconds
on the reference 2-core machine: onnxruntime's second thread then is margin (the bar is 120 s for a 90 s
budget), and a loaded machine is slower by its load, which no plan can know.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.graph import attrs

__all__ = ["AUTO_SAMPLES", "BATCH_BYTES", "DEFAULT_SAMPLES", "MIN_OPTIMISED", "SECONDS_PER_ACTIVATION", "SECONDS_PER_MAC",
           "Plan", "forward_cost", "plan", "step_seconds"]

#: ``synthetic`` without N: the number of samples is planned from the time budget (`plan`), at most this many.
DEFAULT_SAMPLES = 256
#: Fewest samples optimised when the budget is tight (a huge model: 4 x min_steps, over the budget).
MIN_OPTIMISED = 4
#: The sample count `onnxprune.synthetic.parse_spec` returns for plain ``synthetic`` (= let `plan` choose).
AUTO_SAMPLES = 0
#: Seconds per dense multiply-accumulate of a forward pass, for the whole step (forward + backward ~ 3x).
SECONDS_PER_MAC = 1.8e-11
#: Seconds per forward activation element, for the whole step (elementwise, loss, depthwise, reorders).
SECONDS_PER_ACTIVATION = 2.3e-9
#: Bytes of forward activations one batch may hold: the batch shrinks to fit (onnxruntime's peak for the whole
#: step is ~3.5x the forward activations: EfficientNet-Lite0 at 224, batch 8: 0.97 GB RSS). The old plan ran
#: Lite0 at batch 26, ~8 GB, which is likely why it ran for minutes.
BATCH_BYTES = 1 << 30


def step_seconds(dense_macs: float, activations: float) -> float:
    """Modelled seconds of one optimisation step for one sample (see the module docstring)."""
    return SECONDS_PER_MAC * dense_macs + SECONDS_PER_ACTIVATION * activations


def forward_cost(nodes: list[onnx.NodeProto], shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """(dense MACs, activation elements) of `nodes` at the batch their static `shapes` were inferred for.

    A Conv whose weight has one input channel per group and more than one group is depthwise: its MACs are
    not dense (it is priced by its activations)."""
    dense = activations = 0
    for node in nodes:
        out = shapes.get(node.output[0]) if node.output else None
        if out is None:
            continue
        numel = int(np.prod(out))
        activations += numel
        if node.op_type in ("Conv", "ConvTranspose") and node.input[1] in shapes:
            w = shapes[node.input[1]]
            if not (w[1] == 1 and int(attrs(node).get("group", 1)) > 1):
                dense += numel * int(np.prod(w[1:])) if node.op_type == "Conv" else int(np.prod(shapes.get(
                    node.input[0], (0,)))) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul") and node.input[0] in shapes:
            a = shapes[node.input[0]]
            transposed = node.op_type == "Gemm" and int(attrs(node).get("transA", 0))
            dense += numel * int(a[0] if transposed else a[-1])
    return dense, activations


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
    if n == AUTO_SAMPLES:
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
    return Plan(n, optimised, batch, steps, steps * batches * batch * step_cost)
