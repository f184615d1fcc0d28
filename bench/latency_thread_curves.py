"""Per-group latency curves at every multiple of 16 channels, at 1 and 2 onnxruntime threads: where do the
2-thread steps fall? (The evidence for `onnxprune.latency.grid.balanced`.)

    python bench/latency_thread_curves.py --models resnet50 mobilenet_v2 efficientnet_b0 --threads 1 2

For every group of at least 96 channels, the table machinery (`latency.table.build_table`: one-node
micro-models, fastest runs; several threads: each session timed alone in blocks) measures the counts that
are multiples of 16 between 15% and 65% of the size, plus the size, in a private cache (``--cache``), so
the default tables are untouched. Prints each distinct curve relative to its dense latency and, per model
and thread count, the median ratio of the latency at 80 / 96, 112 / 128 and 144 / 160 channels. Run it on
a quiet machine (other processes paused).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import zoo
from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.latency.backend import OrtBackend
from onnxprune.latency.table import build_table
from onnxprune.passes.normalize import NormalizePass
from onnxprune.passmanager import PassManager

PAIRS = ((80, 96), (112, 128), (144, 160))


class EverySixteen(OrtBackend):
    """onnxruntime CPU probing every multiple of 16 from 15% to 65% of a dim of at least 96 channels."""

    def probe_counts(self, size: int, lowest: int) -> list[int]:
        if size < 96:
            return [size]
        return sorted({c for c in range(16, size, 16) if 0.15 * size <= c <= 0.65 * size} | {size})


def curves(name: str, threads: int, cache: Path) -> dict[int, tuple[int, list[int], list[float]]]:
    model = PassManager([NormalizePass(inplace=True)]).run(onnx.load(str(zoo.zoo_model(name)))).model
    analysis = analyze(ModelGraph(model))
    table = build_table(analysis, EverySixteen(threads=threads), cache_dir=cache)
    return {gid: (c.size, list(c.counts), list(c.ms)) for gid, c in table.curves.items() if len(c.counts) > 1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2", "efficientnet_b0"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--cache", default=str(ROOT / "bench" / "out" / "thread_curves_cache"))
    args = ap.parse_args(argv)
    for name in args.models:
        for threads in args.threads:
            found = curves(name, threads, Path(args.cache))
            print(f"== {name}, {threads} thread(s): latency relative to dense")
            seen = set()
            for gid, (size, counts, ms) in found.items():
                if (size, tuple(ms)) not in seen:
                    seen.add((size, tuple(ms)))
                    print(f"  group {gid} ({size}): " + " ".join(f"{c}:{m / ms[-1]:.3f}" for c, m in zip(counts, ms)))
            for a, b in PAIRS:
                ratios = [ms[counts.index(a)] / ms[counts.index(b)] for size, counts, ms in found.values()
                          if size >= 128 and a in counts and b in counts]
                if ratios:
                    print(f"  {a}/{b}: median {np.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}, "
                          f"{len(ratios)} groups)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
