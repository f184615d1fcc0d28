"""Unconstrained pruning (UPSCALE) benchmark: latency of four exports, copy ops, and accuracy.

    python bench/unconstrained.py [--ratio 0.5] [--rounds 30] [--only resnet50] [--skip-accuracy]

Latency: onnxruntime CPU (graph optimisations on, as deployed; one intra-op thread by default, which is
least disturbed by other load on the machine), batch 1, the median of many runs, all
exports of one model measured in the same process and interleaved round by round: dense, constrained
(`PrunePass`), unconstrained-naive (original order, Gather / Pad+Gather) and unconstrained-reordered
(`UnconstrainedPass` with reordering and the copy/absorb cost model), at the same ratio — so the same
number of channels per layer and about the same number of nonzero parameters (printed). Models come
from `models/zoo.py` (random-weight torchvision exports); without it they are exported here.

Exactness: both unconstrained exports are compared with the per-layer masked original in onnxruntime with
optimisations off (max relative error printed; must be <= 1e-5).

Accuracy: the bundled Fashion-MNIST CNN, constrained vs unconstrained at equal ratios, on the 10k test set.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.passes.unconstrained import (
    CostModel,
    UnconstrainedConfig,
    UnconstrainedPass,
    copy_report,
    effective_params,
    mask_model,
)

from onnxprune.graph import ModelGraph
from onnxprune.importer import import_model
from onnxprune.metrics import count_params
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
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def latencies(models: dict, inputs: dict, rounds: int, per_round: int) -> dict[str, float]:
    """Median ms per export; exports run interleaved round by round in this one process."""
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
    return {k: statistics.median(v) for k, v in times.items()}


def bench_model(name: str, ratio: float, rounds: int, per_round: int, cost: CostModel | None = None) -> dict:
    dense = import_model(model_path(name))
    inputs = random_inputs(dense, seed=0)
    t = time.perf_counter()
    constrained = PrunePass(PruneConfig(ratio=ratio)).run(dense).model
    naive = UnconstrainedPass(UnconstrainedConfig(ratio=ratio, reorder=False)).run(dense)
    reordered = UnconstrainedPass(UnconstrainedConfig(ratio=ratio, reorder=True, cost=cost or CostModel())).run(dense)
    prune_s = time.perf_counter() - t
    oracle = mask_model(dense, reordered.info["plan"])
    expected = run(oracle, inputs)
    errors = {"naive": rel_error(expected, run(naive.model, inputs)),
              "reordered": rel_error(expected, run(reordered.model, inputs))}
    exports = {"dense": dense, "constrained": constrained, "naive": naive.model, "reordered": reordered.model}
    ms = latencies(exports, inputs, rounds, per_round)
    return {
        "name": name, "ms": ms, "errors": errors, "prune_s": prune_s,
        "params": {k: count_params(ModelGraph(m)) for k, m in exports.items()},
        "nonzero": {k: effective_params(m) for k, m in exports.items()},
        "copies": {"naive": copy_report(naive.model), "reordered": copy_report(reordered.model)},
        "layout": reordered.info["summary"]["layout"],
    }


def accuracy(ratios: list[float]) -> list[dict]:
    from models.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    dense = import_model(ROOT / "models" / "fashion_mnist_cnn.onnx")

    def top1(model) -> float:
        s = session(model)
        name = s.get_inputs()[0].name
        hits = 0
        for i in range(0, len(images), 1000):
            logits = s.run(None, {name: images[i : i + 1000]})[0]
            hits += int((logits.argmax(axis=1) == labels[i : i + 1000]).sum())
        return hits / len(images)

    base = top1(dense)
    rows = [{"ratio": 0.0, "constrained": base, "constrained_bn": base, "unconstrained": base, "unconstrained_l1": base,
             "nonzero_c": effective_params(dense), "nonzero_u": effective_params(dense)}]
    for r in ratios:
        c = PrunePass(PruneConfig(ratio=r)).run(dense).model
        cbn = PrunePass(PruneConfig(ratio=r, criterion="bn")).run(dense).model
        u = UnconstrainedPass(UnconstrainedConfig(ratio=r)).run(dense).model
        u1 = UnconstrainedPass(UnconstrainedConfig(ratio=r, criterion="l1")).run(dense).model
        rows.append({"ratio": r, "constrained": top1(c), "constrained_bn": top1(cbn), "unconstrained": top1(u), "unconstrained_l1": top1(u1),
                     "nonzero_c": effective_params(c), "nonzero_u": effective_params(u)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--per-round", type=int, default=4)
    ap.add_argument("--only", action="append", choices=MODELS)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (1: least noisy)")
    ap.add_argument("--fixed-cost", action="store_true", help="use the default CostModel, do not measure")
    args = ap.parse_args(argv)
    global THREADS
    THREADS = args.threads

    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, CPU ({args.threads} thread), batch 1, ratio {args.ratio}, "
          f"median of {args.rounds * args.per_round} runs per export (interleaved)")
    if not args.skip_latency:
        cost = CostModel() if args.fixed_cost else CostModel.measure(threads=args.threads)
        print(f"cost model ({'default' if args.fixed_cost else 'measured here'}): {cost}")
        results = []
        for name in args.only or MODELS:
            r = bench_model(name, args.ratio, args.rounds, args.per_round, cost)
            results.append(r)
            ms, c = r["ms"], r["copies"]
            print(f"\n== {name}  (pruning {r['prune_s']:.1f} s; max rel error vs masked original: "
                  f"naive {r['errors']['naive']:.1e}, reordered {r['errors']['reordered']:.1e})")
            print(f"{'export':<13}{'ms':>9}{'x dense':>9}{'params':>11}{'nonzero':>11}")
            for k in ("dense", "constrained", "naive", "reordered"):
                print(f"{k:<13}{ms[k]:>9.2f}{ms['dense'] / ms[k]:>9.2f}{r['params'][k]:>11}{r['nonzero'][k]:>11}")
            for k in ("naive", "reordered"):
                print(f"copies {k:<10} ops {c[k]['copy_ops']:>3} (Gather/Scatter {c[k]['gather_scatter']:>3}) "
                      f"{c[k]['ops']}  {c[k]['bytes'] / 1e6:.2f} MB/inference")
            print(f"layout: {r['layout']}")
            print(f"ratios: naive/reordered latency {ms['naive'] / ms['reordered']:.2f}x, "
                  f"reordered/constrained {ms['reordered'] / ms['constrained']:.2f}, "
                  f"nonzero params reordered/constrained {r['nonzero']['reordered'] / r['nonzero']['constrained']:.3f}")
        print("\nsummary (speedup of reordered over naive; reordered latency relative to constrained)")
        for r in results:
            ms = r["ms"]
            print(f"  {r['name']:<16} {ms['naive'] / ms['reordered']:>5.2f}x  {ms['reordered'] / ms['constrained']:>5.2f}")
    if not args.skip_accuracy:
        print("\n== Fashion-MNIST CNN (bundled, trained): top-1 on 10k test images")
        print("constrained: PrunePass l1 / bn (|gamma|); unconstrained: energy criterion (default) / l1")
        print(f"{'ratio':>6}{'constr_l1':>11}{'constr_bn':>11}{'unconstr':>10}{'unconstr_l1':>13}"
              f"{'nonzero c':>11}{'nonzero u':>11}")
        for row in accuracy([0.05, 0.1, 0.2, 0.3, 0.5]):
            print(f"{row['ratio']:>6.2f}{row['constrained']:>11.4f}{row['constrained_bn']:>11.4f}"
                  f"{row['unconstrained']:>10.4f}{row['unconstrained_l1']:>13.4f}"
                  f"{row['nonzero_c']:>11}{row['nonzero_u']:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
