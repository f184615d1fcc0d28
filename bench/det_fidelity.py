"""PP-OCRv4 text detection (DBNet) pruned: how much of the dense model's text map each method keeps.

    python bench/det_fidelity.py [--target-params 80%] [--seed 0] [--pages 48] [--calib-pages 64]

No labelled detection data here, so the reference is the dense model itself: pages of rendered text (DejaVu
Sans, random words, sizes, positions, ink and paper shades, 320x320, PP-OCR's ImageNet normalisation) go
through the dense and the pruned model, and the score is the IoU of their text maps (probability > 0.3, the
DBNet binarisation threshold) plus the mean absolute probability change. Rows: l2 without / with bias repair,
the data-free path (``--calib synthetic``, which reaches this model's BatchNorms through Resize and
ConvTranspose), the same with the knapsack allocation, and calibrated on other rendered pages (the ceiling).
Every row prunes with the CLI to the same ``--target-params`` (batch 1: a calibration sample is one page);
the model comes from the zoo (``ppocrv4_det``, the rapidocr-onnxruntime wheel).
Results: bench/det_fidelity_results.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = "the quick brown fox jumps over lazy dog invoice total amount 2026 price qty item receipt".split()
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def pages(n: int, rng: np.random.Generator, size: int = 320) -> np.ndarray:
    """`n` normalised pages [n, 3, size, size] of rendered text lines."""
    from matplotlib import font_manager
    from PIL import Image, ImageDraw, ImageFont

    font_path = font_manager.findfont("DejaVu Sans", fallback_to_default=False)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
        draw = ImageDraw.Draw(img)
        y = int(rng.integers(5, 30))
        while y < size - 30:
            height = int(rng.integers(14, 28))
            text = " ".join(rng.choice(WORDS, int(rng.integers(1, 5))))
            draw.text((int(rng.integers(0, size * 3 // 8)), y), text, fill=tuple(int(v) for v in rng.integers(0, 80, 3)),
                      font=ImageFont.truetype(font_path, height))
            y += height + int(rng.integers(4, 30))
        a = (np.asarray(img, np.float32) / 255.0 - MEAN) / STD
        out.append(a.transpose(2, 0, 1).astype(np.float32))
    return np.stack(out)


def text_maps(path: str | Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"x": images[i : i + 1]})[0] for i in range(len(images))])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target-params", default="80%")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pages", type=int, default=48)
    ap.add_argument("--calib-pages", type=int, default=64)
    args = ap.parse_args(argv)
    from models.zoo import zoo_model

    model = str(zoo_model("ppocrv4_det"))
    rng = np.random.default_rng(args.seed)
    test, calib = pages(args.pages, rng), pages(args.calib_pages, rng)
    tmp = Path(tempfile.mkdtemp())
    np.savez(tmp / "calib.npz", x=calib)
    dense = text_maps(model, test)
    mask = dense > 0.3
    print(f"PP-OCRv4 det, --target-params {args.target_params}, {args.pages} rendered pages (seed {args.seed}); dense text pixels "
          f"{mask.mean():.3f}; load average {os.getloadavg()[0]:.1f}")
    rows = {
        "l2, no repair": "--criterion l2 --repair none",
        "l2 + bias (data-free)": "--criterion l2 --repair bias",
        "obs + seq, synthetic (data-free)": "--criterion obs --repair seq --calib synthetic",
        "obs + seq, synthetic, knapsack (data-free)": "--criterion obs --repair seq --calib synthetic --allocation knapsack",
        f"obs + seq, calibrated ({args.calib_pages} other pages)": f"--criterion obs --repair seq --calib {tmp / 'calib.npz'}",
    }
    print(f"{'method':52s} {'params kept':>11s} {'IoU':>6s} {'mean |dp|':>9s} {'s':>5s}")
    for name, options in rows.items():
        out = tmp / "pruned.onnx"
        cmd = ["onnxprune", "prune", model, "--shape", "x=1,3,320,320", "--target-params", args.target_params, "-o", str(out),
               "--no-verify", "--json", "--seed", str(args.seed), *options.split()]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"{name:52s} failed: {proc.stderr.strip()[-200:]}")
            continue
        report = json.loads(proc.stdout)
        probs = text_maps(out, test)
        got = probs > 0.3
        iou = float((got & mask).sum() / max((got | mask).sum(), 1))
        print(f"{name:52s} {report['params_after'] / report['params_before']:11.3f} {iou:6.3f} "
              f"{float(np.abs(probs - dense).mean()):9.4f} {report['seconds']:5.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
