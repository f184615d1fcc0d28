"""Builders of the zoo's self-supervised speech encoders (transformers, random init from tiny configs).

Raw audio [1, 8000] (half a second at 16 kHz) -> a Conv1d feature extractor (7 layers, strides 5,2,2,2,2,2,2:
24 frames) -> feature projection -> a grouped positional Conv1d under weight norm (exported unfolded: ReduceL2
over each tap's out x in slab, Div, Mul; folded at import) -> transformer encoder -> a CTC head of 32 symbols, so the hidden size
is no graph output. Measured 2026-12 (transformers 5.24, torch 2.13):

=================  ======  ======  ==========================================================================
entry              params  groups  what it covers
=================  ======  ======  ==========================================================================
wav2vec2_ctc_tiny  0.10 M  12      the base layout: GroupNorm(32, 32) on the first conv (per channel),
                                   post-LN encoder; the hidden size (64) is one group of 4 units of 16
                                   channels (the positional conv's groups)
hubert_ctc_tiny    0.11 M  12      the large layout: a LayerNorm over the channels after every conv
                                   (Transpose-LayerNorm-Transpose), pre-LN ("stable") encoder
=================  ======  ======  ==========================================================================

The hidden size is exact by default: every LayerNorm over it keeps its original width's statistics
(`onnxprune.statistics`), the positional conv's output reaching them through its Slice (it drops the last
frame). The positional conv's weight norm (over each tap's out x in slab: every channel) is folded into one
weight at import (`onnxprune.parametrizations`): pruned unfolded, removing a group rescaled the kept ones.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from models.zoo_builders import _export, _torchvision

_TINY = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
    "conv_dim": (32,) * 7, "conv_stride": (5, 2, 2, 2, 2, 2, 2), "conv_kernel": (10, 3, 3, 3, 3, 2, 2),
    "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4, "vocab_size": 32,
    "attn_implementation": "eager",
}


def _ctc_model(kind: str) -> Any:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if importlib.util.find_spec("torchvision") is not None:
        _torchvision()  # transformers imports torchvision when present: op schemas first
    import transformers as tf

    torch.manual_seed(0)
    if kind == "wav2vec2":  # facebook/wav2vec2-base's layout
        return tf.Wav2Vec2ForCTC(tf.Wav2Vec2Config(**_TINY))
    # facebook/hubert-large-ll60k's layout: LayerNorm feature extractor with conv biases, pre-LN encoder
    config = tf.HubertConfig(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True, **_TINY)
    return tf.HubertForCTC(config)


def _export_ctc(kind: str, path: Path) -> None:
    import torch

    model = _ctc_model(kind)

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, audio: Any) -> Any:
            return self.inner(audio, return_dict=False)[0]

    _export(Logits(), (torch.randn(1, 8000),), path, ["audio"], ["logits"])


def wav2vec2_ctc_tiny(path: Path) -> None:
    """`Wav2Vec2ForCTC`: audio [1, 8000] -> logits [1, 24, 32]."""
    _export_ctc("wav2vec2", path)


def hubert_ctc_tiny(path: Path) -> None:
    """`HubertForCTC` with the large models' layer-norm front end: audio [1, 8000] -> logits [1, 24, 32]."""
    _export_ctc("hubert", path)
