"""Do pruned models get faster? Efficiency = realized speedup / MACs reduction, per model, ratio and rounding.

    python bench/latency.py [--quick | --full] [--models resnet50,...] [--ratios 0.1,0.3,...]
                            [--roundings auto,auto-u,1,16] [--threads 1,2] [--tvm MODEL@R,...]
                            [--tvm-threads 1,2] [--loaded]
                            [--out bench/latency_results]

Part 1, **efficiency** (issue 13): every zoo model (ONNXPRUNE_MODEL_CACHE, see models/zoo.py) is pruned with
the command line a user types, ``onnxprune prune MODEL --ratio R --round-to X --no-verify --json`` (X = auto,
the default, whose latency table is measured on onnxruntime CPU 1 thread and cached: the table shortlists
uniform and latency-weighted plans, `onnxprune.latency.ratio_choice`, and timing them against ``--round-to 1``
chooses, `passes.latency_select.confirmed`, whose timings are cached with the table: a re-run prunes the same
plans, a fresh ``ONNXPRUNE_LATENCY_CACHE`` folder measures and chooses afresh; auto-u: auto rounding with ``--allocation uniform``, the uniform
ratio of earlier versions; auto-2t: auto with the latency table measured at 2 threads
(``--latency-threads 2``); auto-a: auto with the table's micro-model prices not calibrated in-model,
``ONNXPRUNE_LATENCY_IN_MODEL=0``, the default before `onnxprune.latency.calibrate`; 1: any count; 16), then
all pruned variants of a model are timed in one process on onnxruntime CPU (1 and 2 intra-op threads,
batch 1), round-robin with the dense model in every round (:func:`onnxprune.latency.timing.interleaved`;
2 threads: :func:`~onnxprune.latency.timing.in_blocks`, each session alive alone with spinning workers, as
deployed, ``--repeat`` runs per model in rounds of 10;
chunks of :data:`CHUNK` variants, each with the dense model, so memory stays bounded and every speedup is
against a dense model timed in the same rounds). MACs come from the summary. A subset is also timed as TVM x86
bundles run (:class:`onnxprune.targets.tvm_latency.TvmBackend`: the bundle's compile, TVM's time_evaluator,
interleaved the same way; ``--tvm-threads 1,2``: at 1 and 2 TVM runtime threads, each library compiled once).
The issue's Torch-Pruning 1.6.1 numbers (and its own "before" numbers) are
printed as quoted reference rows.

Accuracy at equal measured latency (latency-aware vs FLOPs-based vs uniform allocation, on the real models)
is `bench/latency_accuracy.py`.

After each model, the Amdahl bound of uniform ``--ratio`` (`onnxprune.latency.predict.uniform_bound`, from
its latency table) is printed next to the measured efficiencies, with the reason where it is below 0.9, and
the table's predicted speedups of the default plan and of ``--round-to 1`` next to the measured ones.
``cifar_resnet20`` (zoo) and ``fashion_mnist_cnn`` (bundled, ``models/``) are small nets where the
latency-weighted plan once lost to ``--round-to 1``.

The machine's load average is printed with the results: timings on a shared machine are provisional
(``--loaded`` times 1-thread rows by thread CPU time and compares fastest runs, for such a machine). Each
timing line also gives the dense model's time per chunk and the share of CPU time the host stole from this
virtual machine (`cpu_ticks`): a 2-thread row is only as good as the second cpu was there, and one timed while a
second thread made the dense model less than `SECOND_THREAD` x faster than one is marked ``~``.
Default mode: ratios 0.1/0.3/0.5/0.7, both thread counts, TVM for MobileNetV2 0.3/0.5. Measured at load
17-27 (eight agents on this 2-core machine): 46 min for the efficiency part (first-run onnxruntime latency
tables included, 14 min of them TVM compiles); on a quiet machine with the
tables cached it is expected to take a fraction of that (not yet timed). ``--tvm ''``
trims it; ``--quick``: two models, two ratios, 1 thread, no TVM; ``--full``: ratios
0.1..0.7 in steps of 0.1; ``--render RESULTS.json`` re-writes the text and plot of an earlier run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.latency_threads import thread_scaling_lines
from bench.machine import cpu_ticks, load, stolen_since
from models import zoo
from onnxprune.latency.backend import LatencyBackend, OrtBackend
from onnxprune.latency.measure import static_inputs
from onnxprune.latency.timing import Timing

#: Variants timed together with one dense model (bounded memory; every speedup against its own dense).
CHUNK = 8
#: zoo name -> (label, --shape flags for dynamic inputs)
MODELS: dict[str, tuple[str, dict[str, list[int]]]] = {
    "resnet50": ("ResNet-50", {}),
    "mobilenet_v2": ("MobileNetV2", {}),
    "efficientnet_b0": ("EfficientNet-B0", {}),
    "minilm_l6": ("MiniLM-L6 (BERT-like, seq 128)",
                  {"input_ids": [1, 128], "attention_mask": [1, 128], "token_type_ids": [1, 128]}),
    "bert_tiny": ("BERT-tiny (seq 16)", {}),
    "cifar_resnet20": ("CIFAR ResNet20", {}),  # small nets where weighting once lost to --round-to 1
    "fashion_mnist_cnn": ("Fashion-MNIST CNN", {}),  # bundled (models/), not a zoo download
}  # fmt: skip
DEFAULT_MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0", "minilm_l6")
#: Quoted from issue 13 (torch 2.13 exports, onnxruntime CPU, 1 thread, batch 1, interleaved): efficiency of
#: onnxprune before the latency work (defaults = round-to 1; round-to 8; round-to 16) and Torch-Pruning 1.6.1.
QUOTED = [
    ("MobileNetV2", 0.3, {"onnxprune before, round-to 1": 0.46, "onnxprune before, round-to 8": 0.81,
                          "onnxprune before, round-to 16": 0.90, "Torch-Pruning 1.6.1": 0.47}),
    ("MobileNetV2", 0.5, {"onnxprune before, round-to 1": 0.61, "onnxprune before, round-to 8": 0.65,
                          "onnxprune before, round-to 16": 0.78, "Torch-Pruning 1.6.1": 0.73}),
    ("ResNet-50", 0.3, {"onnxprune before, round-to 1": 0.69, "onnxprune before, round-to 8": 0.95,
                        "onnxprune before, round-to 16": 0.99, "Torch-Pruning 1.6.1": 0.80}),
    ("ResNet-50", 0.5, {"onnxprune before, round-to 1": 0.94, "onnxprune before, round-to 8": 0.95,
                        "onnxprune before, round-to 16": 0.96, "Torch-Pruning 1.6.1": 1.01}),
]  # fmt: skip
#: A timing whose interquartile spread exceeds this fraction of its median is marked "?" (a loaded machine).
NOISY = 0.25
#: The rounding label of auto rounding with a uniform --ratio (``--allocation uniform``); plain "auto" is the
#: default, latency-weighted where the uniform bound is below 0.9 (`passes.latency_select.weighted_ratio_plan`).
UNIFORM = "auto-u"
#: Auto rounding with the latency table's micro-model prices as they are (``ONNXPRUNE_LATENCY_IN_MODEL=0``:
#: no calibration against the whole model's profile, `onnxprune.latency.calibrate`), the default before
#: 2026-12-03 evening: for comparing.
ALONE = "auto-a"
#: Auto rounding with the latency table measured at 2 intra-op threads (``--latency-threads 2``): what a user
#: deploying at 2 threads asks for; the default table is measured at 1 thread.
TWO_THREADS = "auto-2t"
#: a dense model at 2 threads at most this much faster than at 1 marks its chunk's 2-thread rows "~": measured on
#: this 2-vCPU guest, the second thread is worth 1.8-1.9x to the three CNNs, but in some minutes 1.07x
#: (EfficientNet-B0 10.8 ms against 11.6, no steal), and then every pruned variant reads ~0.1 lower.
SECOND_THREAD = 1.33
#: A 2-thread backend key -> the 1-thread key its dense timing is checked against (`Variant.second_thread_idle`).
TWO_THREAD_KEYS = {"ort2": "ort1", "tvm2": "tvm"}


def tvm_key(threads: int) -> str:
    """The speedup key of TVM x86 at `threads` runtime threads: ``tvm`` for 1 (the key of earlier results), else
    ``tvmN``."""
    return "tvm" if threads == 1 else f"tvm{threads}"


@dataclass
class Variant:
    """One pruned model: how it was made, its MACs, and its measured speedups by backend."""

    model: str
    ratio: float
    rounding: str
    path: str
    macs_before: int
    macs_after: int
    prune_s: float
    cli_latency: dict | None = None  # the summary's ``latency`` record (auto rounding measures it)
    speedup: dict[str, float] = field(default_factory=dict)
    spread: dict[str, float] = field(default_factory=dict)
    dense_ms: dict[str, float] = field(default_factory=dict)  # the dense model's time in this variant's chunk

    def second_thread_idle(self, backend: str = "ort2") -> bool:
        """Whether its 2-thread row on `backend` (``ort2`` or ``tvm2``) was timed while a second thread sped the
        dense model up less than `SECOND_THREAD` times: a phase of the machine, not of the plan (measured in that
        constant's comment). False for a 1-thread backend, or without the 1-thread timing beside it."""
        if backend not in TWO_THREAD_KEYS:
            return False
        one, two = self.dense_ms.get(TWO_THREAD_KEYS[backend]), self.dense_ms.get(backend)
        return bool(one and two and one / two < SECOND_THREAD)

    @property
    def macs_reduction(self) -> float:
        return self.macs_before / max(self.macs_after, 1)

    def efficiency(self, backend: str) -> float | None:
        s = self.speedup.get(backend)
        return None if s is None else s / self.macs_reduction


def model_path(name: str) -> Path:
    """A bundled model (``models/NAME.onnx``) or a zoo one (`models.zoo.zoo_model`)."""
    bundled = ROOT / "models" / f"{name}.onnx"
    return bundled if bundled.exists() else zoo.zoo_model(name)


def shape_flags(shapes: dict[str, list[int]]) -> list[str]:
    return [a for name, dims in shapes.items() for a in ("--shape", f"{name}={','.join(map(str, dims))}")]


def prune_cli(
    model: Path, out: Path, flags: Sequence[str], cache: Path, env: dict[str, str] | None = None
) -> tuple[dict, float]:
    """``onnxprune prune MODEL -o OUT FLAGS --no-verify --json`` in a subprocess (`env` added to its
    environment); (summary, seconds)."""
    cmd = [sys.executable, "-m", "onnxprune.cli", "prune", str(model), "-o", str(out), *flags,
           "--no-verify", "--json", "--latency-cache", str(cache)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, **env} if env else None)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{' '.join(cmd[3:])}: exit {proc.returncode}: {last}")
    return json.loads(proc.stdout), seconds


def timed_against_dense(
    dense: onnx.ModelProto, models: Sequence[onnx.ModelProto], backend: LatencyBackend, repeat: int,
    loaded: bool = False, dense_ms: list[float] | None = None,
) -> list[tuple[float, float]]:
    """(speedup, spread) of every model against ``dense``, timed round-robin in chunks that each include it.

    `loaded` (``--loaded``, for a shared machine): 1-thread onnxruntime runs are timed by thread CPU time and
    compared by their fastest runs (other threads: wall time, fastest runs); otherwise wall-time medians.
    `dense_ms` receives the dense model's time of each chunk (a check on the machine: at 2 threads it
    should be well below the 1-thread time)."""
    out: list[tuple[float, float]] = []
    for start in range(0, len(models), CHUNK):
        chunk = list(models[start : start + CHUNK])
        if loaded and isinstance(backend, OrtBackend) and backend.threads == 1:
            from bench.latency_predict import cpu_timed

            timings: list[Timing] = cpu_timed([dense, *chunk], backend, repeat)
        else:
            timings = backend.time_models([dense, *chunk], warmup=3, repeat=repeat)
        pick = (lambda t: t.best_ms) if loaded else (lambda t: t.median_ms)
        ref = pick(timings[0])
        if dense_ms is not None:
            dense_ms.append(ref)
        out += [(ref / pick(t), max(t.spread, timings[0].spread)) for t in timings[1:]]
    return out


# ------------------------------------------------------------------------------------------------ part 1


def prune_all(
    args: argparse.Namespace, names: Sequence[str], work: Path, cache: Path, log: list[str]
) -> list[Variant]:
    variants: list[Variant] = []
    for name in names:
        label, shapes = MODELS[name]
        src = model_path(name)
        for ratio in args.ratios:
            for rounding in args.roundings:
                out = work / f"{name}_{ratio}_{rounding}.onnx"
                uniform = rounding == UNIFORM
                auto = rounding in (UNIFORM, ALONE, TWO_THREADS)
                flags = ["--ratio", str(ratio), "--round-to", "auto" if auto else rounding, *shape_flags(shapes),
                         *(["--allocation", "uniform"] if uniform else []),
                         *(["--latency-threads", "2"] if rounding == TWO_THREADS else [])]
                env = {"ONNXPRUNE_LATENCY_IN_MODEL": "0"} if rounding == ALONE else None
                try:
                    summary, seconds = prune_cli(src, out, flags, cache, env)
                except RuntimeError as e:
                    log.append(f"FAILED {name} ratio {ratio} round-to {rounding}: {e}")
                    print(log[-1], flush=True)
                    continue
                v = Variant(name, ratio, rounding, str(out), int(summary["macs_before"]), int(summary["macs_after"]),
                            round(seconds, 1), summary.get("latency"))  # fmt: skip
                variants.append(v)
                print(f"  pruned {label} ratio {ratio} round-to {rounding}: MACs /{v.macs_reduction:.2f} "
                      f"in {seconds:.0f} s", flush=True)  # fmt: skip
    return variants


def measure_all(variants: list[Variant], args: argparse.Namespace, log: list[str]) -> None:
    for name in dict.fromkeys(v.model for v in variants):
        mine = [v for v in variants if v.model == name]
        if not mine:
            continue
        shapes = MODELS[name][1]
        dense = static_inputs(onnx.load(str(model_path(name))), shapes or None)
        pruned = [static_inputs(onnx.load(v.path), shapes or None) for v in mine]
        for threads in args.threads:
            key = f"ort{threads}"
            t0, ticks = time.perf_counter(), cpu_ticks()
            dense_ms: list[float] = []
            for i, (v, (s, spread)) in enumerate(zip(
                mine, timed_against_dense(dense, pruned, OrtBackend(threads=threads), args.repeat, args.loaded,
                                          dense_ms)
            )):
                v.speedup[key], v.spread[key], v.dense_ms[key] = s, spread, dense_ms[i // CHUNK]
            log.append(f"  timed {len(mine)} {MODELS[name][0]} variants on onnxruntime, {threads} thread(s), "
                       f"in {time.perf_counter() - t0:.0f} s; dense {', '.join(f'{ms:.2f}' for ms in dense_ms)} ms "
                       f"per chunk; {stolen_since(ticks)}; {load()}")  # fmt: skip
            print(log[-1], flush=True)


def measure_tvm(variants: list[Variant], args: argparse.Namespace, log: list[str]) -> None:
    """TVM x86 bundles: the subset ``--tvm MODEL@RATIO``, every rounding, at each of ``--tvm-threads`` (one
    compile per model: the backend keeps its libraries, only the runtime's thread pool changes)."""
    wanted = [(m, float(r)) for m, _, r in (item.partition("@") for item in args.tvm)]
    if not wanted:
        return
    try:
        import onnxprune.targets.latency  # noqa: F401  (registers the TVM backends)
        from onnxprune.latency.backend import get_backend

        backend = get_backend("x86", threads=1)
    except Exception as e:  # no tvm here: the ort part stands alone
        print(f"  TVM x86 skipped: {e}", flush=True)
        return
    for name in dict.fromkeys(m for m, _ in wanted):
        mine = [v for v in variants if v.model == name and (name, v.ratio) in wanted]
        if not mine:
            continue
        shapes = MODELS[name][1]
        dense = static_inputs(onnx.load(str(model_path(name))), shapes or None)
        t0 = time.perf_counter()
        pruned = [static_inputs(onnx.load(v.path), shapes or None) for v in mine]
        for threads in args.tvm_threads:
            key, t1, ticks = tvm_key(threads), time.perf_counter(), cpu_ticks()
            backend.threads = threads  # read when the libraries are loaded for timing (`TvmBackend._device`)
            dense_ms: list[float] = []
            for i, (v, (s, spread)) in enumerate(zip(
                mine, timed_against_dense(dense, pruned, backend, max(7, args.repeat // 2), args.loaded, dense_ms)
            )):
                v.speedup[key], v.spread[key], v.dense_ms[key] = s, spread, dense_ms[i // CHUNK]
            log.append(f"  timed {len(mine)} {MODELS[name][0]} variants as TVM x86 bundles, {threads} thread(s), in "
                       f"{time.perf_counter() - t1:.0f} s (compiles included: {time.perf_counter() - t0:.0f} s so far);"
                       f" dense {', '.join(f'{ms:.2f}' for ms in dense_ms)} ms per chunk; {stolen_since(ticks)}; "
                       f"{load()}")  # fmt: skip
            print(log[-1], flush=True)


def efficiency_table(variants: list[Variant], args: argparse.Namespace) -> list[str]:
    timed = {b for v in variants for b in v.speedup}
    backends = [f"ort{t}" for t in args.threads] + sorted(b for b in timed if b.startswith("tvm"))
    names = {"ort1": "ort 1T", "ort2": "ort 2T", "tvm": "TVM x86", "tvm2": "TVM x86 2T"}
    head = f"{'model':<32} {'ratio':>5} {'round-to':>8} {'MACs /':>7}"
    for b in backends:
        head += f" {names.get(b, b) + ' speedup':>16} {'eff':>5}"
    lines = [head, "-" * len(head)]
    for v in variants:
        row = f"{MODELS[v.model][0]:<32} {v.ratio:>5.2f} {v.rounding:>8} {v.macs_reduction:>7.2f}"
        for b in backends:
            s, e = v.speedup.get(b), v.efficiency(b)
            if s is None or e is None:
                row += f" {'-':>16} {'-':>5}"
            else:
                # "!": slower than the dense model; "?": noisy (interquartile spread over NOISY of the median);
                # "~": a 2-thread row timed while the second thread barely helped the dense model
                idle = v.second_thread_idle(b)
                mark = "!" if s < 1 else ("?" if v.spread.get(b, 0.0) > NOISY else ("~" if idle else " "))
                row += f" {s:>15.2f}{mark} {e:>5.2f}"
        lines.append(row)
    lines += [
        "",
        "Quoted reference rows (issue 13, same measure: onnxruntime CPU 1 thread; not re-measured here):",
    ]
    for label, ratio, cells in QUOTED:
        lines.append(
            f"  {label:<12} {ratio:.1f}  " + "  ".join(f"{k}: {val:.2f}" for k, val in cells.items())
        )
    lines += ["", "Judged (issue 13): efficiency >= 0.9 and speedup >= 1 with the defaults (round-to auto):"]
    for b in backends:
        for rounding in ("auto", UNIFORM, ALONE, TWO_THREADS):
            judged_row(lines, [v for v in variants if v.rounding == rounding and b in v.speedup
                               and v.model != "minilm_l6"], b, f"{names.get(b, b)} {rounding}")  # fmt: skip
    pairs_to_compare = (("auto", "1"), (UNIFORM, "1"), ("auto", UNIFORM), ("auto", ALONE), (TWO_THREADS, "1"),
                        (TWO_THREADS, "auto"))  # fmt: skip
    for first, second in pairs_to_compare:
        head = f"{first} vs round-to {second} (speedup ratio at the same --ratio, > 1: {first} is faster):"
        for b in backends:
            pairs = [(a, o) for a in variants for o in variants if a.rounding == first and o.rounding == second
                     and a.model == o.model and a.ratio == o.ratio and b in a.speedup and b in o.speedup]  # fmt: skip
            if pairs:
                lines += ["", head] if head else []
                head = ""
                r = [a.speedup[b] / o.speedup[b] for a, o in pairs]
                lines.append(f"  {names.get(b, b)}: min {min(r):.2f}, median {float(np.median(r)):.2f} over {len(r)}")
    return lines


def judged_row(lines: list[str], auto: list[Variant], b: str, label: str) -> None:
    if auto:
        worst = min(auto, key=lambda v: v.efficiency(b) or 0.0)
        slower = [f"{v.model}@{v.ratio}" for v in auto if v.speedup[b] < 1]
        ok = sum((v.efficiency(b) or 0) >= 0.9 for v in auto)
        idle = [f"{v.model}@{v.ratio}" for v in auto if v.second_thread_idle(b)]
        lines.append(f"  {label}: {ok}/{len(auto)} CNN variants reach 0.9; worst {worst.model}@"
                     f"{worst.ratio} {worst.efficiency(b):.2f}; slower than dense: {', '.join(slower) or 'none'}"
                     + (f"; '~' (timed while a second thread gave the dense model < {SECOND_THREAD}x): "
                        f"{', '.join(idle)}" if idle else ""))  # fmt: skip


def plot(variants: list[Variant], args: argparse.Namespace, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [n for n in args.models if any(v.model == n for v in variants)]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        for rounding in args.roundings:
            for threads, style in zip(args.threads, ("-", "--")):
                pts = sorted((v.ratio, v.efficiency(f"ort{threads}")) for v in variants
                             if v.model == name and v.rounding == rounding and f"ort{threads}" in v.speedup)  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"round-to {rounding}, {threads}T")
        ax.axhline(0.9, color="grey", lw=0.8)
        ax.set_title(MODELS[name][0], fontsize=9)
        ax.set_xlabel("--ratio")
        ax.set_ylim(0, 1.4)
    axes[0][0].set_ylabel("speedup / MACs reduction (ort CPU)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def uniform_bounds(name: str, ratios: Sequence[float], cache: Path) -> dict:
    """The Amdahl bound of uniform ``--ratio`` on `name` (`onnxprune.latency.predict.uniform_bound`), from
    the model's latency table on onnxruntime CPU, 1 thread (the CLI's; cached), and what the table predicts
    for the default plan and for ``--round-to 1`` (`onnxprune.latency.ratio_choice`, as the CLI chooses)."""
    from onnxprune.channels import analyze
    from onnxprune.criteria import Magnitude
    from onnxprune.graph import ModelGraph
    from onnxprune.importer import canonicalize
    from onnxprune.latency.calibrate import in_model_table
    from onnxprune.latency.grid import keep_counts
    from onnxprune.latency.predict import uniform_bound
    from onnxprune.latency.ratio_choice import choose_ratio_plan
    from onnxprune.latency.table import build_table
    from onnxprune.passes.latency_select import UNIFORM_ENOUGH, never_slower

    model = static_inputs(canonicalize(onnx.load(str(model_path(name))))[0], MODELS[name][1] or None)
    analysis = analyze(ModelGraph(model))
    backend = OrtBackend(threads=1)
    table = build_table(analysis, backend, cache_dir=cache)
    grid = never_slower(keep_counts(table, analysis), table)
    calibrated = in_model_table(table, analysis, backend, cache_dir=cache)
    scores = Magnitude(1).score_all(analysis)  # the CLI's default criterion (l1)
    rows, linear = [], 0.0
    for r in ratios:
        b = uniform_bound(table, analysis, r)
        linear = b.linear_share
        choice = choose_ratio_plan(analysis, scores, calibrated, r, keep_counts=grid,
                                   weighted=b.efficiency < UNIFORM_ENOUGH)
        rows.append({"ratio": b.ratio, "macs_reduction": b.macs_reduction, "efficiency": b.efficiency,
                     "chosen": choice.chosen.name, "predicted_speedup": choice.chosen.speedup,
                     "predicted_efficiency": choice.chosen.efficiency, "reference_speedup": choice.reference.speedup})
    return {"model": name, "linear_share": linear, "rows": rows}


def bound_lines(bounds: list[dict], variants: list[Variant], args: argparse.Namespace) -> list[str]:
    if not bounds:
        return []
    lines = ["", "Amdahl bound of uniform --ratio (latency table, onnxruntime 1 thread; every priced layer's time "
             "taken proportional to its MACs, so no rounding does better; 'linear' = share of the priced time in "
             "layers one group scales: depthwise convs, stems, heads, SiLU/squeeze-excitation nodes):"]  # fmt: skip
    short = []
    for b in bounds:
        cells = []
        for row in b["rows"]:
            measured = [f"{v.rounding} {e:.2f}" for v in variants if v.model == b["model"] and v.ratio == row["ratio"]
                        and v.rounding in ("auto", UNIFORM, ALONE) and (e := v.efficiency("ort1")) is not None]  # fmt: skip
            cells.append(f"{row['ratio']:.1f}: {row['efficiency']:.2f}" + (f" ({', '.join(measured)})" if measured else ""))
            if row["efficiency"] < 0.9:
                short.append(f"{MODELS[b['model']][0]}@{row['ratio']:.1f} {row['efficiency']:.2f}")
        lines.append(f"  {MODELS[b['model']][0]:<16} linear {b['linear_share']:4.0%}  " + "  ".join(cells))
    if short:
        lines.append("  0.9 is out of reach of a uniform --ratio at: " + ", ".join(short) + ". Reason: the layers "
                     "one group scales shrink in time as (1 - r) while the pointwise layers' MACs, between two "
                     "pruned groups, shrink as (1 - r)^2, so the MACs fall faster than the time. The default auto "
                     "(not auto-u) then also weighs each group's share of the same fraction of channels by its "
                     "time per MAC, and keeps the plan the table predicts most efficient among those no slower "
                     "than --round-to 1 (onnxprune.latency.ratio_choice).")  # fmt: skip
    lines += ["", "Predicted by the latency table (in-model prices, off-grid counts priced by the grid) at the same "
              "--ratio: the default plan (its kind; before the CLI confirms it by timing it against the unrounded plan, "
              "passes.latency_select.confirmed) against --round-to 1; measured ort 1T speedups in brackets:"]
    for b in bounds:
        for row in b["rows"]:
            if "chosen" not in row:
                continue
            got = {v.rounding: v.speedup.get("ort1") for v in variants
                   if v.model == b["model"] and v.ratio == row["ratio"]}  # fmt: skip
            timed = (f" (measured {got['auto']:.2f}x against {got['1']:.2f}x)"
                     if got.get("auto") and got.get("1") else "")
            lines.append(f"  {MODELS[b['model']][0]:<16} {row['ratio']:.1f}: default {row['predicted_speedup']:.2f}x "
                         f"(eff {row['predicted_efficiency']:.2f}, {row['chosen']}) against "
                         f"{row['reference_speedup']:.2f}x{timed}")
    return lines


# ------------------------------------------------------------------------------------------------ main


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="two models, two ratios, 1 thread, no TVM")
    p.add_argument("--full", action="store_true", help="ratios 0.1..0.7 in steps of 0.1")
    p.add_argument(
        "--models", default=None, help=f"comma-separated zoo names (default {','.join(DEFAULT_MODELS)})"
    )
    p.add_argument("--ratios", default=None)
    p.add_argument("--roundings", default="auto,auto-u,1,16",
                   help="auto (the default), auto-u (auto, --allocation uniform), auto-a (auto, micro-model prices "
                        "not calibrated in-model), auto-2t (auto, --latency-threads 2), or N")
    p.add_argument("--threads", default=None, help="onnxruntime intra-op threads to time with (default 1,2)")
    p.add_argument("--tvm", default=None, help="MODEL@RATIO,... timed as TVM x86 bundles ('' for none)")
    p.add_argument("--tvm-threads", default="1", help="TVM runtime threads to time the --tvm bundles with (e.g. 1,2)")
    p.add_argument("--repeat", type=int, default=None, help="timed rounds (default 15, quick 9)")
    p.add_argument("--loaded", action="store_true",
                   help="a shared machine: 1-thread rows by thread CPU time, every speedup from the fastest runs")
    p.add_argument(
        "--render",
        metavar="RESULTS.json",
        help="re-write the text and plot of an earlier run, measure nothing",
    )
    p.add_argument(
        "--out", default=str(ROOT / "bench" / "latency_results"), help="results stem (.txt, .json, .png)"
    )
    p.add_argument("--work", default=None, help="folder for the pruned models (default: a temporary one)")
    args = p.parse_args(argv)
    args.models = (
        args.models or ("mobilenet_v2,resnet50" if args.quick else ",".join(DEFAULT_MODELS))
    ).split(",")
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    default_ratios = (
        "0.3,0.5" if args.quick else ("0.1,0.2,0.3,0.4,0.5,0.6,0.7" if args.full else "0.1,0.3,0.5,0.7")
    )
    args.ratios = [float(r) for r in (args.ratios or default_ratios).split(",")]
    args.roundings = args.roundings.split(",")
    args.threads = [int(t) for t in (args.threads or ("1" if args.quick else "1,2")).split(",")]
    tvm_default = "" if args.quick else "mobilenet_v2@0.3,mobilenet_v2@0.5"
    args.tvm = [t for t in (tvm_default if args.tvm is None else args.tvm).split(",") if t]
    args.tvm_threads = [int(t) for t in args.tvm_threads.split(",") if t]
    args.repeat = args.repeat or (9 if args.quick else 15)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.render:
        return render(Path(args.render), args)
    out = Path(args.out)
    started = time.time()
    log: list[str] = [f"bench/latency.py {' '.join(sys.argv[1:])}", f"start: {load()}"]
    print(log[-1], flush=True)
    variants: list[Variant] = []
    bounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="onnxprune-bench-latency-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cache = Path(
            os.environ.get("ONNXPRUNE_LATENCY_CACHE", Path.home() / ".cache" / "onnxprune" / "latency")
        )
        for name in args.models:  # model by model, the results written after each (a long run stays useful)
            mine = prune_all(args, [name], work, cache, log)
            measure_all(mine, args, log)
            measure_tvm(mine, args, log)
            variants += mine
            try:
                bounds.append(uniform_bounds(name, args.ratios, cache))
            except Exception as e:  # the bound is commentary: the measured rows stand without it
                log.append(f"{name}: uniform bound not computed: {type(e).__name__}: {e}")
            log.append(f"{name}: {len(mine)} variants pruned and timed; {load()}")
            write_results(out, args, variants, log, started, final=False, bounds=bounds)
    print(write_results(out, args, variants, log, started, final=True, bounds=bounds))
    return 0


def write_results(
    out: Path,
    args: argparse.Namespace,
    variants: list[Variant],
    log: list[str],
    started: float,
    *,
    final: bool,
    bounds: list[dict] | None = None,
) -> str:
    """Write ``out``.txt/.json/.png; returns the text."""
    text = [
        "Efficiency = realized speedup / MACs reduction (batch 1; onnxruntime CPU N threads = ort NT; TVM x86 = "
        "the bundle's compile timed with time_evaluator, 1 thread; TVM x86 2T: 2 runtime threads). '!' marks a model slower than dense, '?' a noisy timing (spread > 25%), "
        f"'~' a 2-thread row timed while a second thread made the dense model less than {SECOND_THREAD}x faster than one.",
        *(["Timed with --loaded: onnxruntime 1-thread rows by thread CPU time, every speedup from the fastest runs "
           "(provisional: a shared machine)."] if getattr(args, "loaded", False) else []),
        *([] if final else ["(partial: the run is still going)"]),
        *efficiency_table(variants, args), *thread_scaling_lines(variants), *bound_lines(bounds or [], variants, args), "",
        "Accuracy at equal measured latency: bench/latency_accuracy.py.", "", *log, *([f"total {time.time() - started:.0f} s"] if started else []),
    ]  # fmt: skip
    report = "\n".join(text) + "\n"
    out.with_suffix(".txt").write_text(report)
    out.with_suffix(".json").write_text(json.dumps(
        {"args": vars(args), "log": log,
         "variants": [{**asdict(v), "macs_reduction": v.macs_reduction,
                       "efficiency": {b: v.efficiency(b) for b in v.speedup}} for v in variants],
         "quoted": QUOTED, "bounds": bounds or []}, indent=1))  # fmt: skip
    if variants:
        plot(variants, args, out.with_suffix(".png"))
    return report


def render(path: Path, args: argparse.Namespace) -> int:
    """Re-write ``path``'s .txt/.png from its .json (the table's format changed, or to merge by hand)."""
    data = json.loads(path.read_text())
    keep = {f.name for f in fields(Variant)}
    variants = [Variant(**{k: v for k, v in d.items() if k in keep}) for d in data["variants"]]
    for key in ("models", "ratios", "roundings", "threads"):
        setattr(args, key, data["args"][key])
    args.loaded = bool(data["args"].get("loaded", False))  # the header says how the rows were timed
    print(write_results(path.with_suffix(""), args, variants, data["log"], 0.0, final=True,
                        bounds=data.get("bounds", [])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
