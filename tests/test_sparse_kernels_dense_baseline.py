"""The dense baseline the sparse kernels are measured against (issue 14): fast float32 ``exp`` / ``erf``
(targets/tvm_fastmath.py), row-wise softmax / LayerNorm kernels (targets/tvm_rowwise.py) and the packed,
panel-major dense matmul (targets/tvm_schedules.py) all match numpy / onnxruntime within 1e-4 relative.
Small shapes: each test compiles in seconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from onnx import helper, numpy_helper

from tests.tvm_helpers import HAVE_TVM, compile_and_check, needs_tvm, save_graph


def _build_run(fn, *arrays: np.ndarray) -> np.ndarray:
    """Compile a Relax function of constant-shaped inputs through the project's x86 pipeline and run it."""
    import tvm
    from tvm import relax

    from onnxprune.targets import tvm_backend as tb
    from onnxprune.targets.table import get_target

    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType(a.shape, str(a.dtype))) for i, a in enumerate(arrays)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(fn(*params))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tb.build_executable(bb.get(), get_target("x86")), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


@needs_tvm
def test_fast_exp_and_erf_are_accurate_and_float64_keeps_libm():
    from tvm import relax

    from onnxprune.targets import tvm_fastmath

    tvm_fastmath.install()
    x = np.concatenate([np.linspace(-90, 88, 3000), np.linspace(-6, 6, 1096)]).astype(np.float32)
    exp = _build_run(relax.op.exp, x)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(exp - ref) / ref) < 2e-6  # 3e-7 for normal results, denormals below exp(-87)
    erf = _build_run(relax.op.erf, x)
    ref_erf = np.array([math.erf(v) for v in x.astype(np.float64)])
    assert np.max(np.abs(erf - ref_erf)) < 1e-6
    # float64 keeps TVM's own lowering (libm): exact to double precision
    x64 = np.linspace(-700, 700, 512)
    assert np.allclose(_build_run(relax.op.exp, x64), np.exp(x64), rtol=1e-14, atol=0)


@needs_tvm
@pytest.mark.parametrize("shape", [(2, 3, 16, 32), (5, 48)])
def test_rowwise_softmax_and_layer_norm_match_numpy(shape):
    from tvm import relax

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    x.reshape(-1, shape[-1])[0, :] = -3e4  # a fully masked row stays finite
    y = _build_run(lambda a: relax.op.nn.softmax(a, axis=-1), x)
    e = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(y, e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    g = rng.standard_normal(shape[-1]).astype(np.float32)
    b = rng.standard_normal(shape[-1]).astype(np.float32)
    z = _build_run(lambda a: relax.op.nn.layer_norm(a, relax.const(g), relax.const(b), axes=[-1], epsilon=1e-5),
                   x + 3)  # fmt: skip
    xs = x.astype(np.float64) + 3
    ref = (xs - xs.mean(-1, keepdims=True)) / np.sqrt(xs.var(-1, keepdims=True) + 1e-5) * g + b
    np.testing.assert_allclose(z, ref, rtol=1e-4, atol=1e-4)


@needs_tvm
def test_rowwise_pass_replaces_last_axis_ops_only():
    """softmax / LayerNorm over the last axis of a whole number of vectors become row-wise kernels; other
    axes and odd row lengths keep TVM's legalization."""
    import tvm
    from tvm import relax

    from onnxprune.targets import tvm_rowwise

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 32), "float32"))
    y = relax.Var("y", relax.TensorType((4, 7), "float32"))
    with bb.function("main", [x, y]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.softmax(x, axis=-1))
            c = bb.emit(relax.op.nn.softmax(x, axis=0))
            d = bb.emit(relax.op.nn.softmax(y, axis=-1))
            out = bb.emit_output(relax.Tuple([a, c, d]))
        bb.emit_func_output(out)
    mod = tvm_rowwise.rowwise_ops(16)(bb.get())
    kernels = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernels == ["rowwise_softmax"]
    assert str(mod["main"]).count("R.nn.softmax") == 2


@needs_tvm
@pytest.mark.parametrize(("batch", "k", "n"), [(1, 64, 96), (6, 32, 128)])
def test_packed_dense_matmul_matches_onnxruntime(tmp_path: Path, batch: int, k: int, n: int):
    """A MatMul by a constant weight (its [K, N] weight repacked to [N / vec, K, vec] panels) + bias + Erf-GELU,
    batch-1 GEMV and a 3-D [1, batch, K] input."""
    if not HAVE_TVM:
        pytest.skip("apache-tvm not installed (bash .ci/install-tvm.sh)")
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")
    s2 = numpy_helper.from_array(np.array(math.sqrt(2), np.float32), "s2")
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Div", ["a", "s2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["a", "e1"], ["g"]),
             helper.make_node("Mul", ["g", "half"], ["y"])]  # fmt: skip
    x_shape = [batch, k] if batch == 1 else [1, batch, k]
    model = save_graph(tmp_path / "m.onnx", nodes, [w, b, s2, one, half], "gelu_linear", x_shape, [*x_shape[:-1], n])
    compile_and_check(model, "x86", tmp_path / "b")
