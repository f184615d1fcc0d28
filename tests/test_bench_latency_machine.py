"""bench/latency.py's machine record (`bench.machine`): CPU time stolen by the host beside every timing line, and
the 2-thread rows timed while the second thread barely helped."""

from __future__ import annotations

import sys

import pytest

from bench import latency as bench_latency
from bench import machine


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_cpu_ticks_reads_all_and_stolen_ticks():
    ticks = machine.cpu_ticks()
    assert ticks is not None
    total, stolen = ticks
    assert total > 0 and 0 <= stolen <= total
    later = machine.cpu_ticks()
    assert later is not None and later[0] >= total and later[1] >= stolen  # counters since boot


def test_stolen_since_gives_the_share_of_the_interval(monkeypatch):
    monkeypatch.setattr(machine, "cpu_ticks", lambda: (1_400, 130))
    assert machine.stolen_since((1_000, 100)) == "steal 7.5%"  # 30 of 400 ticks
    assert machine.stolen_since(None) == "steal n/a"  # no /proc/stat at the start
    assert machine.stolen_since((1_400, 130)) == "steal n/a"  # no time passed
    monkeypatch.setattr(machine, "cpu_ticks", lambda: None)
    assert machine.stolen_since((1_000, 100)) == "steal n/a"


def _variant(ratio: float, speedup2: float, dense2: float, dense1: float = 11.6) -> bench_latency.Variant:
    return bench_latency.Variant("efficientnet_b0", ratio, "auto", "x.onnx", 400, 100, 1.0,
                                 speedup={"ort2": speedup2, "ort1": 3.8}, spread={"ort2": 0.05, "ort1": 0.05},
                                 dense_ms={"ort2": dense2, "ort1": dense1})


def test_two_thread_rows_timed_without_a_second_thread_are_marked():
    import argparse

    fast, slow = _variant(0.3, 3.7, 6.6), _variant(0.7, 3.2, 10.8)  # the second thread worth 1.76x / 1.07x
    assert not fast.second_thread_idle() and slow.second_thread_idle()
    assert not bench_latency.Variant("m", 0.1, "auto", "x", 1, 1, 0.0).second_thread_idle()  # nothing recorded
    table = bench_latency.efficiency_table([fast, slow], argparse.Namespace(threads=[2, 1]))
    rows = [line for line in table if line.startswith("EfficientNet-B0")]
    assert "~" not in rows[0] and "3.20~" in rows[1]  # the mark sits on the 2-thread speedup
    judged = [line for line in table if "ort 2T auto:" in line]
    assert judged and "1/2 CNN variants reach 0.9" in judged[0] and "efficientnet_b0@0.7" in judged[0].split("'~'")[1]


def test_tvm_two_thread_rows_get_their_own_column_and_mark():
    import argparse

    def tvm_variant(ratio: float, speedup2: float, dense2: float) -> bench_latency.Variant:
        return bench_latency.Variant("resnet50", ratio, "auto", "x.onnx", 400, 200, 1.0,
                                     speedup={"ort1": 1.9, "tvm": 1.95, "tvm2": speedup2},
                                     spread={"ort1": 0.05, "tvm": 0.05, "tvm2": 0.05},
                                     dense_ms={"ort1": 50.0, "tvm": 48.0, "tvm2": dense2})

    fast, slow = tvm_variant(0.3, 1.9, 26.0), tvm_variant(0.7, 1.5, 45.0)  # TVM's second thread: 1.85x / 1.07x
    assert [bench_latency.tvm_key(t) for t in (1, 2)] == ["tvm", "tvm2"]  # 1 thread keeps the earlier results' key
    assert not fast.second_thread_idle("tvm2") and slow.second_thread_idle("tvm2")
    assert not slow.second_thread_idle("tvm") and not slow.second_thread_idle("ort2")  # nothing to compare with
    table = bench_latency.efficiency_table([fast, slow], argparse.Namespace(threads=[1]))
    assert "TVM x86 speedup" in table[0] and "TVM x86 2T speedup" in table[0]
    rows = [line for line in table if line.startswith("ResNet-50")]
    assert "1.50~" in rows[1] and "~" not in rows[0]
    judged = [line for line in table if "TVM x86 2T auto:" in line]
    assert judged and "1/2 CNN variants reach 0.9" in judged[0] and "resnet50@0.7" in judged[0].split("'~'")[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_proc_status_reads_this_process_and_is_zero_for_a_gone_one():
    import os

    now = machine.proc_status_kb("VmRSS", os.getpid())
    peak = machine.proc_status_kb("VmHWM")  # read second: the resident set may grow between the two reads
    assert 0 < now <= peak  # kB: the peak resident set is never below an earlier current one
    assert machine.proc_status_kb("VmHWM", 2**31 - 1) == 0 and machine.proc_status_kb("NoSuchField") == 0


def test_thread_scaling_splits_a_two_thread_miss_into_the_plan_and_the_second_thread(tmp_path):
    from bench.latency_threads import thread_scaling_lines

    # dense 12 -> 6 ms (2.0x); pruned MACs / 4: at 1 thread 3.0 ms (eff 1.0), at 2 threads 2.0 ms (1.5x, eff 0.75)
    model = tmp_path / "p.onnx"
    import onnx
    from onnx import helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], [f"y{i}"]) for i in range(3)], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y0", onnx.TensorProto.FLOAT, [1])])  # fmt: skip
    onnx.save(helper.make_model(graph), model)
    miss = bench_latency.Variant("efficientnet_b0", 0.7, "auto", str(model), 400, 100, 1.0,
                                 speedup={"ort1": 4.0, "ort2": 3.0}, dense_ms={"ort1": 12.0, "ort2": 6.0})  # fmt: skip
    plan = bench_latency.Variant("mobilenet_v2", 0.7, "auto", "gone.onnx", 400, 100, 1.0,
                                 speedup={"ort1": 3.2, "ort2": 3.2}, dense_ms={"ort1": 8.0, "ort2": 4.0})  # fmt: skip
    fine = bench_latency.Variant("resnet50", 0.3, "auto", "gone.onnx", 200, 100, 1.0,
                                 speedup={"ort1": 2.0, "ort2": 1.9}, dense_ms={"ort1": 50.0, "ort2": 25.0})  # fmt: skip
    untimed = bench_latency.Variant("resnet50", 0.5, "auto", "gone.onnx", 200, 100, 1.0, speedup={"ort1": 2.0})
    lines = thread_scaling_lines([miss, plan, fine, untimed])
    assert "median over 3 rows: dense 2.00x, pruned 1.90x" in lines[2]
    rows = lines[3:]
    assert len(rows) == 2  # the row at the bar is not listed, the one without 2-thread timings not counted
    assert rows[0].startswith("  efficientnet_b0@0.7 auto: 2T 0.75 = 1T 1.00 x 1.50 / 2.00; 0.9 at 2T needs 1T >= 1.20")
    assert "~1000 us of 1-thread time per node" in rows[0] and "the thread scaling" in rows[0]  # 3 ms over 3 nodes
    assert "needs 1T >= 0.90" in rows[1] and "the plan (under the bar at 1 thread too)" in rows[1]
    assert "per node" not in rows[1]  # its file is gone: no op count
    assert thread_scaling_lines([untimed]) == []
