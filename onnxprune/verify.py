"""Correctness oracles used by the tests and benchmarks (and available to users).

`run` executes a model in onnxruntime with graph optimisations OFF (the reference runtime must not
rewrite what it is checking). `dead_channel_check` is the strongest test of a pruning rewrite: silence
some channels of a group in the original model (`rewrite.apply_mask`), physically remove the same
channels (`rewrite.apply_plan`), and compare every output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.channels import ChannelAnalysis, ChannelGroup


def session(
    model: onnx.ModelProto | str | os.PathLike, optimize: bool = False, spin: bool = True, threads: int | None = None,
    mem_pattern: bool = True,
):
    """An onnxruntime CPU session of a model or a model file (str or path-like).

    `spin=False` stops its threads busy-waiting between runs (callers that do heavy numpy/BLAS work between
    runs, e.g. calibration statistics, would otherwise fight them). `threads` fixes the intra-op thread count
    (and one inter-op thread), so timings do not depend on the machine's core count; None: onnxruntime's
    default. `mem_pattern=False` allocates each tensor from the arena instead of one block planned for the whole
    run: runs of one session in several threads at once then share freed memory (`onnxprune.synthetic`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 4  # fatal only: a failed run raises with the same message, one line is enough
    opts.enable_mem_pattern = mem_pattern
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(os.fspath(model), opts, providers=["CPUExecutionProvider"])
    from onnxprune import external

    if external.has_lazy(model):  # weights in external files: onnxruntime needs them in memory or on disk
        if external.lazy_bytes(model) + model.ByteSize() > (1 << 30):
            return _session_from_disk(model, opts)
        model = external.materialize(model)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _session_from_disk(model: onnx.ModelProto, opts):
    """Large lazy models: write a copy (streamed) to a temporary folder and load it from there."""
    import tempfile

    import onnxruntime as ort

    from onnxprune.io import save_model

    with tempfile.TemporaryDirectory(prefix="onnxprune-verify-") as folder:
        path = save_model(model, f"{folder}/model.onnx", external_data=True)
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto | str | os.PathLike, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = session(model)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in inputs.items() if k in names})


def random_inputs(model: onnx.ModelProto, seed: int = 0, dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Random inputs for every graph input; symbolic dims become 1 (first axis) or 8, or `dims[name]`."""
    from onnx.helper import tensor_dtype_to_np_dtype

    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = []
        for k, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            else:
                shape.append((dims or {}).get(d.dim_param, 1 if k == 0 else 32))
        dtype = tensor_dtype_to_np_dtype(tt.elem_type)
        if dtype.kind in "iu":
            high = 2 if any(k in vi.name for k in ("mask", "type")) else 16  # masks, segment ids
            value = rng.integers(0, high, size=shape).astype(dtype)
        elif dtype.kind == "b":
            value = rng.random(shape) > 0.5
        else:
            value = rng.standard_normal(shape).astype(dtype)
        out[vi.name] = np.asarray(value)  # a rank-0 input (an If's condition) must be an array, not a scalar
    return out


def max_rel_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest |a - b| over all outputs, relative to the largest finite |a| of its output (at least 1e-6). Equal
    values (infinities of one sign, NaN on both sides) agree; a NaN or infinity on one side only is an infinite
    error (Python's ``max`` would have dropped a NaN and read 0)."""
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("inf")
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        differ = ~((x == y) | (np.isnan(x) & np.isnan(y)))
        if not differ.any():
            continue
        gaps = np.abs(x[differ] - y[differ])
        if not np.all(np.isfinite(gaps)):
            return float("inf")
        finite = np.abs(x[np.isfinite(x)])
        worst = max(worst, float(gaps.max() / max(finite.max(initial=0.0), 1e-6)))
    return worst


@dataclass
class CheckResult:
    group: int
    removed: int
    error: float
    params_removed: int


def dead_channel_check(
    analysis: ChannelAnalysis,
    group: ChannelGroup,
    inputs: dict[str, np.ndarray],
    reference: list[np.ndarray] | None = None,
    seed: int = 0,
) -> CheckResult:
    """Remove about half of a group's channels two ways (masked vs physically pruned) and compare."""
    from onnxprune.importer import check_model
    from onnxprune.rewrite import apply_mask, apply_plan
    from onnxprune.shape_inference import infer_shapes

    rng = np.random.default_rng([seed, group.id])
    n_remove = max(1, group.size // 2) if group.size > 1 else 0
    channels = np.sort(rng.choice(group.size, size=n_remove, replace=False))
    labels = group.labels[channels]
    masked = apply_mask(analysis, labels)
    pruned = infer_shapes(apply_plan(analysis, labels))
    check_model(pruned)
    expected = run(masked, inputs)
    got = run(pruned, inputs)
    return CheckResult(group.id, n_remove, max_rel_error(expected, got), int(group.params_per_channel[channels].sum()))


def nonfinite_weights(before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
    """Float initializers of `after` holding NaN or infinities that `before` (same name) did not hold: what a
    repair fed degenerate statistics writes (the certificate compares two models that both hold them). Tensors
    still in an external data file are skipped: a step writes its values inline, and reading the untouched
    weights of a large model would load them all."""
    from onnx import numpy_helper

    old = {init.name: init for init in before.graph.initializer}
    bad = []
    for init in after.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL or old.get(init.name) is init:
            continue
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind != "f" or np.all(np.isfinite(arr)):
            continue
        prev = old.get(init.name)
        if prev is None or np.all(np.isfinite(numpy_helper.to_array(prev))):
            bad.append(init.name)
    return bad
