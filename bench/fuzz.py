"""Fuzz run: >= 1,000 generated cases through the CLI (in worker processes) plus a subprocess tier.

    python bench/fuzz.py [--cases 1000] [--subprocess 50] [--timeout 30] [--save-crashers]

Seeds: the test models, the bundled CNN and its QDQ quantization. Prints counts of outcomes side by side: ok, one-line errors, crashes (tracebacks / internal errors),
hangs (over the per-case time limit), and violations (writes outside the output path, modified inputs,
partial or unauditable outputs). Exit status 1 if any crash, hang or violation occurred.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.testmodels import TEST_MODELS
from onnxprune.cli import main as cli_main
from onnxprune.fuzzing import FuzzRunner, Outcome, base_models, layout, make_case, save_crasher, summarize

SEED_FILES = [ROOT / "models" / "fashion_mnist_cnn.onnx"]


def quantized_seed(folder: Path) -> list[Path]:
    """The bundled CNN quantized by onnxruntime (QDQ, int8 per-channel): quantization parameters as typed-field
    tensors, Q/DQ chains (fuzzing it found two crashes and a hang, 2026-12-05). [] without the quantizer."""
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    except ImportError:
        return []
    import numpy as np

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.samples = iter([{"image": rng.random((1, 1, 28, 28), np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.samples, None)

    out = folder / "fashion_mnist_cnn_qdq.onnx"
    quantize_static(str(SEED_FILES[0]), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return [out]


def run_subprocess(case, timeout: float) -> Outcome:
    """The same case through a fresh `python -m onnxprune.cli` (what a user's shell does)."""
    with tempfile.TemporaryDirectory(prefix="onnxprune-fuzz-sp-") as tmp:
        root = Path(tmp)
        model, out = layout(case, root)
        args = [a.format(model=model, out=out) for a in case.args]
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "onnxprune.cli", *args], capture_output=True, text=True,
                                  timeout=timeout, cwd=root / "cwd")  # fmt: skip
        except subprocess.TimeoutExpired:
            return Outcome(case.name, "hang", f"over {timeout} s", timeout)
        seconds = time.perf_counter() - start
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        if "Traceback" in proc.stderr or "internal error" in proc.stderr or len(lines) > 1 or proc.returncode < 0:
            return Outcome(case.name, "crash", proc.stderr[:500], seconds)
        if list((root / "cwd").iterdir()):
            return Outcome(case.name, "violation", "wrote into the working directory", seconds)
        return Outcome(case.name, "ok" if proc.returncode == 0 else "error", lines[0] if lines else "", seconds)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--subprocess", type=int, default=50, help="extra cases run as separate CLI processes")
    p.add_argument("--seed", type=int, default=0, help="first case seed")
    p.add_argument("--timeout", type=float, default=30.0, help="per-case time limit (s)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--save-crashers", action="store_true", help="store failing cases in tests/fuzz_corpus/")
    a = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="onnxprune-fuzz-seeds-") as tmp:
        bases = base_models(TEST_MODELS, [*SEED_FILES, *quantized_seed(Path(tmp))])
    cases = [make_case(s, bases) for s in range(a.seed, a.seed + a.cases)]
    start = time.perf_counter()
    runner = FuzzRunner(cli_main, workers=a.workers, timeout=a.timeout)
    try:
        results = runner.run(cases)
    finally:
        runner.close()
    inproc_s = time.perf_counter() - start
    start = time.perf_counter()
    sp_cases = [make_case(s, bases) for s in range(a.seed + a.cases, a.seed + a.cases + a.subprocess)]
    sp_results = [run_subprocess(c, a.timeout) for c in sp_cases]
    sp_s = time.perf_counter() - start

    by_name = {c.name: c for c in cases + sp_cases}
    bad = [r for r in results + sp_results if r.status in ("crash", "hang", "violation")]
    for r in bad:
        print(f"[{r.status}] {r.name}: {r.detail.splitlines()[-1] if r.detail else ''}")
        if a.save_crashers:
            print("   saved to", save_crasher(by_name[r.name], ROOT / "tests" / "fuzz_corpus"))
    total = summarize(results + sp_results)
    kinds = Counter(r.name.split(":")[2] for r in results)
    print(f"\nmutation kinds: {len(kinds)} distinct combos; bases: {len(bases)}")
    print(f"{'tier':<12}{'cases':>7}{'ok':>7}{'error':>7}{'crash':>7}{'hang':>6}{'viol.':>7}{'s/case':>8}")
    for tier, res, secs in (("in-process", results, inproc_s), ("subprocess", sp_results, sp_s),
                            ("total", results + sp_results, inproc_s + sp_s)):  # fmt: skip
        c = summarize(res)
        per = secs / max(1, c["cases"])
        print(f"{tier:<12}{c['cases']:>7}{c['ok']:>7}{c['error']:>7}{c['crash']:>7}{c['hang']:>6}{c['violation']:>7}{per:>8.3f}")
    print(f"\ntracebacks={total['crash']} hangs={total['hang']} writes_outside/modified_inputs={total['violation']} "
          f"over {total['cases']} cases")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
