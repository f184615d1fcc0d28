"""CPU time of the per-group sensitivity scan (`onnxprune.sensitivity.sensitivity`) on a zoo model, and how far
its errors are from a saved run of another version of the code.

    python bench/sensitivity_speed.py [--model resnet50] [--samples 64] [--criterion obs] [--repair ls]
                                      [--save run.json] [--compare old.json] [--phases]
    python bench/sensitivity_speed.py --saved new.json --compare old.json

Inputs: seeded N(0, 1) samples at the model's input shape (timing only; random zoo weights). The ratios are
`allocation_knapsack.RATIOS` and the statistics are collected as `allocation_knapsack.measure_curves` collects
them (Hessians, for ``obs`` or the ``ls`` repair), so the scan is the one ``--allocation knapsack`` pays. CPU s
are this process's (all threads; `time.process_time`), which on a shared machine move far less with the load
than the wall time; the load average is printed before and after. The old code is measured by putting its
checkout first on the path: ``PYTHONPATH=/tmp/scan_base python3 bench/sensitivity_speed.py ... --save old.json``.

``--compare`` prints the largest absolute and relative difference of the errors, group by group and ratio by
ratio (the runs must have the same model, samples, criterion and repair); with ``--saved`` it compares two
saved runs without measuring. ``--phases`` adds the CPU s spent in
the scan's helpers (`PHASES`: those the measured code has).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # appended: a checkout put first on PYTHONPATH stays the one imported


def _load(values) -> str:
    return "/".join(f"{v:.1f}" for v in values)


# Helpers whose CPU s `--phases` reports (those that exist in the code measured; nested ones count in both).
PHASES = [
    ("onnxprune.sensitivity", "_outputs"),  # the physically pruned path: whole-model runs
    ("onnxprune.repair", "repair_weights"),
    ("onnxprune.repair", "reanalyze"),
    ("onnxprune.rewrite", "apply_plan"),
    ("onnxprune.shape_inference", "infer_shapes"),
    ("onnxprune.sensitivity_runs", "session"),  # session creation of the scan
    ("onnxprune.sensitivity_runs", "GroupScan.reference"),
    ("onnxprune.sensitivity_runs", "GroupScan._advance"),  # original values at the cuts
    ("onnxprune.sensitivity_runs", "GroupScan._edited"),  # repaired + masked initializers
]


def _wrap_phases(totals: dict[str, float]) -> None:
    """Replace each helper of `PHASES` that exists by a wrapper adding its CPU s to `totals`."""
    import importlib

    for module_name, path in PHASES:
        try:
            owner = importlib.import_module(module_name)
        except ImportError:
            continue
        *parents, name = path.split(".")
        for p in parents:
            owner = getattr(owner, p, None)
        fn = getattr(owner, name, None) if owner is not None else None
        if fn is None:
            continue

        key = f"{module_name.split('.')[-1]}.{path}"

        def timed(*a, _fn=fn, _key=key, **k):
            start = time.process_time()
            try:
                return _fn(*a, **k)
            finally:
                totals[_key] = totals.get(_key, 0.0) + time.process_time() - start

        setattr(owner, name, timed)


# Errors below this are rounding noise of either run (a removed channel that was dead: ~1e-7 on ResNet-20/50):
# their relative difference means nothing, their absolute one is in the maximum.
NOISE = 1e-5


def compare(new: dict, old: dict, label: str) -> None:
    """Print the largest absolute and relative difference between two saved runs' errors (`new` vs `old`)."""
    from onnxprune.allocation_knapsack import RATIOS

    by_group = {r["group"]: r for r in old["rows"]}
    abs_diff, rel_diff, worst = 0.0, 0.0, None
    missing = 0
    for r in new["rows"]:
        o = by_group.get(r["group"])
        if o is None or o["channels"] != r["channels"]:
            missing += 1
            continue
        for k, (a, b) in enumerate(zip(r["errors"], o["errors"])):
            if not (np.isfinite(a) and np.isfinite(b)):
                if np.isfinite(a) != np.isfinite(b):
                    missing += 1
                continue
            d = abs(a - b)
            rel = d / max(abs(b), 1e-30)
            abs_diff = max(abs_diff, d)
            if abs(b) >= NOISE and rel > rel_diff:
                rel_diff, worst = rel, (r["group"], RATIOS[k], b, a)
    errors = [e for r in old["rows"] for e in r["errors"] if np.isfinite(e)]
    print(f"  vs {label} (scan {old.get('cpu_scan', float('nan')):.1f} CPU s; its errors {min(errors):.3g} .. "
          f"{max(errors):.3g}): max |error difference| {abs_diff:.3g}, max relative {rel_diff:.3g} (errors >= {NOISE:g})"
          + (f" (group {worst[0]} at {worst[1]}: {worst[2]:.6g} -> {worst[3]:.6g})" if worst else "")
          + (f"; {missing} rows/points not comparable" if missing else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50", help="zoo model name (models.zoo)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--criterion", default="obs")
    ap.add_argument("--repair", default="ls", choices=("none", "bias", "ls", "seq"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", help="write the measured rows (JSON)")
    ap.add_argument("--compare", help="a saved run (JSON) to compare the errors with")
    ap.add_argument("--phases", action="store_true", help="CPU s per helper of the scan (PHASES)")
    ap.add_argument("--saved", help="compare this saved run (JSON) with --compare instead of measuring")
    args = ap.parse_args(argv)
    if args.saved:
        compare(json.loads(Path(args.saved).read_text()), json.loads(Path(args.compare).read_text()), args.compare)
        return 0

    from models.zoo import zoo_model
    from onnxprune import sensitivity as sens
    from onnxprune.allocation_knapsack import RATIOS
    from onnxprune.calibration import CalibrationData, collect_stats
    from onnxprune.importer import import_model

    load_before = os.getloadavg()
    t0 = time.process_time()
    model = import_model(str(zoo_model(args.model)))
    t_import = time.process_time() - t0
    rng = np.random.default_rng(args.seed)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in {t.name for t in model.graph.initializer}:
            continue
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal((args.samples, *dims[1:]), dtype=np.float32)
    data = CalibrationData(feeds)
    t0 = time.process_time()
    used = "ls" if args.repair == "seq" else args.repair
    stats = collect_stats(model, data, hessian=True) if used == "ls" or args.criterion == "obs" else None
    t_stats = time.process_time() - t0
    totals: dict[str, float] = {}
    if args.phases:
        _wrap_phases(totals)
    w0, t0 = time.perf_counter(), time.process_time()
    rows = sens.sensitivity(model, data, list(RATIOS), args.criterion, args.repair, stats)
    t_scan, w_scan = time.process_time() - t0, time.perf_counter() - w0
    measured = sum(1 for r in rows for e in r.errors if np.isfinite(e))
    print(f"{args.model}, {args.samples} samples, {args.criterion} + {args.repair}, {len(rows)} groups, "
          f"{measured} measurements; code {Path(sens.__file__).parents[1]}; {os.cpu_count()} cores, load average "
          f"(1/5/15 min) before {_load(load_before)}, after {_load(os.getloadavg())}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    print(f"  CPU s: import {t_import:.1f}, statistics {t_stats:.1f}, sensitivity scan {t_scan:.1f} "
          f"(wall {w_scan:.1f}), {t_scan / max(measured, 1):.2f} per measurement")
    for name, sec in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"    {name:40s} {sec:8.1f}")
    result = {"model": args.model, "samples": args.samples, "criterion": args.criterion, "repair": args.repair,
              "cpu_scan": t_scan, "rows": [{"group": r.group, "channels": r.channels, "errors": r.errors} for r in rows]}
    if args.save:
        Path(args.save).write_text(json.dumps(result))
    if args.compare:
        compare(result, json.loads(Path(args.compare).read_text()), args.compare)
    return 0


if __name__ == "__main__":
    sys.exit(main())
