"""Fine-grained sparse pruning: weights zeroed in a pattern, the model stays plain ONNX and runs anywhere.

Start reading at `sparsify.sparsify_model`. Modules, bottom up:

* `patterns`: the patterns (unstructured, group:RxC, block:RxC, nm:N:M), masks from scores, mask checks;
* `layers`: which weights are pruned and their ``[rows, reduction]`` matrix view per operator;
* `scoring`: element scores (magnitude, Wanda) and the allocation of the sparsity among layers;
* `solver`: SparseGPT, the second-order mask choice and weight update with the inverse-Hessian Cholesky trick;
* `config`: `SparsityConfig`;
* `sparsify`: the whole step, with the repairs (none, bias, ls, seq) and the `SparsityReport`.

Core layering: nothing here imports `onnxprune.passes` or `onnxprune.targets`
(`onnxprune.passes.sparsify.SparsifyPass` wraps this package).
"""

from __future__ import annotations

from onnxprune.sparsity.config import SparsityConfig
from onnxprune.sparsity.layers import LayerRules, SparseLayer, sparse_layers
from onnxprune.sparsity.patterns import Pattern, check_mask, parse_pattern
from onnxprune.sparsity.sparsify import SparsityReport, sparsify_model

__all__ = [
    "LayerRules",
    "Pattern",
    "SparseLayer",
    "SparsityConfig",
    "SparsityReport",
    "check_mask",
    "parse_pattern",
    "sparse_layers",
    "sparsify_model",
]
