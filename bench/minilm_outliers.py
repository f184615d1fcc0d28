"""Why l1 (and random) stay far below l2 on all-MiniLM-L6-v2 even with ls repair: outlier FFN channels.

    python bench/minilm_outliers.py [--fraction 0.3] [--criteria l1,l2,random,fpgm,activation,obs]

For every FFN group (1536 channels, uniform allocation), ranks the channels by their contribution to the
FFN output, rms(x_c) * ||W_out[c, :]|| on the calibration sentences of bench/minilm_accuracy.py, and
prints for each criterion how many of the 3 largest contributors fall in its removed set (the lowest
`fraction` of its scores), with the L1/L2 norm ratio of the largest one relative to the layer median: a
channel with few, large weights (massive-activation features of BERT-style FFNs) has a small L1 norm for
its L2 norm, so L1 removes it and least squares cannot rebuild a 100x-median contribution from the rest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.minilm_accuracy import CALIB_LEN, MODEL, packed, sentences, tokenizer
from onnxprune.calibration import CalibrationData, collect_stats
from onnxprune.channels import analyze
from onnxprune.criteria import Magnitude, get_criterion
from onnxprune.graph import ModelGraph
from onnxprune.importer import import_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--criteria", default="l1,l2,random,fpgm,activation,obs")
    ap.add_argument("--calib-samples", type=int, default=1024)
    args = ap.parse_args(argv)
    criteria = args.criteria.split(",")
    texts = sentences(args.calib_samples + 300)[: args.calib_samples]  # the benchmark's calibration sentences
    model = import_model(str(MODEL))
    stats = collect_stats(model, CalibrationData(packed(tokenizer(), texts, CALIB_LEN)))
    graph = ModelGraph(model)
    analysis = analyze(graph)
    print(f"all-MiniLM-L6-v2 FFN groups, lowest {args.fraction:.0%} of each criterion's scores removed; "
          "cells: how many of the layer's 3 largest output contributors are removed")
    print(f"{'layer':>5} {'top/median':>10} {'L1/L2 of top (vs median)':>25} | " + " ".join(f"{c:>10}" for c in criteria))
    ffn = [g for g in analysis.groups if g.size == 1536]
    for layer, group in enumerate(ffn):
        c = next(c for c in stats.consumers.values()
                 if any(m.tensor == c.weight and m.axis == c.in_axis for m in group.members))  # fmt: skip
        st = stats.stats[c.name]
        w = np.moveaxis(np.asarray(graph.const(c.weight), dtype=np.float64), c.in_axis, 0)
        contrib = np.sqrt(st.var + st.mean**2) * np.sqrt((w**2).sum(1))
        top3 = set(np.argsort(contrib)[::-1][:3])
        top = int(np.argmax(contrib))
        ratio = Magnitude(1).score(group, analysis) / Magnitude(2).score(group, analysis)
        k = int(args.fraction * group.size)
        cells = []
        for name in criteria:
            s = get_criterion(name, 0, stats, "ls").score(group, analysis)
            cells.append(f"{len(top3 & set(np.argsort(s, kind='stable')[:k])):>10}")
        print(f"{layer:>5} {contrib[top] / np.median(contrib):>10.1f} {ratio[top] / np.median(ratio):>25.2f} | "
              + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
