"""Fuzzing the importer, analysis and CLI: hostile inputs must end in success or a one-line error.

Start at `make_case(seed, bases)`: a seed picks a base model (`base_models`: the callers' seed models,
e.g. the seeded test models and the bundled Fashion-MNIST CNN of a checkout) and either byte-level
mutations of its serialisation or one to three *hostile edits* of its proto (`fuzz_mutations.HOSTILE`:
cycles, dangling inputs, duplicate names, wrong-rank weights, zero-size and huge dims, unknown domains,
If/Loop/Scan subgraphs, missing or escaping external data, …). A `Case` is a set of files for an input
folder plus the CLI arguments.

`run_case(case, root, main)` lays the case out in a sandbox (``root/in`` input, ``root/out`` output,
``root/cwd`` working directory), runs the CLI entry point `main` (``onnxprune.cli.main``, passed in by
the caller so this module stays below the CLI) in-process capturing stdout/stderr, and
classifies the outcome (`Outcome`): a traceback or an ``internal error`` line is a crash; more than one
stderr line is a crash; a new or changed file anywhere but the output path, or a changed input, is a
violation. `FuzzRunner` runs cases in worker processes with a per-case time limit (a case over it is a
*hang*; its worker is replaced) and an address-space limit (runaway allocations become `MemoryError`,
which the CLI reports in one line).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxprune.fuzz_mutations import HOSTILE, mutate_bytes, pick

# The CLI's entry point: arguments in, exit status out.
Main = Callable[[list[str]], int]

# --------------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    """Input files (relative path -> bytes; a value None means a symlink to ``target``) and CLI args."""

    name: str
    files: dict[str, bytes]
    args: list[str]
    links: dict[str, str] = field(default_factory=dict)  # relative path -> absolute symlink target
    model: str = "model.onnx"


def base_models(builders: Mapping[str, Callable[[], onnx.ModelProto]], files: Iterable[Path] = ()) -> dict[str, bytes]:
    """Serialised seed models: each builder's model under its name, each existing model file under its stem.

    The seeds come from the caller (``models.testmodels.TEST_MODELS`` and ``models/fashion_mnist_cnn.onnx``
    exist only in a checkout, not in the installed package).
    """
    out = {name: build().SerializeToString() for name, build in sorted(builders.items())}
    for path in files:
        if path.exists():
            out[path.stem] = path.read_bytes()
    return out


def make_case(seed: int, bases: dict[str, bytes]) -> Case:
    """A deterministic case from a seed: base model, mutation kind and CLI arguments."""
    rng = np.random.default_rng([seed, 1729])
    base_name = pick(rng, sorted(bases))
    data = bases[base_name]
    files: dict[str, bytes] = {}
    roll = rng.random()
    if roll < 0.3:
        kinds = ["bytes"]
        files["model.onnx"] = mutate_bytes(data, rng)
    else:
        m = onnx.ModelProto()
        m.ParseFromString(data)
        kinds = [] if roll < 0.36 else [pick(rng, sorted(HOSTILE)) for _ in range(int(rng.integers(1, 4)))]
        for kind in kinds:
            HOSTILE[kind](m, rng, files)
        files["model.onnx"] = m.SerializeToString()
    links = {}
    for key in [k for k in files if k.startswith("__link__:")]:
        links[key.split(":", 1)[1]] = files.pop(key).decode()
    command = pick(rng, ["analyze", "prune", "prune", "prune", "default"])
    args: list[str]
    if command == "analyze":
        args = ["analyze", "{model}"] + (["--json"] if rng.random() < 0.5 else [])
    else:
        args = (["prune"] if command == "prune" else []) + ["{model}", "-o", "{out}"]
        args += ["--ratio", str(pick(rng, ["0", "0.3", "0.5", "0.9"]))]
        if rng.random() < 0.3:
            args.append("--global")
        if rng.random() < 0.2:
            args += ["--round-to", str(pick(rng, [2, 8]))]
        if rng.random() < 0.5:
            args.append("--json")
    return Case(f"{seed}:{base_name}:{'+'.join(kinds) or 'clean'}", files, args, links)


# --------------------------------------------------------------------------------------------------
# Running one case


@dataclass
class Outcome:
    name: str
    status: str  # ok | error | crash | hang | violation
    detail: str = ""
    seconds: float = 0.0


def _snapshot(root: Path, skip: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if skip in p.parents or p == skip:
            continue
        if p.is_symlink():
            out[str(p.relative_to(root))] = "link:" + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(root))] = "dir"
    return out


def layout(case: Case, root: Path) -> tuple[Path, Path]:
    """Write the case into `root`: returns (model path, output path)."""
    for sub in ("in", "out", "cwd"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for rel, data in case.files.items():
        (root / "in" / rel).write_bytes(data)
    for rel, target in case.links.items():
        (root / "in" / rel).symlink_to(target)
    return root / "in" / case.model, root / "out" / "pruned.onnx"


def run_case(case: Case, root: Path, main: Main) -> Outcome:
    """Run one case in this process through the CLI entry point `main` (see the module docstring for the
    classification)."""
    model, out = layout(case, root)
    args = [a.format(model=model, out=out) for a in case.args]
    out_dir = root / "out"
    before = _snapshot(root, out_dir)
    stdout, stderr = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    cwd = os.getcwd()
    try:
        os.chdir(root / "cwd")
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(args)
            except SystemExit as exc:  # argparse's --help/--version paths
                code = exc.code if isinstance(exc.code, int) else 1
    except Exception:
        return Outcome(case.name, "crash", traceback.format_exc(limit=8), time.perf_counter() - start)
    finally:
        os.chdir(cwd)
    seconds = time.perf_counter() - start
    err = stderr.getvalue()
    lines = [line for line in err.splitlines() if line.strip()]
    if "Traceback" in err or "internal error" in err or len(lines) > 1:
        return Outcome(case.name, "crash", err.strip()[:2000], seconds)
    after = _snapshot(root, out_dir)
    if after != before:
        changed = sorted(set(after.items()) ^ set(before.items()))
        return Outcome(case.name, "violation", f"files outside the output changed: {changed[:5]}", seconds)
    produced = sorted(p.name for p in out_dir.iterdir())
    allowed = {out.name} | {p for p in produced if p.startswith(out.name + ".") and p.endswith(".data")}
    if set(produced) - allowed:
        return Outcome(case.name, "violation", f"unexpected files in the output folder: {produced}", seconds)
    if code != 0:
        if len(lines) != 1 or not lines[0].startswith("onnxprune: "):
            return Outcome(case.name, "crash", f"exit {code} without a one-line error: {err[:500]!r}", seconds)
        if produced:
            return Outcome(case.name, "violation", f"failed run left output files {produced}", seconds)
        return Outcome(case.name, "error", lines[0][:300], seconds)
    if "{out}" in case.args:
        if not out.exists():
            return Outcome(case.name, "violation", "success without an output file", seconds)
        try:
            onnx.checker.check_model(str(out))
            written = onnx.load(str(out), load_external_data=False)
            if not any(p.key == "onnxprune.summary" for p in written.metadata_props):
                return Outcome(case.name, "violation", "output lacks onnxprune.summary metadata", seconds)
        except Exception as exc:
            return Outcome(case.name, "violation", f"output does not pass the checker: {exc}"[:300], seconds)
    return Outcome(case.name, "ok", "", seconds)


# --------------------------------------------------------------------------------------------------
# Running many cases in worker processes with time and memory limits


def _worker(conn, memory_limit: int, main: Main) -> None:
    import resource
    import tempfile

    if memory_limit:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        case = msg
        root = Path(tempfile.mkdtemp(prefix="onnxprune-fuzz-"))
        try:
            outcome = run_case(case, root, main)
        except MemoryError:
            outcome = Outcome(case.name, "crash", "MemoryError escaped the CLI")
        finally:
            shutil.rmtree(root, ignore_errors=True)
        conn.send(outcome)


class FuzzRunner:
    """Runs cases through the CLI entry point `main` (a module-level function: it is pickled by name into
    `workers` spawned processes); a case over `timeout` seconds is a hang."""

    def __init__(self, main: Main, workers: int = 2, timeout: float = 30.0, memory_limit: int = 6 << 30) -> None:
        self.main = main
        self.ctx = mp.get_context("spawn")
        self.timeout = timeout
        self.memory_limit = memory_limit
        self.slots = [self._start() for _ in range(workers)]

    def _start(self):
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(child, self.memory_limit, self.main), daemon=True)
        proc.start()
        return [proc, parent, None, 0.0]  # process, pipe, running case, started at

    def run(self, cases, progress=None) -> list[Outcome]:
        pending = list(cases)[::-1]
        results: list[Outcome] = []
        while pending or any(slot[2] is not None for slot in self.slots):
            for slot in self.slots:
                proc, conn, case, started = slot
                if case is None and pending:
                    slot[2], slot[3] = pending.pop(), time.perf_counter()
                    conn.send(slot[2])
                    continue
                if case is None:
                    continue
                if conn.poll(0.01):
                    try:
                        results.append(conn.recv())
                    except EOFError:
                        results.append(Outcome(case.name, "crash", f"worker died (exit {proc.exitcode})"))
                        self._replace(slot)
                    slot[2] = None
                elif not proc.is_alive():
                    results.append(Outcome(case.name, "crash", f"worker died (exit {proc.exitcode})"))
                    self._replace(slot)
                    slot[2] = None
                elif time.perf_counter() - started > self.timeout:
                    results.append(Outcome(case.name, "hang", f"over {self.timeout:.0f} s", self.timeout))
                    self._replace(slot)
                    slot[2] = None
                else:
                    continue
                if progress:
                    progress(results[-1])
        return results

    def _replace(self, slot) -> None:
        proc = slot[0]
        if proc.is_alive():
            proc.kill()
        proc.join()
        slot[0], slot[1], _, _ = self._start()

    def close(self) -> None:
        for proc, conn, _, _ in self.slots:
            with contextlib.suppress(Exception):
                conn.send(None)
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()


def summarize(results: list[Outcome]) -> dict[str, int]:
    counts = {"cases": len(results), "ok": 0, "error": 0, "crash": 0, "hang": 0, "violation": 0}
    for r in results:
        counts[r.status] += 1
    return counts


def save_crasher(case: Case, corpus: Path) -> Path:
    """Store a crashing case as a regression file set under `corpus/<hash>/`."""
    digest = hashlib.sha256(json.dumps([case.args, sorted(case.files)]).encode() + b"".join(
        case.files[k] for k in sorted(case.files))).hexdigest()[:12]  # fmt: skip
    folder = corpus / digest
    folder.mkdir(parents=True, exist_ok=True)
    for rel, data in case.files.items():
        (folder / rel).write_bytes(data)
    (folder / "case.json").write_text(json.dumps({"name": case.name, "args": case.args, "links": case.links}))
    return folder
