"""Models exported by other frameworks' converters: TensorFlow/Keras (tf2onnx) and JAX/Flax (jax2onnx).

Each zoo entry of `models/zoo_frameworks.py` is pruned at 0.5 as a user would: it passes the checker,
reaches the coverage bench's bar (>= 0.9 of the asked removal for CNNs, >= 0.8 for transformers, same
definition as `bench/coverage.py`), dead-channel equivalence holds on sampled groups, and the pruned
model runs at two input sizes where the export left a dim dynamic, matching the masked original at each.
Skipped when TensorFlow/tf2onnx or JAX/jax2onnx are not installed (`models/install_zoo_deps.sh`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.importer import check_model, import_model, load_model
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.rewrite import apply_mask
from onnxprune.verify import dead_channel_check, max_rel_error, random_inputs, run

zoo = pytest.importorskip("models.zoo")

ROOT = Path(__file__).resolve().parents[1]
# name -> (dynamic dim -> two run-time sizes), reach bar
CASES = {
    "keras_mobilenet_v2": ({"unk__": (96, 128)}, 0.9),
    "jax_resnet": ({"B": (1, 3)}, 0.9),
    "jax_vit": ({"B": (1, 3)}, 0.8),
    "keras_text_transformer": ({}, 0.8),
}


def _coverage():
    spec = importlib.util.spec_from_file_location("coverage_bench", ROOT / "bench" / "coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dims(model: onnx.ModelProto, sizes: dict[str, tuple[int, int]], k: int) -> dict[str, int]:
    """Run-time sizes for the model's symbolic input dims (a prefix of the param name selects)."""
    dims = {}
    for vi in model.graph.input:
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.dim_param:
                for prefix, pair in sizes.items():
                    if d.dim_param.startswith(prefix) and not (i == 0 and prefix == "unk__"):
                        dims[d.dim_param] = pair[k]
    return dims


@pytest.mark.parametrize("name", sorted(CASES))
def test_framework_export_prunes(name):
    try:
        path = zoo.zoo_model(name)
    except zoo.ZooError as exc:
        pytest.skip(str(exc))
    sizes, bar = CASES[name]
    model = import_model(path)
    analysis = analyze(ModelGraph(model))
    rng = np.random.default_rng(0)
    probe = random_inputs(model, seed=1, dims=_dims(model, sizes, 0))
    groups = [analysis.groups[i] for i in sorted(rng.choice(len(analysis.groups), min(6, len(analysis.groups)),
                                                            replace=False))]
    for group in groups:
        assert dead_channel_check(analysis, group, probe).error <= 1e-5, f"{name} group {group.id}"

    result = PrunePass(PruneConfig(ratio=0.5)).run(model)
    check_model(result.model)
    cov = _coverage()
    transformer = zoo.ZOO[name].family == "transformer"
    graph = ModelGraph(model)
    before = cov.weight_elements(model, cov.weight_names(graph, transformer))
    assert cov.reach(result.model, before, transformer) >= bar

    masked = apply_mask(analysis, result.info["plan"].labels(analysis))
    for k in range(2 if sizes else 1):
        inputs = random_inputs(model, seed=k, dims=_dims(model, sizes, k))
        got, expected = run(result.model, inputs), run(masked, inputs)
        assert [g.shape for g in got] == [e.shape for e in expected]
        assert max_rel_error(expected, got) <= 1e-4
    # dynamic dims stay dynamic
    before_params = [d.dim_param for vi in model.graph.input for d in vi.type.tensor_type.shape.dim]
    after_params = [d.dim_param for vi in result.model.graph.input for d in vi.type.tensor_type.shape.dim]
    assert before_params == after_params


def test_stale_shape_hints_are_dropped(tmp_path):
    """A model whose exporter left value_info contradicting shape inference (jax2onnx folds NHWC/NCHW
    Transpose pairs and keeps the old shapes) loads without the hints instead of failing the checker."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])
    w = onnx.numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])], "g", [x], [y], [w],
        value_info=[helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 8, 8, 4])],  # stale NHWC hint
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "stale.onnx"
    onnx.save(model, str(path))
    loaded = load_model(path)
    assert not loaded.graph.value_info
    assert onnx.load(str(path)).graph.value_info  # the file is untouched
    # a model that is wrong without its hints still fails, with the checker's line
    bad = onnx.load(str(path))
    bad.graph.node[0].input[1] = "missing"
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    with pytest.raises(Exception, match="checker"):
        load_model(tmp_path / "bad.onnx")


def test_reshape_segments_follow_symbolic_products():
    """onnxruntime's symbolic inference names merged dynamic sizes "a*b" (factors in any order):
    ``[64*B, 64] -> [B, 64, 4, 16]`` (jax2onnx's head split) aligns B*64 with (B, 64) and 64 with
    (4, 16), so heads are found with a dynamic batch."""
    from onnxprune.rules.reshape import reshape_segments

    assert reshape_segments(("64*B", 64), ("B", 64, 4, 16)) == [([0], [0, 1]), ([1], [2, 3])]
    assert reshape_segments(("B", "T", 4, 16), ("B*T", 64)) == [([0, 1], [0]), ([2, 3], [1])]
    assert reshape_segments(("B*T", 64), ("B", "S", 64))[-1] == ([1], [2])  # unrelated symbols: no match
    assert reshape_segments(("B*T", 64), ("B", "S", 64))[0] == ([0], [0, 1])  # one frozen segment


def test_symbolic_inference_follows_reduce_prod_keepdims():
    """tf2onnx computes dynamic reshape targets as Concat(ReduceProd(Gather(Shape(x))), ...) with
    keepdims=1; the product is followed, so the reshaped sizes are known symbolically."""
    from onnx import TensorProto, helper

    from onnxprune.shape_inference import infer_shapes

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    consts = {"idx": np.array([0, 1], np.int64), "tail": np.array([8], np.int64)}
    inits = [onnx.numpy_helper.from_array(v, k) for k, v in consts.items()]
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "idx"], ["g"]),
        helper.make_node("ReduceProd", ["g"], ["p"], keepdims=1),
        helper.make_node("Concat", ["p", "tail"], ["t"], axis=0),
        helper.make_node("Reshape", ["x", "t"], ["r"]),
        helper.make_node("Relu", ["r"], ["y"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    out = infer_shapes(model, symbolic=True)
    (r,) = [vi for vi in out.graph.value_info if vi.name == "r"]
    dims = [d.dim_value or d.dim_param for d in r.type.tensor_type.shape.dim]
    assert len(dims) == 2 and dims[1] == 8 and sorted(str(dims[0]).split("*")) == ["4", "B"]
