"""Unconstrained pruning (UPSCALE): coupled layers keep different channels; exact export with few copies.

Start reading at `UnconstrainedPass.call`. The algorithm:

1. **Boundaries** (`split_boundaries`). In every coupled group, walk forward from each *producer* weight
   (a Conv/Gemm/MatMul writing the group's channels) through single-input per-channel ops until the
   tensor forks or meets a merge (an op with two of the group's activations: Add, Mul, a contraction)
   (if the walk passed a Concat, the cut moves before that Concat, so a widening copies only this
   producer's channels); walk backward from each *consumer* weight (reading the group's channels) the
   same way (past a Concat, the cut moves after it: one gather then serves all of its inputs). Where a walk
   stops an `Identity` is inserted (after a producer: one on the tensor; before a consumer: one on that
   edge), so that after re-analysis each side of it is a separate dim that may have its own width.
2. **Pieces** (`build_plan`). The group's dims, joined through every non-boundary node, fall into
   *pieces*. A piece holding a producer or consumer weight is a *unit*: it keeps its own top channels by
   its own scores, the same count per unit as constrained pruning keeps per group. Scores
   (`energy_scores`, default): a producer's channel energy E[out^2] after its BatchNorm (+ReLU) from
   (beta, gamma); a consumer's ||W[:, c]||^2 times its input energy (its own pre-activation BatchNorm,
   else the stream producers' energies); ``l1``/``l2`` use BatchNorm-folded weight norms instead. The
   *stream* (every other piece) keeps the union U, rounded up to a multiple of ``stream_multiple`` (16,
   the NCHWc block; only where that adds at most 1/8) with channels no unit keeps (exact: every reader
   has zero columns there). ``share`` blends each
   unit's (mean-normalised) own scores with the group's shared ranking, the constrained criterion of
   the same name: share=1 is exactly constrained pruning (`PrunePass`, no copies), values in between
   make the kept sets overlap more, so the union and the copies stay narrower. ``union_cap`` bounds
   the stream instead: it holds the group's top ``union_cap x k`` channels by the shared ranking
   (rounded to a multiple of ``stream_multiple``) and each unit keeps its own top k among them. With
   random or weakly correlated scores an unbounded union is nearly the whole group, so every absorbed
   layer and every stream op runs almost dense; the cap is what keeps the export near constrained cost.
   A unit that is its group's only unit (a producer->consumer chain) ranks by the group's criterion:
   there unconstrained and constrained pruning coincide. ``drive`` orders the choices
   (`_reaching_writers` finds, per tensor, which writer units' outputs reach each reader):
   ``"free"`` every unit its own top channels (a reader may then keep channels no writer reaching it
   keeps, and a writer channels no reader reads: both waste their share of the budget, and a
   producer->readers fork loses the channels the writer and its readers disagree on);
   ``"writer"`` writers choose, each reader chooses among what the writers reaching it keep, then
   each writer drops what none of its readers reads (only where every reader of the stream is a unit;
   UPSCALE's writer-driven setting: a single-writer fork is never narrowed twice, a residual stream's
   readers choose among the writers' union); ``"reader"`` readers choose and each writer keeps what
   the readers it reaches keep (a writer may then keep more than k; with ``group_budget`` the readers
   keep fewer until the group holds no more parameters than constrained pruning at the same ratio).
   ``repair="mean"`` (`mean_repair`, calibration inputs) then restores each Conv/Gemm output's mean on
   calibration data by its bias / the following BatchNorm's running mean, for any share.
3. **Oracle** (`mask_model`): the original model with each parameter silenced outside its own piece's
   kept set (zero; 1 for variances/divisors). The export computes exactly this.
4. **Export** (`export`). Every dim takes the positions of its width (a unit's own set when the unit is
   *narrowed*, else U) in the chosen channel order; parameters are masked then taken. Boundaries whose
   two sides differ become copies: narrowing -> `Slice` (contiguous) or `Gather`, widening -> `Pad`
   (contiguous) or `Pad`+`Gather` (zero channel appended, then gathered into place). A unit is narrowed
   only where that is exact: a consumer piece (only incoming boundaries), a producer piece (only
   outgoing boundaries, every op maps a silenced channel to zero), or a piece without boundaries (a
   producer->consumer chain: plain constrained pruning). Any other unit is *absorbed*: it runs at width
   U with its silenced channels as zero rows/columns, which is the oracle itself.
5. **Reordering** (`passes.reorder`): with ``reorder=True`` each group's channel order is chosen so the
   narrowed units' kept sets are contiguous runs of U, then a per-unit cost model (`CostModel`) chooses
   between copying (Slice/Pad/Gather bytes and per-op overhead) and absorbing (extra MACs of the zero
   rows/columns and extra element-wise traffic of the piece). `CostModel.measure` fits the costs to
   onnxruntime here, including ``layout_break`` (a copy between two convs also costs layout
   conversions and lost fusions, fitted on a Conv -> Slice -> Conv chain against the absorbed chain).
   With ``tune=N`` (`tune_layout`) the plan is exported under a few cost models (fitted, copies
   cheaper, copies dearer, absorb everything, copies only) and the fastest export in onnxruntime is
   kept: all candidates compute the same function, so this is a pure layout choice.
6. **Naive export** (``reorder=False``): UPSCALE's definition — the original channel order, every unit
   narrowed where that is exact, each writer's output *scattered* into a zero stream (`ConstantOfShape`
   + `ScatterND`, what an exporter emits for ``out = zeros(...); out[:, idx] = y``) and each reader's
   subset *gathered* (`Gather`, for ``x[:, idx]``). ``naive="pad_gather"`` is a partly optimised
   variant (one zero channel appended by `Pad`, then a single `Gather` places every channel).

`copy_report(model)` counts the copy ops the export inserted and the bytes they write per inference.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxprune.ordering import choose_order, dim_takes
from onnxprune.criteria import per_channel, position_norms

from onnxprune.channels import ChannelAnalysis, ChannelGroup, ChannelSlice, DimRef, analyze
from onnxprune.errors import UsageError
from onnxprune.graph import ModelGraph, attrs
from onnxprune.importer import check_model, infer_shapes
from onnxprune.metrics import count_params, node_macs
from onnxprune.passmanager import Pass, PassResult

BOUNDARY = "upscale_boundary"
COPY = "upscale_copy"
DRIVES = ("free", "writer", "reader")
COPY_OPS = ("Gather", "GatherElements", "ScatterND", "ScatterElements", "Slice", "Pad", "Concat")

# Ops that map an all-silenced channel to exactly zero (parameters silenced as in `mask_model`).
_ZERO_PRESERVING = {
    "Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Relu", "LeakyRelu", "PRelu", "Elu",
    "Selu", "Celu", "Gelu", "HardSwish", "Mish", "Tanh", "Erf", "Neg", "Abs", "Softsign", "Sin", "Atan",
    "Asin", "Sinh", "Asinh", "Atanh", "Tan", "Sqrt", "Identity", "Dropout", "Add", "Sub", "Mul", "Div",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "Reshape",
    "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice", "Resize", "Upsample",
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "Expand", "Tile", "Cast", "DepthToSpace",
    "SpaceToDepth", "Sign", "Round", "Floor", "Ceil",
}  # fmt: skip


@dataclass(frozen=True)
class CostModel:
    """CPU costs used to choose, per unit, between a copy and zero rows/columns in the weights.

    The defaults were fitted to end-to-end latencies of ResNet-50 exports (onnxruntime 1.32, 2 cores,
    optimisations on): a copy costs more than its bytes, because it also breaks Conv+Add+Relu fusion and
    the blocked NCHWc layout around it. `CostModel.measure` times a Slice/Gather between two Convs on
    the current machine instead.
    """

    op_overhead_s: float = 2e-5
    copy_bytes_per_s: float = 1.5e9  # Slice / Pad
    gather_bytes_per_s: float = 1.2e9
    macs_per_s: float = 2e10
    elementwise_bytes_per_s: float = 3e9
    layout_break: float = 2.0  # a copy also converts its input and output out of/into NCHWc: extra copies

    @classmethod
    def measure(cls, channels: int = 256, size: int = 56, runs: int = 40, threads: int = 1) -> CostModel:
        """Fit the costs to onnxruntime on this machine (optimisations on, as deployed).

        Lone ops give the bandwidths, the per-op overhead and the MAC rate. `layout_break` is then fitted
        to the decision the model has to make: a chain Conv -> Slice(half) -> Conv(half) (narrowed, with
        its layout conversions and lost fusions) against Conv -> Conv (absorbed: the second Conv reads
        every channel, zero columns for the dropped half); the copy's extra cost beyond its bytes is
        expressed as that many extra copies of the wide side.
        """
        import statistics

        import onnxruntime as ort

        rng = np.random.default_rng(0)
        half = channels // 2

        def timed(nodes: list[onnx.NodeProto], shape: tuple, inits: list) -> float:
            graph = helper.make_graph(
                nodes, "m", [helper.make_tensor_value_info("x", 1, list(shape))],
                [helper.make_tensor_value_info("y", 1, None)], inits,
            )
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.log_severity_level = 3
            sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            x = rng.standard_normal(shape).astype(np.float32)
            for _ in range(3):
                sess.run(None, {"x": x})
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                sess.run(None, {"x": x})
                times.append(time.perf_counter() - t)
            return statistics.median(times)

        def i64(v, name):
            return numpy_helper.from_array(np.array(v, dtype=np.int64), name)

        def weight(out_c: int, in_c: int, name: str):
            return numpy_helper.from_array(rng.standard_normal((out_c, in_c, 1, 1)).astype(np.float32), name)

        big, tiny = (1, channels, size, size), (1, 8, 2, 2)
        w = weight(channels, channels, "w")
        conv = timed([helper.make_node("Conv", ["x", "w"], ["y"])], big, [w])
        slice_inits = [i64([0], "s"), i64([half], "e"), i64([1], "a")]
        sliced = timed([helper.make_node("Slice", ["x", "s", "e", "a"], ["y"])], big, slice_inits)
        idx = np.sort(rng.choice(channels, half, replace=False))
        gathered = timed([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)], big, [i64(idx, "i")])
        overhead = timed([helper.make_node("Slice", ["x", "s", "e", "a"], ["y"])], tiny,
                         [i64([0], "s"), i64([4], "e"), i64([1], "a")])
        nbytes = half * size * size * 4
        clip = lambda v: float(np.clip(v, 1e8, 1e11))
        copy_bw = clip(nbytes / max(sliced - overhead, 1e-7))
        macs_per_s = float(np.clip(channels * channels * size * size / max(conv - overhead, 1e-7), 1e8, 1e12))
        # The decision itself: narrowed (Slice between two convs) against absorbed (zero columns).
        relu = lambda i, o: helper.make_node("Relu", [i], [o])
        absorbed = timed([helper.make_node("Conv", ["x", "w"], ["h"]), relu("h", "r"),
                          helper.make_node("Conv", ["r", "w2"], ["y"])], big, [w, weight(channels, channels, "w2")])
        narrowed = timed([helper.make_node("Conv", ["x", "w"], ["h"]), relu("h", "r"),
                          helper.make_node("Slice", ["r", "s", "e", "a"], ["q"]),
                          helper.make_node("Conv", ["q", "w2"], ["y"])], big,
                         [w, weight(channels, half, "w2")] + slice_inits)
        saved = channels * half * size * size / macs_per_s  # the MACs narrowing saves
        plain_copy = overhead + nbytes / copy_bw
        wide_copy = 2 * nbytes / copy_bw
        layout_break = float(np.clip((narrowed - absorbed + saved - plain_copy) / wide_copy, 0.0, 20.0))
        return cls(
            op_overhead_s=overhead,
            copy_bytes_per_s=copy_bw,
            gather_bytes_per_s=clip(nbytes / max(gathered - overhead, 1e-7)),
            macs_per_s=macs_per_s,
            elementwise_bytes_per_s=copy_bw,
            layout_break=layout_break,
        )


@dataclass(frozen=True)
class UnconstrainedConfig:
    """ratio: fraction of channels each unit drops; criterion: how a unit scores its own channels."""

    ratio: float = 0.3
    criterion: str = "energy"  # "energy" (BN-aware, data-free), "l1" or "l2" (BN-folded weight norms)
    reorder: bool = True
    absorb: bool = True  # let the cost model absorb copies into weights (reordered export only)
    # Round the stream width up to a multiple of this (1: exact union): onnxruntime's blocked NCHWc convs
    # need channel counts that are multiples of the block (16 with AVX-512, 8 with AVX2).
    stream_multiple: int = 16
    cost: CostModel = field(default_factory=CostModel)
    # Blend of each unit's own ranking with the group's shared (constrained) ranking: a unit scores its
    # channels by (1 - share) * own + share * shared, both mean-normalised. 0: fully unconstrained;
    # 1: every unit keeps the same channels (constrained pruning with the same criterion, no copies).
    # In between the kept sets overlap more, so the stream union (and the copies) stay narrower.
    share: float = 0.0
    # "mean": calibrated mean repair (`mean_repair`), needs calibration inputs; "none": masks only.
    repair: str = "none"
    # Stream budget: the stream (union) may hold at most union_cap x the per-unit kept count channels,
    # the group's top ones by the shared ranking; each unit keeps its own top channels among them.
    # None: unbounded (UPSCALE: the union is whatever the units choose); 1: constrained-like streams.
    union_cap: float | None = None
    # Measured layout choice (reordered export): with tune > 0 the export is built under a few cost
    # models (the fitted one, copies cheaper / dearer, everything absorbed, copies only) and the one
    # running fastest in onnxruntime (median of `tune` runs, `tune_threads` intra-op threads) is kept.
    tune: int = 0
    tune_threads: int = 1
    # How the naive export (reorder=False) scatters a writer's channels into the stream: "scatter" is
    # UPSCALE's naive export (ScatterND into a zero stream, what `out[:, idx] = y` exports to);
    # "pad_gather" is a cheaper scatter (one zero channel appended by Pad, then one Gather).
    naive: str = "scatter"
    # Who chooses the channels of a stream (see `build_plan`): "free": every unit its own top ones;
    # "writer": writers (producer units) choose, each reader chooses among the channels the writers that
    # reach it keep (UPSCALE's writer-driven setting: a producer->readers fork is never hurt, a residual
    # stream's readers choose among the union); "reader": readers choose, each writer keeps what the
    # readers it reaches keep (a writer with no reader reached keeps its own top ones).
    drive: str = "free"
    # drive="reader" only: readers keep fewer channels until each group holds no more parameters than
    # constrained pruning keeps at the same ratio (writers keep their readers' union, more than k).
    group_budget: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise UsageError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.stream_multiple < 1:
            raise UsageError(f"stream_multiple must be >= 1, got {self.stream_multiple}")
        if self.criterion not in ("energy", "bn", "l1", "l2"):
            raise UsageError(f"unconstrained criterion must be energy, bn, l1 or l2, got {self.criterion!r}")
        if self.repair not in ("none", "mean"):
            raise UsageError(f"unconstrained repair must be none or mean, got {self.repair!r}")
        if not 0 <= self.share <= 1:
            raise UsageError(f"share must be in [0, 1], got {self.share}")
        if self.tune < 0 or self.tune_threads < 1:
            raise UsageError(f"tune must be >= 0 and tune_threads >= 1, got {self.tune}, {self.tune_threads}")
        if self.union_cap is not None and self.union_cap < 1:
            raise UsageError(f"union_cap must be >= 1 (or None), got {self.union_cap}")
        if self.drive not in DRIVES:
            raise UsageError(f"drive must be one of {', '.join(DRIVES)}, got {self.drive!r}")
        if self.naive not in ("scatter", "pad_gather"):
            raise UsageError(f"naive export must be scatter or pad_gather, got {self.naive!r}")


# ---- 1. boundaries ----------------------------------------------------------------------------------
@dataclass
class _Roles:
    """How the nodes touching one group relate to it."""

    acts: set[str]
    weights: set[str]
    g_in: dict[str, list[int]]  # node name -> input indices that are group activations
    g_out: dict[str, list[str]]  # node name -> outputs that are group activations
    has_weight: dict[str, bool]  # node name -> reads a weight member of the group


def _roles(graph: ModelGraph, analysis: ChannelAnalysis, group: ChannelGroup) -> _Roles:
    acts = {m.tensor for m in group.members if not m.is_param}
    weights = {m.tensor for m in group.param_members if analysis.roles.get(m.tensor) == "weight"}
    r = _Roles(acts, weights, {}, {}, {})
    for node in graph.nodes:
        gi = [i for i, n in enumerate(node.input) if n in acts]
        go = [n for n in node.output if n in acts]
        if gi or go:
            r.g_in[node.name] = gi
            r.g_out[node.name] = go
            r.has_weight[node.name] = any(n in weights for n in node.input)
    return r


def _kind(r: _Roles, node: onnx.NodeProto) -> str:
    gi, go = r.g_in.get(node.name, []), r.g_out.get(node.name, [])
    if r.has_weight.get(node.name) and go and not gi:
        return "producer"
    if r.has_weight.get(node.name) and gi and not go:
        return "consumer"
    if len(gi) >= 2:
        return "merge"
    if len(gi) == 1 and len(go) == 1:
        return "chain"
    return "other"


def split_boundaries(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Insert boundary Identity nodes where unit pieces meet the stream (see the module docstring)."""
    graph = ModelGraph(model)
    analysis = analyze(graph)
    tensor_cuts: set[str] = set()
    edge_cuts: set[tuple[str, str, int]] = set()  # (tensor, node name, input index)
    for group in analysis.groups:
        r = _roles(graph, analysis, group)
        for node in graph.nodes:
            kind = _kind(r, node)
            if kind == "producer":
                _walk_forward(graph, r, node, tensor_cuts, edge_cuts)
            elif kind == "consumer":
                _walk_backward(graph, r, node, edge_cuts)
    if not tensor_cuts and not edge_cuts:
        return model, 0
    return _insert_identities(model, graph, tensor_cuts, edge_cuts)


def _walk_forward(graph, r, node, tensor_cuts, edge_cuts) -> None:
    outs = r.g_out[node.name]
    if len(outs) != 1:
        return
    t = outs[0]
    before_concat = None  # the edge into the first Concat on the way: a cheaper place to widen

    def cut(tensor_cut: str | None, edge_cut: tuple | None) -> None:
        if before_concat is not None:
            edge_cuts.add(before_concat)
        elif tensor_cut is not None:
            tensor_cuts.add(tensor_cut)
        else:
            edge_cuts.add(edge_cut)

    while True:
        uses = graph.consumers.get(t, [])
        if len(uses) >= 2:
            return cut(t, None)
        if len(uses) != 1:
            return
        nxt = uses[0].node
        kind = _kind(r, nxt)
        if kind == "merge":
            return cut(None, (t, nxt.name, uses[0].index))
        if kind != "chain":
            return  # a consumer (a producer->consumer chain: no boundary) or the group ends
        if nxt.op_type == "Concat" and before_concat is None:
            # Widening before the Concat copies this producer's channels only, not the concatenation.
            before_concat = (t, nxt.name, uses[0].index)
        t = r.g_out[nxt.name][0]


def _walk_backward(graph, r, node, edge_cuts) -> None:
    ins = r.g_in[node.name]
    if len(ins) != 1:
        return
    cur, index = node, ins[0]
    after_concat = None  # the edge out of the nearest Concat: one gather there serves every input

    def cut(edge: tuple) -> None:
        edge_cuts.add(after_concat if after_concat is not None else edge)

    while True:
        t = cur.input[index]
        if len(graph.consumers.get(t, [])) >= 2:
            return cut((t, cur.name, index))
        prev = graph.producer.get(t)
        if prev is None:
            return
        kind = _kind(r, prev)
        if kind == "merge":
            return cut((t, cur.name, index))
        if kind != "chain":
            return
        if prev.op_type == "Concat" and after_concat is None:
            after_concat = (t, cur.name, index)
        cur, index = prev, r.g_in[prev.name][0]


def _insert_identities(model, graph, tensor_cuts, edge_cuts) -> tuple[onnx.ModelProto, int]:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    del g.value_info[:]
    nodes = list(g.node)
    by_name = {n.name: n for n in nodes}
    after: dict[str, list[onnx.NodeProto]] = {}  # tensor -> boundary nodes reading it
    count = 0

    def identity(src: str) -> tuple[onnx.NodeProto, str]:
        nonlocal count
        count += 1
        dst = f"{src}__{BOUNDARY}{count}"
        node = helper.make_node("Identity", [src], [dst], name=f"{BOUNDARY}_{count}")
        after.setdefault(src, []).append(node)
        return node, dst

    renamed: dict[str, str] = {}
    for t in sorted(tensor_cuts):
        _, dst = identity(t)
        renamed[t] = dst
        for use in graph.consumers.get(t, []):
            n = by_name[use.node.name]
            n.input[use.index] = dst
    for t, node_name, index in sorted(edge_cuts):
        _, dst = identity(renamed.get(t, t))
        by_name[node_name].input[index] = dst
    ordered: list[onnx.NodeProto] = []

    def emit_boundaries(tensor: str) -> None:
        for b in after.pop(tensor, []):
            ordered.append(b)
            emit_boundaries(b.output[0])

    for name in list(graph.graph_inputs) + [t.name for t in g.initializer]:
        emit_boundaries(name)
    for n in nodes:
        ordered.append(n)
        for o in n.output:
            emit_boundaries(o)
    del g.node[:]
    g.node.extend(ordered)
    return infer_shapes(out), count


# ---- 2. pieces and the plan -------------------------------------------------------------------------
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
    in_boundaries: list[str]
    out_boundaries: list[str]
    zero_preserving: bool
    keep: np.ndarray | None = None  # bool over the group's channels (units only)
    sources: frozenset[int] | None = None  # reader units: the writer pieces reaching it (`_reaching_writers`)
    narrow: bool = False  # exported at its own width (True) or at the stream's width

    @property
    def is_unit(self) -> bool:
        return bool(self.weights)

    @property
    def narrowable(self) -> bool:
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
    group: ChannelGroup
    pieces: list[Piece]
    piece_of: dict[DimRef, int]
    union: np.ndarray  # bool over channels: the stream
    order: np.ndarray = None  # channel order used by the export

    def width(self, ref: DimRef) -> np.ndarray:
        piece = self.pieces[self.piece_of[ref]]
        return piece.keep if piece.narrow else self.union

    def mask_set(self, ref: DimRef) -> np.ndarray:
        piece = self.pieces[self.piece_of[ref]]
        return piece.keep if piece.keep is not None else self.union


@dataclass(eq=False)
class UnconstrainedPlan:
    model: onnx.ModelProto  # the model with boundary Identity nodes
    analysis: ChannelAnalysis
    groups: list[GroupPlan]
    boundaries: int

    def group_plan(self, gid: int) -> GroupPlan | None:
        return next((gp for gp in self.groups if gp.group.id == gid), None)


def _pieces(analysis: ChannelAnalysis, group: ChannelGroup) -> tuple[list[Piece], dict[DimRef, int]]:
    graph = analysis.graph
    r = _roles(graph, analysis, group)
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
        if node.name.startswith(BOUNDARY):
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
        kind = _kind(r, node)
        if kind in ("producer", "consumer"):
            p.has_producer |= kind == "producer"
            p.has_consumer |= kind == "consumer"
            for m in by_tensor.get(node.input[1] if len(node.input) > 1 else "", []) + by_tensor.get(node.input[0], []):
                if m.tensor in r.weights and m not in p.weights:
                    p.weights.append(m)
        if not _zero_preserving(node, analysis):
            p.zero_preserving = False
    for node in graph.nodes:
        if not node.name.startswith(BOUNDARY):
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
    return node.op_type in _ZERO_PRESERVING


def unit_scores(piece: Piece, analysis: ChannelAnalysis, size: int, p: int = 1) -> np.ndarray:
    """Per-channel importance from the unit's own weights (each member mean-normalised).

    A BatchNormalization inside the piece rescales each channel by ``|scale| / sqrt(var + eps)``; the
    unit's effective weights are the folded ones, so the norms are multiplied by that factor.
    """
    total = np.zeros(size)
    for m in piece.weights:
        norms = position_norms(analysis.graph.const(m.tensor), m.axis, p)[m.positions]
        ch = per_channel(m, norms, size)
        if p == 2:
            ch = np.sqrt(ch)
        total += ch / (ch.mean() + 1e-12)
    return total * _bn_factor(piece, analysis, size)


def _bn_gamma(piece: Piece, analysis: ChannelAnalysis, size: int) -> np.ndarray | None:
    """|gamma| of the piece's BatchNormalization per channel (the ``bn`` criterion), or None."""
    graph = analysis.graph
    members = {m.tensor: m for m in piece.members}
    for node in graph.nodes:
        if node.op_type == "BatchNormalization" and node.name in piece.nodes and node.input[1] in members:
            m = members[node.input[1]]
            counts = np.maximum(np.bincount(m.channel_of, minlength=size), 1)
            g = np.abs(graph.const(node.input[1])[m.positions]).astype(np.float64)
            return np.bincount(m.channel_of, weights=g, minlength=size) / counts
    return None


def _relu_after(node: onnx.NodeProto, graph: ModelGraph) -> bool:
    uses = graph.consumers.get(node.output[0], [])
    return len(uses) == 1 and uses[0].node.op_type in ("Relu", "Clip")


def _relu_energy(mu: np.ndarray, sd: np.ndarray, relu: bool) -> np.ndarray:
    """E[z^2] for z ~ N(mu, sd^2), or E[relu(z)^2]."""
    if not relu:
        return mu**2 + sd**2
    from scipy.stats import norm

    sd = np.maximum(sd, 1e-12)
    t = mu / sd
    return (mu**2 + sd**2) * norm.cdf(t) + mu * sd * norm.pdf(t)


def _bn_energy(piece: Piece, analysis: ChannelAnalysis, size: int) -> np.ndarray | None:
    """Per-channel E[out^2] after the piece's BatchNormalization (N(beta, gamma^2) model), or None."""
    graph = analysis.graph
    members = {m.tensor: m for m in piece.members}
    for node in graph.nodes:
        if node.op_type != "BatchNormalization" or node.name not in piece.nodes:
            continue
        ms, mb = members.get(node.input[1]), members.get(node.input[2])
        if ms is None or mb is None:
            continue
        gamma = np.abs(graph.const(node.input[1])[ms.positions]).astype(np.float64)
        beta = graph.const(node.input[2])[mb.positions].astype(np.float64)
        e = _relu_energy(beta, gamma, _relu_after(node, graph))
        counts = np.maximum(np.bincount(ms.channel_of, minlength=size), 1)
        return np.bincount(ms.channel_of, weights=e, minlength=size) / counts
    return None


def energy_scores(piece: Piece, pieces: list[Piece], analysis: ChannelAnalysis, size: int) -> np.ndarray:
    """Data-free expected squared contribution of each channel to what the unit computes.

    Producer: E[out_c^2] of its output after BatchNormalization (and ReLU), from (beta, gamma).
    Consumer: ||W[:, c]||^2 * E[x_c^2], the input energy taken from its own pre-activation BatchNorm, or
    else estimated as the sum of the stream producers' output energies. Falls back to L2 norms.
    """
    own = _bn_energy(piece, analysis, size)
    consumers = [m for m in piece.weights if _is_consumer_member(m, analysis)]
    if not consumers:
        return own if own is not None else unit_scores(piece, analysis, size, 2)
    cols = np.zeros(size)
    for m in consumers:
        ch = per_channel(m, position_norms(analysis.graph.const(m.tensor), m.axis, 2)[m.positions], size)
        cols += ch / (ch.mean() + 1e-12)
    if own is None:
        own = _input_energy(piece, pieces, analysis, size)
    return cols * (own if own is not None else 1.0)


def _input_energy(piece: Piece, pieces: list[Piece], analysis: ChannelAnalysis, size: int) -> np.ndarray | None:
    """E[x_c^2] of a reader's input: its own pre-activation BatchNorm's output, else the sum of the
    BatchNorm output energies of the writers reaching it (writers add up on a residual stream; all the
    group's writers where that is unknown), else None."""
    own = _bn_energy(piece, analysis, size)
    if own is not None:
        return own
    writers = [pc for pc in pieces if pc.has_producer and pc is not piece]
    if piece.sources:
        writers = [pc for pc in writers if pc.id in piece.sources]
    stream = [_bn_energy(pc, analysis, size) for pc in writers]
    stream = [e for e in stream if e is not None]
    return np.sum(stream, axis=0) if stream else None


def _is_consumer_member(m: ChannelSlice, analysis: ChannelAnalysis) -> bool:
    graph = analysis.graph
    for use in graph.consumers.get(m.tensor, []):
        node = use.node
        if node.op_type == "Conv":
            return m.axis == 1
        if node.op_type == "Gemm":
            return m.axis == (0 if not attrs(node).get("transB", 0) else 1)
        if node.op_type == "MatMul":
            return m.axis == (graph.rank(m.tensor) or 2) - 2
    return False


def _bn_factor(piece: Piece, analysis: ChannelAnalysis, size: int) -> np.ndarray:
    graph = analysis.graph
    members = {m.tensor: m for m in piece.members}
    factor = np.ones(size)
    for node in graph.nodes:
        if node.op_type != "BatchNormalization" or node.name not in piece.nodes:
            continue
        scale, var = node.input[1], node.input[4]
        ms, mv = members.get(scale), members.get(var)
        if ms is None or mv is None:
            continue
        eps = attrs(node).get("epsilon", 1e-5)
        f = np.abs(graph.const(scale)[ms.positions]) / np.sqrt(graph.const(var)[mv.positions] + eps)
        counts = np.maximum(np.bincount(ms.channel_of, minlength=size), 1)
        factor *= np.bincount(ms.channel_of, weights=f, minlength=size) / counts
    return factor


def build_plan(model: onnx.ModelProto, config: UnconstrainedConfig, keeps: dict | None = None) -> UnconstrainedPlan:
    """Split boundaries, find pieces, choose each unit's kept channels.

    Args:
        keeps: optional ``{(group id, piece id): bool mask}`` overriding the scores (tests use it to
            draw random kept sets).
    """
    split, count = split_boundaries(model)
    analysis = analyze(ModelGraph(split))
    plans: list[GroupPlan] = []
    for group in analysis.groups:
        pieces, piece_of = _pieces(analysis, group)
        units = [pc for pc in pieces if pc.is_unit]
        if not units:
            continue
        n_keep = max(1, group.size - math.floor(config.ratio * group.size + 1e-9))
        reach = _reaching_writers(analysis, group, pieces, piece_of)
        for pid, srcs in reach.items():
            pieces[pid].sources = srcs
        own = {pc.id: _own_scores(pc, pieces, analysis, group.size, config.criterion) for pc in units}
        single = len(units) == 1  # the unit is the whole group: its own ranking is the group's
        need_shared = config.share or config.union_cap is not None or single
        shared = _shared_scores(group, analysis, config.criterion, list(own.values())) if need_shared else None
        if single:
            own = {pc.id: shared for pc in units}
        allowed = np.ones(group.size, dtype=bool)
        if config.union_cap is not None and len(units) > 1:
            # The stream budget: the group's top channels by the shared ranking (stable, like `make_plan`).
            # Rounded to the nearest multiple of `stream_multiple`, so an absorbed stream keeps blocked layouts.
            m = max(1, config.stream_multiple)
            width = min(group.size, max(n_keep, round(config.union_cap * n_keep / m) * m))
            allowed[:] = False
            allowed[np.argsort(-shared, kind="stable")[:width]] = True
        def choose(pc: Piece, within: np.ndarray, own=own, shared=shared, n_keep=n_keep) -> np.ndarray:
            return _top_channels(own[pc.id], shared, config.share, within, n_keep)

        fixed = {pc.id for pc in units if (group.id, pc.id) in (keeps or {})}
        for pc in units:
            if pc.id in fixed:
                keep = np.asarray(keeps[(group.id, pc.id)], dtype=bool).copy()
                if not keep.any():
                    keep[0] = True
                pc.keep = keep
        writers = [pc for pc in units if pc.has_producer]
        readers = [pc for pc in units if not pc.has_producer]
        if config.drive == "reader":
            args = (readers, writers, pieces, reach, fixed, allowed, choose)
            _reader_first(n_keep, *args)
            if config.group_budget and readers and writers:
                # Readers keep fewer channels until the group holds no more parameters than constrained
                # pruning keeps at this ratio (writers grow to their readers' union): equal parameters
                # per group, so the global ratio (and every chain group) stays where constrained has it.
                per = {pc.id: _params_per_channel(pc, analysis) for pc in units}
                budget = n_keep * sum(per.values())
                n = n_keep
                while n > 1 and sum(int(pc.keep.sum()) * per[pc.id] for pc in units) > budget:
                    n -= 1
                    _reader_first(n, *args)
        else:  # "free": every unit chooses; "writer": the writers choose first
            for pc in units if config.drive == "free" else writers:
                if pc.id not in fixed:
                    pc.keep = choose(pc, allowed)
        if config.drive == "writer":
            for pc in readers:  # among what the writers reaching it keep
                if pc.id in fixed:
                    continue
                srcs = reach.get(pc.id)
                within = allowed if srcs is None else allowed & np.logical_or.reduce([pieces[w].keep for w in srcs])
                pc.keep = choose(pc, within)
            if _closed(analysis, group, pieces):
                # Then each writer drops what none of the readers it reaches reads (it would only add
                # parameters: every reader has zero columns there).
                for pc in writers:
                    read = _read_by(pc, readers, reach, pieces)
                    if pc.id not in fixed and read is not None and (pc.keep & read).any():
                        pc.keep = pc.keep & read
        for pc in units:
            pc.narrow = pc.narrowable
        union = np.logical_or.reduce([pc.keep for pc in units])
        deficit = -int(union.sum()) % max(1, config.stream_multiple)
        same = all(np.array_equal(pc.keep, union) for pc in units)  # constrained: no stream to widen
        if deficit and not same and union.sum() + deficit <= group.size and deficit * 8 <= union.sum():
            # Channels no unit keeps: every reader has zero columns there, so widening the stream to a
            # SIMD-friendly width is exact, and lets runtimes keep blocked layouts (NCHWc) for its convs
            # (only where it adds at most 1/8: a Concat input's few channels gain nothing from it).
            union[np.flatnonzero(~union)[:deficit]] = True
        plans.append(GroupPlan(group, pieces, piece_of, union, np.arange(group.size)))
    return UnconstrainedPlan(split, analysis, plans, count)


def _reader_first(n, readers, writers, pieces, reach, fixed, allowed, choose) -> None:
    """drive="reader": each reader its top `n` channels, each writer what the readers it reaches keep."""
    for pc in readers:
        if pc.id not in fixed:
            pc.keep = choose(pc, allowed, n_keep=n)
    for pc in writers:
        if pc.id in fixed:
            continue
        read = _read_by(pc, readers, reach, pieces)
        keep = allowed & read if read is not None else None
        pc.keep = keep if keep is not None and keep.any() else choose(pc, allowed)


def _read_by(writer: Piece, readers: list[Piece], reach, pieces: list[Piece]) -> np.ndarray | None:
    """The channels the readers this writer reaches keep (their union); None when it reaches none."""
    dsts = [r.id for r in readers if writer.id in (reach.get(r.id) or ())]
    return np.logical_or.reduce([pieces[r].keep for r in dsts]) if dsts else None


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
    scores = _normalised(own)
    if share:
        scores = (1 - share) * scores + share * shared
    scores = np.where(within, scores, -np.inf)  # outside the stream budget: dropped first
    # Lowest scores go first; a stable sort of the scores (not of their negation) breaks ties like
    # constrained pruning does (`plan.make_plan`), so share=1 reproduces it exactly.
    order = np.argsort(scores, kind="stable")
    keep = np.ones(len(scores), dtype=bool)
    keep[order[: len(scores) - n_keep]] = False
    return keep & within if within.any() else keep


def _reaching_writers(analysis: ChannelAnalysis, group: ChannelGroup, pieces: list[Piece],
                      piece_of: dict[DimRef, int]) -> dict[int, frozenset[int] | None]:
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
            got: set[int] = set()
            for t in ins:
                if src.get(t, None) is None:
                    got = None
                    break
                got |= src[t]
            src[out] = None if got is None or not ins else frozenset(got)
    reach: dict[int, frozenset[int] | None] = {}
    for pc in pieces:
        if not pc.is_unit or pc.has_producer:
            continue
        acc: set[int] | None = set()
        for ref in pc.dims:
            if ref.tensor in graph.initializers:
                continue
            s_t = src.get(ref.tensor)
            if s_t is None:
                acc = None
                break
            acc |= s_t
        reach[pc.id] = frozenset(acc) if acc else None
    return reach


def _closed(analysis: ChannelAnalysis, group: ChannelGroup, pieces: list[Piece]) -> bool:
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
            if use.node.name not in inside and not use.node.name.startswith(BOUNDARY):
                return False
    return True


def _own_scores(pc: Piece, pieces: list[Piece], analysis: ChannelAnalysis, size: int, criterion: str) -> np.ndarray:
    """A unit's own per-channel importance under `criterion`."""
    if criterion == "energy":
        return energy_scores(pc, pieces, analysis, size)
    if criterion == "bn":
        gamma = _bn_gamma(pc, analysis, size)
        return gamma if gamma is not None else energy_scores(pc, pieces, analysis, size)
    p = 2 if criterion == "l2" else 1
    if not pc.has_producer:
        # A reader: its folded weights are its columns times its input's scale, so each column norm is
        # weighted by the input channel's RMS (the writers' BatchNorm outputs), the same folding a
        # writer's rows get from its own BatchNorm. A column reading a weak channel matters little.
        cols = np.zeros(size)
        for m in pc.weights:
            ch = per_channel(m, position_norms(analysis.graph.const(m.tensor), m.axis, p)[m.positions], size)
            cols += (np.sqrt(ch) if p == 2 else ch) / (ch.mean() + 1e-12)
        energy = _input_energy(pc, pieces, analysis, size)
        return cols if energy is None else cols * np.sqrt(energy)
    return unit_scores(pc, analysis, size, p)


def _normalised(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    return scores / (np.mean(np.abs(scores)) + 1e-12)


def _shared_scores(group: ChannelGroup, analysis: ChannelAnalysis, criterion: str, own: list[np.ndarray]) -> np.ndarray:
    """The group's one ranking: the constrained criterion of the same name (l1, l2, bn: exactly what
    `PrunePass` scores), or for ``energy`` (no constrained twin) the mean of the units' normalised scores."""
    if criterion in ("l1", "l2", "bn"):
        from onnxprune.criteria import get_criterion

        return _normalised(get_criterion(criterion).score(group, analysis))
    return _normalised(np.mean([_normalised(o) for o in own], axis=0))


# ---- 3. the oracle ----------------------------------------------------------------------------------
_ONE_ROLES = {"variance", "divisor"}


def masked_arrays(plan: UnconstrainedPlan) -> dict[str, np.ndarray]:
    """Every parameter silenced outside its piece's kept set (units) or outside the stream (others)."""
    graph, roles = plan.analysis.graph, plan.analysis.roles
    arrays: dict[str, np.ndarray] = {}
    for gp in plan.groups:
        for m in gp.group.param_members:
            keep = gp.mask_set(DimRef(m.tensor, m.axis))
            silent = m.positions[~keep[m.channel_of]]
            if len(silent) == 0:
                continue
            array = arrays.get(m.tensor)
            if array is None:
                array = graph.const(m.tensor)
                if array.dtype.kind != "f":
                    continue
                array = arrays[m.tensor] = array.copy()
            index = [slice(None)] * array.ndim
            index[m.axis] = silent
            array[tuple(index)] = 1 if roles.get(m.tensor) in _ONE_ROLES else 0
    return arrays


def mean_repair(model: onnx.ModelProto, plan: UnconstrainedPlan, calib: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Calibrated mean repair, for constrained (share=1) and unconstrained plans alike.

    Silencing channels shifts the mean of every later Conv/Gemm output: a consumer loses the inputs it
    dropped, and in an unconstrained plan a stream channel it still reads has lost the contribution of
    each writer that dropped it. Walking the Conv/Gemm nodes in graph order, the mean (over batch and
    space) of each node's output in the masked model is compared with the original's on `calib`, and
    the difference is added to that node's bias (or subtracted from the running mean of the
    BatchNormalization it feeds). Returns the original model with those values changed; masking it with
    the same kept sets (`build_plan(..., keeps)`) gives the oracle the export must equal.
    """
    import onnxruntime as ort

    graph = ModelGraph(model)
    targets = [n for n in graph.nodes if n.op_type in ("Conv", "Gemm") and graph.is_initializer(n.input[1])]
    if not targets:
        return model
    names = [n.output[0] for n in targets]

    def means(m: onnx.ModelProto, wanted: list[str]) -> dict[str, np.ndarray]:
        probe = _clone(m)
        have = {o.name for o in probe.graph.output}
        probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in wanted if t not in have)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        feeds = {i.name: calib[i.name] for i in sess.get_inputs()}
        n = min(len(v) for v in feeds.values())
        batch = min((i.shape[0] for i in sess.get_inputs() if i.shape and isinstance(i.shape[0], int)), default=n)
        if n < batch:
            raise UsageError(f"mean repair needs at least {batch} calibration samples (the model's batch), got {n}")
        sums: dict[str, np.ndarray] = {}
        for start in range(0, n - n % batch, batch):  # a static batch dim: in chunks
            outs = sess.run(wanted, {k: v[start : start + batch] for k, v in feeds.items()})
            for t, v in zip(wanted, outs):
                m = v.astype(np.float64).mean(axis=tuple(a for a in range(v.ndim) if a != 1))
                sums[t] = sums.get(t, 0) + m
        chunks = max(1, n // batch)
        return {t: v / chunks for t, v in sums.items()}

    reference = means(model, names)
    values = {t.name: graph.const(t.name).copy() for t in model.graph.initializer}
    repaired = _clone(model)
    silent = _silent_positions(plan)

    def masked() -> onnx.ModelProto:
        out = _clone(model)
        for i, t in enumerate(out.graph.initializer):
            array = values[t.name]
            if t.name in silent and array.dtype.kind == "f":
                array = array.copy()
                for axis, positions, fill in silent[t.name]:
                    index = [slice(None)] * array.ndim
                    index[axis] = positions
                    array[tuple(index)] = fill
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, t.name))
        return out

    for node, name in zip(targets, names):
        delta = reference[name] - means(masked(), [name])[name]
        uses = graph.consumers.get(name, [])
        if len(node.input) > 2 and node.input[2] and values[node.input[2]].shape == delta.shape:
            values[node.input[2]] = (values[node.input[2]] + delta).astype(values[node.input[2]].dtype)
        elif len(uses) == 1 and uses[0].node.op_type == "BatchNormalization" and uses[0].index == 0:
            mean = uses[0].node.input[3]
            if values[mean].shape == delta.shape:
                values[mean] = (values[mean] - delta).astype(values[mean].dtype)
    for i, t in enumerate(repaired.graph.initializer):
        repaired.graph.initializer[i].CopyFrom(numpy_helper.from_array(values[t.name], t.name))
    return repaired


def _silent_positions(plan: UnconstrainedPlan) -> dict[str, list[tuple[int, np.ndarray, float]]]:
    """tensor -> [(axis, positions, fill)] that `masked_arrays` silences."""
    roles = plan.analysis.roles
    out: dict[str, list] = {}
    for gp in plan.groups:
        for m in gp.group.param_members:
            keep = gp.mask_set(DimRef(m.tensor, m.axis))
            positions = m.positions[~keep[m.channel_of]]
            if len(positions):
                out.setdefault(m.tensor, []).append((m.axis, positions, 1.0 if roles.get(m.tensor) in _ONE_ROLES else 0.0))
    return out


def mask_model(model: onnx.ModelProto, plan: UnconstrainedPlan) -> onnx.ModelProto:
    """The oracle: `model` (the original) with every layer's own mask applied to its parameters."""
    arrays = masked_arrays(plan)
    graph = plan.analysis.graph  # the plan's own values (a repaired model's, after `mean_repair`)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, t in enumerate(out.graph.initializer):
        if t.name in arrays:
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(arrays[t.name], t.name))
        elif graph.is_initializer(t.name):
            out.graph.initializer[i].CopyFrom(graph.model.graph.initializer[_init_index(graph, t.name)])
    return out


def _init_index(graph: ModelGraph, name: str) -> int:
    index = getattr(graph, "_upscale_init_index", None)
    if index is None:
        index = {t.name: i for i, t in enumerate(graph.model.graph.initializer)}
        graph._upscale_init_index = index
    return index[name]


# ---- 4. export --------------------------------------------------------------------------------------
def _takes(plan: UnconstrainedPlan) -> dict[DimRef, np.ndarray]:
    by_id = {gp.group.id: gp for gp in plan.groups}
    orders = {gp.group.id: gp.order for gp in plan.groups}

    def keeps(gid: int, m: ChannelSlice):
        gp = by_id.get(gid)
        return None if gp is None else gp.width(DimRef(m.tensor, m.axis))

    return dim_takes(plan.analysis, orders, keeps)


def export(plan: UnconstrainedPlan, contiguous_ops: bool = True, scatter: str = "pad_gather") -> onnx.ModelProto:
    """The pruned model: parameters masked and taken, boundaries turned into copies (or bypassed).

    Args:
        contiguous_ops: contiguous ranges become Slice / Pad (the reordered export); else every copy is
            a Gather / scatter (the naive export).
        scatter: how a non-contiguous widening is written: "scatter" (ScatterND into a zero stream) or
            "pad_gather" (Pad one zero channel, then Gather).
    """
    from onnxprune.rewrite import (
        RewriteContext,
        _copy_without_weights,
        _materialize_edits,
        _remove_unused_initializers,
    )
    from onnxprune.rules import RULES

    graph = plan.analysis.graph
    takes = _takes(plan)
    arrays = masked_arrays(plan)
    removed: dict[DimRef, np.ndarray] = {}
    for ref, take in takes.items():
        n = graph.size(ref.tensor, ref.axis)
        gone = np.setdiff1d(np.arange(n), take)
        if len(gone):
            removed[ref] = gone
    model = _copy_without_weights(graph.model)
    g = model.graph
    by_tensor: dict[str, list[tuple[int, np.ndarray]]] = {}
    for ref, take in takes.items():
        by_tensor.setdefault(ref.tensor, []).append((ref.axis, take))
    for t in graph.model.graph.initializer:
        if t.name not in by_tensor and t.name not in arrays:
            g.initializer.append(t)
            continue
        array = arrays.get(t.name)
        array = graph.const(t.name) if array is None else array
        for axis, take in by_tensor.get(t.name, []):
            array = np.take(array, take, axis=axis)
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), t.name))
    ctx = RewriteContext(graph, removed)
    nodes = {n.name: n for n in g.node}
    originals = {n.name: n for n in graph.nodes}
    changed = {ref.tensor for ref in removed}
    for node in nodes.values():
        rule = RULES.get(node.domain, node.op_type)
        if rule is not None and (set(node.input) | set(node.output)) & changed:
            rule.rewrite(node, ctx)
    _materialize_edits(g, nodes, originals, ctx)
    _lower_boundaries(g, graph, takes, contiguous_ops, scatter)
    _remove_unused_initializers(g)
    return model


def _lower_boundaries(g: onnx.GraphProto, graph: ModelGraph, takes, contiguous_ops: bool, scatter: str) -> None:
    originals = {n.name: n for n in graph.nodes if n.name.startswith(BOUNDARY)}
    new_nodes: list[onnx.NodeProto] = []
    rename: dict[str, str] = {}
    count = 0
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        if not node.name.startswith(BOUNDARY):
            new_nodes.append(node)
            continue
        src, dst = originals[node.name].input[0], node.output[0]
        cur = node.input[0]
        rank = graph.rank(dst) or 0
        for axis in range(rank):
            n = graph.size(dst, axis)
            full = np.arange(n) if isinstance(n, int) else None
            t_in = takes.get(DimRef(src, axis), full)
            t_out = takes.get(DimRef(dst, axis), full)
            if t_in is None or t_out is None or np.array_equal(t_in, t_out):
                continue
            shape = list(graph.shape(dst) or [None] * rank)
            shape[axis] = len(t_out)
            ops, cur, count = _copy_ops(g, cur, shape, axis, t_in, t_out, contiguous_ops, count, scatter,
                                        graph.dtype(dst) or onnx.TensorProto.FLOAT)
            new_nodes.extend(ops)
        rename[dst] = cur
    for o in g.output:
        if o.name in rename:
            raise UsageError(f"boundary on graph output {o.name}")
    del g.node[:]
    g.node.extend(new_nodes)


def _pads(rank: int, axis: int, before: int, after: int) -> np.ndarray:
    pads = np.zeros(2 * rank, dtype=np.int64)
    pads[axis], pads[rank + axis] = before, after
    return pads


def _copy_ops(g, x: str, shape: list, axis: int, t_in, t_out, contiguous_ops: bool, count: int,
              scatter: str = "pad_gather", dtype: int = onnx.TensorProto.FLOAT):
    """Ops turning `x` (positions `t_in` of the original axis) into positions `t_out` (zeros where new).

    `shape` is the output's shape (ints where static)."""
    rank = len(shape)
    pos_in = {int(p): j for j, p in enumerate(t_in.tolist())}
    idx = np.array([pos_in.get(int(q), -1) for q in t_out.tolist()], dtype=np.int64)
    ops: list[onnx.NodeProto] = []

    def name(op: str) -> str:
        nonlocal count
        count += 1
        return f"{COPY}_{op}_{count}"

    def const(value: np.ndarray, base: str) -> str:
        cname = f"{base}_c"
        g.initializer.append(numpy_helper.from_array(np.asarray(value), cname))
        return cname

    k = len(t_in)
    present = idx >= 0
    if present.all():  # narrowing (or reordering)
        if contiguous_ops and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))):
            n = name("Slice")
            ins = [x, const(np.array([idx[0]], np.int64), n + "s"), const(np.array([idx[0] + len(idx)], np.int64), n + "e"),
                   const(np.array([axis], np.int64), n + "a")]
            ops.append(helper.make_node("Slice", ins, [n], name=n))
        else:
            n = name("Gather")
            ops.append(helper.make_node("Gather", [x, const(idx, n)], [n], name=n, axis=axis))
        return ops, n, count
    first = int(np.argmax(present))
    if contiguous_ops and np.array_equal(idx[present], np.arange(k)) and present[first : first + k].all():
        n = name("Pad")
        pads = _pads(rank, axis, first, len(idx) - first - k)
        ops.append(helper.make_node("Pad", [x, const(pads, n)], [n], name=n, mode="constant"))
        return ops, n, count
    if scatter == "scatter" and all(isinstance(d, int) for d in shape[: axis + 1]):
        # UPSCALE's naive scatter: a zero stream, the k channels written at their slots by ScatterND.
        # Indices address every (leading dims, channel) pair: shape lead + [k, axis + 1].
        n = name("ScatterND")
        out_shape = [d if isinstance(d, int) else -1 for d in shape]
        zeros = name("ConstantOfShape")
        if all(d >= 0 for d in out_shape):
            shape_in = const(np.array(out_shape, np.int64), zeros)
            pre: list[onnx.NodeProto] = []
        else:  # dynamic trailing dims: the input's shape with the axis widened
            sh = name("Shape")
            pre = [helper.make_node("Shape", [x], [sh], name=sh)]
            onehot = np.zeros(rank, np.int64)
            onehot[axis] = 1
            mul, add = name("Mul"), name("Add")
            pre.append(helper.make_node("Mul", [sh, const(1 - onehot, mul)], [mul], name=mul))
            pre.append(helper.make_node("Add", [mul, const(onehot * len(t_out), add)], [add], name=add))
            shape_in = add
        zero = numpy_helper.from_array(np.zeros(1, helper.tensor_dtype_to_np_dtype(dtype)))
        ops.extend(pre)
        ops.append(helper.make_node("ConstantOfShape", [shape_in], [zeros], name=zeros, value=zero))
        slots = np.flatnonzero(present)  # the output slots that receive an input channel
        src = idx[present]  # ... and which input channel each receives
        if not np.array_equal(src, np.arange(k)):  # some input channels dropped or out of order
            gname = name("Gather")
            ops.append(helper.make_node("Gather", [x, const(src, gname)], [gname], name=gname, axis=axis))
            x = gname
        lead = [int(d) for d in shape[:axis]]
        grids = np.meshgrid(*[np.arange(d) for d in lead], np.arange(len(slots)), indexing="ij")
        indices = np.stack(list(grids[:-1]) + [slots[grids[-1]]], axis=-1).astype(np.int64)
        ops.append(helper.make_node("ScatterND", [zeros, const(indices, n), x], [n], name=n))
        return ops, n, count
    # Scatter: one zero channel appended, then every output slot gathers its source (or the zero).
    p = name("Pad")
    ops.append(helper.make_node("Pad", [x, const(_pads(rank, axis, 0, 1), p)], [p], name=p, mode="constant"))
    n = name("Gather")
    ops.append(helper.make_node("Gather", [p, const(np.where(present, idx, k), n)], [n], name=n, axis=axis))
    return ops, n, count


# ---- 5. copy report ---------------------------------------------------------------------------------
def copy_report(model: onnx.ModelProto) -> dict:
    """Copy ops the export inserted (by op type) and the bytes they write per inference."""
    graph = ModelGraph(infer_shapes(_clone(model)))
    ops: dict[str, int] = {}
    written = 0
    for node in graph.nodes:
        if not node.name.startswith(COPY) or node.op_type not in COPY_OPS:
            continue
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        shape = graph.shape(node.output[0]) or ()
        numel = int(np.prod([d if isinstance(d, int) else 1 for d in shape], dtype=np.int64))
        written += numel * _itemsize(graph.dtype(node.output[0]))
    return {"ops": dict(sorted(ops.items())), "copy_ops": sum(ops.values()), "bytes": written,
            "gather_scatter": sum(ops.get(k, 0) for k in ("Gather", "GatherElements", "ScatterND", "ScatterElements"))}


def _itemsize(elem_type: int | None) -> int:
    if elem_type is None:
        return 4
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize


def _clone(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


# ---- 6. reordering and the per-unit copy/absorb choice ----------------------------------------------
def _share_of_axis(graph: ModelGraph, ref: DimRef, group: ChannelGroup) -> float:
    """The fraction of the dim's positions one channel of `group` holds (1 / width for a plain stream;
    smaller where the group is one input of a Concat, e.g. a DenseNet layer's growth channels)."""
    n = graph.size(ref.tensor, ref.axis)
    members = _members_by_dim(group)
    m = members.get(ref)
    if not isinstance(n, int) or n <= 0 or m is None:
        return 1.0 / max(1, group.size)
    return len(m.positions) / max(1, group.size) / n


def _members_by_dim(group: ChannelGroup) -> dict[DimRef, ChannelSlice]:
    return {DimRef(m.tensor, m.axis): m for m in group.members}


def _bytes_per_channel(graph: ModelGraph, ref: DimRef, group: ChannelGroup) -> float:
    shape = graph.shape(ref.tensor) or ()
    numel = int(np.prod([d if isinstance(d, int) else 1 for d in shape], dtype=np.int64))
    return numel * _itemsize(graph.dtype(ref.tensor)) * _share_of_axis(graph, ref, group)


def _contiguous(keep: np.ndarray, union: np.ndarray, order: np.ndarray) -> bool:
    seq = [c for c in order.tolist() if union[c]]
    where = [i for i, c in enumerate(seq) if keep[c]]
    return bool(where) and where[-1] - where[0] + 1 == len(where)


def _copy_cost(gp: GroupPlan, pc: Piece, graph: ModelGraph, cost: CostModel, contiguous: bool) -> float:
    k, u = int(pc.keep.sum()), int(gp.union.sum())
    if k == u:
        return 0.0
    total = 0.0
    for ref in pc.dims:
        if not graph.is_initializer(ref.tensor) and any(
            b.name.startswith(BOUNDARY) and (ref.tensor in b.input or ref.tensor in b.output)
            for b in _boundary_nodes(graph)
        ):
            bpc = _bytes_per_channel(graph, ref, gp.group)
            # Layout conversions around the copy: about `layout_break` extra copies of the wider side.
            total += cost.layout_break * u * bpc / cost.copy_bytes_per_s
            if pc.in_boundaries:  # narrowing: Slice or Gather writes k channels
                bw = cost.copy_bytes_per_s if contiguous else cost.gather_bytes_per_s
                total += cost.op_overhead_s + k * bpc / bw
            else:  # widening: Pad writes u channels; naive: Pad (k+1) then Gather u
                total += cost.op_overhead_s + u * bpc / cost.copy_bytes_per_s
                if not contiguous:
                    total += cost.op_overhead_s + (k + 1) * bpc / cost.copy_bytes_per_s + u * bpc / cost.gather_bytes_per_s
                    total -= u * bpc / cost.copy_bytes_per_s
    return total


def _boundary_nodes(graph: ModelGraph) -> list[onnx.NodeProto]:
    cached = getattr(graph, "_upscale_boundaries", None)
    if cached is None:
        cached = [n for n in graph.nodes if n.name.startswith(BOUNDARY)]
        graph._upscale_boundaries = cached
    return cached


def _absorb_cost(gp: GroupPlan, pc: Piece, analysis: ChannelAnalysis, cost: CostModel, ratio: float) -> float:
    graph = analysis.graph
    extra = int(gp.union.sum() - pc.keep.sum())
    if extra == 0:
        return 0.0
    nodes = {n.name: n for n in graph.nodes}
    weight_nodes: dict[str, float] = {}  # node -> fraction of its MACs the extra channels add
    for m in pc.weights:
        frac = extra * _share_of_axis(graph, DimRef(m.tensor, m.axis), gp.group)
        for use in graph.consumers.get(m.tensor, []):
            weight_nodes[use.node.name] = frac
    total = 0.0
    for name in pc.nodes:
        node = nodes[name]
        if name in weight_nodes:
            total += node_macs(graph, node) * weight_nodes[name] * (1 - ratio) / cost.macs_per_s
        else:
            for o in node.output:
                refs = [DimRef(o, ax) for ax in range(graph.rank(o) or 0) if DimRef(o, ax) in gp.piece_of]
                if refs:
                    shape = graph.shape(o) or ()
                    numel = int(np.prod([d if isinstance(d, int) else 1 for d in shape], dtype=np.int64))
                    frac = extra * _share_of_axis(graph, refs[0], gp.group)
                    total += 2 * numel * frac * 4 / cost.elementwise_bytes_per_s
    return total


def _reorderable(group: ChannelGroup) -> bool:
    """Relabelling needs every channel to hold the same number of positions in each dim."""
    for m in group.members:
        counts = np.bincount(m.channel_of, minlength=group.size)
        if counts.min() != counts.max():
            return False
    return True


def optimize_layout(plan: UnconstrainedPlan, config: UnconstrainedConfig) -> dict:
    """Choose each group's channel order and, per narrowable unit, copy or absorb (see docstring)."""
    graph = plan.analysis.graph
    decisions = {"narrowed": 0, "absorbed": 0, "contiguous": 0, "scattered": 0}
    for gp in plan.groups:
        candidates = [pc for pc in gp.pieces if pc.is_unit and pc.narrowable and (pc.in_boundaries or pc.out_boundaries)]
        if not candidates:
            continue
        if not _reorderable(gp.group):
            continue  # channels with different position counts in some dim: keep the original order
        for _ in range(3):
            narrowed = [pc for pc in candidates if pc.narrow]
            weights = [_copy_cost(gp, pc, graph, config.cost, False) + 1e-9 for pc in narrowed]
            gp.order = choose_order(gp.union, [pc.keep for pc in narrowed], weights)
            changed = False
            for pc in candidates:
                contiguous = _contiguous(pc.keep, gp.union, gp.order)
                copy = _copy_cost(gp, pc, graph, config.cost, contiguous)
                absorb = _absorb_cost(gp, pc, plan.analysis, config.cost, config.ratio)
                want = not (config.absorb and absorb < copy)
                if want != pc.narrow:
                    pc.narrow, changed = want, True
            if not changed:
                break
        for pc in candidates:
            if pc.narrow:
                decisions["narrowed"] += 1
                key = "contiguous" if _contiguous(pc.keep, gp.union, gp.order) else "scattered"
                decisions[key] += 1
            else:
                decisions["absorbed"] += 1
    return decisions


def _layout_candidates(config: UnconstrainedConfig) -> dict[str, UnconstrainedConfig]:
    from dataclasses import replace

    cost = config.cost
    return {
        "fitted": config,
        "copies cheaper": replace(config, cost=replace(cost, layout_break=0.0)),
        "copies dearer": replace(config, cost=replace(cost, layout_break=4 * cost.layout_break + 4)),
        "absorb all": replace(config, cost=replace(cost, op_overhead_s=1.0)),
        "copies only": replace(config, absorb=False),
    }


def ort_session(model: onnx.ModelProto, threads: int = 1):
    """An onnxruntime CPU session as deployed (optimisations on), `threads` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if threads > 1:  # no spin-waiting: on a shared machine spinning workers starve each other
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def tune_layout(plan: UnconstrainedPlan, config: UnconstrainedConfig) -> tuple[dict, onnx.ModelProto, dict]:
    """Export the plan under each candidate cost model (`_layout_candidates`); keep the fastest.

    All candidates compute the same function (the masked original); only where copies sit differs.
    The candidates are timed round-robin (`config.tune` rounds of one run each) so that load on the
    machine hits them alike. Returns (layout decisions, model, {candidate: median ms, "chosen": name}).
    """
    exports: dict[str, tuple[dict, onnx.ModelProto]] = {}
    seen: dict[bytes, str] = {}
    for name, cfg in _layout_candidates(config).items():
        for gp in plan.groups:
            gp.order = np.arange(gp.group.size)
            for pc in gp.pieces:
                pc.narrow = pc.narrowable
        layout = optimize_layout(plan, cfg)
        model = infer_shapes(export(plan, contiguous_ops=True, scatter="pad_gather"))
        key = model.SerializeToString()
        if key in seen:  # the same decisions as an earlier candidate
            continue
        seen[key] = name
        exports[name] = (layout, model)
    from onnxprune.verify import random_inputs

    inputs = random_inputs(next(iter(exports.values()))[1], seed=0)
    sessions = {k: ort_session(m, config.tune_threads) for k, (_, m) in exports.items()}
    feeds = {k: {i.name: inputs[i.name] for i in s.get_inputs()} for k, s in sessions.items()}
    for k, sess in sessions.items():
        sess.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in exports}
    for _ in range(config.tune):
        for k, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, feeds[k])
            times[k].append(time.perf_counter() - t)
    medians = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    best = min(medians, key=medians.get)
    layout, model = exports[best]
    return layout, model, {"ms": {k: round(v, 3) for k, v in medians.items()}, "chosen": best}


def effective_params(model: onnx.ModelProto) -> int:
    """Nonzero floating-point parameter elements (zero rows/columns kept for absorption do not count)."""
    graph = ModelGraph(model)
    total = 0
    for t in graph.initializers.values():
        if t.data_type in (1, 10, 11, 16):
            total += int(np.count_nonzero(graph.const(t.name)))
    return total


class UnconstrainedPass(Pass):
    """Unconstrained pruning with an exact export; `info` has the plan, summary and copy report."""

    def __init__(self, config: UnconstrainedConfig | None = None, keeps: dict | None = None,
                 calib: dict[str, np.ndarray] | None = None) -> None:
        self.config = config or UnconstrainedConfig()
        self.keeps = keeps
        self.calib = calib
        if self.config.repair == "mean" and calib is None:
            raise UsageError("unconstrained repair 'mean' needs calibration inputs (calib={input: array})")

    def call(self, model):
        start = time.perf_counter()
        c = self.config
        if c.ratio == 0 and not self.keeps:
            return PassResult(model, False, {"summary": {"mode": "unconstrained", "groups_pruned": 0}})
        plan = build_plan(model, c, self.keeps)
        if c.repair == "mean":
            keeps = {(gp.group.id, pc.id): pc.keep for gp in plan.groups for pc in gp.pieces if pc.is_unit}
            plan = build_plan(mean_repair(model, plan, self.calib), c, keeps)
        if c.reorder and c.tune:
            layout, pruned, tuned = tune_layout(plan, c)
        else:
            layout = optimize_layout(plan, c) if c.reorder else {}
            # The reordered export's few remaining scatters use Pad+Gather (cheaper than ScatterND here).
            pruned = infer_shapes(export(plan, contiguous_ops=c.reorder, scatter="pad_gather" if c.reorder else c.naive))
            tuned = None
        check_model(pruned)
        report = copy_report(pruned)
        before = count_params(ModelGraph(model))
        summary = {
            "mode": "unconstrained",
            "config": {k: v for k, v in asdict(c).items() if k != "cost"},
            "params_before": before,
            "params_after": count_params(ModelGraph(pruned)),
            "effective_params_after": effective_params(pruned),
            "groups_pruned": len(plan.groups),
            "units": sum(pc.is_unit for gp in plan.groups for pc in gp.pieces),
            "boundaries": plan.boundaries,
            "layout": layout,
            "tuned": tuned,
            "copies": report,
            "seconds": round(time.perf_counter() - start, 3),
        }
        import json

        from onnxprune.metadata import SUMMARY_KEY, set_metadata

        set_metadata(pruned, SUMMARY_KEY, json.dumps(summary))
        return PassResult(pruned, True, {"summary": summary, "plan": plan, "copies": report})
