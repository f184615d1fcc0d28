"""Step 2's scores: how much each channel matters to one unit (its own ranking) and to its group (the
shared ranking that ``share`` and ``union_cap`` use).

Start reading at `own_scores`. The default ``energy`` criterion is data-free and BatchNorm-aware
(`energy_scores`): a writer's channel energy E[out^2] after its BatchNorm (+ReLU) from (beta, gamma), a
reader's column norm times its input energy. ``l1`` / ``l2`` fold each unit's BatchNorm into its weight
norms (`unit_scores`); ``bn`` is |gamma|. `shared_scores` is the constrained criterion of the same name.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.channels import ChannelAnalysis, ChannelGroup, ChannelSlice
from onnxprune.criteria import get_criterion, per_channel, position_norms
from onnxprune.graph import ModelGraph, attrs
from onnxprune.rules.facts import linear_axes
from onnxprune.upscale.records import Piece


def unit_scores(piece: Piece, analysis: ChannelAnalysis, size: int, p: int = 1) -> np.ndarray:
    """Per-channel importance from the unit's own weights (each member mean-normalised).

    A BatchNormalization inside the piece rescales each channel by ``|scale| / sqrt(var + eps)``; the
    unit's effective weights are the folded ones, so the norms are multiplied by that factor.
    """
    total = np.zeros(size)
    for m in piece.weights:
        norms = position_norms(analysis.graph.initializer_value(m.tensor), m.axis, p)[m.positions]
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
            g = np.abs(graph.initializer_value(node.input[1])[m.positions]).astype(np.float64)
            return np.bincount(m.channel_of, weights=g, minlength=size) / counts
    return None


def _relu_after(node: onnx.NodeProto, graph: ModelGraph) -> bool:
    uses = graph.consumers.get(node.output[0], [])
    return len(uses) == 1 and uses[0].node.op_type in ("Relu", "Clip")


def _relu_energy(mu: np.ndarray, sd: np.ndarray, relu: bool) -> np.ndarray:
    """E[z^2] for z ~ N(mu, sd^2), or E[relu(z)^2]."""
    if not relu:
        return mu**2 + sd**2
    from scipy.special import ndtr  # the normal CDF (scipy.stats.norm's own, without its 0.5 s import)

    sd = np.maximum(sd, 1e-12)
    t = mu / sd
    pdf = np.exp(-(t**2) / 2.0) / np.sqrt(2 * np.pi)  # as scipy.stats.norm.pdf computes it
    return (mu**2 + sd**2) * ndtr(t) + mu * sd * pdf


def bn_energy(piece: Piece, analysis: ChannelAnalysis, size: int) -> np.ndarray | None:
    """Per-channel E[out^2] after the piece's BatchNormalization (N(beta, gamma^2) model), or None."""
    graph = analysis.graph
    members = {m.tensor: m for m in piece.members}
    for node in graph.nodes:
        if node.op_type != "BatchNormalization" or node.name not in piece.nodes:
            continue
        ms, mb = members.get(node.input[1]), members.get(node.input[2])
        if ms is None or mb is None:
            continue
        gamma = np.abs(graph.initializer_value(node.input[1])[ms.positions]).astype(np.float64)
        beta = graph.initializer_value(node.input[2])[mb.positions].astype(np.float64)
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
    own = bn_energy(piece, analysis, size)
    consumers = [m for m in piece.weights if _is_consumer_member(m, analysis)]
    if not consumers:
        return own if own is not None else unit_scores(piece, analysis, size, 2)
    cols = np.zeros(size)
    for m in consumers:
        weight = analysis.graph.initializer_value(m.tensor)
        ch = per_channel(m, position_norms(weight, m.axis, 2)[m.positions], size)
        cols += ch / (ch.mean() + 1e-12)
    if own is None:
        own = _input_energy(piece, pieces, analysis, size)
    return cols * (own if own is not None else 1.0)


def _input_energy(piece: Piece, pieces: list[Piece], analysis: ChannelAnalysis, size: int) -> np.ndarray | None:
    """E[x_c^2] of a reader's input: its own pre-activation BatchNorm's output, else the sum of the
    BatchNorm output energies of the writers reaching it (writers add up on a residual stream; all the
    group's writers where that is unknown), else None."""
    own = bn_energy(piece, analysis, size)
    if own is not None:
        return own
    writers = [pc for pc in pieces if pc.has_producer and pc is not piece]
    if piece.sources:
        writers = [pc for pc in writers if pc.id in piece.sources]
    energies = [bn_energy(pc, analysis, size) for pc in writers]
    stream = [e for e in energies if e is not None]
    return np.sum(stream, axis=0) if stream else None


def _is_consumer_member(m: ChannelSlice, analysis: ChannelAnalysis) -> bool:
    """Whether the weight member's axis is the one its linear layer reads input channels on."""
    for use in analysis.graph.consumers.get(m.tensor, []):
        axes = linear_axes(use.node, analysis.graph)
        if axes is not None:
            return m.axis == axes[0]
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
        gamma, variance = graph.initializer_value(scale), graph.initializer_value(var)
        f = np.abs(gamma[ms.positions]) / np.sqrt(variance[mv.positions] + eps)
        counts = np.maximum(np.bincount(ms.channel_of, minlength=size), 1)
        factor *= np.bincount(ms.channel_of, weights=f, minlength=size) / counts
    return factor


def measured_energy(model: onnx.ModelProto, pieces: list[Piece], calib: dict[str, np.ndarray],
                    samples: int = 32) -> dict[str, np.ndarray]:  # fmt: skip
    """E[x^2] per position of axis 1 of every reader unit's input activation and every writer unit's output
    (`writer_output`), on the first `samples` calibration inputs of `model` (the split model): tensor name
    -> array."""
    from onnx import helper

    from onnxprune.verify import session

    boundary_input = {n.name: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    names = [_reader_input(pc) for pc in pieces if pc.is_unit and not pc.has_producer]
    names += [writer_output(pc, boundary_input) for pc in pieces if pc.is_unit and pc.has_producer]
    wanted = sorted({name for name in names if name is not None})
    if not wanted:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in wanted if t not in have)
    sess = session(probe, spin=False)
    inputs = sess.get_inputs()
    n = min(samples, min(len(calib[i.name]) for i in inputs))
    # A static batch dim: in chunks of it; else all samples at once.
    step = next((int(i.shape[0]) for i in inputs if i.shape and isinstance(i.shape[0], int)), n)
    sums: dict[str, np.ndarray] = {}
    runs = 0
    for start in range(0, n - n % step if n >= step else 0, step):
        outs = sess.run(wanted, {i.name: calib[i.name][start : start + step] for i in inputs})
        runs += 1
        for name, v in zip(wanted, outs):
            v = np.asarray(v, dtype=np.float64)
            sums[name] = sums.get(name, 0) + (v**2).mean(axis=tuple(a for a in range(v.ndim) if a != 1))
    return {k: v / runs for k, v in sums.items()}


def _reader_input(pc: Piece) -> str | None:
    """The activation a reader unit reads (its first non-parameter member on axis 1), or None."""
    return next((m.tensor for m in pc.members if not m.is_param and m.axis == 1), None)


def writer_output(pc: Piece, boundary_input: dict[str, str]) -> str | None:
    """The activation a writer unit leaves its piece with (the input of one of its outgoing boundaries,
    ``boundary_input``: boundary node name -> its input), or None."""
    inside = {m.tensor for m in pc.members if not m.is_param and m.axis == 1}
    return next((boundary_input[b] for b in pc.out_boundaries if boundary_input.get(b) in inside), None)


def measured_on(pc: Piece, name: str | None, measured: dict[str, np.ndarray] | None, size: int) -> np.ndarray | None:
    """The measured E[x_c^2] (`measured_energy`) of the unit's activation `name` per group channel, or None."""
    if name is None or measured is None or name not in measured:
        return None
    m = next(m for m in pc.members if m.tensor == name and m.axis == 1)
    counts = np.maximum(np.bincount(m.channel_of, minlength=size), 1)
    return np.bincount(m.channel_of, weights=measured[name][m.positions], minlength=size) / counts


def _measured_input(pc: Piece, measured: dict[str, np.ndarray] | None, size: int) -> np.ndarray | None:
    """A reader's measured E[x_c^2] per group channel (`measured_energy`), or None."""
    name = _reader_input(pc) if measured else None
    if name is None or measured is None or name not in measured:
        return None
    m = next(m for m in pc.members if m.tensor == name and m.axis == 1)
    counts = np.maximum(np.bincount(m.channel_of, minlength=size), 1)
    return np.bincount(m.channel_of, weights=measured[name][m.positions], minlength=size) / counts


def own_scores(pc: Piece, pieces: list[Piece], analysis: ChannelAnalysis, size: int, criterion: str,
               measured: dict[str, np.ndarray] | None = None) -> np.ndarray:  # fmt: skip
    """A unit's own per-channel importance under `criterion`.

    A reader's column norms are weighted by its input's per-channel energy: measured on calibration inputs
    where `measured` (`measured_energy`) has it, else estimated from BatchNorm statistics (a BatchNorm
    folded into the convs leaves no statistics: then only the measurement sees that one stream channel
    carries a hundred times the signal of another).
    """
    energy = None if pc.has_producer else _measured_input(pc, measured, size)
    if criterion == "energy":
        if energy is not None:
            return column_norms(pc, analysis, size, 2, squared=True) * energy
        return energy_scores(pc, pieces, analysis, size)
    if criterion == "bn":
        gamma = _bn_gamma(pc, analysis, size)
        return gamma if gamma is not None else energy_scores(pc, pieces, analysis, size)
    p = 2 if criterion == "l2" else 1
    if not pc.has_producer:
        # A reader: its folded weights are its columns times its input's scale, so each column norm is
        # weighted by the input channel's RMS (measured, or the writers' BatchNorm outputs), the same
        # folding a writer's rows get from its own BatchNorm. A column reading a weak channel matters little.
        cols = column_norms(pc, analysis, size, p)
        if energy is None:
            energy = _input_energy(pc, pieces, analysis, size)
        return cols if energy is None else cols * np.sqrt(energy)
    return unit_scores(pc, analysis, size, p)


def column_norms(pc: Piece, analysis: ChannelAnalysis, size: int, p: int, squared: bool = False) -> np.ndarray:
    """A reader's per-channel column norms (L1, or L2 for p=2; `squared`: L2^2), each member mean-normalised."""
    cols = np.zeros(size)
    for m in pc.weights:
        weight = analysis.graph.initializer_value(m.tensor)
        ch = per_channel(m, position_norms(weight, m.axis, p)[m.positions], size)
        cols += (np.sqrt(ch) if p == 2 and not squared else ch) / (ch.mean() + 1e-12)
    return cols


def normalised(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    return scores / (np.mean(np.abs(scores)) + 1e-12)


def shared_scores(group: ChannelGroup, analysis: ChannelAnalysis, criterion: str, own: list[np.ndarray]) -> np.ndarray:
    """The group's one ranking: the constrained criterion of the same name (l1, l2, bn: exactly what
    `PrunePass` scores), or for ``energy`` (no constrained twin) the mean of the units' normalised scores."""
    if criterion in ("l1", "l2", "bn"):
        return normalised(get_criterion(criterion).score(group, analysis))
    return normalised(np.mean([normalised(o) for o in own], axis=0))
