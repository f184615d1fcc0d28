"""The CPU cost model behind the per-unit choice between a copy and zero rows/columns (`layout`), and the
onnxruntime session it is fitted and timed with (`deployed_session`).

Start reading at `CostModel`; `CostModel.measure` fits it on this machine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.verify import session


def deployed_session(model: onnx.ModelProto, threads: int = 1):
    """An onnxruntime CPU session as deployed (optimisations on) with `threads` intra-op threads.

    Timings must not depend on the machine's core count, hence the fixed thread count; with more than one
    thread, no spin-waiting (on a shared machine spinning workers starve each other).
    """
    return session(model, optimize=True, spin=threads <= 1, threads=threads)


@dataclass(frozen=True)
class CostModel:
    """CPU costs used to choose, per unit, between a copy and zero rows/columns in the weights.

    The defaults were fitted to end-to-end latencies of ResNet-50 exports (onnxruntime 1.32, 2 cores,
    optimisations on): a copy costs more than its bytes, because it also breaks Conv+Add+Relu fusion and
    the blocked NCHWc layout around it. `CostModel.measure` times a Slice/Gather between two Convs on
    the current machine instead.
    """

    op_overhead_s: float = 2e-5
    copy_bytes_per_s: float = 1.5e9  # Slice / Pad
    gather_bytes_per_s: float = 1.2e9
    macs_per_s: float = 2e10
    elementwise_bytes_per_s: float = 3e9
    layout_break: float = 2.0  # a copy also converts its input and output out of/into NCHWc: extra copies

    @classmethod
    def measure(cls, channels: int = 256, size: int = 56, runs: int = 40, threads: int = 1) -> CostModel:
        """Fit the costs to onnxruntime on this machine (optimisations on, as deployed).

        Lone ops give the bandwidths, the per-op overhead and the MAC rate. `layout_break` is then fitted
        to the decision the model has to make: a chain Conv -> Slice(half) -> Conv(half) (narrowed, with
        its layout conversions and lost fusions) against Conv -> Conv (absorbed: the second Conv reads
        every channel, zero columns for the dropped half); the copy's extra cost beyond its bytes is
        expressed as that many extra copies of the wide side.
        """
        rng = np.random.default_rng(0)
        half = channels // 2

        def timed(nodes: list[onnx.NodeProto], shape: tuple, inits: list) -> float:
            graph = helper.make_graph(
                nodes, "m", [helper.make_tensor_value_info("x", 1, list(shape))],
                [helper.make_tensor_value_info("y", 1, None)], inits,
            )  # fmt: skip
            sess = deployed_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), threads)
            x = rng.standard_normal(shape).astype(np.float32)
            for _ in range(3):
                sess.run(None, {"x": x})
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                sess.run(None, {"x": x})
                times.append(time.perf_counter() - t)
            return statistics.median(times)

        def i64(v, name: str) -> onnx.TensorProto:
            return numpy_helper.from_array(np.array(v, dtype=np.int64), name)

        def weight(out_c: int, in_c: int, name: str) -> onnx.TensorProto:
            return numpy_helper.from_array(rng.standard_normal((out_c, in_c, 1, 1)).astype(np.float32), name)

        big, tiny = (1, channels, size, size), (1, 8, 2, 2)
        w = weight(channels, channels, "w")
        conv = timed([helper.make_node("Conv", ["x", "w"], ["y"])], big, [w])
        slice_inits = [i64([0], "s"), i64([half], "e"), i64([1], "a")]
        sliced = timed([helper.make_node("Slice", ["x", "s", "e", "a"], ["y"])], big, slice_inits)
        idx = np.sort(rng.choice(channels, half, replace=False))
        gathered = timed([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)], big, [i64(idx, "i")])
        overhead = timed([helper.make_node("Slice", ["x", "s", "e", "a"], ["y"])], tiny,
                         [i64([0], "s"), i64([4], "e"), i64([1], "a")])  # fmt: skip
        nbytes = half * size * size * 4

        def clip(v: float) -> float:
            return float(np.clip(v, 1e8, 1e11))

        copy_bw = clip(nbytes / max(sliced - overhead, 1e-7))
        macs_per_s = float(np.clip(channels * channels * size * size / max(conv - overhead, 1e-7), 1e8, 1e12))

        # The decision itself: narrowed (Slice between two convs) against absorbed (zero columns).
        def relu(i: str, o: str) -> onnx.NodeProto:
            return helper.make_node("Relu", [i], [o])

        absorbed = timed([helper.make_node("Conv", ["x", "w"], ["h"]), relu("h", "r"),
                          helper.make_node("Conv", ["r", "w2"], ["y"])], big, [w, weight(channels, channels, "w2")])
        narrowed = timed([helper.make_node("Conv", ["x", "w"], ["h"]), relu("h", "r"),
                          helper.make_node("Slice", ["r", "s", "e", "a"], ["q"]),
                          helper.make_node("Conv", ["q", "w2"], ["y"])], big,
                         [w, weight(channels, half, "w2"), *slice_inits])  # fmt: skip
        saved = channels * half * size * size / macs_per_s  # the MACs narrowing saves
        plain_copy = overhead + nbytes / copy_bw
        wide_copy = 2 * nbytes / copy_bw
        layout_break = float(np.clip((narrowed - absorbed + saved - plain_copy) / wide_copy, 0.0, 20.0))
        return cls(
            op_overhead_s=overhead,
            copy_bytes_per_s=copy_bw,
            gather_bytes_per_s=clip(nbytes / max(gathered - overhead, 1e-7)),
            macs_per_s=macs_per_s,
            elementwise_bytes_per_s=copy_bw,
            layout_break=layout_break,
        )
