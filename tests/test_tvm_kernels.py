"""TVM kernels: the default CPU schedules on small graphs that exercise one kind of kernel each (odd-channel
depthwise convs, Winograd 3x3 convs with partial tiles, ReLU6 kept in NHWC), executed and compared with
onnxruntime (optimisations off); skipped cleanly without TVM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tests.tvm_helpers import compile_and_check, needs_tvm, save_graph, skip_unless_tools, winograd_cnn


def odd_depthwise_cnn(path: Path) -> Path:
    """Depthwise convs with pruned-looking channel counts (37, 13: no multiple of any vector width), with
    symmetric and asymmetric padding and stride 1 and 2, between 1x1 convs."""
    rng = np.random.RandomState(1)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.randn(*shape) * 0.3).astype(np.float32), name)

    inits = [
        init("w1", 37, 3, 1, 1), init("b1", 37), init("d1", 37, 1, 3, 3), init("db1", 37),
        init("d2", 37, 1, 3, 3), init("w2", 13, 37, 1, 1), init("d3", 13, 1, 5, 5), init("db3", 13),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "d1", "db1"], ["dw1"], pads=[1, 1, 1, 1], group=37),
        helper.make_node("Relu", ["dw1"], ["r2"]),
        helper.make_node("Conv", ["r2", "d2"], ["dw2"], pads=[0, 0, 1, 1], group=37, strides=[2, 2]),
        helper.make_node("Conv", ["dw2", "w2"], ["c2"]),
        helper.make_node("Conv", ["c2", "d3", "db3"], ["y"], pads=[2, 1, 2, 3], group=13),
    ]
    return save_graph(path, nodes, inits, "odd_depthwise", [1, 3, 17, 17], [1, 13, 8, 8])


@needs_tvm
def test_x86_odd_channel_depthwise_matches_onnxruntime(tmp_path):
    """Odd depthwise channel counts are padded to whole vectors (input zero-padded, result sliced)."""
    skip_unless_tools("g++", package_hint="apt-get install g++")
    compile_and_check(odd_depthwise_cnn(tmp_path / "m.onnx"), "x86", tmp_path / "b")


def x86_layout_module(make_model, tmp_path: Path):
    """(model file, x86 target, the model's Relax module after the layout passes: NHWC, Winograd, Clip
    rewrite) for a test that then compiles and runs the model natively."""
    skip_unless_tools("g++", package_hint="apt-get install g++")
    import tvm

    from onnxprune.targets import bundle, tvm_backend, tvm_layout
    from onnxprune.targets.table import get_target

    path = make_model(tmp_path / "m.onnx")
    model = onnx.load(path)
    inputs, _ = bundle.model_signature(model, None)
    target = tvm_backend.build_target(get_target("x86"))
    with target:
        mod = tvm.transform.Sequential(tvm_layout.relax_layout_passes(target))(
            tvm_backend.import_onnx(model, inputs)
        )
    return path, target, mod


@needs_tvm
def test_x86_winograd_convs_match_onnxruntime(tmp_path):
    """Every 3x3 conv of the model is taken by the Winograd pass, and the bundle matches onnxruntime."""
    import tvm

    from onnxprune.targets import tvm_layout, tvm_schedules, tvm_winograd

    path, target, mod = x86_layout_module(winograd_cnn, tmp_path)
    kernels = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len([k for k in kernels if k.startswith("conv2d_winograd")]) == 4, kernels
    # ... and each fused Winograd kernel (with its bias / ReLU / residual-add epilogue) gets its schedule: a
    # schedule failure would leave a naive loop nest, ~30x slower but numerically the same
    unscheduled: dict[str, str] = {}
    with target:
        mod = tvm_schedules.ApplyCPUSchedules(target, unscheduled)(
            tvm.transform.Sequential(tvm_layout.legalize_passes(target))(mod)
        )
    fused = {gv.name_hint: f for gv, f in mod.functions_items() if "winograd" in gv.name_hint}
    assert len(fused) == 4 and all(f.attrs.get("tirx.is_scheduled", 0) for f in fused.values()), list(fused)
    assert unscheduled == {}
    assert tvm_winograd.tile_size(15, 15) == 4 and tvm_winograd.tile_size(7, 7) == 2
    compile_and_check(path, "x86", tmp_path / "b")


def clip_cnn(path: Path) -> Path:
    """ReLU6 (Clip 0..6, bounds as inputs), a Clip with only a lower bound, and one with only an upper bound."""
    rng = np.random.RandomState(3)
    inits = [
        numpy_helper.from_array((rng.randn(32, 3, 3, 3) * 2).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.randn(32, 1, 3, 3)).astype(np.float32), "wd"),
        numpy_helper.from_array((rng.randn(16, 32, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
        numpy_helper.from_array(np.array(-1.5, np.float32), "lo2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
        helper.make_node("Conv", ["r1", "wd"], ["dw"], pads=[1, 1, 1, 1], group=32),
        helper.make_node("Clip", ["dw", "lo2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w2"], ["c2"]),
        helper.make_node("Clip", ["c2", "", "hi"], ["y"]),
    ]
    return save_graph(path, nodes, inits, "clip", [1, 3, 12, 12], [1, 16, 12, 12])


@needs_tvm
def test_clip_stays_in_nhwc_and_matches_onnxruntime(tmp_path):
    """Clip (ReLU6) becomes layout-free maximum/minimum, so ConvertLayout adds no transposes around it."""
    path, _, mod = x86_layout_module(clip_cnn, tmp_path)
    text = mod["main"].script()
    assert text.count("R.permute_dims(") == 2, text  # the model's input and output only
    assert "R.call_tir(" not in text, text
    compile_and_check(path, "x86", tmp_path / "b")
