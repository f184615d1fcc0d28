"""Data-free calibration of token-id models (`onnxprune.synthetic_tokens`) and the calibrated machinery on
transformer exports whose linear layers read ``[batch x seq, F]`` (GPT-2's Gemm): statistics per sample, the
sequential repair end to end, compared with the original in onnxruntime."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.calibration import CalibrationData, collect_stats, consumers, sample_parts
from onnxprune.errors import UnsupportedModelError
from onnxprune.graph import ModelGraph
from onnxprune.importer import canonicalize, import_model
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.synthetic import synthesize
from onnxprune.synthetic_tokens import DEFAULT_LENGTH, token_spec
from onnxprune.verify import run

VOCAB, HIDDEN, FFN = 50, 16, 32


def _token_model(extra_inputs: tuple[str, ...] = ("attention_mask", "token_type_ids"), untrained: int = 5,
                 seq: int | str = "seq", batch: int = 1) -> onnx.ModelProto:
    """Embedding (+ token types) -> MatMul -> Relu -> MatMul, masked by the attention mask: a token model
    with `untrained` embedding rows at a small norm (never updated by training)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    table[:untrained] *= 0.05
    inits = {"emb": table, "types": rng.standard_normal((2, HIDDEN)).astype(np.float32),
             # correlated FFN channels (rank 8 + noise), as trained FFNs have: what a repair can recover
             "w1": (rng.standard_normal((HIDDEN, 8)) @ rng.standard_normal((8, FFN)) / 8
                    + rng.standard_normal((HIDDEN, FFN)) / 40).astype(np.float32),
             "w2": rng.standard_normal((FFN, HIDDEN)).astype(np.float32) / 6}
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"])]
    last = "e"
    if "token_type_ids" in extra_inputs:
        nodes += [helper.make_node("Gather", ["types", "token_type_ids"], ["t"]), helper.make_node("Add", ["e", "t"], ["et"])]
        last = "et"
    if "position_ids" in extra_inputs:  # learned positions: a 20-row table
        inits["pos"] = rng.standard_normal((20, HIDDEN)).astype(np.float32)
        nodes += [helper.make_node("Gather", ["pos", "position_ids"], ["p"]), helper.make_node("Add", [last, "p"], ["ep"])]
        last = "ep"
    nodes += [helper.make_node("MatMul", [last, "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
              helper.make_node("MatMul", ["r", "w2"], ["o"])]
    out = "o"
    if "attention_mask" in extra_inputs:
        nodes += [helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
                  helper.make_node("Unsqueeze", ["mf", "axes"], ["mu"]), helper.make_node("Mul", ["o", "mu"], ["y"])]
        inits["axes"] = np.array([-1], np.int64)
        out = "y"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.INT64, [batch, seq]) for n in extra_inputs]
    graph = helper.make_graph(nodes, "tokens", inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, seq, HIDDEN])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return canonicalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))[0]


def test_roles_and_trained_rows():
    spec = token_spec(_token_model())
    assert spec is not None and spec.ids == "input_ids" and spec.vocab == VOCAB
    assert spec.roles == {"input_ids": "ids", "attention_mask": "ones", "token_type_ids": "zeros"}
    assert set(spec.trained) == set(range(5, VOCAB))  # the five small-norm rows are left out
    data = synthesize(_token_model(), 8, seed=3)
    assert data["input_ids"].shape == (8, DEFAULT_LENGTH) and data["input_ids"].dtype == np.int64
    assert data["input_ids"].min() >= 5 and np.all(data["attention_mask"] == 1) and np.all(data["token_type_ids"] == 0)
    assert np.array_equal(synthesize(_token_model(), 8, seed=3)["input_ids"], data["input_ids"])  # deterministic


def test_static_length_and_image_models_are_not_token_models():
    data = synthesize(_token_model(extra_inputs=(), seq=12), 4)
    assert data["input_ids"].shape == (4, 12)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    conv = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g", [x],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
                             [numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")])
    assert token_spec(helper.make_model(conv)) is None


def test_positions_count_from_zero_and_bound_the_length():
    model = _token_model(extra_inputs=("position_ids",))
    assert token_spec(model).roles == {"input_ids": "ids", "position_ids": "positions"}
    data = synthesize(model, 3)
    assert data["input_ids"].shape == (3, 20)  # the 20-row position table, not DEFAULT_LENGTH
    assert np.array_equal(data["position_ids"], np.tile(np.arange(20), (3, 1)))
    assert run(model, {k: v[:1] for k, v in data.items()})[0].shape == (1, 20, HIDDEN)


def _synthetic_cli_error(model: onnx.ModelProto, tmp_path) -> str:
    """The one error line of ``onnxprune prune --calib synthetic:4`` on `model` (exit 1, nothing written)."""
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    proc = subprocess.run([sys.executable, "-m", "onnxprune.cli", "prune", str(path), "-o", str(tmp_path / "o.onnx"),
                           "--round-to", "1", "--criterion", "obs", "--repair", "ls", "--calib", "synthetic:4"],
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "note:" not in line]
    assert len(lines) == 1 and not (tmp_path / "o.onnx").exists(), proc.stderr
    return lines[0]


def test_decoder_ids_of_an_encoder_decoder_get_sequences_of_their_own():
    """T5 / BART read ``decoder_input_ids`` through the same embedding table as the encoder's ids: they get random
    trained ids at their own length (the input was refused: "cannot tell what input ... holds")."""
    model = _token_model(extra_inputs=("attention_mask",))
    model.graph.input.append(helper.make_tensor_value_info("decoder_input_ids", TensorProto.INT64, [1, 7]))
    model.graph.node.append(helper.make_node("Gather", ["emb", "decoder_input_ids"], ["dec"]))
    model.graph.output.append(helper.make_tensor_value_info("dec", TensorProto.FLOAT, [1, 7, HIDDEN]))
    spec = token_spec(model)
    assert spec is not None and spec.roles["decoder_input_ids"] == "more_ids" and spec.ids == "input_ids"
    data = synthesize(model, 4, seed=1)
    dec = data["decoder_input_ids"]
    assert dec.shape == (4, 7) and dec.dtype == np.int64 and dec.min() >= 5 and dec.max() < VOCAB
    assert data["input_ids"].shape == (4, DEFAULT_LENGTH)


def test_unknown_input_is_one_line_exit_1(tmp_path):
    model = _token_model(extra_inputs=("attention_mask", "cache_index"))
    with pytest.raises(UnsupportedModelError, match="'cache_index'"):
        token_spec(model)
    assert "cache_index" in _synthetic_cli_error(model, tmp_path)


def _fit_error(model, pruned, inputs) -> float:
    """Relative L2 error of the pruned model's outputs against the original's."""
    ref, got = run(model, inputs)[0], run(pruned, inputs)[0]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("repair", ["ls", "seq"])
def test_data_free_repair_of_a_token_model_beats_no_repair(repair):
    """Pruned at 40% with synthetic token data and repaired: nearer the original on held-out random sequences
    than pruned without repair (obs then scores for no repair; the FFN's outputs are not refitted)."""
    model = _token_model()
    data = CalibrationData(synthesize(model, 64, seed=0))
    cfg = {"criterion": "obs", "ratio": 0.4, "round_to": 1}
    repaired = PrunePass(PruneConfig(repair=repair, **cfg), calib=data).run(model).model
    plain = PrunePass(PruneConfig(repair="none", **cfg), calib=data).run(model).model
    held = synthesize(model, 4, seed=9)
    errs = [(_fit_error(model, repaired, s), _fit_error(model, plain, s))
            for s in ({k: v[i : i + 1] for k, v in held.items()} for i in range(4))]
    assert np.mean([e[0] for e in errs]) < 0.75 * np.mean([e[1] for e in errs]), errs


def test_sample_parts_keep_every_row_of_one_sample():
    x = np.arange(24).reshape(6, 4)
    assert sample_parts(x, 1)[0] is x  # [seq, F] of one sample: every token (x[0:1] took the first)
    assert [p.tolist() for p in sample_parts(x[:2], 2)] == [[x[0].tolist()], [x[1].tolist()]]
    with pytest.raises(ValueError):
        sample_parts(x, 2)  # [batch x seq, F]: collect_stats runs such models one sample at a time


def _zoo(name: str) -> onnx.ModelProto:
    zoo = pytest.importorskip("models.zoo")
    try:
        return import_model(zoo.zoo_model(name))
    except zoo.ZooError as exc:
        pytest.skip(str(exc))


def test_gpt2_statistics_take_every_token_batched_or_not():
    """GPT-2's linear layers are Gemm on [batch x seq, F]: every sample contributes its seq rows, and the
    Hessians are the same whether samples run 16 at a time or one by one (they took one row each before)."""
    model = _zoo("gpt2_tiny_dynseq")
    data = CalibrationData({"input_ids": np.random.default_rng(0).integers(0, 1000, (6, 10))})
    gemms = [c for c in consumers(ModelGraph(model)) if c.node.op_type == "Gemm"]
    assert gemms
    batched = collect_stats(model, data, gemms, moments=False, batch=16)
    single = collect_stats(model, data, gemms, moments=False, batch=1)
    for c in gemms:
        assert batched.stats[c.name].rows == single.stats[c.name].rows == 6 * 10
        np.testing.assert_allclose(batched.stats[c.name].hessian, single.stats[c.name].hessian, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2_tiny_dynseq", "llama_tiny_dynseq"])
def test_decoder_seq_repair_with_synthetic_tokens(name):
    """obs + seq on synthetic token data runs on decoder exports (GPT-2: Gemm on flattened tokens, a shape
    scalar in the repair's frontier cache) and brings the pruned model nearer the original than no repair."""
    model = _zoo(name)
    data = CalibrationData(synthesize(model, 128, seed=0))  # 16 sequences overfit the random-weight LLaMA
    cfg = {"criterion": "obs", "ratio": 0.3, "round_to": 1}
    repaired = PrunePass(PruneConfig(repair="seq", **cfg), calib=data).run(model).model
    plain = PrunePass(PruneConfig(repair="none", **cfg), calib=data).run(model).model
    rng = np.random.default_rng(5)
    for length in (12, 48):  # other lengths than the calibration's: the repair is not tied to it
        sample = {"input_ids": rng.integers(0, 1000, (1, length))}
        assert _fit_error(model, repaired, sample) < _fit_error(model, plain, sample)


def test_wrapped_indices_are_followed_and_a_float_mask_is_not():
    """tf2onnx wraps negative ids (``where(i < 0, i + n, i)``) before the Gather: the ids are found through
    integer arithmetic; an integer input cast to float (a mask) never reaches a table."""
    rng = np.random.default_rng(1)
    inits = {"emb": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "zero": np.array(0, np.int64),
             "n": np.array(VOCAB, np.int64), "w": rng.standard_normal((HIDDEN, 4)).astype(np.float32),
             "axes": np.array([-1], np.int64)}
    nodes = [helper.make_node("Less", ["tokens", "zero"], ["neg"]), helper.make_node("Add", ["tokens", "n"], ["up"]),
             helper.make_node("Where", ["neg", "up", "tokens"], ["idx"]), helper.make_node("Gather", ["emb", "idx"], ["e"]),
             helper.make_node("Cast", ["keep"], ["kf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["kf", "axes"], ["ku"]), helper.make_node("Mul", ["e", "ku"], ["em"]),
             helper.make_node("MatMul", ["em", "w"], ["y"])]
    graph = helper.make_graph(nodes, "wrap", [helper.make_tensor_value_info(n, TensorProto.INT64, [1, 8]) for n in ("tokens", "keep")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])  # as loaded: no value_info
    with pytest.raises(UnsupportedModelError, match="'keep'"):  # not a known role, and not token ids
        token_spec(model)
    spec = token_spec(_renamed(model, "keep", "attention_mask"))
    assert spec.ids == "tokens" and spec.roles["attention_mask"] == "ones"


def _renamed(model: onnx.ModelProto, old: str, new: str) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in out.graph.input:
        if vi.name == old:
            vi.name = new
    for node in out.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
    return out


def test_a_fixed_batch_above_one_runs_its_inputs_two_at_a_time(tmp_path):
    """A model exported at batch 2 (torch.export's default) calibrates on synthetic tokens, two per run; a single
    synthetic input is less than one run: one line, exit 1."""
    path = tmp_path / "m.onnx"
    onnx.save(_token_model(extra_inputs=(), seq=8, batch=2), path)
    proc = subprocess.run([sys.executable, "-m", "onnxprune.cli", "prune", str(path), "-o", str(tmp_path / "o.onnx"),
                           "--round-to", "1", "--criterion", "obs", "--repair", "seq", "--calib", "synthetic:8",
                           "--verify", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["verification"]["inputs"] == "calibration: 4 runs of 2 inputs" and out["repair"]["repaired"] > 0
    (tmp_path / "o.onnx").unlink()
    proc = subprocess.run([sys.executable, "-m", "onnxprune.cli", "prune", str(path), "-o", str(tmp_path / "o.onnx"),
                           "--criterion", "obs", "--repair", "seq", "--calib", "synthetic:1"], capture_output=True, text=True)
    lines = [line for line in proc.stderr.splitlines() if "note:" not in line]
    assert proc.returncode == 1 and len(lines) == 1 and "fixed batch of 2" in lines[0], proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_keras_export_is_a_token_model():
    model = _zoo("keras_text_transformer")
    spec = token_spec(model)
    assert spec is not None and spec.roles == {"tokens": "ids"} and spec.vocab == 1000


def test_data_free_minilm_beats_the_data_free_baseline():
    """The pretrained all-MiniLM-L6-v2, 20% of its heads + FFN removed: obs + ls on synthetic token sequences keeps
    the sentence embeddings much nearer the original's than l2 without repair (bench/minilm_accuracy.py: 0.925 vs
    0.837 on 300 sentences, real sentences 0.980)."""
    pytest.importorskip("tokenizers")
    from bench.minilm_accuracy import cosine, embed, encode, sentences, tokenizer
    from onnxprune.channels import analyze
    from onnxprune.metrics import count_params

    model = _zoo("minilm_l6")
    tok = tokenizer()
    test = encode(tok, sentences(60, seed=7)[:40])
    ref = embed(model, test)
    graph = ModelGraph(model)
    keep = str(count_params(graph) - round(0.2 * analyze(graph).prunable_params))
    data = CalibrationData(synthesize(model, 128, seed=0))
    repaired = PrunePass(PruneConfig(criterion="obs", repair="ls", allocation="uniform", target_params=keep),
                         calib=data).run(model).model
    baseline = PrunePass(PruneConfig(criterion="l2", repair="none", allocation="uniform", target_params=keep)).run(model).model
    got, base = cosine(embed(repaired, test), ref), cosine(embed(baseline, test), ref)
    assert got > base + 0.05, (got, base)
