"""Pretrained CIFAR-10 ResNet20/44 as ONNX, and the CIFAR-10 test and calibration sets.

The weights live outside the repo (``../shared/datasets/cifar10_resnet/*.npz``, plain numpy arrays of a
PyTorch state_dict; ``$ONNXPRUNE_DATASETS`` overrides the folder). `build_cifar_resnet` writes the torch
module described in the datasets README (He et al. 2016, CIFAR variant) to ONNX: a 3x3 stem, three stages
of basic blocks (16, 32, 64 channels), global average pool, linear 64->10. Where a stage starts, the
shortcut has no weights ("option A"): every second pixel, then the channel axis zero-padded by planes/4
on each side, so the export holds a Slice + Pad on the residual stream. torch is needed to build only
(dev/test); the zoo (`models/zoo.py`) registers both as ``cifar_resnet20`` / ``cifar_resnet44``.

The export keeps a dynamic batch axis (``batch``) so the 10,000 test images run in batches; everything
else is as the zoo exports (legacy exporter, opset 17, BatchNormalization kept as nodes).

`load_cifar10` returns images preprocessed as the README says (x / 255, per-channel ImageNet mean/std,
NCHW float32) and int64 labels; ``n`` takes a stratified, seeded subset (the test file is sorted by class).
Everything raises `DatasetMissing` (a `ZooError`) when the folder is absent: callers skip.

    python -m models.zoo --only cifar_resnet20 --only cifar_resnet44     # build into the zoo cache
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from models.zoo_builders import ZooError, _export

__all__ = [
    "ARCHS",
    "MEAN",
    "README_TOP1",
    "STD",
    "DatasetMissing",
    "build_cifar_resnet",
    "datasets_dir",
    "load_cifar10",
    "preprocess",
    "stratified",
    "top1",
    "torch_model",
]

ROOT = Path(__file__).resolve().parents[1]
ARCHS: dict[str, int] = {"resnet20": 3, "resnet44": 7}  # basic blocks per stage
README_TOP1: dict[str, float] = {"resnet20": 91.73, "resnet44": 93.10}  # fp32, all 10,000 test images
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SPLITS = {"test": "test.npz", "calib": "calib_train2000.npz"}


class DatasetMissing(ZooError):
    """The shared datasets folder (or one of its files) is not on this machine."""


def datasets_dir() -> Path:
    """``$ONNXPRUNE_DATASETS`` or ``../shared/datasets`` next to the repo."""
    return Path(os.environ.get("ONNXPRUNE_DATASETS", ROOT.parent / "shared" / "datasets"))


def _data_file(*parts: str) -> Path:
    path = datasets_dir().joinpath(*parts)
    if not path.is_file():
        raise DatasetMissing(f"{path} not found (the shared CIFAR-10 datasets are not on this machine)")
    return path


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC RGB -> float32 NCHW, x / 255 normalised with the ImageNet mean/std."""
    x = images.astype(np.float32) / 255.0
    x = (x - MEAN) / STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def stratified(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``n`` samples, as equal a share of every class as ``n`` allows (seeded)."""
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    share, extra = divmod(n, len(classes))
    picked = [idx[: share + (i < extra)] for i, idx in enumerate(per_class)]
    if sum(len(p) for p in picked) < n:
        raise ValueError(f"cannot take {n} samples: the split has {len(labels)}")
    return np.sort(np.concatenate(picked))


def load_cifar10(split: str = "test", n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed CIFAR-10 images (float32 [N, 3, 32, 32]) and int64 labels.

    Args:
        split: ``"test"`` (10,000 test images) or ``"calib"`` (2,000 *training* images, 200 per class).
        n: Stratified subset of this many samples (seeded); None keeps the whole split in file order.
        seed: Seed of the subset.

    Raises:
        DatasetMissing: The datasets folder is absent.
    """
    images, labels = raw_cifar10(split, n, seed)
    return preprocess(images), labels


def raw_cifar10(split: str = "test", n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`load_cifar10`'s images as stored (uint8 [N, 32, 32, 3] RGB, e.g. to resize before `preprocess`) and int64
    labels; the same arguments and errors."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    with np.load(_data_file("cifar10", SPLITS[split])) as data:
        images, labels = data["x"], data["y"].astype(np.int64)
    if n is not None:
        pick = stratified(labels, n, seed)
        images, labels = images[pick], labels[pick]
    return images, labels


def torch_model(arch: str) -> Any:
    """The torch module of ``arch`` (``resnet20`` / ``resnet44``) with the pretrained weights, in eval mode."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    if arch not in ARCHS:
        raise ZooError(f"unknown CIFAR ResNet {arch!r}; known: {', '.join(ARCHS)}")

    class Block(nn.Module):
        def __init__(self, cin: int, planes: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.pad = planes // 4 if stride != 1 or cin != planes else 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            short = x
            if self.pad:  # option A: no weights, subsample and zero-pad the channel axis
                short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
            return F.relu(out + short)

    class CifarResNet(nn.Module):
        def __init__(self, blocks: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            cin = 16
            for stage, planes in enumerate((16, 32, 64), start=1):
                layers = []
                for b in range(blocks):
                    layers.append(Block(cin, planes, 2 if stage > 1 and b == 0 else 1))
                    cin = planes
                setattr(self, f"layer{stage}", nn.Sequential(*layers))
            self.linear = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = F.relu(self.bn1(self.conv1(x)))
            for stage in ("layer1", "layer2", "layer3"):
                out = getattr(self, stage)(out)
            return self.linear(out.mean(dim=(2, 3)))

    model = CifarResNet(ARCHS[arch])
    with np.load(_data_file("cifar10_resnet", f"{arch}.npz")) as weights:
        state = {k: torch.from_numpy(np.array(weights[k])) for k in weights.files}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ZooError(f"{arch}: weights do not match the module: missing {missing}, unexpected {unexpected}")
    return model.eval()


def build_cifar_resnet(arch: str) -> Any:
    """A zoo builder: writes ``arch`` with its pretrained weights to the given path."""

    def build(path: Path) -> None:
        import torch

        model = torch_model(arch)
        axes = {"input": {0: "batch"}, "output": {0: "batch"}}
        _export(model, (torch.zeros(1, 3, 32, 32),), path, ["input"], ["output"], dynamic_axes=axes)

    return build


def top1(model: Any, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
    """Top-1 (%) of an ONNX model (path or ModelProto) in onnxruntime, run in batches."""
    import onnx
    import onnxruntime as ort

    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    runs = [sess.run(None, {name: images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    logits = np.concatenate(runs)
    return float((logits.argmax(1) == labels).mean() * 100)
