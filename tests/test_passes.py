"""Pass API: composition, the analysis cache, instruments, cleanup and normalisation passes, the README snippet.

The pruning passes (select, repair, remove, PrunePass) are tested in tests/test_prune_passes.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from models.testmodels import TEST_MODELS
from onnxprune import (
    AnalysisCache,
    AnalyzeChannelsPass,
    ChannelAnalysis,
    CheckPass,
    DeadCodeEliminationPass,
    DumpInstrument,
    Instrument,
    ModelError,
    NormalizePass,
    Pass,
    PassManager,
    PassResult,
    ProgressInstrument,
    PruneConfig,
    PrunePass,
    ShapeInferencePass,
    StampInstrument,
    Summary,
    TimingInstrument,
)
from onnxprune.external import BASE_KEY, has_lazy
from onnxprune.importer import load_model
from onnxprune.passmanager import analyses
from onnxprune.verify import max_rel_error, random_inputs, run, session

ROOT = Path(__file__).resolve().parents[1]


def test_pass_manager_composes_and_times(tmp_path):
    model = TEST_MODELS["concat"]()
    timing = TimingInstrument()
    pm = PassManager(
        [NormalizePass(), PrunePass(PruneConfig(ratio=0.5)), ShapeInferencePass(), CheckPass()],
        instruments=[timing, DumpInstrument(tmp_path / "dump")],
    )
    result = pm.run(model)
    assert result.modified
    assert [name for name, _ in timing.times] == ["NormalizePass", "PrunePass", "ShapeInferencePass", "CheckPass"]
    assert [r.modified for _, r in result.steps][1:] == [True, False, False]
    assert list((tmp_path / "dump").glob("*PrunePass.onnx"))
    assert result.info["summary"]["params_after"] < result.info["summary"]["params_before"]


def test_pass_manager_keeps_no_run_state():
    """A manager is its constructor's inputs only: two runs give the same steps, nothing is left behind."""
    pm = PassManager([NormalizePass(), ShapeInferencePass()])
    before = dict(vars(pm))
    first = pm.run(TEST_MODELS["chain"]())
    second = pm.run(TEST_MODELS["chain"]())
    assert vars(pm) == before
    assert [(n, r.modified) for n, r in first.steps] == [(n, r.modified) for n, r in second.steps]


def test_normalize_constants_to_initializers_is_exact():
    model = TEST_MODELS["constants_as_nodes"]()
    result = NormalizePass().run(model)
    assert result.modified
    inits = {t.name for t in result.model.graph.initializer}
    assert not any(n.op_type == "Constant" for n in result.model.graph.node)
    assert not any(n.op_type == "Identity" and n.input[0] in inits for n in result.model.graph.node)
    inputs = random_inputs(model)
    assert max_rel_error(run(model, inputs), run(result.model, inputs)) == 0.0
    # Idempotent: a second run changes nothing.
    assert NormalizePass().run(result.model).modified is False


def test_normalize_does_not_touch_input_proto():
    model = TEST_MODELS["constants_as_nodes"]()
    before = model.SerializeToString()
    NormalizePass().run(model)
    assert model.SerializeToString() == before


def test_normalize_inplace_gives_the_same_model_as_a_copy():
    copied = NormalizePass().run(TEST_MODELS["constants_as_nodes"]()).model
    owned = TEST_MODELS["constants_as_nodes"]()
    inplace = NormalizePass(inplace=True).run(owned).model
    assert inplace.SerializeToString() == copied.SerializeToString()


def _with_dead_branch(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    x = out.graph.input[0].name
    out.graph.node.append(helper.make_node("Relu", [x], ["dead_relu_out"], name="dead_relu"))
    return out


def test_dead_code_elimination_is_exact_and_idempotent():
    original = TEST_MODELS["chain"]()
    model = _with_dead_branch(original)
    result = DeadCodeEliminationPass().run(model)
    assert result.modified and not any(n.name == "dead_relu" for n in result.model.graph.node)
    inputs = random_inputs(model)
    assert max_rel_error(run(model, inputs), run(result.model, inputs)) == 0.0
    again = DeadCodeEliminationPass().run(result.model)
    assert again.modified is False and again.model is result.model


def test_shape_inference_and_check_change_nothing():
    model = NormalizePass().run(TEST_MODELS["residual"]()).model
    stale = onnx.ModelProto()
    stale.CopyFrom(model)
    del stale.graph.value_info[:]
    inferred = ShapeInferencePass().run(stale)
    assert inferred.modified is False and len(inferred.model.graph.value_info) > 0
    inputs = random_inputs(model)
    assert max_rel_error(run(model, inputs), run(inferred.model, inputs)) == 0.0
    checked = CheckPass().run(inferred.model)
    assert checked.modified is False and checked.model is inferred.model


def test_check_pass_fails_with_one_line():
    model = TEST_MODELS["chain"]()
    model.graph.node[0].input[1] = "does_not_exist"
    with pytest.raises(ModelError, match="checker") as err:
        CheckPass().run(model)
    assert "\n" not in str(err.value)


class _Count(Pass):
    """Reads the cached channel analysis; records nothing on itself."""

    def call(self, model):
        return PassResult(model, False, artifacts=(analyses().get(model, (ChannelAnalysis, False)),))


class _Touch(Pass):
    """Returns a copy of the model: facts about the old object must not reach the next pass."""

    def call(self, model):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return PassResult(out, True)


def test_analysis_cache_is_per_model_object_and_per_run():
    model = NormalizePass().run(TEST_MODELS["residual"]()).model
    kept = PassManager([AnalyzeChannelsPass(), _Count()]).run(model)
    first, seen = kept.artifacts
    assert isinstance(first, ChannelAnalysis) and seen is first
    dropped = PassManager([AnalyzeChannelsPass(), _Touch(), _Count()]).run(model)
    assert dropped.artifacts[-1] is None
    # Each run has its own cache; outside a run nothing is shared.
    assert PassManager([_Count()]).run(model).artifacts == (None,)
    assert analyses().get(model, (ChannelAnalysis, False)) is None


def test_analysis_cache_drops_facts_of_a_model_changed_in_place():
    cache = AnalysisCache()
    a, b = TEST_MODELS["chain"](), TEST_MODELS["chain"]()
    cache.put(a, "k", 1)
    cache.put(b, "k", 2)
    cache.retain(a)
    assert cache.get(a, "k") == 1 and cache.get(b, "k") is None
    cache.retain(a, changed_in_place=True)
    assert cache.get(a, "k") is None


class _Record(Instrument):
    def __init__(self):
        self.events = []

    def before_run(self, manager, model):
        self.events.append("start")

    def after_run(self, manager, result):
        self.events.append("end" if result is not None else "failed")


class _Boom(Pass):
    def call(self, model):
        raise ModelError("boom")


def test_instruments_see_the_end_of_a_failed_run():
    from onnxprune.progress import RecordingReporter, reporting

    record, progress = _Record(), ProgressInstrument()
    with reporting(RecordingReporter()) as reporter, pytest.raises(ModelError):
        PassManager([NormalizePass(), _Boom()], instruments=[record, progress]).run(TEST_MODELS["chain"]())
    assert record.events == ["start", "failed"]
    # the run's task was left (the live display stops with its last task), having done one of two passes
    assert [(t.description, t.completed, t.total) for t in reporter.finished()] == [("_Boom", 1, 2)]


def test_progress_instrument_reports_each_pass_as_one_task():
    from onnxprune.progress import RecordingReporter, reporting

    with reporting(RecordingReporter()) as reporter:
        PassManager([NormalizePass(), DeadCodeEliminationPass()], instruments=[ProgressInstrument()]).run(
            TEST_MODELS["chain"]()
        )
    updates = [e[1] for e in reporter.events if e[0] == "update"]
    assert "NormalizePass" in updates and "DeadCodeEliminationPass" in updates
    assert [(t.completed, t.total) for t in reporter.finished()] == [(2, 2)]


def test_progress_instrument_is_silent_without_a_reporter(capsys):
    PassManager([NormalizePass()], instruments=[ProgressInstrument()]).run(TEST_MODELS["chain"]())
    assert capsys.readouterr().err == ""


class _Note(Summary):
    def as_dict(self):
        return {"note": "hello", "barriers": ["not stamped"]}


class _Noted(Pass):
    def __init__(self, modify: bool):
        self.modify = modify

    def call(self, model):
        out = model
        if self.modify:
            out = onnx.ModelProto()
            out.CopyFrom(model)
        return PassResult(out, self.modify, artifacts=(_Note(),))


def _summary(model):
    return {p.key: p.value for p in model.metadata_props}.get("onnxprune.summary")


@pytest.mark.parametrize("always", [False, True])
def test_stamp_instrument_writes_the_summary_of_modifying_passes(always):
    model = TEST_MODELS["chain"]()
    changed = PassManager([_Noted(True)], instruments=[StampInstrument(always)]).run(model).model
    assert json.loads(_summary(changed)) == {"note": "hello"}  # barriers are for people, not the record
    same = PassManager([_Noted(False)], instruments=[StampInstrument(always)]).run(model).model
    assert same is model and (_summary(same) is not None) == always


def _save_external(model: onnx.ModelProto, path: Path) -> Path:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=256)
    return path


def test_dump_instrument_writes_loadable_models_for_external_data(tmp_path):
    """Lazily loaded weights are streamed into a data file beside each dump; no private key leaks."""
    (tmp_path / "src").mkdir()
    original = TEST_MODELS["residual"]()
    model = load_model(_save_external(_with_dead_branch(original), tmp_path / "src" / "m.onnx"))
    assert has_lazy(model)
    dump = tmp_path / "dump"
    passes = [DeadCodeEliminationPass(), NormalizePass(), PrunePass(PruneConfig(ratio=0.5))]
    result = PassManager(passes, instruments=[DumpInstrument(dump)]).run(model)
    files = sorted(dump.glob("*.onnx"))
    assert [f.name for f in files] == ["01_DeadCodeEliminationPass.onnx", "02_PrunePass.onnx"]
    stored = onnx.load(str(files[0]), load_external_data=False)  # untouched weights: still in a data file
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in stored.graph.initializer)
    assert BASE_KEY not in {e.key for t in stored.graph.initializer for e in t.external_data}
    inputs = random_inputs(original, seed=2)
    assert max_rel_error(run(original, inputs), session(str(files[0])).run(None, inputs)) == 0.0
    assert max_rel_error(run(result.model, inputs), session(str(files[1])).run(None, inputs)) == 0.0


def _readme_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Pass API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's Pass API section has no python example"
    return blocks[0]


def test_readme_pass_api_snippet_runs(tmp_path):
    """The README's hand-composed pipeline, run as written on the bundled Fashion-MNIST CNN."""
    (tmp_path / "model.onnx").write_bytes((ROOT / "models" / "fashion_mnist_cnn.onnx").read_bytes())
    (tmp_path / "snippet.py").write_text(_readme_snippet(), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pruned = onnx.load(str(tmp_path / "model.pruned.onnx"))
    summary = json.loads(_summary(pruned))
    assert summary["params_after"] < summary["params_before"]
    original = onnx.load(str(tmp_path / "model.onnx"))
    inputs = random_inputs(original, seed=0)
    assert all(np.isfinite(o).all() for o in run(pruned, inputs))
