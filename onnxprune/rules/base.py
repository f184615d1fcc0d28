"""The channel-rule protocol and its one registry.

A `ChannelRule` knows one operator family: `couple` tells the coupling analysis which input/output
positions are the same channel (see `channels.CouplingContext`), `rewrite` updates the node's attributes
and shape constants after channels were removed. Adding an operator touches exactly one rule file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import onnx

if TYPE_CHECKING:
    from onnxprune.channels import CouplingContext
    from onnxprune.rewrite import RewriteContext


class ChannelRule:
    """Base class. Subclasses set nothing else; the registry maps op types to instances."""

    def static_inputs(self, node: onnx.NodeProto) -> set[int]:
        """Input indices that are shape-like parameters (read for their value, not their channels)."""
        return set()

    def couple(self, node: onnx.NodeProto, ctx: CouplingContext) -> None:
        raise NotImplementedError

    def rewrite(self, node: onnx.NodeProto, ctx: RewriteContext) -> None:
        """Update attributes / shape constants after removal. Default: nothing depends on sizes."""


class RuleRegistry:
    def __init__(self) -> None:
        self._rules: dict[tuple[str, str], ChannelRule] = {}

    def register(self, *op_types: str, domain: str = "") -> Callable[[type[ChannelRule]], type[ChannelRule]]:
        def deco(cls: type[ChannelRule]) -> type[ChannelRule]:
            instance = cls()
            for op in op_types:
                key = (domain, op)
                if key in self._rules:
                    raise ValueError(f"two channel rules for {op}")
                self._rules[key] = instance
            return cls

        return deco

    def get(self, domain: str, op_type: str) -> ChannelRule | None:
        if domain == "ai.onnx":
            domain = ""
        return self._rules.get((domain, op_type))

    def op_types(self) -> list[str]:
        return sorted(f"{d + '::' if d else ''}{op}" for d, op in self._rules)


RULES = RuleRegistry()
register = RULES.register
