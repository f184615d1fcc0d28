"""`conftest.SuiteLock`: an exclusive test waits for the running ones, and the tests asking after it wait for it
(without the gate, `flock` would let a new shared holder in beside the first and the exclusive test could wait
for as long as the other worker has tests)."""

from __future__ import annotations

import threading
import time

from conftest import SuiteLock


def test_exclusive_waits_for_running_tests_and_later_tests_wait_for_it(tmp_path):
    events: list[str] = []
    release_first = threading.Event()

    def hold(name: str, exclusive: bool, until: threading.Event | None = None) -> None:
        with SuiteLock(tmp_path).hold(exclusive):  # a lock of its own: one per worker process in a run
            events.append(f"{name} in")
            if until is not None:
                until.wait(5)
            else:
                time.sleep(0.05)
            events.append(f"{name} out")

    first = threading.Thread(target=hold, args=("shared 1", False, release_first))
    first.start()
    while not events:
        time.sleep(0.01)
    timed = threading.Thread(target=hold, args=("exclusive", True))
    timed.start()
    time.sleep(0.2)  # the exclusive test now waits at the lock, holding the gate
    later = threading.Thread(target=hold, args=("shared 2", False))
    later.start()
    time.sleep(0.2)
    assert events == ["shared 1 in"]  # neither the exclusive test nor the later shared one got in
    release_first.set()
    for t in (first, timed, later):
        t.join(5)
    assert events == ["shared 1 in", "shared 1 out", "exclusive in", "exclusive out", "shared 2 in", "shared 2 out"]


def test_shared_holders_run_together(tmp_path):
    both_in = threading.Barrier(2, timeout=5)

    def hold() -> None:
        with SuiteLock(tmp_path).hold(False):
            both_in.wait()  # raises BrokenBarrierError if the second could not get in beside the first

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(6)
    assert not both_in.broken
