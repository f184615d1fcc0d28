"""Accuracy at equal measured latency: latency-aware vs FLOPs-based vs uniform allocation (issue 13).

    python bench/latency_accuracy.py [--models fashion_mnist_cnn,fashion_mnist_resnet,cifar_resnet20,...]
                                     [--configs calibrated,data-free] [--quick] [--repeat 31]
                                     [--out bench/latency_accuracy_results]

Models (real data, real labels): the two bundled Fashion-MNIST models (`models/fashion_mnist.py`, Debian
package dataset-fashion-mnist; all 10,000 test images, calibration: 256 training images), the pretrained
CIFAR-10 ResNet20/44 (`models/cifar_resnet.py`, ``../shared/datasets``; all 10,000 test images, calibration:
a stratified 128 of ``calib_train2000.npz``), and PP-OCRv4 rec (`bench/ocr_accuracy.py`: exact-match rate on
rendered text lines) when named in ``--models``.

Each model is pruned three ways, each with the repair a user would use (``--configs``):

* ``calibrated``: ``--criterion obs --repair seq --calib ...``; latency-aware = ``--target-latency Fx
  --allocation knapsack`` (measured error per millisecond saved, `onnxprune.latency_allocation`),
  FLOPs-based = ``--target-macs P% --allocation knapsack`` (the same measured error curves per MAC),
  uniform = ``--ratio R --allocation uniform``;
* ``data-free``: ``--criterion l2 --repair bias``; latency-aware = ``--target-latency Fx`` (the default
  allocation: the share of each group's squared scores removed per millisecond saved), FLOPs-based =
  ``--target-macs P% --allocation global``, uniform = ``--ratio R --allocation uniform``.

Every variant uses the default ``--round-to auto`` and is pruned in this process through `PrunePass` (what
the CLI runs); the measured error curves and the calibration statistics are computed once per model and
shared by its rows. Then the dense model and all variants are timed on onnxruntime CPU, 1 intra-op thread,
batch 1, round-robin (`OrtBackend.time_models`: every round runs each model once, in chunks of `CHUNK`
variants each timed with the dense model), and latency = pruned median / dense median of the same rounds.
Accuracy is interpolated on the FLOPs-based and uniform accuracy-vs-measured-latency curves at each
latency-aware model's measured latency, and on the latency-aware curve at each FLOPs-based model's (the bar:
latency-aware >= FLOPs-based - `TIE`; every curve starts at the dense model, 1.0x). The bar "auto rounding
is never slower than unrounded" is checked on the same models: plain ``--ratio R`` (data-free config) with
the default ``--round-to auto`` and with ``--round-to 1``, timed in the same rounds.

The load average is recorded before and after each model (other agents may load the machine: only ratios of
interleaved timings are compared). Results are written after each model to ``--out``.txt / .json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxprune.calibration import CalibrationData, collect_stats
from onnxprune.errors import OnnxPruneError
from onnxprune.importer import import_model
from onnxprune.latency.backend import OrtBackend, random_feeds
from onnxprune.latency.measure import static_inputs
from onnxprune.latency.timing import Timing
from onnxprune.passes import select as select_pass
from onnxprune.passes.pruning import PruneConfig, PrunePass

CHUNK = 8  # variants timed per round-robin (plus the dense model): bounded memory, shared drift
KINDS = ("latency-aware", "FLOPs-based", "uniform")
TIE = 0.1  # points of accuracy counted as equal in the bar (10 of 10,000 test images)


@dataclass
class Subject:
    """A model with its data: `score(model)` is its accuracy metric (%) on the test set."""

    name: str
    model: onnx.ModelProto
    calib: CalibrationData
    score: Callable[[onnx.ModelProto], float]
    metric: str


@dataclass
class Variant:
    config: str
    kind: str  # latency-aware | FLOPs-based | uniform | auto | round-to-1
    setting: str
    model: onnx.ModelProto | None = None
    error: str = ""
    cli_latency: dict | None = None
    macs_reduction: float = 1.0
    seconds: float = 0.0
    latency: float = float("nan")  # pruned / dense, measured interleaved
    spread: float = float("nan")
    accuracy: float = float("nan")
    extra: dict = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"config": self.config, "kind": self.kind, "setting": self.setting, "error": self.error,
                "latency_fraction": self.latency, "spread": self.spread, "accuracy": self.accuracy,
                "macs_reduction": self.macs_reduction, "prune_s": round(self.seconds, 1),
                "cli_latency": self.cli_latency, **self.extra}  # fmt: skip


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} cpus)"


# ------------------------------------------------------------------------------------------------ models


def _top1(images: np.ndarray, labels: np.ndarray, batch: int = 500) -> Callable[[onnx.ModelProto], float]:
    def score(model: onnx.ModelProto) -> float:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        fixed = sess.get_inputs()[0].shape[0]
        step = fixed if isinstance(fixed, int) else batch
        logits = np.concatenate([sess.run(None, {name: images[i : i + step]})[0] for i in range(0, len(images), step)])
        return float((logits.argmax(1) == labels).mean() * 100)

    return score


def fashion(name: str, quick: bool) -> Subject:
    from models.fashion_mnist import load_fashion_mnist

    model = import_model(str(ROOT / "models" / f"{name}.onnx"))
    train, _ = load_fashion_mnist("train")
    test, labels = load_fashion_mnist("test")
    n = 2000 if quick else len(test)
    name_in = model.graph.input[0].name
    return Subject(name, model, CalibrationData({name_in: train[:256]}), _top1(test[:n], labels[:n]),
                   f"top-1 on {n} test images")


def cifar(name: str, quick: bool) -> Subject:
    from models.cifar_resnet import load_cifar10
    from models.zoo import zoo_model

    model = import_model(str(zoo_model(name)))
    test, labels = load_cifar10("test", n=2000 if quick else None)
    calib, _ = load_cifar10("calib", n=128)
    return Subject(name, model, CalibrationData({model.graph.input[0].name: calib}), _top1(test, labels),
                   f"top-1 on {len(test)} test images")


def ocr(name: str, quick: bool) -> Subject:
    from bench.ocr_accuracy import exact, ocr_data, recognise

    model, chars, test_lines, _, test_x, calib_x = ocr_data(100 if quick else 200, 64, 320)

    def score(m: onnx.ModelProto) -> float:
        return exact(recognise(m, test_x, chars), test_lines)

    return Subject(name, model, CalibrationData({"x": calib_x}), score,
                   f"exact match on {len(test_lines)} rendered lines")


LOADERS: dict[str, Callable[[str, bool], Subject]] = {
    "fashion_mnist_cnn": fashion, "fashion_mnist_resnet": fashion, "cifar_resnet20": cifar,
    "cifar_resnet44": cifar, "ppocrv4_rec": ocr,
}

# config -> (criterion, repair, calibrated, latency-aware allocation, FLOPs-based allocation)
CONFIGS: dict[str, tuple[str, str, bool, str | None, str]] = {
    "calibrated": ("obs", "seq", True, "knapsack", "knapsack"),
    "data-free": ("l2", "bias", False, None, "global"),
}
LABELS = {"calibrated": "obs + seq (calibrated), knapsack curves", "data-free": "l2 + bias (data-free)"}


def settings(quick: bool) -> dict[str, list[str]]:
    if quick:
        return {"latency-aware": ["0.8", "0.6"], "FLOPs-based": ["85", "65", "45"], "uniform": ["0.1", "0.3", "0.5"]}
    return {"latency-aware": ["0.95", "0.85", "0.7", "0.55"], "FLOPs-based": ["90", "70", "50", "35"],
            "uniform": ["0.1", "0.2", "0.35", "0.5"]}


# ------------------------------------------------------------------------------------------------ pruning


class SharedCurves:
    """Memoises `select.measure_sensitivity` per (model, criterion, repair, allocation): the error curves are
    measured once per model and shared by its rows (as the calibration statistics are)."""

    def __init__(self) -> None:
        self.original = select_pass.measure_sensitivity
        self.found: dict[tuple, Any] = {}
        self.subject = ""

    def __call__(self, config: PruneConfig, analysis, stats, calib):
        key = (self.subject, config.criterion, config.repair, config.allocation_name)
        if key not in self.found:
            self.found[key] = self.original(config, analysis, stats, calib)
        return self.found[key]

    def __enter__(self) -> SharedCurves:
        select_pass.measure_sensitivity = self  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        select_pass.measure_sensitivity = self.original  # type: ignore[assignment]


def config_for(config: str, kind: str, setting: str, cache: Path) -> PruneConfig:
    criterion, repair, _, latency_allocation, flops_allocation = CONFIGS[config]
    common: dict[str, Any] = {"criterion": criterion, "repair": repair, "latency_cache": str(cache)}
    if kind == "latency-aware":
        return PruneConfig(target_latency=f"{setting}x", allocation=latency_allocation, round_to="auto", **common)
    if kind == "FLOPs-based":
        return PruneConfig(target_macs=f"{setting}%", allocation=flops_allocation, round_to="auto", **common)
    if kind == "uniform":
        return PruneConfig(ratio=float(setting), allocation="uniform", round_to="auto", **common)
    return PruneConfig(ratio=float(setting), round_to="auto" if kind == "auto" else 1, **common)  # the rounding bar


def prune(subject: Subject, variant: Variant, cache: Path, stats) -> None:
    _, _, calibrated, _, _ = CONFIGS[variant.config]
    cfg = config_for(variant.config, variant.kind, variant.setting, cache)
    t = time.perf_counter()
    try:
        res = PrunePass(cfg, calib=subject.calib if calibrated else None,
                        stats=stats if calibrated else None).run(subject.model)
    except OnnxPruneError as e:
        variant.error = str(e).splitlines()[0][:200]
        return
    variant.seconds = time.perf_counter() - t
    s = res.info["summary"]
    variant.model = res.model
    variant.extra["graph_sha"] = hashlib.sha256(res.model.graph.SerializeToString()).hexdigest()[:16]
    variant.cli_latency = s.get("latency")
    variant.macs_reduction = s["macs_before"] / max(s["macs_after"], 1)


def cpu_timed(models: list[onnx.ModelProto], backend: OrtBackend, repeat: int, warmup: int = 5) -> list[Timing]:
    """Thread CPU time of each run, round-robin (1 intra-op thread: onnxruntime runs on the calling thread),
    so time the scheduler gives other processes is not counted (as `bench/latency_predict.cpu_timed`)."""
    runs = [(backend.session(m), random_feeds(m, seed=k)) for k, m in enumerate(models)]
    seconds: list[list[float]] = [[] for _ in models]
    for r in range(warmup + repeat):
        for i in [*range(r % len(runs), len(runs)), *range(r % len(runs))]:  # order rotated every round
            sess, feeds = runs[i]
            start = time.thread_time()
            sess.run(None, feeds)
            if r >= warmup:
                seconds[i].append(time.thread_time() - start)
    return [Timing.of(x) for x in seconds]


def time_all(dense: onnx.ModelProto, variants: list[Variant], repeat: int, wall: bool = False) -> None:
    """Latency of every variant / the dense model's, timed round-robin with it in chunks of `CHUNK` (thread
    CPU time medians; `wall`: wall-clock medians, for a quiet machine)."""
    backend = OrtBackend(threads=1)
    ready = [v for v in variants if v.model is not None]
    fixed = static_inputs(dense, None)
    for start in range(0, len(ready), CHUNK):
        chunk = ready[start : start + CHUNK]
        models = [fixed, *(static_inputs(v.model, None) for v in chunk)]
        timings = (backend.time_models(models, warmup=5, repeat=repeat) if wall
                   else cpu_timed(models, backend, repeat))
        for v, t in zip(chunk, timings[1:]):
            v.latency = t.median_ms / timings[0].median_ms
            v.spread = max(t.spread, timings[0].spread)


# ------------------------------------------------------------------------------------------------ tables


def curve_at(records: list[dict], config: str, kind: str, latency: float, dense: float) -> float | None:
    """Accuracy of `kind`'s accuracy-vs-measured-latency curve at `latency` (None outside its range); every
    curve starts at the dense model (1.0x, `dense`): pruning nothing is a point of every allocation."""
    points = sorted([(1.0, dense)] + [(r["latency_fraction"], r["accuracy"]) for r in records
                                      if r["config"] == config and r["kind"] == kind
                                      and np.isfinite(r["latency_fraction"])])
    if len(points) < 2 or not points[0][0] <= latency <= points[-1][0]:
        return None
    lat, acc = zip(*points)
    return float(np.interp(latency, lat, acc))


def model_lines(result: dict) -> tuple[list[str], list[dict]]:
    """The text of one model's results, and its equal-latency comparisons (for the bar)."""
    records = result["records"]
    lines = [f"{result['model']}: dense {result['metric']} {result['dense']:.2f}%  ({result['load_before']}; "
             f"after: {result['load_after']})"]
    comparisons: list[dict] = []
    for config in dict.fromkeys(r["config"] for r in records if r["kind"] in KINDS):
        lines.append(f"  {LABELS[config]}:")
        lines.append(f"    {'kind':<14} {'setting':>8} {'latency':>8} {'spread':>7} {'MACs /':>7} {'acc':>7}")
        for r in (x for x in records if x["config"] == config and x["kind"] in KINDS):
            if r["error"]:
                lines.append(f"    {r['kind']:<14} {r['setting']:>8}  {r['error']}")
                continue
            lines.append(f"    {r['kind']:<14} {r['setting']:>8} {r['latency_fraction']:>7.3f}x {r['spread']:>7.2f} "
                         f"{r['macs_reduction']:>7.2f} {r['accuracy']:>6.2f}%")  # fmt: skip
        lines.append("    at equal measured latency (FLOPs-based / uniform interpolated on their curves):")
        for r in (x for x in records if x["config"] == config and x["kind"] == "latency-aware" and not x["error"]):
            flops = curve_at(records, config, "FLOPs-based", r["latency_fraction"], result["dense"])
            uniform = curve_at(records, config, "uniform", r["latency_fraction"], result["dense"])
            cells = [f"latency-aware {r['accuracy']:.2f}%",
                     f"FLOPs-based {flops:.2f}%" if flops is not None else "FLOPs-based - (outside its range)",
                     f"uniform {uniform:.2f}%" if uniform is not None else "uniform - (outside its range)"]
            verdict = "" if flops is None else ("  PASS" if r["accuracy"] >= flops - TIE else "  FAIL")
            lines.append(f"      {r['latency_fraction']:.3f}x: " + ", ".join(cells) + verdict)
            comparisons.append({"model": result["model"], "config": config, "latency": r["latency_fraction"],
                                "latency_aware": r["accuracy"], "flops": flops, "uniform": uniform})
        lines.append("    and at each FLOPs-based model's measured latency (latency-aware interpolated on its curve):")
        for r in (x for x in records if x["config"] == config and x["kind"] == "FLOPs-based" and not x["error"]):
            aware = curve_at(records, config, "latency-aware", r["latency_fraction"], result["dense"])
            if aware is None:
                lines.append(f"      {r['latency_fraction']:.3f}x: FLOPs-based {r['accuracy']:.2f}%, latency-aware - "
                             "(outside its range)")
                continue
            lines.append(f"      {r['latency_fraction']:.3f}x: FLOPs-based {r['accuracy']:.2f}%, latency-aware "
                         f"{aware:.2f}%  {'PASS' if aware >= r['accuracy'] - TIE else 'FAIL'}")
            comparisons.append({"model": result["model"], "config": config, "latency": r["latency_fraction"],
                                "latency_aware": aware, "flops": r["accuracy"], "uniform": None})
    rounds = int(result.get("repeat", 101))
    bar = [r for r in records if r["kind"] in ("auto", "round-to-1") and not r["error"]]
    if bar:
        lines.append("  rounding (plain --ratio R, l2 + bias): latency auto vs --round-to 1, same rounds")
        for ratio in dict.fromkeys(r["setting"] for r in bar):
            pair = {r["kind"]: r for r in bar if r["setting"] == ratio}
            if len(pair) == 2:
                a, one = pair["auto"], pair["round-to-1"]
                if a.get("graph_sha") and a.get("graph_sha") == one.get("graph_sha"):
                    lines.append(f"    ratio {ratio}: auto wrote the --round-to 1 model itself (same graph and "
                                 f"weights; measured {a['latency_fraction']:.3f}x vs {one['latency_fraction']:.3f}x: "
                                 "the timing noise)  PASS")  # fmt: skip
                    continue
                # noise: the median's standard error is ~0.93 x IQR / sqrt(rounds) per model; 2 sigma of the ratio
                margin = max(0.03, 2 * 0.93 * math.sqrt(2) * max(a["spread"], one["spread"]) / math.sqrt(rounds))
                ok = a["latency_fraction"] <= one["latency_fraction"] * (1 + margin)
                lines.append(f"    ratio {ratio}: auto {a['latency_fraction']:.3f}x (MACs /{a['macs_reduction']:.2f}, "
                             f"{a['accuracy']:.2f}%), round-to 1 {one['latency_fraction']:.3f}x (MACs /"
                             f"{one['macs_reduction']:.2f}, {one['accuracy']:.2f}%)  "
                             f"{'PASS' if ok else 'FAIL'} (auto <= unrounded x {1 + margin:.3f}, the timing noise)")  # fmt: skip
    return lines, comparisons


def summary_lines(results: list[dict]) -> list[str]:
    comparisons = [c for res in results for c in model_lines(res)[1] if c["flops"] is not None]
    if not comparisons:
        return []
    lines = []
    for config in dict.fromkeys(c["config"] for c in comparisons):
        mine = [c for c in comparisons if c["config"] == config]
        wins = sum(c["latency_aware"] >= c["flops"] - TIE for c in mine)
        mean = float(np.mean([c["latency_aware"] - c["flops"] for c in mine]))
        worst = min(mine, key=lambda c: c["latency_aware"] - c["flops"])
        lines.append(f"bar, {LABELS[config]} (latency-aware >= FLOPs-based - {TIE} pt at equal measured latency): "
                     f"{wins}/{len(mine)}; mean difference {mean:+.2f} pt; worst "
                     f"{worst['latency_aware'] - worst['flops']:+.2f} pt ({worst['model']}, {worst['latency']:.3f}x)")
    return lines


def write(out: Path, args: argparse.Namespace, results: list[dict], started: float) -> str:
    lines = [f"bench/latency_accuracy.py {' '.join(sys.argv[1:])}".rstrip(),
             "Accuracy at equal measured latency (onnxruntime CPU, 1 intra-op thread, batch 1, interleaved; "
             f"{'wall-clock' if args.wall else 'thread CPU time'} medians)", ""]
    for res in results:
        lines += model_lines(res)[0] + [""]
    lines += summary_lines(results)
    lines.append(f"total {time.time() - started:.0f} s")
    text = "\n".join(lines)
    out.with_suffix(".txt").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return text


# ------------------------------------------------------------------------------------------------ main


def run_model(name: str, args: argparse.Namespace, cache: Path, curves: SharedCurves) -> dict:
    from onnxprune.progress import task

    load_before = load()
    subject = LOADERS[name](name, args.quick)
    curves.subject = name
    dense_score = subject.score(subject.model)
    stats = collect_stats(subject.model, subject.calib, hessian=True)
    plan = settings(args.quick)
    variants = [Variant(c, kind, s) for c in args.configs for kind in KINDS for s in plan[kind]]
    variants += [Variant("data-free", kind, r) for r in args.rounding for kind in ("auto", "round-to-1")]
    with task(f"{name}: pruning", total=len(variants)) as progress:
        for v in variants:
            prune(subject, v, cache, stats)
            progress.advance()
    time_all(subject.model, variants, args.repeat, args.wall)
    with task(f"{name}: accuracy", total=len(variants)) as progress:
        for v in variants:
            if v.model is not None:
                v.accuracy = subject.score(v.model)
            progress.advance()
    return {"model": name, "metric": subject.metric, "dense": dense_score, "repeat": args.repeat, "load_before": load_before,
            "load_after": load(), "records": [v.record() for v in variants]}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cifar_resnet20,fashion_mnist_cnn,fashion_mnist_resnet,cifar_resnet44")
    p.add_argument("--configs", default="calibrated,data-free")
    p.add_argument("--rounding", default="0.3,0.5", help="ratios of the auto-vs-unrounded bar ('' to skip)")
    p.add_argument("--repeat", type=int, default=101, help="round-robin rounds when timing")
    p.add_argument("--wall", action="store_true", help="time by wall clock (default: thread CPU time, robust to load)")
    p.add_argument("--quick", action="store_true", help="fewer settings, 2000 test images")
    p.add_argument("--cache", default=None, help="latency table cache folder (default: the user cache)")
    p.add_argument("--out", default=str(ROOT / "bench" / "latency_accuracy_results"))
    p.add_argument("--render", metavar="RESULTS.json", help="re-write the text of an earlier run and exit")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.configs = [c for c in args.configs.split(",") if c]
    args.rounding = [r for r in args.rounding.split(",") if r]
    for m in args.models:
        if m not in LOADERS:
            p.error(f"unknown model {m} (choose from {', '.join(LOADERS)})")
    for c in args.configs:
        if c not in CONFIGS:
            p.error(f"unknown config {c} (choose from {', '.join(CONFIGS)})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from onnxprune.latency.table import default_cache_dir

    args = parse(argv)
    started = time.time()
    if args.render:  # re-write the text of an earlier run from its JSON
        data = json.loads(Path(args.render).read_text())
        print(write(Path(args.render).with_suffix(""), args, data["results"], started))
        return 0
    cache = Path(args.cache) if args.cache else default_cache_dir()
    out = Path(args.out)
    results: list[dict] = []
    with SharedCurves() as curves:
        for name in args.models:
            try:
                results.append(run_model(name, args, cache, curves))
            except Exception as e:  # a missing dataset or model skips that model, the others still run
                print(f"{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
                      flush=True)
                continue
            print("\n".join(model_lines(results[-1])[0]), flush=True)
            write(out, args, results, started)
    print(write(out, args, results, started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
