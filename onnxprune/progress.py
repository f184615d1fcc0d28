"""Progress of long steps, reported to whoever is listening, and to nobody by default.

Start reading at `task`. Core code wraps every step that can take seconds (calibration statistics,
sequential and least-squares repair, sensitivity sweeps, compiling and tuning) in ``with task(...) as t:``
and calls ``t.advance()`` per unit of work. Whether anything is shown depends on the *reporter* active in
the current context (a `contextvars.ContextVar`):

* none (the default): `task` is a no-op apart from counting, so library users and tests see nothing;
* `progress_to_stderr`: a transient rich progress display on stderr (the CLI installs it on a terminal),
  one line per running task, nested tasks indented under their parent, with a bar and the elapsed time;
* any `Reporter` installed with `reporting` (tests install a `RecordingReporter`).

rich is imported only when `progress_to_stderr` is enabled. Context variables do not follow work into
threads started without ``contextvars.copy_context()``; report from the thread that entered the task.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["RecordingReporter", "Reporter", "Task", "progress_to_stderr", "reporting", "task"]

T = TypeVar("T")


class Reporter:
    """Receives the events of every task entered while it is active; the base class ignores them."""

    def start(self, task: Task) -> None:
        """`task` was entered (its `total` may be None: unknown)."""

    def update(self, task: Task) -> None:
        """`task` advanced or changed its description."""

    def finish(self, task: Task) -> None:
        """`task` was left (normally or by an exception)."""


@dataclass(eq=False)
class Task:
    """One long step: a description, the units of work done so far, and the total when known."""

    description: str
    total: int | None = None
    completed: int = 0
    depth: int = 0  # how many tasks enclose this one
    _reporter: Reporter | None = field(default=None, repr=False)

    def advance(self, n: int = 1) -> None:
        """Count `n` more units of work as done."""
        self.completed += n
        if self._reporter is not None:
            self._reporter.update(self)

    def track(self, items: Iterable[T]) -> Iterator[T]:
        """Yield `items`, advancing by one after the caller is done with each (also on ``continue``)."""
        for item in items:
            yield item
            self.advance()

    def update(self, description: str | None = None, total: int | None = None) -> None:
        """Change what the task says it is doing, or its total once it is known."""
        if description is not None:
            self.description = description
        if total is not None:
            self.total = total
        if self._reporter is not None:
            self._reporter.update(self)


_reporter: ContextVar[Reporter | None] = ContextVar("onnxprune_progress_reporter", default=None)
_depth: ContextVar[int] = ContextVar("onnxprune_progress_depth", default=0)


@contextmanager
def task(description: str, total: int | None = None) -> Iterator[Task]:
    """A long step, reported to the active reporter (if any) from entry to exit.

    Args:
        description: what the step does, e.g. ``"calibration statistics"``.
        total: units of work the step will `Task.advance` through; None when unknown.
    """
    reporter = _reporter.get()
    depth = _depth.get()
    t = Task(description, total, depth=depth, _reporter=reporter)
    if reporter is None:
        yield t
        return
    token = _depth.set(depth + 1)
    reporter.start(t)
    try:
        yield t
    finally:
        _depth.reset(token)
        reporter.finish(t)


@contextmanager
def reporting(reporter: Reporter) -> Iterator[Reporter]:
    """Send the events of every task entered inside the block to `reporter` (replacing any other)."""
    token = _reporter.set(reporter)
    depth_token = _depth.set(0)
    try:
        yield reporter
    finally:
        _depth.reset(depth_token)
        _reporter.reset(token)


@contextmanager
def progress_to_stderr(enabled: bool) -> Iterator[None]:
    """Show running tasks on stderr while the block runs, if `enabled`; otherwise do nothing at all.

    The display is transient (it disappears when the last task ends), so it never mixes with results;
    text printed meanwhile goes above it. The CLI enables it only when stderr is a terminal and no
    ``--json`` was asked for.
    """
    if not enabled:
        yield
        return
    with reporting(_RichReporter()):
        yield


@dataclass
class RecordingReporter(Reporter):
    """Keeps every event as ``(event, description, completed, total, depth)``; for tests and tools."""

    events: list[tuple[str, str, int, int | None, int]] = field(default_factory=list)

    def _record(self, event: str, task: Task) -> None:
        self.events.append((event, task.description, task.completed, task.total, task.depth))

    def start(self, task: Task) -> None:
        self._record("start", task)

    def update(self, task: Task) -> None:
        self._record("update", task)

    def finish(self, task: Task) -> None:
        self._record("finish", task)

    def finished(self, prefix: str = "") -> list[Task]:
        """Tasks whose description starts with `prefix`, as they were when they finished."""
        return [Task(d, t, c, depth) for e, d, c, t, depth in self.events if e == "finish" and d.startswith(prefix)]


class _RichReporter(Reporter):
    """A rich `Progress` on stderr, started with the first task and stopped when no task is left."""

    def __init__(self) -> None:
        self._progress: Any = None  # rich.progress.Progress, imported on first use
        self._ids: dict[int, Any] = {}  # id(Task) -> rich TaskID

    def _start_display(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=Console(stderr=True), transient=True,
        )
        self._progress.start()

    def start(self, task: Task) -> None:
        if self._progress is None:
            self._start_display()
        self._ids[id(task)] = self._progress.add_task(self._label(task), total=task.total)

    def update(self, task: Task) -> None:
        tid = self._ids.get(id(task))
        if tid is not None:
            self._progress.update(tid, description=self._label(task), total=task.total, completed=task.completed)

    def finish(self, task: Task) -> None:
        tid = self._ids.pop(id(task), None)
        if tid is not None:
            self._progress.remove_task(tid)
        if not self._ids and self._progress is not None:
            self._progress.stop()
            self._progress = None

    @staticmethod
    def _label(task: Task) -> str:
        return "  " * task.depth + task.description
