"""What a latency table costs, and which grids it yields, on real models (issue 13, parts 1-2).

    python bench/latency_tables.py [--models resnet50,mobilenet_v2,efficientnet_b0] [--threads 1]
                                   [--out bench/latency_tables_results.txt]

For every model (zoo cache: ONNXPRUNE_MODEL_CACHE, see models/zoo.py) it builds the onnxruntime latency
table twice into a fresh temporary cache folder: the first build measures everything (the cost a user pays
once per model and machine), the second only reads the cache (must time nothing). It prints wall and CPU
seconds with the load average before and after (timings on a shared machine are provisional: the CPU
seconds are what a quiet machine would need), the number of op signatures and micro-models, the sum of the
measured layers against the whole model timed in onnxruntime, and the grids `grid.keep_counts` derives:
how many groups got each period, and an example group per period.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx

from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.importer import canonicalize
from onnxprune.latency.backend import OrtBackend
from onnxprune.latency.grid import curve_counts
from onnxprune.latency.measure import static_inputs
from onnxprune.latency.table import build_table
from onnxprune.progress import progress_to_stderr


def model_path(name: str) -> Path:
    folder = Path(os.environ.get("ONNXPRUNE_MODEL_CACHE", ROOT / "models" / "cache"))
    path = folder / f"{name}.onnx"
    if not path.exists():
        from models.zoo import zoo_model

        return Path(zoo_model(name))
    return path


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def bench(name: str, threads: int) -> list[str]:
    model = canonicalize(onnx.load(str(model_path(name))))[0]
    analysis = analyze(ModelGraph(model))
    backend = OrtBackend(threads=threads)
    lines = [f"## {name} ({len(analysis.groups)} groups), onnxruntime CPU {threads} thread(s)"]
    with tempfile.TemporaryDirectory(prefix="onnxprune-latency-bench-") as folder:
        before = load()
        wall, cpu = time.perf_counter(), time.process_time()
        table = build_table(analysis, backend, cache_dir=folder)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        micro = sum(1 for _ in Path(folder).glob("*.json"))
        again = time.perf_counter()
        cached = build_table(analysis, backend, cache_dir=folder)
        again = time.perf_counter() - again
    whole = backend.time_models([static_inputs(model)], warmup=3, repeat=20)[0]
    lines.append(
        f"first build: {wall:.1f} s wall, {cpu:.1f} s CPU, load {before} -> {load()}; "
        f"{table.measured_ops} op signatures ({micro} cache files) for {len(table.curves)} curves"
    )
    lines.append(f"cached build: {again:.2f} s, {cached.measured_ops} op signatures timed")
    lines.append(
        f"measured layers at dense size: {table.dense_ms:.2f} ms (fastest runs); whole model: "
        f"{whole.median_ms:.2f} ms median, {whole.min_ms:.2f} ms fastest"
    )
    kinds: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    for gid, curve in sorted(table.curves.items()):
        counts, why = curve_counts(curve)
        label = why.kind if why.kind != "period" else f"multiples of {why.period}"
        kinds[label] += 1
        examples.setdefault(label, f"group {gid} ({curve.size} ch, {len(curve.nodes)} layers): ...{list(counts[-4:])}")
    for label, n in kinds.most_common():
        lines.append(f"  {label:>16}: {n:3d} groups   e.g. {examples[label]}")
    for notice in table.notices:
        lines.append(f"  notice: {notice}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet50,mobilenet_v2,efficientnet_b0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "latency_tables_results.txt"))
    args = ap.parse_args()
    out: list[str] = [f"# latency tables (load average at start {load()}, {os.cpu_count()} cores)"]
    with progress_to_stderr(sys.stderr.isatty()):
        for name in args.models.split(","):
            lines = bench(name, args.threads)
            print("\n".join(lines), flush=True)
            out += lines
    Path(args.out).write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
