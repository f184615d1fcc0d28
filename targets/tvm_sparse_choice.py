"""The per-layer dense-or-sparse choice: which layers of a model run as sparse kernels (:mod:`.tvm_sparse`).

``onnxprune compile --sparse auto|off|force`` (:data:`MODES`):

* ``off``: every layer stays dense (the bundle is the dense bundle).
* ``auto`` (default): a layer is a *candidate* when its constant weight has at least :data:`MIN_SPARSITY`
  zeros and the storage block :func:`.sparse_formats.choose_block` finds for its zero pattern is estimated to
  beat dense. Candidates are then **measured** on this machine when the target executes here (x86 rows): every
  candidate's dense kernel (the normal pipeline: NHWC, Winograd, register tiles) and its sparse kernel are
  compiled into one module, at the layer's real shape, and timed interleaved; a layer goes sparse only when
  its sparse kernel is at least :data:`MIN_GAIN` times faster. So a sparse bundle is never slower than the
  dense one, layer by layer. Timings are cached (:data:`CACHE_FILE` under ``ONNXPRUNE_TUNE_CACHE``), keyed by
  target, shape, block and pattern density: the crossover table a recompile reads instead of measuring.
  Wasm executes here too: the two variants of every candidate are linked into one throw-away wasm program
  and timed interleaved under node (:func:`.wasm.time_functions`, the runner's ``--time`` mode; entries
  say ``measured_on: "node (wasm, 1 thread)"``). Measuring needs the backend's ``build`` callable; without
  one, a layer whose timings are in the cache (a crossover table measured before) is still decided by
  them, and the rest, like every layer of targets that cannot execute here (arm, CUDA), by the cost
  model's estimate (:data:`MODEL_CROSSOVER`), recorded as ``decided_by: "cost-model"``.
* ``force``: every layer with any zeros goes sparse (tests, experiments).

The result is the manifest's ``sparse`` field: the mode, and one entry per candidate layer (name, kind,
sparsity, block, block density, dense and sparse microseconds, gain, choice, how it was decided). Start
reading at :func:`apply`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from onnxprune import progress
from onnxprune.errors import UsageError

from . import wasm
from .sparse_formats import choose_block, sparsity, to_bsr
from .spec import TargetSpec
from .tvm_sparse import Decision, Layer, sparsify

__all__ = ["MODES", "apply"]

MODES = ("auto", "off", "force")
#: Fewest zeros (fraction) for a layer to be considered in ``auto`` mode.
MIN_SPARSITY = 0.2
#: A measured sparse kernel must be this much faster than dense to be kept: a noise margin, and the epilogue
#: ops a sparse kernel cannot absorb (a residual add) run as a kernel of their own.
MIN_GAIN = 1.1
#: Cost-model estimate (relative to dense) below which a layer goes sparse where nothing can be measured.
MODEL_CROSSOVER = 0.6
#: Candidates estimated above this relative cost are not even measured.
MAX_ESTIMATE = 0.9
CACHE_FILE = "sparse_timings.json"
#: Version of the sparse kernels in the timing cache's keys: bumped when a kernel changes, so timings of the
#: old kernels are not read as the new ones' (2: KxK convolutions with runs along C use the phase-plane group
#: kernel).
KERNEL_VERSION = 3


def _cache_path() -> Path:
    root = Path(os.environ.get("ONNXPRUNE_TUNE_CACHE", Path.home() / ".cache" / "onnxprune" / "tune"))
    return root / CACHE_FILE


def _key(target: tvm.target.Target, layer: Layer, block: tuple[int, int]) -> str:
    pattern = hashlib.sha256(np.packbits(layer.weight != 0).tobytes()).hexdigest()[:16]
    return f"v{KERNEL_VERSION}|{target}|{layer.kind}|{layer.x_shape}|{layer.out_shape}|{layer.conv}|{block}|{pattern}"


def _load_cache() -> dict[str, list[float]]:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _save_cache(cache: dict[str, list[float]]) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(path)
    except OSError:
        pass  # a cache that cannot be written only costs a re-measurement


def _dense_expr(layer: Layer, x: relax.Expr) -> relax.Expr:
    w = layer.weight
    if layer.conv is None:
        return relax.op.matmul(x, relax.const(w))
    kh, kw, strides, padding, dilation = layer.conv
    hwio = w.reshape(kh, kw, -1, w.shape[1])
    return relax.op.nn.conv2d(x, relax.const(hwio), strides=strides, padding=padding, dilation=dilation,
                              data_layout="NHWC", kernel_layout="HWIO")  # fmt: skip


def measure(
    layers: list[tuple[Layer, tuple[int, int]]],
    spec: TargetSpec,
    build: Callable[[tvm.IRModule], Any],
    lanes: int,
    registers: int,
) -> list[tuple[float, float]]:
    """(dense us, sparse us) for each (layer, block), compiled together into one module and timed
    interleaved on this machine: in this process for x86 (median of each round, best of the rounds), under
    node for wasm (:func:`.wasm.time_functions`, one thread, fastest of 15 interleaved batches). ``build`` compiles the module for ``spec``."""
    bb = relax.BlockBuilder()
    for i, (layer, _) in enumerate(layers):
        for variant in "ds":
            x = relax.Var("x", relax.TensorType(layer.x_shape, "float32"))
            with bb.function(f"{variant}{i}", [x]):
                with bb.dataflow():
                    out = bb.emit_output(_dense_expr(layer, x))
                bb.emit_func_output(out)
    # the sparse variants: the sparse pass itself on the "s" functions (one layer each), told to use the block
    blocks = {f"s{i}": Decision(block) for i, (_, block) in enumerate(layers)}
    mod = sparsify(lambda _layer, func: blocks.get(func), lanes, registers, spec.gpu)(bb.get())
    ex = build(mod)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(layer.x_shape).astype(np.float32) for layer, _ in layers]
    if spec.family == "wasm":  # wasm code runs only inside its own runtime: a throw-away program under node
        calls = [(f"{variant}{i}", i) for i in range(len(layers)) for variant in "ds"]
        us = wasm.time_functions(ex, spec, calls, arrays, rounds=3)
        return [(us[f"d{i}"], us[f"s{i}"]) for i in range(len(layers))]
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    inputs = [tvm.runtime.tensor(a, dev) for a in arrays]
    best = [[float("inf"), float("inf")] for _ in layers]
    for _round in range(3):
        for i in range(len(layers)):
            for j, variant in enumerate("ds"):
                t = vm.time_evaluator(f"{variant}{i}", dev, number=1, repeat=5, min_repeat_ms=15)(inputs[i])
                best[i][j] = min(best[i][j], t.median * 1e6)
    return [(d, s) for d, s in best]


def apply(
    mod: tvm.IRModule,
    mode: str,
    spec: TargetSpec,
    target: tvm.target.Target,
    lanes: int,
    registers: int,
    build: Callable[[tvm.IRModule], Any] | None,
    report: dict[str, Any],
) -> tvm.IRModule:
    """Make the layers the choice picks sparse (see the module doc); fill ``report`` (the manifest's
    ``sparse`` field). ``build`` compiles a timing module for this machine (None: cannot measure here)."""
    if mode not in MODES:
        raise UsageError(f"--sparse must be one of {', '.join(MODES)}, got {mode!r}")
    report.update({"mode": mode, "layers": []})
    if mode == "off":
        return mod
    found: list[Layer] = []
    sparsify(lambda _layer, _func: None, lanes, registers, spec.gpu, record=found)(mod)
    entries: dict[int, dict[str, Any]] = {}
    candidates: list[tuple[Layer, tuple[int, int]]] = []
    cache = _load_cache() if build is None else {}  # without a builder, only what was measured before
    for layer in found:
        s = sparsity(layer.weight)
        if s == 0 or (mode == "auto" and s < MIN_SPARSITY):
            continue
        pixel_runs = not spec.gpu and layer.rows >= lanes  # runs go to the group kernels (1x1 and KxK)
        pointwise = layer.conv is not None and tuple(layer.conv[:2]) == (1, 1)
        choice = choose_block(layer.weight, lanes, align=layer.x_shape[-1], pixel_runs=pixel_runs,
                              row_blocks=pixel_runs and pointwise)  # fmt: skip
        entry = {"layer": layer.name, "kind": layer.kind, "sparsity": round(s, 4), "block": list(choice.block),
                 "block_density": round(choice.density, 4), "estimate": round(choice.relative_cost, 3)}  # fmt: skip
        entries[layer.index] = entry
        if mode == "force":
            entry.update(choice="sparse", decided_by="forced")
        elif choice.relative_cost > MAX_ESTIMATE:
            entry.update(choice="dense", decided_by="cost-model")
        elif build is None and _key(target, layer, choice.block) not in cache:
            entry.update(choice="sparse" if choice.relative_cost < MODEL_CROSSOVER else "dense",
                         decided_by="cost-model")  # fmt: skip
        else:
            candidates.append((layer, choice.block))
    if candidates:
        _measure_into(candidates, entries, spec, target, build, lanes, registers, cache)
    chosen = {i: Decision(tuple(e["block"])) for i, e in entries.items() if e["choice"] == "sparse"}
    mod = sparsify(lambda layer, _func: chosen.get(layer.index), lanes, registers, spec.gpu)(mod)
    dense_bytes = sparse_bytes = 0
    for layer in found:
        e = entries.get(layer.index)
        if e is not None and e["choice"] == "sparse":
            dense_bytes += layer.weight.nbytes
            sparse_bytes += to_bsr(layer.weight, tuple(e["block"])).nbytes
    report["layers"] = [entries[i] for i in sorted(entries)]
    report["sparse_layer_count"] = len(chosen)
    report["dense_weight_bytes_replaced"] = dense_bytes
    report["sparse_weight_bytes"] = sparse_bytes
    return mod


def _measure_into(
    candidates: list[tuple[Layer, tuple[int, int]]],
    entries: dict[int, dict[str, Any]],
    spec: TargetSpec,
    target: tvm.target.Target,
    build: Callable[[tvm.IRModule], Any] | None,
    lanes: int,
    registers: int,
    cache: dict[str, list[float]] | None = None,
) -> None:
    cache = cache or _load_cache()
    keys = [_key(target, layer, block) for layer, block in candidates]
    todo = [(c, k) for c, k in zip(candidates, keys) if k not in cache]
    if todo and build is not None:
        with progress.task(f"timing {len(todo)} layer(s) dense vs sparse"):
            timings = measure([c for c, _ in todo], spec, build, lanes, registers)
            for (_, k), t in zip(todo, timings):
                cache[k] = [round(t[0], 3), round(t[1], 3)]
            _save_cache(cache)
    for (layer, _), k in zip(candidates, keys):
        dense_us, sparse_us = cache[k]
        gain = dense_us / sparse_us if sparse_us > 0 else 0.0
        entries[layer.index].update(
            dense_us=dense_us, sparse_us=sparse_us, gain=round(gain, 3),
            choice="sparse" if gain >= MIN_GAIN else "dense", decided_by="measured",
        )  # fmt: skip
        if spec.family == "wasm":
            entries[layer.index]["measured_on"] = "node (wasm, 1 thread)"
