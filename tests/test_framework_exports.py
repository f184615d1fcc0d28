"""Models from other toolchains: TensorFlow/Keras (tf2onnx), JAX/Flax (jax2onnx), and silero-vad's wheel.

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


SILERO = ("silero_vad", "silero_vad_16k_op15", "silero_vad_op18_ifless")


def _silero(name: str) -> Path:
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("silero-vad is not installed (models/install_zoo_deps.sh)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.onnx"


def _weights_everywhere(model: onnx.ModelProto) -> int:
    """Elements of Conv/LSTM weights in the main graph and every If/Loop/Scan body."""
    from onnxprune.onnx_utils import all_graphs

    total = 0
    inits = {t.name: t for g in all_graphs(model.graph) for t in g.initializer}  # outer scope included
    for g in all_graphs(model.graph):
        for node in g.node:
            if node.op_type in ("Conv", "LSTM"):
                for name in node.input[1:3] if node.op_type == "LSTM" else node.input[1:2]:
                    if name in inits:
                        total += int(np.prod(inits[name].dims))
    return total


@pytest.mark.parametrize("name", SILERO)
def test_pretrained_audio_model_with_nested_branches(name):
    """silero-vad (a pretrained voice-activity detector shipped in its PyPI wheel): STFT conv, encoder
    convs and an LSTM decoder, in the default form inside an If on the sample rate whose branches
    nest more Ifs and hold unnamed nodes and ~60 Constant nodes each. Every group passes dead-channel
    equivalence at the sample rate whose branch holds it, the pruned model matches the masked original
    at 16 kHz (512 samples) and 8 kHz (256 samples) for batch 1 and 2, and half of the weights go."""
    model = import_model(_silero(name))
    analysis = analyze(ModelGraph(model))
    assert analysis.groups
    rates = ((16000, 512),) if "16k" in name else ((16000, 512), (8000, 256))
    rng = np.random.default_rng(0)

    def feeds(sr: int, n: int, batch: int) -> dict[str, np.ndarray]:
        f = {"input": (0.1 * rng.standard_normal((batch, n))).astype(np.float32),
             "state": (0.1 * rng.standard_normal((2, batch, 128))).astype(np.float32),
             "sr": np.array(sr, dtype=np.int64)}
        return {k: v for k, v in f.items() if k in {i.name for i in model.graph.input}}

    for group in analysis.groups:
        # 1e-4: float32 re-association through the STFT magnitude and the LSTM (seen up to 1.6e-5)
        assert min(dead_channel_check(analysis, group, feeds(sr, n, 1)).error for sr, n in rates) <= 1e-4
    result = PrunePass(PruneConfig(ratio=0.5)).run(model)
    check_model(result.model)
    masked = apply_mask(analysis, result.info["plan"].labels(analysis))
    for sr, n in rates:
        for batch in (1, 2):
            inputs = feeds(sr, n, batch)
            assert max_rel_error(run(masked, inputs), run(result.model, inputs)) <= 1e-4
    removed = 1 - _weights_everywhere(result.model) / _weights_everywhere(model)
    assert removed >= 0.5 * 0.9 * (0.5 if name == "silero_vad" else 1.0)  # two branches: one sample rate each
