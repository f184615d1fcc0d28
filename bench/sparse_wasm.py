"""Issue 14, bench (b) on wasm: group-sparse models end to end, sparse wasm bundle vs dense wasm bundle, under node.

    python bench/sparse_wasm.py [--quick] [--models mobilenet_v1,resnet18] [--repeat N] [--cache DIR] [--out FILE]

A MobileNet-v1-style model (``bench/sparse.py``'s, random weights, 224x224) and ResNet-18 (zoo) pruned to
30/50/70/90% ``group:1x4`` sparsity (``onnxprune prune --sparsity S --pattern group:1x4``, magnitude, data-free;
``--quick``: 30 and 90%). For each:

* the per-layer dense-or-sparse choice is measured under node (:func:`onnxprune.targets.tvm_sparse_crossover.
  measure_crossovers`: each candidate layer's dense and sparse kernels linked into one wasm program and timed
  interleaved, the crossover table the wasm compile then reads), so the manifest says which layers went
  sparse and the gain measured for each;
* the sparse wasm bundle (``--sparse auto``) is checked against onnxruntime on the pruned model (max error
  relative to the output's magnitude, bar 1e-4);
* the dense wasm bundle (``--sparse off``) and the sparse one are timed under node (wasm runs one thread) in
  ``ROUNDS`` interleaved rounds (dense, sparse, dense, ...): the speedup is the median of the per-round ratios,
  so a load change between rounds cancels;
* the weights files are compared (the sparse file holds the stored values + int32 indices of the sparse layers).

onnxruntime has no wasm build here (onnxruntime-web runs in a browser), so there is no onnxruntime column for
wasm; bench/sparse.py's x86 rows have one. Load averages are printed with each row (the machine is shared).
Results: ``bench/sparse_wasm_results.txt`` and ``.json`` (``--out``: another file). The coordinator's
``bench/sparse.py --parts b`` calls :func:`wasm_end_to_end` after its x86 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.targets import load_average

OUT = ROOT / "bench" / "sparse_wasm_results.txt"
ROUNDS = 5
#: Relative error bar of the sparse kernels against onnxruntime (issue 14).
RTOL = 1e-4
HEADER = (f"  {'model':<13} {'spars':>5} {'dense ms':>9} {'sparse ms':>9} {'speedup':>8} {'sparse/cand':>11} "
          f"{'w file':>7} {'rel err':>8}  load")  # fmt: skip


def _inputs(manifest: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i["name"]: rng.standard_normal(i["shape"]).astype(i["dtype"]) for i in manifest["inputs"]}


def relative_error(bundle: Path, model: Path) -> float:
    """Max |bundle - onnxruntime| over the output's max |onnxruntime| (onnxruntime with 1 thread)."""
    from onnxprune.targets import read_manifest, run_bundle

    inputs = _inputs(read_manifest(bundle, verify=False))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    ref = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"]).run(None, inputs)
    got = list(run_bundle(bundle, inputs, verify=False).values())
    return max(float(np.max(np.abs(g - r)) / (np.max(np.abs(r)) or 1.0)) for g, r in zip(got, ref))


def time_interleaved(dense: Path, sparse: Path, repeat: int) -> tuple[float, float, float]:
    """(dense ms, sparse ms, speedup): medians over ``ROUNDS`` interleaved rounds; the speedup is the median
    of the per-round dense / sparse ratios."""
    from onnxprune.targets import read_manifest, run_bundle

    inputs = _inputs(read_manifest(dense, verify=False))
    per = max(1, repeat // ROUNDS)
    d_ms, s_ms = [], []
    for _ in range(ROUNDS):
        d_ms.append(float(run_bundle(dense, inputs, repeat=per, verify=False)["__median_ms__"]))
        s_ms.append(float(run_bundle(sparse, inputs, repeat=per, verify=False)["__median_ms__"]))
    ratio = float(np.median(np.array(d_ms) / np.array(s_ms)))
    return float(np.median(d_ms)), float(np.median(s_ms)), ratio


def wasm_end_to_end(
    models: list[tuple[str, Path]],
    sparsities: list[float],
    work: Path,
    repeat: int,
    say: Callable[[str], None],
    prune: Callable[[Path, Path, float, str], Path],
    pattern: str = "group:1x4",
) -> list[dict]:
    """Bench (b) on wasm for each (label, ONNX model): see the module doc. ``prune(model, out, s, pattern)``
    writes the pruned model (``bench/sparse.py``'s ``sparsify``; a pruned file already in ``work`` under the
    same name is reused). Returns one dict per row; prints the table through ``say``."""
    from onnxprune.targets import compile_bundle, read_manifest
    from onnxprune.targets.tvm_sparse_crossover import measure_crossovers

    say(f"(b, wasm) {pattern} sparsity end to end under node (1 thread): sparse wasm bundle (--sparse auto, "
        "layers measured under node) vs dense wasm bundle")  # fmt: skip
    say(HEADER)
    rows: list[dict] = []
    for label, model in models:
        t = time.perf_counter()
        dense = compile_bundle(model, "wasm", work / f"{label}.wasm.dense", sparse="off")
        dense_w = read_manifest(dense, verify=False)["weights"]["bytes"]
        say(f"  {label}: dense wasm bundle compiled in {time.perf_counter() - t:.0f} s, weights "
            f"{dense_w / 1e6:.2f} MB")  # fmt: skip
        for s in sparsities:
            pruned = work / f"{label}.s{int(round(s * 100))}.onnx"
            if not pruned.is_file():
                prune(model, pruned, s, pattern)
            t = time.perf_counter()
            measure_crossovers(pruned, "wasm")  # the crossover table the compile reads
            measure_s = time.perf_counter() - t
            t = time.perf_counter()
            bundle = compile_bundle(
                pruned, "wasm", work / f"{label}.wasm.s{int(round(s * 100))}", sparse="auto"
            )
            compile_s = time.perf_counter() - t
            m = read_manifest(bundle, verify=False)
            err = relative_error(bundle, pruned)
            load = load_average()
            d_ms, s_ms, speedup = time_interleaved(dense, bundle, repeat)
            layers = m["sparse"]["layers"]
            went = [e for e in layers if e["choice"] == "sparse"]
            row = {"model": label, "pattern": pattern, "sparsity": s, "dense_ms": d_ms, "sparse_ms": s_ms,
                   "speedup": speedup, "weights_bytes": m["weights"]["bytes"], "dense_weights_bytes": dense_w,
                   "sparse_layers": len(went), "candidate_layers": len(layers), "rel_err": err,
                   "measure_s": measure_s, "compile_s": compile_s, "load": load, "layers": layers}  # fmt: skip
            rows.append(row)
            say(f"  {label:<13} {s:>5.2f} {d_ms:>9.2f} {s_ms:>9.2f} {speedup:>7.2f}x {len(went):>5}/{len(layers):<5} "
                f"{m['weights']['bytes'] / dense_w:>7.3f} {err:>8.1e}  {load}")  # fmt: skip
            gains = [f"{e['layer']}:{e['gain']:.2f}x" for e in went if "gain" in e]
            kept = [f"{e['layer']}:{e['gain']:.2f}x" if "gain" in e else f"{e['layer']}:est {e['estimate']:.2f}"
                    for e in layers if e["choice"] == "dense"]  # fmt: skip
            say(
                f"      sparse (measured gain): {', '.join(gains[:10]) or '-'}{' ...' if len(gains) > 10 else ''}"
            )
            say(f"      kept dense (measured gain, or the cost model's estimate): {', '.join(kept[:8]) or '-'}"
                f"{' ...' if len(kept) > 8 else ''}")  # fmt: skip
    for r in rows:
        say(f"  {r['model']} {r['sparsity']:.0%}: {r['speedup']:.2f}x over the dense wasm bundle; weights file "
            f"{r['weights_bytes'] / r['dense_weights_bytes']:.1%} of dense; error {r['rel_err']:.1e} "
            f"({'within' if r['rel_err'] <= RTOL else 'OVER'} 1e-4)")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="30%% and 90%% only")
    ap.add_argument("--models", default="mobilenet_v1,resnet18", help="comma separated (default both)")
    ap.add_argument(
        "--repeat", type=int, default=10, help="calls per bundle, split over the rounds (default 10)"
    )
    ap.add_argument("--cache", help="crossover-table folder to reuse (default: a fresh one per run)")
    ap.add_argument("--out", help="results file (default bench/sparse_wasm_results.txt; .json next to it)")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else OUT
    # run alone: bench/sparse.py's model builder and pruner (bench/sparse.py imports this module only inside
    # its part (b), for wasm_end_to_end)
    from bench.sparse import ZOO, mobilenet_v1, sparsify

    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)
        out.write_text("\n".join(lines) + "\n")  # as it goes

    sparsities = [0.3, 0.9] if args.quick else [0.3, 0.5, 0.7, 0.9]
    with tempfile.TemporaryDirectory(prefix="onnxprune-sparse-wasm-") as tmp:
        work = Path(tmp)
        os.environ["ONNXPRUNE_TUNE_CACHE"] = args.cache or str(work / "cache")
        t0 = time.time()
        say(f"bench/sparse_wasm.py{' --quick' if args.quick else ''}  {time.strftime('%Y-%m-%d %H:%M')}  "
            f"load average before: {load_average()}  (wasm: 1 thread)")  # fmt: skip
        models: list[tuple[str, Path]] = []
        for name in args.models.split(","):
            if name == "mobilenet_v1":
                models.append((name, mobilenet_v1(work / "mobilenet_v1.onnx")))
            elif (ZOO / f"{name}.onnx").is_file():
                models.append((name, ZOO / f"{name}.onnx"))
            else:
                say(f"  {name}: {ZOO / name}.onnx not found (ONNXPRUNE_MODEL_CACHE), skipped")
        rows = wasm_end_to_end(models, sparsities, work, args.repeat, say, sparsify)
        say(f"load average after: {load_average()}  ({time.time() - t0:.0f} s)")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
