"""External data: lazy (memory-mapped) loading, byte-identical round trips, refusal of escaping paths,
pruning with dead-channel equivalence, and the metadata every output carries."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models.testmodels import TEST_MODELS
from onnxprune import external
from onnxprune.channels import analyze
from onnxprune.cli import main
from onnxprune.errors import ModelError
from onnxprune.graph import ModelGraph
from onnxprune.importer import import_model
from onnxprune.io import save_model
from onnxprune.verify import dead_channel_check, max_rel_error, random_inputs, run


def _save_external(model: onnx.ModelProto, path: Path, one_file: bool = True) -> Path:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save_model moves the tensors of the proto it is given out to files
    onnx.save_model(
        copy, str(path), save_as_external_data=True, all_tensors_to_one_file=one_file,
        location=f"{path.name}.data" if one_file else None, size_threshold=256,
    )  # fmt: skip
    return path


def _tensors(path: Path) -> dict[str, bytes]:
    m = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t).tobytes() for t in m.graph.initializer}


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("one_file", [True, False])
def test_import_is_lazy_and_values_match(tmp_path, one_file):
    model = TEST_MODELS["residual"]()
    path = _save_external(model, tmp_path / "m.onnx", one_file)
    if not one_file:
        assert len(list(tmp_path.iterdir())) > 3  # one file per tensor
    loaded = import_model(path)
    lazy = [t for t in loaded.graph.initializer if external.is_lazy(t)]
    assert lazy, "large external tensors must stay on disk"
    graph = ModelGraph(loaded)
    expected = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for t in lazy:
        value = graph.const(t.name)
        assert isinstance(value, np.memmap)
        np.testing.assert_array_equal(value, expected[t.name])
    inputs = random_inputs(model, seed=3)
    assert max_rel_error(run(model, inputs), run(loaded, inputs)) == 0.0


@pytest.mark.parametrize("one_file", [True, False])
def test_ratio_zero_round_trip_is_byte_identical(tmp_path, one_file):
    src = _save_external(TEST_MODELS["residual"](), tmp_path / "m.onnx", one_file)
    before = _digest(tmp_path)
    out = tmp_path / "out" / "p.onnx"
    out.parent.mkdir()
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0"]) == 0
    assert _digest(tmp_path) == before  # input files untouched
    assert (out.parent / "p.onnx.data").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.onnx", "p.onnx.data"]
    assert _tensors(out) == _tensors(src)
    summary = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["onnxprune.summary"])
    assert summary["tool"].startswith("onnxprune ") and summary["channels_removed"] == 0


def test_prune_external_model_dead_channel_and_metadata(tmp_path):
    src = _save_external(TEST_MODELS["residual"](), tmp_path / "m.onnx")
    out = tmp_path / "p.onnx"
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.5", "--json"]) == 0
    pruned = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in pruned.graph.initializer)
    onnx.checker.check_model(str(out), full_check=True)
    summary = json.loads({p.key: p.value for p in pruned.metadata_props}["onnxprune.summary"])
    assert summary["channels_removed"] > 0 and summary["plan"]
    assert sum(summary["plan"].values()) == summary["channels_removed"]
    assert summary["config"]["ratio"] == 0.5
    # Dead-channel equivalence straight on the lazy model.
    model = import_model(src)
    analysis = analyze(ModelGraph(model))
    inputs = random_inputs(model, seed=1)
    for group in analysis.groups:
        assert dead_channel_check(analysis, group, inputs).error <= 1e-5


def test_save_forced_external_then_reload_lazy(tmp_path):
    model = TEST_MODELS["residual"]()
    path = save_model(model, tmp_path / "a.onnx", external_data=True)
    assert (tmp_path / "a.onnx.data").exists()
    again = import_model(path)
    assert external.has_lazy(again)
    second = save_model(again, tmp_path / "a.onnx")  # rewrite in place from its own lazy data
    assert second == path
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(
        ["a.onnx", *[p.name for p in tmp_path.iterdir() if p.name.startswith("a.onnx.") and p.name.endswith(".data")]]
    )
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(".data")]) == 1  # old data file removed
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert _tensors(path) == {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


def _with_location(tmp_path: Path, location: str, *, offset: int = 0, length: int | None = None) -> Path:
    model = TEST_MODELS["chain"]()
    path = _save_external(model, tmp_path / "m.onnx")
    m = onnx.load(str(path), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for e in t.external_data:
        if e.key == "location":
            e.value = location
        if e.key == "offset":
            e.value = str(offset)
        if e.key == "length" and length is not None:
            e.value = str(length)
    onnx.save_model(m, str(path))
    return path


@pytest.mark.parametrize(
    "location, message",
    [
        ("../../etc/passwd", "escapes"),
        ("/etc/passwd", "absolute"),
        ("sub/../../outside.bin", "escapes"),
        ("missing.bin", "missing"),
        ("", "absolute or empty"),
    ],
)
def test_hostile_external_locations_are_refused(tmp_path, location, message, capsys):
    path = _with_location(tmp_path, location)
    with pytest.raises(ModelError, match=message):
        import_model(path)
    assert main(["analyze", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err


def test_symlink_escaping_folder_is_refused(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\0" * 100000)
    inner = tmp_path / "inner"
    inner.mkdir()
    path = _with_location(inner, "link.bin")
    (inner / "link.bin").symlink_to(outside)
    with pytest.raises(ModelError, match="escapes"):
        import_model(path)


def test_range_past_end_is_refused(tmp_path):
    path = _with_location(tmp_path, "m.onnx.data", offset=10**9)
    with pytest.raises(ModelError, match="past the end"):
        import_model(path)


def test_output_onto_input_data_file_is_refused(tmp_path, capsys):
    src = _save_external(TEST_MODELS["residual"](), tmp_path / "m.onnx")
    before = _digest(tmp_path)
    assert main(["prune", str(src), "-o", str(tmp_path / "m.onnx.data")]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert _digest(tmp_path) == before


def test_in_memory_model_over_the_limit_is_written_with_external_data(tmp_path, monkeypatch):
    from onnxprune import io

    model = TEST_MODELS["residual"]()
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 50_000)  # stand-in for 2 GB: the model is 176 kB
    path = save_model(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    header = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    assert _tensors(path) == {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 2**31 - 1)
    small = save_model(model, tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists() and _tensors(small) == _tensors(path)
