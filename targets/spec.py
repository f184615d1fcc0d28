"""What a row of the target table is: :class:`TargetSpec`, the external tools it needs (:class:`Toolchain`), and
the two strategies a row holds: how its compiled library becomes bundle files (:class:`Exporter`) and how
``onnxprune run`` executes such a bundle on this machine (:class:`Runner`).

The rows are in :mod:`.table` (THE target table); the strategies in :mod:`.exporters` and :mod:`.launch`.
Code that compiles or runs a bundle asks the row's strategy instead of testing the target's name. This is
a leaf module (the strategy modules import it), and nothing here imports tvm, onnx or numpy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from onnxprune.errors import ToolchainError

if TYPE_CHECKING:  # numpy is not imported at run time: the CLI's parser reads the table (start-up time)
    import numpy as np

__all__ = ["HOST_CPU", "Exporter", "Runner", "TargetSpec", "Toolchain"]

#: ``mcpu`` value meaning "the CPU of the machine that compiles" (LLVM's ``mcpu=native`` is discarded).
HOST_CPU = "<host>"


@dataclass(frozen=True)
class Toolchain:
    """An external program a target needs, and the Debian package that provides it.

    Attributes:
        program: Executable looked up on ``PATH``.
        apt_package: What to ``apt-get install`` when it is missing.
    """

    program: str
    apt_package: str


@dataclass(frozen=True)
class Exporter(ABC):
    """How a compiled library (a ``relax.Executable``) is written into a bundle folder.

    Attributes:
        kind: Short name (``shared``, ``wasm``, ``cuda``).
        system_lib: Build the kernels as a system library (linked into one program, no ``dlopen``).
    """

    kind: ClassVar[str]
    system_lib: ClassVar[bool] = False

    def build_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``relax.build`` that depend on how the library is exported."""
        return {"system_lib": self.system_lib}

    def check_toolchain(self, spec: TargetSpec) -> None:
        """Raise :class:`ToolchainError` before the (slow) compile if the export will lack something."""
        return None  # most exports need only the row's compiler, which the backend checks itself

    @abstractmethod
    def write(self, ex: Any, out: Path, spec: TargetSpec) -> dict[str, object]:
        """Write the library (and runner, runtime …) into ``out``.

        Returns:
            The manifest's ``library``, ``runner`` and ``runtime`` fields, plus any field of this export.
        """

    @abstractmethod
    def readme(self, inputs: str, weights_flag: str) -> list[str]:
        """The README's "Run on the device" lines (``inputs``: the input file names, space separated)."""


@dataclass(frozen=True)
class Runner(ABC):
    """How ``onnxprune run`` executes a bundle of a target on this machine.

    Attributes:
        kind: Short name (``native``, ``qemu``, ``node``, ``cuda``), written to the manifest's ``runner``.
        times_layers: Whether the compile may time a layer's dense and sparse kernels through this runner to
            choose between them: the code runs as the target runs it (natively, or under node for wasm). Not
            under qemu (emulation, not timing) nor on a GPU (the CUDA pipeline has no per-layer choice).
    """

    kind: ClassVar[str]
    times_layers: ClassVar[bool] = False

    @abstractmethod
    def check(self, spec: TargetSpec) -> None:
        """Raise :class:`ToolchainError` naming what this machine lacks to run ``spec``'s bundles."""

    def can_run_here(self, spec: TargetSpec) -> bool:
        """True when this machine can run ``spec``'s bundles (see :meth:`check` for why not)."""
        try:
            self.check(spec)
        except ToolchainError:
            return False
        return True

    @abstractmethod
    def run(
        self, bundle: Path, spec: TargetSpec, manifest: dict, arrays: list[np.ndarray], repeat: int
    ) -> dict[str, np.ndarray]:
        """Run the bundle on ``arrays`` (the inputs in manifest order, already checked).

        Returns:
            Outputs by name in the model's order; with ``repeat`` > 0 also ``"__median_ms__"`` (a 0-d array).
        """


@dataclass(frozen=True)
class TargetSpec:
    """One row of the target table.

    Attributes:
        name: Canonical name used on the command line and in the manifest.
        tvm_target: TVM target in dict form (``mcpu: HOST_CPU`` is resolved at compile time).
        arch: Machine architecture of the bundle's runner (``x86_64``, ``aarch64``, ``wasm32``).
        exporter: How the library is written: a shared library loaded at run time, a wasm program (a
            system-lib object linked with the runtime into one ``.wasm``), or CUDA device code kept as CUDA C
            next to a host ``.so`` (:mod:`.exporters`).
        runner: How ``onnxprune run`` executes the bundle here: natively, under qemu-user, under node, or
            through the installed TVM runtime on a GPU (:mod:`.launch`).
        compiler: The C++ compiler that links library and runner.
        emulator: Program that runs the bundle on this machine when the architecture differs.
        aliases: Other names accepted for this row.
        description: One line shown in ``--help`` and the README.
        gpu: True when kernels run on a GPU (GPU schedule rules instead of CPU ones).
        extra_tools: Further programs the export needs.
    """

    name: str
    tvm_target: dict[str, object]
    arch: str
    exporter: Exporter
    runner: Runner
    compiler: Toolchain
    emulator: Toolchain | None = None
    aliases: tuple[str, ...] = ()
    description: str = ""
    gpu: bool = False
    extra_tools: tuple[Toolchain, ...] = field(default=())

    @property
    def family(self) -> str:
        """Base target this row refines (``x86``, ``arm``, ``wasm`` or ``cuda``)."""
        if self.gpu:
            return "cuda"
        return {"x86_64": "x86", "aarch64": "arm", "wasm32": "wasm"}[self.arch]
