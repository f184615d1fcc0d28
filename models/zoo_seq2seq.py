"""Builders of the zoo's encoder-decoder transformers (cross-attention): T5, BART, Whisper.

Each model is built from a tiny transformers config (random weights, seeded; nothing downloads) and exported
as the full forward pass a seq2seq user runs per decoding step without a cache: encoder inputs and
``decoder_input_ids`` in, the decoder's logits out. Static small shapes: batch 1, source length 16 (Whisper:
64 mel frames -> 32 encoder positions), target length 8; eager attention.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.zoo_builders import ZooError, _export, _torchvision

SOURCE_LENGTH = 16  # encoder tokens (T5, BART)
TARGET_LENGTH = 8  # decoder tokens
VOCAB = 1000
N_MELS = 80  # Whisper's mel bins, as the real models have
WHISPER_POSITIONS = 32  # encoder positions; the two convs (the second with stride 2) read 2x as many frames


def _config(kind: str, attention: str) -> Any:
    import transformers as tf

    # bos/eos/pad ids inside the small vocabulary keep the config validator quiet
    ids = {"vocab_size": VOCAB, "pad_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 0}
    if kind in ("t5", "t5_v11"):
        # t5: the original T5 (ReLU FFN, the tied lm_head reads the decoder output scaled by d_model ** -0.5);
        # t5_v11: T5 v1.1 / Flan-T5 (gated-GELU FFN; tie_word_embeddings=False in its configs, which
        # transformers 5 reads as "do not scale the decoder output").
        v11 = kind == "t5_v11"
        return tf.T5Config(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4,
                           relative_attention_num_buckets=32, relative_attention_max_distance=128,
                           feed_forward_proj="gated-gelu" if v11 else "relu",
                           **({"tie_word_embeddings": False} if v11 else {}), attn_implementation=attention,
                           **ids)  # fmt: skip
    if kind == "bart":
        return tf.BartConfig(d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                             decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
                             max_position_embeddings=64, attn_implementation=attention, bos_token_id=1,
                             forced_eos_token_id=2, **ids)  # fmt: skip
    if kind == "whisper":
        return tf.WhisperConfig(d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
                                num_mel_bins=N_MELS, max_source_positions=WHISPER_POSITIONS,
                                max_target_positions=64, attn_implementation=attention, bos_token_id=1,
                                begin_suppress_tokens=None, suppress_tokens=None, **ids)  # fmt: skip
    raise ZooError(f"unknown seq2seq kind {kind!r}")


def seq2seq_model(kind: str, attention: str = "eager") -> Any:
    """A randomly initialised (seeded) ``*ForConditionalGeneration`` of `kind` from its tiny config."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if importlib.util.find_spec("torchvision") is not None:
        _torchvision()  # transformers imports torchvision when present; it needs the op schemas first
    import transformers as tf

    torch.manual_seed(0)
    config = _config(kind, attention)
    cls = {"t5": tf.T5ForConditionalGeneration, "t5_v11": tf.T5ForConditionalGeneration,
           "bart": tf.BartForConditionalGeneration, "whisper": tf.WhisperForConditionalGeneration}[kind]
    model = cls(config).eval()
    _vary_constant_tensors(model)
    return model


def _vary_constant_tensors(model: Any) -> None:
    """Adds seeded noise to every parameter (and BART's ``final_logits_bias`` buffer) that initialisation left
    constant: biases at 0, LayerNorm scales at 1. A trained model has none, and with them a bias or norm scale
    sliced at the wrong channel would go unseen by the equivalence checks; the torch.export-based exporter would
    even drop the zero Conv biases."""
    import torch

    gen = torch.Generator().manual_seed(1)
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n.endswith("logits_bias"))]
    with torch.no_grad():
        for _, tensor in tensors:
            if tensor.is_floating_point() and tensor.numel() > 1 and bool((tensor == tensor.flatten()[0]).all()):
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=gen))


def _wrap(model: Any, speech: bool) -> Any:
    """encoder inputs + decoder_input_ids -> logits, with the cache off (one full decoder pass)."""
    import torch

    class TextLogits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: Any, attention_mask: Any, decoder_input_ids: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                              use_cache=False, return_dict=False)[0]  # fmt: skip

    class SpeechLogits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_features: Any, decoder_input_ids: Any) -> Any:
            # An explicit all-ones decoder mask keeps transformers off its packed-sequence detection, which uses
            # aten::diff (no ONNX export at opset 17).
            mask = torch.ones_like(decoder_input_ids)
            return self.inner(input_features=input_features, decoder_input_ids=decoder_input_ids,
                              decoder_attention_mask=mask, use_cache=False, return_dict=False)[0]  # fmt: skip

    return SpeechLogits() if speech else TextLogits()


def inputs_for(kind: str) -> tuple[tuple[Any, ...], list[str]]:
    """The seeded example inputs of `kind`'s export and their graph input names."""
    import torch

    gen = torch.Generator().manual_seed(0)
    target = torch.randint(3, VOCAB, (1, TARGET_LENGTH), generator=gen)
    if kind == "whisper":
        features = torch.randn(1, N_MELS, 2 * WHISPER_POSITIONS, generator=gen)
        return (features, target), ["input_features", "decoder_input_ids"]
    source = torch.randint(3, VOCAB, (1, SOURCE_LENGTH), generator=gen)
    return (source, torch.ones_like(source), target), ["input_ids", "attention_mask", "decoder_input_ids"]


def seq2seq_builder(kind: str, dynamic_lengths: bool = False, dynamo: bool = False) -> Callable[[Path], None]:
    """Writes `kind`'s encoder-decoder forward pass (TorchScript exporter, opset 17; or torch.export), with the
    source and target lengths symbolic (``src``, ``tgt``) when `dynamic_lengths`, as optimum-style exports have."""

    def build(path: Path) -> None:
        model = _wrap(seq2seq_model(kind), speech=kind == "whisper")
        args, names = inputs_for(kind)
        axes = None
        if dynamic_lengths:
            axes = {name: {1: "tgt" if name == "decoder_input_ids" else "src"} for name in names
                    if name != "input_features"}  # fmt: skip
            axes["logits"] = {1: "tgt"}
        _export(model, args, path, names, ["logits"], dynamic_axes=axes, dynamo=dynamo)

    return build
