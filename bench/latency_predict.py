"""How well does the latency table predict a pruned model, and how efficient can uniform pruning be?

    python bench/latency_predict.py [--models resnet50,mobilenet_v2,efficientnet_b0] [--ratios 0.1,0.3,0.5,0.7]
                                    [--threads 1] [--repeat 30] [--out bench/latency_predict_results.txt]

For every zoo model (ONNXPRUNE_MODEL_CACHE) it builds two latency tables on onnxruntime CPU (cached like the
CLI's): one of the Conv/Gemm/MatMul layers only (the tables before 2026-12-03) and one that also prices the
memory-bound nodes the groups slice (`onnxprune.latency.microbench.light_nodes`: SiLU, squeeze-excitation
products, pools, Resize, Concat; fused epilogues excluded). Then:

1. **Prediction error.** Each ratio is pruned with the CLI defaults (``--ratio R``, auto rounding); all
   pruned models are timed round-robin with the dense one; each table predicts the speedup as the CLI
   summary reports it (``predicted_speedup``: the priced layers' dense total over their predicted total),
   printed with its error against the measured speedup (fastest runs, interleaved); a third prediction
   uses the full table calibrated in-model (`onnxprune.latency.calibrate`: one onnxruntime profile of the
   dense model rescales each node's price, net of the micro-model's call overhead).
2. **Amdahl bound of uniform pruning.** With every group keeping ``1 - r`` of its channels and every priced
   node running in time proportional to its MACs (a layer two groups touch: the product of both ratios;
   depthwise convolutions and memory-bound nodes: linear), the best efficiency (speedup / MACs reduction)
   a uniform ratio can reach is ``MACs(r)/MACs / (T(r)/T)`` with ``T`` the time the table prices. Layers with much time per MAC (depthwise, memory-bound) shrink linearly while MAC-heavy
   pointwise layers shrink quadratically, so the MACs fall faster than the time.

The load average is printed: on a shared machine the timings are provisional.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import load
from onnxprune.channels import ChannelAnalysis, analyze
from onnxprune.graph import ModelGraph
from onnxprune.importer import canonicalize
from onnxprune.latency.backend import OrtBackend, random_feeds
from onnxprune.latency.calibrate import in_model_table
from onnxprune.latency.measure import static_inputs
from onnxprune.latency.predict import predicted_ms, uniform_bound
from onnxprune.latency.table import build_table
from onnxprune.latency.timing import Timing


def model_path(name: str) -> Path:
    path = Path(os.environ.get("ONNXPRUNE_MODEL_CACHE", ROOT / "models" / "cache")) / f"{name}.onnx"
    if not path.exists():
        from models.zoo import zoo_model

        return Path(zoo_model(name))
    return path


def kept_counts(analysis: ChannelAnalysis, pruned: onnx.ModelProto) -> dict[int, int]:
    """Each group's kept channel count, read off the pruned model's initializer shapes."""
    dims = {t.name: list(t.dims) for t in pruned.graph.initializer}
    dense = {t.name: list(t.dims) for t in analysis.graph.model.graph.initializer}
    out: dict[int, int] = {}
    for g in analysis.groups:
        for m in g.param_members:
            if m.tensor in dims and m.tensor in dense and len(m.positions):
                removed = dense[m.tensor][m.axis] - dims[m.tensor][m.axis]
                out[g.id] = int(round(g.size - removed * g.size / len(m.positions)))
                break
    return out


def prune(src: Path, out: Path, ratio: float, threads: int) -> dict:
    cmd = [sys.executable, "-m", "onnxprune.cli", "prune", str(src), "-o", str(out), "--ratio", str(ratio),
           "--latency-threads", str(threads), "--no-verify", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1:])
    return json.loads(proc.stdout)


def cpu_timed(models: list[onnx.ModelProto], backend: OrtBackend, repeat: int) -> list[Timing]:
    """Thread CPU time of each run, round-robin (1 intra-op thread: onnxruntime runs on the calling thread),
    so that time the scheduler gives other processes is not counted; for a loaded machine."""
    runs = [(backend.session(m), random_feeds(m, seed=k)) for k, m in enumerate(models)]
    seconds: list[list[float]] = [[] for _ in models]
    for r in range(3 + repeat):
        for i in [*range(r % len(runs), len(runs)), *range(r % len(runs))]:
            sess, feeds = runs[i]
            start = time.thread_time()
            sess.run(None, feeds)
            if r >= 3:
                seconds[i].append(time.thread_time() - start)
    return [Timing.of(s) for s in seconds]


def bench(name: str, ratios: list[float], threads: int, repeat: int, work: Path, cpu_time: bool = False) -> list[str]:
    src = model_path(name)
    model = static_inputs(canonicalize(onnx.load(str(src)))[0])
    analysis = analyze(ModelGraph(model))
    backend = OrtBackend(threads=threads)
    heavy = build_table(analysis, backend, light=False)
    full = build_table(analysis, backend, light=True)
    in_model = in_model_table(full, analysis, backend)
    variants, reductions = [], []
    for r in ratios:
        out = work / f"{name}_{r}.onnx"
        summary = prune(src, out, r, threads)
        variants.append(static_inputs(onnx.load(str(out))))
        reductions.append(summary["macs_before"] / max(summary["macs_after"], 1))
    timings = cpu_timed([model, *variants], backend, repeat) if cpu_time else \
        backend.time_models([model, *variants], warmup=3, repeat=repeat)
    whole = timings[0].best_ms
    lines = [f"## {name}: dense {whole:.2f} ms (fastest of {timings[0].runs}); priced by the table: Conv/Gemm/MatMul "
             f"{heavy.dense_ms:.2f} ms, with memory-bound nodes {full.dense_ms:.2f} ms "
             f"({len(full.node_dense_ms) - len(heavy.node_dense_ms)} more nodes); {load()}",
             f"{'ratio':>5} {'MACs /':>7} {'measured':>8} {'eff':>5} | {'pred (conv only)':>16} {'err':>6} | "
             f"{'pred (+memory)':>14} {'err':>6} | {'pred (in-model)':>15} {'err':>6} | "
             f"{'uniform bound: MACs /':>21} {'eff':>5}"]
    for r, red, t, pruned in zip(ratios, reductions, timings[1:], variants):
        kept = kept_counts(analysis, pruned)
        measured = whole / t.best_ms
        cells = []
        for table in (heavy, full, in_model):
            predicted = table.dense_ms / predicted_ms(table, kept)
            cells.append((predicted, predicted / measured - 1))
        bound = uniform_bound(full, analysis, r)
        ideal, eff = bound.macs_reduction, bound.efficiency
        lines.append(f"{r:>5.2f} {red:>7.2f} {measured:>8.2f} {measured / red:>5.2f} | {cells[0][0]:>16.2f} "
                     f"{cells[0][1]:>+6.0%} | {cells[1][0]:>14.2f} {cells[1][1]:>+6.0%} | {cells[2][0]:>15.2f} "
                     f"{cells[2][1]:>+6.0%} | {ideal:>21.2f} {eff:>5.2f}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet50,mobilenet_v2,efficientnet_b0")
    ap.add_argument("--ratios", default="0.1,0.3,0.5,0.7")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time runs by thread CPU time (1 thread only; for a loaded machine)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "latency_predict_results.txt"))
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    started = time.time()
    clock = "thread CPU time" if args.cpu_time and args.threads == 1 else "wall time"
    out = [f"# predicted vs measured whole-model speedup, onnxruntime CPU {args.threads} thread(s), {clock}; "
           f"start: {load()}"]
    with tempfile.TemporaryDirectory(prefix="onnxprune-latency-predict-") as tmp:
        for name in args.models.split(","):
            lines = bench(name, ratios, args.threads, args.repeat, Path(tmp), args.cpu_time and args.threads == 1)
            print("\n".join(lines), flush=True)
            out += lines
    out.append(f"total {time.time() - started:.0f} s; end: {load()}")
    Path(args.out).write_text("\n".join(out) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
