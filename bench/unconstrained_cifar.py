"""Unconstrained vs constrained pruning on the pretrained CIFAR-10 ResNets, at equal parameters.

    python bench/unconstrained_cifar.py [--arch resnet20] [--keeps 0.8 0.6] [--criteria l2]
        [--repairs seq] [--test-n 10000] [--calib-n 256] [--calib-seed 0] [--configs free coupled coupled_ls]

For every criterion x repair x parameter fraction kept: constrained pruning (`PrunePass`, uniform
allocation, ``round_to=1``, the shortest removal meeting ``target_params``) and each unconstrained
configuration of `CONFIGS` (`UnconstrainedPass` with the same criterion, repair and ``target_params``: the
per-group counts come from the same removal order, `upscale.allocate`), top-1 on the CIFAR-10 test images
(stratified subset with ``--test-n``), parameters (stored and nonzero), pruning seconds, and onnxruntime
latency (1 thread, batch 1, interleaved round by round with the dense and the constrained model: ratios
of medians). Models come from the zoo cache (`models/cifar_resnet.py`, built with torch; BatchNorm kept
as nodes); data from ``../shared/datasets`` (skipped with a message when absent). Record `uptime` with
results: other sessions load this machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from onnxprune.graph import ModelGraph
from onnxprune.importer import import_model
from onnxprune.latency.timing import interleaved
from onnxprune.metrics import count_params
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.passes.unconstrained import UnconstrainedPass
from onnxprune.upscale.config import UnconstrainedConfig

CONFIGS: dict[str, dict] = {
    "share1": {"share": 1.0},  # constrained pruning through the unconstrained pass (a check: equal to it)
    "free": {"drive": "free"},  # every unit its own top channels (UPSCALE's literal setting)
    "reader_budget": {"drive": "reader", "group_budget": True},  # readers choose, writers keep what is read
    "reader_budget_share": {"drive": "reader", "group_budget": True, "share": 0.5},
    # writers keep what their readers use, readers what their writers cover (`upscale.coupled`)
    "coupled": {"drive": "coupled"},
    "coupled_ls": {"drive": "coupled", "reader_choice": "ls"},  # readers: least-squares (OBS) column choice
    # ... and writers into a residual stream refit toward the original stream (`upscale.stream_repair`)
    "coupled_ls_stream": {"drive": "coupled", "reader_choice": "ls", "stream_repair": True},
    # ... and readers re-choose their columns during that repair, on the pruned model's inputs
    "coupled_seq_stream": {"drive": "coupled", "reader_choice": "seq", "stream_repair": True},
    "coupled_seq": {"drive": "coupled", "reader_choice": "seq"},
    "share1_stream": {"share": 1.0, "stream_repair": True},  # the stream-aware repair on a constrained plan
}


def top1(model, images: np.ndarray, labels: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: images[i : i + 500]})[0].argmax(1) for i in range(0, len(images), 500)])
    return 100.0 * float((pred == labels).mean())


def latencies(models: list, repeat: int = 200) -> list[float]:
    """Median ms of each model (1 thread, batch 1), measured interleaved."""
    import onnxruntime as ort

    fns = []
    for m in models:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
        name = sess.get_inputs()[0].name
        fns.append(lambda s=sess, n=name, x=x: s.run(None, {n: x}))
    return [t.median_ms for t in interleaved(fns, warmup=20, repeat=repeat)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet20", choices=["resnet20", "resnet44"])
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6], help="fractions of parameters kept")
    ap.add_argument("--criteria", nargs="+", default=["l2"], choices=["l1", "l2", "bn"])
    ap.add_argument("--repairs", nargs="+", default=["seq"], choices=["none", "mean", "ls", "seq"])
    ap.add_argument("--configs", nargs="+", default=["free", "coupled", "coupled_ls"], choices=sorted(CONFIGS))
    ap.add_argument("--test-n", type=int, default=10000)
    ap.add_argument("--calib-n", type=int, default=256, help="calibration images (bench/accuracy_real.py's 256)")
    ap.add_argument("--calib-seed", type=int, default=0, help="seed of the stratified calibration subset (0: "
                    "bench/accuracy_real.py's)")
    ap.add_argument("--repeat", type=int, default=200, help="latency runs per model")
    args = ap.parse_args(argv)
    try:
        from models import zoo
        from models.cifar_resnet import load_cifar10

        model = import_model(zoo.zoo_model(f"cifar_{args.arch}"))
        images, labels = load_cifar10("test", n=None if args.test_n >= 10000 else args.test_n)
        calib_x, _ = load_cifar10("calib", n=args.calib_n, seed=args.calib_seed)
    except Exception as exc:  # the datasets folder or torch (to build the model) is absent
        print(f"skipped: {exc}")
        return 0
    name = model.graph.input[0].name
    calib = {name: calib_x}
    total = count_params(ModelGraph(model))
    print(f"CIFAR-10 {args.arch}: dense top-1 {top1(model, images, labels):.2f} on {len(labels)} test images, "
          f"{total} params; calibration {args.calib_n} training images (seed {args.calib_seed}); load average {os.getloadavg()[0]:.1f}")
    print(f"{'kept':>5} {'crit':<5}{'repair':<7}{'method':<22}{'top1':>7}{'params':>9}{'nonzero':>9}{'s':>7}"
          f"{'x constr. ms':>14}{'x dense ms':>12}")
    for keep in args.keeps:
        target = f"{keep * 100:.6f}%"  # as bench/accuracy_real.py states it
        for crit in args.criteria:
            for repair in args.repairs:
                start = time.perf_counter()
                config = PruneConfig(criterion=crit, repair=repair, target_params=target, round_to=1,
                                     allocation="uniform")
                from onnxprune.calibration import CalibrationData

                data = CalibrationData(calib) if repair != "none" else None
                constrained = PrunePass(config, calib=data).run(model).model
                rows = [("constrained", constrained, time.perf_counter() - start, None)]
                for key in args.configs:
                    start = time.perf_counter()
                    uconfig = UnconstrainedConfig(criterion=crit, repair=repair, target_params=target, **CONFIGS[key])
                    result = UnconstrainedPass(uconfig, calib=calib if repair != "none" else None).run(model)
                    rows.append((key, result.model, time.perf_counter() - start, result.info["summary"]))
                ms = latencies([model] + [r[1] for r in rows], args.repeat)
                for (method, pruned, seconds, summary), t in zip(rows, ms[1:]):
                    params = count_params(ModelGraph(pruned))
                    nonzero = summary["effective_params_after"] if summary else params
                    print(f"{keep:>5.2f} {crit:<5}{repair:<7}{method:<22}{top1(pruned, images, labels):>7.2f}"
                          f"{params:>9}{nonzero:>9}{seconds:>7.1f}{t / ms[1]:>14.3f}{t / ms[0]:>12.3f}", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
