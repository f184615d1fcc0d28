"""bench/latency.py's machine record: CPU time stolen by the host, printed beside every timing line."""

from __future__ import annotations

import sys

import pytest

from bench import latency as bench_latency


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_cpu_ticks_reads_all_and_stolen_ticks():
    ticks = bench_latency.cpu_ticks()
    assert ticks is not None
    total, stolen = ticks
    assert total > 0 and 0 <= stolen <= total
    later = bench_latency.cpu_ticks()
    assert later is not None and later[0] >= total and later[1] >= stolen  # counters since boot


def test_stolen_since_gives_the_share_of_the_interval(monkeypatch):
    monkeypatch.setattr(bench_latency, "cpu_ticks", lambda: (1_400, 130))
    assert bench_latency.stolen_since((1_000, 100)) == "steal 7.5%"  # 30 of 400 ticks
    assert bench_latency.stolen_since(None) == "steal n/a"  # no /proc/stat at the start
    assert bench_latency.stolen_since((1_400, 130)) == "steal n/a"  # no time passed
    monkeypatch.setattr(bench_latency, "cpu_ticks", lambda: None)
    assert bench_latency.stolen_since((1_000, 100)) == "steal n/a"
