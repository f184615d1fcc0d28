"""What a channel rule may ask of the analysis that calls it: the two context protocols and `RuleBarrier`.

Rules are written against these protocols only; `channels.CouplingContext` and `rewrite.RewriteContext`
implement them. So the rules depend on nothing above them, and the analysis and the rewrite import the
rules (never the other way round).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import onnx

from onnxprune.graph import Dim, ModelGraph


class RuleBarrier(Exception):
    """Raised by a rule: this node cannot pass channels; all its dims are frozen."""


class ShapeView(Protocol):
    """Shapes and constant values of the graph being analysed or rewritten (before any removal)."""

    graph: ModelGraph

    def shape(self, name: str) -> tuple[Dim, ...] | None: ...

    def rank(self, name: str) -> int | None: ...

    def size(self, name: str, axis: int) -> Dim: ...

    def const(self, name: str) -> np.ndarray | None: ...


class CouplingContext(ShapeView, Protocol):
    """What `ChannelRule.couple` records: which positions of which dims are the same channel.

    A *dim* is ``(tensor, axis)``. `link` identifies positions of two dims (all of them, or the given
    position arrays), `freeze` makes a dim unprunable, `mark_inexact` makes its removal approximate,
    `independent` says the node deliberately leaves a dim uncoupled, `require_kept` sets the fewest positions
    a dim may keep (a TopK choosing k of them), `set_role` tags an initializer for the masking oracle
    ('weight', 'bias', 'scale', 'variance', 'divisor').
    """

    def link(self, a: str, axis_a: int, b: str, axis_b: int, pos_a: Any = None, pos_b: Any = None) -> None: ...

    def link_all(self, a: str, b: str) -> None: ...

    def independent(self, name: str, axis: int) -> None: ...

    def independent_tensor(self, name: str) -> None: ...

    def freeze(self, name: str, axis: int, reason: str) -> None: ...

    def freeze_tensor(self, name: str, reason: str) -> None: ...

    def mark_inexact(self, name: str, axis: int, reason: str) -> None: ...

    def require_kept(self, name: str, axis: int, count: int) -> None: ...

    def set_role(self, name: str, role: str) -> None: ...


class RewriteContext(ShapeView, Protocol):
    """What `ChannelRule.rewrite` sees after removal: old and new sizes, removed positions, and edits of
    shape constants (applied after every rule ran, so a shared constant is never edited in place)."""

    def removed(self, tensor: str, axis: int) -> np.ndarray: ...

    def old_size(self, tensor: str, axis: int) -> Dim: ...

    def new_size(self, tensor: str, axis: int) -> Dim: ...

    def set_element(self, location: tuple[onnx.NodeProto, int, int], value: int) -> None: ...

    def replace_input(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None: ...

    def fresh_name(self, base: str) -> str: ...

    def opset(self) -> int: ...

    def replace_node(
        self, node: onnx.NodeProto, nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray]
    ) -> None: ...
