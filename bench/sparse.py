"""Sparse kernels vs dense, from one layer to whole models (issue 14, part 5).

    python bench/sparse.py [--quick] [--parts a,b,c,d] [--repeat N] [--cache DIR] [--threads N] [--out FILE]
                           [--b-models mobilenet_v1,resnet18] [--b-sparsities 0.3,0.5,0.7,0.9] [--b-targets x86,wasm]

(a) One linear layer 768x3072 (BERT-base FFN) at batch 1 and 16, block sparsity (``block:16x1``: 16 outputs
    share one input position, stored as [1, 16] blocks, one AVX-512 vector) and group sparsity (``group:1x4``:
    runs of 4 along the reduction axis) at 50/70/90/95%: the sparse TVM kernel vs the dense TVM kernel (the
    project's default schedules), compiled into one module and timed interleaved
    (:func:`onnxprune.targets.tvm_sparse_choice.measure`), and onnxruntime on the same one-op model.
(b) A MobileNet-v1-style model (built here, random weights, 224x224) and ResNet-18 (zoo) at 30/50/70/90%
    ``group:1x4`` sparsity (``onnxprune prune --sparsity S --pattern group:1x4``: magnitude, data-free) end to
    end: sparse bundle (``--sparse auto``: each layer timed dense vs sparse, the faster kept) vs the dense
    bundle (``--sparse off``) vs onnxruntime on the dense model. What the per-layer choice did is printed.
(c) MiniLM-L6 and BERT-tiny (zoo) at 90% ``block:16x1`` sparsity end to end, as (b); MiniLM-L6 twice: as
    ``onnxprune prune`` leaves it (its first Q/K/V and its last FFN output stay dense: 4 of 36 linears, 10% of
    the linear weights) and with every linear at 90% (``minilm_l6_all``). Where the time goes, kernel by
    kernel: ``bench/sparse_profile.py``.
(d) Accuracy vs sparsity: helper G's ``bench/sparse_accuracy.py`` (run with its defaults; ``--quick``: one
    model).

Bars (issue 14): (a) block-sparse at 90% >= 4x the dense TVM kernel at batch 1; (b) >= 1.3x end to end over
the dense bundle at 30% group sparsity, more at higher sparsity; (c) >= 3x at 90% block sparsity.

Bundles run through their own runner (``run_bundle(repeat=...)``), onnxruntime in-process with as many
threads as the runner; each is called in ``ROUNDS`` interleaved rounds, median of the round medians. Load
averages are printed before and after (other processes on a shared machine make every number noisy). Do
not edit the kernel sources while it runs: TVMScript re-reads a kernel's source file each time it builds one. Layer
timings of the choice are cached in a fresh folder per run unless ``--cache`` names one. Results go to
``bench/sparse_results.txt`` and ``bench/sparse_results.json`` (``--out``: another file; the text is
written as it is measured). The last (b) run is in ``bench/sparse_results_b.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.targets import load_average, ort_median_ms, ort_options

OUT = ROOT / "bench" / "sparse_results.txt"
ROUNDS = 5
ZOO = Path(os.environ.get("ONNXPRUNE_MODEL_CACHE", "/work/zoo-cache"))
LINES: list[str] = []
RESULTS: dict[str, object] = {}


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)
    OUT.write_text("\n".join(LINES) + "\n")  # as it goes: a long run cut short keeps what it measured


# ------------------------------------------------------------------------------------------------
# models and sparsity
# ------------------------------------------------------------------------------------------------
def zero_tiles(w_kn: np.ndarray, block: tuple[int, int], s: float) -> np.ndarray:
    """Zero the ``s`` fraction of ``block``-tiles of a ``[K, N]`` weight with the smallest L2 norm."""
    bk, bn = block
    k, n = w_kn.shape
    norms = np.sqrt((w_kn.reshape(k // bk, bk, n // bn, bn) ** 2).sum(axis=(1, 3)))
    cut = np.quantile(norms, s)
    keep = norms > cut
    return (w_kn * np.kron(keep, np.ones(block))).astype(np.float32)


def linear_model(path: Path, w_kn: np.ndarray, batch: int) -> Path:
    k, n = w_kn.shape
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n])],
        [numpy_helper.from_array(w_kn, "w")],
    )  # fmt: skip
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def mobilenet_v1(path: Path, size: int = 224, seed: int = 0) -> Path:
    """MobileNet-v1 (width 1.0): 3x3 stem, 13 depthwise-separable blocks, global pool, 1000-class Gemm; conv +
    bias + ReLU (BatchNorm as folded), He-initialised random weights."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def conv(x: str, cin: int, cout: int, k: int, stride: int, group: int = 1) -> str:
        i = len(nodes)
        w = (rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2 / (cin // group * k * k))).astype(
            np.float32
        )
        inits.extend([numpy_helper.from_array(w, f"w{i}"),
                      numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32) * 0.1, f"b{i}")])  # fmt: skip
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[k // 2] * 4,
                                      strides=[stride, stride], group=group))  # fmt: skip
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        return f"r{i}"

    x = conv("x", 3, 32, 3, 2)
    cin = 32
    for cout, stride in [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5,
                         (1024, 2), (1024, 1)]:  # fmt: skip
        x = conv(x, cin, cin, 3, stride, group=cin)
        x = conv(x, cin, cout, 1, 1)
        cin = cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gp"]))
    nodes.append(helper.make_node("Flatten", ["gp"], ["fl"]))
    inits.extend([numpy_helper.from_array(rng.standard_normal((1000, 1024)).astype(np.float32) * 0.03, "fw"),
                  numpy_helper.from_array(np.zeros(1000, np.float32), "fb")])  # fmt: skip
    nodes.append(helper.make_node("Gemm", ["fl", "fw", "fb"], ["y"], transB=1))
    g = helper.make_graph(nodes, "mobilenet_v1",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1000])], inits)  # fmt: skip
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def sparsify(model: Path, out: Path, s: float, pattern: str, every_layer: bool = False) -> Path:
    """``onnxprune prune MODEL --sparsity S --pattern P`` (magnitude scores, no data); ``every_layer``: the same
    pass through the API with no layer kept dense (the CLI keeps the first and the last layers dense)."""
    if every_layer:
        from onnxprune.importer import canonicalize
        from onnxprune.passes.sparsify import SparsifyPass
        from onnxprune.sparsity.config import SparsityConfig
        from onnxprune.sparsity.layers import LayerRules

        config = SparsityConfig(sparsity=s, pattern=pattern, rules=LayerRules(skip_first=False, skip_last=False))
        canonical, _ = canonicalize(onnx.load(model))  # as the CLI: weight transposes folded into the MatMuls
        onnx.save(SparsifyPass(config).call(canonical).model, out)
        return out
    cmd = [sys.executable, "-m", "onnxprune.cli", "prune", str(model), "--sparsity", str(s), "--pattern", pattern,
           "-o", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-400:]}")
    return out


# ------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------
def part_a(quick: bool, repeat: int, work: Path) -> None:
    from onnxprune.targets import tvm_backend as tb
    from onnxprune.targets import tvm_sparse_choice
    from onnxprune.targets.sparse_formats import choose_block
    from onnxprune.targets.table import get_target
    from onnxprune.targets.tvm_sparse import Layer
    from onnxprune.targets.tvm_tiles import vector_lanes, vector_registers

    spec = get_target("x86")
    target = tb.build_target(spec)
    lanes, regs = vector_lanes(target), vector_registers(target)
    rng = np.random.default_rng(0)
    k, n = 768, 3072
    base = rng.standard_normal((k, n)).astype(np.float32)
    cases = []
    for batch in (1,) if quick else (1, 16):
        for name, block in (("block:16x1", (1, 16)), ("group:1x4", (4, 1))):
            for s in (0.9,) if quick else (0.5, 0.7, 0.9, 0.95):
                w = zero_tiles(base, block, s)
                chosen = choose_block(w, lanes, align=k).block
                cases.append((batch, name, s, w, chosen))
    layers = [(Layer(i, "matmul", w, (b, k), (b, n)), blk) for i, (b, _, _, w, blk) in enumerate(cases)]
    say(f"(a) linear {k}x{n}: sparse vs dense TVM kernel (one module, interleaved) vs onnxruntime; us")
    with target:
        timings = tvm_sparse_choice.measure(layers, spec, lambda m: tb.build_executable(m, spec, sparse="off"),
                                            lanes, regs)  # fmt: skip
    say(f"{'batch':>5} {'pattern':<11} {'sparsity':>8} {'stored':>7} {'dense':>9} {'sparse':>9} {'speedup':>8} "
        f"{'ort':>9} {'vs ort':>7}")  # fmt: skip
    rows = []
    ort_cache: dict[int, float] = {}
    for (batch, name, s, _w, chosen), (dense_us, sparse_us) in zip(cases, timings):
        x = {"x": rng.standard_normal((batch, k)).astype(np.float32)}
        if batch not in ort_cache:  # onnxruntime has no sparse kernel: its time does not depend on the zeros
            sess = ort.InferenceSession(str(linear_model(work / f"lin{batch}.onnx", base, batch)), ort_options(),
                                        providers=["CPUExecutionProvider"])  # fmt: skip
            ort_cache[batch] = min(ort_median_ms(sess, x, repeat) for _ in range(3)) * 1e3
        ort_us = ort_cache[batch]
        say(f"{batch:>5} {name:<11} {s:>8.2f} {'x'.join(map(str, chosen)):>7} {dense_us:>9.1f} {sparse_us:>9.1f} "
            f"{dense_us / sparse_us:>7.2f}x {ort_us:>9.1f} {ort_us / sparse_us:>6.2f}x")  # fmt: skip
        rows.append({"batch": batch, "pattern": name, "sparsity": s, "block": list(chosen), "dense_us": dense_us,
                     "sparse_us": sparse_us, "ort_us": ort_us})  # fmt: skip
    bar = [r for r in rows if r["batch"] == 1 and r["pattern"] == "block:16x1" and r["sparsity"] == 0.9]
    if bar:
        g = bar[0]["dense_us"] / bar[0]["sparse_us"]
        say(f"bar (a): block 90% batch 1: {g:.1f}x over dense TVM (>= 4x: {'met' if g >= 4 else 'NOT met'})")
    RESULTS["a"] = rows


def time_bundles(bundles: dict[str, Path], model: Path, repeat: int) -> dict[str, float]:
    """Median ms of each bundle and of onnxruntime on ``model``, interleaved rounds."""
    from onnxprune.targets import read_manifest, run_bundle

    manifest = read_manifest(next(iter(bundles.values())), verify=False)
    rng = np.random.default_rng(0)
    inputs = {}
    for i in manifest["inputs"]:
        if i["dtype"].startswith("int"):  # token ids; mask all ones; token types (and other ids) zero
            ids = rng.integers(0, 100, i["shape"]) if i["name"] == "input_ids" else np.zeros(i["shape"])
            inputs[i["name"]] = (np.ones(i["shape"]) if "mask" in i["name"] else ids).astype(i["dtype"])
        else:
            inputs[i["name"]] = rng.standard_normal(i["shape"]).astype(i["dtype"])
    sess = ort.InferenceSession(str(model), ort_options(), providers=["CPUExecutionProvider"])
    times: dict[str, list[float]] = {k: [] for k in [*bundles, "ort"]}
    per = max(10, repeat // ROUNDS)
    for _ in range(ROUNDS):
        for k, b in bundles.items():
            times[k].append(float(run_bundle(b, inputs, repeat=per, verify=False).pop("__median_ms__")))
        times["ort"].append(ort_median_ms(sess, inputs, per))
    return {k: float(np.median(v)) for k, v in times.items()}


def end_to_end(label: str, model: Path, sparsities: list[float], pattern: str, work: Path, repeat: int,
               shapes: dict | None = None, every_layer: bool = False,
               dense: Path | None = None) -> list[dict]:  # fmt: skip
    from onnxprune.targets import compile_bundle, read_manifest

    t = time.perf_counter()
    if dense is None:
        dense = compile_bundle(model, "x86", work / f"{label}.dense", sparse="off", shapes=shapes)
    dense_w = read_manifest(dense, verify=False)["weights"]["bytes"]
    say(
        f"  {label}: dense bundle compiled in {time.perf_counter() - t:.0f} s, weights {dense_w / 1e6:.2f} MB"
    )
    rows = []
    for s in sparsities:
        sp_model = sparsify(model, work / f"{label}.s{int(s * 100)}.onnx", s, pattern, every_layer)
        t = time.perf_counter()
        bundle = compile_bundle(sp_model, "x86", work / f"{label}.s{int(s * 100)}", shapes=shapes)
        compile_s = time.perf_counter() - t
        m = read_manifest(bundle, verify=False)
        ms = time_bundles({"dense": dense, "sparse": bundle}, model, repeat)
        layers = m["sparse"]["layers"]
        went = [e for e in layers if e["choice"] == "sparse"]
        row = {"model": label, "pattern": pattern, "sparsity": s, "dense_ms": ms["dense"],
               "sparse_ms": ms["sparse"], "ort_ms": ms["ort"], "speedup": ms["dense"] / ms["sparse"],
               "weights_bytes": m["weights"]["bytes"], "dense_weights_bytes": dense_w,
               "sparse_layers": len(went), "candidate_layers": len(layers), "compile_s": compile_s,
               "layers": layers}  # fmt: skip
        rows.append(row)
        say(f"  {label:<13} {s:>5.2f} {ms['dense']:>9.3f} {ms['sparse']:>9.3f} {row['speedup']:>7.2f}x "
            f"{ms['ort']:>9.3f} {ms['ort'] / ms['sparse']:>7.2f}x {len(went):>3}/{len(layers):<3} "
            f"{m['weights']['bytes'] / dense_w:>6.2f}")  # fmt: skip
        gains = [f"{e['layer']}:{e.get('gain', 0):.1f}x" for e in went][:8]
        kept = [
            f"{e['layer']}:{e['gain']:.2f}x" if "gain" in e else f"{e['layer']}:est {e['estimate']:.2f}"
            for e in layers
            if e["choice"] == "dense"
        ][:6]
        replaced, stored = m["sparse"].get("dense_weight_bytes_replaced", 0), m["sparse"].get("sparse_weight_bytes", 0)
        row.update(replaced_bytes=replaced, replaced_stored_bytes=stored)
        if replaced:  # the whole file also holds what stays dense (embeddings, kept layers)
            say(f"      weights of the sparse layers: {replaced / 1e6:.2f} MB dense -> {stored / 1e6:.2f} MB stored "
                f"({stored / replaced:.3f}; 1 - sparsity = {1 - s:.2f}, + indices)")  # fmt: skip
        say(f"      sparse: {', '.join(gains) or '-'}{' ...' if len(went) > 8 else ''}")
        say(
            f"      kept dense (measured gain, or the cost model's estimate vs dense): {', '.join(kept) or '-'}"
        )
    return rows


E2E_HEADER = (f"  {'model':<13} {'spars':>5} {'dense ms':>9} {'sparse ms':>9} {'speedup':>8} {'ort ms':>9} "
              f"{'vs ort':>8} {'sparse/cand':>11} {'w file':>6}")  # fmt: skip


#: Part (b)'s models, sparsities and targets (``--b-models``, ``--b-sparsities``, ``--b-targets``).
B_OPTIONS: dict[str, list] = {"models": ["mobilenet_v1", "resnet18"], "sparsities": [], "targets": ["x86", "wasm"],
                              "pattern": ["group:1x4"]}


def part_b(quick: bool, repeat: int, work: Path) -> None:
    sparsities = B_OPTIONS["sparsities"] or ([0.3, 0.9] if quick else [0.3, 0.5, 0.7, 0.9])
    models, pattern = B_OPTIONS["models"], B_OPTIONS["pattern"][0]
    say(f"(b) {pattern} sparsity end to end (x86, then wasm): sparse bundle (--sparse auto) vs dense bundle vs "
        "onnxruntime")  # fmt: skip
    say(E2E_HEADER)
    rows = []
    resnet = ZOO / "resnet18.onnx"
    if "x86" in B_OPTIONS["targets"]:
        if "mobilenet_v1" in models:
            rows += end_to_end("mobilenet_v1", mobilenet_v1(work / "mobilenet_v1.onnx"), sparsities, pattern,
                               work, repeat)  # fmt: skip
        if "resnet18" in models and resnet.is_file():
            rows += end_to_end("resnet18", resnet, sparsities, pattern, work, repeat)
        elif "resnet18" in models:
            say(f"  resnet18: {resnet} not found (ONNXPRUNE_MODEL_CACHE), skipped")
        conv_gains(rows)
    for r in rows:
        if r["sparsity"] == 0.3:
            say(f"bar (b): {r['model']} at 30%: {r['speedup']:.2f}x (>= 1.3x: "
                f"{'met' if r['speedup'] >= 1.3 else 'NOT met'})")  # fmt: skip
    RESULTS["b"] = rows
    if "wasm" not in B_OPTIONS["targets"]:
        return
    # the same pruned models as wasm bundles under node (1 thread; no onnxruntime column: no wasm build of it here)
    from bench.sparse_wasm import wasm_end_to_end
    from onnxprune.errors import ToolchainError

    wasm_models = ([("mobilenet_v1", mobilenet_v1(work / "mobilenet_v1.onnx"))] if "mobilenet_v1" in models else []) + (
        [("resnet18", resnet)] if resnet.is_file() and "resnet18" in models else [])  # fmt: skip
    try:
        RESULTS["b_wasm"] = wasm_end_to_end(wasm_models, sparsities, work, min(repeat, 10), say, sparsify, pattern)
    except ToolchainError as e:
        say(f"  wasm rows skipped: {e}")


def conv_gains(rows: list[dict]) -> None:
    """Per KxK convolution of each row: the measured dense and sparse microseconds and the choice."""
    for r in rows:
        convs = [e for e in r["layers"] if e["layer"].startswith("conv") and not e["layer"].split("[")[1].startswith("1x1")]
        if not convs:
            continue
        say(f"    {r['model']} {r['sparsity']:.2f}: KxK convolutions (dense us / sparse us = gain, choice)")
        for e in convs:
            if "gain" in e:
                say(f"      {e['layer']:<24} s={e['sparsity']:.2f} {e['dense_us']:>9.1f} / {e['sparse_us']:>9.1f} = "
                    f"{e['gain']:.2f}x  {e['choice']}")  # fmt: skip
            else:
                say(f"      {e['layer']:<24} s={e['sparsity']:.2f} est {e['estimate']:.2f}  {e['choice']} ({e['decided_by']})")


def part_c(quick: bool, repeat: int, work: Path) -> None:
    say("(c) block:16x1 at 90% end to end (x86), BERT-like encoders")
    say(E2E_HEADER)
    rows = []
    for name, shapes in (("minilm_l6", {"input_ids": (1, 128), "attention_mask": (1, 128),
                                        "token_type_ids": (1, 128)}), ("bert_tiny", None)):  # fmt: skip
        if quick and name == "bert_tiny":
            continue
        path = ZOO / f"{name}.onnx"
        if not path.is_file():
            say(f"  {name}: {path} not found, skipped")
            continue
        fixed = path
        if shapes:  # fix the dynamic sequence for onnxruntime and the pruner alike
            from onnxprune.importer import fix_input_shapes

            m = onnx.load(path)
            fix_input_shapes(m, {k: list(v) for k, v in shapes.items()})
            fixed = work / f"{name}.static.onnx"
            onnx.save(m, fixed)
        rows += end_to_end(name, fixed, [0.9], "block:16x1", work, repeat)
        if name == "minilm_l6":  # every encoder linear at 90% (the CLI keeps 3 first and 1 last layer dense)
            rows += end_to_end(f"{name}_all", fixed, [0.9], "block:16x1", work, repeat, every_layer=True,
                               dense=work / f"{name}.dense")  # fmt: skip
    for r in rows:
        say(f"bar (c): {r['model']} at 90% block: {r['speedup']:.2f}x (>= 3x: "
            f"{'met' if r['speedup'] >= 3 else 'NOT met'})")  # fmt: skip
    RESULTS["c"] = rows


def part_d(quick: bool) -> None:
    script = ROOT / "bench" / "sparse_accuracy.py"
    if not script.is_file():
        say("(d) bench/sparse_accuracy.py not present: skipped")
        return
    cmd = [sys.executable, str(script), *(["--models", "cnn"] if quick else [])]
    say(f"(d) accuracy vs sparsity: {' '.join(cmd[1:])}")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in r.stdout.strip().splitlines()[-40:]:
        say(f"  {line}")
    if r.returncode:
        say(f"  (exit {r.returncode}: {r.stderr.strip()[-300:]})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="fewer cases (a: 90%% batch 1; b: 30/90%%; c: MiniLM)"
    )
    ap.add_argument("--parts", default="a,b,c,d", help="which parts, comma separated (default a,b,c,d)")
    ap.add_argument("--repeat", type=int, default=100, help="calls per measurement (split over the rounds)")
    ap.add_argument("--cache", help="layer-timing cache folder to reuse (default: a fresh one per run)")
    ap.add_argument("--threads", type=int, help="threads for TVM and onnxruntime (default: every usable CPU); "
                    "1 keeps a loaded machine's thread-pool stalls out of the numbers")  # fmt: skip
    ap.add_argument("--out", help="results file (default bench/sparse_results.txt; .json next to it)")
    ap.add_argument("--b-models", default="mobilenet_v1,resnet18", help="part (b)'s models (comma separated)")
    ap.add_argument("--b-sparsities", default="", help="part (b)'s sparsities (default 0.3,0.5,0.7,0.9)")
    ap.add_argument("--b-targets", default="x86,wasm", help="part (b)'s targets (x86, wasm)")
    ap.add_argument("--b-pattern", default="group:1x4", help="part (b)'s sparsity pattern (group:8x1: output "
                    "blocks of 8, the pointwise rows kernel)")  # fmt: skip
    args = ap.parse_args(argv)
    B_OPTIONS.update(models=args.b_models.split(","), targets=args.b_targets.split(","),
                     sparsities=[float(v) for v in args.b_sparsities.split(",") if v], pattern=[args.b_pattern])  # fmt: skip
    if args.out:
        global OUT
        OUT = Path(args.out)
    if args.threads:  # read by TVM's thread pool (in-process and in the bundle runners) and bench.targets
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory(prefix="onnxprune-sparse-bench-") as tmp:
        work = Path(tmp)
        os.environ["ONNXPRUNE_TUNE_CACHE"] = args.cache or str(work / "cache")
        t0 = time.time()
        say(
            f"bench/sparse.py{' --quick' if args.quick else ''}  {time.strftime('%Y-%m-%d %H:%M')}  "
            f"load average before: {load_average()}  threads: {ort_options().intra_op_num_threads}"
        )
        steps = {"a": part_a, "b": part_b, "c": part_c}
        for part in args.parts.split(","):  # in the order given
            if part in steps:
                steps[part](args.quick, args.repeat, work)
                say()
        if "d" in parts:
            part_d(args.quick)
        say(f"load average after: {load_average()}  ({time.time() - t0:.0f} s)")
    OUT.write_text("\n".join(LINES) + "\n")
    OUT.with_suffix(".json").write_text(json.dumps(RESULTS, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
