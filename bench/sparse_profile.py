"""Where the time of a BERT-like encoder goes, kernel by kernel, in the dense and the sparse x86 bundle.

    python bench/sparse_profile.py [--model PATH] [--seq 128] [--sparsity 0.9] [--every-layer] [--rounds 5]
        [--fastest] [--out FILE]

Prunes the model (``block:16x1``, as ``bench/sparse.py`` part (c)), compiles the dense (``--sparse off``) and
the sparse (``--sparse auto``) executables in this process with the bundles' pipeline
(:func:`onnxprune.targets.tvm_backend.build_executable`, weights passed as parameters as the runner does),
then:

* end to end: ``main`` of both VMs, interleaved rounds, median of the round medians;
* per kernel: one run with the VM's instrument hook records every kernel call and a copy of its arguments;
  each call is then timed alone (best of 3 x 5 calls, its data warm in cache) and summed by kind: sparse
  linear layers, dense linear layers, attention, LayerNorm, softmax, other (copies, embeddings,
  element-wise). ``e2e - kernels`` is what the VM adds (allocation, dispatch) plus the cache misses a warm
  kernel does not see.

The Amdahl line: the time both bundles share (everything but the linear layers) bounds the end-to-end gain
of sparse weights: ``dense / shared`` is the ratio if the sparse linear layers cost nothing. Threads: 1
(``TVM_NUM_THREADS``). Output: the table, and ``--out`` (default ``bench/sparse_profile_results.txt``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sparse import ZOO, sparsify
from bench.targets import load_average

KINDS = ("sparse linear", "dense linear", "attention", "layer norm", "softmax", "other")


def kind(symbol: str) -> str:
    """The kind of a kernel, from its name."""
    if symbol.startswith("sparse_"):
        return "sparse linear"
    if symbol.startswith("attention"):
        return "attention"
    if "layer_norm" in symbol:
        return "layer norm"
    if "softmax" in symbol:
        return "softmax"
    if re.search(r"(^|_)(matmul|dense)\d*(_|$)", symbol):
        # a batch matmul of the unfused attention is also "matmul": told apart by its weight (a parameter)
        return "dense linear"
    return "other"


def build(path: Path, seq: int, sparse: str):
    from onnxprune.targets import bundle as B
    from onnxprune.targets import tvm_backend as tb
    from onnxprune.targets.table import get_target

    model = onnx.load(path)
    inputs = [B.TensorSpec(i.name, (1, seq), "int64") for i in model.graph.input]
    weights: list[np.ndarray] = []
    report: dict = {}
    ex = tb.build_executable(tb.import_onnx(model, inputs), get_target("x86"), weights=weights, sparse=sparse,
                             sparse_report=report)  # fmt: skip
    return ex, weights, inputs


def profile(ex, weights: list[np.ndarray], feed: list[np.ndarray]):
    """(vm main, args, per-kind ms dict, kernel call count) for one executable."""
    import tvm
    from tvm import relax

    rt = ex.jit()
    vm = relax.VirtualMachine(rt, tvm.cpu())
    args = [tvm.runtime.tensor(a) for a in feed] + [tvm.runtime.tensor(w) for w in weights]
    calls: list[tuple[str, list]] = []

    def instrument(_func, symbol, before, _ret, *call_args):
        if before and not symbol.startswith("vm.builtin"):
            calls.append((symbol, [a.copyto(tvm.cpu()) if hasattr(a, "copyto") else a for a in call_args]))
        return 0

    vm.set_instrument(instrument)
    vm["main"](*args)
    vm.set_instrument(None)
    per_kind = dict.fromkeys(KINDS, 0.0)
    for symbol, call_args in calls:
        fn = rt.get_function(symbol, query_imports=True)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(5):
                fn(*call_args)
            best = min(best, (time.perf_counter() - t0) / 5)
        per_kind[kind(symbol)] += best * 1e3
    return vm["main"], args, per_kind, len(calls)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ZOO / "minilm_l6.onnx"))
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--every-layer", action="store_true", help="no layer kept dense by the pruner")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--fastest", action="store_true",
                    help="end to end as the fastest call (a loaded machine), not the median")  # fmt: skip
    ap.add_argument("--out", default=str(ROOT / "bench" / "sparse_profile_results.txt"))
    args = ap.parse_args(argv)
    from onnxprune.importer import fix_input_shapes

    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    say(f"bench/sparse_profile.py {' '.join(argv if argv is not None else sys.argv[1:])}  "
        f"{time.strftime('%Y-%m-%d %H:%M')}  load average before: {load_average()}  threads: "
        f"{os.environ['TVM_NUM_THREADS']}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="onnxprune-sparse-profile-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("ONNXPRUNE_TUNE_CACHE", str(work / "cache"))
        m = onnx.load(args.model)
        fix_input_shapes(m, {i.name: [1, args.seq] for i in m.graph.input})
        fixed = work / "model.onnx"
        onnx.save(m, fixed)
        pruned = sparsify(fixed, work / "sparse.onnx", args.sparsity, "block:16x1", args.every_layer)
        rng = np.random.default_rng(0)
        runs = {}
        for label, path, mode in (("dense", fixed, "off"), ("sparse", pruned, "auto")):
            ex, weights, inputs = build(path, args.seq, mode)
            feed = [(rng.integers(0, 100, (1, args.seq)) if i.name == "input_ids" else
                     np.ones((1, args.seq)) if "mask" in i.name else np.zeros((1, args.seq))).astype("int64")
                    for i in inputs]  # fmt: skip
            runs[label] = profile(ex, weights, feed)
        e2e: dict[str, list[float]] = {k: [] for k in runs}
        fastest: dict[str, float] = dict.fromkeys(runs, float("inf"))
        for _ in range(args.rounds):
            for label, (main_fn, vm_args, _, _) in runs.items():
                ts = []
                for _ in range(10):
                    t0 = time.perf_counter()
                    main_fn(*vm_args)
                    ts.append((time.perf_counter() - t0) * 1e3)
                e2e[label].append(float(np.median(ts)))
                fastest[label] = min(fastest[label], *ts)
    # on a loaded machine the fastest call is the better estimate of the uncontended time (kernels: best of 3)
    med = fastest if args.fastest else {k: float(np.median(v)) for k, v in e2e.items()}
    say(f"model {Path(args.model).name}, seq {args.seq}, {args.sparsity:.0%} block:16x1"
        f"{' (every layer)' if args.every_layer else ''}; ms")  # fmt: skip
    say(f"  {'kernel kind':<16} {'dense':>8} {'sparse':>8}")
    for k in KINDS:
        say(f"  {k:<16} {runs['dense'][2][k]:>8.3f} {runs['sparse'][2][k]:>8.3f}")
    sums = {k: sum(r[2].values()) for k, r in runs.items()}
    say(f"  {'kernels':<16} {sums['dense']:>8.3f} {sums['sparse']:>8.3f}   "
        f"(calls: {runs['dense'][3]} / {runs['sparse'][3]})")  # fmt: skip
    say(f"  {'e2e - kernels':<16} {med['dense'] - sums['dense']:>8.3f} {med['sparse'] - sums['sparse']:>8.3f}")
    say(f"  {'end to end':<16} {med['dense']:>8.3f} {med['sparse']:>8.3f}   ratio {med['dense'] / med['sparse']:.2f}x "
        f"({'fastest call' if args.fastest else 'median'}; median of round medians "
        f"{np.median(e2e['dense']):.2f} / {np.median(e2e['sparse']):.2f} ms)")  # fmt: skip
    linear = {k: r[2]["sparse linear"] + r[2]["dense linear"] for k, r in runs.items()}
    shared = med["sparse"] - linear["sparse"]
    say(f"Amdahl: sparse bundle = {linear['sparse']:.2f} ms linear layers + {shared:.2f} ms shared "
        f"(attention, norms, copies, VM); linear layers {linear['dense']:.2f} -> {linear['sparse']:.2f} ms "
        f"({linear['dense'] / max(linear['sparse'], 1e-9):.1f}x); with free linear layers the ratio would be "
        f"{med['dense'] / max(shared, 1e-9):.2f}x")  # fmt: skip
    say(f"load average after: {load_average()}")
    Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
