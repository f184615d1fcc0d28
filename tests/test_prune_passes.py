"""The constrained-pruning passes: select -> repair -> remove, composed by hand and as PrunePass.

Every transformed model is compared with the original in onnxruntime: removal reproduces the original with
the same channels silenced (`rewrite.apply_mask`), selection changes nothing, ratio 0 is the identity.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import canonical

from models.testmodels import TEST_MODELS
from onnxprune import (
    AnalyzeChannelsPass,
    ChannelSelection,
    CheckPass,
    NormalizePass,
    PassManager,
    PreconditionError,
    PruneConfig,
    PrunePass,
    PruneSummary,
    RemoveChannelsPass,
    RepairChannelsPass,
    SelectChannelsPass,
    ShapeInferencePass,
    StampInstrument,
)
from onnxprune.calibration import CalibrationData, check_calib
from onnxprune.errors import UsageError
from onnxprune.repair import RepairReport, reanalyze
from onnxprune.rewrite import apply_mask
from onnxprune.verify import max_rel_error, random_inputs, run

SUMMARY_KEYS = ["tool", "config", "params_before", "params_after", "macs_before", "macs_after", "groups",
                "groups_pruned", "channels_removed", "plan", "barriers", "repair", "notices", "seconds", "group_sizes",
                "sensitivity"]


def _calib(model, n: int = 4) -> CalibrationData:
    samples = [random_inputs(model, seed=100 + i) for i in range(n)]
    return check_calib(CalibrationData({k: np.concatenate([s[k] for s in samples]) for k in samples[0]}), model)


def _pipeline(config: PruneConfig, calib=None) -> PassManager:
    return PassManager([SelectChannelsPass(config, calib=calib), RepairChannelsPass(calib), RemoveChannelsPass(),
                        CheckPass()])


def test_select_changes_nothing_and_is_repeatable():
    model = canonical(TEST_MODELS["residual"]())
    before = model.SerializeToString()
    first = SelectChannelsPass(PruneConfig(ratio=0.5)).run(model)
    second = SelectChannelsPass(PruneConfig(ratio=0.5)).run(model)
    assert first.modified is False and first.model is model and model.SerializeToString() == before
    a, b = first.get(ChannelSelection), second.get(ChannelSelection)
    assert not a.empty and np.array_equal(a.labels, b.labels)
    assert a.plan.channels_removed == b.plan.channels_removed > 0


def test_selection_keeps_no_weight_copies_and_its_graph_still_reads_them():
    """The analysis lives on in the selection through the repair: after scoring it holds no converted weights
    (ResNet-50: 97 MB through the seq repair), and reading one again gives the same values."""
    model = canonical(TEST_MODELS["residual"]())
    selection = SelectChannelsPass(PruneConfig(ratio=0.5, criterion="l2")).run(model).get(ChannelSelection)
    graph = selection.analysis.graph
    assert graph._consts == {}
    weights = [t for t in model.graph.initializer if len(t.dims) == 4]
    assert weights and all(np.array_equal(graph.const(t.name), onnx.numpy_helper.to_array(t)) for t in weights)
    graph.forget_values()
    assert graph._consts == {}


@pytest.mark.parametrize("name", ["chain", "residual", "concat", "depthwise", "gemm_head", "attention"])
def test_select_then_remove_equals_the_masked_original(name):
    model = canonical(TEST_MODELS[name]())
    result = _pipeline(PruneConfig(ratio=0.5)).run(model)
    selection = result.get(ChannelSelection)
    assert result.modified and not selection.empty
    inputs = random_inputs(model, seed=1)
    masked = apply_mask(selection.source, selection.labels)
    assert max_rel_error(run(masked, inputs), run(result.model, inputs)) <= 1e-5
    summary = result.get(PruneSummary)
    assert summary.params_after < summary.params_before and summary.channels_removed == selection.plan.channels_removed


@pytest.mark.parametrize("repair", ["bias", "ls", "seq"])
def test_repair_then_remove_equals_the_masked_repaired_model(repair):
    model = canonical(TEST_MODELS["residual"]())
    calib = _calib(model)
    result = _pipeline(PruneConfig(ratio=0.4, repair=repair), calib).run(model)
    (_, selected), (_, repaired), (_, removed), _ = result.steps
    assert repaired.modified and repaired.get(RepairReport) is not None
    selection = selected.get(ChannelSelection)
    analysis, labels = reanalyze(selection.analysis, selection.labels, repaired.model, False)
    inputs = random_inputs(model, seed=3)
    assert max_rel_error(run(apply_mask(analysis, labels), inputs), run(removed.model, inputs)) <= 1e-5
    assert result.get(PruneSummary).repair == repaired.get(RepairReport).as_dict()


def test_bias_repair_on_folded_batchnorms_says_why_it_did_nothing():
    """torch.onnx.export folds BatchNorms into the convolutions by default: the data-free bias repair then has no
    statistics, repairs nothing, and the summary's notices say so and how to export with them."""
    from onnxprune.fold import fold_batchnorm

    model = canonical(TEST_MODELS["residual"]())
    kept = _pipeline(PruneConfig(ratio=0.4, repair="bias")).run(model).get(PruneSummary)
    assert kept.repair["repaired"] > 0 and not kept.notices
    folded = canonical(fold_batchnorm(model))
    assert "BatchNormalization" not in {n.op_type for n in folded.graph.node}
    summary = _pipeline(PruneConfig(ratio=0.4, repair="bias")).run(folded).get(PruneSummary)
    assert summary.repair["repaired"] == 0
    (notice,) = summary.notices
    assert "folded the BatchNorms" in notice and "optimize=False" in notice


def test_repair_none_changes_nothing():
    model = canonical(TEST_MODELS["chain"]())
    result = _pipeline(PruneConfig(ratio=0.5)).run(model)
    _, repaired = result.steps[1]
    assert repaired.modified is False and repaired.model is model and result.get(PruneSummary).repair is None


@pytest.mark.parametrize("repair", ["none", "bias"])
def test_ratio_zero_is_the_identity(repair):
    model = canonical(TEST_MODELS["residual"]())
    before = model.SerializeToString()
    result = _pipeline(PruneConfig(ratio=0.0, repair=repair)).run(model)
    assert result.modified is False and result.model is model and model.SerializeToString() == before
    summary = result.get(PruneSummary)
    assert summary.params_after == summary.params_before and summary.plan == {} and summary.repair is None


def test_removal_needs_a_pending_selection():
    model = canonical(TEST_MODELS["chain"]())
    with pytest.raises(PreconditionError, match="SelectChannelsPass"):
        RemoveChannelsPass().run(model)
    with pytest.raises(PreconditionError, match="SelectChannelsPass"):
        RepairChannelsPass().run(model)
    # A pass that returns another model object in between: the selection was about the old one.
    passes = [SelectChannelsPass(PruneConfig(ratio=0.5)), ShapeInferencePass(), RemoveChannelsPass()]
    with pytest.raises(PreconditionError):
        PassManager(passes).run(model)


def test_sequential_repair_needs_samples():
    with pytest.raises(UsageError, match="calib"):
        _pipeline(PruneConfig(ratio=0.5, repair="seq")).run(canonical(TEST_MODELS["chain"]()))


def test_one_analysis_per_model_version(monkeypatch):
    """Analyse once, and once more only after a repair changed the weights (as before the split)."""
    import onnxprune.passes.select as select
    import onnxprune.repair as repair

    calls = []
    for module in (select, repair):
        original = module.analyze
        monkeypatch.setattr(module, "analyze", lambda g, _o=original, **kw: calls.append(1) or _o(g, **kw))
    model = canonical(TEST_MODELS["residual"]())
    PassManager([AnalyzeChannelsPass(), SelectChannelsPass(PruneConfig(ratio=0.5)), RemoveChannelsPass()]).run(model)
    assert len(calls) == 1
    calls.clear()
    PrunePass(PruneConfig(ratio=0.5, repair="bias")).run(model)
    assert len(calls) == 2


def test_hand_composed_pipeline_equals_prune_pass():
    model = canonical(TEST_MODELS["concat"]())
    config = PruneConfig(ratio=0.4, global_ranking=True, repair="bias")
    by_hand = PassManager([SelectChannelsPass(config), RepairChannelsPass(), RemoveChannelsPass(), CheckPass()],
                          instruments=[StampInstrument()]).run(model)
    composed = PrunePass(config).run(model)
    a, b = by_hand.get(PruneSummary).as_dict(), composed.info["summary"]
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    keys = [[p.key for p in m.metadata_props] for m in (by_hand.model, composed.model)]
    assert keys == [["onnxprune.summary"], ["onnxprune.summary"]]
    by_hand.model.ClearField("metadata_props")
    composed.model.ClearField("metadata_props")
    assert by_hand.model.SerializeToString() == composed.model.SerializeToString()


def test_prune_pass_result_keeps_its_contract():
    model = canonical(TEST_MODELS["depthwise"]())
    result = PrunePass(PruneConfig(ratio=0.25)).run(model)
    assert list(result.info["summary"]) == SUMMARY_KEYS
    assert result.info["plan"] is result.get(ChannelSelection).plan
    assert result.info["summary"] == result.get(PruneSummary).as_dict()
    record = json.loads({p.key: p.value for p in result.model.metadata_props}["onnxprune.summary"])
    assert record == {k: v for k, v in result.info["summary"].items() if k != "barriers"}
    assert [name for name, _ in result.steps] == ["SelectChannelsPass", "RepairChannelsPass", "RemoveChannelsPass",
                                                  "CheckPass"]


def test_prune_pass_keeps_its_inputs_and_reports_notices():
    p = PrunePass(PruneConfig(criterion="obs"))
    state = dict(vars(p))
    result = p.run(canonical(TEST_MODELS["chain"]()))
    assert vars(p) == state  # nothing stored on the pass by a run
    assert p.notices == result.info["summary"]["notices"] and "data-free" in p.notices[0]


def test_normalize_then_prune_from_an_exported_model():
    """The CLI's pipeline on a raw export: normalise, then prune; the original and masked agree."""
    raw = TEST_MODELS["constants_as_nodes"]()
    result = PassManager([NormalizePass(), SelectChannelsPass(PruneConfig(ratio=0.5)), RemoveChannelsPass()]).run(raw)
    selection = result.get(ChannelSelection)
    inputs = random_inputs(raw, seed=4)
    assert max_rel_error(run(apply_mask(selection.source, selection.labels), inputs), run(result.model, inputs)) <= 1e-5


@pytest.mark.parametrize("bad", [{"seed": -1}, {"calib_samples": 0}, {"ratio": 1.0}, {"relu_refit": True}])
def test_prune_config_refuses_bad_values_with_a_usage_error(bad):
    """The library's config says what is wrong in one line (a negative seed was numpy's ValueError, deep inside)."""
    with pytest.raises(UsageError):
        PruneConfig(**bad)
