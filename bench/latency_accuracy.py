"""Accuracy at equal measured latency: latency-aware vs FLOPs-based vs uniform allocation (issue 13).

    python bench/latency_accuracy.py [--models fashion_mnist_cnn,fashion_mnist_resnet,cifar_resnet20,...]
                                     [--configs calibrated,data-free,l2-bias] [--quick] [--repeat 61]
                                     [--sample-ms 20] [--timing-study]
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
* ``data-free``: the project's data-free path, ``--calib synthetic`` (inputs distilled from the model's
  BatchNorm statistics, `onnxprune.synthetic`, generated once per model with ``--synthetic-seed``), then the
  same obs + seq and the same allocations as ``calibrated``;
* ``l2-bias`` (not in the default ``--configs``): ``--criterion l2 --repair bias``; latency-aware =
  ``--target-latency Fx`` (the default allocation), FLOPs-based = ``--target-macs P% --allocation global``,
  uniform = ``--ratio R --allocation uniform`` (the data-free configuration of session 23, which collapses
  on PP-OCRv4).

Every variant uses the default ``--round-to auto`` and is pruned in this process through `PrunePass` (what
the CLI runs); the measured error curves and the (calibration or synthetic) statistics are computed once per
model and shared by its rows.

Timing (`bench/latency_accuracy_timing.py`, statistics in `bench/paired_stats.py`): onnxruntime CPU, 1 intra-op thread, batch 1,
thread CPU time, round-robin in chunks of `CHUNK` variants, each chunk with the dense model and a second
session of the dense model (the self-check: its ratio must be 1.00). Each timed sample is K back-to-back
runs, K chosen so a sample of the dense model lasts ``--sample-ms`` (a 0.2 ms Fashion-MNIST model is timed
over ~20 ms: above the timer's and the scheduler's granularity). Latency = median over rounds of (variant
sample / dense sample of the same round), reported with its spread and the median's ~95% interval (ci);
each curve is checked for monotonicity in MACs within those intervals. ``--timing-study`` also times
every model of a run twice with K = 1 (the session-23 method: one run per sample, ratio of medians) and
twice with the chosen K, and prints how well repeated timings agree under each.

Judgement: accuracy is interpolated on the FLOPs-based and uniform accuracy-vs-measured-latency curves at each
latency-aware model's measured latency, and on the latency-aware curve at each FLOPs-based model's (the bar:
latency-aware >= FLOPs-based - `TIE`, strict, unchanged; every curve starts at the dense model, 1.0x). Next
to each verdict is McNemar's exact paired test on the per-image correctness (`paired_stats.mcnemar`) and a
column "significant" (p < 0.05): whether the difference is beyond the test set's sampling noise. An
interpolated accuracy has no per-image vector: the test uses the nearer of the two measured models bracketing
it on its curve (named in the line). The bar "auto rounding is never slower than unrounded" is checked on
the same run: plain ``--ratio R`` (l2 + bias, cheap and data-free) with the default ``--round-to auto`` and
with ``--round-to 1``, timed in the same rounds.

The load average is recorded before and after each model (other agents may load the machine: only ratios of
interleaved timings are compared). Results are written after each model to ``--out``.txt / .json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
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

from bench.latency_accuracy_tables import KINDS, model_lines, summary_lines
from bench.latency_accuracy_timing import runs_per_sample, time_all, timing_study
from bench.machine import load
from bench.paired_stats import pack
from onnxprune.calibration import CalibrationData, collect_stats, load_calib
from onnxprune.errors import OnnxPruneError
from onnxprune.importer import import_model
from onnxprune.latency.backend import OrtBackend
from onnxprune.latency.measure import static_inputs
from onnxprune.passes import select as select_pass
from onnxprune.passes.pruning import PruneConfig, PrunePass


@dataclass
class Subject:
    """A model with its data: `score(model)` is its per-example correctness on the test set (the accuracy
    metric, %, is its mean x 100)."""

    name: str
    model: onnx.ModelProto
    calib: CalibrationData
    score: Callable[[onnx.ModelProto], np.ndarray]
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
    correct: np.ndarray | None = None  # per test example
    extra: dict = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"config": self.config, "kind": self.kind, "setting": self.setting, "error": self.error,
                "latency_fraction": self.latency, "spread": self.spread, "accuracy": self.accuracy,
                "macs_reduction": self.macs_reduction, "prune_s": round(self.seconds, 1),
                "cli_latency": self.cli_latency,
                "correct": pack(self.correct) if self.correct is not None else None, **self.extra}  # fmt: skip


# ------------------------------------------------------------------------------------------------ models


def _top1(
    images: np.ndarray, labels: np.ndarray, batch: int = 500
) -> Callable[[onnx.ModelProto], np.ndarray]:
    def score(model: onnx.ModelProto) -> np.ndarray:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        fixed = sess.get_inputs()[0].shape[0]
        step = fixed if isinstance(fixed, int) else batch
        logits = np.concatenate(
            [sess.run(None, {name: images[i : i + step]})[0] for i in range(0, len(images), step)]
        )
        return logits.argmax(1) == labels

    return score


def fashion(name: str, quick: bool) -> Subject:
    from models.fashion_mnist import load_fashion_mnist

    model = import_model(str(ROOT / "models" / f"{name}.onnx"))
    train, _ = load_fashion_mnist("train")
    test, labels = load_fashion_mnist("test")
    n = 2000 if quick else len(test)
    name_in = model.graph.input[0].name
    return Subject(
        name,
        model,
        CalibrationData({name_in: train[:256]}),
        _top1(test[:n], labels[:n]),
        f"top-1 on {n} test images",
    )


def cifar(name: str, quick: bool) -> Subject:
    from models.cifar_resnet import load_cifar10
    from models.zoo import zoo_model

    model = import_model(str(zoo_model(name)))
    test, labels = load_cifar10("test", n=2000 if quick else None)
    calib, _ = load_cifar10("calib", n=128)
    return Subject(
        name,
        model,
        CalibrationData({model.graph.input[0].name: calib}),
        _top1(test, labels),
        f"top-1 on {len(test)} test images",
    )


def ocr(name: str, quick: bool) -> Subject:
    from bench.ocr_accuracy import ocr_data, recognise

    model, chars, test_lines, _, test_x, calib_x = ocr_data(100 if quick else 200, 64, 320)

    def score(m: onnx.ModelProto) -> np.ndarray:
        return np.array([p == t for p, t in zip(recognise(m, test_x, chars), test_lines)])

    return Subject(
        name,
        model,
        CalibrationData({"x": calib_x}),
        score,
        f"exact match on {len(test_lines)} rendered lines",
    )


LOADERS: dict[str, Callable[[str, bool], Subject]] = {
    "fashion_mnist_cnn": fashion,
    "fashion_mnist_resnet": fashion,
    "cifar_resnet20": cifar,
    "cifar_resnet44": cifar,
    "ppocrv4_rec": ocr,
}

# config -> (criterion, repair, data, latency-aware allocation, FLOPs-based allocation); data: "calib" (the
# calibration images), "synthetic" (--calib synthetic) or None (data-free by construction)
CONFIGS: dict[str, tuple[str, str, str | None, str | None, str]] = {
    "calibrated": ("obs", "seq", "calib", "knapsack", "knapsack"),
    "data-free": ("obs", "seq", "synthetic", "knapsack", "knapsack"),
    "l2-bias": ("l2", "bias", None, None, "global"),
}
ROUNDING_CONFIG = "l2-bias"  # the auto-vs-unrounded bar: plain --ratio R, cheap


def settings(quick: bool) -> dict[str, list[str]]:
    if quick:
        return {
            "latency-aware": ["0.8", "0.6"],
            "FLOPs-based": ["85", "65", "45"],
            "uniform": ["0.1", "0.3", "0.5"],
        }
    return {
        "latency-aware": ["0.95", "0.85", "0.7", "0.55"],
        "FLOPs-based": ["90", "70", "50", "35"],
        "uniform": ["0.1", "0.2", "0.35", "0.5"],
    }


# ------------------------------------------------------------------------------------------------ pruning


class SharedCurves:
    """Memoises `select.measure_sensitivity` per (model, criterion, repair, allocation): the error curves are
    measured once per model and shared by its rows (as the calibration statistics are)."""

    def __init__(self) -> None:
        self.original = select_pass.measure_sensitivity
        self.found: dict[tuple, Any] = {}
        self.subject = ""
        self.data: str | None = None  # calib | synthetic | None: curves measured on other inputs differ

    def __call__(self, config: PruneConfig, analysis, stats, calib):
        key = (self.subject, self.data, config.criterion, config.repair, config.allocation_name)
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
        return PruneConfig(
            target_latency=f"{setting}x", allocation=latency_allocation, round_to="auto", **common
        )
    if kind == "FLOPs-based":
        return PruneConfig(target_macs=f"{setting}%", allocation=flops_allocation, round_to="auto", **common)
    if kind == "uniform":
        return PruneConfig(ratio=float(setting), allocation="uniform", round_to="auto", **common)
    return PruneConfig(
        ratio=float(setting), round_to="auto" if kind == "auto" else 1, **common
    )  # the rounding bar


def prune(
    subject: Subject, variant: Variant, cache: Path, inputs: dict[str, tuple], curves: SharedCurves
) -> None:
    """Prune `variant` in this process; `inputs`: data kind -> (CalibrationData, statistics) (shared per model)."""
    data = CONFIGS[variant.config][2]
    calib, stats = inputs.get(data, (None, None)) if data else (None, None)
    curves.data = data
    cfg = config_for(variant.config, variant.kind, variant.setting, cache)
    t = time.perf_counter()
    try:
        res = PrunePass(cfg, calib=calib, stats=stats).run(subject.model)
    except OnnxPruneError as e:
        variant.error = str(e).splitlines()[0][:200]
        return
    variant.seconds = time.perf_counter() - t
    s = res.info["summary"]
    variant.model = res.model
    variant.extra["graph_sha"] = hashlib.sha256(res.model.graph.SerializeToString()).hexdigest()[:16]
    # kept channels per group: which groups a plan cut (session 25: plans move with the latency table)
    variant.extra["kept"] = {str(k): int(n) for k, n in res.info["plan"].kept(res.info["analysis"]).items()}
    variant.cli_latency = s.get("latency")
    variant.macs_reduction = s["macs_before"] / max(s["macs_after"], 1)


def table_record(model: onnx.ModelProto, cache: Path) -> dict[str, Any]:
    """Per group, the auto grid's kept counts and the ms the latency table (read from `cache`) predicts saved at
    each: plans follow the table, which moves between builds (session 25: 0.019-0.036 ms for one R20 step)."""
    from onnxprune.channels import analyze
    from onnxprune.graph import ModelGraph
    from onnxprune.passes.latency_select import latency_grid

    try:
        analysis = analyze(ModelGraph(model))
        grid, table, _ = latency_grid(PruneConfig(round_to="auto", latency_cache=str(cache)), analysis)
    except OnnxPruneError as e:
        return {"error": str(e).splitlines()[0][:200]}
    if table is None:
        return {}
    groups = {}
    for g in analysis.groups:
        counts = [int(c) for c in (grid or {}).get(g.id, ())]
        if g.id in table.curves:
            groups[str(g.id)] = {"kept": counts,
                                 "saved_ms": [round(table.at(g.id, g.size) - table.at(g.id, c), 5) for c in counts]}
    return {"dense_ms": round(table.dense_ms, 5), "groups": groups}


# ------------------------------------------------------------------------------------------------ tables


def write(out: Path, args: argparse.Namespace, results: list[dict], started: float) -> str:
    command = getattr(args, "command", None) or " ".join(sys.argv[1:])
    lines = [
        f"bench/latency_accuracy.py {command}".rstrip(),
        "Accuracy at equal measured latency (onnxruntime CPU, 1 intra-op thread, batch 1, interleaved; "
        f"{'wall-clock' if args.wall else 'thread CPU time'}; latency = median over rounds of pruned / dense "
        "sample of the same round)",
        "",
    ]
    for res in results:
        lines += model_lines(res)[0] + [""]
    lines += summary_lines(results)
    if not getattr(args, "render", None):  # a re-render has no run time of its own
        lines.append(f"total {time.time() - started:.0f} s")
    text = "\n".join(lines)
    out.with_suffix(".txt").write_text(text + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({"args": vars(args), "command": command, "results": results}, indent=1)
    )
    return text


# ------------------------------------------------------------------------------------------------ main


def run_model(name: str, args: argparse.Namespace, cache: Path, curves: SharedCurves) -> dict:
    from onnxprune.progress import task

    load_before = load()
    subject = LOADERS[name](name, args.quick)
    curves.subject = name
    dense_correct = subject.score(subject.model)
    extra: dict[str, Any] = {}
    plan = settings(args.quick)
    variants = [Variant(c, kind, s) for c in args.configs for kind in KINDS for s in plan[kind]]
    variants += [Variant(ROUNDING_CONFIG, kind, r) for r in args.rounding for kind in ("auto", "round-to-1")]
    needed = {CONFIGS[v.config][2] for v in variants}
    inputs: dict[str, tuple] = {}
    if "calib" in needed:
        inputs["calib"] = (subject.calib, collect_stats(subject.model, subject.calib, hessian=True))
    if "synthetic" in needed:  # the project's data-free path, once per model (as the calibration statistics)
        t = time.perf_counter()
        spec = "synthetic" if args.synthetic == 0 else f"synthetic:{args.synthetic}"
        syn = load_calib(spec, subject.model, seed=args.synthetic_seed)
        inputs["synthetic"] = (syn, collect_stats(subject.model, syn, hessian=True))
        extra.update(
            synthetic_s=time.perf_counter() - t, synthetic_n=int(next(iter(syn.arrays.values())).shape[0])
        )
    extra["latency_table"] = table_record(subject.model, cache)
    with task(f"{name}: pruning", total=len(variants)) as progress:
        for v in variants:
            prune(subject, v, cache, inputs, curves)
            progress.advance()
    runs = args.runs_per_sample or runs_per_sample(
        static_inputs(subject.model, None), OrtBackend(threads=1), args.sample_ms
    )
    if args.timing_study:
        extra["timing_study"] = timing_study(subject.model, variants, args.repeat, runs)
    timing = time_all(subject.model, variants, args.repeat, runs, args.wall)
    timing.pop("found")
    with task(f"{name}: accuracy", total=len(variants)) as progress:
        for v in variants:
            if v.model is not None:
                v.correct = subject.score(v.model)
                v.accuracy = float(v.correct.mean() * 100)
            progress.advance()
    return {
        "model": name,
        "metric": subject.metric,
        "dense": float(dense_correct.mean() * 100),
        "n_test": int(dense_correct.size),
        "dense_correct": pack(dense_correct),
        "repeat": args.repeat,
        "load_before": load_before,
        "load_after": load(),
        "timing": timing,
        **extra,
        "records": [v.record() for v in variants],
    }


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cifar_resnet20,fashion_mnist_cnn,fashion_mnist_resnet,cifar_resnet44")
    p.add_argument("--configs", default="calibrated,data-free")
    p.add_argument("--rounding", default="0.3,0.5", help="ratios of the auto-vs-unrounded bar ('' to skip)")
    p.add_argument("--repeat", type=int, default=61, help="round-robin rounds when timing")
    p.add_argument(
        "--sample-ms",
        type=float,
        default=20.0,
        help="each timed sample is K back-to-back runs, K chosen so the dense model's sample lasts this",
    )
    p.add_argument("--runs-per-sample", type=int, default=0, help="K itself (0: from --sample-ms)")
    p.add_argument(
        "--timing-study",
        action="store_true",
        help="also time everything twice with K=1 (session 23) and twice with K, and compare",
    )
    p.add_argument(
        "--synthetic", type=int, default=0, help="--calib synthetic:N for data-free (0: the default plan)"
    )
    p.add_argument("--synthetic-seed", type=int, default=0)
    p.add_argument(
        "--wall", action="store_true", help="time by wall clock (default: thread CPU time, robust to load)"
    )
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
        args.command = data.get("command")  # the run's own command line in the header
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
                print(
                    f"{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
                    flush=True,
                )
                continue
            print("\n".join(model_lines(results[-1])[0]), flush=True)
            write(out, args, results, started)
    print(write(out, args, results, started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
