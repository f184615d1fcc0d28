"""Unconstrained pruning (UPSCALE) benchmark: latency of the exports, copy ops, and accuracy.

    python bench/unconstrained.py [--ratio 0.5] [--union-cap 1.125] [--tune 20] [--threads 1]
                                  [--only resnet50] [--skip-accuracy] [--skip-latency]

Latency: onnxruntime CPU (graph optimisations on, as deployed; one intra-op thread by default, which is
least disturbed by other load on the machine), batch 1, the median of many runs, all exports of one
model measured in the same process and interleaved round by round:
  dense, constrained (`PrunePass`),
  naive            UPSCALE's naive export: original channel order, each writer's channels scattered into
                   a zero stream (ConstantOfShape + ScatterND), each reader's subset gathered (Gather);
  naive-padgather  the same with a cheaper scatter (Pad one zero channel, then Gather);
  costmodel        reordered export, copy-or-absorb per unit by the fitted `CostModel` alone;
  reordered        reordered export, layout kept by measured tuning (`UnconstrainedConfig.tune`).
The four unconstrained exports share one plan at the same ratio as constrained pruning (each layer keeps
as many channels as constrained keeps per group: equal nonzero parameters; stored parameters include
the zero rows/columns of absorbed copies and are printed). `--union-cap` bounds each stream to that many
times the per-layer kept channels (0: unbounded, UPSCALE's setting; `--share` blends rankings instead).
Models come from `models/zoo.py` (random-weight torchvision exports); without it they are exported here.

Exactness: every unconstrained export is compared with the per-layer masked original in onnxruntime with
optimisations off (max relative error printed; must be <= 1e-5).

Accuracy (`accuracy`, `verdicts`): the two bundled trained Fashion-MNIST models (the CNN: one residual Add
and one Concat; the ResNet: three residual streams with three writers each) on the 10k test set,
constrained vs unconstrained at equal nonzero parameter counts (each method's ratio searched), same
criterion, with and without the calibrated mean repair; one verdict line per model/criterion/removal/
repair for the chosen unconstrained configuration (`ACCURACY_DEFAULT`), then for the unbounded union
and for ``drive="free"`` (every unit its own top-k, the mode before `UnconstrainedConfig.drive`).

    python bench/unconstrained.py --skip-latency [--removals 0.1 0.2 0.3 0.4] [--criteria l1 bn]
                                  [--accuracy-models fashion_mnist_resnet] [--drive reader]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from onnxprune.graph import ModelGraph
from onnxprune.importer import import_model
from onnxprune.metrics import count_params
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.passes.unconstrained import UnconstrainedPass
from onnxprune.upscale.config import UnconstrainedConfig
from onnxprune.upscale.costmodel import CostModel, deployed_session
from onnxprune.upscale.oracle import mask_model
from onnxprune.upscale.report import copy_report, effective_params
from onnxprune.verify import random_inputs, run

MODELS = ("resnet50", "densenet121", "mobilenet_v2", "efficientnet_b0")


def model_path(name: str) -> Path:
    try:
        from models.zoo import zoo_model
    except ImportError:
        return _export_here(name)
    return zoo_model(name)


def _export_here(name: str) -> Path:
    """Fallback without models/zoo.py: export the torchvision model (random weights) to a temp cache."""
    import torch

    try:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _export_here.lib = lib  # keep the schemas alive
    except RuntimeError:
        pass
    import torchvision

    path = ROOT / "models" / "cache" / f"{name}.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        net = getattr(torchvision.models, name)(weights=None).eval()
        with torch.no_grad():
            torch.onnx.export(net, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False,
                              do_constant_folding=False, opset_version=17, input_names=["input"],
                              output_names=["logits"])
    return path


THREADS = 1


def rel_error(expected, got) -> float:
    """Max |difference| / max |expected| over all outputs (no absolute floor: some random-weight exports
    have outputs around 1e-14)."""
    return max(
        float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(a).max(), 1e-300)) for a, b in zip(expected, got)
    )


def session(model):
    """onnxruntime as deployed (optimisations on), `THREADS` intra-op threads, no spinning above one."""
    return deployed_session(model, THREADS)


def latencies(models: dict, inputs: dict, rounds: int, per_round: int, stat=statistics.median) -> dict[str, float]:
    """ms per export (`stat` of all runs, median by default); exports run interleaved round by round in
    this one process. `latencies.last_min` keeps the fastest run of each (least disturbed by load)."""
    sessions = {k: session(m) for k, m in models.items()}
    feeds = {k: {i.name: inputs[i.name] for i in s.get_inputs()} for k, s in sessions.items()}
    for k, s in sessions.items():  # warm-up
        for _ in range(3):
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(per_round):
                t = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append((time.perf_counter() - t) * 1e3)
    latencies.last_min = {k: min(v) for k, v in times.items()}
    return {k: stat(v) for k, v in times.items()}


def bench_model(name: str, ratio: float, rounds: int, per_round: int, cost: CostModel | None = None,
                share: float = 0.0, union_cap: float | None = None, tune: int = 20) -> dict:
    """Exports of one model, their exactness, copies, parameters and interleaved latencies.

    naive / naive-padgather / costmodel / reordered share one plan at `ratio`: each layer keeps as many
    channels as constrained pruning keeps per group, so nonzero parameters are equal (stored parameters
    differ by the zero rows/columns an absorbed copy adds, printed). costmodel: the layout chosen by the
    fitted cost model alone; reordered: the layout kept by measured tuning (`tune` runs per candidate)."""
    dense = import_model(model_path(name))
    inputs = random_inputs(dense, seed=0)
    t = time.perf_counter()
    constrained = PrunePass(PruneConfig(ratio=ratio)).run(dense).model
    base = UnconstrainedConfig(ratio=ratio, share=share, union_cap=union_cap, cost=cost or CostModel(),
                               tune_threads=THREADS)
    results = {
        "naive": UnconstrainedPass(replace(base, reorder=False)).run(dense),
        "naive-padgather": UnconstrainedPass(replace(base, reorder=False, naive="pad_gather")).run(dense),
        "costmodel": UnconstrainedPass(base).run(dense),
        "reordered": UnconstrainedPass(replace(base, tune=tune)).run(dense),
    }
    prune_s = time.perf_counter() - t
    expected = run(mask_model(dense, results["reordered"].info["plan"]), inputs)
    errors = {k: rel_error(expected, run(r.model, inputs)) for k, r in results.items()}
    exports = {"dense": dense, "constrained": constrained, **{k: r.model for k, r in results.items()}}
    ms = latencies(exports, inputs, rounds, per_round)
    fastest = dict(latencies.last_min)
    return {
        "name": name, "ms": ms, "min_ms": fastest, "errors": errors, "prune_s": prune_s,
        "params": {k: count_params(ModelGraph(m)) for k, m in exports.items()},
        "nonzero": {k: effective_params(m) for k, m in exports.items()},
        "copies": {k: copy_report(r.model) for k, r in results.items()},
        "layout": {k: r.info["summary"]["layout"] for k, r in results.items()},
        "tuned": {k: r.info["summary"].get("tuned") for k, r in results.items()},
    }


def _ratio_for(target: int, make, lo: float = 0.0, hi: float = 0.6, steps: int = 9) -> float:
    """Smallest ratio whose export has at most `target` nonzero parameters (bisection; monotone)."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        if effective_params(make(mid)) <= target:
            hi = mid
        else:
            lo = mid
    return hi


ACCURACY_MODELS = {
    # name: (path, short label)
    "fashion_mnist_cnn": (ROOT / "models" / "fashion_mnist_cnn.onnx", "CNN: one residual Add + one Concat"),
    "fashion_mnist_resnet": (ROOT / "models" / "fashion_mnist_resnet.onnx",
                             "ResNet: 3 stages x 2 basic blocks, 3 writers per stream"),
}
# The unconstrained configuration the verdict lines judge (`UnconstrainedConfig` fields; ratio, criterion
# and repair are set per row). The union cap is the latency default (1.125 x the per-layer kept channels).
ACCURACY_DEFAULT = {"drive": "reader", "share": 0.0, "union_cap": 1.125}
ACCURACY_METHODS = (
    # name, UnconstrainedConfig overrides (None: constrained), repair
    ("constrained", None, "none"),
    ("constrained +mean", None, "mean"),  # = UnconstrainedConfig(share=1) + mean repair
    ("unconstrained", {}, "none"),
    ("unconstrained +mean", {}, "mean"),
    ("unconstrained unbounded", {"union_cap": None}, "none"),
    ("unconstrained unbounded +mean", {"union_cap": None}, "mean"),
    ("unconstrained budget", {"group_budget": True}, "none"),  # readers give up channels: group params <= constrained
    ("unconstrained budget +mean", {"group_budget": True}, "mean"),
    ("free", {"drive": "free", "union_cap": None}, "none"),
    ("free +mean", {"drive": "free", "union_cap": None}, "mean"),
)


def accuracy(removals: list[float], criteria=("l1", "bn"), calib_n: int = 1000, model: str = "fashion_mnist_cnn",
             methods=ACCURACY_METHODS, default: dict | None = None) -> list[dict]:
    """Top-1 on the 10k Fashion-MNIST test images at equal nonzero parameter counts: for each target
    removal of the dense parameters, each method's ratio is searched (bisection) for the largest export
    with at most the target's nonzero parameters (stream unions and zero rows/columns counted as they
    are exported). Same criterion for every method; repairs: none, or the calibrated mean repair
    (`mean`, on `calib_n` training images) applied to constrained (share=1) and unconstrained plans
    alike. The unconstrained rows use `default` (`ACCURACY_DEFAULT`) plus each method's overrides."""
    from models.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    train, _ = load_fashion_mnist("train")
    dense = import_model(ACCURACY_MODELS[model][0])
    calib = {"image": train[:calib_n]}
    default = ACCURACY_DEFAULT if default is None else default

    def top1(m) -> float:
        s = session(m)
        name = s.get_inputs()[0].name
        hits = 0
        for i in range(0, len(images), 2000):
            logits = s.run(None, {name: images[i : i + 2000]})[0]
            hits += int((logits.argmax(axis=1) == labels[i : i + 2000]).sum())
        return hits / len(images)

    total = effective_params(dense)
    rows = [{"model": model, "removal": 0.0, "criterion": "-", "method": "dense", "repair": "none", "ratio": 0.0,
             "top1": top1(dense), "nonzero": total}]
    for crit in criteria:
        for removal in removals:
            target = int(total * (1 - removal))
            for method, overrides, repair in methods:
                if overrides is None:
                    def make(r, rep="none", crit=crit):
                        if rep == "none" and crit != "energy":
                            return PrunePass(PruneConfig(ratio=r, criterion=crit)).run(dense).model
                        # share=1: constrained pruning (tested equal to PrunePass for l1/l2/bn); "energy"
                        # has no PrunePass twin: its group ranking is the mean of the units' energies.
                        cfg = UnconstrainedConfig(ratio=r, criterion=crit, share=1.0, repair=rep)
                        return UnconstrainedPass(cfg, calib=calib if rep == "mean" else None).run(dense).model
                else:
                    fields = {**default, **overrides}

                    def make(r, rep="none", crit=crit, fields=fields):
                        cfg = UnconstrainedConfig(ratio=r, criterion=crit, repair=rep, **fields)
                        return UnconstrainedPass(cfg, calib=calib if rep == "mean" else None).run(dense).model
                ratio = _ratio_for(target, make)
                pruned = make(ratio, repair)
                rows.append({"model": model, "removal": removal, "criterion": crit, "method": method,
                             "repair": repair, "ratio": ratio, "top1": top1(pruned), "nonzero": effective_params(pruned)})
    return rows


def verdicts(rows: list[dict], unconstrained: str = "unconstrained") -> list[str]:
    """One line per model/criterion/removal/repair: `unconstrained` (the default config) vs constrained."""
    lines, wins, total = [], 0, 0
    by = {(r["model"], r["criterion"], r["removal"], r["method"]): r for r in rows}
    for (model, crit, removal, method), c in by.items():
        if not method.startswith("constrained"):
            continue
        suffix = method[len("constrained"):]
        u = by.get((model, crit, removal, unconstrained + suffix))
        if u is None:
            continue
        total += 1
        wins += u["top1"] >= c["top1"]
        lines.append(f"  {model:<21} {crit:<6} removed {removal:.2f} repair {c['repair']:<5} constrained {c['top1']:.4f}"
                     f"  {unconstrained} {u['top1']:.4f}  {u['top1'] - c['top1']:+.4f}  "
                     f"{'>=' if u['top1'] >= c['top1'] else '<'}  (nonzero {u['nonzero']} vs {c['nonzero']})")
    lines.append(f"  {unconstrained} >= constrained in {wins} of {total} cases")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--per-round", type=int, default=4)
    ap.add_argument("--only", action="append", choices=MODELS)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--accuracy-models", nargs="+", choices=sorted(ACCURACY_MODELS), default=sorted(ACCURACY_MODELS))
    ap.add_argument("--criteria", nargs="+", default=["l1", "bn"], choices=["l1", "l2", "bn", "energy"])
    ap.add_argument("--drive", default=ACCURACY_DEFAULT["drive"], choices=["free", "writer", "reader"],
                    help="accuracy: UnconstrainedConfig.drive of the unconstrained rows")
    ap.add_argument("--accuracy-share", type=float, default=ACCURACY_DEFAULT["share"],
                    help="accuracy: UnconstrainedConfig.share of the unconstrained rows")
    ap.add_argument("--removals", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4],
                    help="accuracy: fractions of the dense nonzero parameters removed")
    ap.add_argument("--share", type=float, default=0.0, help="latency: UnconstrainedConfig.share of both "
                    "unconstrained exports (0: fully unconstrained; 1: constrained)")
    ap.add_argument("--union-cap", type=float, default=1.125, help="latency: UnconstrainedConfig.union_cap "
                    "(the stream keeps at most this x the per-layer kept channels; 0: unbounded)")
    ap.add_argument("--tune", type=int, default=20, help="latency: UnconstrainedConfig.tune (0: cost model only)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (1: least noisy)")
    ap.add_argument("--fixed-cost", action="store_true", help="use the default CostModel, do not measure")
    args = ap.parse_args(argv)
    global THREADS
    THREADS = args.threads
    args.union_cap = args.union_cap or None

    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, CPU ({args.threads} thread), batch 1, ratio {args.ratio}, "
          f"median of {args.rounds * args.per_round} runs per export (interleaved), share {args.share}")
    print(f"load average at start: {os.getloadavg()[0]:.2f} (2 cores, other sessions running)")
    if not args.skip_latency:
        cost = CostModel() if args.fixed_cost else CostModel.measure(threads=args.threads)
        print(f"cost model ({'default' if args.fixed_cost else 'measured here'}): {cost}")
        print(f"union_cap {args.union_cap}, layout tuning {args.tune} runs per candidate")
        results = []
        for name in args.only or MODELS:
            r = bench_model(name, args.ratio, args.rounds, args.per_round, cost, args.share, args.union_cap, args.tune)
            results.append(r)
            ms, c = r["ms"], r["copies"]
            err = ", ".join(f"{k} {v:.1e}" for k, v in r["errors"].items())
            print(f"\n== {name}  (pruning {r['prune_s']:.1f} s; max rel error vs masked original: {err})")
            print(f"{'export':<17}{'ms':>9}{'x dense':>9}{'min ms':>9}{'params':>11}{'nonzero':>11}")
            for k in ms:
                print(f"{k:<17}{ms[k]:>9.2f}{ms['dense'] / ms[k]:>9.2f}{r['min_ms'][k]:>9.2f}{r['params'][k]:>11}"
                      f"{r['nonzero'][k]:>11}")
            for k in c:
                print(f"copies {k:<16} ops {c[k]['copy_ops']:>3} (Gather/Scatter {c[k]['gather_scatter']:>3}) "
                      f"{c[k]['ops']}  {c[k]['bytes'] / 1e6:.2f} MB/inference")
            for k in ("costmodel", "reordered"):
                print(f"layout {k:<10} {r['layout'][k]}  tuned {r['tuned'][k]}")
            print(f"ratios: naive/reordered {ms['naive'] / ms['reordered']:.2f}x, "
                  f"naive-padgather/reordered {ms['naive-padgather'] / ms['reordered']:.2f}x, "
                  f"costmodel/reordered {ms['costmodel'] / ms['reordered']:.2f}x, "
                  f"reordered/constrained {ms['reordered'] / ms['constrained']:.2f}, nonzero params "
                  f"{r['nonzero']['reordered'] / r['nonzero']['constrained']:.3f}, stored "
                  f"{r['params']['reordered'] / r['params']['constrained']:.3f}")
        print("\nsummary: naive/reordered latency (>= 1.5 on two models, >= 1 on all); reordered/constrained "
              "at equal nonzero params (<= 1.10); medians, then the same ratios of the fastest runs")
        for r in results:
            ms, mn = r["ms"], r["min_ms"]
            print(f"  {r['name']:<16} {ms['naive'] / ms['reordered']:>5.2f}x  {ms['reordered'] / ms['constrained']:>5.2f}"
                  f"    (fastest runs: {mn['naive'] / mn['reordered']:.2f}x  {mn['reordered'] / mn['constrained']:.2f})")
        fast = sum(r["ms"]["naive"] / r["ms"]["reordered"] >= 1.5 for r in results)
        never = all(r["ms"]["naive"] / r["ms"]["reordered"] >= 1.0 for r in results)
        within = sum(r["ms"]["reordered"] / r["ms"]["constrained"] <= 1.10 for r in results)
        print(f"  >= 1.5x over naive on {fast} of {len(results)} models ({'met' if fast >= 2 else 'NOT met'}); "
              f"never slower than naive: {'met' if never else 'NOT met'}; within 10% of constrained: "
              f"{within} of {len(results)} ({'met' if within == len(results) else 'NOT met'})")
    if not args.skip_accuracy:
        default = {**ACCURACY_DEFAULT, "drive": args.drive, "share": args.accuracy_share}
        print(f"\n== accuracy: top-1 on the 10k Fashion-MNIST test images at equal nonzero params; unconstrained "
              f"= {default} (rows 'unbounded': union_cap None; 'budget': group_budget, readers keep fewer channels "
              "so each group holds <= constrained's params; 'free': every unit its own top-k, UPSCALE-style)")
        print("each method's ratio searched to the largest export with <= the target's nonzero parameters")
        rows = []
        for name in args.accuracy_models:
            print(f"\n-- {name} ({ACCURACY_MODELS[name][1]})")
            print(f"{'removed':>8} {'crit':<7}{'method':<32}{'ratio':>7}{'top1':>8}{'nonzero':>9}")
            for row in accuracy(args.removals, tuple(args.criteria), model=name, default=default):
                rows.append(row)
                print(f"{row['removal']:>8.2f} {row['criterion']:<7}{row['method']:<32}{row['ratio']:>7.3f}"
                      f"{row['top1']:>8.4f}{row['nonzero']:>9}", flush=True)
        for method in ("unconstrained", "unconstrained unbounded", "unconstrained budget", "free"):
            print(f"\nverdict: {method} vs constrained (same criterion, same repair, equal nonzero params)")
            print("\n".join(verdicts(rows, method)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
