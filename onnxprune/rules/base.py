"""The channel-rule base class and its one registry.

A `ChannelRule` knows one operator family: `couple` tells the coupling analysis which input/output
positions are the same channel (see `protocols.CouplingContext`), `rewrite` updates the node's attributes
and shape constants after channels were removed. A rule also declares what its operators guarantee,
per op type (`zero_preserving`, `same_shape`; `linear_axes` for linear layers): passes and shape
inference ask `facts.op_facts` instead of keeping op tables of their own.

Rules are registered for a range of opsets (`register(*ops, since=.., until=..)`) and looked up with the
model's opset, so an operator whose semantics changed (Softmax at opset 13) gets one rule per version.
Adding an operator touches one rule file and adds one row to the table in ``tests/test_rules.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import TypeVar

import onnx

from onnxprune.graph import ModelGraph
from onnxprune.rules.protocols import CouplingContext, RewriteContext


@dataclass(frozen=True)
class OpFacts:
    """What an operator guarantees, independent of its channel coupling.

    Attributes:
        zero_preserving: an all-zero input channel (parameters silenced as `rewrite.apply_mask` does: zero,
            1 for variances and divisors) gives an all-zero output channel.
        same_shape: output 0 has input 0's shape and element type.
    """

    zero_preserving: bool = False
    same_shape: bool = False


class ChannelRule:
    """Base class of the rules; the registry maps op types (and opset ranges) to instances.

    Class attributes declare facts per op type: `zero_preserving` and `same_shape` list the registered
    op types of this rule that have the property. `couples` is False for a facts-only entry: the
    operator has no channel rule yet (the analysis treats it as a barrier) but its facts are known.
    """

    zero_preserving: Collection[str] = ()
    same_shape: Collection[str] = ()
    couples: bool = True
    #: a facts-only entry's explanation, reported as the barrier's reason instead of "no channel rule for ..."
    barrier_reason: str = ""

    def static_inputs(self, node: onnx.NodeProto) -> set[int]:
        """Input indices that are shape-like parameters (read for their value, not their channels)."""
        return set()

    def couple(self, node: onnx.NodeProto, ctx: CouplingContext) -> None:
        raise NotImplementedError

    def rewrite(self, node: onnx.NodeProto, ctx: RewriteContext) -> None:
        """Update attributes / shape constants after removal. Default: nothing depends on sizes."""

    def facts(self, op_type: str) -> OpFacts:
        return OpFacts(zero_preserving=op_type in self.zero_preserving, same_shape=op_type in self.same_shape)

    def stacked_axes(self, node: onnx.NodeProto, output: int) -> set[int]:
        """Axes of output `output` that stack separate tensors (an RNN's directions): a reshape merging such an
        axis with the next one keeps the next one's channels (``[dirs, H] -> dirs*H``: channel j at ``d*H + j``)."""
        return set()

    def linear_axes(self, node: onnx.NodeProto, graph: ModelGraph) -> tuple[int, int] | None:
        """For a linear layer: (input-channel axis, output-channel axis) of its weight (input 1)."""
        return None

    def output_shape(self, node: onnx.NodeProto, shape_of: Callable[[str], tuple | None]) -> tuple | None:
        """Output 0's shape from the inputs' (`shape_of(name)`: sizes, symbols or None each; None when unknown),
        for an operator onnx's shape inference does not know (a contrib op); None: not declared."""
        return None


@dataclass(frozen=True)
class Registration:
    """One registry entry: `rule` handles `op_type` for opsets ``since <= opset <= until``."""

    domain: str
    op_type: str
    since: int
    until: int | None
    rule: ChannelRule

    def covers(self, opset: int) -> bool:
        return self.since <= opset and (self.until is None or opset <= self.until)


R = TypeVar("R", bound=type[ChannelRule])


class RuleRegistry:
    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], list[Registration]] = {}

    def register(self, *op_types: str, domain: str = "", since: int = 1, until: int | None = None) -> Callable[[R], R]:
        """Class decorator: the rule handles `op_types` of `domain` for opsets `since`..`until` (inclusive).

        Raises:
            ValueError: two rules for one operator with overlapping opset ranges.
        """

        def deco(cls: R) -> R:
            instance = cls()
            for op in op_types:
                entries = self._entries.setdefault(_key(domain, op), [])
                new = Registration(_key(domain, op)[0], op, since, until, instance)
                if any(_overlap(e, new) for e in entries):
                    raise ValueError(f"two channel rules for {op} at one opset")
                entries.append(new)
            return cls

        return deco

    def check(self) -> None:
        """Every fact a rule declares names an op type registered for that rule (catches typos).

        Raises:
            ValueError: a declared op type the rule does not handle.
        """
        ops_of: dict[type[ChannelRule], set[str]] = {}
        for reg in self.registrations():
            ops_of.setdefault(type(reg.rule), set()).add(reg.op_type)
        for cls, ops in ops_of.items():
            stray = (set(cls.zero_preserving) | set(cls.same_shape)) - ops
            if stray:
                raise ValueError(f"{cls.__name__} declares facts for op types it does not register: {sorted(stray)}")

    def get(self, domain: str, op_type: str, opset: int | None = None) -> ChannelRule | None:
        """The rule for an operator at `opset`; the newest rule when the opset is unknown (None or 0)."""
        reg = self.registration(domain, op_type, opset)
        return reg.rule if reg is not None and reg.rule.couples else None

    def registration(self, domain: str, op_type: str, opset: int | None = None) -> Registration | None:
        """The entry (coupling or facts-only) for an operator at `opset` (newest when unknown)."""
        entries = self._entries.get(_key(domain, op_type))
        if not entries:
            return None
        if not opset:
            return max(entries, key=lambda e: e.since)
        return next((e for e in entries if e.covers(opset)), None)

    def registrations(self) -> Iterator[Registration]:
        """Every entry, sorted by domain, op type and first opset."""
        for key in sorted(self._entries):
            yield from sorted(self._entries[key], key=lambda e: e.since)

    def op_types(self) -> list[str]:
        """Op types that have a channel rule at some opset (``domain::op`` outside the default domain)."""
        return sorted(
            {f"{d + '::' if d else ''}{op}" for (d, op), entries in self._entries.items() if any(e.rule.couples for e in entries)}
        )


def _key(domain: str, op_type: str) -> tuple[str, str]:
    return ("" if domain == "ai.onnx" else domain, op_type)


def _overlap(a: Registration, b: Registration) -> bool:
    a_end = a.until if a.until is not None else 1 << 30
    b_end = b.until if b.until is not None else 1 << 30
    return a.since <= b_end and b.since <= a_end


RULES = RuleRegistry()
register = RULES.register
