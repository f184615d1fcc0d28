"""Data-free pruning with synthetic calibration inputs vs real calibration, on pretrained CIFAR-10 ResNets.

For each model and parameter target, runs the CLI as a user would and measures top-1 on CIFAR-10 test images:
original / l1 no repair / l2 + bias (data-free) / obs + seq with ``--calib synthetic`` / obs + seq with 256
real training images (``calib_train2000.npz``). Prints one table with the wall time of every prune and the
load average. Needs ``../shared/datasets`` (CIFAR-10 + weights) and the zoo models ``cifar_resnet20/44``
(``python -m models.zoo --only cifar_resnet20 --only cifar_resnet44``).

    python bench/synthetic_accuracy.py [--test-n 2000|10000] [--archs resnet20,resnet44] [--targets 80%,60%]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.cifar_resnet import load_cifar10, top1

CACHE = Path(os.environ.get("ONNXPRUNE_MODEL_CACHE", ROOT / "models" / "cache"))
ROWS = {
    "l1 no repair": ["--criterion", "l1", "--repair", "none"],
    "l2+bias": ["--criterion", "l2", "--repair", "bias"],
    "obs+seq synthetic": ["--criterion", "obs", "--repair", "seq", "--calib", "synthetic"],
    "obs+seq real256": ["--criterion", "obs", "--repair", "seq", "--calib", "{real}", "--calib-samples", "256"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test-n", type=int, default=10000, help="stratified test subset (10000 = all)")
    ap.add_argument("--archs", default="resnet20,resnet44")
    ap.add_argument("--targets", default="80%,60%")
    ap.add_argument("--rows", default=",".join(ROWS))
    args = ap.parse_args()
    x, y = load_cifar10("test", None if args.test_n >= 10000 else args.test_n)
    calib_x, _ = load_cifar10("calib")
    load = os.getloadavg()
    print(f"test images: {len(x)}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print("| model | params kept | row | top-1 % | drop pt | prune s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        real = Path(tmp) / "calib.npz"
        np.savez(real, input=calib_x)
        for arch in args.archs.split(","):
            model = CACHE / f"cifar_{arch}.onnx"
            base = top1(model, x, y)
            print(f"| {arch} | 100% | original | {base:.2f} | 0 | - |", flush=True)
            for target in args.targets.split(","):
                for row in args.rows.split(","):
                    out = Path(tmp) / "pruned.onnx"
                    flags = [f.format(real=real) for f in ROWS[row]]
                    cmd = ["onnxprune", "prune", str(model), "-o", str(out), "--target-params", target,
                           "--no-verify", "--round-to", "1", *flags]
                    t0 = time.perf_counter()
                    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                    seconds = time.perf_counter() - t0
                    acc = top1(out, x, y)
                    print(f"| {arch} | {target} | {row} | {acc:.2f} | {base - acc:.2f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
