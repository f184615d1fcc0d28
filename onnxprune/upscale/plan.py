"""Step 2 of UPSCALE: which channels every unit keeps, and the stream each group keeps for them.

Start reading at `build_plan`: `prepare` splits the boundaries (`boundaries.split_boundaries`), finds each
group's pieces (`find_pieces`) and scores every unit (`scores.own_scores`, and the group's shared ranking);
`choose` then lets the units choose in the order ``config.drive`` sets (writers first, readers first, or
each on its own; `reaching_writers` says which writers' outputs reach a reader), with one kept count per
group (the ratio's, or per-group counts from `upscale.allocate`), and rounds the stream (the union) up to
``stream_multiple`` (or to the group's next allowed count of ``keep_counts``). `prepare` runs once; a
parameter target (`allocate.plan_for_target`) calls `choose` for many per-group counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.calibration import CalibrationStats, collect_stats, consumers
from onnxprune.calibration_data import as_calibration
from onnxprune.channels import ChannelAnalysis, ChannelGroup, ChannelSlice, DimRef, analyze
from onnxprune.dense_rows import consumer_index
from onnxprune.graph import ModelGraph, attrs
from onnxprune.rules.facts import op_facts
from onnxprune.upscale.boundaries import SplitModel, roles, split_boundaries
from onnxprune.upscale.config import UnconstrainedConfig
from onnxprune.upscale.coupled import ReaderLS, coupled_keeps, reader_least_squares, writer_energy
from onnxprune.upscale.records import GroupPlan, Piece, UnconstrainedPlan
from onnxprune.upscale.scores import measured_energy, normalised, own_scores, shared_scores

Reach = dict[int, frozenset[int] | None]  # reader piece id -> the writer pieces reaching it (None: unknown)


@dataclass(eq=False)
class PreparedGroup:
    """One group with units: its pieces, which writers reach each reader, and the scores (own and shared)."""

    group: ChannelGroup
    pieces: list[Piece]
    piece_of: dict[DimRef, int]
    reach: Reach
    own: dict[int, np.ndarray]  # unit piece id -> its own scores (the shared ones for a group's only unit)
    shared: np.ndarray  # the group's one ranking (`scores.shared_scores`), mean-normalised
    # writer unit piece id -> E[out_c^2] of its output (measured, else its BatchNorm's model, else its own
    # squared scores): how much of a stream channel each writer carries (`coupled`)
    energy: dict[int, np.ndarray] = field(default_factory=dict)
    least_squares: dict[int, ReaderLS] = field(default_factory=dict)  # reader_choice="ls": by reader piece id

    @property
    def units(self) -> list[Piece]:
        return [pc for pc in self.pieces if pc.is_unit]


@dataclass(eq=False)
class Prepared:
    """What `choose` needs and does not change: the split model, its analysis, every group with units."""

    split: SplitModel
    analysis: ChannelAnalysis
    groups: list[PreparedGroup]


def unit_key(pc: Piece) -> tuple[tuple[str, int, int], ...]:
    """A unit's name that survives re-analysis (its weight axes and where its positions start there: one
    axis may hold channels of several groups, e.g. behind a channel Pad), for keeps carried across a repair."""
    return tuple(sorted({(m.tensor, m.axis, int(m.positions[0])) for m in pc.weights}))


def build_plan(model: onnx.ModelProto, config: UnconstrainedConfig, keeps: dict | None = None,
               counts: dict[int, int] | None = None) -> UnconstrainedPlan:  # fmt: skip
    """Split boundaries, find pieces, choose each unit's kept channels.

    Args:
        keeps: optional kept masks overriding the scores, keyed by ``(group id, piece id)`` (tests draw
            random kept sets) or by `unit_key` (keeps carried from a plan of the same model before repair).
        counts: optional kept count per group id of the split model's analysis (else the ratio's).
    """
    return choose(prepare(model, config), config, keeps, counts)


def prepare(model: onnx.ModelProto, config: UnconstrainedConfig, calib: dict[str, np.ndarray] | None = None) -> Prepared:
    """Split the boundaries, analyse the split model, find each group's pieces and score its units.

    Args:
        calib: calibration inputs: readers weight their columns by their input's measured energy
            (`scores.measured_energy`) instead of an estimate from BatchNorm statistics.
    """
    split = split_boundaries(model)
    analysis = analyze(ModelGraph(split.model))
    found: list[tuple[ChannelGroup, list[Piece], dict[DimRef, int]]] = []
    for group in analysis.groups:
        pieces, piece_of = find_pieces(analysis, group, split)
        if any(pc.is_unit for pc in pieces):
            found.append((group, pieces, piece_of))
    measured = None
    if calib is not None:
        measured = measured_energy(split.model, [pc for _, pieces, _ in found for pc in pieces], calib)
    boundary_input = {n.name: n.input[0] for n in split.model.graph.node if split.is_boundary(n)}
    stats = None
    if calib is not None and config.reader_choice in ("ls", "seq"):
        stats = reader_statistics(model, found, calib)
    groups: list[PreparedGroup] = []
    for group, pieces, piece_of in found:
        units = [pc for pc in pieces if pc.is_unit]
        reach = reaching_writers(analysis, group, pieces, piece_of)
        for pid, srcs in reach.items():
            pieces[pid].sources = srcs
        own = {pc.id: own_scores(pc, pieces, analysis, group.size, config.criterion, measured) for pc in units}
        shared = shared_scores(group, analysis, config.criterion, list(own.values()))
        if len(units) == 1:  # the unit is the whole group: its own ranking is the group's
            own = {pc.id: shared for pc in units}
        energy = {pc.id: writer_energy(pc, own[pc.id], analysis, group.size, measured, boundary_input)
                  for pc in units if pc.has_producer}  # fmt: skip
        fits: dict[int, ReaderLS] = {}
        if stats is not None and len(units) > 1:
            for pc in units:
                fit = None if pc.has_producer else reader_least_squares(pc, analysis, group.size, stats)
                if fit is not None:
                    fits[pc.id] = fit
        groups.append(PreparedGroup(group, pieces, piece_of, reach, own, shared, energy, fits))
    return Prepared(split, analysis, groups)


def reader_statistics(model: onnx.ModelProto, found: list[tuple[ChannelGroup, list[Piece], dict[DimRef, int]]],
                      calib: dict[str, np.ndarray]) -> CalibrationStats:
    """The calibration Hessians `coupled.reader_least_squares` reads: of the one-weight reader units of groups
    with two or more units, nothing else (no moments), each drawn from the rows a pass over every consumer would
    draw (`dense_rows.consumer_index`), so the fits are those of a full pass. EfficientNet-Lite0, 256 samples at
    224x224: 14 of its 34 consumers, 5.25 -> 1.54 s; the unconstrained best CLI run 49.8 / 48.6 -> 45.1 / 45.5 s
    in two interleaved pairs, the pruned model bit-identical (session 53, `bench/repair_speed_results.txt`)."""
    wanted = {(pc.weights[0].tensor, pc.weights[0].axis) for _, pieces, _ in found
              if sum(pc.is_unit for pc in pieces) > 1
              for pc in pieces if pc.is_unit and not pc.has_producer and len(pc.weights) == 1}  # fmt: skip
    which = [c for c in consumers(ModelGraph(model)) if (c.weight, c.in_axis) in wanted]
    return collect_stats(model, as_calibration(calib), which, moments=False, index=consumer_index(model))


def ratio_keep(size: int, ratio: float) -> int:
    """Channels a unit keeps at `ratio` (the count constrained pruning keeps per group)."""
    return max(1, size - math.floor(ratio * size + 1e-9))


def choose(prep: Prepared, config: UnconstrainedConfig, keeps: dict | None = None,
           counts: dict[int, int] | None = None, allowed_counts: dict[int, tuple[int, ...]] | None = None,
           ) -> UnconstrainedPlan:  # fmt: skip
    """Every unit's kept channels and every group's stream (see the module docstring).

    Args:
        keeps: as in `build_plan`.
        counts: kept count per group id (default: the ratio's).
        allowed_counts: per group id, the kept counts a unit may have (ascending; `allocate.snap`): a
            unit keeping another count drops its lowest channels down to the next allowed one, and the
            stream widens to an allowed count where it can.
    """
    fixed_keeps = keeps or {}
    plans: list[GroupPlan] = []
    for pg in prep.groups:
        group, pieces = pg.group, pg.pieces
        units = pg.units
        n_keep = counts[group.id] if counts is not None and group.id in counts else ratio_keep(group.size, config.ratio)
        grid = (allowed_counts or {}).get(group.id)
        fixed: set[int] = set()
        for pc in units:
            keep = fixed_keeps.get((group.id, pc.id), fixed_keeps.get(unit_key(pc)))
            if keep is not None:
                keep = np.asarray(keep, dtype=bool).copy()
                if not keep.any():
                    keep[0] = True
                pc.keep = keep
                fixed.add(pc.id)
        _choose_group(prep, pg, config, n_keep, fixed, grid)
        for pc in units:
            pc.narrow = pc.narrowable
        union = np.logical_or.reduce([pc.kept for pc in units])
        same = all(np.array_equal(pc.kept, union) for pc in units)  # constrained: no stream to widen
        if not same:
            _widen_stream(union, config.stream_multiple, grid)
        plans.append(GroupPlan(group, pieces, pg.piece_of, union, np.arange(group.size)))
    return UnconstrainedPlan(prep.split, prep.analysis, plans)


def _widen_stream(union: np.ndarray, multiple: int, grid: tuple[int, ...] | None) -> None:
    """Widen the stream in place with channels no unit keeps (every reader has zero columns there, so
    this is exact): to the group's next allowed count, else to a multiple of `multiple` where that adds at
    most 1/8 (runtimes keep blocked layouts, NCHWc, for SIMD-friendly widths; a Concat input's few
    channels gain nothing from it)."""
    have = int(union.sum())
    if grid is not None:
        target = next((n for n in grid if n >= have), have)
        deficit = target - have
    else:
        deficit = -have % max(1, multiple)
        if deficit * 8 > have:
            deficit = 0
    if deficit and have + deficit <= len(union):
        union[np.flatnonzero(~union)[:deficit]] = True


def _choose_group(prep: Prepared, pg: PreparedGroup, config: UnconstrainedConfig, n_keep: int, fixed: set[int],
                  grid: tuple[int, ...] | None) -> None:  # fmt: skip
    """Every unit's `keep` in one group, in the order ``config.drive`` sets; with ``group_budget`` the
    count shrinks until the group holds no more parameters than constrained pruning keeps at `n_keep`."""
    group, pieces, reach = pg.group, pg.pieces, pg.reach
    units = pg.units
    allowed = np.ones(group.size, dtype=bool)
    if config.union_cap is not None and len(units) > 1:
        # The stream budget: the group's top channels by the shared ranking (stable, like `make_plan`).
        # Rounded to the nearest multiple of `stream_multiple`, so an absorbed stream keeps blocked layouts.
        m = max(1, config.stream_multiple)
        width = min(group.size, max(n_keep, round(config.union_cap * n_keep / m) * m))
        allowed[:] = False
        allowed[np.argsort(-pg.shared, kind="stable")[:width]] = True
    shared = pg.shared if config.share else None

    def choose_one(pc: Piece, within: np.ndarray, n: int) -> np.ndarray:
        return _top_channels(pg.own[pc.id], shared, config.share, within, n)

    def choose_scored(pc: Piece, scores: np.ndarray, within: np.ndarray, n: int) -> np.ndarray:
        return _top_channels(scores, shared, config.share, within, n)

    writers = [pc for pc in units if pc.has_producer]
    readers = [pc for pc in units if not pc.has_producer]

    def run(n: int) -> None:
        if config.drive == "reader":
            # A writer no reader reads keeps the group's own count (its channels cost what constrained's do).
            def choose_k(pc: Piece, within: np.ndarray, k: int = n_keep) -> np.ndarray:
                return choose_one(pc, within, k)

            _reader_first(n, readers, writers, pieces, reach, fixed, allowed, choose_k)
        elif config.drive == "coupled":  # writers and readers choose for each other (`coupled`)
            coupled_keeps(units, pg.own, pg.energy, prep.analysis, group.size, fixed, choose_scored, allowed, n,
                          pg.least_squares)
        else:  # "free": every unit chooses; "writer": the writers choose first
            for pc in units if config.drive == "free" else writers:
                if pc.id not in fixed:
                    pc.keep = choose_one(pc, allowed, n)
        if config.drive == "writer":
            for pc in readers:  # among what the writers reaching it keep
                if pc.id in fixed:
                    continue
                srcs = reach.get(pc.id)
                within = allowed if srcs is None else allowed & np.logical_or.reduce([pieces[w].kept for w in srcs])
                pc.keep = choose_one(pc, within, n)
            if _closed(prep.analysis, group, pieces, prep.split):
                # Then each writer drops what none of the readers it reaches reads (it would only add
                # parameters: every reader has zero columns there).
                for pc in writers:
                    read = _read_by(pc, readers, reach, pieces)
                    if pc.id not in fixed and read is not None and (pc.kept & read).any():
                        pc.keep = pc.kept & read
        if grid is not None:
            for pc in units:
                if pc.id not in fixed:
                    pc.keep = _snap_keep(pc.kept, pg.own[pc.id], grid)

    run(n_keep)
    if config.group_budget and len(units) > 1 and len(fixed) < len(units):
        # Units keep fewer channels until the group holds no more parameters than constrained pruning keeps
        # at n_keep (a reader-driven writer grows to its readers' union): equal parameters per group, so the
        # global budget (and every chain group) stays where constrained has it.
        per = {pc.id: _params_per_channel(pc, prep.analysis) for pc in units}
        budget = n_keep * sum(per.values())
        n = n_keep
        while n > 1 and sum(int(pc.kept.sum()) * per[pc.id] for pc in units) > budget:
            n = max([c for c in grid if c < n], default=1) if grid is not None else n - 1
            run(n)


def _snap_keep(keep: np.ndarray, own: np.ndarray, grid: tuple[int, ...]) -> np.ndarray:
    """`keep` down to the largest allowed count it reaches (its lowest-scored channels dropped first)."""
    have = int(keep.sum())
    target = max([n for n in grid if n <= have], default=min(grid[0], have))
    if target >= have or target < 1:
        return keep
    kept = np.flatnonzero(keep)
    out = keep.copy()
    out[kept[np.argsort(normalised(own)[kept], kind="stable")[: have - target]]] = False
    return out


def _reader_first(n: int, readers: list[Piece], writers: list[Piece], pieces: list[Piece], reach: Reach,
                  fixed: set[int], allowed: np.ndarray, choose: Callable[..., np.ndarray]) -> None:  # fmt: skip
    """drive="reader": each reader its top `n` channels, each writer what the readers it reaches keep."""
    for pc in readers:
        if pc.id not in fixed:
            pc.keep = choose(pc, allowed, n)
    for pc in writers:
        if pc.id in fixed:
            continue
        read = _read_by(pc, readers, reach, pieces)
        keep = allowed & read if read is not None else None
        pc.keep = keep if keep is not None and keep.any() else choose(pc, allowed)


def _read_by(writer: Piece, readers: list[Piece], reach: Reach, pieces: list[Piece]) -> np.ndarray | None:
    """The channels the readers this writer reaches keep (their union); None when it reaches none."""
    dsts = [r.id for r in readers if writer.id in (reach.get(r.id) or ())]
    return np.logical_or.reduce([pieces[r].kept for r in dsts]) if dsts else None


def _params_per_channel(pc: Piece, analysis: ChannelAnalysis) -> float:
    """Parameter elements one channel of the unit holds (its parameter members, all positions)."""
    total = 0.0
    for m in pc.members:
        if not m.is_param:
            continue
        array = analysis.graph.const(m.tensor)
        if array is None or array.ndim == 0:
            continue
        total += array.size / array.shape[m.axis] * len(m.positions) / max(1, int(m.channel_of.max()) + 1)
    return total


def _top_channels(own: np.ndarray, shared: np.ndarray | None, share: float, within: np.ndarray, n_keep: int) -> np.ndarray:
    """The unit's top `n_keep` channels among `within` by its own scores blended with the shared ranking
    (all of `within` when it has fewer; `within` empty: the top `n_keep` overall)."""
    scores = normalised(own)
    if share:
        if shared is None:
            raise ValueError("blending in the shared ranking (share > 0) needs the shared scores")
        scores = (1 - share) * scores + share * shared
    scores = np.where(within, scores, -np.inf)  # outside the stream budget: dropped first
    # Lowest scores go first; a stable sort of the scores (not of their negation) breaks ties like
    # constrained pruning does (`plan.make_plan`), so share=1 reproduces it exactly.
    order = np.argsort(scores, kind="stable")
    keep = np.ones(len(scores), dtype=bool)
    keep[order[: len(scores) - n_keep]] = False
    return keep & within if within.any() else keep


def find_pieces(analysis: ChannelAnalysis, group: ChannelGroup, split: SplitModel) -> tuple[list[Piece], dict[DimRef, int]]:
    """The group's dims joined through every node but the split's boundaries, and which piece holds each dim."""
    graph = analysis.graph
    r = roles(graph, analysis, group)
    by_tensor: dict[str, list[ChannelSlice]] = {}
    for m in group.members:
        by_tensor.setdefault(m.tensor, []).append(m)
    refs = [DimRef(m.tensor, m.axis) for m in group.members]
    index = {ref: i for i, ref in enumerate(refs)}
    parent = list(range(len(refs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    node_dims: dict[str, list[int]] = {}
    for node in graph.nodes:
        if split.is_boundary(node):
            continue
        dims = [index[DimRef(m.tensor, m.axis)] for n in list(node.input) + list(node.output) for m in by_tensor.get(n, [])]
        if not dims:
            continue
        node_dims[node.name] = dims
        for d in dims[1:]:
            a, b = find(dims[0]), find(d)
            if a != b:
                parent[a] = b
    roots = sorted({find(i) for i in range(len(refs))})
    piece_index = {root: k for k, root in enumerate(roots)}
    pieces = [Piece(k, [], [], [], [], False, False, [], [], True) for k in range(len(roots))]
    piece_of: dict[DimRef, int] = {}
    for i, ref in enumerate(refs):
        p = pieces[piece_index[find(i)]]
        p.dims.append(ref)
        p.members.append(group.members[i])
        piece_of[ref] = p.id
    nodes = {n.name: n for n in graph.nodes}
    for name, dims in node_dims.items():
        p = pieces[piece_index[find(dims[0])]]
        p.nodes.append(name)
        node = nodes[name]
        kind = r.kind(node)
        if kind in ("producer", "consumer"):
            p.has_producer |= kind == "producer"
            p.has_consumer |= kind == "consumer"
            for m in by_tensor.get(node.input[1] if len(node.input) > 1 else "", []) + by_tensor.get(node.input[0], []):
                if m.tensor in r.weights and m not in p.weights:
                    p.weights.append(m)
        if not _zero_preserving(node, analysis):
            p.zero_preserving = False
    for node in graph.nodes:
        if not split.is_boundary(node):
            continue
        for m in by_tensor.get(node.input[0], []):
            pieces[piece_of[DimRef(m.tensor, m.axis)]].out_boundaries.append(node.name)
        for m in by_tensor.get(node.output[0], []):
            pieces[piece_of[DimRef(m.tensor, m.axis)]].in_boundaries.append(node.name)
    return pieces, piece_of


def _zero_preserving(node: onnx.NodeProto, analysis: ChannelAnalysis) -> bool:
    if node.op_type == "Clip":
        lo = analysis.graph.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        hi = analysis.graph.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return (lo is None or float(lo) <= 0) and (hi is None or float(hi) >= 0)
    if node.op_type == "Pad":
        return attrs(node).get("mode", b"constant") in (b"constant", "constant", b"reflect", b"edge") and (
            len(node.input) < 3 or not node.input[2] or float(np.asarray(analysis.graph.const(node.input[2])).reshape(-1)[0]) == 0
        )
    return op_facts(node.op_type, node.domain).zero_preserving


def reaching_writers(analysis: ChannelAnalysis, group: ChannelGroup, pieces: list[Piece],
                     piece_of: dict[DimRef, int]) -> Reach:
    """For each reader unit (a unit without a producer), the writer units whose output reaches the
    tensors it reads through the stream (None: something else reaches it too, e.g. a graph input or a
    writer outside the group, so it may read any channel). Tensor-level: a reader of a residual block's
    input is reached by the writer of that input only, not by the block's own writers."""
    graph = analysis.graph
    dim_piece = {ref.tensor: piece_of[ref] for ref in piece_of}
    writers = {pc.id for pc in pieces if pc.is_unit and pc.has_producer}
    src: dict[str, frozenset[int] | None] = {}
    for node in graph.nodes:
        for out in node.output:
            if out not in dim_piece:
                continue
            pid = dim_piece[out]
            if pid in writers:
                src[out] = frozenset([pid])
                continue
            ins = [t for t in node.input if t in dim_piece and t not in graph.initializers]
            got = _union_if_known([src.get(t) for t in ins])
            src[out] = None if got is None or not ins else got
    reach: dict[int, frozenset[int] | None] = {}
    for pc in pieces:
        if not pc.is_unit or pc.has_producer:
            continue
        acc = _union_if_known([src.get(ref.tensor) for ref in pc.dims if ref.tensor not in graph.initializers])
        reach[pc.id] = acc if acc else None
    return reach


def _union_if_known(sets: list[frozenset[int] | None]) -> frozenset[int] | None:
    """The union of `sets`, or None when any of them is unknown (None)."""
    known = [s for s in sets if s is not None]
    return frozenset[int]().union(*known) if len(known) == len(sets) else None


def _closed(analysis: ChannelAnalysis, group: ChannelGroup, pieces: list[Piece], split: SplitModel) -> bool:
    """True when every reader of the group's activations is a node of one of its pieces (or a boundary)
    and none is a graph output: then a channel no reader unit reads reaches nothing."""
    graph = analysis.graph
    inside = {n for pc in pieces for n in pc.nodes}
    outputs = {o.name for o in graph.model.graph.output}
    for m in group.members:
        if m.is_param:
            continue
        if m.tensor in outputs:
            return False
        for use in graph.consumers.get(m.tensor, []):
            if use.node.name not in inside and not split.is_boundary(use.node):
                return False
    return True
