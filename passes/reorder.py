"""ReorderPass: relabel the channels of groups by given permutations (semantics-preserving).

The ordering algorithm and the permutation itself live in `onnxprune.ordering`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnxprune.channels import ChannelAnalysis, analyze
from onnxprune.errors import UsageError
from onnxprune.graph import ModelGraph
from onnxprune.ordering import permute_channels
from onnxprune.passmanager import Pass, PassResult


class ReorderPass(Pass):
    """Semantics-preserving: relabel the channels of groups by given permutations.

    Args:
        orders: group id -> permutation, or a callable ``(analysis) -> {group id: permutation}``.
    """

    def __init__(self, orders: dict[int, np.ndarray] | Callable[[ChannelAnalysis], dict[int, np.ndarray]]):
        self.orders = orders

    def call(self, model):
        analysis = analyze(ModelGraph(model))
        orders = self.orders(analysis) if callable(self.orders) else self.orders
        for gid in orders:
            if not 0 <= gid < len(analysis.groups):
                raise UsageError(f"no channel group {gid} (the model has {len(analysis.groups)})")
        orders = {
            gid: np.asarray(o, dtype=np.int64)
            for gid, o in orders.items()
            if not np.array_equal(o, np.arange(analysis.groups[gid].size))
        }
        if not orders:
            return PassResult(model, False, {"groups_reordered": 0})
        return PassResult(permute_channels(analysis, orders), True, {"groups_reordered": len(orders)})
