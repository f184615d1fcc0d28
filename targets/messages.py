"""What a compile says on the terminal: onnxprune's one-line notes, and TVM's own messages kept in a log file.

TVM talks on four channels while it compiles, none of them meant for an onnxprune user: Python ``logging``
(``tvm.*`` loggers, MetaSchedule's), Python ``warnings``, ``print`` to ``sys.stdout``, and its C++ ``LOG``,
which writes straight to file descriptor 2 (``Unknown schedule rule "meta_schedule.pool_max"`` when tuning).
:func:`tvm_messages` sends all four into one log file for the duration of a block; the backend moves the
file into the bundle (``compile.log``) and prints one :func:`note` naming it when anything was captured.

Start reading at :func:`tvm_messages`. The C++ channel is captured at the file-descriptor level: fd 2 is
pointed at the log with ``dup2`` and restored in ``finally``. Python's ``sys.stderr``, when it writes to that
same fd, is pointed meanwhile at a duplicate of the original fd, so onnxprune's own output (the progress
display) still reaches the terminal; it is swapped before fd 2 is redirected and swapped back after fd 2 is
restored, so no Python write lands in the log. ``ONNXPRUNE_DEBUG=1`` captures nothing (everything shows), and
``ONNXPRUNE_TUNE_VERBOSE=1`` leaves ``sys.stdout`` alone (MetaSchedule's progress tables). Nothing here
imports tvm.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

__all__ = ["TVM_LOGGER", "note", "tvm_messages"]

#: The root of TVM's Python loggers (``tvm.s_tir.meta_schedule``, ``tvm.relax.frontend`` …).
TVM_LOGGER = "tvm"


def note(message: str) -> None:
    """Print ``onnxprune: note: <message>`` on stderr: one line a user should see, not an error."""
    print(f"onnxprune: note: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def tvm_messages(log_path: Path) -> Iterator[Path]:
    """Send TVM's log records, warnings, prints and C++ messages to ``log_path`` (appended) while the block
    runs; yields ``log_path``. The file exists afterwards only if something was written to it.

    Args:
        log_path: The log file; its folder must exist.
    """
    if os.environ.get("ONNXPRUNE_DEBUG"):
        yield log_path
        return
    with contextlib.ExitStack() as stack:
        stream = stack.enter_context(open(log_path, "a", encoding="utf-8", errors="replace", buffering=1))
        stack.callback(_remove_if_empty, log_path)  # registered first: runs last, after the file is closed
        stack.enter_context(_logging_to(stream))
        stack.enter_context(_warnings_to(stream))
        if not os.environ.get("ONNXPRUNE_TUNE_VERBOSE"):
            stack.enter_context(contextlib.redirect_stdout(stream))
        stack.enter_context(_fd2_to(log_path))
        yield log_path


def _remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            path.unlink()


@contextlib.contextmanager
def _logging_to(stream: TextIO) -> Iterator[None]:
    """Records of the ``tvm`` loggers go to ``stream`` instead of the process's handlers (or Python's
    last-resort handler, which prints WARNING and up on stderr)."""
    logger = logging.getLogger(TVM_LOGGER)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s", "%H:%M:%S"))
    saved = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = saved
        handler.close()


@contextlib.contextmanager
def _warnings_to(stream: TextIO) -> Iterator[None]:
    """Python warnings shown meanwhile are written to ``stream`` (the active filters still decide which)."""
    with warnings.catch_warnings():

        def show(
            message: Warning | str, category: type[Warning], filename: str, lineno: int,
            file: TextIO | None = None, line: str | None = None,
        ) -> None:  # fmt: skip
            stream.write(warnings.formatwarning(message, category, filename, lineno, line))

        warnings.showwarning = show
        yield


def _uses_fd2(f: object) -> bool:
    try:
        return f.fileno() == 2  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def _fd2_to(log_path: Path) -> Iterator[None]:
    """Point file descriptor 2 at ``log_path`` (C/C++ writes to stderr land there), restoring it on exit;
    Python's ``sys.stderr`` keeps writing to the original stderr."""
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all: nothing can leak
        yield
        return
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    target = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    python_stderr = sys.stderr
    terminal: TextIO | None = None
    if _uses_fd2(python_stderr):
        encoding = getattr(python_stderr, "encoding", None) or "utf-8"
        terminal = os.fdopen(os.dup(saved), "w", buffering=1, encoding=encoding, errors="backslashreplace")
        sys.stderr = terminal
    try:
        os.dup2(target, 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
    finally:
        os.close(target)
        os.close(saved)
        if terminal is not None:
            sys.stderr = python_stderr
            with contextlib.suppress(Exception):
                terminal.close()
