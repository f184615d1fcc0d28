"""The TVM backend: ONNX model -> Relax -> scheduled TIR -> target code -> bundle folder.

This module and the ``tvm_*`` modules it uses are the only places that import tvm, and it is itself imported
lazily by :func:`onnxprune.targets.compile_bundle`, so ``onnxprune prune`` never pays the 1.5-5 s tvm import.

Pipeline (:func:`compile_bundle`):
  1. load + check the ONNX model, fix its input shapes (``--shape``), refuse ops the importer lacks, fold
     BatchNorm into the convolutions (:func:`onnxprune.fold.fold_batchnorm`);
  2. ``from_onnx`` -> Relax; fold constants, NHWC layout and Winograd (:mod:`.tvm_layout`), legalize to TIR,
     fuse;
  3. schedule every kernel: CPU rules from :mod:`.tvm_schedules` (no tuning run needed), or MetaSchedule
     tuning with a cached database when ``tune > 0`` (:mod:`.tvm_tune`); dlight GPU rules for CUDA;
  4. build for the row's TVM target and export it with the row's exporter (:mod:`.exporters`);
  5. add the README and ``manifest.json`` (which lists the kernels no schedule applied to).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxprune.errors import ModelError, ToolchainError, UnsupportedModelError, UsageError
from onnxprune.fold import fold_batchnorm

from . import bundle as B
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
from . import tvm_layout, tvm_schedules

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


def _load(model_path: str | Path) -> onnx.ModelProto:
    path = Path(model_path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    if not model.graph.node:
        raise ModelError(f"{path}: the graph has no nodes")
    return model


def _check_ops(model: onnx.ModelProto) -> None:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map())
    ops = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
    custom = {f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")}
    missing = sorted(ops - known) + sorted(custom)
    if missing:
        raise UnsupportedModelError(f"TVM's ONNX importer lacks op(s): {', '.join(missing)}")


def import_onnx(model: onnx.ModelProto, inputs: list[B.TensorSpec]) -> tvm.IRModule:
    """ONNX -> Relax with static input shapes, weights bound as constants."""
    from tvm.relax.frontend.onnx import from_onnx

    _check_ops(model)
    model = _fold_shape_computations(model, inputs)
    model = fold_batchnorm(model)
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
):
    """Relax pipeline: legalize + fuse, schedule the kernels, then lower to VM code.

    With a ``weights`` list, the folded weights are lifted out of the library (:func:`lift_weights`) and
    appended to it; an ``unscheduled`` dict receives the kernels no CPU schedule applied to (by name, with
    the reason).
    """
    from tvm.relax.backend import cpu_generic

    if spec.gpu:
        from tvm.relax.backend import cuda

        return cuda.get_default_pipeline(target)

    @tvm.transform.module_pass(opt_level=0, name="OnnxpruneCPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            mod = tvm.transform.Sequential(
                [
                    relax.transform.FoldConstant(),
                    *tvm_layout.relax_layout_passes(target),
                ]
            )(mod)
            mod = tvm.transform.Sequential(
                [*cpu_generic.library_dispatch_passes(target), *tvm_layout.legalize_passes(target)]
            )(mod)
            if tune > 0:
                from . import tvm_tune  # only tuned compiles pay for importing MetaSchedule

                mod = tvm_tune.tune(mod, target, tune, work_dir)
            # Schedules may repack constant weights (conv weights in register-tile order), so the weights are
            # lifted after scheduling, as the kernels read them.
            mod = tvm_schedules.ApplyCPUSchedules(target, unscheduled)(mod)
            if weights is not None:
                mod, lifted = lift_weights(mod)
                weights.extend(lifted)
            mod = tvm.transform.Sequential(
                [*cpu_generic.pipeline.dataflow_lower_passes(target), *cpu_generic.finalize_passes(target)]
            )(mod)
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
) -> relax.Executable:
    """Compile a Relax module for a table row (lifting the weights into ``weights`` and naming the kernels
    left unscheduled in ``unscheduled`` when given)."""
    target = build_target(spec)
    pipeline = _relax_pipeline(spec, target, tune, work_dir, weights, unscheduled)
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
    lines += ["", "`manifest.json` lists the sha256 of every file; check them with `sha256sum`.", ""]
    return "\n".join(lines)


def compile_bundle(
    model_path: str | Path,
    target: str,
    out_dir: str | Path | None = None,
    tune: int = 0,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> Path:
    """Compile an ONNX model into a bundle for a target (see :mod:`onnxprune.targets.bundle`).

    Kernels no CPU schedule applied to (they run as naive loop nests, 30-100x slower) are listed in the
    manifest's ``unscheduled_kernels`` (with ``unscheduled_kernel_count``); the reasons are logged at INFO
    on the ``onnxprune.targets`` logger.
    """
    if tune < 0:
        raise UsageError("--tune must be >= 0")
    spec = get_target(target)
    model_path = Path(model_path)
    model = _load(model_path)
    inputs, outputs = B.model_signature(model, shapes)
    out = Path(out_dir) if out_dir is not None else model_path.with_name(f"{model_path.stem}.{spec.name}")
    # Check the toolchain before the slow part.
    require(spec.compiler, f"to build {spec.name} bundles")
    spec.exporter.check_toolchain(spec)
    t0 = time.perf_counter()
    mod = import_onnx(model, inputs)
    outputs = _output_specs(mod, outputs)
    work_dir = Path(os.environ.get("ONNXPRUNE_TUNE_CACHE", Path.home() / ".cache" / "onnxprune" / "tune"))
    weights: list[np.ndarray] | None = None if spec.gpu else []
    unscheduled: dict[str, str] = {}
    ex = build_executable(mod, spec, tune=tune, work_dir=work_dir, weights=weights, unscheduled=unscheduled)
    for kernel, reason in sorted(unscheduled.items()):
        log.info("kernel %s runs (partly) unscheduled: %s", kernel, reason)
    B.clean_dir(out)
    fields = spec.exporter.write(ex, out, spec)
    if weights:
        blob = tvm.runtime.save_param_dict(
            {f"w{i:04d}": tvm.runtime.tensor(w) for i, w in enumerate(weights)}
        )
        (out / WEIGHTS_FILE).write_bytes(blob)
        weights_field: object = {
            "file": WEIGHTS_FILE, "format": "tvm-param-dict", "count": len(weights),
            "bytes": len(blob), "passed_as": "main(inputs..., w0000, w0001, ...)",
        }  # fmt: skip
    else:
        weights_field = "embedded in the library (constants)"
    compile_s = time.perf_counter() - t0
    model_bytes = model_path.read_bytes()
    manifest: dict[str, Any] = {
        "model": {
            "name": model.graph.name or model_path.stem,
            "file": model_path.name,
            "sha256": hashlib.sha256(model_bytes).hexdigest(),
        },
        "inputs": B.spec_dicts(inputs),
        "outputs": B.spec_dicts(outputs),
        "target": {
            "name": spec.name,
            "family": spec.family,
            "arch": spec.arch,
            "tvm_target": _target_json(build_target(spec)),
        },
        "tvm_version": tvm_version(),
        "tune_trials": tune,
        "compile_seconds": round(compile_s, 3),
        "weights": weights_field,
        **fields,
        "pruning_summary": B.pruning_summary(model),
        "unscheduled_kernels": sorted(unscheduled),
        "unscheduled_kernel_count": len(unscheduled),
    }
    (out / "README.md").write_text(_readme(spec, manifest))
    B.write_manifest(out, manifest)
    json.loads((out / B.MANIFEST).read_text())
    return out
