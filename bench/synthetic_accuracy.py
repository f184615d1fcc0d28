"""Data-free pruning: synthetic vs real calibration at the same configuration, generation time, PP-OCRv4 rec.

Three parts, each optional (``--parts cifar,time,ocr``):

* ``cifar``: CIFAR-10 ResNet20/44 (zoo ``cifar_resnet20/44``, all 10,000 test images of
  ``../shared/datasets``). For each removed fraction the *same* pruning configuration (``obs`` criterion,
  ``seq`` repair, ``--round-to 1``, uniform allocation) runs on ``--calib synthetic`` (default plan, or
  ``--synthetic N``) and on 256 real training images (``calib_train2000.npz``); the table gives both top-1s, the
  gap, and the issue-17 bar for the data-free row (drop <= 2 pt at 20%, <= 6 pt at 40%).
* ``time``: wall and CPU time of ``--calib synthetic`` (`load_calib`) with the default plan (budget 90 s of one
  onnxruntime thread) on ResNet-50 and EfficientNet-Lite0 at 224x224 (zoo models, built offline) and the CIFAR
  ResNet20/44; bar <= 120 s.
* ``ocr``: PP-OCRv4 rec (``x = 1x3x48x320``) pruned 20% (``obs`` + ``seq``, LAMP allocation as in
  ``bench/ocr_accuracy.py``) on synthetic inputs only; exact match on 200 rendered lines; bar: within 5 pt.
  ``--ocr-targets W`` > 0 adds to the synthesis a cross-entropy (weight W) pulling the model's per-position
  outputs toward random CTC sequences (blank half the positions, else a printable ASCII character of the charset):
  text-like inputs. Off by default: session 25 (bench/accuracy_real_results.txt), W = 3, seeds 0 / 1 / 2:
  91.5 / 98.0 / 93.5 -> 94.5 / 82.5 / 89.5; the synthesis seed alone moves this row by 6.5 pt.
  ``--ocr-seeds 0,1,2`` synthesises and prunes once per seed (a row each) and judges the mean: session 26, the
  default at seeds 0-5 reads 91.5 / 98.0 / 93.5 / 96.0 / 92.5 / 94.0 (mean 94.25, bar >= 94.5), so one seed's
  PASS or FAIL says little. Default: seed 0 only (one synthesis, ~5 min niced under load).
  Then ``--ocr-refine`` epochs of `onnxprune.refine` (distillation of the dense model on the same synthetic
  inputs: KL on the CTC probabilities, 8 samples per step, Adam at ``--ocr-refine-lr``; 0: none): a second row.

Accuracy sessions use one onnxruntime thread (the machine is shared); timings record the load average.
Results: ``bench/synthetic_accuracy_results.txt``.

    python bench/synthetic_accuracy.py [--parts cifar,time,ocr] [--fractions 0.2,0.4] [--synthetic 0]
        [--ocr-targets W] [--ocr-seeds 0[,1,...]] [--ocr-refine EPOCHS] [--ocr-refine-lr LR]
"""

from __future__ import annotations

import argparse
import os
import string
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.cifar_resnet import load_cifar10
from models.zoo import zoo_model
from onnxprune.calibration import CalibrationData, collect_stats, load_calib
from onnxprune.importer import import_model
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.synthetic import SynthesisConfig, synthesize
from onnxprune.synthetic_plan import AUTO_SAMPLES
from onnxprune.verify import session

RESULTS = ROOT / "bench" / "synthetic_accuracy_results.txt"
# ocr refine: off by default; session 25 (bench/accuracy_real_results.txt): at lr 3e-6 the row moves 91.5 -> 92.0
# (2 epochs) / 91.5 (4 epochs), 5-12 min niced; lr >= 1e-5 raises the loss (the guard discards it)
OCR_REFINE_EPOCHS, OCR_REFINE_LR = 0, 3e-6
# ocr text targets (SynthesisConfig.classes on the CTC output): session 25, no gain beyond the seed noise
OCR_TARGETS = 0.0
# ocr synthesis seeds: one row each (+ their mean when > 1). Session 26 (bench/accuracy_real_results.txt): the
# default pipeline reads 91.5 / 98.0 / 93.5 / 96.0 / 92.5 / 94.0 at seeds 0-5: judge the bar on "0,1,2" or more
OCR_SEEDS = "0"


def _load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def _top1(model, x: np.ndarray, y: np.ndarray) -> float:
    sess = session(model, threads=1)
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: x[i:i + 500]})[0] for i in range(0, len(x), 500)])
    return float((logits.argmax(1) == y).mean() * 100)


def _prune(model, fraction: float, calib: CalibrationData, allocation: str = "uniform"):
    cfg = PruneConfig(criterion="obs", repair="seq", target_params=f"{(1 - fraction) * 100:.6f}%", round_to=1,
                      allocation=allocation)
    return PrunePass(cfg, calib=calib, stats=collect_stats(model, calib)).run(model).model


def cifar(args: argparse.Namespace, emit) -> None:
    x, y = load_cifar10("test")
    real_x, _ = load_cifar10("calib", n=256)
    fractions = [float(f) for f in args.fractions.split(",")]
    cfg = SynthesisConfig(threads=1)
    emit(f"CIFAR-10, {len(x)} test images; obs + seq, --round-to 1, uniform allocation; real = 256 training "
         f"images; synthetic = synthetic{'' if args.synthetic == AUTO_SAMPLES else f':{args.synthetic}'} "
         f"(seed 0, 1 thread)")
    emit(f"{'model':<15}{'removed':>8}{'original':>10}{'real':>8}{'synthetic':>11}{'gap':>7}{'gen s':>7}  bar (data-free)")
    for arch in args.archs.split(","):
        model = import_model(str(zoo_model(f"cifar_{arch}")))
        base = _top1(model, x, y)
        t = time.perf_counter()
        syn = CalibrationData(synthesize(model, args.synthetic, 0, cfg))
        gen = time.perf_counter() - t
        real = CalibrationData({"input": real_x})
        for f in fractions:
            acc_real = _top1(_prune(model, f, real), x, y)
            acc_syn = _top1(_prune(model, f, syn), x, y)
            lim = 2.0 if f <= 0.2 + 1e-9 else 6.0
            drop = base - acc_syn
            emit(f"{arch:<15}{f:>8.0%}{base:>10.2f}{acc_real:>8.2f}{acc_syn:>11.2f}{acc_real - acc_syn:>7.2f}"
                 f"{gen:>7.1f}  {'PASS' if drop <= lim else 'FAIL'} drop {drop:.2f} <= {lim:g}   (load {_load()})")


def timing(args: argparse.Namespace, emit) -> None:
    emit("generation time of --calib synthetic (load_calib: objective, plan, optimisation, views), default plan "
         "(budget 90 s of one onnxruntime thread); wall and CPU seconds (CPU = wall on a quiet machine)")
    for name in args.time_models.split(","):
        model = import_model(str(zoo_model(name)))
        load = _load()
        t, c = time.perf_counter(), time.process_time()
        data = load_calib("synthetic" if args.synthetic == AUTO_SAMPLES else f"synthetic:{args.synthetic}", model)
        sec, cpu = time.perf_counter() - t, time.process_time() - c
        arr = next(iter(data.arrays.values()))
        emit(f"  {name}: {arr.shape[0]} samples of {tuple(arr.shape[1:])} in {sec:.1f}s wall, {cpu:.1f}s CPU  "
             f"{'PASS' if sec <= 120 else 'FAIL'} <= 120 s wall   (load before {load}, after {_load()})")


def ocr(args: argparse.Namespace, emit) -> None:
    from bench.ocr_accuracy import exact, ocr_data, recognise

    model, chars, test_lines, _, test_x, _ = ocr_data(200, 1, 320)
    base = exact(recognise(model, test_x, chars), test_lines)
    syn_cfg = SynthesisConfig(threads=1)
    if args.ocr_targets:  # CTC targets over the charset's printable ASCII characters (the test lines' alphabet)
        ascii_ids = tuple(i for i, c in enumerate(chars) if i > 0 and (c in string.printable.strip() or c == " "))
        syn_cfg = SynthesisConfig(threads=1, classes=args.ocr_targets, target_classes=ascii_ids)
    seeds = [int(s) for s in str(args.ocr_seeds).split(",")]
    accs = []
    for seed in seeds:  # one row per synthesis seed: the seed alone moves this row by 6.5 pt (OCR_SEEDS)
        t = time.perf_counter()
        syn = CalibrationData(synthesize(model, args.synthetic, seed, syn_cfg))
        gen = time.perf_counter() - t
        n = len(next(iter(syn.arrays.values())))
        f = 0.2
        t = time.perf_counter()
        pruned = _prune(model, f, syn, allocation="lamp")
        acc = exact(recognise(pruned, test_x, chars), test_lines)
        accs.append(acc)
        emit(f"PP-OCRv4 rec 1x3x48x320, {f:.0%} removed, obs + seq (lamp), synthetic ({n} samples, seed {seed}, "
             f"{gen:.0f}s{f', text targets {args.ocr_targets:g}' if args.ocr_targets else ''}), "
             f"no real data: exact match {acc:.1f}% vs original {base:.1f}% -> drop {base - acc:.1f} pt "
             f"{'PASS' if base - acc <= 5 else 'FAIL'} <= 5 (prune {time.perf_counter() - t:.0f}s, load {_load()})")
        if args.ocr_refine:
            from onnxprune.refine import RefineConfig, refine

            cfg = RefineConfig(epochs=args.ocr_refine, batch=8, lr=args.ocr_refine_lr, threads=1)
            t = time.perf_counter()
            refined, rep = refine(pruned, model, syn.arrays["x"], cfg)
            acc = exact(recognise(refined, test_x, chars), test_lines)
            emit(f"  + refine {cfg.epochs} ep, lr {cfg.lr:g}, batch {cfg.batch}, {'+'.join(rep.heads)} loss "
                 f"{rep.loss_before:.3f} -> {rep.loss_after:.3f}{'' if rep.kept else ' (not kept)'}: exact match "
                 f"{acc:.1f}% -> drop {base - acc:.1f} pt {'PASS' if base - acc <= 5 else 'FAIL'} <= 5 "
                 f"(refine {time.perf_counter() - t:.0f}s, load {_load()})")
    if len(accs) > 1:
        mean = float(np.mean(accs))
        emit(f"  mean over seeds {','.join(map(str, seeds))}: exact match {mean:.1f}% (min {min(accs):.1f}, max "
             f"{max(accs):.1f}) -> drop {base - mean:.1f} pt {'PASS' if base - mean <= 5 else 'FAIL'} <= 5")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="cifar,time,ocr")
    ap.add_argument("--archs", default="resnet20,resnet44")
    ap.add_argument("--fractions", default="0.2,0.4")
    ap.add_argument("--synthetic", type=int, default=AUTO_SAMPLES, help="samples (0: the default plan)")
    ap.add_argument("--time-models", default="resnet50,efficientnet_lite0,cifar_resnet20,cifar_resnet44")
    ap.add_argument("--ocr-targets", type=float, default=OCR_TARGETS,
                    help="weight of the CTC text-target cross-entropy in the ocr part's synthesis (0: none)")
    ap.add_argument("--ocr-seeds", default=OCR_SEEDS,
                    help="synthesis seeds of the ocr part, comma-separated: a row each, and their mean when > 1")
    ap.add_argument("--ocr-refine", type=int, default=OCR_REFINE_EPOCHS, help="refine epochs of the ocr part")
    ap.add_argument("--ocr-refine-lr", type=float, default=OCR_REFINE_LR, help="Adam's peak lr of --ocr-refine")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    lines: list[str] = [f"# python bench/synthetic_accuracy.py --parts {args.parts}; 2 cores, load average at start "
                        f"{_load()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]

    def emit(line: str) -> None:
        print(line, flush=True)
        lines.append(line)
        args.out.write_text("\n".join(lines) + "\n")  # every line: a long run keeps what it measured

    parts = {"cifar": cifar, "time": timing, "ocr": ocr}
    for part in args.parts.split(","):
        try:
            parts[part](args, emit)
        except Exception as exc:
            emit(f"{part}: failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    emit(f"# load average at the end {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
