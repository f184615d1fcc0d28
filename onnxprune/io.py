"""Atomic model output: write to a temporary file in the destination folder, then rename.

A failure or a kill part-way leaves the destination untouched (old file or nothing) and no temp files
behind when the process can clean up. Models over the protobuf limit are written with external data
(`NAME.onnx.data` beside the model), also through temporary names.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from onnxprune.errors import OnnxPruneError
from onnxprune.importer import PROTOBUF_LIMIT


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxPruneError(f"{path}: output folder does not exist")
    if not os.access(folder, os.W_OK):
        raise OnnxPruneError(f"{path}: output folder is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise OnnxPruneError(f"{path}: output file is not writable")
    if external_data is None:
        external_data = _too_big(model)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp_data = None
    try:
        if external_data:
            data_name = f"{path.name}.data"
            tmp_data = folder / f".{data_name}.{os.getpid()}.tmp"
            copy = onnx.ModelProto()
            copy.CopyFrom(model) if not _too_big(model) else _share(model, copy)
            onnx.save_model(
                copy, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                location=tmp_data.name, size_threshold=1024,
            )
            # The model refers to the final data name; rename the data first, then the model.
            _relocate(tmp, tmp_data.name, data_name)
            os.replace(tmp_data, folder / data_name)
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, path)
    except OnnxPruneError:
        raise
    except OSError as exc:
        raise OnnxPruneError(f"{path}: cannot write ({exc.strerror or exc})") from None
    except Exception as exc:
        raise OnnxPruneError(f"{path}: cannot write ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    finally:
        for leftover in (Path(tmp), tmp_data):
            if leftover is not None and leftover.exists():
                leftover.unlink()
    return path


def _too_big(model: onnx.ModelProto) -> bool:
    try:
        return model.ByteSize() > PROTOBUF_LIMIT
    except Exception:
        return True


def _share(model: onnx.ModelProto, copy: onnx.ModelProto) -> None:
    copy.MergeFrom(model)


def _relocate(model_path: str, old: str, new: str) -> None:
    m = onnx.load(model_path, load_external_data=False)
    for t in onnx.external_data_helper._get_all_tensors(m):
        for e in t.external_data:
            if e.key == "location" and e.value == old:
                e.value = new
    onnx.save_model(m, model_path)
