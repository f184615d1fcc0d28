"""Speed-ups of the sequential repair (issue 17's time bar) that must not change its result: statistics of the
pruned input over its kept features only (`repair.SEQ_COMPACT`), checked against all features, and the
repaired model against onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import canonical

from models.testmodels import TEST_MODELS
from onnxprune import repair
from onnxprune.calibration import CalibrationData
from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.repair import reanalyze, repair_sequential
from onnxprune.rewrite import apply_mask, apply_plan
from onnxprune.shape_inference import infer_shapes
from onnxprune.verify import max_rel_error, random_inputs, run


def _calib(model, n, seed=0) -> CalibrationData:
    samples = [random_inputs(model, seed=seed + i) for i in range(n)]
    return CalibrationData({k: np.concatenate([s[k] for s in samples]) for k in samples[0]})


@pytest.mark.parametrize("name", ["residual", "chain", "gemm_head", "attention"])
def test_kept_feature_statistics_give_the_weights_of_all_feature_statistics(name, monkeypatch):
    """The removed features of x~ are zeros nothing reads: fitting on the kept ones only gives the same
    weights up to float32 summation order (measured: max relative difference per weight <= 2.1e-4, a
    Gemm behind a chain of refitted layers; most 0 to 1e-5), and the pruned model
    equals the masked one in onnxruntime."""
    model = canonical(TEST_MODELS[name]())
    calib = _calib(model, 16)
    analysis = analyze(ModelGraph(model))
    labels = PrunePass(PruneConfig(ratio=0.4)).plan(analysis).labels(analysis)
    results = {}
    for compact in (False, True):
        monkeypatch.setattr(repair, "SEQ_COMPACT", compact)
        repaired, report = repair_sequential(analysis, labels, calib)
        assert report.repaired
        results[compact] = {t.name: np.asarray(onnx_value(t), np.float64) for t in repaired.graph.initializer}
        work, work_labels = reanalyze(analysis, labels, repaired, False)
        inputs = random_inputs(model, seed=99)
        pruned = infer_shapes(apply_plan(work, work_labels))
        assert max_rel_error(run(apply_mask(work, work_labels), inputs), run(pruned, inputs)) <= 1e-5
    assert results[True].keys() == results[False].keys()
    changed = 0
    for k, full in results[False].items():
        got = results[True][k]
        scale = max(1e-12, float(np.abs(full).max()))
        assert float(np.abs(got - full).max()) / scale <= 1e-3, k
        changed += int(not np.array_equal(full, np.asarray(onnx_value(_init(model, k)), np.float64))
                       if _init(model, k) is not None else 1)
    assert changed  # the repair did change weights (the comparison is not between two no-ops)


def onnx_value(t):
    from onnx import numpy_helper

    return numpy_helper.to_array(t)


def _init(model, name):
    return next((t for t in model.graph.initializer if t.name == name), None)


def test_paired_is_zip_longest_with_the_first_iterator_stepped_in_a_thread():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from onnxprune.repair_stats import paired

    threads: set[str] = set()

    def gen(n: int, tag: str):
        for i in range(n):
            threads.add(f"{tag}:{threading.current_thread().name}")
            yield (tag, i)
        threads.add(f"{tag}-end")  # the code after the last yield runs too (a runner's cache refresh)

    with ThreadPoolExecutor(max_workers=1) as pool:
        got = list(paired(gen(3, "a"), gen(5, "b"), pool))
    assert got == [(("a", 0), ("b", 0)), (("a", 1), ("b", 1)), (("a", 2), ("b", 2)), (None, ("b", 3)), (None, ("b", 4))]
    assert {"a-end", "b-end"} <= threads
    assert f"b:{threading.current_thread().name}" in threads and not any(t.startswith("a:Main") for t in threads)

    def broken():
        yield 1
        raise ValueError("runner failed")

    with ThreadPoolExecutor(max_workers=1) as pool, pytest.raises(ValueError, match="runner failed"):
        list(paired(broken(), gen(3, "b"), pool))
