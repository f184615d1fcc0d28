"""Measurement backends: where a latency is measured, and the registry that names them.

Start reading at `LatencyBackend`, the protocol every backend implements, then `OrtBackend`, the one
built into the core (onnxruntime, any execution provider). `get_backend` turns the text of
``--latency-backend`` into a backend: ``ort`` or ``ort:EPName`` are built in; other prefixes (``x86``,
``wasm``, ``arm``, ``cuda``, ``rpc``) are registered by `onnxprune.targets.latency` with
`register_backend` when the CLI imports it, so the core never imports the targets.

A backend's `key` names the backend *and the device* (cpu model, instruction set, threads, library
versions): the latency tables cache on disk under it, so a table measured on one machine is never reused on
another. A backend whose numbers are not timing (``arm`` under qemu) says ``emulated = True`` and callers
refuse to build tables from it.

**Probe counts on onnxruntime.** `OrtBackend.probe_counts` chooses which kept channel counts a table
measures. onnxruntime's CPU convolutions run in the NCHWc layout, measured here (AVX-512) in blocks of 16
output channels, and input channels that are not a multiple of 4 leave that fast path (see
`onnxprune.latency.grid` for the measured curves; other instruction sets block differently). So the probes are a fine window of the last
`FINE_WINDOW` = 32 counts below the dense size (two blocks: enough to see a period of up to 16 twice and
its phase), its even counts only except the last `ODD_WINDOW` = 8 (odd counts are off every vector width;
four of them show whether that costs), plus a coarse sweep of at most `COARSE_POINTS` counts on multiples
of 32 (every block period onnxruntime uses divides it, so these are step bottoms whatever the period) down
to the lowest count; `grid.keep_counts` extends the period seen in the window over the coarse range. Dims
with at most 64 counts above the lowest have the window reach down to the lowest. A 2048-channel dim gets
30 probes, a 64-channel dim (lowest 7) 34, instead of 2,000 and 58.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnx

from onnxprune import external
from onnxprune.errors import UsageError
from onnxprune.latency.timing import Timing, in_blocks, interleaved
from onnxprune.progress import Task

__all__ = [
    "BACKENDS",
    "LatencyBackend",
    "OrtBackend",
    "device_fingerprint",
    "get_backend",
    "nchwc_block",
    "ort_probe_counts",
    "random_array",
    "random_feeds",
    "register_backend",
]

FINE_WINDOW = 32  # the even counts this far below the dense size are measured
ODD_WINDOW = 8  # and every count this close to it (odd counts: off every vector width)
COARSE_STEP = 32  # the coarse sweep's counts are multiples of this
COARSE_POINTS = 8  # at most this many coarse counts
RANDOM_POOL = 65_521  # random floats drawn per array at most (a prime: the tiling does not align with rows)
MULTI_THREAD_BLOCK = 10  # timed runs per opening of a multi-thread session (`timing.in_blocks`)
ALL_COUNTS_BELOW = 64  # dims with at most this many counts above `lowest`: the window reaches `lowest`


@runtime_checkable
class LatencyBackend(Protocol):
    """Something that times ONNX models on one device.

    Attributes:
        name: what the user named, e.g. ``"ort:CPUExecutionProvider"``, ``"tvm:x86"``, ``"rpc:KEY"``.
        key: the cache key: `name` plus a device fingerprint (cpu model, threads, library versions).
        emulated: True when the numbers are not timing (an emulator): callers refuse to build tables.

    Optional attribute ``alignment: int`` (read with ``getattr``, default 1): channel counts of groups of 16
    or more are kept on its multiples (`grid.aligned`), for constraints a one-layer micro-model cannot show.
    Optional attribute ``light_ops: bool`` (default True): whether tables price memory-bound nodes too
    (`microbench.light_nodes`). Optional attribute ``compiles_models: bool`` (default False): each model timed
    is compiled first, so callers time as few as they can (`passes.latency_select.confirmed`).
    """

    name: str
    key: str
    emulated: bool

    def time_models(
        self, models: Sequence[onnx.ModelProto], *, warmup: int = 3, repeat: int = 15, progress: Task | None = None
    ) -> list[Timing]:
        """Time each model (static input shapes; random inputs made by the backend), interleaved."""
        ...

    def probe_counts(self, size: int, lowest: int) -> list[int]:
        """Kept channel counts worth measuring for a dim of `size` channels, none below `lowest`, ascending,
        always including `size`."""
        ...


@functools.lru_cache(maxsize=1)
def device_fingerprint() -> str:
    """The cpu model, instruction set level and core count of this machine, for cache keys."""
    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")) and not flags:
                    flags = line.split(":", 1)[1]
    except OSError:
        pass
    words = set(flags.split())
    isa = next((f for f in ("avx512f", "avx2", "avx", "sse4_2", "asimd", "neon") if f in words), platform.machine())
    return f"cpu={cpu}|isa={isa}|cores={os.cpu_count()}"


def nchwc_block() -> int:
    """onnxruntime's NCHWc channel block on this CPU (MLAS: 16 with AVX-512, 8 with AVX/AVX2); 4 elsewhere
    (the input alignment of its blocked convolutions)."""
    isa = device_fingerprint().split("|isa=")[-1].split("|")[0]
    return {"avx512f": 16, "avx2": 8, "avx": 8}.get(isa, 4)


def ort_probe_counts(size: int, lowest: int) -> list[int]:
    """Counts to measure on onnxruntime: a fine window below `size` and a coarse sweep (module docstring)."""
    lowest = max(1, min(int(lowest), int(size)))
    bottom = lowest if size - lowest <= ALL_COUNTS_BELOW else max(lowest, size - FINE_WINDOW)
    fine = [c for c in range(bottom, size + 1) if c % 2 == 0 or c > size - ODD_WINDOW or c == bottom]
    multiples = [c for c in range(COARSE_STEP, bottom, COARSE_STEP) if c >= lowest]
    if len(multiples) > COARSE_POINTS:  # evenly thinned, always keeping the lowest and the highest
        picks = np.linspace(0, len(multiples) - 1, COARSE_POINTS).round().astype(int)
        multiples = [multiples[i] for i in sorted(set(picks.tolist()))]
    if bottom > lowest and (not multiples or multiples[0] > lowest):
        multiples.insert(0, lowest)  # the lowest count anchors the curve (interpolation needs it)
    return sorted(set(multiples) | set(fine))


class OrtBackend:
    """onnxruntime with the given execution providers, `threads` intra-op threads, one inter-op thread,
    sequential execution and every graph optimisation on (what a deployment runs)."""

    emulated = False

    def __init__(self, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 1):
        import onnxruntime as ort

        if threads < 1:
            raise UsageError(f"latency threads must be at least 1, got {threads}")
        available = ort.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise UsageError(
                f"onnxruntime execution provider {missing[0]} is not available here (available: {', '.join(available)})"
            )
        self.providers = tuple(providers)
        self.threads = int(threads)
        # CPU convolutions run in NCHWc blocks: counts between multiples of the block cost as the next one up
        # in a whole model, and input counts off a multiple of 4 leave the blocked path (`grid.aligned`);
        # other providers: no prior
        self.alignment = nchwc_block() if self.providers[0] == "CPUExecutionProvider" else 1
        self.name = f"ort:{self.providers[0]}"
        # multi-thread timings are taken in blocks (`timing.in_blocks`): tables timed otherwise are not comparable
        blocks = "" if self.threads == 1 else "|blocks"
        self.key = f"{self.name}|threads={self.threads}{blocks}|onnxruntime={ort.__version__}|{device_fingerprint()}"

    def __repr__(self) -> str:
        return f"OrtBackend({self.providers!r}, threads={self.threads})"

    def session(self, model: onnx.ModelProto, *, profile_prefix: str | None = None, spin: bool = False) -> Any:
        """An inference session configured as this backend measures (profiling into files named
        `profile_prefix` when given). With several threads its idle workers spin-wait only with `spin`, for
        a session timed alone (`time_models`): spinning pools of sessions alive together steal each other's
        cores."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 4  # fatal only: failures raise with the message
        if self.threads > 1 and not spin:
            # Idle intra-op workers spin-wait by default; with several sessions alive the spinning pools steal
            # each other's cores (ResNet-50, 2 threads, 2 cores: dense 117.5 ms interleaved with spinning pools).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile_prefix is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        if external.has_lazy(model):  # onnxruntime needs the weights in memory
            model = external.materialize(model)
        providers = list(self.providers)
        if "CPUExecutionProvider" not in providers:
            providers.append("CPUExecutionProvider")  # nodes the provider does not take fall back to CPU
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)

    def time_models(
        self, models: Sequence[onnx.ModelProto], *, warmup: int = 3, repeat: int = 15, progress: Task | None = None
    ) -> list[Timing]:
        """One thread: interleaved runs of live sessions. Several: `timing.in_blocks`, each session alive alone
        with spinning workers, as one deployed session runs (see `onnxprune.latency.timing`), in rounds of
        `MULTI_THREAD_BLOCK` runs (a progress task then counts rounds)."""
        for model in models:
            _require_static(model)
        if self.threads > 1:
            blobs = [external.materialize(m) if external.has_lazy(m) else m for m in models]

            def opener(k: int) -> Callable[[], Callable[[], None]]:
                def open_() -> Callable[[], None]:
                    return functools.partial(self.session(blobs[k], spin=True).run, None, feeds[k])

                return open_

            feeds = [random_feeds(m, seed=k) for k, m in enumerate(models)]
            # about `repeat` timed runs per model, as interleaved timing takes, in at least 3 rotated rounds
            rounds = max(3, -(-repeat // MULTI_THREAD_BLOCK))
            # a fresh session's first runs grow its arena and wake its pool: a few more untimed runs than interleaved
            return in_blocks([opener(k) for k in range(len(models))], warmup=max(warmup, 5), repeat=rounds,
                             block=MULTI_THREAD_BLOCK, progress=progress)
        runs: list[Callable[[], None]] = []
        for k, model in enumerate(models):
            sess = self.session(model)
            feeds_k = random_feeds(model, seed=k)
            runs.append(functools.partial(sess.run, None, feeds_k))
        return interleaved(runs, warmup=warmup, repeat=repeat, progress=progress)

    def probe_counts(self, size: int, lowest: int) -> list[int]:
        return ort_probe_counts(size, lowest)

    def profile_nodes(self, model: onnx.ModelProto, *, warmup: int = 3, repeat: int = 20) -> dict[str, float]:
        """Each kernel's latency inside the whole model: onnxruntime's profiler
        (``SessionOptions.enable_profiling``), median over `repeat` runs after `warmup` untimed ones, in ms,
        keyed by the node names of the optimized graph (``<tensor>_nchwc`` for NCHWc convolutions, the fused
        node's name for fusions, ``ReorderInput``/``ReorderOutput`` for layout conversions).
        `latency.calibrate` attributes them to the model's nodes."""
        import json
        import tempfile

        _require_static(model)
        feeds = random_feeds(model)
        with tempfile.TemporaryDirectory(prefix="onnxprune-profile-") as tmp:
            warm = self.session(model)
            for _ in range(warmup):  # first runs allocate and pre-pack: not in the profile
                warm.run(None, feeds)
            del warm
            sess = self.session(model, profile_prefix=str(Path(tmp) / "profile"))
            for _ in range(warmup + repeat):
                sess.run(None, feeds)
            events = json.loads(Path(sess.end_profiling()).read_text())
        durations: dict[str, list[float]] = {}
        for e in events:
            name = str(e.get("name", ""))
            if e.get("cat") == "Node" and name.endswith("_kernel_time"):
                durations.setdefault(name[: -len("_kernel_time")], []).append(float(e.get("dur", 0.0)))
        # the session's own first runs (warm-up) are in the profile too: keep the last `repeat` of each node
        return {n: float(np.median(v[-repeat:])) / 1000.0 for n, v in durations.items()}


def random_array(rng: np.random.Generator, shape: Sequence[int], dtype: int) -> np.ndarray:
    """Random values of an onnx element type, cheaply (timing does not depend on them, except that they
    must be normal floats: no denormals, no zeros a kernel could skip)."""
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    if np_dtype.kind == "f":
        n = int(np.prod(shape, dtype=np.int64))
        if n > RANDOM_POOL:  # tile a random pool: drawing millions of numbers per micro-model costs seconds per table
            pool = rng.random(RANDOM_POOL, dtype=np.float32) + 0.5
            return np.resize(pool, tuple(shape)).astype(np_dtype, copy=False)
        return (rng.random(shape, dtype=np.float32) + 0.5).astype(np_dtype, copy=False)
    if np_dtype.kind == "b":
        return rng.random(shape, dtype=np.float32) > 0.5
    return rng.integers(0, 2, size=shape).astype(np_dtype)


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Random values for every graph input of a model with static input shapes."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name not in inits:
            tt = vi.type.tensor_type
            feeds[vi.name] = np.asarray(random_array(rng, [d.dim_value for d in tt.shape.dim], tt.elem_type))
    return feeds


def _require_static(model: onnx.ModelProto) -> None:
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if not (d.HasField("dim_value") and d.dim_value > 0):
                raise UsageError(
                    f"input {vi.name!r} has a dynamic size on axis {axis}: give it with --shape "
                    f"(measurement needs static input shapes; see onnxprune.latency.measure.static_inputs)"
                )


# ---- registry --------------------------------------------------------------------------------------

#: prefix -> factory(option, *, threads, rpc, device_key). ``option`` is the text after ``prefix:``
#: (``""`` when there is none), e.g. the execution provider of ``ort:CUDAExecutionProvider``.
BACKENDS: dict[str, Callable[..., LatencyBackend]] = {}


def register_backend(prefix: str, factory: Callable[..., LatencyBackend]) -> None:
    """Make ``--latency-backend PREFIX[:OPTION]`` build a backend with
    ``factory(option, threads=..., rpc=..., device_key=...)``; registering a prefix again replaces it."""
    BACKENDS[prefix] = factory


def _ort_factory(option: str, *, threads: int = 1, rpc: str | None = None, device_key: str | None = None) -> OrtBackend:
    if rpc is not None or device_key is not None:
        raise UsageError("--rpc and --device-key measure through TVM: use --latency-backend rpc, not ort")
    if not option:
        return OrtBackend(threads=threads)
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = option if option.endswith("ExecutionProvider") else option + "ExecutionProvider"
    match = [p for p in available if p.lower() == wanted.lower()]
    if not match:
        raise UsageError(f"onnxruntime execution provider {option!r} is not available (available: {', '.join(available)})")
    return OrtBackend((match[0],), threads=threads)


register_backend("ort", _ort_factory)


def get_backend(text: str, *, threads: int = 1, rpc: str | None = None, device_key: str | None = None) -> LatencyBackend:
    """The backend ``--latency-backend TEXT`` names: ``PREFIX`` or ``PREFIX:OPTION``.

    Raises:
        UsageError: unknown prefix (the message lists the known ones), or the factory refused the options.
    """
    prefix, _, option = text.strip().partition(":")
    factory = BACKENDS.get(prefix)
    if factory is None:
        known = ", ".join(sorted(BACKENDS))
        raise UsageError(f"unknown latency backend {text!r} (known: {known}; the TVM targets register theirs when the CLI loads)")
    return factory(option, threads=threads, rpc=rpc, device_key=device_key)
