"""Where the time and memory of a calibrated prune go: CPU seconds and peak RSS per phase of obs + seq.

    ONNXPRUNE_MODEL_CACHE=/work/zoo-cache python bench/repair_profile.py [--model resnet50] [--samples 256]
                                                                        [--target-params 80%]

Phases: calibration statistics (`calibration.collect_stats`, the obs criterion's Hessians), selection (obs
scores, uniform allocation, round-to 1), sequential repair (`repair.repair_sequential`), removal. Inputs are
seeded N(0, 1) noise at the model's input size (what images cost). Peak RSS is per phase (the kernel's
high-water mark is reset between phases through /proc/self/clear_refs). The issue's bar: ResNet-50 with 256
samples <= 60 s and <= 2 GB on 2 cores. Results: bench/repair_speed_results.txt (issue 17 sections; also
``--model efficientnet_lite0``). The end-to-end figure is the CLI under ``/usr/bin/time -v`` (same file).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import proc_status_kb
from models.zoo import zoo_model
from onnxprune.calibration import CalibrationData
from onnxprune.importer import import_model
from onnxprune.passes.pruning import PruneConfig
from onnxprune.passes.select import SelectChannelsPass, calibration_statistics
from onnxprune.repair import reanalyze, repair_sequential
from onnxprune.rewrite import apply_plan


def _status(key: str) -> int:
    """A /proc/self/status field in MB (VmHWM: peak RSS, VmRSS: current)."""
    return proc_status_kb(key) >> 10


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--target-params", default="80%")
    ap.add_argument("--out", help="save the pruned model here (to compare the outputs of two code versions)")
    args = ap.parse_args(argv)
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    model = import_model(str(zoo_model(args.model)))
    vi = model.graph.input[0]
    shape = [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim][1:]
    data = CalibrationData({vi.name: np.random.default_rng(0).standard_normal((args.samples, *shape), dtype=np.float32)})
    clock = [time.process_time(), time.perf_counter()]

    def phase(name: str) -> None:
        print(f"{name:24s} cpu {time.process_time() - clock[0]:7.1f}s  wall {time.perf_counter() - clock[1]:7.1f}s  "
              f"peak {_status('VmHWM'):6d} MB  after {_status('VmRSS'):6d} MB  load {os.getloadavg()[0]:.1f}", flush=True)
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak for the next phase
        clock[:] = [time.process_time(), time.perf_counter()]

    phase("import + inputs")
    cfg = PruneConfig(criterion="obs", repair="seq", target_params=args.target_params, round_to=1)
    stats = calibration_statistics(cfg, model, data, seq_rows=True)  # what `onnxprune prune` collects for this config
    phase("collect_stats")
    selection = SelectChannelsPass(cfg, calib=data, stats=stats).call(model).artifacts[0]
    del stats  # as in `onnxprune prune`: the seq repair never reads them (the selection keeps them for ls only)
    phase("select (obs scores)")
    repaired, _ = repair_sequential(selection.analysis, selection.labels, data, dense=selection.dense_rows)
    phase("repair_sequential")
    analysis, labels = reanalyze(selection.analysis, selection.labels, repaired, False)
    pruned = apply_plan(analysis, labels)
    phase("reanalyze + remove")
    if args.out:
        onnx.save(pruned, args.out)
    print(f"total cpu {time.process_time() - start_cpu:.1f}s wall {time.perf_counter() - start_wall:.1f}s, "
          f"{args.model}, {args.samples} samples ({os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
