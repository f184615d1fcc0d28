"""Pass API: composition, instruments, modified flags, normalisation semantics."""

from __future__ import annotations

import onnx

from models.testmodels import TEST_MODELS
from onnxprune import (
    CheckPass, DumpInstrument, NormalizePass, PassManager, PruneConfig, PrunePass, ShapeInferencePass,
    TimingInstrument,
)
from onnxprune.verify import max_rel_error, random_inputs, run


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


def test_prune_pass_records_metadata():
    model = NormalizePass().run(TEST_MODELS["depthwise"]()).model
    result = PrunePass(PruneConfig(ratio=0.25)).run(model)
    keys = {p.key for p in result.model.metadata_props}
    assert "onnxprune.summary" in keys
    onnx.checker.check_model(result.model, full_check=True)
