"""Timing models as the TVM bundles run them: on this machine, or on a device behind a TVM RPC tracker.

The latency backends of :mod:`.latency` are instances of :class:`TvmBackend`. Start reading at
:meth:`TvmBackend.time_models`:

1. **compile** each model with the bundles' own compile (:func:`.tvm_backend.import_onnx` then
   :func:`.tvm_backend.build_executable` for the table row, weights lifted out of the library as a bundle
   does), so the kernels timed are the kernels a bundle ships. Compiled models are kept in a small in-memory
   LRU keyed by the sha256 of the model's bytes, so a model timed twice (the dense reference of every
   verification round) compiles once; TVM's messages go to a log file, as in ``onnxprune compile``;
2. **load** every executable into a relax VM on the device: ``tvm.cpu()``/``tvm.cuda()`` here, or the
   remote session of :class:`RemoteDevice` (``connect_tracker(host, port).request(key)``, the library
   exported as ``.so`` — cross-linked for another architecture — uploaded and loaded there, inputs and
   weights copied once). Each VM saves ``main`` with its arguments as a closure (``save_function``), so a
   timed call does no argument conversion;
3. **time** with TVM's ``time_evaluator`` (timed on the device itself, so the RPC round trip is not in the
   number), in round-robin rounds: every round takes one sample of every model, in an order rotated each
   round, so drift on a shared machine hits all models alike. A sample averages ``number`` calls, chosen in
   the warm-up so that one sample lasts about :data:`SAMPLE_MS`.

Each probe of a latency table is a compile (~0.5-2 s for a one-layer model), so :meth:`TvmBackend.probe_counts`
asks for few, well-chosen channel counts: multiples of the target's vector lanes (the conv output channels are
zero-padded to whole vectors by :mod:`.tvm_layout`, so latency steps there), preferring whole register tiles
(:func:`.tvm_tiles.register_tile` takes 1, 2 or 4 vectors), plus two counts one past a step, which show the
step's height.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import socket
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxprune import progress as progress_mod
from onnxprune.errors import ToolchainError, UnsupportedModelError, UsageError
from onnxprune.latency.backend import device_fingerprint
from onnxprune.latency.timing import Timing

from . import bundle as B
from .exporters import _export_library
from .messages import tvm_messages
from .probes import tvm_probe_counts
from .spec import TargetSpec
from .table import get_target
from .toolchains import TVM_PIN, tvm_version
from .tvm_backend import build_executable, build_target, import_onnx
from .tvm_tiles import vector_lanes

try:
    import tvm
except ImportError:  # pragma: no cover - depends on the environment
    raise ToolchainError(f"apache-tvm is not installed; pip install {TVM_PIN}") from None

__all__ = ["SAMPLE_MS", "RemoteDevice", "TvmBackend"]

#: One timing sample lasts about this long (``number`` calls averaged), so timer resolution and one-off
#: interrupts stay small against it.
SAMPLE_MS = 10.0
#: Compiled models kept in memory (a ResNet-50 executable and its weights are ~100 MB).
CACHE_SIZE = 12
#: The compile's entry module: it and every module of this package it imports, directly or through others
#: (layouts, schedules, register tiles, Winograd, row-wise and fast-math kernels, sparse kernels, tuning,
#: the target table), decide the compiled kernels, so their hash is part of the cache key: a kernel or
#: schedule change invalidates the cached latencies (`_schedule_hash`).
_COMPILE_ENTRY = "tvm_backend.py"
#: Bump to invalidate every cached TVM latency when what decides the kernels lives outside this package's
#: sources (2: the hash covers the import closure of `_COMPILE_ENTRY`, 2026-12-03; before, five listed
#: modules, so tables cached before the row-wise / fast-math / sparse kernels looked current).
KERNEL_VERSION = 2
#: Imported by the compile but not deciding its kernels (packaging, messages, toolchain lookup: the TVM
#: version is in the key on its own): left out, so editing them keeps the cached latencies.
_NOT_KERNELS = frozenset(
    {"bundle.py", "cpu_features.py", "exporters.py", "launch.py", "messages.py", "toolchains.py", "wasm.py"}
)


@dataclass
class _Compiled:
    """A compiled model: the executable, its lifted weights, its inputs; the exported ``.so`` once needed."""

    ex: Any
    weights: list[np.ndarray]
    inputs: list[B.TensorSpec]
    library: Path | None = None


@dataclass
class RemoteDevice:
    """A device reached through a TVM RPC tracker (``--rpc HOST:PORT --device-key KEY``).

    The session is requested on first use and kept; uploaded libraries are remembered by file name.
    """

    host: str
    port: int
    key: str
    timeout_s: int = 0  # 0: the session lives as long as the backend (a table takes minutes)
    _session: Any = None
    _uploaded: set[str] = field(default_factory=set)

    def session(self) -> Any:
        """The RPC session (requested from the tracker on first use)."""
        if self._session is None:
            from tvm import rpc

            where = f"the TVM RPC tracker at {self.host}:{self.port}"
            try:  # TVM's client retries a refused connection for 60 s: fail fast when nothing listens
                socket.create_connection((self.host, self.port), timeout=5).close()
                tracker = rpc.connect_tracker(self.host, self.port)
                servers = tracker.summary().get("server_info", [])
            except Exception as e:
                raise ToolchainError(
                    f"no device with key {self.key!r}: cannot reach {where} ({_one_line(e)})"
                ) from None
            keys = {str(info.get("key", "")).partition(":")[2] for info in servers}  # "server:KEY"
            if self.key not in keys:  # else request() would wait for one forever
                raise ToolchainError(f"no device with key {self.key!r} at {where} "
                                     f"(keys there: {', '.join(sorted(keys)) or 'none'})")  # fmt: skip
            try:
                self._session = tracker.request(self.key, priority=1, session_timeout=self.timeout_s)
            except Exception as e:
                raise ToolchainError(f"{where} gave no {self.key!r} device ({_one_line(e)})") from None
        return self._session

    def load(self, library: Path) -> Any:
        """Upload ``library`` (once) and load it on the device."""
        sess = self.session()
        if library.name not in self._uploaded:
            sess.upload(str(library))
            self._uploaded.add(library.name)
        return sess.load_module(library.name)


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else type(e).__name__


def _schedule_hash() -> str:
    """``v{KERNEL_VERSION}-`` and the sha256 of the sources that decide the compiled kernels
    (`_compile_modules`), for the latency cache key."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in _compile_modules(here):
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    return f"v{KERNEL_VERSION}-{h.hexdigest()[:12]}"


def _compile_modules(here: Path) -> list[str]:
    """The file names of `_COMPILE_ENTRY` and every module of this package it imports (relative imports,
    followed transitively, function-level ones included; `_NOT_KERNELS` neither hashed nor followed), sorted."""
    import ast

    seen: set[str] = set()
    todo = [_COMPILE_ENTRY]
    while todo:
        name = todo.pop()
        if name in seen or name in _NOT_KERNELS or not (here / name).is_file():
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((here / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    todo.append(node.module.split(".")[0] + ".py")
                else:
                    todo += [f"{alias.name}.py" for alias in node.names]
    return sorted(seen)


def _random_array(spec: B.TensorSpec, rng: np.random.Generator) -> np.ndarray:
    """Random floats; ones for integer and bool inputs (a valid token id, mask and segment everywhere)."""
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        return rng.standard_normal(spec.shape).astype(dtype)
    return np.ones(spec.shape, dtype=dtype)


class TvmBackend:
    """A latency backend (:class:`onnxprune.latency.backend.LatencyBackend`) timing TVM-compiled models.

    Args:
        target: A row of the target table (``x86``, ``x86-avx2``, ``arm``, ``raspberry-pi-4``, ``cuda`` …).
        threads: TVM runtime threads on the device.
        remote: The device behind an RPC tracker; None: this machine.
    """

    emulated = False
    # every model timed is a compile: the auto --ratio choice times one plan against --round-to 1, not a shortlist
    compiles_models = True
    # TVM fuses elementwise ops into the convolution before them, and every micro-model is a compile: tables
    # on TVM price the Conv/Gemm/MatMul layers only (`onnxprune.latency.microbench.light_nodes`)
    light_ops = False

    def __init__(self, target: str = "x86", *, threads: int = 1, remote: RemoteDevice | None = None) -> None:
        if threads < 1:
            raise UsageError("--latency-threads must be >= 1")
        self.spec: TargetSpec = get_target(target)
        self.threads = threads
        self.remote = remote
        self.target = build_target(self.spec)
        self.lanes = vector_lanes(self.target)
        #: The channel step of this target's kernels (output channels pad to whole vectors): a grid builder
        #: may allow every multiple of it, not only the few counts measured.
        self.period = self.lanes
        if remote is None:
            self.name = f"tvm:{self.spec.name}"
            device = f"{device_fingerprint()}|mcpu={tvm.get_global_func('target.llvm_get_system_cpu')()}"
        else:
            self.name = f"rpc:{remote.key}"
            device = f"{self.spec.name}@{remote.key}"
        self.key = (f"{self.name}|{device}|threads={threads}|tvm={tvm_version()}|"
                    f"schedules={_schedule_hash()}")  # fmt: skip
        self._cache: OrderedDict[str, _Compiled] = OrderedDict()
        self._tmp = tempfile.TemporaryDirectory(prefix="onnxprune-latency-")

    # ------------------------------------------------------------------ protocol
    def probe_counts(self, size: int, lowest: int) -> list[int]:
        """Multiples of the target's vector lanes plus two off-grid counts (see :func:`tvm_probe_counts`)."""
        return tvm_probe_counts(size, lowest, self.lanes)

    def time_models(
        self,
        models: Sequence[onnx.ModelProto],
        *,
        warmup: int = 3,
        repeat: int = 15,
        progress: progress_mod.Task | None = None,
    ) -> list[Timing]:
        """Median latency of every model, measured interleaved on the device (see the module docstring).

        Raises:
            UsageError: A model has a dynamic input dim.
            UnsupportedModelError: TVM cannot compile a model.
            ToolchainError: The RPC device cannot be reached, or a toolchain is missing.
        """
        if not models:
            return []
        compiled = [self._compile(m) for m in models]
        opened = (
            progress_mod.task(f"timing {len(models)} model(s) on {self.name}", total=repeat)
            if progress is None
            else contextlib.nullcontext(progress)
        )
        with opened as job:
            dev, vms = self._load(compiled)
            evaluators = [vm.time_evaluator("timed", dev, number=1, repeat=1) for vm in vms]
            numbers = []
            for ev in evaluators:  # warm-up; the fastest call decides how many calls one sample averages
                best = min(float(ev().mean) for _ in range(max(1, warmup)))
                numbers.append(max(1, math.ceil(SAMPLE_MS / max(best * 1e3, 1e-6))))
            evaluators = [vm.time_evaluator("timed", dev, number=n, repeat=1) for vm, n in zip(vms, numbers)]
            samples: list[list[float]] = [[] for _ in models]  # seconds per call
            for r in range(repeat):
                for k in range(len(models)):
                    i = (k + r) % len(models)
                    samples[i].append(float(evaluators[i]().mean))
                job.advance()
        return [Timing.of(s) for s in samples]

    # ------------------------------------------------------------------ numerics (tests, checks)
    def outputs(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the compiled model once on the device and return its outputs (to compare with onnxruntime)."""
        c = self._compile(model)
        _, (vm,) = self._load([c], feeds=[feeds])
        vm.invoke_stateful("main")  # stateful: a tuple result comes back field by field, also over RPC
        ret = vm.get_outputs("main")
        results = [ret] if hasattr(ret, "numpy") else list(ret)
        return [r.numpy() for r in results]

    # ------------------------------------------------------------------ compile, load
    def _compile(self, model: onnx.ModelProto) -> _Compiled:
        digest = hashlib.sha256(model.SerializeToString()).hexdigest()
        hit = self._cache.get(digest)
        if hit is not None:
            self._cache.move_to_end(digest)
            return hit
        try:
            inputs, _ = B.model_signature(model, None, batch_default=None)
        except UnsupportedModelError as e:
            raise UsageError(f"{e}; measurement needs static input shapes (--shape)") from None
        label = model.graph.name or "model"
        weights: list[np.ndarray] | None = None if self.spec.gpu else []
        with (
            progress_mod.task(f"compiling {label} for {self.spec.name}"),
            tvm_messages(Path(self._tmp.name) / "compile.log"),
        ):
            mod = import_onnx(model, inputs)
            ex = build_executable(mod, self.spec, weights=weights)
        c = _Compiled(ex, weights or [], inputs)
        if self.remote is not None:  # the library goes to the device: export it now, named by the digest
            c.library = Path(self._tmp.name) / f"{digest[:20]}.so"
            _export_library(ex, c.library, self.spec, f"to link {self.spec.name} code for the RPC device")
        self._cache[digest] = c
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return c

    def _device(self) -> Any:
        if self.remote is not None:
            sess = self.remote.session()
            sess.get_function("runtime.config_threadpool")(1, self.threads)
            return sess.cuda(0) if self.spec.gpu else sess.cpu(0)
        if self.spec.gpu:
            dev = tvm.cuda(0)
            if not dev.exist:
                raise ToolchainError("no CUDA GPU on this machine; time on a remote one with "
                                     "--rpc HOST:PORT --device-key KEY")  # fmt: skip
            return dev
        tvm.get_global_func("runtime.config_threadpool")(1, self.threads)
        return tvm.cpu(0)

    def _load(
        self, compiled: Sequence[_Compiled], feeds: Sequence[dict[str, np.ndarray]] | None = None
    ) -> tuple[Any, list[Any]]:
        """Relax VMs on the device, each with ``main`` and its arguments saved as ``timed``."""
        from tvm import relax

        dev = self._device()
        rng = np.random.default_rng(0)
        vms = []
        for i, c in enumerate(compiled):
            lib = c.ex if self.remote is None else self.remote.load(c.library)  # type: ignore[arg-type]
            vm = relax.VirtualMachine(lib, dev)
            given = feeds[i] if feeds is not None else {}
            arrays = [given[s.name] if s.name in given else _random_array(s, rng) for s in c.inputs]
            args = [tvm.runtime.tensor(a, device=dev) for a in [*arrays, *c.weights]]
            vm.save_function("main", "timed", *args)
            vm.set_input("main", *args)
            vms.append(vm)
        return dev, vms

    def close(self) -> None:
        """Drop the compiled models and the session; remove the exported libraries."""
        self._cache.clear()
        if self.remote is not None:
            self.remote._session = None
        with contextlib.suppress(OSError):
            self._tmp.cleanup()
