"""Equivalence certificate: evidence, stored in the pruned model, that the pruning removed only what it says.

Start reading at `certify`. The check is the dead-channel oracle applied to the whole plan:

1. The ORIGINAL model with the removed channels silenced (`rewrite.apply_mask`: weights set to 0, variances
   and divisors to 1) must compute exactly what the PRUNED model computes: removing a channel whose every
   contribution is zero changes nothing. Both run in onnxruntime with graph optimisations OFF
   (`verify.session`) on the same inputs; the largest relative output difference is `exact_max_error`
   (float32 round-off, about 1e-6, for an exact pruning). It passes when it is at most `tolerance`.
2. The unmasked original on the same inputs gives `output_change`, the relative change pruning caused.
   Pruning is meant to change outputs, so this is information for the reader, not a pass/fail criterion.

The `Certificate` also records which inputs were used, the tool version, the SHA-256 of the input model
and the time the check took. `store` writes it as JSON into the pruned model's ``metadata_props``
(``onnxprune.certificate``), `read` gets it back, so anyone receiving a pruned model can audit it.

When a weight repair ran, the pruned model was cut from the REPAIRED model: pass that model's analysis and
labels (its masked version is what the pruned model must equal; the constrained pipeline's
`RemovedChannels` artifact holds both) and the untouched original as `original`. `certify_against` takes
the model the pruned one must equal directly: unconstrained pruning's oracle (`upscale.oracle.mask_model`)
is built from its plan, not from one set of labels.

`is_cheap` estimates the check's time from the model's size (session builds grow with the parameters, runs
with the MACs) so that a caller can turn the check on by default only when it costs about two seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxprune.calibration import CalibrationData
from onnxprune.errors import OnnxPruneError
from onnxprune.graph import ModelGraph
from onnxprune.io import file_sha256
from onnxprune.metadata import read_json_entry, set_metadata
from onnxprune.metrics import count_macs, count_params
from onnxprune.quantized import without_activation_quantization
from onnxprune.rewrite import apply_mask
from onnxprune.verify import max_rel_error, random_inputs, session
from onnxprune.version import __version__

if TYPE_CHECKING:
    from onnxprune.channels import ChannelAnalysis

Inputs = CalibrationData | Sequence[dict[str, np.ndarray]] | None  # calibration data, feeds, or random
CERTIFICATE_KEY = "onnxprune.certificate"
DEFAULT_TOLERANCE = 1e-4
# Half-precision outputs carry ~1e-3 relative round-off, and removing terms reorders their sums.
HALF_TOLERANCE = 1e-2
CHEAP_SECONDS = 2.0

# Cost model of `certify` (`estimate_seconds`), measured on this project's 2-core machine (onnxruntime CPU,
# optimisations off). Building a session costs about 15 ns per parameter and masking about 7 ns (ResNet-50,
# 25.6 M parameters: 0.32 s per session, 0.17 s for the mask; MiniLM-L6, 22.6 M: 0.32 s and 0.18 s); runs reach
# 30-45 GMAC/s on convs (ResNet-50 at 224x224: 0.13 s per run). Three sessions are built (original, masked,
# pruned) and each runs every sample once. Estimate vs measured `certify` at ratio 0.3, 4 random samples:
# ResNet-18 1.3 s vs 0.8 s, MiniLM-L6 (seq 32) 1.4 s vs 1.3 s, ResNet-50 2.8 s vs 1.4 s (the pruned model
# runs faster than the estimate's full-size upper bound).
SECONDS_PER_PARAM = 3 * 15e-9 + 7e-9
SECONDS_PER_MAC = 1 / 35e9
SECONDS_FIXED = 0.1
# Random inputs cost about 5 ns per element to draw (and are held in memory for every sample): a model
# whose inputs are huge (a fuzzed 2**40 dim) is never cheap, and past `MAX_RANDOM_ELEMENTS` per sample
# the check refuses with one line instead of trying to allocate them.
SECONDS_PER_INPUT_ELEMENT = 5e-9
MAX_RANDOM_ELEMENTS = 1 << 28
SYMBOLIC_DIM = 32  # what `verify.random_inputs` substitutes for a symbolic non-batch dim


class VerificationUnavailable(OnnxPruneError):
    """The check cannot run at all: the ORIGINAL model does not run in onnxruntime (a custom op, say), random
    inputs for it would be too large, or the plan removed channels of inexact groups (``--allow-inexact``: the
    pruned model cannot equal the masked original). Says nothing about the pruning (a pruned model that fails
    to run while the original runs is an ordinary `OnnxPruneError`)."""


@dataclass(frozen=True)
class Certificate:
    """The result of `certify`.

    Attributes:
        exact_max_error: max relative output difference, masked original vs pruned (the oracle; about 1e-6
            for an exact pruning, ``inf`` when output shapes differ, ``nan`` for non-finite outputs).
        output_change: max relative output difference, original vs pruned (what pruning changed).
        inputs: which inputs were used, e.g. ``"calibration: 8 samples"`` or ``"random: 4 samples, seed 0"``;
            for a QDQ model ``", activation quantization bypassed"`` follows: the exact check compares the two
            models with their activation quantizers bypassed (a round-off at a rounding boundary is a whole
            quantization step otherwise); `output_change` compares the models as they are.
        tolerance: the largest `exact_max_error` that passes.
        passed: `exact_max_error` is finite and at most `tolerance`.
        tool: ``"onnxprune X.Y.Z"``.
        input_sha256: SHA-256 of the input model file (the ``.onnx`` file only, not its external data), or of
            the serialized original proto when no path was given.
        seconds: wall time of the check.
    """

    exact_max_error: float
    output_change: float
    inputs: str
    tolerance: float
    passed: bool
    tool: str
    input_sha256: str
    seconds: float

    def as_dict(self) -> dict:
        """JSON-ready fields; a non-finite error becomes None (strict JSON has no inf/nan)."""
        out = asdict(self)
        for key in ("exact_max_error", "output_change"):
            if not math.isfinite(out[key]):
                out[key] = None
        return out


def certify(original: onnx.ModelProto, pruned: onnx.ModelProto, analysis: ChannelAnalysis, labels: np.ndarray,
            inputs: Inputs = None, samples: int = 4, seed: int = 0, input_path: str | os.PathLike | None = None,
            tolerance: float | None = None) -> Certificate:
    """Check that `pruned` equals the original with the removed channels silenced, and measure the change.

    Args:
        original: the model before pruning (for `output_change` and, without `input_path`, the hash).
        pruned: the pruned model to certify.
        analysis: the channel analysis the pruned model was cut from; its model is the one masked (the
            repaired model when a repair ran, else `original`).
        labels: component labels of the removed channels (`PruningPlan.labels(analysis)`).
        inputs: calibration samples (`calibration.CalibrationData`, or a list of feed dicts); None: random
            inputs (`verify.random_inputs`, symbolic dims 1 for the batch axis and 32 elsewhere).
        samples: how many samples to run (the first ones of `inputs`, or this many random ones).
        seed: seed of the first random sample (sample i uses ``seed + i``).
        input_path: the input model file, whose bytes are hashed.
        tolerance: largest `exact_max_error` that passes; None: `default_tolerance(original)`.

    Raises:
        OnnxPruneError: a model does not run in onnxruntime on these inputs.
    """
    start = time.perf_counter()
    removed = set(np.asarray(labels, dtype=np.int64).tolist())
    inexact = [g for g in analysis.groups if g.inexact and removed.intersection(g.labels.tolist())]
    if inexact:
        raise VerificationUnavailable(
            f"verification: {len(inexact)} inexact groups lost channels (--allow-inexact): their removal changes "
            "what normalisation statistics (or a TopK's choice) see, so no masked original equals the pruned model "
            "(--no-verify skips the check)")
    masked = apply_mask(analysis, np.asarray(labels, dtype=np.int64))
    cert = certify_against(original, masked, pruned, inputs, samples, seed, input_path, tolerance)
    return replace(cert, seconds=round(time.perf_counter() - start, 3))  # the masking counts too


def certify_against(
    original: onnx.ModelProto,
    expected: onnx.ModelProto,
    pruned: onnx.ModelProto,
    inputs: Inputs = None,
    samples: int = 4,
    seed: int = 0,
    input_path: str | os.PathLike | None = None,
    tolerance: float | None = None,
) -> Certificate:
    """`certify` with the reference given: `pruned` must compute what `expected` computes.

    Args:
        original: the model before pruning (for `output_change` and, without `input_path`, the hash).
        expected: the model `pruned` must equal: the original with the removed channels silenced.
        pruned: the pruned model to certify.
        inputs, samples, seed, input_path, tolerance: as for `certify`.

    Raises:
        VerificationUnavailable: the original does not run in onnxruntime, or random inputs would be too large.
        OnnxPruneError: the masked original or the pruned model does not run on these inputs.
    """
    start = time.perf_counter()
    tolerance = default_tolerance(original) if tolerance is None else tolerance
    feeds, described = _feeds(original, inputs, samples, seed)
    reference = _outputs(original, feeds, "original")
    got = _outputs(pruned, feeds, "pruned")
    change = max((max_rel_error(r, g) for r, g in zip(reference, got)), default=0.0)
    # QDQ: the exact check bypasses activation quantization on both sides (`quantized.without_activation_quantization`)
    expected_b, pruned_b = without_activation_quantization(expected), without_activation_quantization(pruned)
    if expected_b is not None and pruned_b is not None:
        expected, pruned = expected_b, pruned_b
        got = _outputs(pruned, feeds, "pruned")
        described += ", activation quantization bypassed"
    wanted = _outputs(expected, feeds, "masked original")
    exact = max((max_rel_error(e, g) for e, g in zip(wanted, got)), default=0.0)
    return Certificate(
        exact_max_error=exact,
        output_change=change,
        inputs=described,
        tolerance=tolerance,
        passed=bool(math.isfinite(exact) and exact <= tolerance),
        tool=tool_version(),
        input_sha256=sha256_of(input_path) if input_path is not None else sha256_of_proto(original),
        seconds=round(time.perf_counter() - start, 3),
    )


def default_tolerance(model: onnx.ModelProto) -> float:
    """`DEFAULT_TOLERANCE` (float32 round-off is about 1e-6), or `HALF_TOLERANCE` when an output or a weight
    is float16 or bfloat16."""
    half = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    outputs = (o.type.tensor_type.elem_type for o in model.graph.output)
    weights = (t.data_type for t in model.graph.initializer)
    return HALF_TOLERANCE if any(t in half for t in (*outputs, *weights)) else DEFAULT_TOLERANCE


def _feeds(
    model: onnx.ModelProto,
    inputs: CalibrationData | Sequence[dict[str, np.ndarray]] | None,
    samples: int,
    seed: int,
) -> tuple[list[dict[str, np.ndarray]], str]:
    """The feed dicts to run and how to describe them in the certificate."""
    if samples < 1:
        raise OnnxPruneError(f"verification needs at least one sample, got {samples}")
    if inputs is None:
        elements = input_elements(model)
        if elements > MAX_RANDOM_ELEMENTS:
            raise VerificationUnavailable(f"verification: the model's inputs hold {elements} elements per sample, too many "
                                 "for random inputs (pass --calib, or --no-verify)")
        feeds = [random_inputs(model, seed=seed + i) for i in range(samples)]
        return feeds, f"random: {len(feeds)} sample{'s' * (len(feeds) != 1)}, seed {seed}"
    if isinstance(inputs, CalibrationData):  # one sample per run: models often have a static batch of 1
        inputs = inputs.for_model(model)
        feeds = [inputs.sample(i) for i in range(min(inputs.n, samples))]
        if inputs.batch > 1 and feeds:
            return feeds, f"calibration: {len(feeds)} run{'s' * (len(feeds) != 1)} of {inputs.batch} inputs"
    else:
        feeds = list(inputs)[:samples]
    if not feeds:
        raise OnnxPruneError("verification: the calibration data holds no sample")
    return feeds, f"calibration: {len(feeds)} sample{'s' * (len(feeds) != 1)}"


def _outputs(
    model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], which: str
) -> list[list[np.ndarray]]:
    """Every output of `model` for each feed dict, from one session with graph optimisations off."""
    try:
        sess = session(model)
        names = {i.name for i in sess.get_inputs()}
        return [sess.run(None, {k: v for k, v in feed.items() if k in names}) for feed in feeds]
    except OnnxPruneError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidArgument, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        error = VerificationUnavailable if which == "original" else OnnxPruneError
        raise error(f"verification: the {which} model does not run in onnxruntime: {first}") from None


def tool_version() -> str:
    """``"onnxprune X.Y.Z"``, from `onnxprune.version` (the one place the version lives)."""
    return f"onnxprune {__version__}"


def sha256_of(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks."""
    return file_sha256(path)


def sha256_of_proto(model: onnx.ModelProto) -> str:
    """SHA-256 (hex) of a model's serialized proto (lazy external tensors count as their references)."""
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def estimate_seconds(model: onnx.ModelProto, samples: int = 4) -> float:
    """Rough wall time of `certify` on random inputs (see the cost model constants above)."""
    graph = ModelGraph(model)
    macs = count_macs(graph) * SYMBOLIC_DIM ** _symbolic_dims(model)  # count_macs counts those dims as 1
    runs = 3 * samples  # original, masked and pruned (the pruned one is smaller: this is an upper bound)
    inputs = samples * input_elements(model) * SECONDS_PER_INPUT_ELEMENT
    return SECONDS_FIXED + count_params(graph) * SECONDS_PER_PARAM + runs * macs * SECONDS_PER_MAC + inputs


def input_elements(model: onnx.ModelProto) -> int:
    """Elements of one sample of random inputs (symbolic dims: 1 on the batch axis, else `SYMBOLIC_DIM`)."""
    inits = {t.name for t in model.graph.initializer}
    total = 0
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        elements = 1
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            static = d.HasField("dim_value") and d.dim_value > 0
            elements *= d.dim_value if static else (1 if k == 0 else SYMBOLIC_DIM)
        total += elements
    return total


def _symbolic_dims(model: onnx.ModelProto) -> int:
    """Distinct symbolic non-batch dims of the graph inputs (each becomes `SYMBOLIC_DIM` in random inputs)."""
    inits = {t.name for t in model.graph.initializer}
    names: set[str] = set()
    unnamed = 0
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if k == 0 or (d.HasField("dim_value") and d.dim_value > 0):
                continue
            if d.dim_param:
                names.add(d.dim_param)
            else:
                unnamed += 1
    return len(names) + unnamed


def is_cheap(model: onnx.ModelProto, samples: int = 4, budget_seconds: float = CHEAP_SECONDS) -> bool:
    """Whether `certify` on `samples` random inputs should take under `budget_seconds` (estimated)."""
    return estimate_seconds(model, samples) <= budget_seconds


def store(model: onnx.ModelProto, certificate: Certificate) -> None:
    """Write the certificate into ``metadata_props["onnxprune.certificate"]`` (JSON), in place."""
    set_metadata(model, CERTIFICATE_KEY, json.dumps(certificate.as_dict(), sort_keys=True))


def read(model: onnx.ModelProto) -> dict | None:
    """The certificate stored in a model's metadata, as a dict, or None when there is none.

    Raises:
        OnnxPruneError: the entry exists but is not a JSON object.
    """
    try:
        return read_json_entry(model, CERTIFICATE_KEY)
    except ValueError as exc:
        raise OnnxPruneError(str(exc)) from None
