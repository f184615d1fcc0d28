"""``onnxprune compile`` and ``onnxprune run``: registered on the main CLI's subparsers by :func:`register`.

    onnxprune compile MODEL.onnx --target x86|arm|wasm|cuda|<device tag> [-o BUNDLE] [--tune N]
                      [--shape name=d1,d2,...] [--sparse auto|off|force]
    onnxprune run BUNDLE --inputs in.npz [-o out.npz] [--repeat N]

Problems are raised as the typed errors of :mod:`onnxprune.errors`; the main CLI prints one line. The main CLI
builds its parser on every start (``onnxprune --version`` too), so registering imports nothing heavy: numpy,
onnx and tvm are imported by the command functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxprune.cli_options import non_negative_int
from onnxprune.errors import ModelError, OnnxPruneError, UsageError

from .table import TARGETS

if TYPE_CHECKING:
    import numpy as np

__all__ = ["parse_shapes", "register"]


def parse_shapes(items: list[str] | None) -> dict[str, tuple[int, ...]]:
    """``["image=1,1,28,28", …]`` -> ``{"image": (1, 1, 28, 28)}``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items or []:
        name, sep, dims = item.rpartition("=")
        if not sep or not name:
            raise UsageError(f"--shape expects name=d1,d2,..., got {item!r}")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            raise UsageError(f"--shape {name}: dims must be integers, got {dims!r}") from None
        if any(d < 0 for d in shape):
            raise UsageError(f"--shape {name}: dims must be >= 0")
        shapes[name] = shape
    return shapes


def cmd_compile(args: argparse.Namespace) -> int:
    """Compile a model into a bundle; print the bundle folder (or a JSON object with --json), and a one-line
    warning on stderr if some kernel got no schedule."""
    from . import compile_bundle, read_manifest

    bundle = compile_bundle(
        args.model, args.target, out_dir=args.output, tune=args.tune, shapes=parse_shapes(args.shape),
        sparse=args.sparse,
    )
    manifest = read_manifest(bundle, verify=False)
    _print_sparse(manifest)
    naive = manifest.get("unscheduled_kernels") or []
    if naive:  # never silent: such a kernel runs as a naive loop nest, 30-100x slower
        shown = ", ".join(naive[:5]) + (f" and {len(naive) - 5} more" if len(naive) > 5 else "")
        print(f"warning: {len(naive)} kernel(s) got no schedule and run as naive loop nests: {shown} "
              f"(see unscheduled_kernels in {bundle / 'manifest.json'})", file=sys.stderr)  # fmt: skip
    if getattr(args, "json", False):
        print(json.dumps({"bundle": str(bundle), "target": manifest["target"]["name"],
                          "compile_seconds": manifest["compile_seconds"]}))
    else:
        print(f"{bundle}  ({manifest['target']['name']}, {manifest['compile_seconds']:.1f} s)")
    return 0


def _print_sparse(manifest: dict) -> None:
    """One line on stderr when layers went sparse: how many, and how the weights file shrank."""
    sp = manifest.get("sparse") or {}
    n = sp.get("sparse_layer_count", 0)
    if not n:
        return
    dense, packed = sp.get("dense_weight_bytes_replaced", 0), sp.get("sparse_weight_bytes", 0)
    w = manifest.get("weights")
    total = f"; weights file {w['bytes'] / 1e6:.2f} MB" if isinstance(w, dict) else ""
    print(f"sparse: {n} of {len(sp.get('layers', []))} sparse-weight layer(s) run as sparse kernels; their "
          f"weights {dense / 1e6:.2f} MB -> {packed / 1e6:.2f} MB compressed{total}", file=sys.stderr)


def _load_npz(path: str) -> dict[str, np.ndarray]:
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: no such file")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise ModelError(f"{p}: not a readable .npz file ({type(e).__name__})") from None


def cmd_run(args: argparse.Namespace) -> int:
    """Run a bundle on this machine; write the outputs to an .npz file."""
    import numpy as np

    from onnxprune.io import write_atomically

    from . import run_bundle

    out = Path(args.output) if args.output else Path(args.bundle) / "outputs.npz"
    if not out.parent.is_dir():  # before the run, not after it
        raise OnnxPruneError(f"{out}: output folder does not exist")
    outputs = run_bundle(args.bundle, _load_npz(args.inputs), repeat=args.repeat)
    median = outputs.pop("__median_ms__", None)
    # through a file object: numpy appends ".npz" to a path without it, and the message would name another file
    arrays: dict[str, Any] = dict(outputs)  # (numpy's stubs read **kwargs as its allow_pickle flag)
    write_atomically(out, lambda f: np.savez(f, **arrays))
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in outputs.items())
    timing = ""
    if median is not None:
        timing = f"; median {float(median):.3f} ms"
        if _emulated(args.bundle):  # qemu-user's time says nothing about the device's
            timing += " (under an emulator: not the device's timing)"
    print(f"{out}: {shapes}{timing}")
    return 0


def _emulated(bundle: str) -> bool:
    """True when this machine runs the bundle under an emulator (arm bundles under qemu-user)."""
    from . import read_manifest
    from .table import get_target

    return get_target(read_manifest(Path(bundle), verify=False)["target"]["name"]).runner.kind == "qemu"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``compile`` and ``run`` subcommands to the main CLI."""
    names = ", ".join(t.name for t in TARGETS)
    p = subparsers.add_parser("compile", help="compile a model into a deployment bundle with TVM")
    p.add_argument("model", help="ONNX model")
    p.add_argument("--target", "-t", required=True, help=f"target or device tag: {names}")
    p.add_argument("-o", "--output", help="bundle folder (default: MODEL.<target> beside the model)")
    p.add_argument("--tune", type=int, default=0, metavar="N", help="MetaSchedule trials (default 0: no tuning)")
    p.add_argument("--shape", action="append", metavar="NAME=D1,D2,...", help="static shape for an input")
    p.add_argument("--sparse", choices=("auto", "off", "force"), default="auto",
                   help="sparse kernels for layers with sparse weights: auto (measured per layer, kept where "
                        "faster; default), off (all dense), force (every layer with zeros)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_compile)

    p = subparsers.add_parser("run", help="run a bundle on this machine (x86 native, arm qemu, wasm node)")
    p.add_argument("bundle", help="bundle folder")
    p.add_argument("--inputs", required=True, help=".npz with one array per model input")
    p.add_argument("-o", "--output", help="output .npz (default: BUNDLE/outputs.npz)")
    p.add_argument("--repeat", type=non_negative_int, default=0, metavar="N",
                   help="also time N runs, print the median")
    p.set_defaults(func=cmd_run)
