"""The TVM latency backends, registered with :func:`onnxprune.latency.backend.register_backend`.

``--latency-backend NAME`` takes any name or alias of the target table (:data:`.table.TARGETS`: ``x86``,
``x86-avx2``, ``arm``, ``raspberry-pi-4``, ``wasm``, ``cuda`` …) and ``rpc[:TARGET]``. What each means:

* a CPU row of this machine's architecture (``x86``, ``x86-avx2``): the model is compiled as its bundle is
  and timed here with TVM's ``time_evaluator`` (:class:`.tvm_latency.TvmBackend`);
* a row of another architecture (``arm``, the Raspberry Pis): qemu emulation is not timing, so without
  ``--rpc`` the backend is :class:`EmulatedBackend` (``emulated = True``), which refuses to time with a
  one-line message suggesting ``--rpc``; with ``--rpc HOST:PORT --device-key KEY`` the model is compiled
  (cross-linked) here and timed on the device the TVM RPC tracker hands out;
* ``cuda`` / ``jetson-orin``: timed on this machine's GPU when it has one, else through ``--rpc``, else a
  one-line UsageError;
* ``wasm``: refused (why: :data:`WASM_REFUSAL`);
* ``rpc`` / ``rpc:TARGET``: ``--rpc`` and ``--device-key`` required; the device runs bundles of ``TARGET``
  (default ``x86``). A fleet is TVM's own: start ``python -m tvm.exec.rpc_tracker`` once and
  ``python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`` on each device.

Importing this module is cheap (no tvm): the CLI imports it to register the names; a factory imports tvm
when it builds a TVM backend.

**What a table costs on x86.** Each probe of :func:`.probes.tvm_probe_counts` is a compile of a one-layer
model plus its timing. ResNet-50 (24 op signatures) needs 449 such models on x86 with AVX-512 (16 lanes),
against 1,322 on onnxruntime (whose probes are cheap sessions). Measured on this 2-core AMD EPYC (znver5):
a one-layer compile takes 0.9 s at load 0.3, so a ResNet-50 table costs about 449 x (0.9 s + ~0.3 s timing)
~ 9 minutes on a quiet machine (estimate from the parts); at load 15-20 (eight agents sharing the machine)
17 of the 24 signatures took 26 minutes. Through the CLI, ``--round-to auto --latency-backend x86`` on the
bundled Fashion-MNIST CNN took 11.7 minutes at that load (table and verification). Too slow for a default
on every prune, so ``ort`` stays the default backend; tables are cached on disk per (op signature, backend
key), so a second prune of the same architecture measures nothing.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from onnxprune.errors import UsageError
from onnxprune.latency.backend import LatencyBackend, register_backend

from .probes import tvm_probe_counts
from .spec import TargetSpec
from .table import TARGETS, get_target

if TYPE_CHECKING:
    import onnx

    from onnxprune.latency.timing import Timing
    from onnxprune.progress import Task

__all__ = ["WASM_REFUSAL", "EmulatedBackend", "make_backend", "parse_address", "register"]

#: Why ``--latency-backend wasm`` is refused.
WASM_REFUSAL = (
    "wasm latency is not measured: a wasm model runs only linked into its emscripten program, so every probe "
    "of a latency table would be a bundle compile and link (15-25 s each for a small CNN) timed in a node "
    "process of its own; use --latency-backend ort or x86"
)
#: Why a backend of another architecture does not time under emulation.
EMULATION_REFUSAL = (
    "{name} under qemu is emulation, not timing (its latencies say nothing about a real {arch} CPU); "
    "measure on a real device with --rpc HOST:PORT --device-key KEY (a TVM RPC tracker)"
)
#: NEON and wasm SIMD are 128 bits: 4 float32 lanes.
_LANES_128 = 4


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` of ``--rpc`` as (host, port).

    Raises:
        UsageError: Not HOST:PORT with a port in 1..65535.
    """
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--rpc {text!r}: expected HOST:PORT of a TVM RPC tracker (e.g. 127.0.0.1:9190)")
    return host.strip("[]"), int(port)


class EmulatedBackend:
    """A target of another architecture without ``--rpc``: only emulation could run it, which is not timing.

    ``emulated = True`` makes table builders refuse; :meth:`time_models` refuses too, with the same line.
    """

    emulated = True

    def __init__(self, spec: TargetSpec, threads: int = 1) -> None:
        self.spec = spec
        self.name = f"tvm:{spec.name}(qemu)"
        self.key = f"{self.name}|threads={threads}|emulated"

    def refusal(self) -> str:
        """The one-line reason this backend does not time."""
        return EMULATION_REFUSAL.format(name=self.spec.name, arch=self.spec.arch)

    def probe_counts(self, size: int, lowest: int) -> list[int]:
        return tvm_probe_counts(size, lowest, _LANES_128)

    def time_models(
        self,
        models: Sequence[onnx.ModelProto],
        *,
        warmup: int = 3,
        repeat: int = 15,
        progress: Task | None = None,
    ) -> list[Timing]:
        raise UsageError(self.refusal())


def _has_cuda() -> bool:
    if not Path("/dev/nvidiactl").exists() and not Path("/dev/nvidia0").exists():
        return False  # no NVIDIA driver: known without the seconds of importing tvm
    try:
        import tvm
    except ImportError:
        return False
    return bool(tvm.cuda(0).exist)


def make_backend(
    target: str, *, threads: int = 1, rpc: str | None = None, device_key: str | None = None
) -> LatencyBackend:
    """The latency backend for a row of the target table (see the module docstring).

    Raises:
        UsageError: Unknown target, ``--rpc`` without ``--device-key`` (or the reverse), wasm, or a GPU
            target without a GPU here and without ``--rpc``.
    """
    spec = get_target(target)
    if (rpc is None) != (device_key is None):
        raise UsageError(
            "--rpc HOST:PORT and --device-key KEY go together (the tracker, and the device kind it hands out)"
        )
    if spec.family == "wasm":
        raise UsageError(WASM_REFUSAL)
    if rpc is not None and device_key is not None:
        host, port = parse_address(rpc)
        from .tvm_latency import RemoteDevice, TvmBackend

        return TvmBackend(spec.name, threads=threads, remote=RemoteDevice(host, port, device_key))
    if spec.gpu and (spec.arch != platform.machine() or not _has_cuda()):
        raise UsageError(
            f"no CUDA GPU on this machine to time {spec.name} on; time on a remote one with "
            "--rpc HOST:PORT --device-key KEY (a TVM RPC tracker), or use --latency-backend ort"
        )
    if spec.arch != platform.machine():
        return EmulatedBackend(spec, threads)
    from .tvm_latency import TvmBackend

    return TvmBackend(spec.name, threads=threads)


def _row_factory(name: str):
    def factory(
        option: str, *, threads: int = 1, rpc: str | None = None, device_key: str | None = None
    ) -> LatencyBackend:
        if option:
            raise UsageError(f"--latency-backend {name} takes no ':{option}' (rpc:TARGET does)")
        return make_backend(name, threads=threads, rpc=rpc, device_key=device_key)

    return factory


def _rpc_factory(
    option: str, *, threads: int = 1, rpc: str | None = None, device_key: str | None = None
) -> LatencyBackend:
    if rpc is None or device_key is None:
        raise UsageError(
            "--latency-backend rpc needs --rpc HOST:PORT (a TVM RPC tracker) and --device-key KEY"
        )
    return make_backend(option or "x86", threads=threads, rpc=rpc, device_key=device_key)


def register() -> None:
    """Register every target-table name and alias, and ``rpc``, as latency backends."""
    for spec in TARGETS:
        for name in (spec.name, *spec.aliases):
            register_backend(name, _row_factory(name))
    register_backend("rpc", _rpc_factory)


register()
