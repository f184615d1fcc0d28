"""Step 5, measured: export the plan under a few cost models and keep the one onnxruntime runs fastest.

Start reading at `tune_layout`. All candidates (`layout_candidates`) compute the same function (the masked
original); only where the copies sit differs, so this is a pure layout choice.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import onnx

from onnxprune.importer import infer_shapes
from onnxprune.upscale.config import UnconstrainedConfig
from onnxprune.upscale.costmodel import deployed_session
from onnxprune.upscale.export import export
from onnxprune.upscale.layout import optimize_layout
from onnxprune.upscale.records import UnconstrainedPlan
from onnxprune.verify import random_inputs


def layout_candidates(config: UnconstrainedConfig) -> dict[str, UnconstrainedConfig]:
    """The configurations whose layouts are timed: the fitted cost model, copies cheaper / dearer,
    everything absorbed, copies only."""
    cost = config.cost
    return {
        "fitted": config,
        "copies cheaper": replace(config, cost=replace(cost, layout_break=0.0)),
        "copies dearer": replace(config, cost=replace(cost, layout_break=4 * cost.layout_break + 4)),
        "absorb all": replace(config, cost=replace(cost, op_overhead_s=1.0)),
        "copies only": replace(config, absorb=False),
    }


def tune_layout(plan: UnconstrainedPlan, config: UnconstrainedConfig) -> tuple[dict, onnx.ModelProto, dict]:
    """Export the plan under each candidate cost model (`layout_candidates`); keep the fastest.

    The candidates are timed round-robin (`config.tune` rounds of one run each, `config.tune_threads`
    intra-op threads) so that load on the machine hits them alike. Returns (layout decisions, model,
    {"ms": {candidate: median ms}, "chosen": name}). `plan` is left with the last candidate's layout.
    """
    exports: dict[str, tuple[dict, onnx.ModelProto]] = {}
    seen: dict[bytes, str] = {}
    for name, cfg in layout_candidates(config).items():
        for gp in plan.groups:
            gp.order = np.arange(gp.group.size)
            for pc in gp.pieces:
                pc.narrow = pc.narrowable
        layout = optimize_layout(plan, cfg)
        model = infer_shapes(export(plan, contiguous_ops=True, scatter="pad_gather"))
        key = model.SerializeToString()
        if key in seen:  # the same decisions as an earlier candidate
            continue
        seen[key] = name
        exports[name] = (layout, model)
    inputs = random_inputs(next(iter(exports.values()))[1], seed=0)
    sessions = {k: deployed_session(m, config.tune_threads) for k, (_, m) in exports.items()}
    feeds = {k: {i.name: inputs[i.name] for i in s.get_inputs()} for k, s in sessions.items()}
    for k, sess in sessions.items():
        sess.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in exports}
    for _ in range(config.tune):
        for k, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, feeds[k])
            times[k].append(time.perf_counter() - t)
    medians = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    best = min(medians, key=medians.__getitem__)
    layout, model = exports[best]
    return layout, model, {"ms": {k: round(v, 3) for k, v in medians.items()}, "chosen": best}
