"""Channel coupling analysis: which weight slices must be removed together.

Start reading at `analyze`. The algorithm:

1. Every tensor axis that a rule mentions (a *dim*, ``(tensor, axis)`` with a static size > 1) gets one
   *atom* per position along that axis.
2. Each operator's `ChannelRule.couple` links atoms that are the same channel: an element-wise op links
   each position of its input with the same position of its output; a Concat links input positions to
   output positions at an offset; a Flatten links one input channel to a block of output features; a
   Reshape into heads links one head to ``head_dim`` positions of the flat axis; a grouped conv links a
   whole conv group. Linking many positions to one is how coarser units (heads, conv groups, GQA KV
   heads) appear: they are simply larger connected components.
3. Rules also *freeze* dims whose positions cannot be removed independently (graph inputs and outputs,
   operators without a rule, axes a rule does not map, dims that meet run-time shapes) and mark dims
   whose removal is only approximately equivalent as *inexact* (normalisation statistics over the axis).
4. Connected components of the atom graph (scipy, vectorised) are *channels*: a channel is removed as a
   whole. A channel is prunable when no frozen atom is in it and at least one initializer holds it.
5. Channels that occupy exactly the same dims form a `ChannelGroup`: they compete with each other for
   removal and always shrink the same tensors.

Nothing here edits the model: `rewrite.apply_plan` does that, given the `ChannelAnalysis` and a plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import scipy.sparse
import scipy.sparse.csgraph

from onnxprune.errors import UnsupportedModelError
from onnxprune.graph import ModelGraph, subgraph_reads
from onnxprune.onnx_utils import has_subgraph, opset_of
from onnxprune.quantized import is_parameter, source_initializer
from onnxprune.rules import RULES
from onnxprune.rules.protocols import RuleBarrier
from onnxprune.subgraphs import analysed_nodes, body_reason, descended, refusal, scoped_graph


@dataclass(frozen=True)
class DimRef:
    tensor: str
    axis: int

    def __str__(self) -> str:
        return f"{self.tensor}:{self.axis}"


@dataclass(frozen=True)
class Barrier:
    node: str
    op_type: str
    reason: str

    def as_dict(self) -> dict:
        return {"node": self.node, "op_type": self.op_type, "reason": self.reason}


# Dims larger than this are never treated as channels (no real layer has them; fuzzed shapes do).
MAX_CHANNELS = 1 << 26


@dataclass(frozen=True, eq=False)
class ChannelSlice:
    """The positions of one tensor axis that belong to a group, and which channel each one is."""

    tensor: str
    axis: int
    positions: np.ndarray  # sorted positions along `axis`
    channel_of: np.ndarray  # channel index (0..group.size-1) of each position
    is_param: bool  # an initializer (its data is sliced), not an activation

    def __str__(self) -> str:
        return f"{self.tensor}[axis {self.axis}]"


@dataclass(eq=False)
class ChannelGroup:
    """Coupled channels: removing channel k removes `positions[channel_of == k]` from every member."""

    id: int
    size: int
    members: tuple[ChannelSlice, ...]
    labels: np.ndarray  # component label of each channel
    params_per_channel: np.ndarray  # parameter elements each channel holds
    inexact: bool = False
    min_keep: int = 1  # fewest channels the group may keep (a TopK choosing that many of them)

    @property
    def params(self) -> int:
        return int(self.params_per_channel.sum())

    @property
    def param_members(self) -> list[ChannelSlice]:
        return [m for m in self.members if m.is_param]

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "channels": self.size,
            "params": self.params,
            "members": [str(m) for m in self.members if m.is_param],
            "inexact": self.inexact,  # only with --allow-inexact
            "min_keep": self.min_keep,
        }


@dataclass
class CouplingContext:
    """What a rule sees while coupling one node (`rules.protocols.CouplingContext`); collects atom links,
    frozen and inexact dims."""

    graph: ModelGraph
    dims: dict[DimRef, tuple[int, int]] = field(default_factory=dict)  # -> (first atom, size)
    n_atoms: int = 0
    edges_a: list[np.ndarray] = field(default_factory=list)
    edges_b: list[np.ndarray] = field(default_factory=list)
    frozen: dict[DimRef, str] = field(default_factory=dict)
    frozen_nodes: dict[DimRef, str] = field(default_factory=dict)  # the node being coupled when a dim froze
    inexact: dict[DimRef, str] = field(default_factory=dict)
    kept_at_least: dict[DimRef, int] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    mentioned: set[DimRef] = field(default_factory=set)  # by the current node
    node: onnx.NodeProto | None = None

    # ---- shapes and constants -------------------------------------------------------------------
    def shape(self, name: str):
        return self.graph.shape(name)

    def rank(self, name: str) -> int | None:
        return self.graph.rank(name)

    def size(self, name: str, axis: int):
        return self.graph.size(name, axis)

    def const(self, name: str) -> np.ndarray | None:
        return self.graph.const(name) if name else None

    def axis(self, name: str, axis: int) -> int:
        rank = self.rank(name)
        if rank is None:
            raise RuleBarrier(f"rank of {name!r} unknown")
        if not -rank <= axis < rank:
            raise RuleBarrier(f"axis {axis} out of range for {name!r}")
        return axis % rank

    # ---- coupling primitives --------------------------------------------------------------------
    def atoms(self, name: str, axis: int) -> np.ndarray | None:
        """Atom ids of a dim, allocated on first use; None if the dim is not static."""
        ref = DimRef(name, axis)
        if ref in self.dims:
            start, n = self.dims[ref]
            return np.arange(start, start + n)
        n = self.size(name, axis)
        if not isinstance(n, int) or n < 1 or n > MAX_CHANNELS:
            return None  # not static, or a declared size no real channel dim has (fuzzed inputs)
        self.dims[ref] = (self.n_atoms, n)
        self.n_atoms += n
        return np.arange(self.n_atoms - n, self.n_atoms)

    def link(self, a: str, axis_a: int, b: str, axis_b: int, pos_a=None, pos_b=None) -> None:
        """Positions `pos_a` of dim (a, axis_a) are the same channels as `pos_b` of (b, axis_b).

        With no positions given, the dims are identified position by position. A size-1 dim facing a
        larger one is broadcasting and is left independent.
        """
        if not a or not b:
            return
        ra, rb = self.rank(a), self.rank(b)
        if ra is None or rb is None:
            return self._unknown(a, axis_a, b, axis_b)
        if not (-ra <= axis_a < ra and -rb <= axis_b < rb):
            raise RuleBarrier(f"axis out of range linking {a!r} (rank {ra}) and {b!r} (rank {rb})")
        axis_a, axis_b = axis_a % ra, axis_b % rb
        self.mentioned.add(DimRef(a, axis_a))
        self.mentioned.add(DimRef(b, axis_b))
        sa, sb = self.size(a, axis_a), self.size(b, axis_b)
        if pos_a is None and pos_b is None:
            if sa == 1 or sb == 1:
                return  # broadcasting: independent
            if not isinstance(sa, int) or not isinstance(sb, int):
                return self._unknown(a, axis_a, b, axis_b)
            if sa != sb:
                self.freeze(a, axis_a, "size mismatch between coupled axes")
                self.freeze(b, axis_b, "size mismatch between coupled axes")
                return
        atoms_a, atoms_b = self.atoms(a, axis_a), self.atoms(b, axis_b)
        if atoms_a is None or atoms_b is None:
            if atoms_a is None and atoms_b is None:
                return
            return self._unknown(a, axis_a, b, axis_b)
        try:
            ia = atoms_a if pos_a is None else atoms_a[np.asarray(pos_a, dtype=np.int64)]
            ib = atoms_b if pos_b is None else atoms_b[np.asarray(pos_b, dtype=np.int64)]
        except IndexError:
            raise RuleBarrier(f"positions out of range linking {a!r} and {b!r} (inconsistent shapes)") from None
        if ia.shape != ib.shape:
            raise ValueError(f"link of {a}:{axis_a} and {b}:{axis_b} with {ia.shape} vs {ib.shape} positions")
        self.edges_a.append(ia)
        self.edges_b.append(ib)

    def _unknown(self, a: str, axis_a: int, b: str, axis_b: int) -> None:
        # One side has no static size: the other side cannot be mapped position by position.
        for name, ax in ((a, axis_a), (b, axis_b)):
            if self.rank(name) is not None:
                self.freeze(name, ax, "coupled to a dim of unknown size")

    def link_all(self, a: str, b: str, axes_a=None, axes_b=None) -> None:
        """Identify every axis of `a` with the matching axis of `b`, numpy-broadcasting from the right."""
        ra, rb = self.rank(a), self.rank(b)
        if ra is None or rb is None:
            return self._freeze_both_all(a, b)
        n = min(ra, rb)
        for k in range(1, n + 1):
            self.link(a, ra - k, b, rb - k)

    def _freeze_both_all(self, a: str, b: str) -> None:
        for name in (a, b):
            self.freeze_tensor(name, "rank unknown")

    def _mention(self, name: str, axis: int) -> DimRef | None:
        """The dim (`axis` taken modulo the rank), recorded as mentioned by the current node; None without a rank."""
        rank = self.rank(name)
        if rank is None:
            return None
        ref = DimRef(name, axis % rank)
        self.mentioned.add(ref)
        return ref

    def independent(self, name: str, axis: int) -> None:
        """This dim is deliberately not coupled through the current node (e.g. read only for its shape)."""
        self._mention(name, axis)

    def independent_tensor(self, name: str) -> None:
        rank = self.rank(name)
        for ax in range(rank or 0):
            self.independent(name, ax)

    def freeze(self, name: str, axis: int, reason: str) -> None:
        ref = self._mention(name, axis)
        if ref is not None and self.atoms(name, ref.axis) is not None and ref not in self.frozen:
            self.frozen[ref] = reason
            self.frozen_nodes[ref] = self.node.name if self.node is not None else ""

    def freeze_tensor(self, name: str, reason: str) -> None:
        for ax in range(self.rank(name) or 0):
            self.freeze(name, ax, reason)

    def mark_inexact(self, name: str, axis: int, reason: str) -> None:
        """Removing channels of this dim changes results (e.g. a mean over it): prunable only on request."""
        ref = self._mention(name, axis)
        if ref is not None and self.atoms(name, ref.axis) is not None:
            self.inexact.setdefault(ref, reason)

    def require_kept(self, name: str, axis: int, count: int) -> None:
        """At least `count` positions of this dim must stay (a TopK choosing `count` of them)."""
        ref = self._mention(name, axis)
        if ref is not None:
            self.kept_at_least[ref] = max(int(count), self.kept_at_least.get(ref, 1))

    def set_role(self, name: str, role: str) -> None:
        """Tag an initializer: 'weight' (scored), 'bias', 'scale', 'variance' or 'divisor' (masked to 1),
        'dequantization scale'.

        A dequantized constant (QDQ) passes its role to the integer initializer behind it."""
        if not self.graph.is_initializer(name):
            name = source_initializer(self.graph, name) or ""
        if name:
            self.roles.setdefault(name, role)


@dataclass
class ChannelAnalysis:
    """Result of `analyze`: groups, barriers and the atom labelling the rewrite needs."""

    graph: ModelGraph
    groups: list[ChannelGroup]
    barriers: list[Barrier]
    dims: dict[DimRef, tuple[int, int]]
    labels: np.ndarray  # component label of each atom
    roles: dict[str, str]
    frozen_reasons: dict[DimRef, str]  # reasons never hold node names: those are in `frozen_nodes`
    frozen_nodes: dict[DimRef, str] = field(default_factory=dict)  # the node that froze each dim ("" for none)
    inexact_reasons: dict[DimRef, str] = field(default_factory=dict)  # why a dim's removal is approximate

    def group(self, gid: int) -> ChannelGroup:
        return self.groups[gid]

    def dim_labels(self, ref: DimRef) -> np.ndarray:
        start, n = self.dims[ref]
        return self.labels[start : start + n]

    def removed_positions(self, removed_labels: np.ndarray) -> dict[DimRef, np.ndarray]:
        """Positions to delete on every dim, given the component labels of the removed channels."""
        out: dict[DimRef, np.ndarray] = {}
        if len(removed_labels) == 0:
            return out
        removed_labels = np.asarray(removed_labels)
        for ref in self.dims:
            hit = np.flatnonzero(np.isin(self.dim_labels(ref), removed_labels))
            if len(hit):
                out[ref] = hit
        return out

    def frozen_weights(self, examples: int = 3) -> list[dict]:
        """Weight axes no group can shrink, one row per reason, the most frequent reason first.

        A weight axis takes the reason of a frozen dim sharing a channel with it (a barrier, a graph
        input/output, a run-time shape); weight axes that are simply not channels (kernel sizes, gathered
        vocabulary rows) have the reason recorded on them. Reasons never hold names, so axes frozen for the
        same reason share one row.

        Returns:
            ``[{"reason": str, "count": weight axes, "examples": ["tensor:axis", ...], "nodes": [node, ...]}]``
            with up to `examples` example axes and the distinct nodes that froze them (as many).
        """
        in_group = {(m.tensor, m.axis) for g in self.groups for m in g.param_members}
        cause_of_label: dict[int, tuple[str, str]] = {}
        for ref, reason in self.frozen_reasons.items():
            for lab in np.unique(self.dim_labels(ref)).tolist():
                cause_of_label.setdefault(lab, (reason, self.frozen_nodes.get(ref, "")))
        # kept only because their removal is approximate; the reason marked last (nearest the output) first
        for ref, reason in reversed(list(self.inexact_reasons.items())):
            for lab in np.unique(self.dim_labels(ref)).tolist():
                cause_of_label.setdefault(lab, (f"removal would be inexact ({reason}); see --allow-inexact", ""))
        rows: dict[str, dict] = {}
        for ref in self.dims:
            if self.roles.get(ref.tensor) != "weight" or (ref.tensor, ref.axis) in in_group:
                continue
            if self.dims[ref][1] <= 1:  # the dim's static size
                continue
            labels = np.unique(self.dim_labels(ref)).tolist()
            reason, node = next(
                (cause_of_label[lab] for lab in labels if lab in cause_of_label),
                # neither frozen nor inexact (those have causes above): channels alone in their extent
                ("coupled across differing sets of tensors (e.g. norm groups straddling a Concat): no two channels "
                 "alike, and a lone channel is kept", ""),
            )
            row = rows.setdefault(reason, {"reason": reason, "count": 0, "examples": [], "nodes": []})
            row["count"] += 1
            if len(row["examples"]) < examples:
                row["examples"].append(str(ref))
            if node and node not in row["nodes"] and len(row["nodes"]) < examples:
                row["nodes"].append(node)
        return sorted(rows.values(), key=lambda r: -r["count"])

    @property
    def prunable_params(self) -> int:
        """Parameter elements that at least one group can remove (each element counted once)."""
        covered: dict[str, dict[int, set[int]]] = {}
        for g in self.groups:
            for m in g.param_members:
                if not is_parameter(self.graph, m.tensor):
                    continue  # a zero point is sliced with its channel but is no parameter
                covered.setdefault(m.tensor, {}).setdefault(m.axis, set()).update(m.positions.tolist())
        total = 0
        for name, axes in covered.items():
            shape = tuple(int(d) for d in self.graph.initializers[name].dims)  # param members are initializers
            numel = int(np.prod(shape, dtype=np.int64))
            untouched = int(np.prod([shape[a] - len(axes.get(a, ())) for a in range(len(shape))], dtype=np.int64))
            total += numel - untouched
        return total


def analyze(graph: ModelGraph, *, allow_inexact: bool = False) -> ChannelAnalysis:
    """Find all coupled channel groups of a model.

    Args:
        graph: the model to analyse (normalised and shape-inferred, see `importer.import_model`).
        allow_inexact: also return groups whose removal is only approximately equivalent (for
            example hidden sizes normalised by LayerNorm); they are flagged ``inexact``.
    """
    graph = scoped_graph(graph)  # descends into If branches (`subgraphs`)
    ctx = CouplingContext(graph)
    barriers: list[Barrier] = []
    data_tensors_of: dict[str, list[str]] = {}
    opsets: dict[str, int | None] = {}
    for node in analysed_nodes(graph):
        if node.domain not in opsets:
            opsets[node.domain] = opset_of(graph.model, node.domain) or None
        rule = RULES.get(node.domain, node.op_type, opsets[node.domain])
        ctx.mentioned = set()
        ctx.node = node
        tensors = [n for n in node.output if n]
        if rule is None:
            reason = body_reason(node) or _no_rule_reason(node, opsets[node.domain])
            _freeze_node(ctx, node, reason)
            barriers.append(Barrier(node.name, node.op_type, reason))
            continue
        refused = refusal(graph, node) if has_subgraph(node) else None
        if refused:
            _freeze_node(ctx, node, refused)
            barriers.append(Barrier(node.name, node.op_type, refused))
            continue
        try:
            rule.couple(node, ctx)
        except RuleBarrier as exc:
            _freeze_node(ctx, node, str(exc))
            barriers.append(Barrier(node.name, node.op_type, str(exc)))
            continue
        except (IndexError, KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            # A malformed node (shapes/attributes the checker let through): refuse with one line.
            raise UnsupportedModelError(
                f"{node.op_type} {node.name}: inconsistent shapes or attributes ({type(exc).__name__}: {exc})"
            ) from None
        # Safe by default: a dim of a data input/output that the rule did not map is frozen.
        static = rule.static_inputs(node)
        for i in static:
            if i < len(node.input) and node.input[i]:
                ctx.freeze_tensor(node.input[i], f"shape parameter of {node.op_type}")
        tensors += [n for i, n in enumerate(node.input) if n and i not in static]
        for name in tensors:
            for ax in range(ctx.rank(name) or 0):
                if DimRef(name, ax) not in ctx.mentioned:
                    ctx.freeze(name, ax, f"not a channel axis of {node.op_type}")
        data_tensors_of[node.name] = tensors
    ctx.node = None
    for name in graph.graph_inputs + graph.graph_outputs:
        ctx.freeze_tensor(name, "graph input/output")
    _freeze_subgraph_references(ctx, graph)

    labels = _components(ctx)
    frozen_labels = _labels_of(ctx, labels, ctx.frozen)
    inexact_labels = _labels_of(ctx, labels, ctx.inexact)
    groups = _build_groups(ctx, labels, frozen_labels, inexact_labels, allow_inexact)
    return ChannelAnalysis(graph, groups, barriers, dict(ctx.dims), labels, dict(ctx.roles), dict(ctx.frozen),
                           dict(ctx.frozen_nodes), dict(ctx.inexact))


def _no_rule_reason(node: onnx.NodeProto, opset: int | None) -> str:
    """Why an operator without a channel rule is a barrier: its facts-only entry's reason, if it gives one."""
    reg = RULES.registration(node.domain, node.op_type, opset)
    if reg is not None and reg.rule.barrier_reason:
        return reg.rule.barrier_reason
    return f"no channel rule for {node.domain + '::' if node.domain else ''}{node.op_type}"


def _freeze_node(ctx: CouplingContext, node: onnx.NodeProto, reason: str) -> None:
    for name in list(node.input) + list(node.output):
        if name:
            ctx.freeze_tensor(name, reason)
    if node.name in descended(ctx.graph):  # a barrier If's branches: their outputs are its outputs
        for name in sorted(subgraph_reads(node)):
            ctx.freeze_tensor(name, reason)


def _freeze_subgraph_references(ctx: CouplingContext, graph: ModelGraph) -> None:
    for node in analysed_nodes(graph):
        if has_subgraph(node) and refusal(graph, node):
            ctx.node = node
            for name in subgraph_reads(node):
                ctx.freeze_tensor(name, f"read inside a subgraph of {node.op_type}")
    ctx.node = None


def _components(ctx: CouplingContext) -> np.ndarray:
    n = ctx.n_atoms
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if ctx.edges_a:
        a = np.concatenate(ctx.edges_a)
        b = np.concatenate(ctx.edges_b)
    else:
        a = b = np.zeros(0, dtype=np.int64)
    adj = scipy.sparse.coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, labels = scipy.sparse.csgraph.connected_components(adj, directed=False)
    return labels.astype(np.int64)


def _labels_of(ctx: CouplingContext, labels: np.ndarray, dims: dict[DimRef, str]) -> set[int]:
    if not dims or not len(labels):
        return set()
    hit = np.zeros(int(labels.max()) + 1, dtype=bool)
    for ref in dims:
        start, n = ctx.dims[ref]
        hit[labels[start : start + n]] = True
    return set(np.flatnonzero(hit).tolist())


def _build_groups(ctx, labels, frozen_labels, inexact_labels, allow_inexact) -> list[ChannelGroup]:
    graph = ctx.graph
    dim_list = list(ctx.dims.items())
    if not dim_list:
        return []
    n_labels = int(labels.max()) + 1 if len(labels) else 0
    atom_dim = np.empty(ctx.n_atoms, dtype=np.int64)
    for d, (_, (start, n)) in enumerate(dim_list):
        atom_dim[start : start + n] = d
    # Which labels hold weights at all (float, or integers dequantized into weights): only those can be worth
    # removing.
    counted = {ref.tensor for ref, _ in dim_list if is_parameter(graph, ref.tensor)}
    is_param_dim = np.array([ref.tensor in counted for ref, _ in dim_list])
    prunable = np.zeros(n_labels, dtype=bool)
    prunable[labels[is_param_dim[atom_dim]]] = True
    blocked = frozen_labels if allow_inexact else frozen_labels | inexact_labels
    if blocked:
        prunable[np.fromiter(blocked, dtype=np.int64, count=len(blocked))] = False
    keep = prunable[labels]
    if not keep.any():
        return []
    # Signature of a label = the dims it occupies; labels with one signature form one group.
    pairs = np.sort(labels[keep] * len(dim_list) + atom_dim[keep])
    pairs = pairs[np.r_[True, np.diff(pairs) != 0]]
    pair_label, pair_dim = pairs // len(dim_list), pairs % len(dim_list)
    bounds = np.flatnonzero(np.diff(pair_label)) + 1
    first_atom = np.full(n_labels, ctx.n_atoms, dtype=np.int64)
    np.minimum.at(first_atom, labels, np.arange(ctx.n_atoms))
    by_sig: dict[tuple[int, ...], list[int]] = {}
    for lab, dims in zip(pair_label[np.r_[0, bounds]].tolist(), np.split(pair_dim, bounds)):
        by_sig.setdefault(tuple(dims.tolist()), []).append(lab)

    groups: list[ChannelGroup] = []
    lookup = np.full(n_labels, -1, dtype=np.int64)
    for sig, labs in by_sig.items():
        if len(labs) < 2:
            continue  # one channel: never removable
        lab_arr = np.array(labs, dtype=np.int64)
        lab_arr = lab_arr[np.argsort(first_atom[lab_arr], kind="stable")]  # by position in the first dim
        lookup[lab_arr] = np.arange(len(lab_arr))
        members: list[ChannelSlice] = []
        params = np.zeros(len(lab_arr), dtype=np.int64)
        for d in sig:
            ref, (start, n) = dim_list[d]
            chan = lookup[labels[start : start + n]]
            pos = np.flatnonzero(chan >= 0)
            ch = chan[pos]
            is_param = graph.is_initializer(ref.tensor)
            members.append(ChannelSlice(ref.tensor, ref.axis, pos, ch, is_param))
            if ref.tensor in counted:  # a zero point is sliced with its channel but is no parameter
                shape = graph.shape(ref.tensor)
                per_position = int(np.prod([s for i, s in enumerate(shape) if i != ref.axis], dtype=np.int64))
                params += np.bincount(ch, minlength=len(lab_arr)) * per_position
        lookup[lab_arr] = -1
        inexact = bool(set(lab_arr.tolist()) & inexact_labels)
        min_keep = max(ctx.kept_at_least.get(DimRef(m.tensor, m.axis), 1) for m in members)
        if min_keep >= len(lab_arr):
            continue  # must keep every channel
        groups.append(ChannelGroup(len(groups), len(lab_arr), tuple(members), lab_arr, params, inexact, min_keep))
    # Groups in graph order (by the first node touching any member): stable, readable ids.
    first_use: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        for name in list(node.input) + list(node.output):
            first_use.setdefault(name, i)
    groups.sort(key=lambda g: min(first_use.get(m.tensor, 1 << 30) for m in g.members))
    for i, g in enumerate(groups):
        g.id = i
    return groups
