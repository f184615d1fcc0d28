"""Unconstrained vs constrained latency at equal parameters, with the CLI's default options.

    python bench/unconstrained_latency.py [--models resnet50 mobilenet_v2] [--targets 80% 60%]
        [--repeat 60] [--threads 1] [--drives free coupled]

For every zoo model and parameter target: ``onnxprune prune MODEL --target-params T`` (constrained, every
default: ``--round-to auto``, uniform allocation, l1) and ``--mode unconstrained`` with each ``--drive``
(the same defaults otherwise: the latency grid as allowed counts). All exports of one model and target run
in one process with onnxruntime (graph optimisations on, ``--threads`` intra-op threads, batch 1),
interleaved round by round (`latency.timing.interleaved`) with the dense model; the table gives ratios of
medians: unconstrained / constrained (issue 17's bar: <= 1.05) and unconstrained / dense (bar: <= 1.0).
Record the load (`uptime`): other sessions share this machine; the coordinator re-runs it on a quiet one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from onnxprune.cli import main as cli_main
from onnxprune.graph import ModelGraph
from onnxprune.importer import import_model
from onnxprune.latency.timing import interleaved
from onnxprune.metrics import count_params
from onnxprune.upscale.report import effective_params


def prune(src: Path, out: Path, extra: list[str]) -> None:
    """Run the CLI (its output swallowed); raise when it fails."""
    with redirect_stdout(StringIO()):
        code = cli_main(["prune", str(src), "-o", str(out), *extra])
    if code != 0:
        raise RuntimeError(f"onnxprune prune {' '.join(extra)} exited {code}")


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if threads > 1:  # spinning idle pools of the other interleaved sessions steal the cores (latency/backend.py)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return lambda: sess.run(None, {inp.name: x})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    ap.add_argument("--targets", nargs="+", default=["80%", "60%"], help="--target-params values")
    ap.add_argument("--drives", nargs="+", default=["free", "coupled"])
    ap.add_argument("--repeat", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    from models import zoo

    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'model':<14}{'target':>7} {'method':<24}{'params':>10}{'nonzero':>10}{'ms':>9}{'x constr.':>11}{'x dense':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            src = Path(zoo.zoo_model(name))
            dense_params = count_params(ModelGraph(import_model(str(src))))
            for target in args.targets:
                rows: list[tuple[str, Path]] = [("dense", src)]
                out = Path(tmp) / f"{name}_c.onnx"
                prune(src, out, ["--target-params", target])
                rows.append(("constrained", out))
                for drive in args.drives:
                    out = Path(tmp) / f"{name}_u_{drive}.onnx"
                    prune(src, out, ["--target-params", target, "--mode", "unconstrained", "--drive", drive])
                    rows.append((f"unconstrained {drive}", out))
                fns = [session(p, args.threads) for _, p in rows]
                times = interleaved(fns, warmup=5, repeat=args.repeat)
                ms = [t.median_ms for t in times]
                for (method, path), t in zip(rows, ms):
                    model = import_model(str(path))
                    params = count_params(ModelGraph(model)) if method != "dense" else dense_params
                    nonzero = effective_params(model) if method.startswith("unconstrained") else params
                    print(f"{name:<14}{target:>7} {method:<24}{params:>10}{nonzero:>10}{t:>9.2f}"
                          f"{t / ms[1]:>11.3f}{t / ms[0]:>9.3f}", flush=True)
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
