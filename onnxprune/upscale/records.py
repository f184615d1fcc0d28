"""The records of an unconstrained plan: `Piece` (dims joined through non-boundary nodes, with the channels
a unit keeps), `GroupPlan` (one coupled group: its pieces, stream and channel order) and
`UnconstrainedPlan` (every group, over the split model). `plan.build_plan` fills them; `layout` sets each
unit's `narrow` flag and each group's `order`; `oracle` and `export` read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.channels import ChannelAnalysis, ChannelGroup, ChannelSlice, DimRef
from onnxprune.upscale.boundaries import SplitModel


@dataclass(eq=False)
class Piece:
    """Dims of one group joined through non-boundary nodes; a unit when it holds a producer/consumer."""

    id: int
    dims: list[DimRef]
    nodes: list[str]
    members: list[ChannelSlice]
    weights: list[ChannelSlice]  # producer / consumer weight members (scored)
    has_producer: bool
    has_consumer: bool
    in_boundaries: list[str]  # names of the boundary nodes writing into this piece
    out_boundaries: list[str]  # names of the boundary nodes reading from it
    zero_preserving: bool  # every node maps an all-silenced channel to zero
    keep: np.ndarray | None = None  # bool over the group's channels (units only)
    sources: frozenset[int] | None = None  # reader units: the writer pieces reaching it (`plan.reaching_writers`)
    narrow: bool = False  # exported at its own width (True) or at the stream's width

    @property
    def is_unit(self) -> bool:
        return bool(self.weights)

    @property
    def kept(self) -> np.ndarray:
        """`keep` of a unit whose channels `plan.build_plan` has chosen.

        Raises:
            ValueError: the piece is not a unit, or its channels are not chosen yet.
        """
        if self.keep is None:
            raise ValueError(f"piece {self.id} has no kept channels (not a unit, or not chosen yet)")
        return self.keep

    @property
    def narrowable(self) -> bool:
        """Whether exporting the unit at its own width is exact (see step 4 of the package docstring)."""
        if not self.is_unit:
            return False
        if not self.in_boundaries and not self.out_boundaries:
            return True
        if self.in_boundaries and not self.out_boundaries:
            return not self.has_producer
        if self.out_boundaries and not self.in_boundaries:
            return self.has_producer and not self.has_consumer and self.zero_preserving
        return False


@dataclass(eq=False)
class GroupPlan:
    """One coupled group's pieces, its stream (`union`) and the channel order the export uses."""

    group: ChannelGroup
    pieces: list[Piece]
    piece_of: dict[DimRef, int]
    union: np.ndarray  # bool over channels: the stream
    order: np.ndarray  # channel order used by the export

    def width(self, ref: DimRef) -> np.ndarray:
        """The channels the export keeps on a dim: the unit's own when it is narrowed, else the stream."""
        piece = self.pieces[self.piece_of[ref]]
        return piece.kept if piece.narrow else self.union

    def mask_set(self, ref: DimRef) -> np.ndarray:
        """The channels the oracle keeps on a dim: the unit's own, else the stream."""
        piece = self.pieces[self.piece_of[ref]]
        return piece.keep if piece.keep is not None else self.union


@dataclass(eq=False)
class UnconstrainedPlan:
    """Every pruned group's plan, over the split model (`split.model`) and its channel analysis."""

    split: SplitModel
    analysis: ChannelAnalysis
    groups: list[GroupPlan]

    @property
    def model(self) -> onnx.ModelProto:
        """The model with boundary Identity nodes."""
        return self.split.model

    @property
    def boundaries(self) -> int:
        """How many boundary nodes the split inserted."""
        return self.split.count

    def group_plan(self, gid: int) -> GroupPlan | None:
        return next((gp for gp in self.groups if gp.group.id == gid), None)
