"""Every candidate plan of an auto-rounded ``--ratio``, predicted by the latency table and measured side by side.

    ONNXPRUNE_MODEL_CACHE=... python bench/ratio_candidates.py [--models mobilenet_v2,efficientnet_b0]
                                                               [--ratios 0.5,0.7] [--threads 1] [--repeat 40]

The default plan of ``onnxprune prune MODEL --ratio R`` (auto rounding) is chosen among candidates that all
remove R of the channels (`onnxprune.latency.ratio_choice`: uniform at any count = ``--round-to 1``, uniform
on the latency grid, latency-weighted at two exponents and two price sources, half-blended); the table
shortlists, timing decides (`onnxprune.passes.latency_select.confirmed`). This bench prints, per candidate,
the table's predicted speedup and efficiency (speedup / MACs reduction) next to the measured ones: every
candidate and the dense model timed interleaved in one process on onnxruntime CPU (``--threads``; fastest
and median of ``--repeat`` rounds), with the same analysis, criterion (l1) and cached latency table the CLI
uses. It is what showed the table off by more than its candidates differ (MobileNetV2@0.7: 3.56-3.73x
predicted, 3.84-4.35x measured): bench/latency_results_quiet.txt, session 38. Note the load average: on a
busy machine the fastest runs are the steadier column.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.zoo import zoo_model
from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.importer import import_model
from onnxprune.metrics import count_macs
from onnxprune.passes.config import PruneConfig
from onnxprune.passes.latency_select import latency_backend, latency_grid, ratio_choice, timed_model
from onnxprune.passes.select import criterion_for
from onnxprune.plan import PruningPlan

ROOT = Path(__file__).resolve().parents[1]


def model_path(name: str) -> Path:
    """A bundled model (``models/NAME.onnx``) or a zoo one."""
    bundled = ROOT / "models" / f"{name}.onnx"
    return bundled if bundled.exists() else zoo_model(name)


def candidates(name: str, ratio: float, threads: int, repeat: int, latency_cache: str | None = None) -> list[str]:
    """Lines: the table's choice, then one per candidate (predicted vs measured)."""
    config = PruneConfig(ratio=ratio, round_to="auto", latency_threads=threads, latency_cache=latency_cache)
    analysis = analyze(ModelGraph(import_model(str(model_path(name)))))
    grid, table, _ = latency_grid(config, analysis)
    choice = ratio_choice(config, analysis, lambda: criterion_for(config).score_all(analysis), table, grid)
    if choice is None:
        return [f"{name} @ {ratio}: no ratio choice (no latency table)"]
    models = [timed_model(analysis, PruningPlan({}))] + [timed_model(analysis, c.plan) for c in choice.candidates]
    macs = [count_macs(ModelGraph(m)) for m in models]
    timings = latency_backend(config).time_models(models, repeat=repeat)
    dense = timings[0]
    lines = [f"{name} @ {ratio} ({threads} thread(s), dense {dense.median_ms:.3g} ms): the table's choice "
             f"{choice.chosen.name}"]
    for c, m, t in zip(choice.candidates, macs[1:], timings[1:]):
        fastest, median, reduction = dense.best_ms / t.best_ms, dense.median_ms / t.median_ms, macs[0] / m
        lines.append(f"  {c.name:36s} predicted {c.speedup:5.2f}x ({c.efficiency:.2f})  measured {median:5.2f}x "
                     f"({median / reduction:.2f}), fastest {fastest:5.2f}x  MACs /{reduction:.2f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenet_v2,efficientnet_b0")
    ap.add_argument("--ratios", default="0.5,0.7")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=40)
    args = ap.parse_args(argv)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    for name in args.models.split(","):
        for ratio in (float(r) for r in args.ratios.split(",")):
            print("\n".join(candidates(name, ratio, args.threads, args.repeat)), flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
