"""`models.zoo.zoo_model`'s cache: two processes building one model at once both succeed (benchmarks run side by
side on a fresh cache; with one shared partial file name the second's rename failed with FileNotFoundError)."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from models import zoo


def _slow_builder(path: Path) -> None:
    """A tiny model, written slowly enough that both builders are inside at once."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    time.sleep(0.5)
    onnx.save(helper.make_model(graph), str(path))
    time.sleep(0.5)


def _build(cache: str, queue) -> None:
    zoo.ZOO["_race"] = zoo.ZooEntry("_race", "cnn", _slow_builder, ())
    try:
        queue.put(str(zoo.zoo_model("_race", Path(cache))))
    except Exception as exc:  # reported to the test, which fails on it
        queue.put(f"error: {type(exc).__name__}: {exc}")


def test_two_processes_building_one_model_both_get_the_file(tmp_path):
    ctx = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
    if ctx is None:
        pytest.skip("needs fork to hand the test's zoo entry to the builders")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    results = [queue.get(timeout=5) for _ in procs]
    assert results == [str(tmp_path / "_race.onnx")] * 2, results
    onnx.checker.check_model(onnx.load(str(tmp_path / "_race.onnx")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_race.onnx"]  # no partial file left behind
