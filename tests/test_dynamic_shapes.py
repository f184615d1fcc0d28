"""Dynamic input sizes stay dynamic: run-time shape arithmetic around pruned layers.

A text recogniser takes any width: its export reads sizes at run time (Shape -> Slice -> Concat ->
Reshape) between the convolutions and an attention block. Pruning must not crash where onnx's shape
inference gives up (onnxruntime's symbolic inference needs sympy, which onnxruntime no longer installs),
must keep the graph inputs' symbolic dims, and the pruned model must match the masked original
(`rewrite.apply_mask`) at every size. Each model is checked with and without the symbolic inference.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import shape_inference
from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.importer import check_model, import_model
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.rewrite import apply_mask
from onnxprune.verify import dead_channel_check, max_rel_error, run

TOLERANCE = 1e-4  # the CLI's verification tolerance; float32 sums reordered by removed channels


@pytest.fixture(params=["symbolic", "onnx-only"])
def inference(request, monkeypatch):
    """Run each test with onnxruntime's symbolic inference and without it (no sympy installed)."""
    if request.param == "onnx-only":
        monkeypatch.setattr(shape_inference, "_symbolic_infer", lambda light: None)
    return request.param


def _const(name: str, values, dtype=np.int64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def recogniser_like(seed: int = 0) -> onnx.ModelProto:
    """Conv stem -> flatten the image by run-time sizes -> one attention block whose Reshape targets are
    built from Shape/Slice/Cast/Concat -> back to an image by run-time sizes -> conv -> a crop whose end
    is the input's width (a Slice bound computed at run time) -> conv. Input ``[batch, 3, 8, width]``.
    Opset 12, as Paddle exports it: there onnx's inference drops the first Reshape's output entirely."""
    rng = np.random.default_rng(seed)

    def weight(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    C, HEADS, HEAD_DIM = 16, 2, 8
    inits = [
        weight("w1", C, 3, 3, 3), weight("b1", C), weight("wqkv", C, 3 * HEADS * HEAD_DIM),
        weight("bqkv", 3 * HEADS * HEAD_DIM), weight("wo", HEADS * HEAD_DIM, C), weight("bo", C),
        weight("w3", 8, C, 1, 1), weight("b3", 8), weight("w4", 4, 8, 3, 3), weight("b4", 4),
        _const("zero", [0]), _const("one", [1]), _const("two", [2]), _const("three", [3]), _const("four", [4]),
        _const("minus_one", [-1]), _const("ax0", [0]), _const("ax1", [1]), _const("ax3", [3]),
        _const("c_channels", [C]), _const("heads_3", [3, HEADS, HEAD_DIM]), _const("width_hd", [HEADS * HEAD_DIM]),
        _const("scale", 0.5, np.float32),
    ]  # fmt: skip
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        n("Relu", ["c1"], ["r1"]),
        # (N, C, H, W) -> (N, C, H*W) -> (N, S, C): the target is Shape(r1)[:2] ++ [-1]
        n("Shape", ["r1"], ["r1_shape"]),
        n("Slice", ["r1_shape", "zero", "two", "ax0"], ["r1_head"]),
        n("Concat", ["r1_head", "minus_one"], ["flat_target"], axis=0),
        n("Reshape", ["r1", "flat_target"], ["flat"]),
        n("Transpose", ["flat"], ["t"], perm=[0, 2, 1]),
        n("MatMul", ["t", "wqkv"], ["qkv_mm"]),
        n("Add", ["qkv_mm", "bqkv"], ["qkv"]),
        # S read at run time through int32 casts (Paddle's export)
        n("Shape", ["t"], ["t_shape"]),
        n("Cast", ["t_shape"], ["t_shape32"], to=TensorProto.INT32),
        n("Slice", ["t_shape32", "one", "two", "ax0"], ["seq32"]),
        n("Cast", ["seq32"], ["seq"], to=TensorProto.INT64),
        n("Concat", ["zero", "seq", "heads_3"], ["qkv_target"], axis=0),
        n("Reshape", ["qkv", "qkv_target"], ["qkv5"]),
        n("Transpose", ["qkv5"], ["qkv_t"], perm=[2, 0, 3, 1, 4]),
        n("Slice", ["qkv_t", "zero", "one", "ax0"], ["q1"]),
        n("Slice", ["qkv_t", "one", "two", "ax0"], ["k1"]),
        n("Slice", ["qkv_t", "two", "three", "ax0"], ["v1"]),
        n("Squeeze", ["q1"], ["q"], axes=[0]),
        n("Squeeze", ["k1"], ["k"], axes=[0]),
        n("Squeeze", ["v1"], ["v"], axes=[0]),
        n("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        n("MatMul", ["q", "kt"], ["scores_raw"]),
        n("Mul", ["scores_raw", "scale"], ["scores"]),
        n("Softmax", ["scores"], ["attn"], axis=-1),
        n("MatMul", ["attn", "v"], ["ctx"]),
        n("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        n("Concat", ["zero", "seq", "width_hd"], ["ctx_target"], axis=0),
        n("Reshape", ["ctx_t", "ctx_target"], ["ctx_flat"]),
        n("MatMul", ["ctx_flat", "wo"], ["o_mm"]),
        n("Add", ["o_mm", "bo"], ["o"]),
        n("Add", ["o", "t"], ["res"]),
        # (N, S, C) -> (N, C, S) -> (N, C, H, W): the target is Shape(r1)[:1] ++ [C] ++ Shape(r1)[2:]
        n("Transpose", ["res"], ["res_t"], perm=[0, 2, 1]),
        n("Slice", ["r1_shape", "zero", "one", "ax0"], ["batch"]),
        n("Slice", ["r1_shape", "two", "four", "ax0"], ["spatial"]),
        n("Concat", ["batch", "c_channels", "spatial"], ["image_target"], axis=0),
        n("Reshape", ["res_t", "image_target"], ["image"]),
        n("Conv", ["image", "w3", "b3"], ["c3"]),
        n("Relu", ["c3"], ["r3"]),
        # crop to the input's width, read at run time, then the last conv
        n("Shape", ["x"], ["x_shape"]),
        n("Slice", ["x_shape", "three", "four", "ax0"], ["x_width"]),
        n("Slice", ["r3", "zero", "x_width", "ax3"], ["r3_crop"]),
        n("Conv", ["r3_crop", "w4", "b4"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "recogniser_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, "width"])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])


def _input_dims(model: onnx.ModelProto) -> list[list[int | str]]:
    return [[d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim] for vi in model.graph.input]


def _prune_and_compare(model, sizes, *, min_groups=1, sampled_groups=4):
    """Prune at 0.5; the pruned model keeps the inputs' dims and equals the masked original at each size."""
    analysis = analyze(ModelGraph(model))
    assert len(analysis.groups) >= min_groups, [str(b.as_dict()) for b in analysis.barriers][:5]
    result = PrunePass(PruneConfig(ratio=0.5)).run(model)
    pruned = result.model
    check_model(pruned)
    assert _input_dims(pruned) == _input_dims(model)
    assert any(isinstance(d, str) for dims in _input_dims(pruned) for d in dims)
    masked = apply_mask(analysis, result.info["plan"].labels(analysis))
    name = model.graph.input[0].name
    for size in sizes:
        x = {name: np.random.default_rng(sum(size)).standard_normal(size).astype(np.float32)}
        expected, got = run(masked, x), run(pruned, x)
        assert max_rel_error(expected, got) <= TOLERANCE, (size, max_rel_error(expected, got))
    groups = analysis.groups
    rng = np.random.default_rng(0)
    if len(groups) > sampled_groups:
        groups = [groups[i] for i in sorted(rng.choice(len(groups), sampled_groups, replace=False))]
    x = {name: np.random.default_rng(1).standard_normal(sizes[0]).astype(np.float32)}
    for group in groups:
        assert dead_channel_check(analysis, group, x).error <= 1e-5, group.id
    return analysis, result


def test_recogniser_like_prunes_and_stays_dynamic(tmp_path, inference):
    path = tmp_path / "rec.onnx"
    onnx.save(recogniser_like(), path)
    model = import_model(path)
    analysis, result = _prune_and_compare(model, [(1, 3, 8, 5), (2, 3, 8, 12), (1, 3, 8, 33)], min_groups=3)
    assert not analysis.barriers, [b.as_dict() for b in analysis.barriers]
    sizes = sorted(g.size for g in analysis.groups)
    assert sizes == [2, 8, 16], sizes  # attention heads, conv3's channels, the residual stream
    out = run(result.model, {"x": np.zeros((2, 3, 8, 7), np.float32)})[0]
    assert out.shape == (2, 4, 8, 7)


def test_runtime_slice_bounds_freeze_only_the_sliced_axis(inference):
    """A crop whose end is read at run time keeps the channel axis it does not slice prunable."""
    from conftest import canonical

    analysis = analyze(ModelGraph(canonical(recogniser_like())))
    crossing = [g for g in analysis.groups if {"w3", "w4"} <= {m.tensor for m in g.param_members}]
    assert len(crossing) == 1 and crossing[0].size == 8


def test_slice_of_unshaped_tensor_is_a_barrier():
    """Where even the rank is unknown, Slice refuses with a barrier instead of crashing the analysis."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("NonZero", ["x"], ["nz"]),  # data-dependent size: a stand-in for "unknown"
        helper.make_node("Cast", ["nz"], ["nzf"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["nzf", "shape"], ["r"]),
        helper.make_node("Slice", ["r", "s0", "s1", "a0"], ["y"]),
    ]
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, [None])
    inits = [_const("s0", [0]), _const("s1", [1]), _const("a0", [0])]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x, shape], [y], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    graph = ModelGraph(shape_inference.infer_shapes(model, symbolic=False))
    assert graph.shape("r") is None
    analysis = analyze(graph)
    assert any(b.op_type == "Slice" and "rank unknown" in b.reason for b in analysis.barriers)


def test_expand_to_a_runtime_target_keeps_its_sizes():
    """torch's ``x.expand(-1, 2, -1, -1)`` (grouped-query attention repeats key/value heads this way) becomes
    Expand to Where(Equal(s, -1), 1, s) with s built at run time; onnx drops the output sizes, the
    completion gives them back: -1 keeps the input's size, 2 is the new one."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, "seq", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    n = helper.make_node
    nodes = [
        n("Shape", ["x"], ["xs"]),
        n("Gather", ["xs", "i2"], ["seq"], axis=0),
        n("Concat", ["minus_one", "two", "seq", "minus_one"], ["sizes"], axis=0),
        n("Equal", ["sizes", "minus_ones"], ["is_keep"]),
        n("Where", ["is_keep", "ones", "sizes"], ["target"]),
        n("Expand", ["x", "target"], ["y"]),
    ]
    inits = [_const("i2", [2]), _const("minus_one", [-1]), _const("two", [2]), _const("minus_ones", [-1] * 4),
             _const("ones", [1] * 4)]  # fmt: skip
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    graph = ModelGraph(shape_inference.infer_shapes(model, symbolic=False))
    assert graph.shape("y") == (1, 2, "seq", 8)


# ------------------------------------------------------------------------------------------------
# the PP-OCR models as the rapidocr-onnxruntime wheel ships them (dynamic inputs)
# ------------------------------------------------------------------------------------------------
WHEEL = "rapidocr_onnxruntime"


def _wheel_model(file: str) -> Path:
    spec = importlib.util.find_spec(WHEEL)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{WHEEL} is not installed (pip install --no-deps rapidocr-onnxruntime==1.4.4)")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / file
    if not path.is_file():
        pytest.skip(f"{path} missing from the installed {WHEEL}")
    return path


def _before_sigmoid(model: onnx.ModelProto) -> onnx.ModelProto:
    """The detector ends in DB binarisation (a sigmoid of 50x its input), which saturates: compare the
    logits that feed it, as tests/test_zoo_pruning.py does."""
    from onnxprune.importer import canonicalize

    producers = {o: node for node in model.graph.node for o in node.output}
    last = producers[model.graph.output[0].name]
    assert last.op_type == "Sigmoid"
    del model.graph.output[:]
    model.graph.output.append(helper.make_empty_tensor_value_info(last.input[0]))
    return canonicalize(model)[0]


def test_ppocrv4_rec_dynamic_width(inference):
    model = import_model(_wheel_model("ch_PP-OCRv4_rec_infer.onnx"))
    analysis, result = _prune_and_compare(model, [(1, 3, 48, 160), (2, 3, 48, 320)], min_groups=20)
    assert not analysis.barriers, [b.as_dict() for b in analysis.barriers]
    for width in (160, 640):
        out = run(result.model, {"x": np.zeros((1, 3, 48, width), np.float32)})[0]
        assert out.shape[:2] == (1, width // 8)


DET, CLS = "ch_PP-OCRv4_det_infer.onnx", "ch_ppocr_mobile_v2.0_cls_infer.onnx"


# onnxruntime's symbolic inference of the detector takes minutes (every rewrite re-infers it), so the
# detector runs on the onnx-only path, which is also the harder one.
@pytest.mark.parametrize(
    ("file", "sizes", "symbolic"),
    [(DET, [(1, 3, 64, 96), (2, 3, 96, 64)], False),
     (CLS, [(1, 3, 48, 192), (2, 3, 48, 100)], False),
     (CLS, [(1, 3, 48, 192), (2, 3, 48, 100)], True)],
)  # fmt: skip
def test_ppocr_det_cls_dynamic_sizes(file, sizes, symbolic, monkeypatch):
    if not symbolic:
        monkeypatch.setattr(shape_inference, "_symbolic_infer", lambda light: None)
    model = import_model(_wheel_model(file))
    if file == DET:
        model = _before_sigmoid(model)
    analysis, _ = _prune_and_compare(model, sizes, min_groups=5)
    assert not analysis.barriers, [b.as_dict() for b in analysis.barriers]
