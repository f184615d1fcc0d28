"""PP-OCRv4 recognition: ours vs onnxsim structured pruning at equal parameter count (exact match).

    python bench/ocr_onnxsim.py [--fractions 0.02,0.05,0.1,0.2] [--rows l1:none,l1:bias,obs:ls]
                                [--test 100] [--calib 32]

Same model, rendered lines, decoding and calibration/test split as bench/ocr_accuracy.py (its helpers
are imported). onnxsim (`apply_structured_pruning`, `apply_structured_wanda_pruning` calibrated on the
calibration lines) runs on ``onnxsim.simplify`` of the fixed-shape model with its sparsity bisected to
each fraction of parameters removed (bench/onnxsim_baseline.py). onnxsim reaches at most about 19% of
this model's parameters (sparsity 0.95 on every chain it can match); a fraction it cannot reach is
reported with what it got, and our rows are also run at onnxsim's maximum fraction so there is one
equal-count point where both prune as much as onnxsim can.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ocr_accuracy import exact, ocr_data, recognise
from bench.onnxsim_baseline import match_fraction, pruner, simplified
from onnxprune.calibration import CalibrationData, collect_stats
from onnxprune.graph import ModelGraph
from onnxprune.metrics import count_params
from onnxprune.passes.pruning import PruneConfig, PrunePass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fractions", default="0.02,0.05,0.1,0.2")
    ap.add_argument("--rows", default="l1:none,l1:bias,obs:ls", help="criterion:repair pairs of our pruner")
    ap.add_argument("--baselines", default="onnxsim-l2,onnxsim-wanda")
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--allocation", default="lamp", choices=("uniform", "global", "lamp"))
    args = ap.parse_args(argv)
    W = args.width
    fractions = [float(f) for f in args.fractions.split(",")]
    rows = [tuple(r.split(":")) for r in args.rows.split(",")]
    baselines = [b for b in args.baselines.split(",") if b]
    model, chars, test_lines, calib_lines, test_x, calib_x = ocr_data(args.test, args.calib, W)
    base = exact(recognise(model, test_x, chars), test_lines)
    params = count_params(ModelGraph(model))
    print(f"PP-OCRv4 rec (x = 1x3x48x{W}): {params} params, exact match {base:.1f}% on {args.test} rendered lines; "
          f"{len(calib_lines)} disjoint calibration lines; allocation {args.allocation}")

    results: dict[tuple[str, float], tuple[float, float]] = {}
    simple = simplified(model)
    s_params = count_params(ModelGraph(simple))
    print(f"onnxsim.simplify: {s_params} params, exact match {exact(recognise(simple, test_x, chars), test_lines):.1f}%")
    batches = [{"x": calib_x[i : i + 1]} for i in range(len(calib_x))]
    reach = 0.0
    for b in baselines:
        fn = pruner(b, batches)
        for f in fractions:
            t = time.perf_counter()
            got = match_fraction(simple, fn, f, steps=7)
            sec = time.perf_counter() - t
            if got is None:
                print(f"  {b}: removes nothing at any sparsity: cannot prune this model")
                break
            reach = max(reach, got.removed)
            acc = exact(recognise(got.model, test_x, chars), test_lines)
            results[b, f] = (acc, got.removed)
            note = "" if abs(got.removed - f) < 0.01 else f"  (cannot reach {f:.0%}: its maximum)"
            print(f"  f={f:.2f} {b:>15}: exact {acc:5.1f}%  removed {got.removed:.3f}  sparsity {got.sparsity:.4f}"
                  f"  ({sec:.1f}s){note}", flush=True)
    extra = [round(reach, 4)] if reach and all(abs(reach - f) > 0.005 for f in fractions) else []
    for b in baselines:
        for f in extra:
            got = match_fraction(simple, pruner(b, batches), f, steps=7)
            if got is not None:
                results[b, f] = (exact(recognise(got.model, test_x, chars), test_lines), got.removed)
                print(f"  f={f:.3f} {b:>15}: exact {results[b, f][0]:5.1f}%  removed {got.removed:.3f}", flush=True)

    t0 = time.perf_counter()
    calib = CalibrationData({"x": calib_x})  # repair 'seq' reruns the calibration samples through the pruned model
    stats = collect_stats(model, calib)
    print(f"our calibration statistics: {time.perf_counter() - t0:.1f}s")
    for f in sorted(fractions + extra):
        for crit, rep in rows:
            cfg = PruneConfig(criterion=crit, repair=rep, allocation=args.allocation, target_params=f"{(1 - f) * 100:.6f}%")
            uses = crit in ("activation", "apoz", "obs") or rep == "ls"
            t = time.perf_counter()
            res = PrunePass(cfg, stats=stats if uses else None, calib=calib).run(model)
            sec = time.perf_counter() - t
            s = res.info["summary"]
            removed = 1 - s["params_after"] / s["params_before"]
            acc = exact(recognise(res.model, test_x, chars), test_lines)
            results[f"{crit}/{rep}", f] = (acc, removed)
            print(f"  f={f:.3f} {crit + '/' + rep:>15}: exact {acc:5.1f}%  removed {removed:.3f}  ({sec:.1f}s)", flush=True)

    cols = sorted(fractions + extra)
    names = [f"{c}/{r}" for c, r in rows] + baselines
    head = f"{'method':>15} | " + " ".join(f"{f * 100:>6.1f}%" for f in cols)
    print()
    print(f"exact match (%) vs fraction of parameters removed (unpruned {base:.1f}%); onnxsim cells give the "
          "fraction it actually removed when it could not reach the column")
    print(head)
    print("-" * len(head))
    for n in names:
        cells = []
        for f in cols:
            if (n, f) not in results:
                cells.append(f"{'n/a':>7}")
                continue
            acc, rem = results[n, f]
            cells.append(f"{acc:7.1f}" if abs(rem - f) < 0.01 else f"{acc:5.1f}@{rem * 100:.0f}%")
        print(f"{n:>15} | " + " ".join(cells))
    print()
    for f in cols:
        theirs = [results[b, f][0] for b in baselines if (b, f) in results and abs(results[b, f][1] - f) < 0.01]
        if not theirs:
            print(f"  {f:.1%}: onnxsim cannot remove this much")
            continue
        ours = {n: results[n, f][0] for n in names[: len(rows)]}
        better = [n for n, a in ours.items() if a > max(theirs)]
        print(f"  {f:.1%}: onnxsim best {max(theirs):.1f}%; ours {', '.join(f'{n} {a:.1f}%' for n, a in ours.items())}"
              f" -> better: {', '.join(better) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
