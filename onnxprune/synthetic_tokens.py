"""Synthetic calibration inputs for token-id models (``--calib synthetic`` on BERT-, GPT- or LLaMA-like exports).

`onnxprune.synthetic` distils images from BatchNorm statistics; a transformer that reads token ids has no such
statistics, and ids cannot be optimised by gradient. What the model does say is which ids it was trained on:
an embedding row that training never updated (BERT's ``[unusedN]`` rows, padding rows, the rare characters of
a byte vocabulary) keeps its initialisation's small norm. Random sequences of the *trained* ids are the
calibration data; the calibrated machinery (OBS scores, least-squares and sequential repair) then runs on them
unchanged. Start reading at `token_samples`.

Steps (`token_spec`):

1. The token-id input: an integer graph input from which integer tensors (Cast, Reshape, Unsqueeze, the
   negative-index wrap of tf2onnx, ...) reach the indices of a Gather whose table is a rank-2 initializer.
   Of several, the one with the largest table is the vocabulary (the others are segment or position tables).
2. The other inputs by role: a name with ``mask`` gets ones, ``type`` / ``segment`` zeros, ``position`` the
   positions 0..L-1; an input that reaches a table of at most 16 rows also gets zeros, one that reaches a table
   of the vocabulary's size gets sequences of its own (an encoder-decoder's ``decoder_input_ids``: T5, BART).
   Any other input is a one-line `UnsupportedModelError` naming it.
3. Ids uniform over the rows whose norm is at least `TRAINED_NORM` x the median row norm. A model with random
   weights keeps every row.
4. Sequences of the input's static length, or `DEFAULT_LENGTH` tokens where the length is dynamic, fewer
   when another table a Gather reads is shorter (learned positions, rotary caches). The model is not changed:
   calibration arrays may take any size on a symbolic axis.

Measured (bench/minilm_accuracy.py --calib-source synthetic, all-MiniLM-L6-v2, 300 test sentences, mean cosine
of the pruned vs original sentence embeddings; heads + FFN, uniform allocation; real = 1,024 calibration
sentences packed into 346 x 32 tokens; bench/minilm_results.txt)::

    prunable params removed                      10%     20%     30%     40%     50%
    l2, no repair (the data-free path before)   0.918   0.837   0.767   0.699   0.612
    obs + ls, synthetic (512 x 32 trained ids)  0.965   0.925   0.876   0.840   0.772
    obs + ls, real sentences                    0.988   0.980   0.971   0.948   0.930

    variants, obs + ls at 20% / 40%: 256 x 64 ids 0.901 / 0.809; 256 x 32 0.921 / 0.832; 1024 x 16 0.931 / 0.851;
    128 x 128 0.885 / 0.789; every id rather than the trained rows -0.004 / -0.006; allocation knapsack
    0.942 / 0.864, lamp 0.938 / 0.860 (real sentences, knapsack: 0.990 / 0.970)

Random ids recover about two thirds of what real text gives over no data; shorter sequences and more of them
help at the same token count (this model's sentences are short), hence 32 tokens by default. Not done:
sequences sampled from a causal LM's own next-token distribution (LLM-QAT's self-generated data), which would
need a pretrained LM to measure.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.errors import UnsupportedModelError
from onnxprune.external import tensor_array
from onnxprune.onnx_utils import light_copy

__all__ = ["DEFAULT_LENGTH", "DEFAULT_SEQUENCES", "TRAINED_NORM", "TokenSpec", "token_samples", "token_spec"]

DEFAULT_LENGTH = 32  # tokens per synthetic sequence where the model's length is dynamic
DEFAULT_SEQUENCES = 512  # sequences of `synthetic` without N (16k tokens; a forward pass each, no optimisation)
TRAINED_NORM = 0.6  # a row below this fraction of the median row norm is taken as never trained
SMALL_TABLE = 16  # a Gather table of at most this many rows reads segment / token-type ids: zeros

_INTEGER = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
            onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}
_INDEX_TYPES = _INTEGER | {onnx.TensorProto.BOOL}


@dataclass(frozen=True)
class TokenSpec:
    """What to feed a token-id model: the ids input, its table's trained rows, and every input's role."""

    ids: str
    vocab: int
    trained: np.ndarray  # the ids drawn from
    roles: dict[str, str]  # input name -> "ids" | "more_ids" | "ones" | "zeros" | "positions"
    dtypes: dict[str, np.dtype]
    dims: dict[str, tuple[int, ...]]  # static sizes after the batch axis (0: dynamic)
    length: int = DEFAULT_LENGTH  # tokens per sequence where the length is dynamic


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Every tensor's element type, by onnx type inference on `onnx_utils.light_copy` (the model as loaded has
    no value_info yet; a copy with its weights would double a large model's memory)."""
    try:
        graph = onnx.shape_inference.infer_shapes(light_copy(model)).graph
    except Exception:  # a model onnx cannot type (custom domains): types from what the model declares
        graph = model.graph
    return {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.input, *graph.value_info, *graph.output]}


def _tables(model: onnx.ModelProto, types: dict[str, int], name: str) -> list[onnx.TensorProto]:
    """Rank-2 initializer tables whose Gather indices are computed from graph input `name`: the search follows
    integer and bool tensors through any op (Cast, Reshape, Unsqueeze; tf2onnx's negative-index wrap
    ``where(i < 0, i + n, i)`` as Less / Add / Mul), never a float one (an attention mask cast to float)."""
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node)
    found, todo, seen = [], [name], {name}
    while todo:
        t = todo.pop()
        for node in readers.get(t, []):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == t:
                if node.input[0] in inits and len(inits[node.input[0]].dims) == 2:
                    found.append(inits[node.input[0]])
                continue
            for out in node.output:
                if out and out not in seen and types.get(out) in _INDEX_TYPES:
                    seen.add(out)
                    todo.append(out)
    return found


def token_spec(model: onnx.ModelProto) -> TokenSpec | None:
    """The token-id inputs of `model` and their roles (steps 1-3 above); None when no integer input reads an
    embedding table (not a token model: `onnxprune.synthetic` handles it or says why not).

    Raises:
        UnsupportedModelError: a token model with an input whose role cannot be told (named).
    """
    inits = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    if not any(vi.type.tensor_type.elem_type in _INTEGER for vi in inputs):
        return None  # an image or feature model: no type inference needed
    types = _element_types(model)
    tables = {vi.name: _tables(model, types, vi.name) for vi in inputs if vi.type.tensor_type.elem_type in _INTEGER}
    vocab_of = {name: max(int(t.dims[0]) for t in found) for name, found in tables.items() if found}
    if not vocab_of:
        return None
    ids = max(vocab_of, key=lambda k: (vocab_of[k], k))
    roles: dict[str, str] = {}
    for vi in inputs:
        low = vi.name.lower()
        if vi.name == ids:
            roles[vi.name] = "ids"
        elif "mask" in low:
            roles[vi.name] = "ones"
        elif "position" in low:
            roles[vi.name] = "positions"
        elif "type" in low or "segment" in low or vocab_of.get(vi.name, SMALL_TABLE + 1) <= SMALL_TABLE:
            roles[vi.name] = "zeros"
        elif vocab_of.get(vi.name) == vocab_of[ids]:
            roles[vi.name] = "more_ids"  # another sequence over the vocabulary: an encoder-decoder's decoder ids
        else:
            raise UnsupportedModelError(f"synthetic calibration: cannot tell what input {vi.name!r} of this token model "
                                        "holds (token ids, attention mask, token types and position ids are known); "
                                        "pass --calib FILE.npz")
    table = max(tables[ids], key=lambda t: int(t.dims[0]))
    vocab = int(table.dims[0])
    norms = _row_norms(tensor_array(table))
    trained = np.flatnonzero(norms >= TRAINED_NORM * np.median(norms))
    dtypes, dims = {}, {}
    for vi in inputs:
        dtypes[vi.name] = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = vi.type.tensor_type.shape.dim
        dims[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in list(shape)[1:])
    # a dynamic length stays within every other table a Gather reads (learned positions, rotary caches)
    rows = {t.name: int(t.dims[0]) for t in model.graph.initializer if len(t.dims) == 2}
    others = [rows[n.input[0]] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in rows]
    longest = min([r for r in others if SMALL_TABLE < r != vocab], default=DEFAULT_LENGTH)
    return TokenSpec(ids, vocab, trained, roles, dtypes, dims, min(DEFAULT_LENGTH, longest))


def _row_norms(table: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Each row's L2 norm, accumulated in float64 a chunk of rows at a time (an LLM's table is gigabytes:
    no float64 copy of all of it)."""
    return np.concatenate([np.sqrt(np.einsum("ij,ij->i", part, part, dtype=np.float64))
                           for part in (table[i : i + chunk] for i in range(0, len(table), chunk))])


def token_samples(spec: TokenSpec, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`n` random sequences of trained ids and the matching masks, types and positions: {input: [n, ...]}."""
    rng = np.random.default_rng(seed)
    shape = tuple(d or spec.length for d in spec.dims[spec.ids])
    if not all(spec.dims[spec.ids]):
        print(f"onnxprune: note: synthetic calibration: {spec.ids!r} has a dynamic length: {n} random sequences "
              f"of {spec.length} tokens", file=sys.stderr)
    print(f"onnxprune: note: synthetic calibration: a token model (no BatchNorm statistics to match): random ids "
          f"over the {len(spec.trained)} of {spec.vocab} embedding rows that look trained", file=sys.stderr)
    ids = spec.trained[rng.integers(0, len(spec.trained), size=(n, *shape))]
    out = {}
    for name, role in spec.roles.items():
        dims = tuple(d or s for d, s in zip(spec.dims[name], shape)) if len(spec.dims[name]) == len(shape) else \
            tuple(d or spec.length for d in spec.dims[name])
        if role == "ids":
            a = ids
        elif role == "more_ids":  # drawn on their own, at their own length
            own = tuple(d or spec.length for d in spec.dims[name])
            a = spec.trained[rng.integers(0, len(spec.trained), size=(n, *own))]
        elif role == "ones":
            a = np.ones((n, *dims))
        elif role == "zeros":
            a = np.zeros((n, *dims))
        else:
            a = np.broadcast_to(np.arange(dims[-1]), (n, *dims))
        out[name] = np.ascontiguousarray(a).astype(spec.dtypes[name])
    return out
