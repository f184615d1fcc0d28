"""The TVM backend: ONNX model -> Relax -> scheduled TIR -> target code -> bundle folder.

This module and the ``tvm_*`` modules it uses are the only places that import tvm, and it is itself imported
lazily by :func:`onnxprune.targets.compile_bundle`, so ``onnxprune prune`` never pays the 1.5-5 s tvm import.

Pipeline (:func:`compile_bundle`):
  1. load + check the ONNX model (a file or a ``ModelProto``), fix its input shapes (``--shape``; a dynamic
     batch not fixed there is compiled as 1, with a note), refuse ops the importer lacks, fold BatchNorm
     into the convolutions (:func:`onnxprune.fold.fold_batchnorm`);
  2. ``from_onnx`` -> Relax; fold constants, fused attention (:mod:`.tvm_attention`), NHWC layout and
     Winograd (:mod:`.tvm_layout`), legalize to TIR, fuse;
  3. schedule every kernel: CPU rules from :mod:`.tvm_schedules` (no tuning run needed), or MetaSchedule
     tuning with a cached database when ``tune > 0`` (:mod:`.tvm_tune`); dlight GPU rules for CUDA;
  4. build for the row's TVM target and export it with the row's exporter (:mod:`.exporters`);
  5. add the README and ``manifest.json`` (which lists the kernels no schedule applied to).

Each step is a :func:`onnxprune.progress.task`. TVM's own messages (Python logging and warnings, C++ ``LOG``
on fd 2) are kept off the terminal in the bundle's ``compile.log`` (:mod:`.messages`), named by one note.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxprune import progress
from onnxprune.errors import ModelError, ToolchainError, UnsupportedModelError, UsageError
from onnxprune.fold import fold_batchnorm

from . import bundle as B
from .cpu_features import recorded_features
from .messages import note, tvm_messages
from .onnx_prepare import UNSUPPORTED_CONVERTERS, expand_contrib, expand_functions, positive_axes
from .spec import HOST_CPU, TargetSpec
from .table import get_target
from .toolchains import require, tvm_version

# TVM's in-process thread pool (constant folding, MetaSchedule measurements) starts with 1 worker on this kind
# of machine; measure kernels with one worker per usable CPU, as the bundle runner runs them.
if hasattr(os, "sched_getaffinity"):
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))

try:
    import tvm
    from tvm import relax
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ToolchainError(
        f"apache-tvm is not installed ({_e}); pip install apache-tvm==0.27.0.post1 "
        "apache-tvm-ffi==0.1.14.post1"
    ) from None

# after the tvm import check above, so a missing tvm is reported as one line
from . import tvm_attention, tvm_layout, tvm_schedules, tvm_sparse_choice
from .tvm_tiles import vector_lanes, vector_registers

__all__ = ["build_executable", "build_target", "compile_bundle", "import_onnx"]

log = logging.getLogger("onnxprune.targets")


def build_target(spec: TargetSpec) -> tvm.target.Target:
    """The TVM Target for a table row (``mcpu: <host>`` becomes this machine's CPU)."""
    d: dict[str, Any] = dict(spec.tvm_target)
    if d.get("mcpu") == HOST_CPU:
        d["mcpu"] = tvm.get_global_func("target.llvm_get_system_cpu")()
    if spec.gpu:
        host = {"kind": "llvm", "mtriple": f"{spec.arch}-linux-gnu"}
        return tvm.target.Target(d, host=host)
    return tvm.target.Target(d)


def cpu_features(spec: TargetSpec) -> list[str] | None:
    """The x86 extensions the bundle's code may use (see :mod:`.cpu_features`); None for other architectures
    (arm bundles run under qemu here, which emulates every extension)."""
    if spec.arch != "x86_64" or spec.gpu:
        return None
    from tvm.target import codegen

    return recorded_features(str(f) for f in codegen.llvm_get_cpu_features(build_target(spec)))


def _load(model: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, Path | None]:
    """The model and the file it came from (None for a ``ModelProto``)."""
    if isinstance(model, onnx.ModelProto):
        if not model.graph.node:
            raise ModelError("the model's graph has no nodes")
        return model, None
    path = Path(model)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        proto = onnx.load(str(path))
    except Exception as e:
        raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    if not proto.graph.node:
        raise ModelError(f"{path}: the graph has no nodes")
    return proto, path


def _check_ops(model: onnx.ModelProto) -> None:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) - UNSUPPORTED_CONVERTERS
    ops = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
    custom = {f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")}
    missing = sorted(ops - known) + sorted(custom)
    if missing:
        raise UnsupportedModelError(f"TVM's ONNX importer lacks op(s): {', '.join(missing)}")


def import_onnx(model: onnx.ModelProto, inputs: list[B.TensorSpec]) -> tvm.IRModule:
    """ONNX -> Relax with static input shapes, weights bound as constants."""
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    model, _ = expand_contrib(model)  # onnxruntime's optimizer output: SkipLayerNormalization, the Gelu family
    # opset-23 Attention / RotaryEmbedding: after the folding (an Attention's mask may fold into a constant, which
    # its direct form needs), then the bodies' own shape arithmetic folded
    model, expanded = expand_functions(_fold_shape_computations(model, inputs), set(_get_convert_map()))
    if expanded:
        model = _fold_shape_computations(model, inputs)
    _check_ops(model)
    model = fold_batchnorm(positive_axes(model))
    shape_dict = {s.name: list(s.shape) for s in inputs}
    dtype_dict = {s.name: s.dtype for s in inputs}
    try:
        mod = from_onnx(model, shape_dict=shape_dict, dtype_dict=dtype_dict, keep_params_in_input=False)
    except (NotImplementedError, tvm.error.OpNotImplemented) as e:
        raise UnsupportedModelError(f"TVM's ONNX importer cannot convert the model: {_one_line(e)}") from None
    except Exception as e:
        raise UnsupportedModelError(
            f"TVM's ONNX importer failed: {type(e).__name__}: {_one_line(e)}"
        ) from None
    return relax.transform.DecomposeOpsForInference()(mod)


def _fold_shape_computations(model: onnx.ModelProto, inputs: list[B.TensorSpec]) -> onnx.ModelProto:
    """With the input shapes fixed, fold the sizes exporters compute at run time (torch's ``chunk`` becomes
    Shape/Gather/Div/Slice) into constants, with onnxprune's own canonicalisation.

    TVM's importer turns such a Slice into a ``dynamic_strided_slice`` of unknown shape, which its
    FoldConstant/legalization then reject (ShuffleNetV2). Models without ``Shape`` ops are left as they are.
    """
    if not any(n.op_type == "Shape" for n in model.graph.node):
        return model
    from onnxprune.importer import canonicalize, fix_input_shapes

    out = onnx.ModelProto()
    out.CopyFrom(model)
    try:
        fix_input_shapes(out, {s.name: list(s.shape) for s in inputs})
        out, _ = canonicalize(out, inplace=True)
    except Exception:
        return model
    return out


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(e).__name__


#: Where TVM's messages during a compile are kept, in the bundle folder (only when it printed any).
COMPILE_LOG = "compile.log"
#: Constants with fewer elements stay in the library (scalars, shapes); larger ones go to ``weights.bin``.
MIN_WEIGHT_ELEMENTS = 16
WEIGHTS_FILE = "weights.bin"


def lift_weights(mod: tvm.IRModule) -> tuple[tvm.IRModule, list[np.ndarray]]:
    """Turn the large constants of ``main`` into trailing parameters; return them in parameter order.

    Runs after constant folding and the layout passes, so the lifted tensors are the final, ready-to-use
    weights (NHWC/HWIO, BatchNorm folded, channel-padded): the runner passes them to ``main`` after the
    model inputs, as loaded from ``weights.bin`` (TVM's parameter-dict format, keys ``w0000``, ``w0001`` …).
    """
    lifted: list[np.ndarray] = []
    new_params: list[relax.Var] = []

    @relax.expr_functor.mutator
    class _Lift(relax.PyExprMutator):
        def visit_generic_const_(self, const: relax.Expr) -> relax.Expr:
            value = const.value
            if not hasattr(value, "numpy") or int(np.prod(value.shape)) < MIN_WEIGHT_ELEMENTS:
                return const
            var = relax.Var(f"w{len(lifted):04d}", const.ty)
            lifted.append(value.numpy())
            new_params.append(var)
            return var

    func = mod["main"]
    body = _Lift(mod).visit_expr(func)
    if not lifted:
        return mod, []
    n_inputs = len(func.params)
    new = relax.Function(list(body.params) + new_params, body.body, body.ret_ty, body.is_pure, func.attrs)
    new = new.with_attr("num_input", n_inputs)
    mod = tvm.IRModule(
        {**{gv: f for gv, f in mod.functions_items() if gv.name_hint != "main"}}, attrs=mod.attrs
    )
    mod["main"] = new
    return mod, lifted


def _relax_pipeline(
    spec: TargetSpec,
    target: tvm.target.Target,
    tune: int,
    work_dir: Path | None,
    weights: list | None = None,
    unscheduled: dict[str, str] | None = None,
    build_task: progress.Task | None = None,
    sparse: str = "off",
    sparse_report: dict | None = None,
):
    """Relax pipeline: legalize + fuse, schedule the kernels, then lower to VM code.

    ``sparse`` (``auto|off|force``) lets :mod:`.tvm_sparse_choice` replace layers with sparse weights by
    sparse kernels (after the NHWC layout, before Winograd and channel padding); what it chose goes into
    ``sparse_report`` (the manifest's ``sparse``).

    With a ``weights`` list, the folded weights are lifted out of the library (:func:`lift_weights`) and
    appended to it; an ``unscheduled`` dict receives the kernels no CPU schedule applied to (by name, with
    the reason). Each step is a progress task; ``build_task`` (the task around ``relax.build``) then says
    that code generation, what ``relax.build`` does after the pipeline, is under way.
    """
    from tvm.relax.backend import cpu_generic

    report = sparse_report if sparse_report is not None else {}
    lanes, registers = vector_lanes(target), vector_registers(target)
    # layers are timed dense vs sparse where the target's code runs, as the target runs it, on this machine
    measure = None
    if spec.runner.times_layers and spec.runner.can_run_here(spec):
        measure = lambda m: build_executable(m, spec, sparse="off")

    if spec.gpu:
        from tvm.relax.backend import cuda

        @tvm.transform.module_pass(opt_level=0, name="OnnxpruneCUDAPipeline")
        def _cuda(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
            with target:
                mod = relax.transform.FoldConstant()(mod)
                mod = tvm_sparse_choice.apply(mod, sparse, spec, target, lanes, registers, None, report)
                return cuda.get_default_pipeline(target)(mod)

        return _cuda

    @tvm.transform.module_pass(opt_level=0, name="OnnxpruneCPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            with progress.task("folding constants, NHWC layout"):
                layout = tvm_layout.relax_layout_passes(target)
                at = next(i for i, p in enumerate(layout) if p.info.name == "PadConvChannels")
                # attention first: it takes the softmax that the row-wise pass would otherwise claim
                attention = tvm_attention.fuse_attention(lanes, registers)
                mod = tvm.transform.Sequential([relax.transform.FoldConstant(), attention, *layout[:at]])(mod)
            mod = tvm_sparse_choice.apply(mod, sparse, spec, target, lanes, registers, measure, report)
            with progress.task("Winograd, channel padding, legalizing"):
                mod = tvm.transform.Sequential(layout[at:])(mod)
                mod = tvm.transform.Sequential(
                    [*cpu_generic.library_dispatch_passes(target), *tvm_layout.legalize_passes(target)]
                )(mod)
            if tune > 0:
                from . import tvm_tune  # only tuned compiles pay for importing MetaSchedule

                mod = tvm_tune.tune(mod, target, tune, work_dir)
            # Schedules may repack constant weights (conv weights in register-tile order), so the weights are
            # lifted after scheduling, as the kernels read them.
            mod = tvm_schedules.ApplyCPUSchedules(target, unscheduled)(mod)
            with progress.task("lowering to VM code"):
                if weights is not None:
                    mod, lifted = lift_weights(mod)
                    weights.extend(lifted)
                mod = tvm.transform.Sequential(
                    [*cpu_generic.pipeline.dataflow_lower_passes(target), *cpu_generic.finalize_passes(target)]
                )(mod)
        if build_task is not None:
            build_task.update(description=f"generating {spec.name} code")
        return mod

    return _pipeline


def build_executable(
    mod: tvm.IRModule,
    spec: TargetSpec,
    *,
    tune: int = 0,
    work_dir: Path | None = None,
    weights: list | None = None,
    unscheduled: dict[str, str] | None = None,
    sparse: str = "off",
    sparse_report: dict | None = None,
) -> relax.Executable:
    """Compile a Relax module for a table row (lifting the weights into ``weights`` and naming the kernels
    left unscheduled in ``unscheduled`` when given; sparse kernels per ``sparse``, see :func:`_relax_pipeline`)."""
    target = build_target(spec)
    with progress.task(f"building for {spec.name} with TVM") as job:
        pipeline = _relax_pipeline(spec, target, tune, work_dir, weights, unscheduled, build_task=job,
                                   sparse=sparse, sparse_report=sparse_report)  # fmt: skip
        try:
            return relax.build(mod, target, relax_pipeline=pipeline, **spec.exporter.build_kwargs())
        except Exception as e:
            if os.environ.get("ONNXPRUNE_DEBUG"):  # keep the traceback when debugging the backend
                raise
            raise UnsupportedModelError(f"TVM failed to compile for {spec.name}: {_one_line(e)}") from None


def _output_specs(mod: tvm.IRModule, names: list[B.TensorSpec]) -> list[B.TensorSpec]:
    ret = mod["main"].ret_ty  # TensorType or TupleType (StructInfo was renamed to Type in TVM 0.27)
    fields = list(ret.fields) if hasattr(ret, "fields") else [ret]
    if len(fields) != len(names):
        raise UnsupportedModelError(f"model has {len(names)} outputs but TVM produced {len(fields)}")
    out = []
    for spec, f in zip(names, fields):
        if not hasattr(f, "shape") or f.shape is None:
            raise UnsupportedModelError(f"output {spec.name!r} is not a tensor of known shape")
        try:
            shape = tuple(int(d) for d in f.shape.values)
        except TypeError:
            raise UnsupportedModelError(f"output {spec.name!r} has a data-dependent shape") from None
        out.append(B.TensorSpec(spec.name, shape, str(f.dtype)))
    return out


def _target_json(target: tvm.target.Target) -> object:
    try:
        return json.loads(str(target))
    except json.JSONDecodeError:
        return str(target)


def _readme(spec: TargetSpec, manifest: dict[str, Any]) -> str:
    ins = " ".join(f"{i['name']}.npy" for i in manifest["inputs"])
    w = manifest.get("weights")
    wflag = f" --weights {w['file']}" if isinstance(w, dict) else ""
    lines = [
        f"# {manifest['model']['name']} for {spec.name}",
        "",
        f"{spec.description}. Compiled by onnxprune with TVM {manifest['tvm_version']}.",
        "",
        "Inputs (.npy, C order):",
        *[f"- `{i['name']}`: {i['dtype']} {i['shape']}" for i in manifest["inputs"]],
        "",
        *(
            [
                f"The model's batch is dynamic; this bundle is compiled for batch 1 "
                f"({', '.join(f'`{n}`' for n in manifest['batch_defaulted_to_1'])}). For another batch, "
                "compile again with `--shape NAME=N,...`.",
                "",
            ]
            if manifest["batch_defaulted_to_1"]
            else []
        ),
        *(
            [
                f"Weights: `{w['file']}` ({w['count']} tensors, TVM parameter dict), already in the kernels' "
                "layout; the runner passes them to `main` after the inputs.",
                "",
            ]
            if isinstance(w, dict)
            else []
        ),
        "Outputs (written as output_<i>.npy):",
        *[f"- {k}: `{o['name']}`: {o['dtype']} {o['shape']}" for k, o in enumerate(manifest["outputs"])],
        "",
        "## Run on the device",
        "",
        *spec.exporter.readme(ins, wflag),
    ]
    lines += ["", "`manifest.json` lists the sha256 of every file; check them with `sha256sum`."]
    if manifest["compile_log"]:
        lines += [f"`{manifest['compile_log']}` holds what TVM printed while compiling (not needed to run)."]
    return "\n".join([*lines, ""])


def _model_field(model: onnx.ModelProto, path: Path | None) -> dict[str, object]:
    """The manifest's ``model``: a file's name and sha256, or a proto's sha256 of its serialized bytes."""
    data = path.read_bytes() if path is not None else model.SerializeToString()
    name = model.graph.name or (path.stem if path is not None else "model")
    return {"name": name, "file": path.name if path is not None else None,
            "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip


def compile_bundle(
    model: str | Path | onnx.ModelProto,
    target: str,
    out_dir: str | Path | None = None,
    tune: int = 0,
    shapes: dict[str, tuple[int, ...]] | None = None,
    sparse: str = "auto",
) -> Path:
    """Compile an ONNX model (a file or a ``ModelProto``) into a bundle for a target (see
    :mod:`onnxprune.targets.bundle` and :func:`onnxprune.targets.compile_bundle`).

    Kernels no CPU schedule applied to (they run as naive loop nests, 30-100x slower) are listed in the
    manifest's ``unscheduled_kernels`` (with ``unscheduled_kernel_count``); the reasons are logged at INFO
    on the ``onnxprune.targets`` logger. Inputs whose dynamic batch is compiled as 1 get a note on stderr and
    are listed in ``batch_defaulted_to_1``; TVM's messages go to ``compile.log`` (``compile_log``).
    """
    if tune < 0:
        raise UsageError("--tune must be >= 0")
    spec = get_target(target)
    model, model_path = _load(model)
    if out_dir is not None:
        out = Path(out_dir)
    elif model_path is not None:
        out = model_path.with_name(f"{model_path.stem}.{spec.name}")
    else:
        raise UsageError("compile_bundle: out_dir is required when the model is a ModelProto")
    inputs, outputs = B.model_signature(model, shapes, batch_default=1)
    # Check the destination and the toolchain before the slow part.
    B.check_destination(out)
    require(spec.compiler, f"to build {spec.name} bundles")
    spec.exporter.check_toolchain(spec)
    defaulted = B.dynamic_batch_inputs(model, shapes)
    for name in defaulted:
        note(f"input {name!r} has a dynamic batch; compiling for batch 1 (use --shape to choose)")
    label = model_path.name if model_path is not None else (model.graph.name or "the model")
    sparse_report: dict[str, Any] = {}
    t0 = time.perf_counter()
    with (
        progress.task(f"compiling {label} for {spec.name}", total=3) as job,
        tempfile.TemporaryDirectory(prefix="onnxprune-compile-") as tmp,
        B.staged_bundle(out) as stage,
    ):
        captured = Path(tmp) / COMPILE_LOG
        try:
            with tvm_messages(captured):
                fields, weights_field, outputs, unscheduled = _compile_into(stage, spec, model, inputs, outputs,
                                                                            tune, job, sparse_report,
                                                                            sparse)  # fmt: skip
        except BaseException:
            if captured.is_file():  # the messages may explain the failure: keep them where it can be found
                fd, kept = tempfile.mkstemp(prefix="onnxprune-compile-", suffix=".log")
                with os.fdopen(fd, "wb") as f:
                    f.write(captured.read_bytes())
                note(f"TVM messages in {kept}")
            raise
        compile_log = None
        if captured.is_file():
            compile_log = COMPILE_LOG
            text = captured.read_bytes()
            (stage / COMPILE_LOG).write_bytes(text if text.endswith(b"\n") else text + b"\n")
        compile_s = time.perf_counter() - t0
        manifest: dict[str, Any] = {
            "model": _model_field(model, model_path),
            "inputs": B.spec_dicts(inputs),
            "outputs": B.spec_dicts(outputs),
            "target": {
                "name": spec.name,
                "family": spec.family,
                "arch": spec.arch,
                "tvm_target": _target_json(build_target(spec)),
                "cpu_features": cpu_features(spec),
            },
            "tvm_version": tvm_version(),
            "tune_trials": tune,
            "compile_seconds": round(compile_s, 3),
            "weights": weights_field,
            **fields,
            "pruning_summary": B.pruning_summary(model),
            "unscheduled_kernels": sorted(unscheduled),
            "unscheduled_kernel_count": len(unscheduled),
            "batch_defaulted_to_1": defaulted,
            "compile_log": compile_log,
            "sparse": sparse_report,
        }
        (stage / "README.md").write_text(_readme(spec, manifest))
        B.write_manifest(stage, manifest)
        json.loads((stage / B.MANIFEST).read_text())
    if compile_log:
        note(f"TVM messages in {out / compile_log}")
    return out


def _compile_into(
    out: Path,
    spec: TargetSpec,
    model: onnx.ModelProto,
    inputs: list[B.TensorSpec],
    outputs: list[B.TensorSpec],
    tune: int,
    job: progress.Task,
    sparse_report: dict[str, Any] | None = None,
    sparse: str = "off",
) -> tuple[dict[str, object], object, list[B.TensorSpec], dict[str, str]]:
    """Import, build and export into ``out`` (an empty staging folder), advancing ``job`` once per step.

    Returns:
        The exporter's manifest fields, the manifest's ``weights``, the outputs with their compiled shapes,
        and the kernels left unscheduled (with the reasons).
    """
    with progress.task("importing the ONNX model"):
        mod = import_onnx(model, inputs)
        outputs = _output_specs(mod, outputs)
    job.advance()
    work_dir = Path(os.environ.get("ONNXPRUNE_TUNE_CACHE", Path.home() / ".cache" / "onnxprune" / "tune"))
    weights: list[np.ndarray] | None = None if spec.gpu else []
    unscheduled: dict[str, str] = {}
    ex = build_executable(mod, spec, tune=tune, work_dir=work_dir, weights=weights, unscheduled=unscheduled,
                          sparse=sparse, sparse_report=sparse_report)  # fmt: skip
    for kernel, reason in sorted(unscheduled.items()):
        log.info("kernel %s runs (partly) unscheduled: %s", kernel, reason)
    job.advance()
    with progress.task(f"writing the {spec.name} bundle"):
        fields = spec.exporter.write(ex, out, spec)
        weights_field: object = "embedded in the library (constants)"
        if weights:
            blob = tvm.runtime.save_param_dict(
                {f"w{i:04d}": tvm.runtime.tensor(w) for i, w in enumerate(weights)}
            )
            (out / WEIGHTS_FILE).write_bytes(blob)
            weights_field = {
                "file": WEIGHTS_FILE, "format": "tvm-param-dict", "count": len(weights),
                "bytes": len(blob), "passed_as": "main(inputs..., w0000, w0001, ...)",
            }  # fmt: skip
    job.advance()
    return fields, weights_field, outputs, unscheduled
