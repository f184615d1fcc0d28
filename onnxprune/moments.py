"""Data-free activation moments: what BatchNorm running statistics say about each channel's mean and variance.

`channel_moments` walks back from a tensor to the BatchNorm that produced it (through Relu, pooling, Add,
Concat, Flatten) and returns per-position (mean, variance). The data-free `bias` repair
(`repair.repair_weights`) and the data-free OBS surrogate (`criteria.OBS` without calibration data) read
them; nothing here runs the model.
"""

from __future__ import annotations

import math

import numpy as np

from onnxprune.graph import ModelGraph, attrs


def _rectified(mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of max(0, y) for y ~ N(mean, var)."""
    from scipy.special import ndtr

    s = np.sqrt(np.maximum(var, 0.0))
    safe = np.where(s > 0, s, 1.0)
    a = mean / safe
    cdf, pdf = ndtr(a), np.exp(-0.5 * a**2) / np.sqrt(2 * np.pi)
    m1 = np.where(s > 0, mean * cdf + s * pdf, np.maximum(mean, 0.0))
    m2 = np.where(s > 0, (mean**2 + var) * cdf + mean * s * pdf, np.maximum(mean, 0.0) ** 2)
    return m1, np.maximum(m2 - m1**2, 0.0)


def channel_moments(graph: ModelGraph, tensor: str, axis: int = 1, _depth: int = 0):
    """(mean, var) per position of `tensor` along channel `axis`, from the BatchNorm statistics upstream.

    A BatchNorm in inference mode maps x ~ N(running_mean, running_var) to N(beta, gamma^2 v/(v+eps));
    Relu rectifies that Gaussian; pooling, Identity and Dropout keep the moments (an approximation for
    MaxPool); Add sums them (independence assumed); Concat on the channel axis and Flatten of an NCHW map
    rearrange them. Anything else returns None: no data-free estimate.
    """
    rank = graph.rank(tensor)
    node = graph.producer.get(tensor)
    if node is None or rank is None or axis % rank != 1 or _depth > 64:
        return None
    op, a = node.op_type, attrs(node)
    rec = lambda name, ax=1: channel_moments(graph, name, ax, _depth + 1)
    if op == "BatchNormalization" and len(node.input) >= 5 and not a.get("training_mode", 0):
        gamma, beta, var = (graph.const(n) for n in (node.input[1], node.input[2], node.input[4]))
        if gamma is None or beta is None or var is None:
            return None
        eps = a.get("epsilon", 1e-5)
        return beta.astype(np.float64), (gamma.astype(np.float64) ** 2) * var / (var + eps)
    if op == "Relu":
        m = rec(node.input[0])
        return None if m is None else _rectified(*m)
    if op in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Identity", "Dropout"):
        return rec(node.input[0])
    if op == "Add" and all(graph.const(i) is None for i in node.input):
        if graph.shape(node.input[0]) != graph.shape(node.input[1]):
            return None
        m0, m1 = rec(node.input[0]), rec(node.input[1])
        if m0 is None or m1 is None:
            return None
        return m0[0] + m1[0], m0[1] + m1[1]
    axis_attr = a.get("axis")
    if op == "Concat" and axis_attr is not None and axis_attr % rank == 1:
        parts = [rec(i) for i in node.input]
        if any(p is None for p in parts):
            return None
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if op == "Flatten" and a.get("axis", 1) == 1:
        src = graph.shape(node.input[0])
        if src is None or not all(isinstance(d, int) for d in src[1:]):
            return None
        m = rec(node.input[0])
        if m is None:
            return None
        block = math.prod(d for d in src[2:] if isinstance(d, int))  # all static (checked above)
        return np.repeat(m[0], block), np.repeat(m[1], block)
    return None
