"""Architecture sweep: many transformers model classes, as a user exports them, through onnxprune.

The zoo (`models/zoo.py`) holds the architectures the tests and benchmarks use; this sweep checks breadth:
tiny random-init models of ~35 transformers classes (vision: ConvNeXt V2, DINOv2, DeiT, BEiT, MobileViT,
LeViT, PoolFormer, RegNet, ResNet, SegFormer, Swin V2, FocalNet; text: RoBERTa, DistilBERT, ELECTRA,
DeBERTa-v2, MPNet, ModernBERT; decoders: Phi, Phi-3, Gemma 2/3, Qwen2/3, Mistral, Falcon, GPT-NeoX, BLOOM,
StableLM, OLMo 2, Granite; MoE: OLMoE, Qwen3-MoE), exported with the TorchScript exporter (eager attention),
each checked as the zoo tests check theirs:

  - analysis: groups, barriers (ops without a rule or refused);
  - dead-channel equivalence on up to 12 sampled groups: silence a group in the original, prune it, the
    outputs match (max relative error, the law is <= 1e-5);
  - a 50% prune that passes the ONNX checker and runs in onnxruntime with the original's output shapes;
  - reach = (weights removed / weights) / 0.5, as `bench/coverage.py` counts it.

One row per model; a build or export failure is the exporter's (listed, not onnxprune's). Nothing downloads
(configs only). Models are cached under ``$ONNXPRUNE_MODEL_CACHE/sweep`` (default models/cache/sweep).

    python bench/architecture_sweep.py [--only NAME ...] [--out bench/architecture_sweep_results.txt]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from coverage import RATIO, reach, weight_elements, weight_names

from models import zoo
from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.importer import check_model, import_model
from onnxprune.metrics import count_params
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.verify import dead_channel_check, random_inputs, run

VISION: dict[str, tuple[str, str, dict[str, Any]]] = {  # name -> (config class, model class, config kwargs)
    "convnextv2": ("ConvNextV2Config", "ConvNextV2ForImageClassification",
                   {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 2, 1]}),
    "dinov2": ("Dinov2Config", "Dinov2Model", {"image_size": 64, "patch_size": 16, "hidden_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}),
    "deit": ("DeiTConfig", "DeiTForImageClassificationWithTeacher", {"image_size": 64, "patch_size": 16,
             "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}),
    "beit": ("BeitConfig", "BeitForImageClassification", {"image_size": 64, "patch_size": 16, "hidden_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
             "use_relative_position_bias": True}),
    "mobilevit": ("MobileViTConfig", "MobileViTForImageClassification", {"image_size": 64,
                  "hidden_sizes": [32, 48, 64], "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64]}),
    "levit": ("LevitConfig", "LevitForImageClassification", {"image_size": 64, "hidden_sizes": [64, 96, 128],
              "num_attention_heads": [2, 3, 4], "depths": [1, 1, 1], "key_dim": [16, 16, 16]}),
    "poolformer": ("PoolFormerConfig", "PoolFormerForImageClassification",
                   {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1]}),
    "regnet": ("RegNetConfig", "RegNetForImageClassification",
               {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "groups_width": 8}),
    "resnet_hf": ("ResNetConfig", "ResNetForImageClassification",
                  {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1]}),
    "segformer": ("SegformerConfig", "SegformerForSemanticSegmentation",
                  {"hidden_sizes": [16, 32, 64, 128], "decoder_hidden_size": 64, "depths": [1, 1, 1, 1]}),
    "swinv2": ("Swinv2Config", "Swinv2ForImageClassification", {"image_size": 64, "patch_size": 4, "embed_dim": 16,
               "depths": [1, 1], "num_heads": [2, 4], "window_size": 4}),
    "focalnet": ("FocalNetConfig", "FocalNetForImageClassification",
                 {"image_size": 64, "embed_dim": 16, "depths": [1, 1], "hidden_sizes": [16, 32]}),
}
_LAYERS = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
_GQA = {**_LAYERS, "num_key_value_heads": 2}
TEXT: dict[str, tuple[str, str, dict[str, Any]]] = {
    "roberta": ("RobertaConfig", "RobertaModel", {**_LAYERS, "pad_token_id": 1}),
    "distilbert": ("DistilBertConfig", "DistilBertModel", {"dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 128}),
    "electra": ("ElectraConfig", "ElectraModel", {**_LAYERS, "embedding_size": 32}),
    "deberta_v2": ("DebertaV2Config", "DebertaV2Model", _LAYERS),
    "mpnet": ("MPNetConfig", "MPNetModel", _LAYERS),
    "modernbert": ("ModernBertConfig", "ModernBertModel", {**_LAYERS, "global_attn_every_n_layers": 2,
                   "local_attention": 8, "pad_token_id": 0}),
    "phi": ("PhiConfig", "PhiForCausalLM", {**_LAYERS, "partial_rotary_factor": 0.5}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_GQA, "pad_token_id": 0}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**_GQA, "head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**_GQA, "head_dim": 16}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _GQA),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_GQA, "head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", _GQA),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"hidden_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "new_decoder_architecture": True, "num_kv_heads": 2}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _LAYERS),
    "bloom": ("BloomConfig", "BloomForCausalLM", {"hidden_size": 64, "n_layer": 2, "n_head": 4}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", _GQA),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _GQA),
    "granite": ("GraniteConfig", "GraniteForCausalLM", _GQA),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {**_LAYERS, "intermediate_size": 64, "num_experts": 4,
              "num_experts_per_tok": 2, "experts_implementation": "batched_mm"}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**_GQA, "head_dim": 16, "moe_intermediate_size": 32,
                  "num_experts": 4, "num_experts_per_tok": 2, "experts_implementation": "batched_mm"}),
}
MAX_GROUPS = 12
ATTENTION_VISION = {"dinov2", "deit", "beit", "levit", "swinv2", "mobilevit"}  # reach counted as transformers


def _builder(name: str) -> Callable[[], tuple[Any, dict[str, Any]]]:
    import torch

    zoo_builders = __import__("models.zoo_builders", fromlist=["_torchvision"])
    zoo_builders._torchvision()  # transformers imports torchvision, which needs its op schemas first
    import transformers as tf

    config_cls, model_cls, kwargs = VISION.get(name) or TEXT[name]
    config = getattr(tf, config_cls)(attn_implementation="eager", **({} if name in VISION else {"vocab_size": 1000}),
                                     **kwargs)
    torch.manual_seed(0)
    model = getattr(tf, model_cls)(config).eval()
    if name in VISION:
        feeds = {"pixel_values": torch.randn(1, 3, 64, 64)}
    else:
        feeds = {"input_ids": torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))}
    return lambda: (model, feeds)


def build(name: str, folder: Path) -> Path:
    """The cached export of `name` (TorchScript exporter, first output only)."""
    import torch

    from models.zoo_builders import _export

    path = folder / f"{name}.onnx"
    if not path.exists():
        model, feeds = _builder(name)()

        class FirstOutput(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = model

            def forward(self, *args: Any) -> Any:
                return self.inner(*args, return_dict=False)[0]

        tmp = path.with_suffix(".tmp.onnx")
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # the exporter prints its IR on failure
            _export(FirstOutput(), tuple(feeds.values()), tmp, list(feeds), ["output"])
        tmp.replace(path)
    return path


def check(name: str, folder: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "family": "vision" if name in VISION else "text"}
    start = time.perf_counter()
    try:
        path = build(name, folder)
    except Exception as exc:  # the exporter's failure, not onnxprune's
        row.update(status="export failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        return row
    row["export_s"] = time.perf_counter() - start
    try:
        start = time.perf_counter()
        model = import_model(path)
        graph = ModelGraph(model)
        analysis = analyze(graph)
        row["analysis_s"] = time.perf_counter() - start
        inputs = random_inputs(model, seed=3)
        groups = analysis.groups
        if len(groups) > MAX_GROUPS:
            picks = np.random.default_rng(0).choice(len(groups), MAX_GROUPS, replace=False)
            groups = [groups[i] for i in sorted(picks)]
        row["dead_channel_error"] = max((dead_channel_check(analysis, g, inputs).error for g in groups), default=0.0)
        pruned = PrunePass(PruneConfig(ratio=RATIO)).run(model).model
        check_model(pruned)
        same_shapes = [o.shape for o in run(model, inputs)] == [o.shape for o in run(pruned, inputs)]
        transformer = name not in VISION or name in ATTENTION_VISION  # embeddings and heads not counted
        before = weight_elements(model, weight_names(graph, transformer))
        row.update(groups=len(analysis.groups), barriers=sorted({b.op_type for b in analysis.barriers}),
                   params=count_params(graph), params_after=count_params(ModelGraph(pruned)), same_shapes=same_shapes,
                   reach=reach(pruned, before, transformer))
        row["status"] = "ok" if row["dead_channel_error"] <= 1e-5 and same_shapes and not row["barriers"] else "CHECK"
    except Exception as exc:
        row.update(status="ONNXPRUNE FAILED", error=f"{type(exc).__name__}: {exc}"[:200],
                   where=traceback.format_exc().strip().splitlines()[-3].strip()[:120])
    return row


def table(rows: list[dict[str, Any]]) -> Table:
    out = Table(title=f"architecture sweep: tiny transformers exports, pruned at {RATIO}")
    for col in ("model", "family", "status", "groups", "barriers", "dead-channel err", "reach", "params", "note"):
        out.add_column(col, justify="right" if col in ("groups", "dead-channel err", "reach", "params") else "left")
    for r in rows:
        err = r.get("dead_channel_error")
        out.add_row(r["model"], r["family"], r["status"], str(r.get("groups", "")), ",".join(r.get("barriers", [])),
                    f"{err:.1e}" if err is not None else "", f"{r['reach']:.2f}" if "reach" in r else "",
                    f"{r['params']} -> {r['params_after']}" if "params" in r else "", r.get("error", ""))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model names (default: all)")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    folder = zoo.cache_dir() / "sweep"
    folder.mkdir(parents=True, exist_ok=True)
    names = args.only or [*VISION, *TEXT]
    rows = []
    for name in names:
        rows.append(check(name, folder))
        print(f"{name}: {rows[-1]['status']}", file=sys.stderr, flush=True)
    console = Console(width=200, record=True)
    console.print(table(rows))
    ok = sum(r["status"] == "ok" for r in rows)
    exported = sum(r["status"] != "export failed" for r in rows)
    console.print(f"{ok}/{exported} exported models pass every check ({len(rows) - exported} export failures, "
                  f"the exporter's); load average {os.getloadavg()[0]:.1f}")
    if args.out:
        args.out.write_text(console.export_text())
    return 0 if ok == exported else 1


if __name__ == "__main__":
    sys.exit(main())
