"""onnxprune.targets: compile ONNX models into deployment bundles with TVM, and run them.

``compile_bundle`` imports the TVM backend lazily, so importing this package (and ``onnxprune prune``) never
pays for ``import tvm``. The ONE target table is :data:`TARGETS` in :mod:`.table`.
"""

from __future__ import annotations

from pathlib import Path

from .bundle import read_manifest, run_bundle
from .spec import TargetSpec
from .table import TARGETS, get_target

__all__ = ["TARGETS", "TargetSpec", "compile_bundle", "get_target", "read_manifest", "run_bundle"]


def compile_bundle(
    model_path: str | Path,
    target: str,
    out_dir: str | Path | None = None,
    tune: int = 0,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> Path:
    """Compile an ONNX model into a deployment bundle for ``target``.

    Args:
        model_path: The ONNX model.
        target: A name or alias from the target table (``x86``, ``arm``, ``wasm``, ``cuda``,
            ``raspberry-pi-4`` …).
        out_dir: Bundle folder; default ``<model stem>.<target>`` next to the model.
        tune: MetaSchedule trials (0: the default schedules only, no tuning run).
        shapes: Static shapes for inputs with dynamic dims, by input name.

    Returns:
        The bundle folder.

    Raises:
        ModelError, UnsupportedModelError, ToolchainError, UsageError: one-line problems for the CLI.
    """
    from .tvm_backend import compile_bundle as _compile

    return _compile(model_path, target, out_dir=out_dir, tune=tune, shapes=shapes)


