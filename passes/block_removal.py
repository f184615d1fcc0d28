"""Whole-block removal (ShortGPT / BlockPruner style): drop the residual blocks that matter least.

A *residual block* is an ``Add(skip, branch)`` whose branch is computed from ``skip`` alone and used
nowhere else. Both halves are questions about the dependency graph `ModelGraph.nx`:

- *computed from skip alone*: ``skip`` dominates ``branch`` (`ModelGraph.dominates`, from networkx's
  immediate dominators with a virtual source feeding every graph input): every run-time path to the branch
  passes through the skip, so walking back from ``branch`` without crossing ``skip`` meets only the branch's
  own nodes and constants. That walk (`ModelGraph.ancestors`) gives the branch's nodes.
- *used nowhere else*: no tensor the branch's nodes produce is a graph output or read by a node outside
  the branch other than the Add (a subgraph reading it counts). This is checked directly on the branch's
  out-edges rather than by post-dominance, which would have to ignore readers that lead to no output.

Removing the block replaces the Add's output by ``skip`` (the branch becomes dead code). In a transformer
each attention sub-block and each MLP sub-block is one; in a ResNet each identity-skip stage is one.

Start reading at `find_blocks`, then `BlockRemovalPass.call`: on calibration inputs, each candidate is
removed in turn and scored by how much the model's outputs change (``metric="output"``, BlockPruner's
criterion: relative L2 change of every output) or, with one run, by ShortGPT's *block influence*
``1 - cos(skip, add_output)`` averaged over rows (``metric="influence"``). The lowest-scoring block is
dropped; with ``num_blocks > 1`` the remaining blocks are rescored after each removal (greedy, as in
BlockPruner). The pass records what it removed in ``metadata_props["onnxprune.block_removal"]``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from onnxprune.canonical import remove_dead_code
from onnxprune.errors import UsageError
from onnxprune.graph import ModelGraph
from onnxprune.passmanager import Pass, PassResult
from onnxprune.shape_inference import infer_shapes
from onnxprune.version import __version__

METADATA_KEY = "onnxprune.block_removal"


@dataclass(frozen=True)
class ResidualBlock:
    """One removable block: ``add`` = Add(skip, branch); `nodes` are the branch's node names."""

    add: str
    skip: str
    output: str
    nodes: tuple[str, ...]
    params: int


@dataclass(frozen=True)
class BlockRemovalConfig:
    num_blocks: int = 1
    metric: str = "output"  # output | influence
    samples: int = 4  # random calibration samples when no inputs are given
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_blocks < 0:
            raise UsageError(f"num_blocks must be >= 0, got {self.num_blocks}")
        if self.metric not in ("output", "influence"):
            raise UsageError(f"unknown block metric {self.metric!r} (choose output or influence)")


def find_blocks(model: onnx.ModelProto) -> list[ResidualBlock]:
    """Every Add whose one operand is a self-contained branch computed from the other operand."""
    graph = ModelGraph(model)
    blocks = []
    for index, node in enumerate(graph.nodes):
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        for skip, branch in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            if graph.shape(skip) is None or graph.shape(skip) != graph.shape(node.output[0]):
                continue
            cone = _branch(graph, skip, branch, index)
            if cone:
                params = sum(
                    int(np.prod(graph.shape(i))) for n in cone for i in n.input
                    if graph.is_initializer(i) and graph.dtype(i) in (1, 10, 11, 16)
                )  # fmt: skip
                names = tuple(n.name for n in cone)
                blocks.append(ResidualBlock(node.name, skip, node.output[0], names, params))
                break
    return blocks


def _branch(graph: ModelGraph, skip: str, branch: str, add: int) -> list[onnx.NodeProto]:
    """Nodes (in graph order) computing `branch` from `skip` and constants only, used nowhere else but by the
    Add at index `add`; [] if not a block."""
    if skip == branch or not graph.dominates(skip, branch):
        return []
    cone = sorted(index for kind, index in graph.ancestors(branch, stop=(skip,)) if kind == "op")
    nodes = [graph.nodes[index] for index in cone]
    if not nodes or any(_has_subgraph(n) for n in nodes):  # a subgraph may read anything: never a block
        return []
    inside = {("op", index) for index in cone} | {("op", add)}
    flow = graph.nx
    for index in cone:
        for tensor in flow.successors(("op", index)):
            readers = flow.successors(tensor)
            if flow.nodes[tensor]["graph_output"] or any(reader not in inside for reader in readers):
                return []
    return nodes


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def remove_block(model: onnx.ModelProto, block: ResidualBlock) -> onnx.ModelProto:
    """A copy of `model` with the block's Add bypassed and its branch deleted."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    graph_outputs = {o.name for o in g.output}
    for k, node in enumerate(g.node):
        if node.name == block.add:
            if block.output in graph_outputs:
                g.node[k].CopyFrom(onnx.helper.make_node("Identity", [block.skip], [block.output], name=node.name))
            else:
                del g.node[k]
            break
    if block.output not in graph_outputs:
        for node in g.node:
            for i, name in enumerate(node.input):
                if name == block.output:
                    node.input[i] = block.skip
    remove_dead_code(g)
    kept = {n.name for n in g.node}
    keep_vi = [vi for vi in g.value_info if vi.name != block.output]
    del g.value_info[:]
    g.value_info.extend(vi for vi in keep_vi if any(vi.name in n.output for n in g.node) or vi.name in kept)
    return out


def _relative_change(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    num = sum(float(np.sum((r.astype(np.float64) - g.astype(np.float64)) ** 2)) for r, g in zip(ref, got))
    den = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref)
    return float(np.sqrt(num / max(den, 1e-30)))


class BlockRemovalPass(Pass):
    """Remove the `num_blocks` residual blocks whose removal changes the outputs least.

    Args:
        config: how many blocks, which metric.
        inputs: calibration feeds (a list of input dicts); random feeds when None.
    """

    def __init__(self, config: BlockRemovalConfig | None = None, inputs: list[dict] | None = None) -> None:
        self.config = config or BlockRemovalConfig()
        self.inputs = inputs

    def _feeds(self, model: onnx.ModelProto) -> list[dict]:
        if self.inputs:
            return list(self.inputs)
        from onnxprune.verify import random_inputs

        return [random_inputs(model, seed=self.config.seed + k) for k in range(self.config.samples)]

    def scores(self, model: onnx.ModelProto, blocks: list[ResidualBlock], feeds: list[dict]) -> list[float]:
        from onnxprune.verify import run

        if self.config.metric == "influence":
            probe = onnx.ModelProto()
            probe.CopyFrom(model)
            names = []
            for b in blocks:
                names += [b.skip, b.output]
            existing = {o.name for o in probe.graph.output}
            probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in existing)
            order = [o.name for o in probe.graph.output]
            totals = np.zeros(len(blocks))
            for feed in feeds:
                values = dict(zip(order, run(probe, feed)))
                for k, b in enumerate(blocks):
                    x = values[b.skip].reshape(-1, values[b.skip].shape[-1]).astype(np.float64)
                    y = values[b.output].reshape(-1, values[b.output].shape[-1]).astype(np.float64)
                    cos = np.sum(x * y, 1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-30)
                    totals[k] += float(np.mean(1 - cos))
            return list(totals / len(feeds))
        reference = [run(model, feed) for feed in feeds]
        out = []
        for b in blocks:
            candidate = remove_block(model, b)
            out.append(float(np.mean([_relative_change(ref, run(candidate, f)) for ref, f in zip(reference, feeds)])))
        return out

    def call(self, model: onnx.ModelProto) -> PassResult:
        feeds = self._feeds(model)
        removed, history = [], []
        current = model
        for _ in range(self.config.num_blocks):
            blocks = find_blocks(current)
            if not blocks:
                break
            scores = self.scores(current, blocks, feeds)
            best = int(np.argmin(scores))
            history.append({b.add: round(s, 6) for b, s in zip(blocks, scores)})
            removed.append({"add": blocks[best].add, "params": blocks[best].params, "score": scores[best]})
            current = remove_block(current, blocks[best])
        if not removed:
            return PassResult(model, False, {"removed": [], "scores": history})
        del current.graph.value_info[:]
        current = infer_shapes(current)
        record = {"tool": f"onnxprune {__version__}", "config": asdict(self.config), "removed": removed}
        for prop in current.metadata_props:
            if prop.key == METADATA_KEY:
                prop.value = json.dumps(record)
                break
        else:
            current.metadata_props.add(key=METADATA_KEY, value=json.dumps(record))
        return PassResult(current, True, {"removed": removed, "scores": history})
