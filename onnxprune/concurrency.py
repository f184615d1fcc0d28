"""Runs of onnxruntime over calibration samples, several at once, results in sample order.

Two single-threaded runs at once use 2 cores better than one run on two intra-op threads: the per-op
parallel sections of a batch-1 CNN are short (ResNet-50's layer4 convs: 7x7 positions) and the caller's own
work on sample i overlaps the run of sample i + 1. ResNet-50 at 224x224 with every layer input exposed,
2 quiet cores: 27.5 ms per sample on 2 intra-op threads, 24.1 with two 1-thread runs at once; the seq repair's
waves (`layer_inputs.FrontierRunner`) 40 -> 36 s, its weights bit-identical.
Runs this way: calibration statistics (`calibration`), the seq repair's waves, the sensitivity scan
(`sensitivity_runs`); synthesis runs whole batches two at once the same way (`synthetic._optimise_all`).
The ReLU-aware refit's elementwise step passes (`repair_relu._step_targets`) run the two halves of their rows
this way too: numpy's ufuncs release the GIL.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
K = TypeVar("K")

__all__ = ["AT_ONCE", "in_order"]

AT_ONCE = 2  # runs in flight where a caller runs samples this way (one onnxruntime thread each)


def in_order(fn: Callable[[K], T], keys: Iterable[K], at_once: int = AT_ONCE) -> Iterator[T]:
    """``fn(k)`` for every key, up to `at_once` calls running in threads, yielded in the keys' order.

    `fn` must be safe to run concurrently for different keys (onnxruntime's `InferenceSession.run` is).
    Closing the iterator early waits for the calls in flight.
    """
    if at_once <= 1:
        yield from map(fn, keys)
        return
    with ThreadPoolExecutor(at_once) as pool:
        window: deque[Future[T]] = deque()
        for k in keys:
            window.append(pool.submit(fn, k))
            if len(window) >= at_once:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
