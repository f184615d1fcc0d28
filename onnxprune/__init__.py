"""onnxprune: ONNX graph-level structured pruner and deployment compiler."""

from __future__ import annotations

__version__ = "0.1.0"
