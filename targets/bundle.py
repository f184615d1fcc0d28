"""Deployment bundles: the model signature, ``manifest.json``, and running a bundle on this machine.

A bundle is a folder that runs on its target with nothing but its own files and the TVM runtime library
for that target::

    manifest.json     model name + sha256, inputs/outputs, target, tvm version, kernels left unscheduled
                      (``unscheduled_kernels``, normally empty), inputs whose dynamic batch was compiled as 1
                      (``batch_defaulted_to_1``), ``compile_log``, sha256 of every other file
    model.so          compiled library (kernels + VM code); wasm: runner.wasm, runtime and runner linked in
    weights.bin       the folded, layout-transformed weights (TVM parameter dict), passed to main after
                      the inputs; CUDA bundles keep theirs embedded in the library
    runner            the target's runner program, source in runner.cc (wasm: runner.js, no source)
    lib/              libtvm_runtime.so + libtvm_ffi.so for the target (shared-library targets)
    README.md         how to run it on the device
    compile.log       TVM's own messages during the compile, only when it printed any

Runners read inputs as ``.npy`` files and write ``output_<i>.npy``; :func:`run_bundle` converts from and to
dicts of arrays; each target's row says how its bundles run here (:mod:`.launch`). Nothing here imports tvm.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxprune.errors import DataError, ModelError, OnnxPruneError, UnsupportedModelError, UsageError
from onnxprune.io import file_sha256

from .table import get_target

__all__ = [
    "MANIFEST",
    "TensorSpec",
    "check_destination",
    "dynamic_batch_inputs",
    "file_sha256",
    "model_signature",
    "pruning_summary",
    "read_manifest",
    "run_bundle",
    "staged_bundle",
    "write_manifest",
]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SUMMARY_KEY = "onnxprune.summary"

_ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


@dataclass(frozen=True)
class TensorSpec:
    """Name, static shape and numpy dtype of one model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def _is_dynamic_batch(vi: onnx.ValueInfoProto) -> bool:
    """True when the input's leading dim (its batch, by convention) is not a fixed size."""
    dims = vi.type.tensor_type.shape.dim
    return bool(dims) and not dims[0].HasField("dim_value")


def _value_info_spec(
    vi: onnx.ValueInfoProto,
    shapes: dict[str, tuple[int, ...]],
    *,
    is_input: bool,
    batch_default: int | None = None,
) -> TensorSpec:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or tt.elem_type not in _ONNX_TO_NUMPY:
        raise UnsupportedModelError(f"{'input' if is_input else 'output'} {vi.name!r}: only tensors of "
                                    f"{', '.join(sorted(set(_ONNX_TO_NUMPY.values())))} are supported")
    dtype = _ONNX_TO_NUMPY[tt.elem_type]
    if vi.name in shapes:
        given = tuple(int(d) for d in shapes[vi.name])
        if len(given) != len(tt.shape.dim):
            raise UsageError(f"--shape {vi.name}: model input has rank {len(tt.shape.dim)}, got {len(given)} dims")
        for d, g in zip(tt.shape.dim, given):
            if d.HasField("dim_value") and d.dim_value != g:
                raise UsageError(f"--shape {vi.name}: dim {d.dim_value} is fixed in the model, got {g}")
        return TensorSpec(vi.name, given, dtype)
    dims = []
    for axis, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif is_input and axis == 0 and batch_default is not None:
            dims.append(batch_default)
        elif is_input:
            example = ",".join(str(x.dim_value) if x.HasField("dim_value") else "1" for x in tt.shape.dim)
            label = d.dim_param or "?"
            why = " (only a dynamic batch, the leading dim, defaults to 1)" if batch_default is not None else ""
            raise UnsupportedModelError(
                f"input {vi.name!r} has dynamic dim {label!r}{why}; fix it with --shape {vi.name}={example}"
            )
        else:
            dims.append(-1)  # output dims are filled in from the compiled function
    return TensorSpec(vi.name, tuple(dims), dtype)


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def dynamic_batch_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None) -> list[str]:
    """Inputs whose leading (batch) dim is dynamic and not fixed by ``shapes``, in input order: the ones
    ``model_signature(..., batch_default=1)`` compiles for batch 1."""
    shapes = shapes or {}
    return [vi.name for vi in _graph_inputs(model) if vi.name not in shapes and _is_dynamic_batch(vi)]


def model_signature(
    model: onnx.ModelProto,
    shapes: dict[str, tuple[int, ...]] | None = None,
    *,
    batch_default: int | None = None,
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs (with static shapes) and outputs of a model.

    Args:
        model: The ONNX model.
        shapes: Overrides for inputs with dynamic dims, by input name.
        batch_default: The size given to an input's dynamic leading (batch) dim when ``shapes`` does not
            fix that input (see :func:`dynamic_batch_inputs`); None: such a dim is an error too.

    Raises:
        UnsupportedModelError: An input has a dynamic dim not fixed by ``shapes`` (or by ``batch_default``).
        UsageError: ``shapes`` names an unknown input or contradicts a fixed dim.
    """
    shapes = dict(shapes or {})
    graph_inputs = _graph_inputs(model)
    unknown = set(shapes) - {vi.name for vi in graph_inputs}
    if unknown:
        raise UsageError(f"--shape names unknown input(s) {sorted(unknown)}; inputs: "
                         f"{[vi.name for vi in graph_inputs]}")
    ins = [_value_info_spec(vi, shapes, is_input=True, batch_default=batch_default) for vi in graph_inputs]
    outs = [_value_info_spec(vi, {}, is_input=False) for vi in model.graph.output]
    return ins, outs


def pruning_summary(model: onnx.ModelProto) -> object | None:
    """The pruning summary stored by ``onnxprune prune`` in metadata_props, parsed, or None."""
    for prop in model.metadata_props:
        if prop.key == SUMMARY_KEY:
            try:
                return json.loads(prop.value)
            except json.JSONDecodeError:
                return {"unparsed": prop.value}
    return None


def write_manifest(bundle: Path, fields: dict[str, object]) -> Path:
    """Write ``manifest.json``: ``fields`` plus the sha256 of every other file in the bundle."""
    files = {
        p.relative_to(bundle).as_posix(): file_sha256(p)
        for p in sorted(bundle.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": "onnxprune-bundle", "format_version": FORMAT_VERSION, **fields, "files": files}
    path = bundle / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(bundle: Path, *, verify: bool = True) -> dict:
    """Read and (by default) verify a bundle's manifest against the files' sha256.

    Raises:
        ModelError: No manifest, not a bundle, or a file is missing or changed.
    """
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise ModelError(f"{bundle}: not a bundle (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: invalid JSON ({e})") from None
    if manifest.get("format") != "onnxprune-bundle":
        raise ModelError(f"{path}: not an onnxprune bundle manifest")
    if verify:
        for rel, digest in manifest.get("files", {}).items():
            f = Path(bundle) / rel
            if not f.is_file():
                raise ModelError(f"{bundle}: bundle file {rel} is missing")
            if file_sha256(f) != digest:
                raise ModelError(f"{bundle}: bundle file {rel} does not match its sha256 in the manifest")
    return manifest


def _check_inputs(specs: list[dict], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    names = [s["name"] for s in specs]
    missing = [n for n in names if n not in inputs]
    extra = [n for n in inputs if n not in names]
    if missing or extra:
        raise DataError(f"bundle inputs are {names}; missing {missing}, unexpected {extra}")
    arrays = []
    for s in specs:
        a = np.asarray(inputs[s["name"]])
        if tuple(a.shape) != tuple(s["shape"]):
            raise DataError(f"input {s['name']!r}: shape {tuple(a.shape)}, bundle expects {tuple(s['shape'])}")
        if a.dtype != np.dtype(s["dtype"]):
            raise DataError(f"input {s['name']!r}: dtype {a.dtype}, bundle expects {s['dtype']}")
        arrays.append(np.ascontiguousarray(a))
    return arrays


def run_bundle(
    bundle_dir: str | Path, inputs: dict[str, np.ndarray], *, repeat: int = 0, verify: bool = True
) -> dict[str, np.ndarray]:
    """Run a bundle where this machine can (x86 natively, arm under qemu-user, wasm under node, CUDA on a GPU),
    with the runner its target's row names (:mod:`.launch`).

    Args:
        bundle_dir: The bundle folder written by ``compile_bundle``.
        inputs: One array per model input, by name, with the bundle's shapes and dtypes.
        repeat: If > 0, the runner also times that many calls; the median (ms) is stored under the
            key ``"__median_ms__"`` of the result as a 0-d array.
        verify: Check every file against the manifest's sha256 first.

    Returns:
        Outputs by name, in the model's output order.

    Raises:
        ModelError: the folder is no bundle, or a file does not match the manifest.
        DataError: `inputs` do not fit the bundle's names, shapes and dtypes (exit 1, as a calibration file).
    """
    bundle = Path(bundle_dir).resolve()  # runners start in the bundle folder; relative paths would break
    manifest = read_manifest(bundle, verify=verify)
    spec = get_target(manifest["target"]["name"])
    arrays = _check_inputs(manifest["inputs"], inputs)
    return spec.runner.run(bundle, spec, manifest, arrays, repeat)


def spec_dicts(specs: list[TensorSpec]) -> list[dict]:
    """TensorSpecs as JSON-ready dicts."""
    return [{**asdict(s), "shape": list(s.shape)} for s in specs]


def check_destination(path: Path) -> None:
    """Refuse, before any work, a bundle folder that cannot be written.

    Raises:
        OnnxPruneError: The parent folder is missing or not writable, or ``path`` is a file (exit 1, as for
            a model output).
        UsageError: ``path`` is a non-empty folder without a manifest (not a bundle, so not overwritten), or
            the current folder or one holding it.
    """
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxPruneError(f"{path}: output folder does not exist")
    cwd, where = Path.cwd().resolve(), path.resolve()
    if where == cwd or where in cwd.parents:  # replaced, it would leave the shell in a deleted folder
        raise UsageError(f"{path} is the current folder or holds it: give the bundle a folder of its own")
    if not os.access(folder, os.W_OK):
        raise OnnxPruneError(f"{path}: output folder is not writable")
    if path.exists() and not path.is_dir():
        raise OnnxPruneError(f"{path}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not (path / MANIFEST).is_file():
        raise UsageError(f"{path} exists and is not a bundle; refusing to overwrite it")


@contextmanager
def staged_bundle(path: Path) -> Iterator[Path]:
    """A fresh hidden folder beside ``path`` to write a bundle into; it becomes ``path`` when the block ends.

    A compile that fails (or is interrupted) removes the staging folder and leaves ``path`` as it was: an
    old bundle there survives a failed recompile, and no half-written bundle ever sits at ``path``. An old
    bundle is moved aside, the new one renamed into place, then the old one deleted (two renames: a kill
    between them leaves ``path`` absent, never mixed).
    """
    check_destination(path)
    path = Path(os.path.abspath(path))  # "-o ." names the folder it is in: its parent holds the staging folder
    folder = path.parent
    stage = folder / f".{path.name}.{secrets.token_hex(4)}.tmp"
    stage.mkdir()  # mkdir, not mkdtemp: the bundle gets the umask's permissions, not 0700
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = folder / f".{path.name}.{secrets.token_hex(4)}.old"
    if path.exists():
        os.replace(path, old)
    os.replace(stage, path)
    shutil.rmtree(old, ignore_errors=True)
