"""onnxprune.targets: compile ONNX models into deployment bundles with TVM, and run them.

Importing this package is cheap (no tvm, onnx or numpy): the CLI's parser reads the target table on every
start. ``compile_bundle`` imports the TVM backend when called; ``read_manifest`` and ``run_bundle`` load
:mod:`.bundle` on first use (PEP 562). The ONE target table is :data:`TARGETS` in :mod:`.table`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxprune import progress

from .spec import TargetSpec
from .table import TARGETS, get_target

if TYPE_CHECKING:
    import onnx

    from .bundle import read_manifest, run_bundle

__all__ = ["TARGETS", "TargetSpec", "compile_bundle", "get_target", "read_manifest", "run_bundle"]

_LAZY = {"read_manifest": "bundle", "run_bundle": "bundle"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def compile_bundle(
    model: str | Path | onnx.ModelProto,
    target: str,
    out_dir: str | Path | None = None,
    tune: int = 0,
    shapes: dict[str, tuple[int, ...]] | None = None,
    sparse: str = "auto",
) -> Path:
    """Compile an ONNX model into a deployment bundle for ``target``.

    An input whose leading (batch) dim is dynamic and not fixed by ``shapes`` is compiled for batch 1, with a
    one-line note on stderr, and listed in the manifest's ``batch_defaulted_to_1``; any other dynamic dim
    must be fixed by ``shapes``.

    Args:
        model: The ONNX model: a file, or an ``onnx.ModelProto`` (not modified). For a proto the manifest's
            model ``sha256`` is that of ``model.SerializeToString()`` (the bytes ``onnx.save`` would write)
            and its ``file`` is null.
        target: A name or alias from the target table (``x86``, ``arm``, ``wasm``, ``cuda``,
            ``raspberry-pi-4`` …).
        out_dir: Bundle folder; default ``<model stem>.<target>`` next to the model file (required for a proto).
        tune: MetaSchedule trials (0: the default schedules only, no tuning run).
        shapes: Static shapes for inputs with dynamic dims, by input name.
        sparse: ``auto`` (layers with sparse weights run as sparse kernels where measured faster), ``off``
            or ``force`` (:mod:`.tvm_sparse_choice`); the manifest's ``sparse`` says what was chosen.

    Returns:
        The bundle folder.

    Raises:
        ModelError, UnsupportedModelError, ToolchainError, UsageError: one-line problems for the CLI.
    """
    with progress.task("loading TVM"):
        from .tvm_backend import compile_bundle as _compile

    return _compile(model, target, out_dir=out_dir, tune=tune, shapes=shapes, sparse=sparse)
