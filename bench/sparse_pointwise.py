"""Sparse vs dense for MobileNet-v1's pointwise (1x1) convolutions, one layer at a time (issue 14, bar (b)).

    python bench/sparse_pointwise.py [--shapes all|quick|I,J] [--sparsity 0.3,0.5] [--patterns ...]
        [--rounds 5] [--no-ort] [--out FILE]

For every pointwise shape of MobileNet-v1 at batch 1, 224x224 (112x112x32->64 ... 7x7x1024->1024) and each
sparsity, a random weight is pruned with each group pattern (magnitude, whole tiles zeroed with
:func:`onnxprune.sparsity.patterns.tile_mask`, rows = outputs as the pruner sees a conv) and timed as:

* ``dense``: the bundle's own dense kernel: a Relax NHWC ``conv2d`` through
  :func:`onnxprune.targets.tvm_backend.build_executable` (layout, weight packing, register tiles of
  :mod:`onnxprune.targets.tvm_schedules`);
* ``group1x4``: the existing group kernel (:mod:`onnxprune.targets.tvm_sparse_group`, ``group:1x4``,
  runs along the reduction axis);
* ``rows4`` / ``rows8``: the output-row-blocked kernel (:mod:`onnxprune.targets.tvm_sparse_rows`,
  ``group:4x1`` / ``group:8x1``: 4 or 8 outputs share each kept input channel);
* ``ort``: onnxruntime's dense Conv (NCHW, 1 intra-op thread) on the same weight;
* ``fma-peak``: a register-only FMA loop (16 independent accumulators, no loads): the machine's FMA peak.

All TVM variants of a shape are compiled into ONE Relax module and timed interleaved with onnxruntime in this
process, 1 thread (``TVM_NUM_THREADS=1``): per round each variant is called ``repeat`` times (~40 ms of dense
work) and its **CPU time** per call taken (the wall clock of a loaded shared machine counts the slices spent
waiting for a core: see :func:`time_calls`), the best of ``--rounds`` rounds; only ratios measured this way are
compared. Calls go through the Relax VM from Python (a few microseconds each, the same for every TVM variant). ``uptime`` load averages are printed before and after each shape. The text goes to
``bench/sparse_pointwise_results.txt`` (``--out``) as it is measured; ``--wasm`` times the same variants
under node instead. The committed results file ends with the wasm rows and a hand-written analysis (loads per
FMA, where the sparse kernel loses, what was tried): an x86 re-run rewrites the measured part and keeps those
sections (everything from the first line starting with ``== ``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "sparse_pointwise_results.txt"
#: MobileNet-v1 pointwise layers at 224x224, batch 1: (H = W, K in, N out, how many in the model).
SHAPES = [(112, 32, 64, 1), (56, 64, 128, 1), (56, 128, 128, 1), (28, 128, 256, 1), (28, 256, 256, 1),
          (14, 256, 512, 1), (14, 512, 512, 5), (7, 512, 1024, 1), (7, 1024, 1024, 1)]  # fmt: skip
#: pattern name -> (group tile rows x cols in the pruner's [out, in] notation, BSR block (bk, bn), kernel)
PATTERNS = {
    "group1x4": ((1, 4), (4, 1), "group", {}),
    "rows4": ((4, 1), (1, 4), "rows", {}),
    "rows8": ((8, 1), (1, 8), "rows", {}),
    "rows8p1": ((8, 1), (1, 8), "rows", {"pixel_vectors": 1}),
}
#: Patterns timed unless --patterns says otherwise (rows8p1: one pixel vector per tile, an experiment).
DEFAULT_PATTERNS = ("group1x4", "rows4", "rows8")
LINES: list[str] = []


def say(line: str = "", out: Path = OUT) -> None:
    print(line, flush=True)
    LINES.append(line)
    out.write_text("\n".join(LINES) + "\n")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def pruned_weight(rng: np.random.Generator, k: int, n: int, tile: tuple[int, int], s: float) -> np.ndarray:
    """A ``[K, N]`` weight with ``s`` of its ``tile``-shaped groups (``[out, in]`` notation) zeroed by
    magnitude, as ``onnxprune prune --pattern group:RxC`` does data-free."""
    from onnxprune.sparsity.patterns import Pattern, tile_mask

    w = rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
    keep = tile_mask(np.abs(w), Pattern("group", *tile), s)
    return np.ascontiguousarray((w * keep).T)


def sparse_func(kind: str, x_shape, out_shape, bsr, lanes: int, registers: int, **kw):
    from onnxprune.targets.tvm_sparse_group import cpu_group_kernel
    from onnxprune.targets.tvm_sparse_rows import cpu_rows_kernel

    if kind == "group":
        f = cpu_group_kernel(x_shape, out_shape, (1, 1), bsr, lanes)
    else:
        f = cpu_rows_kernel(x_shape, out_shape, (1, 1), bsr, lanes, registers, **kw)
    return f.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)


def fma_peak_func(lanes: int, iters: int):
    """16 independent vector accumulators, ``acc = acc * a + b`` ``iters`` times, no memory traffic."""
    from tvm.script import tirx as T

    acc_n = 16

    @T.prim_func(private=True)
    def peak(a: T.Buffer((lanes,), "float32"), y: T.Buffer((acc_n, lanes), "float32")):
        T.func_attr({"tirx.noalias": True})
        acc = T.alloc_buffer((acc_n, lanes), "float32", scope="local")
        av = T.alloc_buffer((lanes,), "float32", scope="local")
        for t in T.vectorized(lanes):
            av[t] = a[t]
        for i in T.unroll(acc_n):
            for t in T.vectorized(lanes):
                acc[i, t] = a[t] + T.float32(i)
        for _it in T.serial(iters):
            for i in T.unroll(acc_n):
                for t in T.vectorized(lanes):
                    acc[i, t] = acc[i, t] * av[t] + T.float32(1e-7)
        for i in T.unroll(acc_n):
            for t in T.vectorized(lanes):
                y[i, t] = acc[i, t]

    return peak.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8), acc_n * lanes * iters


def build_module(h: int, k: int, n: int, variants: dict, lanes: int, registers: int):
    """One Relax module: ``dense`` (conv2d through the pipeline) and every sparse variant (call_tir)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x_shape, out_shape = (1, h, h, k), (1, h, h, n)
    some_w = next(iter(variants.values()))[0]
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("dense", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.conv2d(x, relax.const(some_w.reshape(1, 1, k, n)),
                                                    data_layout="NHWC", kernel_layout="HWIO"))  # fmt: skip
        bb.emit_func_output(out)
    for name, (_w, bsr, kind, kw) in variants.items():
        x = relax.Var("x", relax.TensorType(x_shape, "float32"))
        with bb.function(name, [x]):
            with bb.dataflow():
                gv = bb.add_func(
                    sparse_func(kind, x_shape, out_shape, bsr, lanes, registers, **kw), f"k_{name}"
                )
                args = [x, relax.const(bsr.data), relax.const(bsr.indices), relax.const(bsr.indptr),
                        relax.const(np.zeros(n, np.float32))]  # fmt: skip
                out = bb.emit_output(relax.call_tir(gv, args, relax.TensorType(out_shape, "float32")))
            bb.emit_func_output(out)
    return bb.get()


def ort_session(w_kn: np.ndarray, h: int):
    """onnxruntime on a one-Conv NCHW model with the ``[K, N]`` weight, 1 intra-op thread."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = w_kn.shape
    wt = numpy_helper.from_array(np.ascontiguousarray(w_kn.T.reshape(n, k, 1, 1), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "pw",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k, h, h])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n, h, h])], [wt])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def time_calls(f, repeat: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per call of ``f`` over ``repeat`` calls after 2 warm-up calls.

    CPU time of this process, because on a machine shared with other processes the wall clock counts the
    time slices this process waits for a core (at load 8-10 on 2 cores a call's wall time was 3-4x its CPU
    time, and more so for longer measurement windows); every variant runs on this one thread
    (``TVM_NUM_THREADS=1``, onnxruntime with 1 intra-op thread), so CPU time is its run time."""
    for _ in range(2):
        f()
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(repeat):
        f()
    c1, t1 = time.process_time(), time.perf_counter()
    return (c1 - c0) / repeat * 1e3, (t1 - t0) / repeat * 1e3


def make_variants(
    h: int, k: int, n: int, sparsities: list[float], patterns: list[str]
) -> tuple[dict[str, tuple], np.random.Generator]:
    """``{pattern_sNN: (weight, BSR, kernel kind, kernel options)}`` for one shape, and the shape-seeded
    generator that drew them (the input is drawn next from it)."""
    from onnxprune.targets.sparse_formats import to_bsr

    rng = np.random.default_rng(h * 7 + k + n)
    variants: dict[str, tuple] = {}
    for s in sparsities:
        for p in patterns:
            tile, block, kind, kw = PATTERNS[p]
            w = pruned_weight(rng, k, n, tile, s)
            variants[f"{p}_s{round(s * 100)}"] = (w, to_bsr(w, block), kind, kw)
    return variants, rng


def bench_shape(h: int, k: int, n: int, sparsities: list[float], patterns: list[str], rounds: int,
                with_ort: bool, peak_gmacs: float | None, out: Path) -> list[dict]:  # fmt: skip
    """Time every variant of one shape at every sparsity (one module, interleaved rounds)."""
    import tvm
    from tvm import relax

    from onnxprune.targets import tvm_backend as tb
    from onnxprune.targets.table import get_target

    variants, rng = make_variants(h, k, n, sparsities, patterns)
    t0 = time.time()
    ex = tb.build_executable(build_module(h, k, n, variants, 16, 32), get_target("x86"))
    build_s = time.time() - t0
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    x = rng.standard_normal((1, h, h, k)).astype(np.float32)
    xin = tvm.runtime.tensor(x, dev)
    for name, (w, _bsr, _kind, _kw) in variants.items():  # every kernel is checked before it is timed
        got = vm[name](xin).numpy().reshape(-1, n)
        ref = x.reshape(-1, k).astype(np.float64) @ w
        err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        if err > 1e-4:
            raise AssertionError(f"{name} at {h}x{h}x{k}->{n}: relative error {err:.2e}")
    sessions = {}
    if with_ort:
        x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        sessions = {s: ort_session(variants[f"{patterns[0]}_s{round(s * 100)}"][0], h) for s in sparsities}
    calls = {"dense": lambda: vm["dense"](xin)}
    calls.update({v: (lambda v=v: vm[v](xin)) for v in variants})
    calls.update({f"ort_s{round(s * 100)}": (lambda sess=sess: sess.run(None, {"x": x_nchw}))
                  for s, sess in sessions.items()})  # fmt: skip
    best = {v: float("inf") for v in calls}
    wall = {v: float("inf") for v in calls}
    load_before = load_average()
    repeat = max(5, min(200, int(2e9 / (h * h * k * n))))  # ~40 ms of dense work per measurement
    for _ in range(rounds):
        for v, f in calls.items():
            cpu_ms, wall_ms = time_calls(f, repeat)
            best[v], wall[v] = min(best[v], cpu_ms), min(wall[v], wall_ms)
    macs = h * h * k * n
    dense = best["dense"]
    gmacs = macs / dense / 1e6
    peak = f", {gmacs / peak_gmacs:.0%} of the FMA peak" if peak_gmacs else ""
    say(f"{h}x{h}x{k}->{n}  ({macs / 1e6:.1f} M MAC; compiled in {build_s:.0f} s; load {load_before} -> "
        f"{load_average()})  dense {dense:.3f} ms CPU ({wall['dense']:.3f} ms wall) = {gmacs:.1f} GMAC/s{peak}",
        out)  # fmt: skip
    say(f"  {'spars':>5} {'pattern':>9} {'kernel':>10} {'dense ms':>9} {'sparse ms':>10} {'ratio':>6} "
        f"{'MAC/s eff':>9} {'ort ms':>7}", out)  # fmt: skip
    rows = []
    for s in sparsities:
        ort_ms = best.get(f"ort_s{round(s * 100)}", float("nan"))
        for p in patterns:
            name = f"{p}_s{round(s * 100)}"
            w = variants[name][0]
            kept = float(np.count_nonzero(w)) / w.size
            ms = best[name]
            # per stored multiply-add, relative to dense per multiply-add (1.0: as efficient as dense)
            eff = dense / (ms / kept)
            tile = "x".join(str(v) for v in PATTERNS[p][0])
            say(f"  {s:5.2f} {'group:' + tile:>9} {p:>10} {dense:9.3f} {ms:10.3f} {dense / ms:5.2f}x "
                f"{eff:9.2f} {ort_ms:7.3f}", out)  # fmt: skip
            rows.append({"shape": (h, k, n), "sparsity": s, "pattern": p, "dense_ms": dense, "sparse_ms": ms,
                         "ratio": dense / ms, "efficiency": eff, "ort_ms": ort_ms})  # fmt: skip
    return rows


def bench_shape_wasm(h: int, k: int, n: int, sparsities: list[float], patterns: list[str], rounds: int,
                     out: Path) -> list[dict]:  # fmt: skip
    """The same table on wasm (SIMD128: 4 lanes, 16 registers) under node, one thread: every variant linked
    into one wasm program and timed interleaved by the runner (:func:`onnxprune.targets.wasm.time_functions`:
    each function's fastest batch of >= 5 ms). Numerics of the wasm-width tiles are checked by
    tests/test_sparse_kernels_rows.py (4-lane tiles compiled for x86)."""
    from onnxprune.targets import tvm_backend as tb
    from onnxprune.targets import wasm
    from onnxprune.targets.table import get_target
    from onnxprune.targets.tvm_tiles import vector_lanes, vector_registers

    spec = get_target("wasm")
    target = tb.build_target(spec)
    lanes, registers = vector_lanes(target), vector_registers(target)
    variants, rng = make_variants(h, k, n, sparsities, patterns)
    t0 = time.time()
    ex = tb.build_executable(build_module(h, k, n, variants, lanes, registers), spec)
    build_s = time.time() - t0
    x = rng.standard_normal((1, h, h, k)).astype(np.float32)
    load_before = load_average()
    us = wasm.time_functions(ex, spec, [(v, 0) for v in ["dense", *variants]], [x], rounds=rounds)
    dense = us["dense"] / 1e3
    say(f"wasm {h}x{h}x{k}->{n}  ({h * h * k * n / 1e6:.1f} M MAC; compiled in {build_s:.0f} s; load {load_before} "
        f"-> {load_average()})  dense {dense:.3f} ms under node", out)  # fmt: skip
    rows = []
    for s in sparsities:
        for p in patterns:
            name = f"{p}_s{round(s * 100)}"
            ms = us[name] / 1e3
            kept = float(np.count_nonzero(variants[name][0])) / (k * n)
            tile = "x".join(str(v) for v in PATTERNS[p][0])
            say(f"  {s:5.2f} {'group:' + tile:>9} {p:>10} {dense:9.3f} {ms:10.3f} {dense / ms:5.2f}x "
                f"{dense / (ms / kept):9.2f}", out)  # fmt: skip
            rows.append({"shape": (h, k, n), "sparsity": s, "pattern": p, "dense_ms": dense, "sparse_ms": ms})
    return rows


def fma_peak(rounds: int = 3) -> float:
    """GMAC/s of a register-only FMA loop (16 accumulators of 16 lanes): the machine's single-core peak."""
    import tvm

    from onnxprune.targets import tvm_backend as tb
    from onnxprune.targets.table import get_target

    func, macs = fma_peak_func(16, 200_000)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=tb.build_target(get_target("x86")))  # fmt: skip
    a = tvm.runtime.tensor(np.full(16, 0.999, np.float32))
    y = tvm.runtime.tensor(np.zeros((16, 16), np.float32))
    main_fn = (lib.jit() if hasattr(lib, "jit") else lib)["main"]
    best_ms = min(time_calls(lambda: main_fn(a, y), 20)[0] for _ in range(rounds))
    return macs / best_ms / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="all", help="all, quick (3 shapes) or indices into SHAPES: 0,4,6")
    ap.add_argument("--sparsity", default="0.3,0.5")
    ap.add_argument("--patterns", default=",".join(DEFAULT_PATTERNS), help=f"of {', '.join(PATTERNS)}")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-ort", action="store_true")
    ap.add_argument("--wasm", action="store_true", help="time under node (wasm SIMD128) instead of x86")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    shapes = (SHAPES if args.shapes == "all" else [SHAPES[i] for i in (0, 4, 6)] if args.shapes == "quick"
              else [SHAPES[int(i)] for i in args.shapes.split(",")])  # fmt: skip
    sparsities = [float(v) for v in args.sparsity.split(",")]
    patterns = args.patterns.split(",")
    old = args.out.read_text() if args.out.is_file() and not args.wasm else ""
    at = old.find("\n== ")
    kept_sections = old[at:] if at >= 0 else ""  # the wasm rows and the hand-written analysis
    say(f"bench/sparse_pointwise.py  {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC  load average "
        f"{load_average()}  threads: {os.environ['TVM_NUM_THREADS']}", args.out)  # fmt: skip
    if args.wasm:
        say("wasm (SIMD128) under node, 1 thread; ratio = dense ms / sparse ms", args.out)
        for h, k, n, _count in shapes:
            bench_shape_wasm(h, k, n, sparsities, patterns, min(args.rounds, 3), args.out)
        say(f"load average at the end: {load_average()}", args.out)
        return 0
    peak = fma_peak()
    say(f"FMA peak (register-only loop, 16 x 16-lane accumulators, CPU time): {peak:.1f} GMAC/s "
        f"(= {2 * peak:.0f} GFLOP/s; load {load_average()})", args.out)  # fmt: skip
    say("ratio = dense ms / sparse ms (> 1: sparse faster); MAC/s eff = the sparse kernel's multiply-adds per second "
        "(stored weights only) / the dense kernel's (1.0: as efficient per FMA as dense)", args.out)  # fmt: skip
    rows = []
    for h, k, n, _count in shapes:
        rows += bench_shape(h, k, n, sparsities, patterns, args.rounds, not args.no_ort, peak, args.out)
    say("", args.out)
    say("model total (each shape x its count in MobileNet-v1; pointwise layers only), ms:", args.out)
    counts = {(h, k, n): c for h, k, n, c in shapes}
    for s in sparsities:
        dense = sum(
            r["dense_ms"] * counts[r["shape"]]
            for r in rows
            if r["sparsity"] == s and r["pattern"] == patterns[0]
        )
        parts = []
        for p in patterns:
            sel = [r for r in rows if r["sparsity"] == s and r["pattern"] == p]
            sp = sum(r["sparse_ms"] * counts[r["shape"]] for r in sel)
            choice = sum(min(r["sparse_ms"], r["dense_ms"]) * counts[r["shape"]] for r in sel)
            parts.append(
                f"{p} {sp:.2f} ({dense / sp:.2f}x; per-layer best of dense/sparse {dense / choice:.2f}x)"
            )
        say(f"  {s:.2f}: dense {dense:.2f}; " + "; ".join(parts), args.out)
    say(f"load average at the end: {load_average()}", args.out)
    if kept_sections:
        args.out.write_text("\n".join(LINES) + "\n" + kept_sections)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
