"""A small pass protocol in the spirit of onnx-ir, TVM and LLVM's new pass manager.

Start reading at `Pass`, then `PassManager`.

* A **pass** is a small object configured through its constructor (a config, calibration data) and never
  changed afterwards. `run(model)` checks `requires(model)`, calls `call(model)`, checks `ensures` on the
  output and returns a `PassResult`: the output model, whether it differs from the input (`modified`), and
  typed `artifacts` (a `PruneSummary`, a channel selection, ...). A pass never stores results on itself and
  never modifies its input model unless its constructor says so (`NormalizePass(inplace=True)`).
* A **PassManager** runs passes in order and is itself a pass, so pipelines nest. While it runs, its passes
  share an `AnalysisCache` (reached with `analyses()`): facts about a model object, keyed by the object's
  identity, such as its channel analysis or the channels a selection pass chose for removal. A fact lives
  as long as the pipeline holds that very model object: after each pass the manager drops the facts about
  every other model, and those about the same object when the pass reports `modified=True` (it changed the
  model in place). A pass that returns a new model may record facts about that new model (repair re-analyses
  the repaired model), which the manager keeps. So an expensive analysis runs once per model version, and a
  pass that needs a fact another pass records declares it in `requires`.
* **Instruments** carry the cross-cutting concerns (timing, progress, dumping, metadata stamping); they are
  called around every pass of the manager they are given to, never from inside a pass.

`PassResult.info` is the untyped payload of passes not yet typed (unconstrained pruning, block removal);
typed passes fill it, if at all, from their artifacts only.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Hashable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import onnx

if TYPE_CHECKING:
    from onnxprune.progress import Task

T = TypeVar("T")


class Summary:
    """Base of typed records saying what a transformation did; `StampInstrument` writes them into the model."""

    def as_dict(self) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class PassResult:
    """What a pass returns.

    Attributes:
        model: the output model (the input object itself when nothing changed).
        modified: whether the output differs from the input.
        info: untyped payload of passes not yet typed; typed passes fill it from `artifacts` only.
        artifacts: typed payloads (summaries, analyses), in the order the passes produced them.
        steps: for a `PassManager`, each pass's name and result, in order.
    """

    model: onnx.ModelProto
    modified: bool
    info: dict = field(default_factory=dict)
    artifacts: tuple[Any, ...] = ()
    steps: tuple[tuple[str, PassResult], ...] = ()

    def get(self, kind: type[T]) -> T | None:
        """The last artifact of type `kind`, or None."""
        for artifact in reversed(self.artifacts):
            if isinstance(artifact, kind):
                return artifact
        return None


class AnalysisCache:
    """Facts about model objects (keyed by identity), shared by the passes of one `PassManager` run."""

    def __init__(self) -> None:
        self._facts: dict[int, tuple[onnx.ModelProto, dict[Hashable, Any]]] = {}

    def get(self, model: onnx.ModelProto, key: Hashable) -> Any | None:
        entry = self._facts.get(id(model))
        return entry[1].get(key) if entry is not None and entry[0] is model else None

    def put(self, model: onnx.ModelProto, key: Hashable, value: Any) -> None:
        entry = self._facts.get(id(model))
        if entry is None or entry[0] is not model:
            entry = self._facts[id(model)] = (model, {})
        entry[1][key] = value

    def retain(self, model: onnx.ModelProto, changed_in_place: bool = False) -> None:
        """Keep only the facts about `model`, and none when it was changed in place."""
        entry = self._facts.get(id(model))
        self._facts.clear()
        if entry is not None and entry[0] is model and not changed_in_place:
            self._facts[id(model)] = entry


_CURRENT: contextvars.ContextVar[AnalysisCache | None] = contextvars.ContextVar("onnxprune_analyses", default=None)


def analyses() -> AnalysisCache:
    """The cache of the running `PassManager`; outside one, an empty cache that nothing else sees."""
    return _CURRENT.get() or AnalysisCache()


@contextmanager
def _shared_cache() -> Iterator[AnalysisCache]:
    """The enclosing manager's cache (nested pipelines share it), or a new one for this run."""
    current = _CURRENT.get()
    if current is not None:
        yield current
        return
    cache = AnalysisCache()
    token = _CURRENT.set(cache)
    try:
        yield cache
    finally:
        _CURRENT.reset(token)


class Pass:
    """Base class: subclasses implement `call`; `run` adds the pre/post-condition checks."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def requires(self, model: onnx.ModelProto) -> None:
        """Raise PreconditionError (or UsageError for bad inputs) if the pass cannot run on `model`."""

    def ensures(self, model: onnx.ModelProto) -> None:
        """Raise if the pass's output breaks its promise."""

    def call(self, model: onnx.ModelProto) -> PassResult:
        raise NotImplementedError

    def run(self, model: onnx.ModelProto) -> PassResult:
        self.requires(model)
        result = self.call(model)
        self.ensures(result.model)
        return result

    __call__ = run


class Instrument:
    """Hooks around a `PassManager` run and around each of its passes; all optional."""

    def before_run(self, manager: PassManager, model: onnx.ModelProto) -> None: ...

    def before_pass(self, p: Pass, model: onnx.ModelProto) -> None: ...

    def after_pass(self, p: Pass, result: PassResult) -> None: ...

    def after_run(self, manager: PassManager, result: PassResult | None) -> None:
        """Called last, also when a pass raised (then `result` is None)."""


class PassManager(Pass):
    """Runs passes in order; modified if any pass modified; the result's `steps` hold each pass's result."""

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] = ()) -> None:
        self.passes = tuple(passes)
        self.instruments = tuple(instruments)

    def call(self, model: onnx.ModelProto) -> PassResult:
        result: PassResult | None = None
        for ins in self.instruments:
            ins.before_run(self, model)
        try:
            result = self._run_passes(model)
        finally:
            for ins in self.instruments:
                ins.after_run(self, result)
        return result

    def _run_passes(self, model: onnx.ModelProto) -> PassResult:
        steps: list[tuple[str, PassResult]] = []
        artifacts: list[Any] = []
        info: dict = {}
        modified = False
        with _shared_cache() as cache:
            for p in self.passes:
                for ins in self.instruments:
                    ins.before_pass(p, model)
                result = p.run(model)
                cache.retain(result.model, changed_in_place=result.modified and result.model is model)
                for ins in self.instruments:
                    ins.after_pass(p, result)
                steps.append((p.name, result))
                artifacts.extend(result.artifacts)
                info.update(result.info)
                modified |= result.modified
                model = result.model
        return PassResult(model, modified, info, tuple(artifacts), tuple(steps))


# ---------------------------------------------------------------------------------------------------
# Instruments
# ---------------------------------------------------------------------------------------------------
class TimingInstrument(Instrument):
    """Wall time per pass, appended to `times` as (pass name, seconds): the instrument is the record."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []
        self._start = 0.0

    def before_pass(self, p, model):
        self._start = time.perf_counter()

    def after_pass(self, p, result):
        self.times.append((p.name, time.perf_counter() - self._start))


class DumpInstrument(Instrument):
    """Save the model after every modifying pass, as NN_PassName.onnx in a folder.

    Written with `onnxprune.io.save_model`, so a model whose weights are lazy external data gets a data file
    beside each dump and loads back anywhere (onnxruntime included), without onnxprune's private entries.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.count = 0

    def after_pass(self, p, result):
        from onnxprune.io import save_model

        if result.modified:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.count += 1
            save_model(result.model, self.folder / f"{self.count:02d}_{p.name}.onnx")


class StampInstrument(Instrument):
    """Write each pass's `Summary` artifact into its output model's metadata (`onnxprune.metadata.stamp`).

    Args:
        always: also stamp when the pass changed nothing. The output model is then the pass's input object,
            which is stamped in place: meant for the CLI, which writes that model out as the result.
    """

    def __init__(self, always: bool = False) -> None:
        self.always = always

    def after_pass(self, p, result):
        from onnxprune.metadata import stamp

        summary = result.get(Summary)
        if summary is not None and (result.modified or self.always):
            stamp(result.model, summary.as_dict())


class ProgressInstrument(Instrument):
    """Reports a manager's run as one `progress.task` ("onnxprune", one unit per pass, described by the
    running pass); long steps inside a pass appear as tasks nested under it.

    Whether anything is shown is up to the active progress reporter (`progress.progress_to_stderr`, which
    the CLI installs on a terminal without --json): with none, nothing is printed.
    """

    def __init__(self) -> None:
        self._stack: ExitStack | None = None
        self._task: Task | None = None

    def before_run(self, manager, model):
        from onnxprune.progress import task

        self._stack = ExitStack()
        self._task = self._stack.enter_context(task("onnxprune", total=len(manager.passes)))

    def before_pass(self, p, model):
        if self._task is not None:
            self._task.update(description=p.name)

    def after_pass(self, p, result):
        if self._task is not None:
            self._task.advance()

    def after_run(self, manager, result):
        if self._stack is not None:
            self._stack.close()  # leaves the task, also when a pass raised
        self._stack = self._task = None
