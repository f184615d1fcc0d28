"""A LLaMA-style decoder-only model built directly with onnx helpers, weights streamed to external data.

    python -m models.decoder OUT_DIR [--layers 20 --hidden 2048 --heads 32 --kv-heads 8 --ffn 5632]

Each layer: RMSNorm (Pow / ReduceMean / Add / Sqrt / Div / Mul) -> q/k/v MatMuls -> RoPE (rotate-half with
Slice/Neg/Concat and cos/sin tables) -> grouped-query attention (queries viewed as
``[B, kv_heads, group, S, head_dim]`` against keys/values ``[B, kv_heads, 1, S, head_dim]``, so one
key/value head serves ``heads // kv_heads`` query heads by broadcasting) with a causal mask -> o_proj ->
residual Add -> RMSNorm -> SwiGLU MLP (``down(silu(gate(x)) * up(x))``) -> residual Add. Token ids
``[1, S]`` go through a Gather embedding; a final RMSNorm and the LM head give ``logits [1, S, vocab]``.

Weights are drawn from a seeded generator in chunks and written straight to ``NAME.onnx.data`` as they are
made, so generating a multi-GB model never holds more than one tensor in memory. ``decoder_config``
gives named sizes ("tiny" for tests, "1b" for the benchmark, "2gb" for the >2 GB round trip).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class DecoderConfig:
    layers: int = 2
    hidden: int = 64
    heads: int = 8
    kv_heads: int = 2
    ffn: int = 176
    vocab: int = 256
    seq: int = 8
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params(self) -> int:
        d, kv = self.hidden, self.kv_heads * self.head_dim
        per_layer = 2 * d + d * d * 2 + 2 * d * kv + 3 * d * self.ffn
        return 2 * self.vocab * d + d + self.layers * per_layer


CONFIGS = {
    "tiny": DecoderConfig(),
    "2gb": DecoderConfig(layers=11, hidden=2048, heads=32, kv_heads=8, ffn=5632, vocab=32000, seq=16),
    "1b": DecoderConfig(layers=20, hidden=2048, heads=32, kv_heads=8, ffn=5632, vocab=32000, seq=32),
}


def decoder_config(name: str) -> DecoderConfig:
    return CONFIGS[name]


class _Writer:
    """Appends tensors to one external data file and returns initializers that point into it."""

    def __init__(self, data_path: Path, seed: int) -> None:
        self.path = data_path
        self.file = open(data_path, "wb")  # noqa: SIM115 - closed by close(), the writer streams many tensors
        self.rng = np.random.default_rng(seed)
        self.initializers: list[onnx.TensorProto] = []

    def random(self, name: str, shape: tuple[int, ...], scale: float, offset: float = 0.0) -> str:
        n = int(np.prod(shape))
        start = self._align()
        chunk = 1 << 24
        for k in range(0, n, chunk):
            m = min(chunk, n - k)
            block = self.rng.standard_normal(m, dtype=np.float32) * np.float32(scale) + np.float32(offset)
            self.file.write(block.tobytes())
        self._external(name, shape, TensorProto.FLOAT, start, n * 4)
        return name

    def array(self, name: str, value: np.ndarray) -> str:
        value = np.ascontiguousarray(value)
        if value.nbytes < 1024:
            self.initializers.append(numpy_helper.from_array(value, name))
            return name
        start = self._align()
        self.file.write(value.tobytes())
        self._external(name, value.shape, helper.np_dtype_to_tensor_dtype(value.dtype), start, value.nbytes)
        return name

    def _align(self) -> int:
        pad = (-self.file.tell()) % 64
        self.file.write(b"\0" * pad)
        return self.file.tell()

    def _external(self, name, shape, dtype, offset, length) -> None:
        t = onnx.TensorProto()
        t.name, t.data_type = name, dtype
        t.dims.extend(int(d) for d in shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=key, value=value)
        self.initializers.append(t)

    def close(self) -> None:
        self.file.close()


def _rope_tables(cfg: DecoderConfig) -> tuple[np.ndarray, np.ndarray]:
    half = cfg.head_dim // 2
    inv = 1.0 / (10000 ** (np.arange(half, dtype=np.float64) / half))
    ang = np.arange(cfg.seq, dtype=np.float64)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], axis=1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def build_decoder(cfg: DecoderConfig, folder: str | os.PathLike, name: str = "decoder.onnx") -> Path:
    """Write the model to ``folder/name`` with its weights in ``folder/name.data``; returns the path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    w = _Writer(folder / f"{name}.data", cfg.seed)
    nodes: list[onnx.NodeProto] = []
    d, hd, H, KV, S = cfg.hidden, cfg.head_dim, cfg.heads, cfg.kv_heads, cfg.seq
    rep = H // KV
    counter = [0]

    def node(op, inputs, n_out=1, **attrs):
        counter[0] += 1
        outs = [f"{op.lower()}_{counter[0]}_{k}" for k in range(n_out)]
        nodes.append(helper.make_node(op, inputs, outs, name=f"{op}_{counter[0]}", **attrs))
        return outs[0] if n_out == 1 else outs

    const = {
        "two": w.array("two", np.array(2.0, np.float32)),
        "eps": w.array("eps", np.array(1e-5, np.float32)),
        "axis_last": w.array("axis_last", np.array([-1], np.int64)),
        "q_shape": w.array("q_shape", np.array([1, S, KV, rep, hd], np.int64)),
        "kv_shape": w.array("kv_shape", np.array([1, S, KV, 1, hd], np.int64)),
        "merge_shape": w.array("merge_shape", np.array([1, S, d], np.int64)),
        "half_a0": w.array("half_a0", np.array([0], np.int64)),
        "half_a1": w.array("half_a1", np.array([hd // 2], np.int64)),
        "half_b1": w.array("half_b1", np.array([hd], np.int64)),
        "scale": w.array("attn_scale", np.array(1.0 / np.sqrt(hd), np.float32)),
    }
    cos, sin = _rope_tables(cfg)
    const["cos"] = w.array("rope_cos", cos)
    const["sin"] = w.array("rope_sin", sin)
    mask = np.triu(np.full((S, S), -1e9, np.float32), k=1)
    const["mask"] = w.array("causal_mask", mask)

    def rmsnorm(x, prefix):
        g = w.random(f"{prefix}.weight", (d,), 0.05, 1.0)
        sq = node("Pow", [x, const["two"]])
        ms = node("ReduceMean", [sq, const["axis_last"]], keepdims=1)
        rs = node("Sqrt", [node("Add", [ms, const["eps"]])])
        return node("Mul", [node("Div", [x, rs]), g])

    def linear(x, prefix, n_in, n_out):
        return node("MatMul", [x, w.random(f"{prefix}.weight", (n_in, n_out), 1.0 / np.sqrt(n_in))])

    def rope(x):  # x: [1, KV, r, S, hd]
        x1 = node("Slice", [x, const["half_a0"], const["half_a1"], const["axis_last"]])
        x2 = node("Slice", [x, const["half_a1"], const["half_b1"], const["axis_last"]])
        rotated = node("Concat", [node("Neg", [x2]), x1], axis=-1)
        return node("Add", [node("Mul", [x, const["cos"]]), node("Mul", [rotated, const["sin"]])])

    embed = w.random("embed_tokens.weight", (cfg.vocab, d), 0.02)
    h = node("Gather", [embed, "input_ids"], axis=0)
    for i in range(cfg.layers):
        p = f"layers.{i}"
        x = rmsnorm(h, f"{p}.input_layernorm")
        q = node("Reshape", [linear(x, f"{p}.self_attn.q_proj", d, H * hd), const["q_shape"]])
        k = node("Reshape", [linear(x, f"{p}.self_attn.k_proj", d, KV * hd), const["kv_shape"]])
        v = node("Reshape", [linear(x, f"{p}.self_attn.v_proj", d, KV * hd), const["kv_shape"]])
        q = rope(node("Transpose", [q], perm=[0, 2, 3, 1, 4]))  # [1, KV, rep, S, hd]
        k = rope(node("Transpose", [k], perm=[0, 2, 3, 1, 4]))  # [1, KV, 1, S, hd]
        v = node("Transpose", [v], perm=[0, 2, 3, 1, 4])
        kt = node("Transpose", [k], perm=[0, 1, 2, 4, 3])
        scores = node("Add", [node("Mul", [node("MatMul", [q, kt]), const["scale"]]), const["mask"]])
        attn = node("MatMul", [node("Softmax", [scores], axis=-1), v])  # [1, KV, rep, S, hd]
        merged = node("Reshape", [node("Transpose", [attn], perm=[0, 3, 1, 2, 4]), const["merge_shape"]])
        h = node("Add", [h, linear(merged, f"{p}.self_attn.o_proj", H * hd, d)])
        x = rmsnorm(h, f"{p}.post_attention_layernorm")
        gate = linear(x, f"{p}.mlp.gate_proj", d, cfg.ffn)
        up = linear(x, f"{p}.mlp.up_proj", d, cfg.ffn)
        act = node("Mul", [gate, node("Sigmoid", [gate])])  # SiLU
        h = node("Add", [h, linear(node("Mul", [act, up]), f"{p}.mlp.down_proj", cfg.ffn, d)])
    h = rmsnorm(h, "norm")
    node("MatMul", [h, w.random("lm_head.weight", (d, cfg.vocab), 1.0 / np.sqrt(d))])
    nodes[-1].output[0] = "logits"  # the LM head's output is the graph output
    w.close()
    graph = helper.make_graph(
        nodes, "decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, S])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, S, cfg.vocab])],
        w.initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="models.decoder")
    model.ir_version = 8
    model.metadata_props.add(key="decoder_config", value=str(asdict(cfg)))
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def token_inputs(cfg: DecoderConfig, batch_seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch_seed)
    return {"input_ids": rng.integers(0, cfg.vocab, size=(1, cfg.seq), dtype=np.int64)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--preset", default="tiny", choices=sorted(CONFIGS))
    a = p.parse_args()
    cfg = CONFIGS[a.preset]
    path = build_decoder(cfg, a.out_dir)
    print(f"{path} ({cfg.params / 1e6:.0f}M params)")


if __name__ == "__main__":
    main()
