"""Fuzzing the importer, analysis and CLI: hostile inputs must end in success or a one-line error.

Start at `make_case(seed)`: a seed picks a base model (the seeded test models and the bundled
Fashion-MNIST CNN, given as bytes by the caller) and either byte-level mutations of its serialisation
or one to three *hostile edits* of its proto (`HOSTILE`: cycles, dangling inputs, duplicate names,
wrong-rank weights, zero-size and huge dims, unknown domains, If/Loop/Scan subgraphs, missing or
escaping external data, …). A `Case` is a set of files for an input folder plus the CLI arguments.

`run_case(case, root)` lays the case out in a sandbox (``root/in`` input, ``root/out`` output,
``root/cwd`` working directory), runs ``onnxprune.cli.main`` in-process capturing stdout/stderr, and
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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


def base_models() -> dict[str, bytes]:
    """Serialised seeded test models and the bundled real model."""
    from models.testmodels import TEST_MODELS

    out = {name: build().SerializeToString() for name, build in sorted(TEST_MODELS.items())}
    real = Path(__file__).resolve().parents[1] / "models" / "fashion_mnist_cnn.onnx"
    if real.exists():
        out["fashion_mnist_cnn"] = real.read_bytes()
    return out


def mutate_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    """One to eight byte-level edits: flips, overwrites, truncation, insertions, duplicated chunks."""
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        if not buf:
            break
        kind = int(rng.integers(0, 7))
        pos = int(rng.integers(0, len(buf)))
        if kind == 0:
            buf[pos] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            buf[pos] = int(rng.integers(0, 256))
        elif kind == 2:
            del buf[pos:]
        elif kind == 3:
            buf[pos:pos] = bytes(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8))
        elif kind == 4:
            end = min(len(buf), pos + int(rng.integers(1, 64)))
            buf[pos:pos] = buf[pos:end]
        elif kind == 5:
            end = min(len(buf), pos + int(rng.integers(1, 32)))
            buf[pos:end] = b"\xff" * (end - pos)  # varints that never end / huge lengths
        else:
            end = min(len(buf), pos + int(rng.integers(1, 256)))
            del buf[pos:end]
    return bytes(buf)


def _pick(rng, seq):
    return seq[int(rng.integers(0, len(seq)))]


def _node(m: onnx.ModelProto, rng) -> onnx.NodeProto | None:
    return _pick(rng, m.graph.node) if len(m.graph.node) else None


def _init(m: onnx.ModelProto, rng) -> onnx.TensorProto | None:
    return _pick(rng, m.graph.initializer) if len(m.graph.initializer) else None


def h_cycle(m, rng, files):
    nodes = m.graph.node
    if len(nodes) >= 2:
        i = int(rng.integers(0, len(nodes) - 1))
        j = int(rng.integers(i, len(nodes)))
        if nodes[i].input and nodes[j].output:
            nodes[i].input[0] = nodes[j].output[0]


def h_dangling(m, rng, files):
    n = _node(m, rng)
    if n is not None and n.input:
        n.input[int(rng.integers(0, len(n.input)))] = "does_not_exist"


def h_duplicate_output(m, rng, files):
    if len(m.graph.node) >= 2:
        a, b = _pick(rng, m.graph.node), _pick(rng, m.graph.node)
        if a.output and b.output:
            b.output[0] = a.output[0]


def h_duplicate_node_name(m, rng, files):
    for n in m.graph.node:
        n.name = "same"


def h_duplicate_initializer(m, rng, files):
    t = _init(m, rng)
    if t is not None:
        dup = m.graph.initializer.add()
        dup.CopyFrom(t)
        dup.dims[:] = list(dup.dims)[::-1] or [1]


def h_duplicate_input(m, rng, files):
    if m.graph.input:
        m.graph.input.add().CopyFrom(m.graph.input[0])


def h_wrong_rank(m, rng, files):
    t = _init(m, rng)
    if t is not None:
        dims = list(t.dims)
        t.dims[:] = [int(np.prod(dims))] if len(dims) != 1 else [1, dims[0]] if dims else [1]


def h_zero_dim_weight(m, rng, files):
    t = _init(m, rng)
    if t is not None and t.dims:
        t.dims[int(rng.integers(0, len(t.dims)))] = 0
        t.ClearField("raw_data")
        for f in ("float_data", "int64_data", "int32_data", "double_data"):
            t.ClearField(f)


def h_zero_dim_input(m, rng, files):
    if m.graph.input:
        dims = m.graph.input[0].type.tensor_type.shape.dim
        if dims:
            dims[int(rng.integers(0, len(dims)))].dim_value = 0


def h_huge_input_dim(m, rng, files):
    if m.graph.input:
        dims = m.graph.input[0].type.tensor_type.shape.dim
        if dims:
            dims[int(rng.integers(0, len(dims)))].dim_value = int(_pick(rng, [2**31, 2**40, 2**62]))


def h_huge_init_dims(m, rng, files):
    t = _init(m, rng)
    if t is not None:
        t.dims[:] = [2**31, 2**31][: max(1, len(t.dims))]


def h_negative_dim(m, rng, files):
    t = _init(m, rng)
    if t is not None and t.dims:
        t.dims[0] = -3


def h_unknown_domain(m, rng, files):
    n = _node(m, rng)
    if n is not None:
        n.domain = "com.example.evil"
        if rng.random() < 0.5:
            m.opset_import.add(domain="com.example.evil", version=1)


def h_unknown_op(m, rng, files):
    n = _node(m, rng)
    if n is not None:
        n.op_type = _pick(rng, ["NotAnOp", "Conv", "MatMul", "Reshape", "Add", "Softmax", "Gather", ""])


def h_bad_attribute(m, rng, files):
    n = _node(m, rng)
    if n is not None:
        if n.attribute:
            a = _pick(rng, n.attribute)
            value = _pick(rng, [1.5, "text", [-1, -1], 10**9, -7])
            name = a.name
            n.attribute.remove(a)
            n.attribute.append(helper.make_attribute(name, value))
        else:
            n.attribute.append(helper.make_attribute("axis", int(rng.integers(-9, 9))))


def h_bad_dtype(m, rng, files):
    t = _init(m, rng)
    if t is not None:
        t.data_type = int(_pick(rng, [0, TensorProto.STRING, TensorProto.INT4, TensorProto.DOUBLE, 999]))


def h_string_weight(m, rng, files):
    t = _init(m, rng)
    if t is not None:
        new = helper.make_tensor(t.name, TensorProto.STRING, [2], [b"a", b"b"])
        t.CopyFrom(new)


def h_opset(m, rng, files):
    version = int(_pick(rng, [1, 6, 99, 0]))
    del m.opset_import[:]
    if version:
        m.opset_import.add(domain="", version=version)


def h_ir_version(m, rng, files):
    m.ir_version = int(_pick(rng, [0, 1, 3, 99]))


def h_no_outputs(m, rng, files):
    del m.graph.output[:]


def h_output_not_produced(m, rng, files):
    if m.graph.output:
        m.graph.output[0].name = "nobody_makes_this"


def h_empty_graph(m, rng, files):
    del m.graph.node[:]


def h_shuffle_nodes(m, rng, files):
    nodes = list(m.graph.node)
    order = rng.permutation(len(nodes))
    del m.graph.node[:]
    m.graph.node.extend(nodes[i] for i in order)


def h_wrong_weight_values(m, rng, files):
    t = _init(m, rng)
    if t is not None and t.data_type == TensorProto.FLOAT and t.raw_data:
        arr = np.frombuffer(t.raw_data, np.float32).copy()
        arr[:] = _pick(rng, [np.nan, np.inf, 0.0, -0.0, 1e38])
        t.raw_data = arr.tobytes()


def h_truncated_weight(m, rng, files):
    t = _init(m, rng)
    if t is not None and t.raw_data:
        t.raw_data = t.raw_data[: len(t.raw_data) // 2]


def _subgraph_of(m: onnx.ModelProto, rng, kind: str) -> None:
    """Move a slice of the main graph into an If/Loop/Scan body that reads outer-scope tensors."""
    g = m.graph
    if not g.node or not g.input:
        return
    x = g.input[0].name
    body_out = "sub_out"
    inner = helper.make_node("Identity", [x], [body_out], name="inner_identity")
    if kind == "If":
        cond = numpy_helper.from_array(np.array(True), "fuzz_cond")
        g.initializer.append(cond)
        branch = helper.make_graph([inner], "branch", [], [helper.make_tensor_value_info(body_out, 1, None)])
        node = helper.make_node("If", ["fuzz_cond"], ["if_out"], then_branch=branch, else_branch=branch)
        produced = "if_out"
    elif kind == "Loop":
        g.initializer.append(numpy_helper.from_array(np.array(2, np.int64), "fuzz_trip"))
        g.initializer.append(numpy_helper.from_array(np.array(True), "fuzz_cond"))
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", x], ["v_out"])],
            "body",
            [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
             helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v_in", 1, None)],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v_out", 1, None)],
        )  # fmt: skip
        node = helper.make_node("Loop", ["fuzz_trip", "fuzz_cond", x], ["if_out"], body=body)
        produced = "if_out"
    else:
        body = helper.make_graph(
            [helper.make_node("Identity", ["s_in"], ["s_out"])], "scan_body",
            [helper.make_tensor_value_info("s_in", 1, None)], [helper.make_tensor_value_info("s_out", 1, None)],
        )  # fmt: skip
        node = helper.make_node("Scan", [x], ["if_out"], body=body, num_scan_inputs=1)
        produced = "if_out"
    # Feed the subgraph result into the first consumer of x.
    for n in g.node:
        for k, name in enumerate(n.input):
            if name == x:
                n.input[k] = produced
                g.node.insert(0, node)
                return


def h_if(m, rng, files):
    _subgraph_of(m, rng, "If")


def h_loop(m, rng, files):
    _subgraph_of(m, rng, "Loop")


def h_scan(m, rng, files):
    _subgraph_of(m, rng, "Scan")


def _externalize(m: onnx.ModelProto, files: dict[str, bytes], location: str = "model.onnx.data") -> list:
    """Move every initializer over 256 bytes into `files[location]`; returns the moved tensors."""
    blob = bytearray()
    moved = []
    for t in m.graph.initializer:
        if t.raw_data and len(t.raw_data) > 256:
            offset = len(blob)
            blob += t.raw_data
            length = len(t.raw_data)
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
                t.external_data.add(key=k, value=v)
            moved.append(t)
    files[location] = bytes(blob)
    return moved


def _set_location(t, value):
    for e in t.external_data:
        if e.key == "location":
            e.value = value


def h_external_ok(m, rng, files):
    _externalize(m, files)


def h_external_missing(m, rng, files):
    _externalize(m, files)
    files.pop("model.onnx.data", None)


def h_external_escape(m, rng, files):
    moved = _externalize(m, files)
    if moved:
        _set_location(_pick(rng, moved), _pick(rng, ["../../etc/passwd", "/etc/passwd", "../outside.bin",
                                                      "sub/../../../x", "C:\\\\evil", "//etc/shadow"]))


def h_external_symlink(m, rng, files):
    moved = _externalize(m, files)
    if moved:
        _set_location(_pick(rng, moved), "link.bin")
        files["__link__:link.bin"] = b"/etc/passwd"


def h_external_bad_range(m, rng, files):
    moved = _externalize(m, files)
    if moved:
        t = _pick(rng, moved)
        for e in t.external_data:
            if e.key == _pick(rng, ["offset", "length"]):
                e.value = _pick(rng, ["-5", "99999999999", "abc", "0", ""])


def h_external_truncated(m, rng, files):
    _externalize(m, files)
    data = files.get("model.onnx.data", b"")
    files["model.onnx.data"] = data[: len(data) // 3]


HOSTILE = {
    name.removeprefix("h_"): fn for name, fn in sorted(globals().items()) if name.startswith("h_") and callable(fn)
}


def make_case(seed: int, bases: dict[str, bytes]) -> Case:
    """A deterministic case from a seed: base model, mutation kind and CLI arguments."""
    rng = np.random.default_rng([seed, 1729])
    base_name = _pick(rng, sorted(bases))
    data = bases[base_name]
    files: dict[str, bytes] = {}
    roll = rng.random()
    if roll < 0.3:
        kinds = ["bytes"]
        files["model.onnx"] = mutate_bytes(data, rng)
    else:
        m = onnx.ModelProto()
        m.ParseFromString(data)
        kinds = [] if roll < 0.36 else [_pick(rng, sorted(HOSTILE)) for _ in range(int(rng.integers(1, 4)))]
        for kind in kinds:
            HOSTILE[kind](m, rng, files)
        files["model.onnx"] = m.SerializeToString()
    links = {}
    for key in [k for k in files if k.startswith("__link__:")]:
        links[key.split(":", 1)[1]] = files.pop(key).decode()
    command = _pick(rng, ["analyze", "prune", "prune", "prune", "default"])
    args: list[str]
    if command == "analyze":
        args = ["analyze", "{model}"] + (["--json"] if rng.random() < 0.5 else [])
    else:
        args = (["prune"] if command == "prune" else []) + ["{model}", "-o", "{out}"]
        args += ["--ratio", str(_pick(rng, ["0", "0.3", "0.5", "0.9"]))]
        if rng.random() < 0.3:
            args.append("--global")
        if rng.random() < 0.2:
            args += ["--round-to", str(_pick(rng, [2, 8]))]
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


def run_case(case: Case, root: Path) -> Outcome:
    """Run one case in this process (see the module docstring for the classification)."""
    from onnxprune.cli import main

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


def _worker(conn, memory_limit: int) -> None:
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
            outcome = run_case(case, root)
        except MemoryError:
            outcome = Outcome(case.name, "crash", "MemoryError escaped the CLI")
        finally:
            shutil.rmtree(root, ignore_errors=True)
        conn.send(outcome)


class FuzzRunner:
    """Runs cases in `workers` spawned processes; a case over `timeout` seconds is a hang."""

    def __init__(self, workers: int = 2, timeout: float = 30.0, memory_limit: int = 6 << 30) -> None:
        self.ctx = mp.get_context("spawn")
        self.timeout = timeout
        self.memory_limit = memory_limit
        self.slots = [self._start() for _ in range(workers)]

    def _start(self):
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(child, self.memory_limit), daemon=True)
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
