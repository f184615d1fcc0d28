"""Atomic outputs: a process killed (SIGKILL) while writing leaves the destination absent or intact, and
nothing but recognisable ``.NAME.*.tmp`` debris; ordinary failures leave no debris at all."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import pytest

from models.testmodels import TEST_MODELS
from onnxprune.errors import OnnxPruneError
from onnxprune.importer import import_model
from onnxprune.io import save_model

ROOT = Path(__file__).resolve().parents[1]
TEMP = re.compile(r"^\..+\.tmp$")

# The child saves a model; `stall` pauses it at a chosen point of the write so the kill lands there.
CHILD = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {root!r})
    import onnx
    from onnxprune import io
    from onnxprune.importer import import_model
    src, dst, where, external = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    model = import_model(src)

    def stall():
        print("stalled", flush=True)
        time.sleep(60)

    if where == "proto":  # half of the model proto written to the temp file
        def half(m, path):
            data = m.SerializeToString()
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2]); f.flush()
            stall()
        io._write_proto = half
    elif where == "data":  # in the middle of streaming the external data file
        real = io.ext.copy_range
        def slow(*args, **kw):
            real(*args, **kw); stall()
        io.ext.copy_range = slow
    elif where == "rename":  # data file renamed into place, model not yet
        real_replace = os.replace
        def replace(a, b):
            if str(b) == dst:
                stall()
            real_replace(a, b)
        io.os.replace = replace
    io.save_model(model, dst, external_data=external)
    print("done", flush=True)
    """
)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def _kill_mid_write(src: Path, dst: Path, where: str, external: bool) -> None:
    script = CHILD.format(root=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(src), str(dst), where, "1" if external else "0"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline().strip()
        assert line == "stalled", f"child did not reach the write ({line!r}, rc={proc.poll()})"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _source(tmp_path: Path, external: bool) -> Path:
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    return save_model(TEST_MODELS["residual"](), src_dir / "in.onnx", external_data=external)


@pytest.mark.parametrize(
    "where, external", [("proto", False), ("proto", True), ("data", True), ("rename", True)]
)
@pytest.mark.parametrize("existing", [False, True])
def test_kill_mid_write_leaves_destination_absent_or_intact(tmp_path, where, external, existing):
    src = _source(tmp_path, external)
    src_before = _digest(src.parent)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "model.onnx"
    if existing:
        save_model(TEST_MODELS["chain"](), dst, external_data=external)
    before = _digest(out_dir)
    _kill_mid_write(src, dst, where, external)
    after = _digest(out_dir)
    debris = set(after) - set(before)
    # A kill cannot clean up: whatever it left is recognisable temp debris (or an orphan data file
    # under a fresh name that no model refers to), and every file that was there is unchanged.
    for name in debris:
        assert TEMP.match(name) or (where == "rename" and name.startswith("model.onnx.")), name
    assert {k: after[k] for k in before} == before
    if existing:
        # The old destination still loads with its old data.
        onnx.checker.check_model(str(dst), full_check=True)
        import_model(dst)
    else:
        assert not dst.exists()
    assert _digest(src.parent) == src_before


def test_failure_during_write_cleans_up(tmp_path, monkeypatch):
    from onnxprune import io

    dst = tmp_path / "model.onnx"
    save_model(TEST_MODELS["chain"](), dst)
    before = _digest(tmp_path)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "_write_proto", boom)
    with pytest.raises(OnnxPruneError, match="No space left"):
        save_model(TEST_MODELS["residual"](), dst, external_data=True)
    assert _digest(tmp_path) == before  # no temp files, destination intact


def test_real_kill_at_random_moments(tmp_path):
    """No stalls: kill a real save of a ~100 MB model at several moments."""
    import numpy as np
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.ones((5000, 5000), np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", 1, [1, 5000])],
        [helper.make_tensor_value_info("y", 1, [1, 5000])], [w],
    )  # fmt: skip
    src = tmp_path / "src" / "big.onnx"
    src.parent.mkdir()
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    script = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from onnxprune.cli import main; sys.exit(main(sys.argv[1:]))"
    for delay in (0.3, 0.6, 0.9, 1.2):
        dst = out_dir / f"m{delay}.onnx"
        proc = subprocess.Popen([sys.executable, "-c", script, "prune", str(src), "-o", str(dst), "--ratio", "0"])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if dst.exists():  # finished before the kill: then it must be complete
            onnx.checker.check_model(str(dst))
    for p in out_dir.iterdir():
        assert TEMP.match(p.name) or p.suffix == ".onnx", p.name
