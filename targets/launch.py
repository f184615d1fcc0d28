"""Runners: how ``onnxprune run`` executes a bundle on this machine, one strategy per kind of target (a row of
:mod:`.table` holds one).

* :class:`NativeRunner`: the bundle's C++ runner, directly (bundles for this machine's architecture);
* :class:`QemuRunner`: the same runner under ``qemu-aarch64-static`` with the aarch64 C/C++ runtime;
* :class:`NodeRunner`: ``runner.js`` under node;
* :class:`CudaRunner`: in this process, through the installed TVM runtime, on this machine's GPU.

The first three start a runner program (:class:`ProcessRunner`): inputs go to it as ``.npy`` files and it writes
``output_<i>.npy`` (see :mod:`.bundle`). Only :class:`CudaRunner` imports tvm, when it runs; numpy is imported
when a bundle runs too, not with the table (the CLI's parser reads the table: start-up time).
"""

from __future__ import annotations

import platform
import signal
import subprocess
import tempfile
import time
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from onnxprune.errors import ModelError, ToolchainError

from .cpu_features import missing_cpu_features
from .spec import Runner, TargetSpec
from .toolchains import require

if TYPE_CHECKING:
    import numpy as np

__all__ = ["CudaRunner", "NativeRunner", "NodeRunner", "ProcessRunner", "QemuRunner"]

#: Where Debian's aarch64 cross C/C++ runtime lives (qemu-user's ``-L``).
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"


@dataclass(frozen=True)
class ProcessRunner(Runner):
    """A runner program started per run: ``<command> OUT_DIR input_0.npy … [--repeat N] [--weights FILE]``."""

    @abstractmethod
    def command(self, bundle: Path, spec: TargetSpec, manifest: dict) -> list[str]:
        """The command that starts the bundle's runner here (before the OUT_DIR and input arguments)."""

    def check_bundle(self, bundle: Path, manifest: dict) -> None:
        """Raise ToolchainError when this machine cannot run this bundle (default: every bundle runs)."""

    def run(
        self, bundle: Path, spec: TargetSpec, manifest: dict, arrays: list[np.ndarray], repeat: int
    ) -> dict[str, np.ndarray]:
        import numpy as np

        self.check(spec)
        self.check_bundle(bundle, manifest)
        bundle = bundle.resolve()  # the runner starts in the bundle folder: a relative path would not resolve
        cmd = self.command(bundle, spec, manifest)
        with tempfile.TemporaryDirectory(prefix="onnxprune-run-") as tmp:
            tmpd = Path(tmp)
            paths = []
            for i, a in enumerate(arrays):
                p = tmpd / f"input_{i}.npy"
                np.save(p, a)
                paths.append(str(p))
            full = [*cmd, str(tmpd), *paths] + (["--repeat", str(repeat)] if repeat else [])
            w = manifest.get("weights")
            if isinstance(w, dict):
                full += ["--weights", str(bundle / w["file"])]
            try:
                proc = subprocess.run(full, capture_output=True, text=True, timeout=3600, cwd=bundle)
            except FileNotFoundError as e:
                raise ToolchainError(f"cannot start the bundle runner: {e}") from None
            if proc.returncode != 0:
                raise ModelError(_failure(proc.returncode, proc.stderr, manifest))
            outs: dict[str, np.ndarray] = {}
            for i, s in enumerate(manifest["outputs"]):
                p = tmpd / f"output_{i}.npy"
                if not p.is_file():
                    raise ModelError(f"bundle runner wrote no output {i} ({s['name']})")
                outs[s["name"]] = np.load(p)
            if repeat:
                for line in proc.stdout.splitlines():
                    if line.startswith("median_ms "):
                        outs["__median_ms__"] = np.array(float(line.split()[1]))
        return outs


def _failure(returncode: int, stderr: str, manifest: dict) -> str:
    """One line for a runner that failed: its last line of stderr, or the signal that killed it."""
    last = (stderr.strip().splitlines() or ["(no output)"])[-1]
    if returncode >= 0:
        return f"bundle runner failed (exit {returncode}): {last}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    why = ""
    if -returncode == signal.SIGILL:
        mcpu = (manifest.get("target", {}).get("tvm_target") or {}).get("mcpu", "?")
        why = f": an instruction this CPU lacks (the bundle was compiled for {mcpu}; compile on this machine)"
    return f"bundle runner killed by {name}{why}"


@dataclass(frozen=True)
class NativeRunner(ProcessRunner):
    """The C++ runner started directly: the bundle's architecture is this machine's."""

    kind = "native"
    times_layers = True

    def check(self, spec: TargetSpec) -> None:
        if spec.arch != platform.machine():
            raise ToolchainError(
                f"{spec.name} bundles run on {spec.arch}; this machine is {platform.machine()}"
            )

    def check_bundle(self, bundle: Path, manifest: dict) -> None:
        # a bundle compiled for another CPU (``--target x86`` is the compiling machine's) dies of SIGILL
        missing = missing_cpu_features(manifest["target"].get("cpu_features") or ())
        if missing:
            mcpu = (manifest["target"].get("tvm_target") or {}).get("mcpu", "?")
            raise ToolchainError(
                f"{bundle}: compiled for {mcpu}, whose instructions {', '.join(missing)} this CPU lacks; "
                "compile on this machine, or with --target x86-avx2 for any x86-64 CPU with AVX2"
            )

    def command(self, bundle: Path, spec: TargetSpec, manifest: dict) -> list[str]:
        return [str(bundle / manifest["runner"]["program"]), str(bundle / manifest["library"])]


@dataclass(frozen=True)
class QemuRunner(ProcessRunner):
    """The aarch64 C++ runner under qemu-user, with Debian's aarch64 C/C++ runtime as its root."""

    kind = "qemu"

    def check(self, spec: TargetSpec) -> None:
        require(spec.emulator, f"to run {spec.name} bundles on this machine")
        if not Path(AARCH64_SYSROOT).is_dir():
            raise ToolchainError(f"aarch64 C/C++ runtime not found at {AARCH64_SYSROOT}; apt-get install "
                                 "libc6-arm64-cross libstdc++6-arm64-cross")  # fmt: skip

    def command(self, bundle: Path, spec: TargetSpec, manifest: dict) -> list[str]:
        qemu = require(spec.emulator, f"to run {spec.name} bundles on this machine")
        program, library = bundle / manifest["runner"]["program"], bundle / manifest["library"]
        return [qemu, "-L", AARCH64_SYSROOT, str(program), str(library)]


@dataclass(frozen=True)
class NodeRunner(ProcessRunner):
    """``runner.js`` (emscripten's loader of ``runner.wasm``) under node; the model is a system library."""

    kind = "node"
    times_layers = True

    def check(self, spec: TargetSpec) -> None:
        require(spec.emulator, f"to run {spec.name} bundles on this machine")

    def command(self, bundle: Path, spec: TargetSpec, manifest: dict) -> list[str]:
        node = require(spec.emulator, f"to run {spec.name} bundles on this machine")
        # --no-liftoff: V8 compiles the optimised code up front; with its baseline tier a run swaps code midway
        # (the same layer timed 0.4x-6.8x)
        return [node, "--no-experimental-fetch", "--no-liftoff", str(bundle / manifest["runner"]["program"]), "system"]


@dataclass(frozen=True)
class CudaRunner(Runner):
    """In this process, through the TVM runtime of the installed wheel, on this machine's first GPU."""

    kind = "cuda"

    def check(self, spec: TargetSpec) -> None:
        if spec.arch != platform.machine():
            raise ToolchainError(
                f"{spec.name} bundles run on an {spec.arch} host, this machine is {platform.machine()}"
            )
        try:
            import tvm
        except ImportError:
            raise ToolchainError(
                "running CUDA bundles here needs apache-tvm (bash .ci/install-tvm.sh)"
            ) from None
        if not tvm.cuda(0).exist:
            raise ToolchainError(
                "no CUDA GPU on this machine: the bundle's code was generated but cannot run here"
            )

    def run(
        self, bundle: Path, spec: TargetSpec, manifest: dict, arrays: list[np.ndarray], repeat: int
    ) -> dict[str, np.ndarray]:
        self.check(spec)
        import numpy as np
        import tvm
        from tvm import relax

        dev = tvm.cuda(0)
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(bundle / manifest["library"])), dev)
        args = [tvm.runtime.tensor(a, device=dev) for a in arrays]
        ret = vm["main"](*args)
        results = [ret] if hasattr(ret, "numpy") else list(ret)
        outs = {s["name"]: r.numpy() for s, r in zip(manifest["outputs"], results)}
        if repeat:
            ms = []
            for _ in range(repeat):
                t = time.perf_counter()
                vm["main"](*args)
                dev.sync()
                ms.append((time.perf_counter() - t) * 1e3)
            outs["__median_ms__"] = np.array(float(np.median(ms)))
        return outs
