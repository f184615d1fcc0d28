"""Atomic model output: write to temporary files in the destination folder, then rename.

A failure or a kill part-way leaves the destination untouched (old file or nothing). Temporary files are
named ``.NAME.<random>.tmp`` so that the debris a SIGKILL cannot clean up is recognisable; any other
failure removes them.

Models whose weights are lazy external data (see `onnxprune.external`), or whose proto would exceed the
protobuf limit, are written with their large tensors in one data file beside the model. Untouched lazy
tensors are streamed from their source file, so they stay byte-identical and never sit in memory. The
data file gets a fresh name when ``NAME.data`` already exists (it may belong to the old destination or
to the input), is renamed into place before the model, and the old destination's data file is removed
only after the new model is in place: at every instant the destination names a complete model.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import onnx

from onnxprune import external as ext
from onnxprune.errors import OnnxPruneError
from onnxprune.importer import PROTOBUF_LIMIT

EXTERNAL_THRESHOLD = 1024  # tensors of at least this many bytes go to the data file
ALIGN = 64


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write `model` to `path` atomically; returns the path. `model` is not modified.

    Args:
        external_data: force (True) or forbid (False) a data file; by default one is used when the model
            has lazy external tensors or would exceed the protobuf limit.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxPruneError(f"{path}: output folder does not exist")
    if not os.access(folder, os.W_OK):
        raise OnnxPruneError(f"{path}: output folder is not writable")
    if path.is_dir():
        raise OnnxPruneError(f"{path}: output path is a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise OnnxPruneError(f"{path}: output file is not writable")
    sources = {ext.source(t)[0].resolve() for t in model.graph.initializer if ext.is_lazy(t)}
    if path.resolve() in sources:
        raise OnnxPruneError(f"{path}: is the external data file of the input; the input is never overwritten")
    if external_data is None:
        external_data = ext.has_lazy(model) or _too_big(model)
    if not external_data and ext.has_lazy(model):
        model = ext.materialize(model)
    temps: list[Path] = []
    try:
        tmp = _mkstemp(f".{path.name}.", folder)
        temps.append(tmp)
        old_data = _data_files(path) if path.exists() else set()
        if external_data:
            data_name = _data_name(path, model)
            tmp_data = _mkstemp(f".{data_name}.", folder)
            temps.append(tmp_data)
            header = _write_external(model, tmp_data, data_name)
            _write_proto(header, tmp)
            os.replace(tmp_data, folder / data_name)
            temps.remove(tmp_data)
        else:
            data_name = None
            _write_proto(model, tmp)
        os.replace(tmp, path)
        temps.remove(tmp)
        # The replaced destination's data files go with it (also when they fed this very model: saving a
        # model over the file it was loaded from must not leave a multi-GB orphan behind).
        for stale in old_data - ({data_name} if data_name else set()):
            _remove_quietly(folder / stale)
    except OnnxPruneError:
        raise
    except OSError as exc:
        raise OnnxPruneError(f"{path}: cannot write ({exc.strerror or exc})") from None
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OnnxPruneError(f"{path}: cannot write ({text})") from None
    finally:
        for leftover in temps:
            _remove_quietly(leftover)
    return path


def _mkstemp(prefix: str, folder: Path) -> Path:
    """A recognisable temp file (``.NAME.<random>.tmp``) with the permissions a plain open() would give."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _write_proto(model: onnx.ModelProto, path: Path) -> None:
    data = model.SerializeToString()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _too_big(model: onnx.ModelProto) -> bool:
    try:
        return model.ByteSize() + ext.lazy_bytes(model) > PROTOBUF_LIMIT
    except Exception:
        return True


def _data_files(path: Path) -> set[str]:
    """Data files (in the same folder, named after the model) referenced by an existing model file."""
    try:
        old = onnx.load(str(path), load_external_data=False)
    except Exception:
        return set()
    names = set()
    for t in ext.all_tensors(old):
        if ext.is_external(t):
            loc = {e.key: e.value for e in t.external_data}.get("location", "")
            if loc.startswith(path.name) and "/" not in loc and "\\" not in loc:
                names.add(loc)
    return names


def _data_name(path: Path, model: onnx.ModelProto) -> str:
    name = f"{path.name}.data"
    sources = {ext.source(t)[0].resolve() for t in model.graph.initializer if ext.is_lazy(t)}
    while (path.parent / name).exists() or (path.parent / name).resolve() in sources:
        name = f"{path.name}.{secrets.token_hex(4)}.data"
    return name


def _write_external(model: onnx.ModelProto, data_path: Path, data_name: str) -> onnx.ModelProto:
    """Stream the large main-graph tensors into `data_path`; return the model header that refers to it."""
    header = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name == "graph":
            continue
        if hasattr(value, "extend"):
            getattr(header, field.name).extend(value)
        elif hasattr(value, "CopyFrom"):
            getattr(header, field.name).CopyFrom(value)
        else:
            setattr(header, field.name, value)
    for field, value in model.graph.ListFields():
        if field.name == "initializer":
            continue
        if hasattr(value, "extend"):
            getattr(header.graph, field.name).extend(value)
        elif hasattr(value, "CopyFrom"):
            getattr(header.graph, field.name).CopyFrom(value)
        else:
            setattr(header.graph, field.name, value)
    with open(data_path, "wb") as f:
        for t in model.graph.initializer:
            lazy = ext.is_lazy(t)
            if not lazy and ext.nbytes(t) < EXTERNAL_THRESHOLD:
                header.graph.initializer.append(t)
                continue
            pad = (-f.tell()) % ALIGN
            if pad:
                f.write(b"\0" * pad)
            offset = f.tell()
            if lazy:
                src, src_offset, length = ext.source(t)
                ext.copy_range(src, src_offset, length, f)
            else:
                data = ext.payload(t)
                length = len(data)
                f.write(data)
                del data
            out = ext.strip_lazy(t)
            out.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                out.external_data.add(key=key, value=value)
            header.graph.initializer.append(out)
        f.flush()
        os.fsync(f.fileno())
    return header


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary file beside `path` (``.NAME.<random>.tmp``), then rename it over `path`."""
    folder = path.parent
    if not folder.is_dir():
        raise OnnxPruneError(f"{path}: output folder does not exist")
    if path.is_dir():
        raise OnnxPruneError(f"{path}: output path is a directory")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # the permissions a plain open() would give
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise OnnxPruneError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (model hashes, bundle manifests)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
