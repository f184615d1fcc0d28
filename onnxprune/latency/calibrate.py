"""In-model prices: a latency table's per-node prices calibrated against a profile of the whole model.

Start reading at `in_model_table`. A table prices every node by a one-node micro-model
(`latency.microbench`), which pays what the node does not pay inside the model: the NCHW to NCHWc layout
conversions at its input and output, a call, cold caches. Inside the model consecutive blocked
convolutions share the layout and the SiLU of EfficientNet runs as one fused kernel. So the table's
*relative* prices are off, by kind of node. Measured on this machine (onnxruntime 1.32 CPU, 1 thread,
profiler on the dense model, median of 20 runs, load average 4-8 on 2 cores), in-model time over the
micro-model price, summed per kind:

===============  =================  ==========  ============  =================================
model            pointwise / kxk    depthwise   Gemm          memory-bound
===============  =================  ==========  ============  =================================
ResNet-50        0.91 (53 convs)    -           0.87          MaxPool 0.47
MobileNetV2      0.65 (35)          0.33 (17)   0.82          GlobalAveragePool 0.60
EfficientNet-B0  0.71 (65)          0.37 (16)   1.05          SE products 0.75, pools 0.28,
                                                              SiLU (98 nodes, one QuickGelu kernel
                                                              each, plus its layout conversions) 0.41
===============  =================  ==========  ============  =================================

A depthwise convolution costs a third of its micro-model price in the model, a pointwise one two thirds:
a table taken at face value sees the depthwise groups twice as expensive as they are, relative to the
rest, which skews every use of the relative prices (the latency-weighted ratios of `latency.weighted`,
the predicted speedup, the knapsack's marginal costs).

**Calibration.** The backend profiles the dense model once (`OrtBackend.profile_nodes`: the kernel times
of onnxruntime's profiler, keyed by the optimized graph's node names); `attribute` gives every kernel's
time to the model node it computes (``<tensor>_nchwc`` names the output of a blocked convolution, possibly
after a fused batch norm or activation, which is walked back to the convolution; a fusion is named after
the node it replaced, e.g. ``<Mul>/QuickGeluFusion/``; a priced node that got no kernel of its own, the
Sigmoid of a fused SiLU, shares the time of its consumer in proportion to the two prices; the layout
conversions, ``ReorderInput``/``ReorderOutput``, which the memory-bound nodes force, are spread over those
nodes). Each priced node's factor is its in-model time over its micro-model price; a node the profile
does not show takes the median factor of its op type. `calibrated` scales every node's series by its
factor, so a curve keeps the steps its micro-benchmarks measured and gets the level the model shows.
The factors are cached on disk next to the table's timings, per (model structure, backend key).

A backend without a profiler (TVM's ``time_evaluator`` times whole functions) gets the table unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from onnxprune.channels import ChannelAnalysis
from onnxprune.errors import OnnxPruneError
from onnxprune.io import write_atomically
from onnxprune.latency.backend import LatencyBackend
from onnxprune.latency.microbench import HEAVY_OPS
from onnxprune.latency.model_timings import structure_digest
from onnxprune.latency.table import GroupCurve, LatencyTable, default_cache_dir

__all__ = ["attribute", "calibrated", "in_model_factors", "in_model_table"]

CALIBRATION_VERSION = 2  # bump when the attribution changes
MIN_FACTOR, MAX_FACTOR = 0.05, 5.0  # a factor outside this is a mis-attribution, not a measurement
#: ``ONNXPRUNE_LATENCY_IN_MODEL=0`` turns calibration off (the micro-model prices as they are, for comparing)
ENV_SWITCH = "ONNXPRUNE_LATENCY_IN_MODEL"
#: ops onnxruntime folds into the convolution or matrix product before them (walked back to it)
_FOLDED = ("BatchNormalization", "Relu", "Clip", "LeakyRelu", "HardSigmoid", "Sigmoid", "Tanh", "Add")
_LAYOUT_KERNELS = ("ReorderInput", "ReorderOutput")


def enabled() -> bool:
    """Calibration is on unless ``ONNXPRUNE_LATENCY_IN_MODEL=0``."""
    return os.environ.get(ENV_SWITCH, "1").strip() not in ("0", "false", "no", "off")


def in_model_table(
    table: LatencyTable, analysis: ChannelAnalysis, backend: LatencyBackend, *, cache_dir: Path | str | None = None
) -> LatencyTable:
    """`table` with in-model prices (`calibrated` with `in_model_factors`), or `table` itself when the
    backend has no profiler or did not measure the table, calibration is off (`ENV_SWITCH`), or the profile
    fails."""
    if (not enabled() or not hasattr(backend, "profile_nodes") or not table.node_dense_ms or table.in_model
            or backend.key != table.backend_key):  # the profile must come from where the prices were measured
        return table
    found = in_model_factors(table, analysis, backend, cache_dir=cache_dir)
    return table if found is None else calibrated(table, *found)


def in_model_factors(
    table: LatencyTable, analysis: ChannelAnalysis, backend: LatencyBackend, *, cache_dir: Path | str | None = None
) -> tuple[dict[str, float], float] | None:
    """(priced node -> in-model time over its micro-model price net of the call overhead, the call overhead
    in ms), profiled once per model and backend (cached); None when the profile fails (a model onnxruntime
    runs only piecewise)."""
    from onnxprune.latency.measure import static_inputs

    model = analysis.graph.model
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"in-model-{_model_digest(model, table.backend_key)}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(path.read_text())
        if data["version"] == CALIBRATION_VERSION and data["backend"] == table.backend_key:
            overhead = float(data["call_ms"])
            factors = factors_from(table, {k: float(v) for k, v in data["in_model_ms"].items()}, overhead)
            return (factors, overhead) if factors else None
    try:
        profile = backend.profile_nodes(static_inputs(model, None))  # type: ignore[attr-defined]
        overhead = call_overhead_ms(backend)
    except Exception:  # calibration is a refinement: the uncalibrated table still stands
        return None
    # rounded as stored, so that this run prices with what every later run reads from the cache
    overhead = round(overhead, 6)
    in_model = {k: round(v, 6) for k, v in sorted(attribute(model, profile, table.node_dense_ms).items())}
    payload = json.dumps({"version": CALIBRATION_VERSION, "backend": table.backend_key, "call_ms": overhead,
                          "in_model_ms": in_model}, indent=1).encode()
    with contextlib.suppress(OnnxPruneError, OSError):
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: f.write(payload))
    factors = factors_from(table, in_model, overhead)
    return (factors, overhead) if factors else None


def call_overhead_ms(backend: LatencyBackend) -> float:
    """What one run of a micro-model costs beyond its kernel: the fastest run of a one-element Relu, timed as
    the table times its micro-models (onnxruntime 1.32, this machine: 4.0 us, against a median priced node
    of EfficientNet-B0 of 28 us; its 213 priced nodes pay it 213 times alone and never in the model)."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "call_overhead", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return float(backend.time_models([model], warmup=5, repeat=100)[0].best_ms)


def _net(ms: float, overhead: float) -> float:
    """A micro-model price without the call overhead (at least a tenth of it: tiny nodes stay priced)."""
    return max(ms - overhead, 0.1 * ms)


def factors_from(table: LatencyTable, in_model: Mapping[str, float], overhead: float = 0.0) -> dict[str, float]:
    """Priced node -> in-model ms over its price net of `overhead` (`_net`); nodes without an in-model time
    take the median factor of their op type (`LatencyTable.node_ops`), else of every node; clamped to
    [`MIN_FACTOR`, `MAX_FACTOR`]."""
    raw = {n: in_model[n] / _net(ms, overhead) for n, ms in table.node_dense_ms.items()
           if ms > 0 and in_model.get(n, 0.0) > 0}
    if not raw:
        return {}
    ops = table.node_ops
    by_op: dict[str, list[float]] = {}
    for n, f in raw.items():
        by_op.setdefault(ops.get(n, ""), []).append(f)
    overall = float(np.median(list(raw.values())))
    out = {}
    for n in table.node_dense_ms:
        same = by_op.get(ops.get(n, ""), [])
        f = raw[n] if n in raw else float(np.median(same)) if same else overall
        out[n] = float(np.clip(f, MIN_FACTOR, MAX_FACTOR))
    return out


def attribute(model: onnx.ModelProto, profile: Mapping[str, float], priced: Mapping[str, float]) -> dict[str, float]:
    """Priced node -> its time inside the model, from a profile keyed by optimized-graph node names (see
    the module docstring for the rules)."""
    nodes = {(n.name or n.output[0]): n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    name_of = {id(n): k for k, n in nodes.items()}
    got: dict[str, float] = {}
    layout = 0.0
    for kernel, ms in profile.items():
        node = _resolve(kernel, nodes, producer)
        if node is None:
            if kernel.split("_token_")[0] in _LAYOUT_KERNELS:
                layout += ms
            continue
        node = _walk_back(node, producer, priced, name_of)
        key = name_of[id(node)]
        got[key] = got.get(key, 0.0) + ms
    # a priced node without a kernel of its own was fused into a consumer that has one: they share its time
    for name, price in priced.items():
        if name in got or name not in nodes:
            continue
        for out in nodes[name].output:
            partner = next((name_of[id(c)] for c in consumers.get(out, []) if name_of[id(c)] in got
                            and name_of[id(c)] in priced), None)
            if partner is not None:
                pair = priced[partner] + price
                total = got[partner]
                got[partner], got[name] = total * priced[partner] / pair, total * price / pair
                break
    # layout conversions go to the memory-bound nodes that force them (not NCHWc kernels)
    light = {n: priced[n] for n in got if n in priced and nodes[n].op_type not in HEAVY_OPS}
    weight = sum(light.values())
    if layout > 0 and weight > 0:
        for n, price in light.items():
            got[n] += layout * price / weight
    return {n: ms for n, ms in got.items() if n in priced}


def _resolve(kernel: str, nodes: Mapping[str, onnx.NodeProto], producer: Mapping[str, onnx.NodeProto]):
    """The model node a profiled kernel computes, or None (layout conversions, nodes the runtime added)."""
    base = kernel[: -len("_nchwc")] if kernel.endswith("_nchwc") else kernel
    node = nodes.get(base) or producer.get(base)
    parts = base.rstrip("/").split("/")
    while node is None and len(parts) > 2:  # "<node name>/QuickGeluFusion/": a fusion named after a node
        parts = parts[:-1]
        node = nodes.get("/".join(parts))
    return node


def _walk_back(node, producer, priced, name_of):
    """From a folded batch norm or activation back to the priced convolution it was folded into."""
    for _ in range(4):
        if name_of[id(node)] in priced or node.op_type not in _FOLDED:
            return node
        inputs = node.input[:2] if node.op_type == "Add" else node.input[:1]
        before = [producer.get(i) for i in inputs]
        before = [p for p in before if p is not None and (p.op_type in HEAVY_OPS or p.op_type in _FOLDED)]
        if not before:
            return node
        node = before[0]
    return node


def calibrated(table: LatencyTable, factors: Mapping[str, float], overhead: float = 0.0) -> LatencyTable:
    """`table` with every node's prices net of the call `overhead` (`_net`) and scaled by its factor (a node
    without one: unchanged); the original is kept as `LatencyTable.alone` (the grid reads its steps there)
    and the factors as `in_model`."""

    def price(node: str, ms: float) -> float:
        return ms * factors[node] if overhead <= 0 else _net(ms, overhead) * factors[node]

    curves: dict[int, GroupCurve] = {}
    for gid, curve in table.curves.items():
        if len(curve.node_ms) != len(curve.nodes):
            curves[gid] = curve
            continue
        node_ms = tuple(tuple(price(n, v) for v in series) if n in factors else series
                        for n, series in zip(curve.nodes, curve.node_ms))
        ms = tuple(float(sum(col)) for col in zip(*node_ms)) if node_ms else curve.ms
        curves[gid] = replace(curve, ms=ms, node_ms=node_ms)
    dense = {n: price(n, ms) if n in factors else ms for n, ms in table.node_dense_ms.items()}
    return replace(table, curves=curves, node_dense_ms=dense, dense_ms=float(sum(dense.values())),
                   in_model=dict(factors), alone=table)


def _model_digest(model: onnx.ModelProto, backend_key: str) -> str:
    """What the profile depends on: the model's structure (`model_timings.structure_digest`), not its values."""
    return structure_digest(model, str(CALIBRATION_VERSION), backend_key)


def mean_factor(factors: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """The price-weighted mean factor (for reports)."""
    total = sum(weights.get(n, 0.0) for n in factors)
    return sum(f * weights.get(n, 0.0) for n, f in factors.items()) / total if total > 0 else math.nan
