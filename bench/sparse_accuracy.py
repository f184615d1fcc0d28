"""Accuracy vs fine-grained sparsity, each pattern with and without repair, against channel pruning at equal
non-zero parameters (issue 14, part 5(d); `bench/sparse.py` imports `evaluate` / `main`).

    python bench/sparse_accuracy.py [--models cnn,resnet,ocr] [--fractions 0.5] [--patterns ...]
                                    [--repairs none,bias,ls,seq] [--test 10000] [--calib 256] [--ocr-test 200]

Models: the bundled Fashion-MNIST CNN and ResNet (top-1 on the first ``--test`` images of the *test* split,
calibration images from the *train* split) and PP-OCRv4 rec (exact match on rendered text lines, as in
bench/ocr_accuracy.py, input shapes kept dynamic unless ``--ocr-static``; ``ONNXPRUNE_MODEL_CACHE`` finds the zoo
model).

Each row zeroes weights with `SparsifyPass` so that the fraction ``f`` of *all* the model's parameters is
removed (``--sparsity = f * params / prunable``: the prunable weights exclude the stem, layers under 1024
weights, depthwise convs and a classifier holding at most 20% of them, `sparsity.LayerRules`), shared among
layers by ``--allocation`` (lamp as the channel baseline, on Fashion-MNIST: on the CNN, group:4x1 + ls at
50% gets 90.1 top-1 uniform, 92.5 lamp); an N:M row sits at its own fixed sparsity. ``--allocation auto`` (default) is lamp on Fashion-MNIST and uniform on
PP-OCRv4 rec: lamp sends OCR's largest layers (the 480x480 pointwise convs, the classifier) to 80-95%, and
measured with seq at f = 0.5 (200 lines): block:4x4 36.0 exact match lamp vs 80.0 uniform, group:1x4 82.5 vs
87.5 (a measured per-layer end-to-end-error allocation got 57.5 for block:4x4 and was dropped). Repairs:
``none`` (magnitude mask), ``bias`` (magnitude mask + BatchNorm-mean bias correction: data-free), ``wanda``
(|W| x input RMS mask, calibrated, no update), ``ls`` (SparseGPT on the original model's Hessians), ``seq``
(SparseGPT layer by layer on the sparsified model's inputs; layers kept dense downstream, the classifier, are
refitted to those inputs too, as channel pruning's repair refits them: CNN group:8x1 92.34 -> 92.54). The
channel baseline of every row removes the same number of parameters (``--target-params``: OBS criterion, LAMP
allocation, the better of the ``ls`` and ``seq`` repairs, as bench/ocr_accuracy.py). The bar: at f = 0.5,
every fine-grained pattern with its best repair loses less accuracy than the channel baseline, on every model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxprune.calibration import CalibrationData, collect_stats
from onnxprune.graph import ModelGraph
from onnxprune.importer import import_model
from onnxprune.metrics import count_params
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.passes.sparsify import SparsifyPass
from onnxprune.sparsity import SparsityConfig, SparsityReport, sparse_layers
from onnxprune.sparsity.patterns import parse_pattern
from onnxprune.verify import session

AUTO_ALLOCATION = {"cnn": "lamp", "resnet": "lamp", "ocr": "uniform"}  # measured: see the module docstring
PATTERNS = ("unstructured", "group:1x4", "group:4x1", "nm:2:4", "block:4x4", "block:16x1")
RESULTS = ROOT / "bench" / "sparse_accuracy_results.txt"


@dataclass
class Task:
    """One model: the model, its accuracy function, calibration inputs."""

    name: str
    model: object
    accuracy: Callable[[object], float]
    calib: CalibrationData
    metric: str


@dataclass
class Row:
    model: str
    pattern: str
    repair: str
    removed: float  # fraction of all parameters zeroed or removed
    accuracy: float
    channel_accuracy: float
    channel_repair: str
    seconds: float


def fashion_task(which: str, n_test: int, n_calib: int) -> Task:
    from models.fashion_mnist import load_fashion_mnist

    model = import_model(str(ROOT / "models" / f"fashion_mnist_{which}.onnx"))
    x, y = load_fashion_mnist("test")
    x, y = x[:n_test], y[:n_test]
    xt, _ = load_fashion_mnist("train")
    calib = xt[np.random.default_rng(0).choice(len(xt), n_calib, replace=False)]

    def top1(m) -> float:
        s = session(m, optimize=True)
        out = np.concatenate([s.run(None, {"image": x[i : i + 500]})[0] for i in range(0, len(x), 500)])
        return float((out.argmax(1) == y).mean() * 100)

    return Task(f"fashion_mnist_{which}", model, top1, CalibrationData({"image": calib}), "top-1 %")


def ocr_task(n_test: int, n_calib: int, width: int = 320, dynamic: bool = True) -> Task:
    """PP-OCRv4 rec; `dynamic` keeps the zoo model's dynamic input ``[batch, 3, 48, width]`` (what a user prunes),
    else the input is fixed at ``1x3x48xwidth`` as bench/ocr_accuracy.py does (rows before session 23)."""
    from bench.ocr_accuracy import exact, ocr_data, recognise
    from models.zoo import zoo_model

    model, chars, test_lines, _, test_x, calib_x = ocr_data(n_test, n_calib, width)
    if dynamic:
        model = import_model(str(zoo_model("ppocrv4_rec")))
    return Task("ppocrv4_rec", model, lambda m: exact(recognise(m, test_x, chars), test_lines),
                CalibrationData({"x": calib_x}), "exact match %")


def evaluate(task: Task, fractions: list[float], patterns: list[str], repairs: list[str],
             log: Callable[[str], None] = print, allocation: str = "lamp") -> tuple[float, list[Row]]:
    """The dense accuracy and one `Row` per (fraction, pattern, repair) of `task`."""
    model = task.model
    graph = ModelGraph(model)
    params = count_params(graph)
    prunable = sum(layer.size for layer in sparse_layers(graph) if not layer.skip)
    base = task.accuracy(model)
    t = time.perf_counter()
    stats = collect_stats(model, task.calib)
    log(f"{task.name}: {params} params, {prunable} prunable ({prunable / params:.1%}); dense {task.metric} "
        f"{base:.2f}; calibration {task.calib.n} samples, statistics {time.perf_counter() - t:.1f}s")
    channel_cache: dict[int, tuple[float, str]] = {}

    def channel(keep: int) -> tuple[float, str]:
        # tile patterns land within a tile or two of the same count: one baseline per 0.2% of the parameters
        keep = int(round(keep / (0.002 * params)) * 0.002 * params)
        if keep not in channel_cache:
            best = (-1.0, "")
            for rep in ("ls", "seq"):
                cfg = PruneConfig(criterion="obs", repair=rep, allocation="lamp", round_to=1,
                                  target_params=str(keep))
                res = PrunePass(cfg, stats=stats, calib=task.calib).run(model)
                acc = task.accuracy(res.model)
                log(f"    channels obs+{rep} lamp, keep {keep} params: {acc:.2f}")
                best = max(best, (acc, rep))
            channel_cache[keep] = best
        return channel_cache[keep]

    rows = []
    for f in fractions:
        for text in patterns:
            pattern = parse_pattern(text)
            sparsity = pattern.fixed_sparsity or min(0.95, f * params / prunable)
            for rep in repairs:
                criterion = {"none": "magnitude", "bias": "magnitude", "wanda": "wanda"}.get(rep)
                repair = "none" if rep == "wanda" else rep
                cfg = SparsityConfig(sparsity=sparsity, pattern=text, criterion=criterion, repair=repair,
                                     allocation=allocation)
                t = time.perf_counter()
                result = SparsifyPass(cfg, calib=task.calib, stats=stats if repair != "seq" else None).run(model)
                sec = time.perf_counter() - t
                report = result.get(SparsityReport)
                assert report is not None
                acc = task.accuracy(result.model)
                removed = report.zeroed / params
                ch_acc, ch_rep = channel(params - report.zeroed)
                rows.append(Row(task.name, text, rep, removed, acc, ch_acc, ch_rep, sec))
                log(f"  f={removed:.3f} {text:>12} {rep:>5}: {acc:6.2f} (drop {base - acc:5.2f})  channels at equal "
                    f"non-zero params: {ch_acc:6.2f} (drop {base - ch_acc:5.2f}, {ch_rep})  [{sec:.1f}s]")
    return base, rows


def verdict(base: float, rows: list[Row], at: float = 0.5, tol: float = 0.02) -> list[str]:
    """Per pattern near `at` removed: its best repaired accuracy vs the channel baseline (the issue's bar)."""
    lines = []
    for text in dict.fromkeys(r.pattern for r in rows):
        mine = [r for r in rows if r.pattern == text and abs(r.removed - at) <= tol and r.repair != "none"]
        if not mine:
            continue
        best = max(mine, key=lambda r: r.accuracy)
        ok = best.accuracy > best.channel_accuracy
        lines.append(f"  {text:>12}: best repaired {best.accuracy:6.2f} ({best.repair}, drop {base - best.accuracy:5.2f}) "
                     f"vs channels {best.channel_accuracy:6.2f} (drop {base - best.channel_accuracy:5.2f}) -> "
                     f"{'PASS' if ok else 'FAIL'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnn,resnet,ocr")
    ap.add_argument("--fractions", default="0.5", help="fractions of all parameters removed")
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--repairs", default="none,bias,ls,seq", help="none, bias, wanda, ls, seq")
    ap.add_argument("--test", type=int, default=10000, help="Fashion-MNIST test images")
    ap.add_argument("--calib", type=int, default=256, help="calibration samples (Fashion-MNIST)")
    ap.add_argument("--ocr-test", type=int, default=200)
    ap.add_argument("--ocr-calib", type=int, default=64)
    ap.add_argument("--ocr-static", action="store_true",
                    help="fix PP-OCRv4 rec's input at 1x3x48x320 (default: keep its dynamic batch and width)")
    ap.add_argument("--allocation", default="auto", choices=("auto", "uniform", "global", "lamp"),
                    help="how the tile patterns share the sparsity among layers (the channel baseline uses lamp); "
                         "auto: lamp on Fashion-MNIST, uniform on PP-OCRv4 rec (see the module docstring)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    patterns, repairs = args.patterns.split(","), args.repairs.split(",")
    lines: list[str] = []

    def log(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    log(f"bench/sparse_accuracy.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    log(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    summary = []
    for name in args.models.split(","):
        if name in ("cnn", "resnet"):
            task = fashion_task(name, args.test, args.calib)
        elif name == "ocr":
            task = ocr_task(args.ocr_test, args.ocr_calib, dynamic=not args.ocr_static)
        else:
            raise SystemExit(f"unknown model {name!r} (cnn, resnet, ocr)")
        allocation = args.allocation if args.allocation != "auto" else AUTO_ALLOCATION[name]
        log(f"{task.name}: tile patterns share the sparsity among layers by {allocation}")
        base, rows = evaluate(task, fractions, patterns, repairs, log, allocation)
        summary.append(f"{task.name} ({task.metric}, dense {base:.2f}):")
        summary += verdict(base, rows)
        Path(args.out).write_text("\n".join(lines + ["", "verdict at 50% of the parameters removed:"] + summary) + "\n")
    log("")
    log("verdict at 50% of the parameters removed (fine-grained with its best repair vs channel pruning at equal "
        "non-zero parameters):")
    for line in summary:
        log(line)
    log(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
