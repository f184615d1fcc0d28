"""A small pass protocol in the spirit of onnx-ir and TVM.

A pass is `run(model) -> PassResult(model, modified, info)`; it may check `requires` before and `ensures`
after. `PassManager` composes passes; cross-cutting concerns (timing, dumping, progress) are
*instruments* wrapped around passes, never code inside them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool
    info: dict = field(default_factory=dict)


class Pass:
    """Base class: subclasses implement `call`; `run` adds the pre/post-condition checks."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def requires(self, model: onnx.ModelProto) -> None:
        """Raise PreconditionError if the pass cannot run on `model`."""

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
    def before_pass(self, p: Pass, model: onnx.ModelProto) -> None: ...

    def after_pass(self, p: Pass, result: PassResult) -> None: ...


class TimingInstrument(Instrument):
    """Wall time per pass, in `self.times` (name, seconds)."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []
        self._start = 0.0

    def before_pass(self, p, model):
        self._start = time.perf_counter()

    def after_pass(self, p, result):
        self.times.append((p.name, time.perf_counter() - self._start))


class DumpInstrument(Instrument):
    """Save the model after every modifying pass, as NN_PassName.onnx in a folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.count = 0

    def after_pass(self, p, result):
        if result.modified:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.count += 1
            onnx.save(result.model, str(self.folder / f"{self.count:02d}_{p.name}.onnx"))


class PassManager(Pass):
    """Runs passes in order; modified if any pass modified; `results` keeps each pass's result."""

    def __init__(self, passes: list[Pass], instruments: list[Instrument] | tuple = ()) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.results: list[tuple[str, PassResult]] = []

    def call(self, model):
        self.results = []
        modified = False
        info: dict = {}
        for p in self.passes:
            for ins in self.instruments:
                ins.before_pass(p, model)
            result = p.run(model)
            for ins in self.instruments:
                ins.after_pass(p, result)
            self.results.append((p.name, result))
            modified |= result.modified
            info.update(result.info)
            model = result.model
        return PassResult(model, modified, info)
