"""PrunePass: analyse channel groups, score them, plan removals, rewrite the model, re-infer shapes.

The pass's `info["summary"]` is the record written into the model's metadata and printed by the CLI.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import onnx

from onnxprune import __version__
from onnxprune.channels import ChannelAnalysis, analyze
from onnxprune.errors import UsageError
from onnxprune.graph import ModelGraph
from onnxprune.importer import check_model, infer_shapes
from onnxprune.metrics import count_macs, count_params
from onnxprune.passmanager import Pass, PassResult
from onnxprune.plan import PruningPlan, make_plan
from onnxprune.rewrite import apply_plan

SUMMARY_KEY = "onnxprune.summary"


@dataclass(frozen=True)
class PruneConfig:
    """What to remove and how to choose it."""

    ratio: float = 0.3
    criterion: str = "l1"
    global_ranking: bool = False
    round_to: int = 1
    allow_inexact: bool = False  # also prune hidden sizes under LayerNorm / softmax axes
    max_group_ratio: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise UsageError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.round_to < 1:
            raise UsageError(f"round-to must be >= 1, got {self.round_to}")


class PrunePass(Pass):
    def __init__(self, config: PruneConfig | None = None, criterion=None) -> None:
        self.config = config or PruneConfig()
        self._criterion = criterion

    def criterion(self):
        if self._criterion is not None:
            return self._criterion
        from onnxprune.passes.scoring import get_criterion

        return get_criterion(self.config.criterion, self.config.seed)

    def plan(self, analysis: ChannelAnalysis) -> PruningPlan:
        c = self.config
        scores = self.criterion().score_all(analysis)
        return make_plan(
            analysis, scores, c.ratio, global_ranking=c.global_ranking, round_to=c.round_to,
            max_group_ratio=c.max_group_ratio,
        )

    def call(self, model):
        start = time.perf_counter()
        graph = ModelGraph(model)
        analysis = analyze(graph, allow_inexact=self.config.allow_inexact)
        plan = self.plan(analysis)
        labels = plan.labels(analysis)
        if len(labels):
            pruned = infer_shapes(apply_plan(analysis, labels))
            check_model(pruned)
        else:
            pruned = model
        after = ModelGraph(pruned)
        summary = {
            "tool": f"onnxprune {__version__}",
            "config": asdict(self.config),
            "params_before": count_params(graph),
            "params_after": count_params(after),
            "macs_before": count_macs(graph),
            "macs_after": count_macs(after),
            "groups": len(analysis.groups),
            "groups_pruned": plan.groups_pruned,
            "channels_removed": plan.channels_removed,
            "plan": {str(gid): int(len(idx)) for gid, idx in plan.removed.items() if len(idx)},
            "barriers": [b.as_dict() for b in analysis.barriers],
            "seconds": round(time.perf_counter() - start, 3),
        }
        if len(labels):
            stamp(pruned, summary)
        return PassResult(pruned, bool(len(labels)), {"summary": summary, "analysis": analysis, "plan": plan})


def stamp(model: onnx.ModelProto, summary: dict) -> None:
    """Record what was done (tool, config, plan, sizes) in the model's metadata_props for auditing."""
    _set_metadata(model, SUMMARY_KEY, json.dumps({k: v for k, v in summary.items() if k != "barriers"}))


def _set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)
