"""Small real models and the scripts that make them.

- :mod:`models.testmodels` builds seeded ONNX test graphs with ``onnx.helper`` (no torch needed).
- :mod:`models.fashion_mnist` loads the Fashion-MNIST IDX files shipped by the Debian package
  ``dataset-fashion-mnist``.
- ``models/fashion_mnist_cnn.onnx`` is the bundled trained default model (made by
  ``models/train_fashion_mnist.py``, which needs torch).
- :mod:`models.zoo` exports a larger development zoo into a cache folder (needs torch and extras).
"""

from __future__ import annotations
