"""`model_values.WorkingCopy`: the model a sequential repair runs each wave, kept up to date in place, must be
exactly the fresh copy `with_values` makes, and the repairs that use it give the weights they gave with
fresh copies."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import canonical
from onnx import numpy_helper

from models.testmodels import TEST_MODELS
from onnxprune import model_values
from onnxprune.calibration import CalibrationData
from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.model_values import WorkingCopy, with_values
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.repair import repair_sequential
from onnxprune.verify import random_inputs


def _bytes(model) -> bytes:
    return model.SerializeToString(deterministic=True)


def test_updates_give_the_fresh_copy_at_every_step():
    model = canonical(TEST_MODELS["residual"]())
    before = _bytes(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = [n for n, v in inits.items() if v.ndim == 4]
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    values: dict[str, np.ndarray] = {}
    biases: list = []
    working = WorkingCopy(model)
    rng = np.random.default_rng(0)
    for step, name in enumerate(weights[:3]):
        values[name] = rng.standard_normal(inits[name].shape).astype(np.float32)
        if step == 1:  # an earlier value replaced by a new array
            values[weights[0]] = values[weights[0]] * 2
        # new biases, two of them under the same name: the second is renamed as `with_values` renames it
        biases.append((convs[step], f"bias_{step % 2}", rng.standard_normal(4).astype(np.float32)))
        got = working.update(values, biases)
        assert _bytes(got) == _bytes(with_values(model, values, biases)), step
        assert working.update(values, biases) is got  # one object, no copy per call
    assert _bytes(model) == before  # the model it was made from is not touched
    with pytest.raises(ValueError):
        working.update(values, biases[:1])


def test_a_value_changed_in_place_is_not_seen_so_repairs_store_new_arrays():
    """What the identity check relies on, stated: the repairs replace an entry, they never write into it."""
    model = canonical(TEST_MODELS["chain"]())
    name = next(t.name for t in model.graph.initializer if len(t.dims) == 4)
    value = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)).copy()
    working = WorkingCopy(model)
    working.update({name: value}, [])
    value += 1.0
    stale = next(t for t in working.update({name: value}, []).graph.initializer if t.name == name)
    assert not np.array_equal(numpy_helper.to_array(stale), value)
    fresh = next(t for t in working.update({name: value.copy()}, []).graph.initializer if t.name == name)
    assert np.array_equal(numpy_helper.to_array(fresh), value)


class _FreshCopies:
    """`WorkingCopy`'s interface over a fresh `with_values` copy per wave: what the repairs did before."""

    def __init__(self, model) -> None:
        self.base = model

    def update(self, values, new_biases):
        return with_values(self.base, values, new_biases)


@pytest.mark.parametrize("name", ["residual", "chain", "gemm_head", "concat"])
def test_the_seq_repair_gives_the_weights_of_fresh_copies(name, monkeypatch):
    model = canonical(TEST_MODELS[name]())
    samples = [random_inputs(model, seed=i) for i in range(12)]
    calib = CalibrationData({k: np.concatenate([s[k] for s in samples]) for k in samples[0]})
    analysis = analyze(ModelGraph(model))
    labels = PrunePass(PruneConfig(ratio=0.4)).plan(analysis).labels(analysis)
    out = {}
    for kind in (WorkingCopy, _FreshCopies):
        monkeypatch.setattr("onnxprune.repair.WorkingCopy", kind)
        repaired, report = repair_sequential(analysis, labels, calib)
        assert report.repaired
        out[kind] = _bytes(repaired)
    assert out[WorkingCopy] == out[_FreshCopies]
    assert out[WorkingCopy] != _bytes(model)  # the repair changed weights
    assert model_values.WorkingCopy is WorkingCopy
