"""Progress of long steps: reported to an active reporter with sensible totals, silent otherwise."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import canonical

from models.testmodels import TEST_MODELS
from onnxprune.calibration import CalibrationData, collect_stats
from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.plan import PruningPlan
from onnxprune.progress import RecordingReporter, Task, progress_to_stderr, reporting, task
from onnxprune.repair import repair_sequential, repair_weights
from onnxprune.sensitivity import sensitivity
from onnxprune.verify import random_inputs


def _calib(model, n: int) -> CalibrationData:
    samples = [random_inputs(model, seed=i) for i in range(n)]
    return CalibrationData({k: np.concatenate([s[k] for s in samples]) for k in samples[0]})


@pytest.fixture(scope="module")
def chain():
    model = canonical(TEST_MODELS["chain"]())
    analysis = analyze(ModelGraph(model))
    group = analysis.groups[0]
    labels = PruningPlan({group.id: np.array([0, 1])}).labels(analysis)
    return model, analysis, labels, _calib(model, 5)


def _done(tasks: list[Task]) -> None:
    """Every task knew its total and advanced exactly to it."""
    assert tasks
    for t in tasks:
        assert t.total is not None and t.total > 0 and t.completed == t.total, t


def test_calibration_statistics_advance_per_sample(chain):
    model, _, _, data = chain
    with reporting(RecordingReporter()) as rec:
        stats = collect_stats(model, data)
    tasks = [t for t in rec.finished() if t.description == "calibration statistics"]
    assert len(tasks) == 1 and tasks[0].total == data.n
    hessians = rec.finished("calibration statistics: Hessians")  # the buffered rows, then symmetrised
    assert len(hessians) == 1 and hessians[0].total == len(stats.stats)
    _done(tasks + hessians)
    updates = [e for e in rec.events if e[0] == "update" and e[1] == "calibration statistics"]
    assert [e[2] for e in updates] == list(range(1, data.n + 1))  # fixed batch 1: one sample per step


def test_sequential_repair_advances_per_consumer_and_sample(chain):
    _, analysis, labels, data = chain
    with reporting(RecordingReporter()) as rec:
        _, report = repair_sequential(analysis, labels, data)
    outer = [t for t in rec.finished("sequential repair") if t.depth == 0]
    assert len(outer) == 1 and outer[0].total == len(report.repaired) > 0
    assert outer[0].description.startswith("sequential repair: wave ")
    inner = [t for t in rec.finished() if t.depth == 1]
    assert inner and all(t.total == data.n for t in inner)  # one pass over the samples per wave
    _done(outer + inner)


def test_ls_repair_advances_per_consumer(chain):
    model, analysis, labels, data = chain
    stats = collect_stats(model, data)
    with reporting(RecordingReporter()) as rec:
        _, report = repair_weights(analysis, labels, "ls", stats)
    tasks = rec.finished("repair (ls)")
    assert len(tasks) == 1 and tasks[0].total == len(report.repaired) + len(report.skipped)
    _done(tasks)


def test_sensitivity_advances_per_group_and_ratio(chain):
    model, analysis, _, data = chain
    ratios = [0.25, 0.5]
    with reporting(RecordingReporter()) as rec:
        rows = sensitivity(model, data, ratios)
    tasks = [t for t in rec.finished("sensitivity") if t.depth == 0]
    assert len(tasks) == 1 and tasks[0].total == len(rows) * len(ratios) == len(analysis.groups) * len(ratios)
    _done(tasks)


def test_without_a_reporter_nothing_is_printed(chain, capsys):
    model, analysis, labels, data = chain
    collect_stats(model, data)
    repair_sequential(analysis, labels, data)
    sensitivity(model, data, [0.5])
    with task("a step", total=2) as t:
        t.advance(2)
        t.update(description="renamed")
    assert (t.completed, t.description) == (2, "renamed")
    assert capsys.readouterr() == ("", "")


def test_progress_to_stderr_disabled_prints_nothing_and_installs_nothing(chain, capsys):
    model, _, _, data = chain
    with progress_to_stderr(False):
        collect_stats(model, data)
        with task("outer", total=1) as t:
            assert t._reporter is None
            t.advance()
    assert capsys.readouterr() == ("", "")


def test_progress_to_stderr_enabled_draws_nested_tasks_and_clears_them(capsys):
    """The rich display writes to stderr only, one line per running task, and is transient."""
    from onnxprune import progress

    with progress_to_stderr(True):
        reporter = progress._reporter.get()
        assert reporter is not None
        with task("outer", total=2) as outer:
            with task("inner", total=None) as inner:
                inner.advance()
                assert inner.depth == 1
                assert len(reporter._progress.tasks) == 2
            outer.advance(2)
        assert reporter._progress is None  # stopped with the last task
    out, _ = capsys.readouterr()
    assert out == ""
    assert progress._reporter.get() is None


def test_tasks_are_reported_even_when_the_step_fails():
    with reporting(RecordingReporter()) as rec, pytest.raises(RuntimeError), task("failing", total=3) as t:
        t.advance()
        raise RuntimeError("boom")
    assert [e[0] for e in rec.events] == ["start", "update", "finish"]
    assert rec.finished("failing")[0].completed == 1


def test_track_advances_after_each_item_also_on_continue():
    seen = []
    with reporting(RecordingReporter()) as rec, task("loop", total=4) as t:
        for i in t.track(range(4)):
            if i % 2:
                continue
            seen.append((i, t.completed))
    assert seen == [(0, 0), (2, 2)]
    assert rec.finished("loop")[0].completed == 4
