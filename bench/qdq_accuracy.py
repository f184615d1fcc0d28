"""Accuracy of quantized (QDQ) models pruned as they are, side by side with their float models pruned alike.

    python bench/qdq_accuracy.py [--models cifar_resnet20,cifar_resnet44] [--targets 80%,60%]
                                 [--out bench/qdq_accuracy_results.txt]

Each pretrained CIFAR-10 ResNet (zoo, ``../shared/datasets``) is prepared by onnxruntime (``quant_pre_process``:
BatchNorm folded; this float model is the "float" column) and quantized by ``quantize_static`` (QDQ, int8
per-channel weights, int8 activations, calibrated on 256 training images). Both are pruned with the same command
line, ``onnxprune prune M --target-params P --criterion l2 --round-to 1``, plain, with ``--allocation knapsack
--calib`` (512 training images; measured error curves, no repair), and with ``--repair seq`` on top (the QDQ
model's layers refitted as floats and quantized again on their own grid, `onnxprune.quantized_repair`), then the
same with ``--criterion obs`` (row ``obs+k+seq``: OBS scores from Hessians collected on the QDQ model's float view),
and scored top-1 on all 10,000 test images.

What it shows: pruning a quantized model as it is costs what pruning its float model costs, and the sequential
repair brings it back as it does the float model. Skips cleanly (exit 0, one line) without the datasets.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.latency import model_path
from bench.machine import load
from models.cifar_resnet import load_cifar10


def quantize(src: Path, work: Path, calib: np.ndarray) -> tuple[Path, Path]:
    """(the float model as onnxruntime prepares it for quantization, its QDQ quantization)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre, qdq = work / f"{src.stem}.float.onnx", work / f"{src.stem}.qdq.onnx"
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    name = onnx.load(pre).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.samples = iter([{name: calib[i : i + 1]} for i in range(256)])

        def get_next(self):
            return next(self.samples, None)

    quantize_static(str(pre), str(qdq), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return pre, qdq


def top1(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    pred = np.concatenate([session.run(None, {name: x[i : i + 500]})[0].argmax(1) for i in range(0, len(x), 500)])
    return float(100 * (pred == y).mean())


def prune(src: Path, out: Path, target: str, extra: Sequence[str]) -> dict:
    cmd = [sys.executable, "-m", "onnxprune.cli", "prune", str(src), "-o", str(out), "--target-params", target,
           "--criterion", "l2", "--round-to", "1", "--no-verify", "--json", *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="cifar_resnet20,cifar_resnet44")
    p.add_argument("--targets", default="80%,60%")
    p.add_argument("--out", default=str(ROOT / "bench" / "qdq_accuracy_results.txt"))
    args = p.parse_args(argv)
    try:
        x, y = load_cifar10("test")
        calib, _ = load_cifar10("calib")
    except (FileNotFoundError, OSError) as e:
        print(f"skipped: CIFAR-10 not found ({e})")
        return 0
    lines = [f"# bench/qdq_accuracy.py; top-1 on the 10,000 CIFAR-10 test images; load average: {load()}",
             f"{'model':15s} {'kept params':>11s} {'allocation':>10s} {'float':>7s} {'QDQ':>7s}"]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="qdq-acc-") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            pre, qdq = quantize(model_path(name), work, calib)
            input_name = onnx.load(pre).graph.input[0].name
            np.savez(work / "calib.npz", **{input_name: calib[:512]})
            lines.append(f"{name:15s} {'100%':>11s} {'-':>10s} {top1(pre, x, y):7.2f} {top1(qdq, x, y):7.2f}")
            print(lines[-1], flush=True)
            for target in args.targets.split(","):
                knapsack = ["--allocation", "knapsack", "--calib", str(work / "calib.npz")]
                seq = [*knapsack, "--repair", "seq"]
                for label, extra in (("uniform", []), ("knapsack", knapsack), ("knap+seq", seq),
                                     ("obs+k+seq", [*seq, "--criterion", "obs"])):  # fmt: skip
                    prune(pre, work / "f.onnx", target, extra)
                    prune(qdq, work / "q.onnx", target, extra)
                    acc = top1(work / "f.onnx", x, y), top1(work / "q.onnx", x, y)
                    lines.append(f"{name:15s} {target:>11s} {label:>10s} {acc[0]:7.2f} {acc[1]:7.2f}")
                    print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
