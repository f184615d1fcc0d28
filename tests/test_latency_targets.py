"""TVM latency backends (onnxprune.targets.latency): registration, refusals, the x86 backend's compile and
timing (numerics against onnxruntime), and measurement through a TVM RPC tracker and server on loopback."""

from __future__ import annotations

import importlib.util
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import UsageError
from onnxprune.latency.backend import get_backend
from onnxprune.targets import latency as tl
from onnxprune.targets.probes import tvm_probe_counts
from tests.tvm_helpers import needs_tvm, tiny_cnn

HAVE_TORNADO = importlib.util.find_spec("tornado") is not None


def conv_model(
    out_channels: int, *, in_channels: int = 32, size: int = 28, outputs: int = 1
) -> onnx.ModelProto:
    """Conv(in -> out, 3x3) + Relu (+ a second output, the conv before the Relu, when ``outputs`` is 2)."""
    rng = np.random.RandomState(out_channels)
    w = numpy_helper.from_array((rng.randn(out_channels, in_channels, 3, 3) * 0.1).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.randn(out_channels).astype(np.float32), "b")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_channels, size, size])]
    if outputs == 2:
        outs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, out_channels, size, size]))
    graph = helper.make_graph(
        nodes, f"conv{out_channels}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_channels, size, size])], outs, [w, b],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def ort_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


# ------------------------------------------------------------------------------------------------
# registry and refusals (no tvm needed)
# ------------------------------------------------------------------------------------------------


def test_every_table_row_and_rpc_is_registered() -> None:
    from onnxprune.latency.backend import BACKENDS

    for spec in tl.TARGETS:
        for name in (spec.name, *spec.aliases):
            assert name in BACKENDS, name
    assert "rpc" in BACKENDS and "ort" in BACKENDS


def test_arm_without_rpc_is_emulated_and_refuses_to_time() -> None:
    backend = get_backend("arm")
    assert backend.emulated is True
    assert isinstance(backend, tl.EmulatedBackend)
    with pytest.raises(UsageError, match=r"qemu is emulation, not timing.*--rpc HOST:PORT --device-key"):
        backend.time_models([conv_model(16)])
    counts = backend.probe_counts(64, 4)  # NEON: 4 lanes
    assert counts[0] == 4 and counts[-1] == 64 and sum(c % 4 == 0 for c in counts) >= len(counts) - 2


def test_emulated_backend_refuses_a_table() -> None:
    table = pytest.importorskip("onnxprune.latency.table")
    from onnxprune.channels import analyze
    from onnxprune.graph import ModelGraph

    analysis = analyze(ModelGraph(conv_model(16)))
    with pytest.raises(UsageError, match="emulated") as info:
        table.build_table(analysis, get_backend("raspberry-pi-4"), cache_dir=None)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("cuda", {}, r"no CUDA GPU on this machine.*--rpc HOST:PORT --device-key KEY"),
        ("wasm", {}, r"wasm latency is not measured"),
        ("rpc", {}, r"needs --rpc HOST:PORT .* and --device-key KEY"),
        ("x86", {"rpc": "127.0.0.1:9190"}, r"--rpc HOST:PORT and --device-key KEY go together"),
        ("rpc", {"rpc": "localhost", "device_key": "pi"}, r"expected HOST:PORT"),
        ("rpc", {"rpc": "localhost:99999", "device_key": "pi"}, r"expected HOST:PORT"),
        ("x86:avx", {}, r"takes no ':avx'"),
        ("rpc:sparc", {"rpc": "127.0.0.1:9190", "device_key": "pi"}, r"unknown target 'sparc'"),
    ],
)
def test_refusals_are_one_line_usage_errors(text: str, kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        get_backend(text, **kwargs)
    assert "\n" not in str(info.value)


def test_parse_address() -> None:
    assert tl.parse_address("127.0.0.1:9190") == ("127.0.0.1", 9190)
    assert tl.parse_address("[::1]:9190") == ("::1", 9190)
    assert tl.parse_address("pi.local:80") == ("pi.local", 80)


@pytest.mark.parametrize(
    ("size", "lowest"), [(64, 6), (256, 25), (2048, 204), (24, 2), (16, 1), (10, 1), (1000, 100)]
)
def test_probe_counts_are_few_step_bottoms_plus_off_grid(size: int, lowest: int) -> None:
    lanes = 16
    counts = tvm_probe_counts(size, lowest, lanes)
    assert counts == sorted(set(counts))
    assert counts[0] == lowest and counts[-1] == size
    assert len(counts) <= 12, "each probe is a compile"
    interior = [c for c in counts if c not in (lowest, size)]
    on_grid = [c for c in interior if c % lanes == 0]
    off_grid = [c for c in interior if c % lanes]
    for c in off_grid:  # one past a step bottom, with the top of that next step measured too
        assert c % lanes == 1 and c - 1 in on_grid and c - 1 + lanes in counts, (c, counts)
    if size > 4 * lanes:
        assert len(on_grid) >= 3 and len(off_grid) == 2


# ------------------------------------------------------------------------------------------------
# x86: compile as the bundles do, time with time_evaluator
# ------------------------------------------------------------------------------------------------


@pytest.mark.exclusive
@needs_tvm
def test_x86_backend_matches_onnxruntime_and_times(tmp_path: Path) -> None:
    from onnxprune.targets.tvm_latency import TvmBackend

    backend = get_backend("x86", threads=1)
    assert isinstance(backend, TvmBackend) and backend.emulated is False
    assert backend.name == "tvm:x86" and "threads=1" in backend.key and "tvm=0." in backend.key
    assert get_backend("x86", threads=2).key != backend.key
    assert backend.period in (4, 8, 16)  # float32 lanes of SSE/NEON, AVX2, AVX-512
    assert all(
        c % backend.period == 0 or c in (25, 256) or c % backend.period == 1
        for c in backend.probe_counts(256, 25)
    )
    model = onnx.load(tiny_cnn(tmp_path / "tiny.onnx"))
    x = np.random.RandomState(1).randn(1, 3, 20, 20).astype(np.float32)
    (got,) = backend.outputs(model, {"x": x})
    (ref,) = ort_outputs(model, {"x": x})
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))

    # 8x the MACs must take clearly longer, measured interleaved (a loose bound: the machine is shared)
    small, large = conv_model(16), conv_model(128)
    t0 = time.perf_counter()
    timings = backend.time_models([small, large, model], warmup=2, repeat=7)
    first = time.perf_counter() - t0
    assert all(t.median_ms > 0 and t.runs == 7 and t.spread >= 0 for t in timings)
    assert timings[1].median_ms > 2.0 * timings[0].median_ms, timings
    # compiled once: timing the same models again only times (no compile)
    assert len(backend._cache) == 3
    t0 = time.perf_counter()
    again = backend.time_models([small, large], warmup=1, repeat=3)
    assert time.perf_counter() - t0 < first
    assert len(backend._cache) == 3 and len(again) == 2


@needs_tvm
def test_x86_backend_asks_for_static_shapes() -> None:
    model = conv_model(16)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    with pytest.raises(UsageError, match="--shape"):
        get_backend("x86").time_models([model])


# ------------------------------------------------------------------------------------------------
# RPC: a tracker and a server on loopback, measured through them
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rpc_tracker() -> Iterator[tuple[str, str]]:
    """A TVM RPC tracker and one RPC server (key ``loopback``) on 127.0.0.1, in subprocesses."""
    if not HAVE_TORNADO:
        pytest.skip("TVM's RPC tracker needs tornado (pip install tornado)")
    pytest.importorskip("tvm")
    from tvm import rpc
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    base = random.randint(20000, 40000)  # other test runs on this machine use their own ports
    tracker = Tracker("127.0.0.1", port=base, port_end=base + 300, silent=True)
    server = Server("127.0.0.1", port=base + 400, port_end=base + 700, key="loopback",
                    tracker_addr=("127.0.0.1", tracker.port), silent=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:  # the server registers with the tracker asynchronously
            queue = rpc.connect_tracker("127.0.0.1", tracker.port).summary()["queue_info"]
            if queue.get("loopback", {}).get("free", 0) >= 1:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the RPC server did not register with the tracker: {queue}")
            time.sleep(0.2)
        yield f"127.0.0.1:{tracker.port}", "loopback"
    finally:
        server.terminate()
        tracker.terminate()


@pytest.mark.exclusive
@needs_tvm
def test_rpc_measures_end_to_end_through_a_tracker(rpc_tracker: tuple[str, str]) -> None:
    from onnxprune.latency.backend import get_backend as get

    address, key = rpc_tracker
    remote = get("rpc", rpc=address, device_key=key)
    assert remote.name == "rpc:loopback" and remote.emulated is False
    assert get("rpc:x86", rpc=address, device_key=key).key == remote.key
    dense, pruned = conv_model(64, outputs=2), conv_model(32, outputs=2)
    # numerics on the remote device (a model with two outputs: the VM returns a tuple)
    x = np.random.RandomState(2).randn(1, 32, 28, 28).astype(np.float32)
    got = remote.outputs(dense, {"x": x})  # type: ignore[attr-defined]
    for g, r in zip(got, ort_outputs(dense, {"x": x}), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(np.abs(r).max()))

    t_dense, t_pruned = remote.time_models([dense, pruned], warmup=2, repeat=7)
    assert t_dense.median_ms > 0 and t_pruned.median_ms > 0
    assert t_dense.runs == t_pruned.runs == 7
    # half the output channels, half the MACs: not slower than the dense model (3x margin for a shared machine)
    assert t_pruned.median_ms < 3.0 * t_dense.median_ms
    assert t_dense.median_ms > 1.2 * t_pruned.median_ms, (t_dense, t_pruned)
    # the device is this machine: the RPC time is the local time (timed on the device, no round trip)
    (t_local,) = get_backend("x86").time_models([dense], warmup=2, repeat=7)
    assert 1 / 3 < t_dense.median_ms / t_local.median_ms < 3, (t_dense, t_local)


@needs_tvm
def test_rpc_without_a_device_is_a_one_line_error() -> None:
    from onnxprune.errors import ToolchainError

    backend = get_backend("rpc", rpc="127.0.0.1:1", device_key="nobody")
    with pytest.raises(ToolchainError, match="no device with key 'nobody'"):
        backend.time_models([conv_model(16)])
