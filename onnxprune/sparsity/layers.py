"""Which weights fine-grained pruning touches, and each weight's ``[rows, reduction]`` matrix view.

Rows are outputs, the reduction axis is what one output sums over; patterns (`patterns.py`) run along it:

=================  ======================  ======================================================================
op                 weight shape            rows x reduction (`SparseLayer.matrix`)
=================  ======================  ======================================================================
Conv (group g)     [M, C/g, k1, ..]        rows = M output channels (axis 0); reduction = (k1, .., C/g) flattened,
                                           input channels innermost: the order an NHWC kernel reduces in
                                           (HWIO), so a ``group:1x4`` run is 4 input channels at one kernel tap
                                           (the sparse kernels' vectors), not 4 taps of one channel. The
                                           Hessian features of `calibration.hessian_rows` are (C, k1, ..):
                                           `SparseLayer.feature_order` maps the view's columns to them. In a
                                           grouped conv each row sums over its own group's C/g channels, so
                                           a run never crosses groups.
ConvTranspose (g)  [C, M/g, k1, ..]        rows = the M output channels (group, M/g); reduction = (C/g, k1, ..) of
                                           the input channels of that group, memory order.
Gemm, transB=0     B [K, N]                rows = N (axis 1); reduction = K (axis 0): the matrix is B^T.
Gemm, transB=1     B [N, K]                rows = N (axis 0); reduction = K (axis 1): the matrix is B.
MatMul X @ W       W [.., K, N]            rows = (batch axes, N) flattened; reduction = K (axis -2).
=================  ======================  ======================================================================

Conv runs along C rather than along the taps moved accuracy by at most 0.2 pt (`bench/sparse_accuracy.py`, f =
0.5, best repair; (C, kh, kw) runs before -> (kh, kw, C) runs now): Fashion-MNIST ResNet group:1x4 93.42 -> 93.43
(seq), CNN 92.58 -> 92.48 (ls; seq 92.37); block:4x4 ResNet 93.24 -> 93.07, CNN 92.05 -> 92.12. Solving SparseGPT in channel-group order (all taps of
4 channels per column block instead of one or two taps) measured no better (93.39, 92.43) and is not used.

Only a float initializer read by input 1 (the weight) of exactly one node, and by no If/Loop/Scan body, is
a candidate. Defaults that keep accuracy (`LayerRules`): the first layers (no candidate before them: the stem),
the last (no other candidate downstream, the classifier) and depthwise convs stay dense, and so do layers
with fewer than `min_weights` weights (1024), whose share of the parameters is small and whose every weight
matters. A last layer holding more than `LayerRules.dense_last_share` of the candidate weights is pruned
after all: kept dense, it would force the other layers far past the model-wide sparsity (PP-OCRv4 rec's
6625-character classifier holds 31% of them; dense, 50% of the parameters meant 75% of every other layer,
and group:1x4 + seq kept 46% exact match; pruned with the rest, 82.5%, `bench/sparse_accuracy.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.calibration import Consumer, consumers
from onnxprune.graph import ModelGraph, attrs, subgraph_reads

__all__ = ["LayerRules", "SparseLayer", "sparse_layers"]

OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SHARED_SKIP = "weight shared with other nodes or a subgraph"


@dataclass(frozen=True)
class LayerRules:
    """Which candidate layers stay dense.

    Attributes:
        min_weights: layers with fewer weights stay dense.
        skip_first: layers with no candidate layer before them stay dense (the stem: few weights, all used).
        skip_last: layers with no candidate layer downstream stay dense (the classifier / output projection),
            while they hold at most `dense_last_share` of the candidate weights.
        dense_last_share: a last layer with more than this share of all candidate weights is pruned like the
            others (its error is not compounded by any later layer, and its repair fits the outputs directly).
        skip_depthwise: depthwise convs (one input channel per group) stay dense: each row reduces over its
            kernel only (9 or 25 weights), so zeros there cut a channel's receptive field, no calibration
            statistics cover them (no repair), and they hold few of the weights (3% of PP-OCRv4 rec's
            prunable weights, where pruning them by magnitude cost more accuracy than any pointwise layer).
    """

    min_weights: int = 1024
    skip_first: bool = True
    skip_last: bool = True
    skip_depthwise: bool = True
    dense_last_share: float = 0.2


@dataclass(frozen=True)
class SparseLayer:
    """One weight that fine-grained pruning may zero, and how its matrix view is laid out.

    Attributes:
        node: the layer.
        weight: the initializer's name (the node's input 1).
        shape: the weight's shape.
        consumer: the calibration consumer of the same node (Conv group 1, Gemm, 2-D MatMul), whose
            Hessian features are the reduction axis in the same order; None for other layers.
        skip: why the layer stays dense, or "" when it is pruned.
    """

    node: onnx.NodeProto
    weight: str
    shape: tuple[int, ...]
    consumer: Consumer | None
    skip: str = ""

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def feature_order(self) -> np.ndarray | None:
        """For each reduction column of `matrix`, the index of its feature in the consumer's Hessian order
        (a Conv's (C, k1, ..) im2col order; the constant feature stays last, outside this array); None
        when the two orders agree (Gemm, MatMul, 1x1 convs, layers without a consumer)."""
        if self.node.op_type != "Conv" or self.consumer is None:
            return None
        taps = int(np.prod(self.shape[2:], dtype=np.int64))
        if taps == 1:
            return None
        # column (tap, c) of the view is feature c * taps + tap of the Hessian
        return np.arange(self.shape[1] * taps).reshape(self.shape[1], taps).T.ravel()

    def feature_channel(self) -> np.ndarray:
        """Input channel (on the consumer's input axis) of each reduction column of `matrix`.

        Raises:
            ValueError: the layer has no calibration consumer.
        """
        if self.consumer is None:
            raise ValueError(f"{self.name}: no calibration consumer")
        feat = self.consumer.feature_channel(self.shape)
        order = self.feature_order
        return feat if order is None else feat[order]

    def hessian(self, H: np.ndarray) -> np.ndarray:
        """A consumer's ``[F+1, F+1]`` statistic (Hessian order, constant feature last) in the order of the
        columns of `matrix` (constant still last); `H` itself when the orders agree."""
        order = self.feature_order
        if order is None:
            return H
        full = np.append(order, len(order)) if len(H) == len(order) + 1 else order
        return H[np.ix_(full, full)]

    def matrix(self, w: np.ndarray) -> np.ndarray:
        """The weight as ``[rows, reduction]`` (a view when no transpose is needed)."""
        op = self.node.op_type
        if op == "Conv":
            return np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)
        if op == "ConvTranspose":
            g = int(attrs(self.node).get("group", 1))
            c, mg = w.shape[0], w.shape[1]
            return w.reshape(g, c // g, mg, -1).transpose(0, 2, 1, 3).reshape(g * mg, -1)
        if op == "Gemm":
            return w if attrs(self.node).get("transB", 0) else w.T
        k = w.shape[-2]  # MatMul: [.., K, N] -> [(.., N), K]
        return np.moveaxis(w, -1, -2).reshape(-1, k)

    def from_matrix(self, m: np.ndarray) -> np.ndarray:
        """Inverse of `matrix`: a ``[rows, reduction]`` array back in the weight's shape."""
        op, shape = self.node.op_type, self.shape
        if op == "Conv":
            return np.moveaxis(m.reshape(shape[0], *shape[2:], shape[1]), -1, 1)
        if op == "ConvTranspose":
            g = int(attrs(self.node).get("group", 1))
            c, mg = shape[0], shape[1]
            return m.reshape(g, mg, c // g, -1).transpose(0, 2, 1, 3).reshape(shape)
        if op == "Gemm":
            return m if attrs(self.node).get("transB", 0) else m.T
        k, n = shape[-2], shape[-1]
        return np.moveaxis(m.reshape(*shape[:-2], n, k), -1, -2)


def sparse_layers(graph: ModelGraph, rules: LayerRules | None = None) -> list[SparseLayer]:
    """Every candidate layer of the model, in graph order; those that stay dense say why in `skip`."""
    rules = rules or LayerRules()
    read_in_bodies = set().union(*(subgraph_reads(n) for n in graph.nodes))
    by_node = {id(c.node): c for c in consumers(graph)}
    found: list[tuple[onnx.NodeProto, str]] = []
    for node in graph.nodes:
        if node.domain not in ("", "ai.onnx") or node.op_type not in OPS or len(node.input) < 2:
            continue
        w_name = node.input[1]
        w = graph.initializers.get(w_name)
        if w is None or graph.const(node.input[0]) is not None:
            continue
        if w.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            continue
        if len(w.dims) < 2 or (node.op_type in ("Conv", "ConvTranspose") and len(w.dims) < 3):
            continue
        if node.op_type == "ConvTranspose" and w.dims[0] % int(attrs(node).get("group", 1)):
            continue
        found.append((node, w_name))
    candidates = {id(n) for n, _ in found}
    upstream, downstream = _candidate_flow(graph, candidates)
    total = sum(int(np.prod(graph.initializers[w].dims, dtype=np.int64)) for _, w in found)
    out = []
    for node, w_name in found:
        shape = tuple(int(d) for d in graph.initializers[w_name].dims)
        skip = ""
        if len(graph.consumers.get(w_name, [])) != 1 or w_name in read_in_bodies:
            skip = SHARED_SKIP
        elif int(np.prod(shape)) < rules.min_weights:
            skip = f"fewer than {rules.min_weights} weights"
        elif rules.skip_depthwise and node.op_type == "Conv" and int(attrs(node).get("group", 1)) > 1 and shape[1] == 1:
            skip = "depthwise conv (reduces over its kernel only)"
        elif rules.skip_first and not upstream.get(node.input[0], False):
            skip = "first layer (no candidate layer before it)"
        elif (rules.skip_last and not any(downstream.get(o, False) for o in node.output)
              and int(np.prod(shape)) <= rules.dense_last_share * total):
            skip = "last layer (no pruned layer after it)"
        out.append(SparseLayer(node, w_name, shape, by_node.get(id(node)), skip))
    return out


def _candidate_flow(graph: ModelGraph, candidates: set[int]) -> tuple[dict[str, bool], dict[str, bool]]:
    """Per tensor: whether a candidate layer computed it (directly or through other nodes), and whether a
    candidate layer reads it (directly or through other nodes): a forward and a reverse sweep."""
    up: dict[str, bool] = {}
    for node in graph.nodes:
        if id(node) in candidates or any(up.get(i, False) for i in node.input if i):
            for o in node.output:
                up[o] = True
    down: dict[str, bool] = {}
    for node in reversed(list(graph.nodes)):
        flag = id(node) in candidates or any(down.get(o, False) for o in node.output)
        if flag:
            for i in node.input:
                if i:
                    down[i] = True
    return up, down
