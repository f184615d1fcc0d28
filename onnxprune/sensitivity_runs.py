"""One group's output error at several removals, measured without pruning the model (`sensitivity.sensitivity`).

Start reading at `GroupScan.errors`. Removing channels of one group and repairing the layers that read them
changes a few initializers only, and a physically pruned model computes what the original computes with the
removed channels silenced (`rewrite.apply_mask`, the pruning oracle the tests hold every rule to). So each
measurement here is the original graph with those initializers replaced by their repaired and masked values
(`GroupScan._edited`), at the original shapes: no new analysis, physical removal or shape inference.

Only the nodes downstream of the changed initializers run (`Region`): every other value is the original's.
`GroupScan` walks the groups in graph order and keeps, for all samples, the original values that cross from
unchanged to changed nodes (the *cut*) and the graph's frontier at that point, so the next group's cut is
computed from them rather than from the graph inputs (`GroupScan._advance`); when they do not fit `BUDGET`
the group runs from the graph inputs instead. One onnxruntime session serves all removals of a group: the
changed initializers are its inputs (and a bias a repair may add is an input of zeros until it does).

Measured (bench/repair_speed_results.txt, 2026-12-04): ResNet-50 at 224x224, 64 samples, obs + ls, 259 points:
2,905 -> 876 CPU s of which repair 52, masking and copies 5, cut values 11, sessions 9, the reference 5, the
rest the downstream runs (`sensitivity` has the other models).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.calibration import CalibrationData, CalibrationStats, Consumer, consumers
from onnxprune.channels import ChannelAnalysis, ChannelGroup, DimRef
from onnxprune.concurrency import AT_ONCE, in_order
from onnxprune.external import tensor_array
from onnxprune.onnx_utils import has_subgraph, upstream_nodes
from onnxprune.plan import PruningPlan
from onnxprune.rewrite import silence
from onnxprune.verify import session

__all__ = ["BUDGET", "OPTIMIZE", "GroupScan", "Region", "supported"]

# Bytes of original values (all samples) kept between groups. ResNet-50 at 224x224 with 64 samples: a layer1
# residual stream is 205 MB (it fits), the stream beside a 64-channel branch tensor 257 MB (the branch alone
# is kept, the next group's stream is recomputed from the input: the stem and at most three blocks).
BUDGET = 224 << 20
# onnxruntime's graph optimisations on the scan's sessions: BatchNorm folded into the convolutions whose
# weights stay constant, fused activations, blocked layouts (~22% less CPU per ResNet-50 forward pass).
OPTIMIZE = True


def supported(model: onnx.ModelProto) -> bool:
    """Can `GroupScan` measure this model? Not when a node has subgraphs (they read outer values implicitly)."""
    return not any(has_subgraph(n) for n in model.graph.node)


@dataclass(frozen=True)
class Region:
    """What pruning one group (and repairing its readers) can change.

    Attributes:
        fed: initializers whose values change at some removal; the session's inputs.
        biases: node index -> name of a bias input added to a Conv/Gemm that a repair may give one.
        outputs: the graph outputs the changes reach.
        cut: values the changed nodes read from unchanged nodes or graph inputs.
        first: index of the first changed node.
    """

    fed: tuple[str, ...]
    biases: dict[int, str]
    outputs: tuple[str, ...]
    cut: tuple[str, ...]
    first: int


class GroupScan:
    """Relative output errors of one group's removals on `data`, group after group (see the module docstring).

    Args:
        analysis: channel analysis of the (normalised) model.
        data: the samples the errors are measured on.
        repair: "none", "bias" or "ls" (`repair.repair_weights`).
        stats: calibration statistics for the "ls" repair.
        budget: bytes of original values kept between groups (None: `BUDGET`; 0: every group runs from the
            graph inputs).
    """

    def __init__(self, analysis: ChannelAnalysis, data: CalibrationData, repair: str = "none",
                 stats: CalibrationStats | None = None, budget: int | None = None) -> None:
        self.analysis = analysis
        self.data = data.for_model(analysis.graph.model)
        self.repair = repair
        self.stats = stats
        self.budget = BUDGET if budget is None else budget
        graph = analysis.graph
        self.model = graph.model
        self.nodes = list(self.model.graph.node)
        self.inits = {t.name: t for t in self.model.graph.initializer}
        self.inputs = [vi.name for vi in self.model.graph.input if vi.name not in self.inits]
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.last_use: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for t in n.input:
                if t in self.producer:
                    self.last_use[t] = i
        self.readers: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for t in set(n.input):
                if t:
                    self.readers.setdefault(t, []).append(i)
        self.consumers: list[Consumer] = consumers(graph)
        self.held: dict[str, np.ndarray] = {}  # tensor -> its original values, [samples, *shape]
        self.outputs = [o.name for o in self.model.graph.output]
        self._reference: tuple[list[list[np.ndarray]], float] | None = None
        self._regions: dict[int, Region] = {}

    # ---- the measurement ----------------------------------------------------------------------------
    def errors(self, group: ChannelGroup, removals: list[np.ndarray | None]) -> Iterator[float]:
        """Per entry of `removals` (channel indices of `group`, or None: nan), the relative L2 error of every
        output (`sensitivity.relative_error`) with only those channels removed and the readers repaired."""
        region = self.region(group)
        reference, den = self.reference()
        if not region.outputs or all(removal is None for removal in removals):
            for removal in removals:
                yield float("nan") if removal is None else 0.0
            return
        cached = self._advance(region)
        sources = [t for t in region.cut if t in self.held or t in self.inputs] if cached else list(self.inputs)
        sub = self._submodel(self._between(region.outputs, set(sources)), sources, region.outputs, region)
        sess = _session(sub)
        names = {i.name for i in sess.get_inputs()}
        which = [self.outputs.index(o) for o in region.outputs]
        for removal in removals:
            if removal is None:
                yield float("nan")
                continue
            num = 0.0
            for ref, got in zip(reference, self._runs(sess, names, region.outputs, self._edited(group, removal, region, names))):
                num += sum(float(((ref[k].astype(np.float64) - g.astype(np.float64)) ** 2).sum()) for k, g in zip(which, got))
            yield math.sqrt(num / max(den, 1e-30))

    def reference(self) -> tuple[list[list[np.ndarray]], float]:
        """Every original output per sample, and their sum of squares (the error's denominator); computed once.

        With the graph optimisations the reference and the measurements round differently where the fed
        initializers keep a node from being fused (ResNet-50: outputs within 3e-7 relative of each other, as
        the optimised and plain whole models are); the error of a removal moves by far less (the rounding is
        uncorrelated with what the removal changes), as the physically pruned model's rounding moves it.
        """
        if self._reference is None:
            sess = _session(self.model)
            feeds = {i.name for i in sess.get_inputs()}
            outputs = list(in_order(lambda i: sess.run(self.outputs, {k: v for k, v in self.data.sample(i).items()
                                                                      if k in feeds}), range(self.data.n)))
            den = sum(float((r.astype(np.float64) ** 2).sum()) for out in outputs for r in out)
            self._reference = (outputs, den)
        return self._reference

    def _runs(self, sess, names: set[str], outputs: tuple[str, ...], params: dict[str, np.ndarray]
              ) -> Iterator[list[np.ndarray]]:
        """The session's outputs per sample, fed the held values, the graph inputs and `params`; `AT_ONCE`
        samples run at once (`_session`)."""
        def run(i: int) -> list[np.ndarray]:
            feed = {k: v for k, v in self.data.sample(i).items() if k in names}
            feed.update({t: self.held[t][i] for t in names if t in self.held})
            feed.update(params)
            return sess.run(list(outputs), feed)

        yield from in_order(run, range(self.data.n))

    # ---- what a removal changes ---------------------------------------------------------------------
    def region(self, group: ChannelGroup) -> Region:
        """The initializers removing any channels of `group` (and repairing) can change, and what they reach."""
        if group.id not in self._regions:
            self._regions[group.id] = self._region(group)
        return self._regions[group.id]

    def _region(self, group: ChannelGroup) -> Region:
        removed = self.analysis.removed_positions(group.labels)
        fed = {ref.tensor for ref in removed if ref.tensor in self.inits and _is_float(self.inits[ref.tensor])}
        biases: dict[int, str] = {}
        if self.repair != "none":
            for c in self.consumers:
                if DimRef(c.weight, c.in_axis) not in removed:
                    continue
                index = self.producer[c.node.output[0]]
                # what `repair.repair_weights` may write: the layer's own initializers and those of the node
                # reading its output (a BatchNorm's mean and variance, an Add's constant)
                for k in [index, *self.readers.get(c.node.output[0], [])]:
                    fed.update(t for t in self.nodes[k].input if t in self.inits and _is_float(self.inits[t]))
                if c.kind in ("conv", "gemm") and not (len(c.node.input) > 2 and c.node.input[2]):
                    biases[index] = f"{c.node.output[0]}::repair_bias"
        dirty = set(fed)
        changed = []
        for i, n in enumerate(self.nodes):
            if i in biases or any(t in dirty for t in n.input):
                changed.append(i)
                dirty.update(o for o in n.output if o)
        outputs = tuple(o.name for o in self.model.graph.output if self.producer.get(o.name, -1) in set(changed))
        nodes = self._between(outputs, set(), within=set(changed))
        produced = {o for i in nodes for o in self.nodes[i].output}
        cut = dict.fromkeys(t for i in nodes for t in self.nodes[i].input
                            if t and t not in produced and t not in self.inits)
        return Region(tuple(sorted(fed)), biases, outputs, tuple(cut), min(nodes, default=len(self.nodes)))

    def _edited(self, group: ChannelGroup, removal: np.ndarray, region: Region, names: set[str]
                ) -> dict[str, np.ndarray]:
        """The session inputs for `removal`: each fed initializer repaired (`repair.repair_weights`) and then
        masked (`rewrite.silence`, as `rewrite.apply_mask` masks), each added bias the repair's (masked on the
        removed outputs, as `repair.add_bias_delta` masks) or zeros."""
        from onnxprune.repair import repair_weights

        labels = PruningPlan({group.id: np.sort(removal)}).labels(self.analysis)
        removed = self.analysis.removed_positions(labels)
        repaired = None
        if self.repair != "none":
            out, _ = repair_weights(self.analysis, labels, self.repair, self.stats)
            repaired = None if out is self.model else out
        protos = {t.name: t for t in repaired.graph.initializer} if repaired is not None else {}
        cuts: dict[str, list[tuple[int, np.ndarray]]] = {}
        for ref, pos in removed.items():
            cuts.setdefault(ref.tensor, []).append((ref.axis, pos))
        params = {}
        for t in region.fed:
            if t not in names:
                continue
            value = tensor_array(protos[t]) if t in protos else self._original(t)
            params[t] = silence(value, cuts[t], self.analysis.roles.get(t)) if t in cuts else value
        for i, b in region.biases.items():
            if b not in names:
                continue
            node = repaired.graph.node[i] if repaired is not None else None
            added = node.input[2] if node is not None and len(node.input) > 2 and node.input[2] not in self.inits else ""
            if not added:
                params[b] = np.zeros(self._bias_size(i), self._bias_dtype(i))
                continue
            value = np.array(tensor_array(protos[added]))
            gone = removed.get(DimRef(self._consumer(i).weight, self._consumer(i).out_axis))
            if gone is not None:
                value[gone] = 0
            params[b] = value
        return params

    def _original(self, tensor: str) -> np.ndarray:
        return self.analysis.graph.initializer_value(tensor)

    def _consumer(self, index: int) -> Consumer:
        out = self.nodes[index].output[0]
        return next(c for c in self.consumers if c.node.output[0] == out)

    def _bias_size(self, index: int) -> int:
        c = self._consumer(index)
        return int(c.weight_shape(self.analysis.graph)[c.out_axis])

    def _bias_dtype(self, index: int) -> np.dtype:
        return onnx.helper.tensor_dtype_to_np_dtype(self.inits[self._consumer(index).weight].data_type)

    # ---- original values at the cut -----------------------------------------------------------------
    def _advance(self, region: Region) -> bool:
        """Hold the original values of `region`'s cut (and the frontier before its first node, for the next
        groups), computed from what is held and the graph inputs. False: the cut does not fit the budget."""
        cut = [t for t in region.cut if t in self.producer]
        frontier = [t for t, p in self.producer.items()
                    if p < region.first <= self.last_use.get(t, -1) and t not in cut]
        keep = self._fitting(cut, frontier, {t: self._bytes(t) for t in cut + frontier})
        if keep is None:
            return False
        missing = [t for t in keep if t not in self.held]
        fresh: dict[str, np.ndarray] = {}
        if missing:
            sources = set(self.held) | set(self.inputs)
            sub = self._submodel(self._between(tuple(missing), sources), sorted(sources), tuple(missing))
            sess = _session(sub)
            names = {i.name for i in sess.get_inputs()}
            for i, values in enumerate(self._runs(sess, names, tuple(missing), {})):
                if i == 0:  # the sizes of values without a static shape are known now
                    sizes = {t: self.data.n * v.nbytes for t, v in zip(missing, values)}
                    sizes.update({t: self.held[t].nbytes for t in keep if t in self.held})
                    keep = self._fitting(cut, [t for t in frontier if t in keep], sizes)
                    if keep is None:
                        return False
                    fresh = {t: np.empty((self.data.n, *v.shape), v.dtype) for t, v in zip(missing, values) if t in keep}
                for t, v in zip(missing, values):
                    if t not in fresh:
                        continue
                    if v.shape != fresh[t].shape[1:]:  # a shape that changes with the sample: not cached
                        return False
                    fresh[t][i] = v
        self.held = {t: self.held[t] if t in self.held else fresh[t] for t in keep}
        return True

    def _fitting(self, cut: list[str], frontier: list[str], sizes: Mapping[str, int | None]) -> list[str] | None:
        """What to hold: the cut and the frontier when both fit the budget, else the cut, else None. A size
        not known yet (None) counts as 0 until the first sample tells it."""
        def total(names: list[str]) -> int:
            return sum(sizes.get(t) or 0 for t in names)

        if total(cut + frontier) <= self.budget:
            return cut + frontier
        return cut if total(cut) <= self.budget else None

    def _bytes(self, tensor: str) -> int | None:
        """Bytes of `tensor` over all samples from its static shape, or None."""
        graph = self.analysis.graph
        shape, dtype = graph.shape(tensor), graph.dtype(tensor)
        if shape is None or dtype is None or not all(isinstance(d, int) and d >= 0 for d in shape):
            return None
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(dtype).itemsize
        return self.data.n * int(np.prod([int(d) for d in shape if isinstance(d, int)], dtype=np.int64)) * itemsize

    # ---- sub-models ---------------------------------------------------------------------------------
    def _between(self, targets: tuple[str, ...], sources: set[str], within: set[int] | None = None) -> list[int]:
        """Indices (in graph order) of the nodes computing `targets` from `sources`, initializers and graph
        inputs (only nodes of `within` when given)."""
        return sorted(upstream_nodes(self.nodes, self.producer, targets, stop=sources, within=within))

    def _submodel(self, indices: list[int], sources: list[str], outputs: tuple[str, ...],
                  region: Region | None = None) -> onnx.ModelProto:
        """The nodes `indices` computing `outputs` from `sources` (held values, graph inputs) and, with a
        region, its fed initializers and added biases, all as inputs."""
        g = self.model.graph
        nodes = []
        for i in indices:
            node = onnx.NodeProto()
            node.CopyFrom(self.nodes[i])
            if region is not None and i in region.biases:
                while len(node.input) < 3:
                    node.input.append("")
                node.input[2] = region.biases[i]
            nodes.append(node)
        reads = {t for n in nodes for t in n.input if t}
        produced = {o for n in nodes for o in n.output}
        fed = set(region.fed) if region is not None else set()
        given = {vi.name: vi for vi in g.input}
        inputs = []
        for t in sources:
            if t not in reads or t in produced:
                continue
            if t in given:
                inputs.append(given[t])
            else:
                held = self.held[t]
                elem = onnx.helper.np_dtype_to_tensor_dtype(held.dtype)
                inputs.append(onnx.helper.make_tensor_value_info(t, elem, held.shape[1:]))
        for t in sorted(fed & reads):
            inputs.append(onnx.helper.make_tensor_value_info(t, self.inits[t].data_type, list(self.inits[t].dims)))
        if region is not None:
            for i, b in region.biases.items():
                if b in reads:
                    elem = self.inits[self._consumer(i).weight].data_type
                    inputs.append(onnx.helper.make_tensor_value_info(b, elem, [self._bias_size(i)]))
        graph = onnx.helper.make_graph(
            nodes, g.name, inputs, [onnx.helper.make_empty_tensor_value_info(t) for t in outputs],
            [t for t in g.initializer if t.name in reads and t.name not in fed])
        out = onnx.helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        out.functions.extend(self.model.functions)
        return out


def _session(model: onnx.ModelProto):
    """A session for the scan's runs: one onnxruntime thread, `AT_ONCE` samples at once (`concurrency`). Batch-1
    runs of a few downstream layers have short parallel sections; one thread per run also makes the errors the
    same on every machine (an intra-op thread count that follows the cores could round them differently).
    EfficientNet-Lite0, obs + seq + knapsack, 256 samples at 224x224, 2 quiet cores: 69.1 -> 62.6 s end to end
    (CIFAR ResNet20, 2,000 samples: 30.6 -> 28.0 s), the pruned weights bit-identical to the 2-thread runs'."""
    return session(model, optimize=OPTIMIZE, spin=False, threads=1 if AT_ONCE > 1 else None)


def _is_float(tensor: onnx.TensorProto) -> bool:
    return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).kind == "f"
