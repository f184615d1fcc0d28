"""Coverage benchmark: how much of every zoo model onnxprune can prune, side by side with onnxsim.

For each model of `models/zoo.py`, pruned at 0.5:
  reach = (weights removed / weights before) / 0.5, over Conv/ConvTranspose/Gemm/MatMul weights
          (embedding tables and the vocabulary head excluded),
plus params before/after, time, and whether the pruned model still runs in onnxruntime. The same row is
measured for `onnxsim.pruning.apply_structured_pruning(m, sparsity=0.5)` (bench-only extra:
`pip install onnxsim==0.8.1`). Finally what stays whole is printed per model, grouped by reason: barrier ops
(an op without a rule, or one a rule refused) and frozen weight axes.

    python bench/coverage.py [--only NAME ...] [--json OUT.json] [--out OUT.txt]
    python bench/coverage.py --from-json bench/coverage_results.json --out bench/coverage_results.txt

`--out` writes the tables at full width (a redirected console is 80 columns and cuts the model names);
`--from-json` prints the tables of saved rows without measuring again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import zoo
from onnxprune.graph import ModelGraph
from onnxprune.importer import import_model
from onnxprune.metrics import count_params
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.verify import random_inputs, run

RATIO = 0.5


def weight_names(graph: ModelGraph, transformer: bool = False) -> set[str]:
    """Initializers used as weights of Conv/ConvTranspose/Gemm/MatMul and of LSTM/GRU/RNN (W and R).

    For transformers the embeddings (gathered tables, a patch-embedding conv reading the graph input)
    and the vocabulary/classifier head (a layer whose output is a graph output) are excluded, as the
    issue's reach definition says.
    """
    gathered = {n.input[0] for n in graph.nodes if n.op_type == "Gather" and graph.is_initializer(n.input[0])}
    outputs = set(graph.graph_outputs)
    names = set()
    for node in graph.nodes:
        if node.op_type in ("LSTM", "GRU", "RNN"):  # input (W) and recurrence (R) weights
            names.update(n for n in node.input[1:3] if graph.is_initializer(n) and n not in gathered)
            continue
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        if transformer and (set(node.input) & set(graph.graph_inputs) or _feeds_output(graph, node, outputs)):
            continue
        for name in node.input[:2]:
            name = _source(graph, name)
            if graph.is_initializer(name) and name not in gathered:
                names.add(name)
    return names


def _feeds_output(graph: ModelGraph, node, outputs: set[str], hops: int = 3) -> bool:
    name = node.output[0]
    for _ in range(hops):
        if name in outputs:
            return True
        uses = graph.consumers.get(name, [])
        if len(uses) != 1 or uses[0].node.op_type not in ("Add", "Identity", "Reshape", "Flatten"):
            return False
        name = uses[0].node.output[0]
    return name in outputs


def family(name: str) -> str:
    """Zoo family, with the attention CNN-zoo entries (ViT, Swin) counted as transformers."""
    return "transformer" if name.startswith(("vit", "swin")) else zoo.ZOO[name].family


def _source(graph: ModelGraph, name: str) -> str:
    """Follow layout ops back to the initializer they transform (exporters transpose Linear weights)."""
    while name in graph.producer and graph.producer[name].op_type in ("Transpose", "Identity", "Cast", "Reshape"):
        name = graph.producer[name].input[0]
    return name


def weight_elements(model: onnx.ModelProto, names: set[str]) -> int:
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer if t.name in names)


def reach(pruned: onnx.ModelProto, w_before: int, transformer: bool) -> float:
    """Fraction of the weights removed, over the target ratio. Weights are found again in the pruned
    graph (by role, not by name: other tools rename initializers)."""
    from onnxprune.importer import canonicalize

    graph = ModelGraph(canonicalize(pruned)[0])
    after = weight_elements(graph.model, weight_names(graph, transformer))
    return (1 - after / w_before) / RATIO if w_before else 0.0


def runs(model: onnx.ModelProto, inputs) -> bool:
    try:
        outs = run(model, inputs)
        return all(np.isfinite(o).all() for o in outs if o.dtype.kind == "f")
    except Exception:
        return False


def measure(name: str) -> dict:
    path = zoo.zoo_model(name)
    shapes = zoo.INPUT_SHAPES.get(name)
    model = import_model(path, shapes)
    graph = ModelGraph(model)
    fam = family(name)
    names = weight_names(graph, fam == "transformer")
    w_before = weight_elements(model, names)
    inputs = random_inputs(model)
    row = {"model": name, "family": fam, "params": count_params(graph)}

    start = time.perf_counter()
    result = PrunePass(PruneConfig(ratio=RATIO)).run(model)
    row["ours_s"] = time.perf_counter() - start
    row["ours_params"] = count_params(ModelGraph(result.model))
    row["ours_reach"] = reach(result.model, w_before, fam == "transformer")
    row["ours_runs"] = runs(result.model, inputs)
    row["barriers"] = result.info["summary"]["barriers"]
    row["frozen_weights"] = result.info["analysis"].frozen_weights()

    try:
        from onnxsim.pruning import apply_structured_pruning
    except ImportError:
        row["onnxsim_reach"] = None
        return row
    original = onnx.load(str(path))
    if shapes:
        from onnxprune.importer import fix_input_shapes

        fix_input_shapes(original, shapes)
    start = time.perf_counter()
    try:
        theirs = apply_structured_pruning(original, sparsity=RATIO)
        row["onnxsim_s"] = time.perf_counter() - start
        row["onnxsim_params"] = count_params(ModelGraph(theirs))
        row["onnxsim_reach"] = reach(theirs, w_before, fam == "transformer")
        row["onnxsim_runs"] = runs(theirs, inputs)
    except Exception as exc:
        row["onnxsim_s"] = time.perf_counter() - start
        row["onnxsim_reach"] = 0.0
        row["onnxsim_runs"] = False
        row["onnxsim_error"] = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="zoo names (default: all)")
    parser.add_argument("--json", help="also write the rows as JSON")
    parser.add_argument("--out", help="also write the tables as text, at full width")
    parser.add_argument("--from-json", help="print the tables of rows saved with --json (measures nothing)")
    args = parser.parse_args()
    console = Console()
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
    else:
        import onnxruntime as ort

        ort.set_default_logger_severity(4)  # a pruned model that fails to run is a table cell, not a log line
        rows = []
        from rich.progress import track

        for name in track(args.only or list(zoo.ZOO), description="pruning the zoo", console=console,
                          transient=True):
            try:
                rows.append(measure(name))
            except zoo.ZooError as exc:
                console.print(f"[yellow]skip {name}: {exc}")
    render(rows, console)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            render(rows, Console(file=f, width=200, no_color=True))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


def render(rows: list[dict], console: Console) -> None:
    """The coverage table, the summary line and the what-stays-whole table of `rows`."""
    table = Table(title=f"coverage at {RATIO:.0%}: reach = (weights removed / weights) / {RATIO}")
    for col in ("model", "family", "params", "ours reach", "ours runs", "ours s", "onnxsim reach",
                "onnxsim runs", "onnxsim s", "ours >= onnxsim"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("model", "family") else "right", no_wrap=True)
    for r in rows:
        theirs = r.get("onnxsim_reach")
        table.add_row(
            r["model"], r["family"], f"{r['params'] / 1e6:.2f}M", f"{r['ours_reach']:.2f}",
            "yes" if r["ours_runs"] else "[red]NO", f"{r['ours_s']:.2f}",
            "-" if theirs is None else f"{theirs:.2f}",
            "-" if theirs is None else ("yes" if r.get("onnxsim_runs") else "[red]no"),
            "-" if theirs is None else f"{r.get('onnxsim_s', 0):.2f}",
            "-" if theirs is None else ("yes" if r["ours_reach"] >= theirs - 1e-9 else "[red]NO"),
        )
    console.print(table)
    targets = {"cnn": 0.9, "ocr": 0.9, "transformer": 0.8}
    ok_runs = sum(r["ours_runs"] for r in rows)
    ok_reach = sum(r["ours_reach"] >= targets.get(r["family"], 0.9) for r in rows)
    beats = sum(r.get("onnxsim_reach") is None or r["ours_reach"] >= r["onnxsim_reach"] - 1e-9 for r in rows)
    console.print(
        f"runs: {ok_runs}/{len(rows)}  reach target met (cnn/ocr >= 0.9, transformer >= 0.8): "
        f"{ok_reach}/{len(rows)}  reach >= onnxsim: {beats}/{len(rows)}"
    )
    # One row per model and reason (node names go to an examples column): a model with 40 run-time slices
    # reads as one line, and the reasons are what the rules have to learn next.
    table = Table(title="what stays whole, per model and reason (barrier ops; weight axes no group can shrink)")
    for col in ("model", "kind", "reason", "count", "examples"):
        table.add_column(col)
    count = 0
    for r in rows:
        by_reason: dict[str, list[str]] = {}
        for b in r["barriers"]:
            by_reason.setdefault(f"{b['op_type']}: {b['reason']}", []).append(b["node"] or "(unnamed)")
        for reason, nodes in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            table.add_row(r["model"], "barrier", reason, str(len(nodes)), ", ".join(nodes[:3]))
            count += 1
        for f in r.get("frozen_weights", []):
            table.add_row(r["model"], "weights", f["reason"], str(f["count"]), ", ".join(f["examples"][:3]))
            count += 1
    if count:
        console.print(table)
    else:
        console.print("barriers and frozen weights across the zoo: none")


if __name__ == "__main__":
    sys.exit(main())
