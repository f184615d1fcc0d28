"""Channel reordering: permute a group's channels (semantics-preserving) and choose the order that makes
the kept sets of an unconstrained plan contiguous, so gathers/scatters become `Slice`/`Pad` or vanish.

Start reading at `choose_order`, then `relabel_take` and `permute_channels` (the pass that applies
it is `onnxprune.passes.reorder.ReorderPass`).

**Permutation (free at run time).** A group's channel *k* occupies, in every dim of the group, some slots
(positions). Reordering relabels slots: the slot that held channel *i* (its *r*-th position in that dim)
now holds channel ``order[i]`` (its *r*-th position). Applied to every parameter member of the group
(`np.take` on the member axis) this is a consistent renaming of channels along every coupled tensor, so
the model computes the same outputs with the stream's channels stored in a new order; activations need
no op at all. Ranks keep multi-position channels (heads, flattened blocks, depthwise multipliers, both
halves of a Split) intact.

**Choosing the order.** An unconstrained plan gives, for one stream of width ``U`` (the union), several
kept sets ``K_j ⊆ U``, each with a weight ``w_j`` (the bytes its gather/scatter would copy). A kept set
that is one contiguous run of the stream order costs a `Slice` (narrowing) or a `Pad` (widening), or can
be absorbed into the weights as zero rows/columns; a scattered set costs a `Gather` (plus a `Pad` to
scatter). This is the weighted consecutive-ones problem (NP-hard to optimise in general). We:

1. compress channels into *blocks* of equal signature (the sets each channel is in): channels of one
   block are interchangeable, so only the order of blocks matters;
2. with at most `EXACT_BLOCKS` blocks, try every block order and keep the one minimising
   ``sum_j w_j * (runs_j - 1)`` (ties: fewer runs in total) — optimal, so every set is contiguous whenever
   some order makes it so;
3. otherwise start from the blocks sorted by their signature bits (heaviest set first: nested sets end up
   nested and contiguous) and improve by first-improvement block moves (remove one block, reinsert it
   elsewhere) until no move helps or a move budget is spent.

Channels outside ``U`` (removed everywhere) go last. `upscale.layout` then decides per edge between
copy and absorption with its cost model.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.channels import ChannelAnalysis, ChannelSlice, DimRef
from onnxprune.errors import UsageError

EXACT_BLOCKS = 7
MAX_MOVES = 20000


# ---- choosing an order ----------------------------------------------------------------------------
def runs(order_blocks: list[int], member: np.ndarray) -> np.ndarray:
    """Number of maximal runs of each set along a block order; `member[set, block]` is a bool matrix."""
    m = member[:, order_blocks]
    starts = m[:, :1].astype(np.int64) + (m[:, 1:] & ~m[:, :-1]).sum(axis=1, keepdims=True)
    return starts[:, 0]


def _cost(order_blocks, member, weights) -> tuple[float, int]:
    r = runs(order_blocks, member)
    return float(np.sum(weights * np.maximum(r - 1, 0))), int(r.sum())


def choose_order(union: np.ndarray, sets: list[np.ndarray], weights: list[float] | None = None) -> np.ndarray:
    """A channel order (permutation of ``range(len(union))``) making as many kept sets contiguous as possible.

    Args:
        union: bool mask of the channels the stream keeps.
        sets: bool masks (subsets of `union`) of the channels each edge keeps.
        weights: cost of leaving each set scattered (default 1 each).
    """
    union = np.asarray(union, dtype=bool)
    n = len(union)
    inside = np.flatnonzero(union)
    outside = np.flatnonzero(~union)
    if not sets or len(inside) == 0:
        return np.concatenate([inside, outside])
    weights_arr = np.ones(len(sets)) if weights is None else np.asarray(weights, dtype=np.float64)
    mat = np.stack([np.asarray(s, dtype=bool)[inside] for s in sets])  # [sets, channels in U]
    # Heaviest set first, so that lexicographic signature order nests the important sets.
    rank = np.argsort(-weights_arr, kind="stable")
    mat, weights_arr = mat[rank], weights_arr[rank]
    sig, block_of = np.unique(mat.T, axis=0, return_inverse=True)
    block_of = block_of.reshape(-1)
    member = sig.T.copy()  # [sets, blocks]
    nb = member.shape[1]
    if nb <= EXACT_BLOCKS:
        best = min(itertools.permutations(range(nb)), key=lambda p: _cost(list(p), member, weights_arr))
        order_blocks = list(best)
    else:
        # Signature order, most important set as the most significant bit (descending: members first).
        keys = [tuple((~member[:, b]).tolist()) for b in range(nb)]
        order_blocks = sorted(range(nb), key=lambda b: keys[b])
        order_blocks = _local_search(order_blocks, member, weights_arr)
    channels = [inside[block_of == b] for b in order_blocks]
    return np.concatenate(channels + [outside]).astype(np.int64)[:n]


def _local_search(order: list[int], member: np.ndarray, weights: np.ndarray) -> list[int]:
    best = _cost(order, member, weights)
    moves = 0
    improved = True
    while improved and moves < MAX_MOVES:
        improved = False
        for i in range(len(order)):
            for j in range(len(order)):
                if i == j:
                    continue
                moves += 1
                cand = order[:i] + order[i + 1 :]
                cand.insert(j, order[i])
                c = _cost(cand, member, weights)
                if c < best:
                    order, best, improved = cand, c, True
                    break
            if improved or moves >= MAX_MOVES:
                break
    return order


# ---- applying an order ----------------------------------------------------------------------------
def relabel_take(member: ChannelSlice, order: np.ndarray, keep: np.ndarray | None = None):
    """Source positions of the member's slots after relabelling channels by `order`.

    Returns ``(slots, source, kept)``: the member's slots (sorted positions), the old position whose value
    each slot holds after the relabelling, and whether the channel now in that slot is kept.
    """
    slots = member.positions
    ch = member.channel_of
    rank = np.zeros(len(slots), dtype=np.int64)
    seen: dict[int, int] = {}
    pos_of: dict[tuple[int, int], int] = {}
    for i, c in enumerate(ch.tolist()):
        r = seen.get(c, 0)
        seen[c] = r + 1
        rank[i] = r
        pos_of[(c, r)] = int(slots[i])
    new_ch = np.asarray(order, dtype=np.int64)[ch]
    try:
        source = np.array([pos_of[(c, r)] for c, r in zip(new_ch.tolist(), rank.tolist())], dtype=np.int64)
    except KeyError:
        raise UsageError(f"channels of {member} hold different numbers of positions: cannot reorder") from None
    kept = np.ones(len(slots), dtype=bool) if keep is None else np.asarray(keep, dtype=bool)[new_ch]
    return slots, source, kept


def dim_takes(
    analysis: ChannelAnalysis,
    orders: dict[int, np.ndarray],
    keeps: Callable[[int, ChannelSlice], np.ndarray | None] | None = None,
) -> dict[DimRef, np.ndarray]:
    """Positions to take (in order) on every dim touched by a reordered or narrowed group.

    `keeps(group_id, member)` returns the bool mask of channels the member's dim keeps (None: all).
    """
    source: dict[DimRef, np.ndarray] = {}
    flags: dict[DimRef, np.ndarray] = {}
    for g in analysis.groups:
        order = orders.get(g.id, np.arange(g.size))
        for m in g.members:
            keep = keeps(g.id, m) if keeps else None
            if keep is None and np.array_equal(order, np.arange(g.size)):
                continue
            ref = DimRef(m.tensor, m.axis)
            n = analysis.graph.static_size(m.tensor, m.axis)
            src = source.setdefault(ref, np.arange(n))
            flag = flags.setdefault(ref, np.ones(n, dtype=bool))
            slots, s, k = relabel_take(m, order, keep)
            src[slots] = s
            flag[slots] = k
    return {ref: source[ref][flags[ref]] for ref in source}


def permute_channels(analysis: ChannelAnalysis, orders: dict[int, np.ndarray]) -> onnx.ModelProto:
    """The model with each group's channels relabelled by `orders` (group id -> permutation)."""
    for gid, order in orders.items():
        size = analysis.groups[gid].size
        if sorted(np.asarray(order).tolist()) != list(range(size)):
            raise UsageError(f"order for group {gid} is not a permutation of {size} channels")
    takes = dim_takes(analysis, orders)
    model = onnx.ModelProto()
    model.CopyFrom(analysis.graph.model)
    by_tensor: dict[str, list[tuple[int, np.ndarray]]] = {}
    for ref, take in takes.items():
        if analysis.graph.is_initializer(ref.tensor):
            by_tensor.setdefault(ref.tensor, []).append((ref.axis, take))
    for i, t in enumerate(model.graph.initializer):
        if t.name in by_tensor:
            array = analysis.graph.initializer_value(t.name)
            for axis, take in by_tensor[t.name]:
                array = np.take(array, take, axis=axis)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), t.name))
    return model
