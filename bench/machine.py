"""What the machine was doing while a bench timed: the load average and the CPU time the host stole.

Timings on shared machines are provisional; every latency bench prints `load` with its results, and
bench/latency.py also `stolen_since` around each timing (a virtual machine's hidden load).
"""

from __future__ import annotations

import os


def load() -> str:
    """``"load average 1.00 0.90 0.80 (2 cpus)"``."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} cpus)"


def proc_status_kb(key: str, pid: int | str = "self") -> int:
    """A ``/proc/PID/status`` field in kB (``VmHWM``: peak resident set, ``VmRSS``: current); 0 when the process is
    gone or the field is not there (Linux only)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = f.read().splitlines()
        for line in lines:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_ticks() -> tuple[int, int] | None:
    """(all, stolen) CPU ticks since boot (Linux ``/proc/stat``), None elsewhere.

    Stolen ticks are the time this virtual machine's cpus were ready to run while the host ran another guest:
    load the load average does not show."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(ticks), ticks[7]


def stolen_since(start: tuple[int, int] | None) -> str:
    """``"steal N.N%"``: the share of all cpus' time stolen by the host since `start` (`cpu_ticks`)."""
    now = cpu_ticks()
    if start is None or now is None or now[0] <= start[0]:
        return "steal n/a"
    return f"steal {100 * (now[1] - start[1]) / (now[0] - start[0]):.1f}%"
