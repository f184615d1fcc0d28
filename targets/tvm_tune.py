"""``--tune N``: MetaSchedule tuning of a model's kernels, in process, never slower than the default schedules.

How it runs (:func:`tune`):

1. Tasks are extracted from the legalized, fused module (one per distinct kernel, weighted by use count).
2. **The default schedule is a candidate.** Each task's kernel is scheduled by
   :class:`~.tvm_schedules.ApplyCPUSchedules`'s rules, built, timed, and committed to the database as a
   tuning record (its schedule trace + measured time). MetaSchedule's candidates then have to beat it: the
   database keeps the fastest record per kernel. The default schedule as really built (conv weights
   repacked at compile time, which a trace cannot express) is timed too, and a kernel's best record is
   applied only if it is at least ``MIN_GAIN`` faster than that, also when both are re-measured side by side
   (:func:`_confirm`); otherwise the default schedule is used.
3. MetaSchedule searches ``N`` trials in total (evolutionary search, XGBoost cost model when ``xgboost`` is
   installed, else random), with an **in-process builder and runner**: candidates are compiled with
   ``tvm.compile`` and timed with ``time_evaluator`` in this process. The stock ``LocalBuilder``/``LocalRunner``
   start worker processes that each import ``tvm.s_tir.tensor_intrin`` (20-70 s per worker) and export/tar/
   reload every candidate, which dominated short tuning runs.
4. The database lives in ``<tune cache>/<hash of target + module>/`` and is reused: a compile asking for no
   more trials than the database already holds for that module tunes nothing and only applies it.
5. Logging is set up per run by :func:`_tuning_logs` and taken down afterwards: progress tables go to
   ``<database folder>/logs``, ``sys.stdout`` gets MetaSchedule's warnings only (``ONNXPRUNE_TUNE_VERBOSE=1``:
   everything); during a compile ``sys.stdout`` is the bundle's ``compile.log`` (:mod:`.messages`) unless
   ``ONNXPRUNE_TUNE_VERBOSE`` is set. MetaSchedule's own set-up is not used: it reconfigures the whole process
   with ``logging.config.dictConfig`` and failed on a handler without a name (see :func:`_tuning_logs`).
6. Each step is an :func:`onnxprune.progress.task`; the search advances its task once per measured candidate.

Like every ``tvm_*`` module of :mod:`onnxprune.targets`, this one imports tvm; nothing outside the package does.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.runner import PyRunner, RunnerInput
from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture
from tvm.s_tir.meta_schedule.utils import fork_seed

from onnxprune import progress

from . import tvm_winograd
from .tvm_schedules import Kernel
from .tvm_tiles import vector_lanes, vector_registers

__all__ = ["InProcessBuilder", "InProcessRunner", "ProgressCallback", "tune"]

log = logging.getLogger("onnxprune.targets.tune")

#: Per measurement: ``number`` calls per repeat, ``repeat`` repeats, at least ``MIN_REPEAT_MS`` per repeat.
NUMBER, REPEAT, MIN_REPEAT_MS = 1, 5, 20
STATE = "onnxprune_tune.json"
#: A tuned kernel replaces the default one only if it is at least this much faster (measurement noise).
MIN_GAIN = 0.03
#: Evolutionary search population (MetaSchedule's 512 costs ~5 s of search per round for small trial budgets).
POPULATION = 64
#: The logger MetaSchedule's task scheduler writes its progress tables to (and its children, warnings).
MS_LOGGER = "tvm.s_tir.meta_schedule"
_LOG_FORMAT = ("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")


@derived_object
class InProcessBuilder(PyBuilder):
    """Builds candidates with ``tvm.compile`` in this process and keeps the modules in memory.

    The "artifact path" handed to the runner is a key into :attr:`built`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.built: dict[str, tvm.runtime.Module] = {}
        self._ids = itertools.count()

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        results = []
        for bi in build_inputs:
            try:
                mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(bi.mod)
                key = f"inprocess:{next(self._ids)}"
                self.built[key] = tvm.compile(mod, target=bi.target).mod
                results.append(BuilderResult(key, None))
            except Exception as e:
                results.append(BuilderResult(None, f"{type(e).__name__}: {str(e)[:500]}"))
        return results


@derived_object
class InProcessRunner(PyRunner):
    """Times built candidates in this process (random inputs, median-friendly repeats)."""

    def __init__(self, builder: InProcessBuilder) -> None:
        super().__init__()
        self.builder = builder
        self.rng = np.random.default_rng(0)

    def measure(self, rt_mod: tvm.runtime.Module, args_info: list) -> list[float]:
        dev = tvm.cpu()
        args = []
        for info in args_info:
            _, dtype, shape = info.as_json()
            data = self.rng.standard_normal(tuple(int(s) for s in shape)).astype(str(dtype))
            args.append(tvm.runtime.tensor(data, device=dev))
        ev = rt_mod.time_evaluator(
            rt_mod.entry_name, dev, number=NUMBER, repeat=REPEAT, min_repeat_ms=MIN_REPEAT_MS
        )
        return [float(x) for x in ev(*args).results]

    def run(self, runner_inputs: list[RunnerInput]) -> list:
        futures = []
        for ri in runner_inputs:
            rt_mod = self.builder.built.pop(str(ri.artifact_path), None)
            if rt_mod is None:
                futures.append(LocalRunnerFuture(error_message="candidate was not built"))
                continue
            try:
                futures.append(LocalRunnerFuture(res=self.measure(rt_mod, list(ri.args_info))))
            except Exception as e:
                futures.append(LocalRunnerFuture(error_message=f"{type(e).__name__}: {str(e)[:500]}"))
        return futures


@derived_object
class ProgressCallback(ms.measure_callback.PyMeasureCallback):
    """Advances a progress task by the number of candidates measured in each search round."""

    def __init__(self, job: progress.Task) -> None:
        super().__init__()
        self.job = job

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        self.job.advance(len(runner_results))


def _cpu_tensor_intrinsics_only() -> None:
    """Register only the CPU tensor intrinsics before MetaSchedule imports ``tvm.s_tir.tensor_intrin``.

    ``TuneContext`` imports that package, whose ``__init__`` registers every intrinsic of every backend
    (CUDA MMA, ROCm, Hexagon …): ~19 s. CPU tuning needs only the x86 and Arm ones (1.4 s), so the package is
    entered in ``sys.modules`` without running its ``__init__`` and just those two submodules are imported.
    """
    import importlib
    import importlib.util
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        return
    pkg = types.ModuleType(name)
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    sys.modules[name] = pkg
    try:
        for sub in ("x86", "arm_cpu"):
            setattr(pkg, sub, importlib.import_module(f"{name}.{sub}"))
    except Exception:
        del sys.modules[name]


@contextlib.contextmanager
def _tuning_logs(log_dir: Path, task_names: list[str]) -> Iterator[list[logging.Logger]]:
    """Loggers for one tuning run, one per task (in ``task_names`` order); removed again on exit.

    The task scheduler logs to :data:`MS_LOGGER`: its records go to ``log_dir/task_scheduler.log`` and, from
    WARNING up (everything with ``ONNXPRUNE_TUNE_VERBOSE``), to stdout; each task logs to a file of its own.
    The handlers, level and ``propagate`` of :data:`MS_LOGGER` are restored afterwards, and handlers someone
    else attached there stay untouched.

    Why not MetaSchedule's ``get_loggers_from_work_dir`` (which ``extracted_tasks_to_tune_contexts`` calls):
    it runs ``logging.config.dictConfig`` over the whole process (closing every handler of the process) and
    passes the names of the handlers already on :data:`MS_LOGGER` through ``str.format``; a handler without
    a name there (attached by the host application or a test harness) makes every later tuned compile in
    that process fail with "'NoneType' object has no attribute 'format'".
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter(*_LOG_FORMAT)
    added: list[tuple[logging.Logger, logging.Handler]] = []

    def attach(logger: logging.Logger, handler: logging.Handler) -> None:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
        added.append((logger, handler))

    scheduler = logging.getLogger(MS_LOGGER)
    saved = (scheduler.level, scheduler.propagate)
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.DEBUG if os.environ.get("ONNXPRUNE_TUNE_VERBOSE") else logging.WARNING)
    attach(scheduler, console)
    attach(scheduler, logging.FileHandler(log_dir / "task_scheduler.log", delay=True))
    scheduler.setLevel(logging.DEBUG)
    scheduler.propagate = False
    loggers = []
    width = len(str(max(len(task_names) - 1, 0)))
    for i, name in enumerate(task_names):
        logger = logging.getLogger(f"{log.name}.task_{i:0{width}d}_{name[:100]}")
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        attach(logger, logging.FileHandler(log_dir / f"task_{i:0{width}d}_{name[:100]}.log", delay=True))
        loggers.append(logger)
    try:
        yield loggers
    finally:
        for logger, handler in added:
            logger.removeHandler(handler)
            handler.close()
        scheduler.setLevel(saved[0])
        scheduler.propagate = saved[1]


def _tune_contexts(tasks, strategy, loggers: list[logging.Logger]) -> list:
    """One MetaSchedule ``TuneContext`` per task (as ``extracted_tasks_to_tune_contexts`` builds them)."""
    return [
        ms.TuneContext(
            mod=task.dispatched[0], target=task.target, space_generator="post-order-apply",
            search_strategy=strategy, task_name=task.task_name, logger=logger, rand_state=seed,
            num_threads="physical",
        ).clone()
        for task, logger, seed in zip(tasks, loggers, fork_seed(0, n=len(tasks)))
    ]  # fmt: skip


def cache_dir(mod: tvm.IRModule, target: tvm.target.Target, work_dir: Path | None) -> Path:
    """The database folder for this module on this target."""
    key = hashlib.sha256((str(target) + mod.script(show_meta=True)).encode()).hexdigest()[:16]
    root = Path(work_dir or Path.home() / ".cache" / "onnxprune" / "tune") / key
    root.mkdir(parents=True, exist_ok=True)
    return root


def _seed_default_schedules(tasks, database, target, builder, runner) -> int:
    """Commit each task's default-schedule trace with its measured time; returns how many were committed."""
    lanes = vector_lanes(target)
    registers = vector_registers(target)
    committed = 0
    with progress.task("seeding the database with the default schedules", total=len(tasks)) as job:
        for task in job.track(tasks):
            mod = task.dispatched[0]
            func = mod["main"]
            try:
                kernel = Kernel(func, lanes, registers)
                kernel.run()
                sch = kernel.sch
                secs = _build_and_time(sch.mod, func, target, builder, runner)
                if secs is None:
                    continue
            except Exception as e:
                log.debug("default schedule of %s not seeded: %s", task.task_name, e)
                continue
            workload = database.commit_workload(mod)
            record = ms.database.TuningRecord(
                sch.trace, workload, run_secs=secs, target=target,
                args_info=ms.arg_info.ArgInfo.from_prim_func(func),
            )  # fmt: skip
            database.commit_tuning_record(record)
            committed += 1
    return committed


def _default_times(tasks, target, builder, runner) -> dict[str, float]:
    """Median time of each task's kernel as :class:`~.tvm_schedules.ApplyCPUSchedules` will really build it
    (with its weights repacked, which a tuning record cannot express); a tuned record must beat this."""
    lanes = vector_lanes(target)
    registers = vector_registers(target)
    times: dict[str, float] = {}
    with progress.task("timing the default schedules", total=len(tasks)) as job:
        for task in job.track(tasks):
            func = task.dispatched[0]["main"]
            try:
                kernel = Kernel(func, lanes, registers, frozenset(p.name for p in func.params))
                new = kernel.run()
                secs = _build_and_time(tvm.IRModule({"main": new}), new, target, builder, runner)
                if secs is None:
                    continue
            except Exception as e:
                log.debug("default schedule of %s not measured: %s", task.task_name, e)
                continue
            times[task.task_name] = float(np.median(secs))
    return times


def _confirm(database, task, target, rounds: int = 3) -> bool:
    """Re-measure the best record against the default schedule (repacked weights), interleaved: on a loaded
    machine one tuning measurement can be lucky by more than ``MIN_GAIN``."""
    mod = task.dispatched[0]
    func = mod["main"]
    lanes = vector_lanes(target)
    registers = vector_registers(target)
    builder = InProcessBuilder()
    runner = InProcessRunner(builder)
    try:
        sch = database.query_schedule(mod, target, workload_name="main")
        default = Kernel(func, lanes, registers, frozenset(p.name for p in func.params)).run()
        cands = [sch.mod["main"], default]
        built = []
        for f in cands:
            (res,) = builder.build([BuilderInput(tvm.IRModule({"main": f}), target)])
            if res.error_msg:
                return f is default  # the default does not build: take the record
            built.append((builder.built.pop(str(res.artifact_path)), ms.arg_info.ArgInfo.from_prim_func(f)))
        times: list[list[float]] = [[], []]
        for _ in range(rounds):
            for i, (rt_mod, info) in enumerate(built):
                times[i] += runner.measure(rt_mod, info)
    except Exception as e:
        log.debug("%s: tuned record not re-measured: %s", task.task_name, e)
        return False
    return float(np.median(times[0])) < float(np.median(times[1])) * (1 - MIN_GAIN)


def _faster_than_default(database, tasks, target, defaults: dict[str, float]):
    """A database holding, per task, the best record only where it beats the default schedule's time."""
    chosen = ms.database.MemoryDatabase()
    with progress.task("keeping tuned kernels that beat the defaults", total=len(tasks)) as job:
        for task in job.track(tasks):
            mod = task.dispatched[0]
            if not database.has_workload(mod):
                continue
            top = database.get_top_k(database.commit_workload(mod), 1)
            if not top or not top[0].run_secs:
                continue
            best = float(np.median([float(x) for x in top[0].run_secs]))
            default = defaults.get(task.task_name)
            if default is not None and best >= default * (1 - MIN_GAIN):
                log.info(
                    "%s: tuned %.1f us vs default %.1f us -> default", task.task_name, best * 1e6, default * 1e6
                )
                continue
            if default is not None and not _confirm(database, task, target):
                log.info("%s: tuned record not faster when re-measured next to the default", task.task_name)
                continue
            rec = top[0]
            workload = chosen.commit_workload(mod)
            chosen.commit_tuning_record(
                ms.database.TuningRecord(rec.trace, workload, run_secs=rec.run_secs, target=rec.target,
                                         args_info=rec.args_info)
            )  # fmt: skip
    return chosen


def tune(mod: tvm.IRModule, target: tvm.target.Target, trials: int, work_dir: Path | None) -> tvm.IRModule:
    """Tune the module's kernels with ``trials`` MetaSchedule trials in total and apply the best schedules.

    Kernels found in the database get the fastest recorded schedule (default or tuned) and are marked
    scheduled; the rest are left to :class:`~.tvm_schedules.ApplyCPUSchedules`.
    """
    with progress.task(f"tuning ({trials} MetaSchedule trials)"):
        return _tune(mod, target, trials, work_dir)


def _tune(mod: tvm.IRModule, target: tvm.target.Target, trials: int, work_dir: Path | None) -> tvm.IRModule:
    from tvm.relax.transform import MetaScheduleApplyDatabase
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks

    if "num-cores" not in target.attrs:  # MetaSchedule's parallel rules need the core count
        import psutil

        cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
        target = tvm.target.Target({**dict(target.export()), "num-cores": int(cores)})
    if target.kind.name == "llvm":
        _cpu_tensor_intrinsics_only()
    root = cache_dir(mod, target, work_dir)
    state_path = root / STATE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"trials": 0, "seeded": False}
    database = ms.database.JSONDatabase(work_dir=str(root))
    # Winograd kernels keep their own schedule (MetaSchedule's search aborts on their compute_at structure).
    with progress.task("extracting tuning tasks"):
        tasks = [
            t for t in extract_tasks(mod, target)
            if not t.mod.attrs.get("tirx.is_scheduled", False) and not tvm_winograd.is_winograd_func(t.mod["main"])
        ]  # fmt: skip
    builder = InProcessBuilder()
    runner = InProcessRunner(builder)
    if "default_secs" not in state:
        state["default_secs"] = _default_times(tasks, target, builder, runner)
        state_path.write_text(json.dumps(state))
    if state["trials"] < trials or not state["seeded"]:
        if not state["seeded"]:
            _seed_default_schedules(tasks, database, target, builder, runner)
            state["seeded"] = True
            state_path.write_text(json.dumps(state))
        todo = trials - state["trials"]
        if todo > 0 and tasks:
            try:
                import xgboost  # noqa: F401

                cost_model = "xgb"
            except ImportError:
                cost_model = "random"
            strategy = ms.search_strategy.EvolutionarySearch(
                population_size=POPULATION, init_min_unmeasured=16, genetic_num_iters=2
            )
            with (
                _tuning_logs(root / "logs", [t.task_name for t in tasks]) as loggers,
                progress.task(f"searching {len(tasks)} kernels' schedules", total=todo) as job,
            ):
                ms.tune_tasks(
                    tasks=_tune_contexts(tasks, strategy, loggers), task_weights=[t.weight for t in tasks],
                    work_dir=str(root), max_trials_global=todo,
                    num_trials_per_iter=min(64, max(4, todo // len(tasks))), builder=builder, runner=runner,
                    database=database, cost_model=cost_model,
                    # the default callbacks also delete each artifact's folder; ours live in memory
                    measure_callbacks=[ms.measure_callback.AddToDatabase(), ms.measure_callback.UpdateCostModel(),
                                       ProgressCallback(job)],
                )  # fmt: skip
            state["trials"] += todo
            state_path.write_text(json.dumps(state))
    chosen = _faster_than_default(database, tasks, target, state["default_secs"])
    with target, chosen, progress.task("applying the tuned schedules"):
        mod = MetaScheduleApplyDatabase(str(root))(mod)
    return mod


def _build_and_time(mod, func, target, builder, runner):
    """Build one scheduled kernel and time it (the runner's repeated seconds), or None if it fails to build."""
    (res,) = builder.build([BuilderInput(mod, target)])
    if res.error_msg:
        return None
    return runner.measure(builder.built.pop(str(res.artifact_path)), ms.arg_info.ArgInfo.from_prim_func(func))
