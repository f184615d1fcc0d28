"""Lazy external data: weights stay in their files and are memory-mapped on demand.

Start reading at `attach`: the importer calls it on a model loaded without its external data. Every large
main-graph initializer stored outside the model keeps its ``location``/``offset``/``length`` entries and
gains one more entry, ``onnxprune.base`` (the absolute folder of the model file). Nothing is read yet:

* `tensor_array(t)` returns a read-only ``np.memmap`` of such a tensor (the page cache holds the bytes,
  the process holds only what it touches while the map is alive) and ``numpy_helper.to_array`` for any
  other tensor;
* `io.save_model` streams untouched lazy tensors from their source file into the output's data file
  (byte-identical), so a model over the 2 GB protobuf limit never has to fit in one proto;
* `materialize(model)` loads everything into a copy, for onnxruntime sessions of small models.

Small external tensors (shape constants) are loaded eagerly so constant folding still sees them. Every
path is validated up front: a location that is absolute or resolves outside the model folder, a missing
file, or an offset/length beyond the file is refused with a `ModelError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import ModelError
from onnxprune.onnx_utils import node_subgraphs

BASE_KEY = "onnxprune.base"
EAGER_MAX_BYTES = 4096  # external tensors up to this size are read into the proto at load time

# Fixed-size element types that can be memory-mapped directly (keyed by `TensorProto.data_type`, a plain int).
MMAP_TYPES: dict[int, type[np.generic]] = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.UINT16: np.uint16, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.UINT32: np.uint32,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.UINT64: np.uint64, onnx.TensorProto.BOOL: np.bool_,
}  # fmt: skip


def _info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def is_lazy(t: onnx.TensorProto) -> bool:
    return is_external(t) and any(e.key == BASE_KEY for e in t.external_data)


def numel(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n


def nbytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's payload (external length, raw data, or typed fields)."""
    if is_external(t):
        info = _info(t)
        if "length" in info:
            return int(info["length"])
        itemsize = np.dtype(MMAP_TYPES.get(t.data_type, np.uint8)).itemsize
        return numel(t) * itemsize
    if t.HasField("raw_data"):
        return len(t.raw_data)
    return t.ByteSize()


def source(t: onnx.TensorProto) -> tuple[Path, int, int]:
    """(file, offset, length) of a lazy tensor's bytes."""
    info = _info(t)
    path = Path(info[BASE_KEY]) / info["location"]
    offset = int(info.get("offset", 0) or 0)
    length = int(info["length"]) if "length" in info else path.stat().st_size - offset
    return path, offset, length


def main_graph_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from model.graph.initializer


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a model holds: initializers (dense, and the values and indices of sparse ones) of the
    main graph and of every subgraph, then tensors in node attributes (``Constant`` values, TENSOR(S) and
    SPARSE_TENSOR(S) attributes) of the graphs and of the model's functions.

    The order of the dense tensors is the one ``onnx.external_data_helper`` walks in.
    """
    yield from _graph_initializers(model.graph)
    yield from _attribute_tensors(model.graph)
    for function in model.functions:
        yield from _attribute_tensors(function)


def _graph_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from _sparse_parts(sparse)
    for node in graph.node:
        for sub in node_subgraphs(node):
            yield from _graph_initializers(sub)


def _attribute_tensors(body: onnx.GraphProto | onnx.FunctionProto) -> Iterator[onnx.TensorProto]:
    for node in body.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield from _sparse_parts(attr.sparse_tensor)
            for sparse in attr.sparse_tensors:
                yield from _sparse_parts(sparse)
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _attribute_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _attribute_tensors(sub)


def _sparse_parts(sparse: onnx.SparseTensorProto) -> Iterator[onnx.TensorProto]:
    if sparse.HasField("values"):
        yield sparse.values
    if sparse.HasField("indices"):
        yield sparse.indices


def has_lazy(model: onnx.ModelProto) -> bool:
    return any(is_lazy(t) for t in model.graph.initializer)


def has_external(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in all_tensors(model))


def lazy_bytes(model: onnx.ModelProto) -> int:
    return sum(nbytes(t) for t in model.graph.initializer if is_lazy(t))


def attach(model: onnx.ModelProto, base_dir: str | os.PathLike) -> None:
    """Validate every external reference and make large main-graph tensors lazy; load the rest.

    Raises:
        ModelError: a location that is absolute or escapes `base_dir`, a missing file, a range past the
            end of the file, or a length that does not match the tensor's shape.
    """
    check_tensor_types(model)
    base = Path(base_dir).resolve()
    for t in model.graph.initializer:  # main-graph weights may stay lazy
        if is_external(t):
            _attach_one(t, base, may_stay_lazy=True)
    for t in all_tensors(model):  # subgraph and attribute tensors are always read
        if is_external(t) and not is_lazy(t):
            _attach_one(t, base, may_stay_lazy=False)


def _attach_one(t: onnx.TensorProto, base: Path, may_stay_lazy: bool) -> None:
    info = _info(t)
    location = info.get("location", "")
    where = f"external data {location!r} of tensor {t.name!r}"
    if not location or os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
        raise ModelError(f"{where}: absolute or empty path refused (must be inside the model folder)")
    target = (base / location).resolve()
    if base not in target.parents:
        raise ModelError(f"{where} escapes the model folder")
    if not target.is_file():
        raise ModelError(f"{where}: file is missing")
    try:
        offset = int(info.get("offset", 0) or 0)
        size = target.stat().st_size
        length = int(info["length"]) if "length" in info else size - offset
    except ValueError:
        raise ModelError(f"{where}: offset/length are not integers") from None
    if offset < 0 or length < 0 or offset + length > size:
        raise ModelError(f"{where}: range [{offset}, {offset + length}) is past the end of the file ({size} bytes)")
    dtype = MMAP_TYPES.get(t.data_type)
    if dtype is not None and length != numel(t) * np.dtype(dtype).itemsize:
        raise ModelError(f"{where}: {length} bytes do not match shape {list(t.dims)}")
    if may_stay_lazy and dtype is not None and length > EAGER_MAX_BYTES:
        t.external_data.add(key=BASE_KEY, value=str(base))
        # Normalise the location to the resolved relative path (no `./` or `..` detours).
        for e in t.external_data:
            if e.key == "location":
                e.value = target.relative_to(base).as_posix()
        return
    _load_into(t, target, offset, length)


def _load_into(t: onnx.TensorProto, path: Path, offset: int, length: int) -> None:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    t.raw_data = data
    del t.external_data[:]
    t.data_location = onnx.TensorProto.DEFAULT


def tensor_array(t: onnx.TensorProto) -> np.ndarray:
    """A tensor's value: a read-only memory map for lazy tensors, a numpy array otherwise."""
    if not is_lazy(t):
        return numpy_helper.to_array(t)
    path, offset, length = source(t)
    dtype = np.dtype(MMAP_TYPES[t.data_type])
    shape = tuple(int(d) for d in t.dims)
    if length == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every lazy tensor read into memory (for small models and onnxruntime)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if is_lazy(t):
            path, offset, length = source(t)
            _load_into(t, path, offset, length)
    return out


def strip_lazy(t: onnx.TensorProto) -> onnx.TensorProto:
    """A copy of a tensor's header (name, type, dims) without payload or external entries."""
    out = onnx.TensorProto()
    for field, value in t.ListFields():
        if field.name in ("raw_data", "external_data", "data_location", "float_data", "int32_data",
                          "string_data", "int64_data", "double_data", "uint64_data"):  # fmt: skip
            continue
        if hasattr(value, "extend"):
            getattr(out, field.name).extend(value)
        elif hasattr(value, "CopyFrom"):
            getattr(out, field.name).CopyFrom(value)
        else:
            setattr(out, field.name, value)
    return out


def payload(t: onnx.TensorProto) -> bytes:
    """Raw little-endian bytes of an in-memory tensor."""
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.from_array(numpy_helper.to_array(t)).raw_data


def copy_range(src: Path, offset: int, length: int, dst, chunk: int = 64 << 20) -> None:
    """Stream `length` bytes at `offset` of `src` into the open binary file `dst`."""
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            block = f.read(min(chunk, left))
            if not block:
                raise ModelError(f"{src}: external data file shrank while reading")
            dst.write(block)
            left -= len(block)


def referenced_files(path: str | os.PathLike) -> set[Path]:
    """Resolved paths of the external data files a model file refers to (empty if unreadable)."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return set()
    out = set()
    for t in all_tensors(model):
        if is_external(t):
            location = _info(t).get("location", "")
            if location:
                out.add((path.parent / location).resolve())
    return out


def check_tensor_types(model: onnx.ModelProto) -> None:
    """Refuse initializers whose element type onnx does not know (the checker lets some through)."""
    from onnx.helper import tensor_dtype_to_np_dtype

    for t in all_tensors(model):
        try:
            tensor_dtype_to_np_dtype(t.data_type)
        except Exception:
            raise ModelError(f"tensor {t.name!r} has unknown element type {t.data_type}") from None
