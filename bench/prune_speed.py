"""Time analyse+prune on a ResNet-50-sized model (goal: <= 1 s), broken down by stage.

Stages, measured in one run: import (load + check + canonicalize), analysis (coupling graph and
groups), scoring + planning, rewrite (slice weights, fix nodes), re-inference + checker. Also prints
the share of each stage, and the ratio of the whole pipeline to a plain `onnx.load` of the same file
(a machine-independent yardstick).

    python bench/prune_speed.py [MODEL.onnx] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import onnx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxprune.channels import analyze
from onnxprune.criteria import Magnitude
from onnxprune.graph import ModelGraph
from onnxprune.importer import check_model, import_model
from onnxprune.plan import make_plan
from onnxprune.rewrite import apply_plan
from onnxprune.shape_inference import infer_shapes


def once(path: str) -> dict[str, float]:
    t = {}
    start = time.perf_counter()
    onnx.load(path)
    t["onnx.load (yardstick)"] = time.perf_counter() - start

    start = time.perf_counter()
    model = import_model(path)
    t["import"] = time.perf_counter() - start
    s = time.perf_counter()
    analysis = analyze(ModelGraph(model))
    t["analysis"] = time.perf_counter() - s
    s = time.perf_counter()
    plan = make_plan(analysis, Magnitude(1).score_all(analysis), 0.5)
    t["score + plan"] = time.perf_counter() - s
    s = time.perf_counter()
    pruned = apply_plan(analysis, plan.labels(analysis))
    t["rewrite"] = time.perf_counter() - s
    s = time.perf_counter()
    check_model(infer_shapes(pruned))
    t["infer + check"] = time.perf_counter() - s
    t["analyse + prune (total)"] = time.perf_counter() - start
    return t


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", help="default: ResNet-50 from models/zoo.py")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    path = args.model
    if path is None:
        from models.zoo import zoo_model

        path = str(zoo_model("resnet50"))
    runs = [once(path) for _ in range(args.repeat)]
    table = Table(title=f"analyse + prune at 50%: {Path(path).name} (median of {args.repeat})")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("share of total", justify="right")
    total = statistics.median(r["analyse + prune (total)"] for r in runs)
    for key in runs[0]:
        med = statistics.median(r[key] for r in runs)
        table.add_row(key, f"{med:.3f}", f"{med / total:.0%}")
    console = Console()
    console.print(table)
    yard = statistics.median(r["onnx.load (yardstick)"] for r in runs)
    console.print(f"total / onnx.load = {total / yard:.1f}x;  goal <= 1 s: {'met' if total <= 1 else 'NOT met'} ({total:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
