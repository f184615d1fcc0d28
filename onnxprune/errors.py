"""Typed errors. The CLI turns each into one line on stderr and an exit code; nothing else escapes."""

from __future__ import annotations


class OnnxPruneError(Exception):
    """Base class: a problem with the model or the run (exit code 1)."""

    exit_code = 1


class ModelError(OnnxPruneError):
    """The input file is missing, empty, truncated, not ONNX, or fails the checker."""


class UnsupportedModelError(OnnxPruneError):
    """The model is valid ONNX but uses something onnxprune cannot handle."""


class PreconditionError(OnnxPruneError):
    """A pass was asked to run on a model that does not meet its requirements."""


class DataError(OnnxPruneError):
    """Input data (a calibration file) is missing, unreadable, or does not fit the model's inputs."""


class ToolchainError(OnnxPruneError):
    """A compiler, cross toolchain or runtime needed for a target is missing."""


class UsageError(OnnxPruneError):
    """Bad command-line usage or option values (exit code 2)."""

    exit_code = 2
