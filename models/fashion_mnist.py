"""Fashion-MNIST loader for the IDX files shipped by the Debian package ``dataset-fashion-mnist``.

Install the data with ``apt-get install -y dataset-fashion-mnist``; the files land in
``/usr/share/datasets/fashion-mnist/``. The environment variable ``ONNXPRUNE_FASHION_MNIST_DIR`` points
the loader at another folder holding the same four ``*-idx?-ubyte.gz`` files.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = ["CLASSES", "DEBIAN_PACKAGE", "DatasetMissingError", "dataset_dir", "load_fashion_mnist"]

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetMissingError(FileNotFoundError):
    """The Fashion-MNIST files are not installed."""


def dataset_dir() -> Path:
    """Folder holding the IDX files (``ONNXPRUNE_FASHION_MNIST_DIR`` or the Debian package path)."""
    return Path(os.environ.get("ONNXPRUNE_FASHION_MNIST_DIR", DEFAULT_DIR))


def is_available() -> bool:
    """True when all four IDX files are present."""
    folder = dataset_dir()
    return all((folder / f).is_file() for pair in _FILES.values() for f in pair)


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path}: bad IDX magic {magic:#x}, expected {expected_magic:#x}")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated, {array.size} bytes for dims {dims}")
    return array.reshape(dims)


def load_fashion_mnist(split: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray]:
    """Loads one split.

    Args:
        split: ``"train"`` (60000 images) or ``"test"`` (10000 images).

    Returns:
        ``(images, labels)``: float32 ``[N, 1, 28, 28]`` scaled to [0, 1], and int64 ``[N]``.

    Raises:
        DatasetMissingError: The files are not installed (names the Debian package to install).
        ValueError: Unknown split or a corrupt file.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    folder = dataset_dir()
    image_path, label_path = (folder / f for f in _FILES[split])
    for path in (image_path, label_path):
        if not path.is_file():
            raise DatasetMissingError(
                f"Fashion-MNIST file {path} not found; install it with "
                f"'apt-get install -y {DEBIAN_PACKAGE}' (or set ONNXPRUNE_FASHION_MNIST_DIR)"
            )
    images = _read_idx(image_path, 0x00000803)
    labels = _read_idx(label_path, 0x00000801)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    images = (images.astype(np.float32) / np.float32(255.0))[:, None, :, :]
    return images, labels.astype(np.int64)
