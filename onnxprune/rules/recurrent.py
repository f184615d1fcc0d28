"""Recurrent layers: LSTM, GRU and RNN. Their hidden size is a channel axis; their input size is another.

A layer with G gates (LSTM 4 in iofc order, GRU 3 in zrh order, RNN 1) and hidden size H keeps hidden
channel j of every direction in:

* W ``[dirs, G*H, input]`` and R ``[dirs, G*H, H]``: rows ``g*H + j`` of every gate g;
* R's column j as well (the hidden state feeds back into every gate), so R holds the channel twice;
* B ``[dirs, 2*G*H]``: positions ``k*H + j`` of both halves (input and recurrence biases);
* P ``[dirs, 3*H]`` (LSTM peepholes): positions ``k*H + j``;
* initial_h / initial_c, Y_h / Y_c ``[dirs, batch, H]`` and Y ``[seq, dirs, batch, H]`` at their last
  axis (layout 1 moves batch first: ``[batch, dirs, H]``, ``[batch, seq, dirs, H]``).

One ``hidden_size`` attribute serves both directions, so channel j of the forward and of the backward
direction are one channel (removed together). The input size couples X's last axis with W's last axis.
Directions are frozen (the ``direction`` attribute fixes their count); sequence and batch axes pass.

Removal is exact: with its W, R and B rows zero, a channel's gates read only zeros, so its cell
candidate (LSTM, GRU) or its state (RNN) is ``act(0) = 0``; starting from a zero initial state its
hidden state stays 0 at every step, and its zeroed R column means it adds nothing to the other channels.
This needs activations that map 0 to 0 where they produce the state (LSTM g and h, GRU g, RNN f): any
other activation (Sigmoid, HardSigmoid, Softplus, Affine) makes the rule a barrier.

Exporters build zero initial states of a run-time batch size as ``ConstantOfShape(Concat(dirs, batch,
H))``: the fill rule (`rules.shape.Fill`) passes such a tensor's hidden axis to the layer (its constant size
element is rewritten).
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.graph import attrs, set_attr
from onnxprune.rules.base import ChannelRule, register
from onnxprune.rules.protocols import CouplingContext, RewriteContext, RuleBarrier

# Activations f with f(0) == 0 for every alpha/beta (ThresholdedRelu: x if x > alpha else 0).
_ZERO_AT_ZERO = {"tanh", "relu", "leakyrelu", "thresholdedrelu", "scaledtanh", "elu", "softsign"}


class _Recurrent(ChannelRule):
    """The coupling shared by LSTM, GRU and RNN; subclasses say how many gates and activations they have."""

    gates: int = 1
    # Per direction: how many activations the op takes, their defaults, and which of them produce the state.
    default_activations: tuple[str, ...] = ("Tanh",)
    state_activations: tuple[int, ...] = (0,)

    def couple(self, node: onnx.NodeProto, ctx: CouplingContext) -> None:
        io = _Io(node)
        at = attrs(node)
        self._check_activations(node, at)
        r_sizes = [d for d in ctx.shape(io.r) or () if isinstance(d, int)]
        if len(r_sizes) != 3 or ctx.rank(io.r) != 3:
            raise RuleBarrier("recurrence weight shape unknown")
        dirs, rows, hidden = r_sizes
        if rows != self.gates * hidden:
            raise RuleBarrier(f"recurrence weight has {rows} rows, not {self.gates} x hidden size {hidden}")
        layout = at.get("layout", 0)
        state_dir, state_batch = (1, 0) if layout else (0, 1)  # initial_h, Y_h ...: [dirs, batch, H] / [batch, dirs, H]
        y_seq, y_dir, y_batch = (1, 2, 0) if layout else (0, 1, 2)
        x_seq, x_batch = (1, 0) if layout else (0, 1)
        # Hidden channel j, anchored on R's column j.
        j = np.arange(hidden)
        for g in range(self.gates):
            ctx.link(io.w, 1, io.r, 2, g * hidden + j, j)
            ctx.link(io.r, 1, io.r, 2, g * hidden + j, j)
        for k in range(2 * self.gates):
            ctx.link(io.b, 1, io.r, 2, k * hidden + j, j)
        for k in range(3):
            ctx.link(io.p, 1, io.r, 2, k * hidden + j, j)
        for state in io.states:
            ctx.link(state, 2, io.r, 2)
        ctx.link(io.y, 3, io.r, 2)
        # Input size.
        ctx.link(io.x, 2, io.w, 2)
        # Directions: one per weight slab, fixed by the `direction` attribute.
        for name, axis in [(io.w, 0), (io.b, 0), (io.p, 0), (io.y, y_dir)] + [(s, state_dir) for s in io.states]:
            ctx.link(name, axis, io.r, 0)
        if dirs > 1:
            ctx.freeze(io.r, 0, f"direction axis of {node.op_type}")
        # Sequence and batch.
        ctx.link(io.x, x_seq, io.y, y_seq)
        ctx.link(io.x, x_batch, io.y, y_batch)
        ctx.link(io.seq_lens, 0, io.x, x_batch)
        for state in io.states:
            ctx.link(state, state_batch, io.x, x_batch)
        for name in (io.w, io.r):
            ctx.set_role(name, "weight")
        for name in [io.b, io.p] + io.states:
            ctx.set_role(name, "bias")  # silenced to 0 like a bias

    def stacked_axes(self, node: onnx.NodeProto, output: int) -> set[int]:
        """Y's direction axis stacks two separate layers: a reshape merging ``[dirs, H]`` into ``dirs*H``
        features (``Y -> Transpose -> Reshape [seq, batch, 2H]``) keeps the hidden channels, channel j at
        positions ``d*H + j``."""
        if output != 0:
            return set()
        return {2 if attrs(node).get("layout", 0) else 1}

    def rewrite(self, node: onnx.NodeProto, ctx: RewriteContext) -> None:
        r = node.input[2]
        old, new = ctx.old_size(r, 2), ctx.new_size(r, 2)
        if old != new and isinstance(new, int):
            set_attr(node, "hidden_size", new)

    def _check_activations(self, node: onnx.NodeProto, at: dict) -> None:
        per_dir = len(self.default_activations)
        names = [_text(a) for a in at.get("activations", [])] or list(self.default_activations) * 2
        for d in range(max(1, len(names) // per_dir)):
            for k in self.state_activations:
                name = names[d * per_dir + k] if d * per_dir + k < len(names) else self.default_activations[k]
                if name.lower() not in _ZERO_AT_ZERO:
                    raise RuleBarrier(f"{node.op_type} activation {name} does not map 0 to 0")
        if at.get("layout", 0) not in (0, 1):
            raise RuleBarrier(f"{node.op_type} layout {at['layout']} unknown")


class _Io:
    """The named inputs and outputs of a recurrent node ('' where absent)."""

    def __init__(self, node: onnx.NodeProto) -> None:
        ins = list(node.input) + [""] * (8 - len(node.input))
        outs = list(node.output) + [""] * (3 - len(node.output))
        self.x, self.w, self.r, self.b, self.seq_lens = ins[:5]
        self.y = outs[0]
        lstm = node.op_type == "LSTM"
        self.p = ins[7] if lstm else ""
        states = [ins[5], outs[1]] + ([ins[6], outs[2]] if lstm else [])
        self.states = [s for s in states if s]


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


@register("LSTM", since=7)
class LSTM(_Recurrent):
    gates = 4
    default_activations = ("Sigmoid", "Tanh", "Tanh")  # f (gates), g (cell candidate), h (output)
    state_activations = (1, 2)


@register("GRU", since=7)
class GRU(_Recurrent):
    gates = 3
    default_activations = ("Sigmoid", "Tanh")  # f (update/reset gates), g (candidate)
    state_activations = (1,)


@register("RNN", since=7)
class RNN(_Recurrent):
    gates = 1
    default_activations = ("Tanh",)
    state_activations = (0,)

