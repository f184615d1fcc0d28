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


def missing_calibration(what: str, *, fallback: str = "") -> UsageError:
    """The one-line usage error for `what` (``"repair 'seq'"``, ...) run without calibration data.

    It names both ways to get data, real samples and the data-free distilled inputs, so a user without samples
    is not sent only to the weakest data-free option (CIFAR-10 ResNet20, 20% removed: ``--repair bias`` 72.7%
    top-1, obs + seq on ``--calib synthetic`` 88.4%, dense 91.7%; bench/accuracy_real_results.txt). `fallback`
    names a data-free alternative of the same option (``"--repair bias"``), when there is one.
    """
    also = f", or use {fallback}" if fallback else ""
    return UsageError(f"{what} needs calibration data: pass --calib FILE.npz, or --calib synthetic for inputs "
                      f"distilled from the model itself (no data){also}")
