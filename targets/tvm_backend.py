"""The TVM backend: ONNX model -> Relax -> scheduled TIR -> target code -> bundle folder.

This module (with :mod:`.tvm_schedules`, which it imports) is the only place that imports tvm, and it is
itself imported lazily by :func:`onnxprune.targets.compile_bundle`, so ``onnxprune prune`` never pays the
1.5-5 s tvm import.

Pipeline (:func:`compile_bundle`):
  1. load + check the ONNX model, fix its input shapes (``--shape``), refuse ops the importer lacks;
  2. ``from_onnx`` -> Relax; fold constants, legalize to TIR, fuse;
  3. schedule every kernel: CPU rules from :mod:`.tvm_schedules` (no tuning run needed), or MetaSchedule
     tuning with a cached database when ``tune > 0``; dlight GPU rules for CUDA;
  4. build for the row's TVM target and export it the row's way (shared library, wasm, CUDA);
  5. add the runner, the TVM runtime for the target, a README and ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxprune.errors import ModelError, ToolchainError, UnsupportedModelError, UsageError

from . import bundle as B
from .table import HOST_CPU, TargetSpec, get_target
from .toolchains import RUNNER_SOURCE, build_native_runner, require, runtime_libs, tvm_version

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

__all__ = ["compile_bundle", "import_onnx", "build_target", "build_executable"]

LIBRARY = {"shared": "model.so", "wasm": "model.wasm", "cuda": "model.so"}


def build_target(spec: TargetSpec) -> "tvm.target.Target":
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
    except Exception as e:  # noqa: BLE001 - onnx raises several unrelated types for bad files
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


def import_onnx(model: onnx.ModelProto, inputs: list[B.TensorSpec]) -> "tvm.IRModule":
    """ONNX -> Relax with static input shapes, weights bound as constants."""
    from tvm.relax.frontend.onnx import from_onnx

    _check_ops(model)
    model = _fold_shape_computations(model, inputs)
    model = _fold_batchnorm(model)
    shape_dict = {s.name: list(s.shape) for s in inputs}
    dtype_dict = {s.name: s.dtype for s in inputs}
    try:
        mod = from_onnx(model, shape_dict=shape_dict, dtype_dict=dtype_dict, keep_params_in_input=False)
    except (NotImplementedError, tvm.error.OpNotImplemented) as e:
        raise UnsupportedModelError(f"TVM's ONNX importer cannot convert the model: {_one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - importer errors come as ValueError, TVMError, AssertionError…
        raise UnsupportedModelError(
            f"TVM's ONNX importer failed: {type(e).__name__}: {_one_line(e)}"
        ) from None
    return relax.transform.DecomposeOpsForInference()(mod)


def _fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold inference BatchNormalization into the preceding Conv's constant weight and bias.

    TVM decomposes BatchNormalization into subtract/divide/multiply/add on every output element (a divide per
    element in each conv kernel's epilogue); folded, the conv only adds a bias. Only a Conv whose weight (and
    bias) are initializers, whose output feeds nothing but the BatchNormalization, is folded.
    """
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    # torch's exporter shares equal tensors through Identity nodes (ResNet-50's BN statistics).
    for n in out.graph.node:
        if n.op_type == "Identity" and n.input[0] in inits:
            inits[n.output[0]] = inits[n.input[0]]
    consumers: dict[str, int] = {}
    for n in out.graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    graph_outputs = {o.name for o in out.graph.output}
    producer = {o: n for n in out.graph.node for o in n.output}
    fold: dict[str, onnx.NodeProto] = {}  # BN output -> the Conv folded into it
    for bn in out.graph.node:
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or len(bn.output) != 1:
            continue
        conv = producer.get(bn.input[0])
        if (
            conv is None or conv.op_type != "Conv" or consumers.get(conv.output[0]) != 1
            or conv.output[0] in graph_outputs
            or not all(i in inits for i in [*conv.input[1:], *bn.input[1:5]] if i)
        ):  # fmt: skip
            continue
        fold[bn.output[0]] = conv
    if not fold:
        return model
    keep, new_inits = [], []
    for bn in out.graph.node:
        conv = fold.get(bn.output[0]) if bn.op_type == "BatchNormalization" else None
        if conv is None:
            keep.append(bn)
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        g, b, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:5])
        w = numpy_helper.to_array(inits[conv.input[1]])
        bias = (
            numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
            if len(conv.input) > 2 and conv.input[2]
            else np.zeros(w.shape[0])
        )
        scale = g / np.sqrt(var + eps)
        w2 = (w.astype(np.float64) * scale.reshape(-1, *[1] * (w.ndim - 1))).astype(w.dtype)
        b2 = ((bias - mean) * scale + b).astype(w.dtype)
        wname, bname = f"{conv.output[0]}__bnfold_w", f"{conv.output[0]}__bnfold_b"
        new_inits += [numpy_helper.from_array(w2, wname), numpy_helper.from_array(b2, bname)]
        inputs = [conv.input[0], wname, bname]
        del conv.input[:]
        conv.input.extend(inputs)
        conv.output[0] = bn.output[0]
    del out.graph.node[:]
    out.graph.node.extend(keep)
    out.graph.initializer.extend(new_inits)
    used = {i for n in out.graph.node for i in n.input} | {o.name for o in out.graph.output}
    dead = [t for t in out.graph.initializer if t.name not in used]
    for t in dead:
        out.graph.initializer.remove(t)
    return out


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
    except Exception:  # noqa: BLE001 - folding is an optimisation; TVM's importer gets the original
        return model
    return out


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(e).__name__


#: Constants with fewer elements stay in the library (scalars, shapes); larger ones go to ``weights.bin``.
MIN_WEIGHT_ELEMENTS = 16
WEIGHTS_FILE = "weights.bin"


def lift_weights(mod: "tvm.IRModule") -> tuple["tvm.IRModule", list[np.ndarray]]:
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
    target: "tvm.target.Target",
    tune: int,
    work_dir: Path | None,
    weights: list | None = None,
):
    """Relax pipeline: legalize + fuse, schedule the kernels, then lower to VM code.

    With a ``weights`` list, the folded weights are lifted out of the library (:func:`lift_weights`) and
    appended to it.
    """
    from tvm.relax.backend import cpu_generic

    from . import tvm_schedules

    if spec.gpu:
        from tvm.relax.backend import cuda

        return cuda.get_default_pipeline(target)

    @tvm.transform.module_pass(opt_level=0, name="OnnxpruneCPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            mod = tvm.transform.Sequential(
                [
                    relax.transform.FoldConstant(),
                    *tvm_schedules.relax_layout_passes(target),
                ]
            )(mod)
            mod = tvm.transform.Sequential(
                [*cpu_generic.library_dispatch_passes(target), *tvm_schedules.legalize_passes(target)]
            )(mod)
            if tune > 0:
                mod = tvm_schedules.tune(mod, target, tune, work_dir)
            # Schedules may repack constant weights (conv weights in register-tile order), so the weights are
            # lifted after scheduling, as the kernels read them.
            mod = tvm_schedules.ApplyCPUSchedules(target)(mod)
            if weights is not None:
                mod, lifted = lift_weights(mod)
                weights.extend(lifted)
            mod = tvm.transform.Sequential(
                [*cpu_generic.pipeline.dataflow_lower_passes(target), *cpu_generic.finalize_passes(target)]
            )(mod)
        return mod

    return _pipeline


def build_executable(
    mod: "tvm.IRModule",
    spec: TargetSpec,
    *,
    tune: int = 0,
    work_dir: Path | None = None,
    weights: list | None = None,
) -> "relax.Executable":
    """Compile a Relax module for a table row (lifting the weights into ``weights`` when given)."""
    target = build_target(spec)
    pipeline = _relax_pipeline(spec, target, tune, work_dir, weights)
    try:
        return relax.build(mod, target, relax_pipeline=pipeline, system_lib=spec.exporter == "wasm")
    except Exception as e:  # noqa: BLE001
        if os.environ.get("ONNXPRUNE_DEBUG"):  # keep the traceback when debugging the backend
            raise
        raise UnsupportedModelError(f"TVM failed to compile for {spec.name}: {_one_line(e)}") from None


def _output_specs(mod: "tvm.IRModule", names: list[B.TensorSpec]) -> list[B.TensorSpec]:
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


def _export(ex: "relax.Executable", spec: TargetSpec, out: Path) -> dict[str, object]:
    """Write the library and the runner; return the manifest's ``library``/``runner``/``runtime`` fields."""
    from . import wasm as W

    if spec.exporter == "shared":
        cxx = require(spec.compiler, f"to link {spec.name} code")
        libs = runtime_libs(spec.arch)  # fail before the (slow) link if the runtime is missing
        if spec.arch == os.uname().machine:
            ex.export_library(str(out / "model.so"))
        else:
            from tvm.support import cc

            ex.export_library(str(out / "model.so"), fcompile=cc.cross_compiler(cxx))
        (out / "lib").mkdir()
        for lib in libs:
            shutil.copy2(lib, out / "lib" / lib.name)
        shutil.copy2(RUNNER_SOURCE, out / "runner.cc")
        build_native_runner(spec, out / "runner", out / "lib")
        return {
            "library": "model.so",
            "runner": {"program": "runner", "source": "runner.cc", "kind": spec.runner},
            "runtime": [f"lib/{p.name}" for p in libs],
        }
    if spec.exporter == "wasm":
        return W.export_wasm(ex, spec, out)
    if spec.exporter == "cuda":
        return _export_cuda(ex, spec, out)
    raise AssertionError(spec.exporter)


def _export_cuda(ex: "relax.Executable", spec: TargetSpec, out: Path) -> dict[str, object]:
    """Keep the generated CUDA C (and PTX when nvcc is present) plus the host library."""

    def walk(m):  # the CUDA module is imported by the host module, itself imported by the VM
        yield m
        for sub in m.imports:
            yield from walk(sub)

    dev = [m for m in walk(ex.mod) if m.kind == "cuda"]
    if not dev:
        raise UnsupportedModelError("TVM produced no CUDA device module")
    src = dev[0].inspect_source("")
    (out / "model.cu").write_text(src)
    fields: dict[str, object] = {
        "library": "model.so",
        "device_source": "model.cu",
        "runner": {"program": None, "kind": "cuda"},
        "runtime": [],
    }
    if spec.arch == os.uname().machine:
        ex.export_library(str(out / "model.so"))
    else:
        from tvm.support import cc

        cxx = require(spec.compiler, f"to link the {spec.name} host code")
        ex.export_library(str(out / "model.so"), fcompile=cc.cross_compiler(cxx))
    return fields


def _target_json(target: "tvm.target.Target") -> object:
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
    ]
    if spec.exporter == "shared":
        lines += [
            "Copy this whole folder to the device (it needs nothing else: `lib/` holds the TVM runtime), then:",
            "",
            "```sh",
            "mkdir -p out",
            f"./runner ./model.so out {ins}{wflag}          # add --repeat 100 to print the median latency",
            "```",
            "",
            "Rebuild the runner on the device if needed: `g++ -O2 -std=c++17 -I<tvm_ffi>/include runner.cc "
            "-o runner -Wl,--no-as-needed -Llib -ltvm_runtime -ltvm_ffi -Wl,-rpath,'$ORIGIN/lib'`.",
        ]
    elif spec.exporter == "wasm":
        lines += [
            "`model.wasm` holds the model and the TVM runtime; `runner.js` is the emscripten loader.",
            "",
            "```sh",
            "mkdir -p out",
            f"node --no-experimental-fetch runner.js system out {ins}{wflag}",
            "```",
        ]
    else:
        lines += [
            "`model.so` is the host library with the CUDA kernels embedded; `model.cu` is their CUDA C source.",
            "Load it with the TVM runtime built with CUDA (`libtvm_runtime.so` + `libtvm_runtime_cuda.so`) and",
            "call `vm_load_executable`, `vm_initialization(kDLCUDA, 0, 2, kDLCPU, 0, 2)`, then `main`.",
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
    """Compile an ONNX model into a bundle for a target (see :mod:`onnxprune.targets.bundle`)."""
    if tune < 0:
        raise UsageError("--tune must be >= 0")
    spec = get_target(target)
    model_path = Path(model_path)
    model = _load(model_path)
    inputs, outputs = B.model_signature(model, shapes)
    out = Path(out_dir) if out_dir is not None else model_path.with_name(f"{model_path.stem}.{spec.name}")
    # Check the toolchain before the slow part.
    require(spec.compiler, f"to build {spec.name} bundles")
    if spec.exporter == "shared":
        runtime_libs(spec.arch)
    t0 = time.perf_counter()
    mod = import_onnx(model, inputs)
    outputs = _output_specs(mod, outputs)
    work_dir = Path(os.environ.get("ONNXPRUNE_TUNE_CACHE", Path.home() / ".cache" / "onnxprune" / "tune"))
    weights: list[np.ndarray] | None = None if spec.gpu else []
    ex = build_executable(mod, spec, tune=tune, work_dir=work_dir, weights=weights)
    B.clean_dir(out)
    fields = _export(ex, spec, out)
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
    }
    (out / "README.md").write_text(_readme(spec, manifest))
    B.write_manifest(out, manifest)
    json.loads((out / B.MANIFEST).read_text())
    return out
