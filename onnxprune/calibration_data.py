"""Calibration data: the samples (`CalibrationData`), read from an ``.npz`` file or distilled (`load_calib`),
and checked against the model's inputs (`check_calib`). Split from `calibration` (the statistics) by concept;
`calibration` re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import overload

import numpy as np
import onnx

from onnxprune.errors import DataError, UsageError
from onnxprune.graph import Dim, ModelGraph

__all__ = ["CalibLike", "CalibrationData", "as_calibration", "check_calib", "fixed_batch", "load_calib"]


@dataclass(frozen=True)
class CalibrationData:
    """Calibration inputs per model input name; every array's first axis enumerates inputs.

    A *sample* is what one model run takes: one input, or for a model exported with a fixed batch B > 1
    (``batch`` = B; torch.export bakes the example's batch into every shape) B consecutive inputs run
    together, the statistics then reducing over the batch as over any other position axis. `n` counts
    samples; the remainder of fewer than B inputs is not used. `for_model` sets `batch` from a model.
    """

    arrays: dict[str, np.ndarray]
    batch: int = 1

    @property
    def inputs(self) -> int:
        """How many inputs the arrays hold (`n` x `batch`, plus an unused remainder)."""
        return min(len(a) for a in self.arrays.values()) if self.arrays else 0

    @property
    def n(self) -> int:
        return self.inputs // self.batch

    def sample(self, i: int) -> dict[str, np.ndarray]:
        b = self.batch
        return {k: v[i * b : (i + 1) * b] for k, v in self.arrays.items()}

    def head(self, n: int) -> CalibrationData:
        return CalibrationData({k: v[: n * self.batch] for k, v in self.arrays.items()}, self.batch)

    def take(self, samples: np.ndarray | list[int]) -> CalibrationData:
        """The samples numbered `samples`, in that order (for a fixed batch: their whole runs)."""
        idx = np.asarray(samples, dtype=np.int64)
        rows = (idx[:, None] * self.batch + np.arange(self.batch)).ravel()
        return CalibrationData({k: v[rows] for k, v in self.arrays.items()}, self.batch)

    def batch_notice(self) -> str | None:
        """What to tell a user whose model fixes a batch above 1 (its samples run that many at a time), else None."""
        if self.batch == 1:
            return None
        return f"the model's inputs fix a batch of {self.batch}: calibration runs {self.batch} samples at a time ({self.n} runs)"

    def for_model(self, model: onnx.ModelProto | ModelGraph) -> CalibrationData:
        """These inputs with `batch` = `model`'s fixed batch (`fixed_batch`): what every runner feeding
        `model` calls first, so that library callers may pass plain arrays for a fixed-batch model.

        Raises:
            DataError: fewer inputs than one batch.
        """
        b = fixed_batch(model)
        if b == self.batch:
            return self
        if self.arrays and self.inputs < b:
            raise DataError(f"the model has a fixed batch of {b} and runs {b} calibration inputs at a time, but "
                            f"there are only {self.inputs}")
        return replace(self, batch=b)


def fixed_batch(model: onnx.ModelProto | ModelGraph) -> int:
    """The batch a model's graph inputs fix: the largest static first size above 1 among them, else 1
    (dynamic or symbolic batches, batch 1, no inputs). Read off the inputs' declared types: cheap enough to
    call before every run. `check_calib` refuses inputs fixing different batches.
    """
    proto = model.model if isinstance(model, ModelGraph) else model
    weights = {t.name for t in proto.graph.initializer}
    sizes = [vi.type.tensor_type.shape.dim[0].dim_value for vi in proto.graph.input
             if vi.name not in weights and vi.type.tensor_type.shape.dim
             and vi.type.tensor_type.shape.dim[0].HasField("dim_value")]
    return max([s for s in sizes if s > 1], default=1)


# What every pass takes as calibration inputs: CalibrationData or a plain {input name: array} (axis 0 = samples).
CalibLike = CalibrationData | Mapping[str, np.ndarray]


@overload
def as_calibration(calib: CalibLike) -> CalibrationData: ...


@overload
def as_calibration(calib: None) -> None: ...


def as_calibration(calib: CalibLike | None) -> CalibrationData | None:
    """`calib` as `CalibrationData`: a plain mapping ``{input name: array}`` (axis 0 = samples) is wrapped, so
    library callers may pass either to any pass; None stays None.

    Raises:
        TypeError: anything else (an array without input names, say).
    """
    if calib is None or isinstance(calib, CalibrationData):
        return calib
    if isinstance(calib, Mapping):
        return CalibrationData({str(k): np.asarray(v) for k, v in calib.items()})
    raise TypeError(f"calib must be CalibrationData or a mapping {{input name: array}} (axis 0 = samples), "
                    f"got {type(calib).__name__}")


def load_calib(path: str | Path, model: onnx.ModelProto, samples: int | None = None, seed: int = 0) -> CalibrationData:
    """Load ``FILE.npz`` (keys = the model's input names) and keep the first `samples` samples.

    ``synthetic`` or ``synthetic:N`` instead of a path distils N inputs (default: planned from a 90 s budget, up to 256; `onnxprune.synthetic.plan`) from the model's
    BatchNorm statistics (`onnxprune.synthetic`, deterministic for `seed`); a file of that name still loads
    when it exists.

    Raises:
        DataError: the file is missing, unreadable or not an .npz archive, or its arrays do not fit the
            model's inputs (`check_calib`); the message is one line naming the file.
        UnsupportedModelError: synthetic data for a model whose input path has an op without a gradient rule.
    """
    if isinstance(path, str) and not Path(path).exists():
        from onnxprune.synthetic import parse_spec, synthesize

        n = parse_spec(path)
        if n is not None:
            return check_calib(CalibrationData(synthesize(model, n, seed)), model, samples, path)
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise DataError(f"{where}: calibration file not found")
    if path.is_dir():
        raise DataError(f"{where}: is a directory, not an .npz calibration file")
    try:
        with path.open("rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise DataError(f"{where}: cannot read the calibration file ({exc.strerror or exc})") from None
    if magic.startswith(b"\x93NUMPY"):
        raise DataError(f"{where}: a single .npy array, not an .npz archive of named inputs "
                        "(write one with numpy.savez(path, input_name=array))")
    if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise DataError(f"{where}: not an .npz archive (write one with numpy.savez(path, input_name=array))")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # zipfile/zlib/format errors all mean "not a usable npz"
        raise DataError(f"{where}: not a readable .npz archive (numpy could not read it: {_first_line(exc)})") from None
    arrays = {}
    with archive:
        for key in archive.files:
            try:
                arrays[key] = np.asarray(archive[key])
            except ValueError as exc:
                if "allow_pickle" in str(exc):
                    raise DataError(f"{where}: array {key!r} holds Python objects; calibration inputs must be "
                                    "numeric arrays") from None
                raise DataError(f"{where}: array {key!r} cannot be read ({_first_line(exc)})") from None
            except Exception as exc:  # a damaged member: zlib/zipfile/EOF errors
                raise DataError(f"{where}: array {key!r} cannot be read ({_first_line(exc)})") from None
    return check_calib(CalibrationData(arrays), model, samples, where)


def check_calib(
    data: CalibrationData, model: onnx.ModelProto, samples: int | None = None, where: str = "calibration data"
) -> CalibrationData:
    """`data` checked against the model's inputs and cast to their dtypes, before anything runs.

    Every graph input needs an array whose axis 0 enumerates inputs and whose other axes match the
    input's static sizes (symbolic or unknown sizes accept anything); values must be numbers, and whole
    numbers for an integer input. Arrays for names that are not model inputs are ignored. A model exported
    with a fixed batch B > 1 runs B inputs at a time (`CalibrationData.batch`); `samples` counts inputs,
    and is rounded down to whole runs.

    Raises:
        DataError: an input has no array, or its array has the wrong shape or dtype, or fewer inputs than one
            fixed batch (one line, naming `where`).
        UsageError: `samples` < 1 or below the fixed batch.
    """
    graph = ModelGraph(model)
    inputs = {vi.name: vi for vi in model.graph.input if vi.name in graph.graph_inputs}
    missing = sorted(set(inputs) - set(data.arrays))
    if missing:
        has = ", ".join(repr(k) for k in sorted(data.arrays)) or "none"
        raise DataError(f"{where}: no array for model input(s) {', '.join(repr(m) for m in missing)} (it has {has}; "
                        "keys must be the model's input names)")
    arrays = {}
    batches = {}
    for name, vi in inputs.items():
        dims = graph.shape(name)
        if dims and isinstance(dims[0], int) and dims[0] > 1:  # a fixed batch: B inputs per run
            batches[name] = dims[0]
        arrays[name] = _fit_input(data.arrays[name], name, dims, vi.type.tensor_type.elem_type, where)
    if len(set(batches.values())) > 1:
        fixed = ", ".join(f"{n!r} {b}" for n, b in batches.items())
        raise DataError(f"{where}: the model's inputs fix different batches ({fixed}): they cannot run together")
    batch = max(batches.values(), default=1)
    out = CalibrationData(arrays, batch)
    if out.n < 1:
        raise DataError(f"{where}: the model has a fixed batch of {batch} and runs {batch} inputs at a time, but "
                        f"the data holds only {out.inputs}")
    if samples is not None:
        if samples < 1:
            raise UsageError(f"calib-samples must be >= 1, got {samples}")
        if samples < batch:
            raise UsageError(f"calib-samples {samples} is below the model's fixed batch of {batch} (inputs per run)")
        out = out.head(samples // batch)
    return out


def _fit_input(arr: np.ndarray, name: str, dims: tuple[Dim, ...] | None, elem_type: int, where: str) -> np.ndarray:
    """`arr` cast to the input's dtype, or a `DataError` saying why it cannot feed input `name`."""
    from onnx.helper import tensor_dtype_to_np_dtype

    if dims is not None:
        # axis 0 holds the samples (fed one or a batch at a time): only the other axes must match
        fits = arr.ndim == len(dims) and all(not isinstance(d, int) or d == n for d, n in zip(dims[1:], arr.shape[1:]))
        if not fits:
            raise DataError(f"{where}: input {name!r} has shape {tuple(arr.shape)} but the model expects "
                            f"{_format_dims(dims)} (N = samples)")
    if arr.ndim == 0 or len(arr) == 0:
        raise DataError(f"{where}: input {name!r} has no samples (shape {tuple(arr.shape)}; axis 0 enumerates samples)")
    try:
        target = np.dtype(tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):  # an element type numpy has no dtype for: leave the array as it is
        return arr
    if target.kind in "biuf":
        if arr.dtype.kind not in "biuf":
            raise DataError(f"{where}: input {name!r} holds {arr.dtype} values but the model expects {target} numbers")
        if target.kind in "biu" and arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
            raise DataError(f"{where}: input {name!r} holds fractional {arr.dtype} values but the model expects {target}")
        # NaN makes every statistic and repair NaN; infinities stay allowed (an additive attention mask's -inf)
        if arr.dtype.kind == "f" and np.isnan(arr).any():
            raise DataError(f"{where}: input {name!r} holds {int(np.isnan(arr).sum())} NaN values of {np.size(arr)}")
    return arr.astype(target, copy=False)


def _format_dims(dims: tuple[Dim, ...]) -> str:
    """The model's input shape as a tuple, samples axis as N, symbolic sizes by name, unknown ones as ?."""
    parts = ["N"] + [str(d) if d is not None else "?" for d in dims[1:]] if dims else []
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
