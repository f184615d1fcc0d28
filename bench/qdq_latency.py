"""Do pruned QUANTIZED models get faster? Efficiency of QDQ models pruned as they are, by rounding.

    python bench/qdq_latency.py [--models mobilenet_v2,resnet18,...] [--ratios 0.3,0.5]
                                [--roundings auto,1,16] [--repeat 30] [--out bench/qdq_latency_results.txt]

Each zoo model (models/zoo.py) is quantized by onnxruntime (``quantize_static``, QDQ format, int8 per-channel
weights, int8 activations; calibrated on 4 random inputs: timing does not depend on the ranges), then pruned
with the command line a user types, ``onnxprune prune Q.onnx --ratio R --round-to X --no-verify --json``, and
every pruned variant is timed against the quantized dense model in one process, round-robin (onnxruntime CPU,
1 thread, batch 1: ``bench.latency.timed_against_dense``). Efficiency = speedup / MACs reduction.

onnxruntime runs a QDQ Conv as an integer kernel (QLinearConv, NHWC) only where the whole
DequantizeLinear -> Conv -> QuantizeLinear pattern is there; auto rounding's latency table times each layer as
that pattern (`onnxprune.latency.microbench`), so its steps are the integer kernels' steps. Before it did
(2026-12-05, MobileNetV2 at 0.3, 1 thread): auto 1.02x speedup (efficiency 0.55), ``--round-to 16`` 1.33x.
The load average is printed with the results.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.latency import model_path, prune_cli, timed_against_dense
from bench.machine import load
from onnxprune.latency.backend import OrtBackend

DEFAULT_MODELS = ("mobilenet_v2", "resnet18", "resnet50", "efficientnet_b0")


def quantize(src: Path, out: Path) -> Path:
    """`src` quantized by onnxruntime in the QDQ format (int8 per-channel weights, int8 activations)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(src, load_external_data=False)
    first = model.graph.input[0]
    shape = [d.dim_value or 1 for d in first.type.tensor_type.shape.dim]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.samples = iter([{first.name: rng.random(shape, np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.samples, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return out


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--ratios", default="0.3,0.5")
    p.add_argument("--roundings", default="auto,1,16")
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--latency-cache", default=None, help="latency table cache (default: a fresh folder)")
    p.add_argument("--out", default=str(ROOT / "bench" / "qdq_latency_results.txt"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    roundings = args.roundings.split(",")
    lines = [f"# bench/qdq_latency.py, onnxruntime CPU 1 thread, batch 1; load average before: {load()}",
             f"{'model':16s} {'ratio':>5s} {'round-to':>8s} {'MACs /':>7s} {'speedup':>8s} {'efficiency':>10s}"]  # fmt: skip
    backend = OrtBackend(threads=1)
    with tempfile.TemporaryDirectory(prefix="qdq-bench-") as tmp:
        work = Path(tmp)
        cache = Path(args.latency_cache) if args.latency_cache else work / "latency"
        for name in args.models.split(","):
            q = quantize(model_path(name), work / f"{name}.qdq.onnx")
            dense = onnx.load(q)
            rows = []
            for ratio in ratios:
                for rounding in roundings:
                    out = work / f"{name}_{ratio}_{rounding}.onnx"
                    summary, seconds = prune_cli(q, out, ["--ratio", str(ratio), "--round-to", rounding], cache)
                    rows.append((ratio, rounding, summary["macs_before"] / max(1, summary["macs_after"]), out))
                    print(f"  pruned {name} {ratio} round-to {rounding} in {seconds:.0f} s", flush=True)
            timed = timed_against_dense(dense, [onnx.load(r[3]) for r in rows], backend, args.repeat)
            for (ratio, rounding, macs, _), (speedup, spread) in zip(rows, timed):
                mark = "?" if spread > 0.25 else ""
                lines.append(f"{name:16s} {ratio:5.1f} {rounding:>8s} {macs:7.2f} {speedup:7.2f}x{mark} "
                             f"{speedup / macs:10.2f}")  # fmt: skip
                print(lines[-1], flush=True)
    lines.append(f"# load average after: {load()}")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
