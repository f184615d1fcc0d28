"""Calibrated repair (ls) wall time on a ResNet-50-sized model with 256 calibration samples.

    python bench/repair_speed.py [--samples 256] [--ratio 0.3]

Model: ``zoo_model("resnet50")`` (torchvision architecture, random weights, batch 1, 3x224x224): timing
only, so random weights and random inputs are fine. Printed side by side in one run: the unpruned
forward passes over the samples (the floor any calibrated method pays), statistics collection
(forward passes + Hessians), the prune with ls repair, and the prune without repair. Issue 4 judges
statistics + ls repair <= 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxprune.calibration import CalibrationData, collect_stats  # noqa: E402
from onnxprune.importer import import_model  # noqa: E402
from onnxprune.passes.pruning import PruneConfig, PrunePass  # noqa: E402
from onnxprune.verify import session  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--ratio", type=float, default=0.3)
    args = ap.parse_args(argv)
    from models.zoo import zoo_model

    model = import_model(str(zoo_model("resnet50")))
    name = model.graph.input[0].name
    x = np.random.default_rng(0).standard_normal((args.samples, 3, 224, 224), dtype=np.float32)
    sess = session(model)
    t = time.perf_counter()
    for i in range(args.samples):
        sess.run(None, {name: x[i : i + 1]})
    t_fwd = time.perf_counter() - t
    t = time.perf_counter()
    stats = collect_stats(model, CalibrationData({name: x}))
    t_stats = time.perf_counter() - t
    t = time.perf_counter()
    res = PrunePass(PruneConfig(ratio=args.ratio, repair="ls"), stats=stats).run(model)
    t_ls = time.perf_counter() - t
    t = time.perf_counter()
    PrunePass(PruneConfig(ratio=args.ratio)).run(model)
    t_none = time.perf_counter() - t
    rep = res.info["summary"]["repair"]
    total = t_stats + t_ls
    print(f"ResNet-50 (random weights), {args.samples} samples, ratio {args.ratio}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"  forward passes only        {t_fwd:7.1f} s  (1.00x)")
    print(f"  statistics (fwd + Hessian) {t_stats:7.1f} s  ({t_stats / t_fwd:.2f}x)")
    print(f"  prune + ls repair          {t_ls:7.1f} s  ({rep['repaired']} layers repaired)")
    print(f"  prune, no repair           {t_none:7.1f} s")
    print(f"  calibrated repair total    {total:7.1f} s -> {'PASS' if total <= 60 else 'FAIL'} (<= 60 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
