"""Gradual unconstrained pruning: the unconstrained plan's final counts reached in N steps, re-chosen after each repair.

Start reading at `IterativeUnconstrainedPass.call`; `passes.iterative` does the same for constrained pruning.
One-shot unconstrained pruning (`passes.unconstrained.UnconstrainedPass`) scores every unit's channels once on
the dense model, allocates once and repairs once. The gradual version:

1. the one-shot allocation (`upscale.allocate.allocate`, e.g. the knapsack, for the ratio or the parameter
   target) on the dense model fixes each group's FINAL kept count n_g (what every unit of the group keeps);
2. step k = 1..N: every unit keeps ``size - round((size - n_g) * k / N)`` channels, chosen by the configured
   criterion, drive and reader choice (`upscale.plan.choose`) on the model of step k-1: the dense model
   repaired for step k-1's plan and masked with it (`upscale.oracle.mask_model`; the dense model itself for
   k = 1), so the scores, the writers' measured energies and the readers' least-squares (OBS) choices see the
   earlier removals and the repair's update; channels silenced earlier score zero there and stay out;
3. the model of step k is the DENSE model repaired for step k's plan (the units' kept sets carried by
   `upscale.plan.unit_key`): every repair fits towards the dense model's activations, never the previous
   step's pruned model, so errors do not compound. The last step's kept sets go to `UnconstrainedPass` as
   fixed ``keeps``: it repairs from the dense model and exports exactly as one-shot does.

Parameters depend on the kept counts (and the streams' widths), so the result lands on the one-shot plan's
parameter count up to the streams the re-chosen units widen. ``steps=1`` is `UnconstrainedPass` exactly.

Measured (`bench/accuracy_real.py` rows ``unconstrained-steps``, `UNCONSTRAINED_BEST`: l2 + seq, coupled drive, reader
ls, stream repair, knapsack; 2,000 CIFAR-10 training images, all 10,000 test images): ResNet20 20% removed 90.57
(one-shot 90.83), 40% 87.28 (one-shot 87.48, re-measured the same day): re-choosing after each repair LOSES 0.2-0.3
here, while it gains +0.15 / +0.63 for constrained obs + seq (`passes.iterative`): the coupled drive and the readers'
least-squares choice already see the stream, and a re-choice on a repaired model is fitted to that repair. Opt-in
only (no CLI flag); kept for measurements, with its tests.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx

from onnxprune.calibration_data import CalibLike
from onnxprune.channels import DimRef
from onnxprune.errors import PreconditionError, UsageError
from onnxprune.passes.iterative import step_counts
from onnxprune.passes.unconstrained import UnconstrainedPass
from onnxprune.passmanager import Pass, PassResult
from onnxprune.progress import task
from onnxprune.upscale.allocate import allocate
from onnxprune.upscale.config import UnconstrainedConfig
from onnxprune.upscale.oracle import mask_model
from onnxprune.upscale.plan import Prepared, build_plan, choose, prepare, unit_key
from onnxprune.upscale.records import UnconstrainedPlan
from onnxprune.upscale.repair import repair_plan

__all__ = ["IterativeUnconstrainedPass", "step_keep_counts"]

Keeps = dict[tuple[tuple[str, int, int], ...], np.ndarray]  # `unit_key` -> kept mask


def step_keep_counts(sizes: dict[int, int], final: dict[int, int], steps: int) -> list[dict[int, int]]:
    """Kept count per group after each of `steps` steps: ``size - round((size - final) * k / steps)``; the
    last is `final`."""
    removed = step_counts({gid: sizes[gid] - final[gid] for gid in final}, steps)  # the constrained schedule
    return [{gid: sizes[gid] - r for gid, r in step.items()} for step in removed]


def group_ids_between(source: Prepared, dest: Prepared) -> dict[int, int]:
    """Group id in `source` -> the id of `dest`'s group holding the same parameter axes (a repair keeps every
    parameter's name; it may add a bias input, which only joins a group)."""
    where = {DimRef(m.tensor, m.axis): pg.group.id for pg in dest.groups for m in pg.group.param_members}
    out: dict[int, int] = {}
    for pg in source.groups:
        found = [where[DimRef(m.tensor, m.axis)] for m in pg.group.param_members if DimRef(m.tensor, m.axis) in where]
        if not found:
            raise PreconditionError(f"unconstrained group {pg.group.id} has no counterpart after the repair")
        out[pg.group.id] = found[0]
    return out


def unit_keeps(plan: UnconstrainedPlan) -> Keeps:
    """Every unit's kept mask, keyed so it survives re-analysis (`unit_key`)."""
    return {unit_key(pc): pc.kept.copy() for gp in plan.groups for pc in gp.pieces if pc.is_unit}


class IterativeUnconstrainedPass(Pass):
    """`UnconstrainedPass` reaching its counts in `steps` steps, re-choosing after each repair (module docstring).

    Args:
        config: the unconstrained options (the final ratio or target; the repair of every step).
        steps: number of steps (1: exactly `UnconstrainedPass`).
        calib: calibration inputs ``{input name: array}`` (measured scores, the knapsack, every repair).
    """

    def __init__(self, config: UnconstrainedConfig | None = None, steps: int = 1,
                 calib: CalibLike | None = None) -> None:  # fmt: skip
        if steps < 1:
            raise UsageError(f"steps must be >= 1, got {steps}")
        self.one_shot = UnconstrainedPass(config, calib=calib)  # validates config and calib
        self.config = self.one_shot.config
        self.steps = steps
        self.calib = self.one_shot.calib  # the arrays

    @property
    def name(self) -> str:
        return "IterativeUnconstrainedPass" if self.steps > 1 else self.one_shot.name

    def call(self, model: onnx.ModelProto) -> PassResult:
        c = self.config
        if self.steps == 1 or (c.ratio == 0 and c.target_params is None):
            return self.one_shot.call(model)
        keeps = self.gradual_keeps(model)
        result = UnconstrainedPass(c, keeps=keeps, calib=self.calib).call(model)
        result.info["steps"] = self.steps
        return result

    def gradual_keeps(self, model: onnx.ModelProto) -> Keeps:
        """The units' kept masks after the last step (steps 1..N-1 repaired from `model`, the dense one)."""
        c = self.config
        measured = self.calib if c.measure else None
        dense = prepare(model, c, measured)
        target, allowed, curves = self.one_shot.allocation_inputs(model, dense)
        _, final = allocate(dense, c, target, allowed, curves)
        sizes = {pg.group.id: pg.group.size for pg in dense.groups}
        keeps: Keeps = {}
        current = dense
        with task("gradual unconstrained selection", total=self.steps) as progress:
            for k, counts in enumerate(step_keep_counts(sizes, final, self.steps), 1):
                progress.update(f"gradual unconstrained selection: step {k}/{self.steps}")
                ids = group_ids_between(dense, current)
                grid = {ids[g]: v for g, v in allowed.items()} if allowed else None
                plan = choose(current, c, counts={ids[g]: n for g, n in counts.items()}, allowed_counts=grid)
                keeps = unit_keeps(plan)
                if k < self.steps:
                    current = prepare(self.masked_repaired(model, keeps), c, measured)
                progress.advance()
        return keeps

    def masked_repaired(self, model: onnx.ModelProto, keeps: Keeps) -> onnx.ModelProto:
        """`model` (dense) repaired for the units' kept sets `keeps`, then masked with them: the model a step
        leaves for the next one to score (what `UnconstrainedPass` would compute for these keeps)."""
        c = self.config
        plan = build_plan(model, replace(c, target_params=None), keeps)
        repaired = model
        if c.repair != "none":
            assert self.calib is not None  # UnconstrainedPass checked it
            # no ReLU-aware refit here: as in constrained mode's steps only the final repair is refitted (the
            # intermediate ones serve the re-scoring)
            repaired, _ = repair_plan(model, plan, c.repair, self.calib, stream=c.stream_repair,
                                      choose_readers=c.reader_choice == "seq")
            keeps = unit_keeps(plan)  # the reader choice of the seq repair may have changed them
        return mask_model(repaired, build_plan(repaired, replace(c, target_params=None), keeps))
