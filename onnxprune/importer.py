"""Framework-agnostic importer: load, validate and canonicalise an ONNX model.

Start reading at `import_model`, the one entry point the CLI uses: `load_model` (read the file, attach
external data lazily, run the checker), optionally `fix_input_shapes`, then `canonicalize`, which
alternates the normalisation steps of `canonical` (weights as initializers in the layout their consumer
reads, unique node names, folded constant shape arithmetic) with `shape_inference.infer_shapes` until
no more sizes become static.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

# `normalize` and `infer_shapes` are used here and still imported from here by onnxprune/__init__.py and
# passes/* (owned elsewhere); they live in `canonical` and `shape_inference`.
from onnxprune.canonical import fold_static_shapes, normalize
from onnxprune.canonical import remove_dead_code as _remove_dead_code  # noqa: F401  # moved to onnxprune.canonical
from onnxprune.errors import ModelError, UnsupportedModelError, UsageError
from onnxprune.external import attach
from onnxprune.onnx_utils import light_copy, numel
from onnxprune.shape_inference import has_unknown_dims, infer_shapes

# Models whose protobuf would exceed this are saved with external data.
PROTOBUF_LIMIT = 2**31 - 1


def load_model(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Load a model file with its external data, refusing anything that is not a valid ONNX model.

    Raises:
        ModelError: missing, empty, truncated or non-ONNX file; a model that fails the checker.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a directory, not an ONNX file")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: file is empty")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ValueError...
        raise ModelError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{path}: not an ONNX model (no graph)")
    attach(model, path.parent)  # validate external references; large tensors stay lazy
    if check:
        try:
            check_model(model, path)
        except ModelError:
            if not drop_shape_hints(model):
                raise
            check_model(model, path)  # still failing without the hints: the model itself is wrong
    return model


def drop_shape_hints(model: onnx.ModelProto) -> bool:
    """Delete the intermediate `value_info` shapes of the main graph; True when there were any.

    They are hints, not semantics: onnxruntime merges a contradicting hint leniently, and shape
    inference re-derives every one of them. Some exporters leave stale ones behind (jax2onnx 0.17
    folds NHWC<->NCHW Transpose pairs and keeps the NHWC shapes of the values in between), which the
    strict checker rejects; such a model is loaded without them.
    """
    if not len(model.graph.value_info):
        return False
    del model.graph.value_info[:]
    return True


def check_model(model: onnx.ModelProto, path: Path | None = None) -> None:
    """Run the ONNX checker with shape checking; raise ModelError with one line on failure.

    The checker runs on a copy whose large weights are replaced by typed graph inputs (fast for any
    size, and possible beyond the 2 GB protobuf limit); weight byte counts are checked here.
    """
    where = f"{path}: " if path else ""
    try:
        _check_weight_sizes(model)
        onnx.checker.check_model(light_copy(model), full_check=True)
    except ModelError as exc:
        raise ModelError(f"{where}{exc}") from None  # which file, as the checker's messages say
    except Exception as exc:
        raise ModelError(f"{where}model fails the ONNX checker: {_first_line(exc)}") from None


def _check_weight_sizes(model: onnx.ModelProto) -> None:
    from onnx.helper import tensor_dtype_to_np_dtype

    for t in model.graph.initializer:
        field = _TYPED_FIELDS.get(t.data_type)
        if not t.raw_data and t.data_location != onnx.TensorProto.EXTERNAL and field is not None:
            held = len(getattr(t, field))  # values in the typed field (quantizers write small scales this way)
            if held != numel(t):
                raise ModelError(f"initializer {t.name!r} holds {held} values for shape {list(t.dims)}")
            continue
        if t.raw_data and t.data_location != onnx.TensorProto.EXTERNAL:
            try:
                itemsize = np.dtype(tensor_dtype_to_np_dtype(t.data_type)).itemsize
            except Exception:
                continue
            if t.data_type in (onnx.TensorProto.STRING,) or itemsize == 0:
                continue
            if len(t.raw_data) != numel(t) * itemsize and t.data_type not in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
                raise ModelError(f"initializer {t.name!r} holds {len(t.raw_data)} bytes for shape {list(t.dims)}")


# The typed field holding one value per element, by element type (4-bit, complex and string types left out).
_T = onnx.TensorProto
_TYPED_FIELDS = {
    _T.FLOAT: "float_data", _T.DOUBLE: "double_data", _T.INT64: "int64_data", _T.UINT64: "uint64_data",
    _T.UINT32: "uint64_data", **dict.fromkeys((_T.INT32, _T.INT16, _T.INT8, _T.UINT16, _T.UINT8, _T.BOOL, _T.FLOAT16,
                                               _T.BFLOAT16), "int32_data"),
}  # fmt: skip


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def canonicalize(model: onnx.ModelProto, inplace: bool = False) -> tuple[onnx.ModelProto, bool]:
    """`normalize`, infer shapes, and fold sizes that became static; returns (model, changed).

    onnx's own inference runs first and between folding rounds (fast); onnxruntime's symbolic
    inference (slow) runs once at the end, only if sizes are still unknown.
    """
    model, changed = normalize(model, inplace)
    model = infer_shapes(model, symbolic=False)
    for _ in range(32):  # each round can make more sizes static
        if not fold_static_shapes(model):
            break
        changed = True
        del model.graph.value_info[:]
        model = infer_shapes(model, symbolic=False)
    if has_unknown_dims(model):
        model = infer_shapes(model, symbolic=True)
    return model, changed


def fix_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """Set graph input sizes (e.g. a dynamic sequence length or image size) to static values in place.

    Static sizes let constant folding resolve run-time shape arithmetic, so more channels are prunable;
    the pruned model then accepts exactly these shapes.
    """
    inputs = {i.name: i for i in model.graph.input}
    for name, dims in shapes.items():
        if name not in inputs:
            raise UnsupportedModelError(f"--shape names {name!r}, which is not a model input ({', '.join(inputs)})")
        tt = inputs[name].type.tensor_type
        if len(tt.shape.dim) != len(dims):
            raise UnsupportedModelError(f"--shape {name}: model input has rank {len(tt.shape.dim)}, got {len(dims)} sizes")
        for d, v in zip(tt.shape.dim, dims):
            if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != v:
                raise UnsupportedModelError(f"--shape {name}: size {v} conflicts with the model's {d.dim_value}")
            d.Clear()
            d.dim_value = int(v)
    del model.graph.value_info[:]
    return model


def parse_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """`name=1,3,224,224` strings to a dict; raises UsageError on bad syntax."""
    out: dict[str, list[int]] = {}
    for spec in specs or []:
        name, _, dims = spec.partition("=")
        try:
            values = [int(v) for v in dims.replace("x", ",").split(",") if v.strip()]
        except ValueError:
            values = []
        if not name or not values or any(v <= 0 for v in values):
            raise UsageError(f"bad --shape {spec!r}: expected NAME=D1,D2,... with positive sizes")
        out[name] = values
    return out


def import_model(path: str | os.PathLike, shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """Load, check and canonicalize a model: the one entry point the CLI uses."""
    model = load_model(path)
    if shapes:
        fix_input_shapes(model, shapes)
    return canonicalize(model, inplace=True)[0]
