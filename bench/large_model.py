"""A > 2 GB external-data model: ratio-0 round trip byte-identical, ratio-0.3 runs and passes dead-channel
equivalence on sampled groups.

    python bench/large_model.py [--preset 2gb] [--groups 3] [--cache DIR] [--keep]

The model (the generated LLaMA-style decoder, ~2.5 GB of fp32 weights, more than the 2 GB protobuf limit)
is generated into a cache folder (default ``~/.cache/onnxprune/bench``, never committed) and deleted
afterwards. Prints, side by side, each step's wall time and peak RSS relative to the weight bytes, and
exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.decoder import CONFIGS, build_decoder, token_inputs


def run_child(cmd: list[str]) -> tuple[float, int, str]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"command failed ({code}): {' '.join(cmd)}\n{err.decode()[-2000:]}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024, out.decode()


def tensor_digests(path: Path) -> dict[str, str]:
    """sha256 of every initializer's bytes, read from its external file in chunks (or inline)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        h = hashlib.sha256()
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            with open(path.parent / info["location"], "rb") as f:
                f.seek(int(info.get("offset", 0)))
                left = int(info["length"])
                while left:
                    block = f.read(min(left, 64 << 20))
                    h.update(block)
                    left -= len(block)
        else:
            import numpy as np
            from onnx import numpy_helper

            h.update(np.ascontiguousarray(numpy_helper.to_array(t)).tobytes())
        out[t.name] = f"{t.data_type}:{list(t.dims)}:{h.hexdigest()}"
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="2gb", choices=sorted(CONFIGS))
    p.add_argument("--groups", type=int, default=3, help="groups sampled for dead-channel equivalence")
    p.add_argument("--cache", default=os.environ.get("ONNXPRUNE_CACHE", str(Path.home() / ".cache/onnxprune/bench")))
    p.add_argument("--keep", action="store_true")
    a = p.parse_args()
    cfg = CONFIGS[a.preset]
    folder = Path(a.cache) / f"large-{a.preset}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if shutil.disk_usage(folder).free < cfg.params * 4 * 5:
        raise SystemExit(f"not enough free disk in {folder}")
    failures = []
    try:
        src = build_decoder(cfg, folder)
        weights = (folder / f"{src.name}.data").stat().st_size
        print(f"model: {cfg.params / 1e6:.0f}M params, weights {weights / 2**30:.2f} GiB "
              f"({'over' if weights > 2**31 - 1 else 'UNDER'} the 2 GiB protobuf limit)")  # fmt: skip
        if weights <= 2**31 - 1:
            failures.append("model is not over 2 GB")
        rows = []

        # 1. Ratio 0: every tensor byte-identical.
        out0 = folder / "ratio0.onnx"
        secs, rss, _ = run_child([sys.executable, "-m", "onnxprune.cli", "prune", str(src), "-o", str(out0), "--ratio", "0"])
        rows.append(("prune --ratio 0", secs, rss))
        before, after = tensor_digests(src), tensor_digests(out0)
        same = sum(before[k] == after.get(k) for k in before)
        # Canonicalisation gives small shared tensors one copy per use (`NAME__k`): identical bytes too.
        copies = [k for k in after if k not in before]
        same_copies = sum(after[k] == before.get(k.rsplit("__", 1)[0]) for k in copies)
        print(f"ratio 0: {same}/{len(before)} tensors byte-identical; {same_copies}/{len(copies)} per-use copies "
              f"of shared constants identical to their source")  # fmt: skip
        if same != len(before) or same_copies != len(copies):
            failures.append("ratio-0 round trip changed tensors")
        shutil.rmtree(folder / "ratio0.onnx", ignore_errors=True)
        for f in folder.glob("ratio0.onnx*"):
            f.unlink()

        # 2. Ratio 0.3: output runs in onnxruntime.
        out3 = folder / "ratio03.onnx"
        secs, rss, stdout = run_child([sys.executable, "-m", "onnxprune.cli", "prune", str(src), "-o", str(out3),
                                       "--ratio", "0.3", "--json"])  # fmt: skip
        rows.append(("prune --ratio 0.3", secs, rss))
        summary = json.loads(stdout)
        import numpy as np

        from onnxprune.verify import run

        start = time.perf_counter()
        logits = run(str(out3), token_inputs(cfg))[0]
        rows.append(("onnxruntime run of the pruned model", time.perf_counter() - start, None))
        ok_run = logits.shape == (1, cfg.seq, cfg.vocab) and bool(np.isfinite(logits).all())
        print(f"ratio 0.3: params {summary['params_before'] / 1e6:.0f}M -> {summary['params_after'] / 1e6:.0f}M, "
              f"pruned model runs: {ok_run}")  # fmt: skip
        if not ok_run:
            failures.append("pruned model does not run")
        for f in folder.glob("ratio03.onnx*"):
            f.unlink()

        # 3. Dead-channel equivalence on sampled groups, straight on the lazily loaded model.
        from onnxprune.channels import analyze
        from onnxprune.graph import ModelGraph
        from onnxprune.importer import import_model
        from onnxprune.verify import dead_channel_check

        start = time.perf_counter()
        analysis = analyze(ModelGraph(import_model(src)))
        rng = np.random.default_rng(0)
        kv = [g.id for g in analysis.groups if g.size == cfg.kv_heads]
        mlp = [g.id for g in analysis.groups if g.size == cfg.ffn]
        picks = [int(rng.choice(kv)), int(rng.choice(mlp))] if kv and mlp else []
        rest = [g.id for g in analysis.groups if g.id not in picks]
        picks += [int(x) for x in rng.choice(rest, size=max(0, min(a.groups - len(picks), len(rest))), replace=False)]
        if not kv or not mlp:
            failures.append("analysis did not find KV-head and MLP groups")
        inputs = token_inputs(cfg)
        for gid in picks:
            group = analysis.groups[int(gid)]
            result = dead_channel_check(analysis, group, inputs)
            kind = "kv-heads" if group.size == cfg.kv_heads else "mlp"
            print(f"dead-channel group {group.id} ({kind}, {group.size} channels, {result.removed} removed): "
                  f"max rel error {result.error:.2e}")  # fmt: skip
            if not result.error <= 1e-4:
                failures.append(f"group {group.id} error {result.error}")
        rows.append((f"dead-channel checks ({len(picks)} groups)", time.perf_counter() - start, None))

        print(f"\n{'step':<40}{'wall s':>9}{'peak RSS GiB':>14}{'RSS / weights':>15}")
        for name, secs, rss in rows:
            extra = f"{rss / 2**30:>14.2f}{rss / weights:>15.2f}" if rss else ""
            print(f"{name:<40}{secs:>9.1f}{extra}")
        print("\nRESULT:", "PASS" if not failures else "FAIL " + "; ".join(failures))
        return 0 if not failures else 1
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
