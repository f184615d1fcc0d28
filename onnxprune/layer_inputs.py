"""Layer inputs of a model on calibration samples, wave after wave, resumed from cached frontier tensors.

Sequential repair (`repair.repair_sequential`) fits the consumers of a model in waves through depth: wave
k needs the inputs of its consumers on every calibration sample, in the original model and in the pruned
model whose earlier waves are already repaired. Running each wave from the graph inputs costs a forward
pass per wave and sample (measured: ~240 s of the ~270 s of an `obs` + `seq` prune of EfficientNet-Lite0,
256 samples at 224x224). A tensor upstream of wave k's inputs depends only on weights of waves before k,
which never change again, so its values are final: `FrontierRunner` keeps, after each wave, the tensors
that cross the cut between the nodes run so far and the rest (the *frontier*, typically one or two block
outputs), for every sample, and the next wave runs only the nodes between that frontier and its own
inputs. The cache holds at most `budget` bytes; when the frontier does not fit, the tensors kept (frontier
tensors, in float16 or not, and tensors cached before) are those that leave the least recomputation
(`FrontierRunner._cheapest`); whatever is not kept is recomputed from earlier cached tensors or the graph
inputs, so the result never depends on the budget. An array the cache drops is reused for a new tensor of
its shape (`FrontierRunner._allocate`).
The sessions run with onnxruntime's graph optimisations (`OPTIMIZE`: BatchNorm folded, activations fused;
~30% less CPU on Lite0; layer inputs then differ from the unoptimised graph's by float32 rounding).

Start reading at `FrontierRunner.run`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import numpy as np
import onnx

from onnxprune.calibration import CalibrationData
from onnxprune.concurrency import in_order
from onnxprune.graph import ModelGraph
from onnxprune.metrics import node_macs
from onnxprune.onnx_utils import has_subgraph, light_copy, upstream_nodes
from onnxprune.verify import session

__all__ = ["FrontierRunner", "truncated"]

# Bytes of cached frontier tensors per model (all samples). While a run refreshes the cache the old and the new
# tensors are both alive, and sequential repair holds two runners: up to 4 x the budget (with the original model's
# rows drawn once, `dense_rows`, only the pruned model's runner runs, with twice the budget: the same bound). ResNet-50 at 224x224, 256
# samples, peaked at 1,999 MiB (2.10 GB) with 320 MiB, in the statistics of a wave reading the residual stream,
# and at 1,911 MiB (2.003 GB) with 256 (bench/repair_speed_results.txt); 224 MiB still holds layer3's stream
# (196 MiB) in float32 and layer2's in float16. Below that the cheapest choice degrades fast: at 192 MiB layer2's
# stream no longer fits and the seq runners' multiply-adds per sample go 18.9 G -> 44.8 G.
DEFAULT_BUDGET = 224 << 20
# A float32 frontier tensor that does not fit the budget is cached in float16 when that fits: ResNet-50 at
# 224x224 with 256 samples holds a layer2/layer3 residual stream (411 / 205 MB in float32) only so, and without it
# every wave there ran both models from the graph inputs (81% of the seq repair's time, py-spy). float16 keeps
# 11 bits: the next nodes' inputs change by ~5e-4 relative, far below what the fits resolve. onnxruntime casts
# (a Cast node in the sub-model each way): numpy's conversions ran at 0.25-1.3 GB/s and were 15% of ResNet-50's
# whole prune (py-spy); the values are the same bits (tests/test_layer_inputs.py).
HALF_CACHE = True
OPTIMIZE = True  # onnxruntime graph optimisations (BatchNorm folded into Conv, fused activations)


def truncated(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """`model` computing only `outputs` (the nodes they need), which become its graph outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = list(out.graph.node)
    if any(has_subgraph(n) for n in nodes):
        keep_nodes = nodes  # subgraphs read outer tensors implicitly: keep everything
    else:
        need, keep_nodes = set(outputs), []
        for n in reversed(nodes):
            if any(o in need for o in n.output):
                keep_nodes.append(n)
                need.update(i for i in n.input if i)
        keep_nodes.reverse()  # initializers stay (some models also list them as graph inputs)
    kept = [onnx.NodeProto() for _ in keep_nodes]
    for dst, src in zip(kept, keep_nodes):
        dst.CopyFrom(src)
    del out.graph.node[:]
    out.graph.node.extend(kept)
    del out.graph.output[:]
    for name in outputs:
        out.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return out


class FrontierRunner:
    """Runs successive prefixes of one model's graph over the calibration samples, resuming from a cache.

    The model passed to each `run` may differ in initializer values (and in added bias initializers) from
    the one before, never in its nodes, and only downstream of the tensors the earlier runs asked for:
    exactly what sequential repair does to the pruned model.

    Args:
        data: the calibration samples.
        budget: bytes of cached tensors (all samples) kept between runs; 0 disables the cache; None:
            `DEFAULT_BUDGET`.
        threads: onnxruntime intra-op threads of its sessions (None: onnxruntime's default, one per core);
            1 where two runners run at once (`repair_stats.sequential_stats`).
        concurrent: samples run at once (after the first), each on `threads`, yielded in order.
    """

    def __init__(self, data: CalibrationData, budget: int | None = None, threads: int | None = None,
                 concurrent: int = 1) -> None:
        self.data = data
        self.threads = threads
        self.concurrent = concurrent
        self.budget = DEFAULT_BUDGET if budget is None else budget
        self.cache: dict[str, np.ndarray] = {}  # tensor -> [samples, *its shape], float16 for some float32 tensors
        self.dtypes: dict[str, np.dtype] = {}  # tensor -> its dtype in the model (what the cache is fed back as)
        self.done: set[int] = set()  # indices of nodes whose outputs are final and computed at least once
        self.costs: list[float] | None = None  # per node, its relative cost (`node_costs`; the nodes never change)

    def run(self, model: onnx.ModelProto, names: list[str]) -> Iterator[dict[str, np.ndarray]]:
        """Per sample (in order), the values of `names`; the frontier cache is refreshed on the way."""
        self.data = self.data.for_model(model)  # a fixed batch: B inputs a run
        nodes = list(model.graph.node)
        if self.budget <= 0 or any(has_subgraph(n) for n in nodes):
            yield from self._run_plain(model, names)
            return
        producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
        needed = self._needed(nodes, producer, names)
        done = self.done | needed
        wanted = self._frontier(nodes, producer, needed, done)
        candidates = [t for t in wanted if t not in self.cache and t not in names]
        out_names = list(names) + candidates  # sample 0 computes every candidate, to learn their sizes
        sub, cached_inputs = self._submodel(model, nodes, needed, out_names)
        sess = session(sub, optimize=OPTIMIZE, spin=False, threads=self.threads)
        feeds = {i.name for i in sess.get_inputs()}
        n = self.data.n
        keep: list[str] = []
        store: dict[str, np.dtype] = {}  # tensor -> the dtype it is cached in after this run
        fresh: dict[str, np.ndarray] = {}
        halved: list[str] = []  # fresh tensors stored in float16 that the session itself casts (after sample 0)

        def feed_of(i: int) -> dict[str, np.ndarray]:
            feed = {k: v for k, v in self.data.sample(i).items() if k in feeds and k not in cached_inputs}
            # np.asarray: a cached scalar (a shape value: GPT-2's sequence length) stays a 0-d array for onnxruntime
            feed.update({_half_name(t) if self._is_halved(t) else t: np.asarray(self.cache[t][i]) for t in cached_inputs})
            return feed

        def later(i: int) -> dict[str, np.ndarray]:
            """Sample i > 0: its values of `names`, its fresh tensors written into the cache (its own index only,
            so runs of different samples may overlap)."""
            values = dict(zip(out_names, sess.run(out_names, feed_of(i))))
            for t, arr in fresh.items():
                arr[i] = values[_half_name(t) if t in halved else t]
            return {t: values[t] for t in names}

        if n:  # sample 0 decides what is cached (and may rebuild the session)
            values = dict(zip(out_names, sess.run(out_names, feed_of(0))))
            stored = {t: (self.cache[t].dtype if t in self.cache else values[t].dtype) for t in wanted
                      if t in self.cache or t in values}
            ordered = [t for t in wanted if t in stored]
            elements = {t: self.cache[t][0].size if t in self.cache else values[t].size for t in stored}
            if self.costs is None:
                self.costs = node_costs(model)
            chosen = self._cheapest(ordered, stored, elements, nodes, producer)
            store = chosen if chosen is not None else self._within_budget(ordered, stored, elements)
            keep = list(store)
            fresh = self._allocate({t: (n,) + values[t].shape for t in keep if t not in self.cache}, store,
                                   set(keep) | set(names))
            self.dtypes.update({t: values[t].dtype for t in fresh})
            halved = [t for t, arr in fresh.items() if arr.dtype == np.float16 and values[t].dtype == np.float32]
            out_names = list(names) + [t for t in fresh if t not in names and t not in halved]
            if halved and n > 1:
                # onnxruntime's Cast: ~10x numpy's float32 -> float16 conversion, the same rounding (to
                # nearest even); numpy's ran at 0.25-1.3 GB/s, most of this runner's own time on ResNet-50
                sub = _with_half_outputs(sub, halved)
                sess = None  # one session of this sub-model alive at a time (its weights: up to 60 MB)
                sess = session(sub, optimize=OPTIMIZE, spin=False, threads=self.threads)
                out_names += [_half_name(t) for t in halved]
            else:
                out_names += [t for t in halved if t not in names]
                halved = []
            for t, arr in fresh.items():
                arr[0] = values[t]
            yield {t: values[t] for t in names}
        # `concurrent` samples in flight, yielded in order: the caller works on sample i while i + 1 runs
        yield from in_order(later, range(1, n), self.concurrent)
        self.cache = {t: self.cache[t] if t in self.cache else fresh[t] for t in keep}
        self.done = done

    def _allocate(self, shapes: dict[str, tuple[int, ...]], store: dict[str, np.dtype], busy: set[str]
                  ) -> dict[str, np.ndarray]:
        """Arrays for the tensors cached fresh by this run: the memory of a cached array this run drops (not in
        `busy`: kept, or asked for and so yielded) with as many bytes per sample is reused (viewed as the new
        shape and dtype), else a new array. Exact: sample i of the old tensor is fed to the run before sample
        i of the new one is written over it, and samples occupy the same bytes in both.

        ResNet-50 at 224x224, 256 samples: each wave of a residual stage reads the stream cached by the one
        before and caches the next block's stream, both 196 MiB (float16): reusing the array keeps one per
        model instead of two; layer2's stream in float16 and layer3's in float32 have the same bytes.
        """
        spare = [t for t in self.cache if t not in busy and self.cache[t].flags.c_contiguous]
        out = {}
        for t, shape in shapes.items():
            per_sample = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(store[t]).itemsize
            match = next((s for s in spare if self.cache[s][0].nbytes == per_sample), None)
            if match is not None:
                spare.remove(match)
                out[t] = self.cache[match].reshape(-1).view(np.uint8).view(store[t]).reshape(shape)
            else:
                out[t] = np.empty(shape, store[t])
        return out

    def _is_halved(self, tensor: str) -> bool:
        """Is cached `tensor` stored in float16 although the model computes it in float32?"""
        return self.cache[tensor].dtype == np.float16 and np.dtype(self.dtypes[tensor]) == np.float32

    def _within_budget(
        self, ordered: list[str], dtypes: dict[str, np.dtype], elements: dict[str, int]
    ) -> dict[str, np.dtype]:
        """The tensors of `ordered` (nearest the cut first) that fit the budget together, with the dtype each is
        stored in: its own, or float16 for a float32 tensor that fits only so (`HALF_CACHE`)."""
        kept: dict[str, np.dtype] = {}
        total = 0
        n = self.data.n
        half = {t: np.dtype(np.float16) if HALF_CACHE and np.dtype(dtypes[t]) == np.float32 else np.dtype(dtypes[t])
                for t in ordered}
        if sum(n * elements[t] * half[t].itemsize for t in ordered) <= self.budget < sum(
                n * elements[t] * np.dtype(dtypes[t]).itemsize for t in ordered):
            # all of them in float16 rather than the nearest in float32 and a farther one dropped: a missing
            # frontier tensor makes the next wave recompute from far upstream (ResNet-50's layer3.0: 84 nodes)
            return half
        for t in ordered:
            own = np.dtype(dtypes[t])
            options = [own] + ([np.dtype(np.float16)] if HALF_CACHE and own == np.float32 else [])
            for dtype in options:
                size = n * elements[t] * dtype.itemsize
                if total + size <= self.budget:
                    kept[t] = dtype
                    total += size
                    break
        return kept

    def _cheapest(
        self, ordered: list[str], dtypes: dict[str, np.dtype], elements: dict[str, int], nodes: list[onnx.NodeProto],
        producer: dict[str, int],
    ) -> dict[str, np.dtype] | None:
        """What to cache when not all of the frontier `ordered` fits: the tensors (frontier tensors in their
        own dtype or float16, and tensors of the current cache kept as they are) within the budget that leave
        the least recomputation of the whole frontier (`node_costs` of the nodes between what is cached and
        the frontier), then the fewest float16 copies, then the fewest bytes. None: every frontier tensor fits
        in its own dtype, or too many choices (`_within_budget` decides).

        ResNet-50 at 224x224, 256 samples: a stream and the branch beside it do not fit together in layer2
        and layer3 (nor layer1's stream alone), and keeping the tensors nearest the cut made the next waves
        recompute the stream from far upstream, the stem included (the seq runners' conv multiply-adds per
        sample: 26.9 G, with 8.2 G for one forward pass of both models).
        """
        n = self.data.n
        if sum(n * elements[t] * np.dtype(dtypes[t]).itemsize for t in ordered) <= self.budget:
            return None
        options: list[tuple[str, list[np.dtype | None]]] = []
        for t in ordered:
            own = np.dtype(dtypes[t])
            halves = HALF_CACHE and t not in self.cache and own == np.float32
            options.append((t, [own, np.dtype(np.float16), None] if halves else [own, None]))
        # tensors cached before: kept as they are or dropped (not converted to float16: the float32 array and its
        # copy alive at once were ResNet-50's seq peak, +196 MiB in layer4.0's 3x3 conv wave)
        options += [(t, [self.cache[t].dtype, None]) for t in self.cache if t not in dtypes]
        if np.prod([len(o) for _, o in options], dtype=np.float64) > MAX_CHOICES:
            return None
        size = {t: n * (elements[t] if t in elements else self.cache[t][0].size) for t, _ in options}
        costs = self.costs or [1.0] * len(nodes)
        best: tuple[tuple[float, int, int], dict[str, np.dtype]] | None = None
        for pick in itertools.product(*(o for _, o in options)):
            chosen = {t: d for (t, _), d in zip(options, pick) if d is not None}
            total = sum(size[t] * d.itemsize for t, d in chosen.items())
            if total > self.budget:
                continue
            halved = sum(1 for t, d in chosen.items() if d == np.float16 and np.dtype(self.dtypes.get(t, dtypes.get(t, d))) != d)
            key = (_recompute(ordered, set(chosen), nodes, producer, costs), halved, total)
            if best is None or key < best[0]:
                best = (key, chosen)
        return best[1] if best is not None else {}

    def _run_plain(self, model: onnx.ModelProto, names: list[str]) -> Iterator[dict[str, np.ndarray]]:
        sess = session(truncated(model, names), optimize=OPTIMIZE, spin=False, threads=self.threads)
        feeds = {i.name for i in sess.get_inputs()}
        for i in range(self.data.n):
            sample = self.data.sample(i)
            yield dict(zip(names, sess.run(names, {k: v for k, v in sample.items() if k in feeds})))

    def _needed(self, nodes: list[onnx.NodeProto], producer: dict[str, int], names: list[str]) -> set[int]:
        """Indices of the nodes between the cached tensors (or graph inputs) and `names`."""
        return upstream_nodes(nodes, producer, names, stop=self.cache)

    def _frontier(
        self, nodes: list[onnx.NodeProto], producer: dict[str, int], needed: set[int], done: set[int]
    ) -> list[str]:
        """Final values (from done nodes) that a node not yet run reads and that are cached or computed
        now, nearest the cut first: what is worth caching after this run."""
        available = set(self.cache) | {o for i in needed for o in nodes[i].output if o}
        wanted: dict[str, int] = {}
        for j, node in enumerate(nodes):
            if j in done:
                continue
            for t in node.input:
                if t in available and t in producer and producer[t] in done:
                    wanted[t] = producer[t]
        return sorted(wanted, key=lambda t: -wanted[t])

    def _submodel(
        self, model: onnx.ModelProto, nodes: list[onnx.NodeProto], needed: set[int], outputs: list[str]
    ) -> tuple[onnx.ModelProto, list[str]]:
        """The needed nodes as a model whose inputs are the cached tensors (and graph inputs) they read."""
        order = sorted(needed)
        produced = {o for i in order for o in nodes[i].output}
        inits = {t.name for t in model.graph.initializer}
        reads: list[str] = []
        for i in order:
            reads.extend(t for t in nodes[i].input if t and t not in produced and t not in reads)
        for t in outputs:  # an asked-for tensor that is itself cached or a graph input passes through
            if t not in produced and t not in reads:
                reads.append(t)
        cached_inputs = [t for t in reads if t in self.cache]
        graph_inputs = [vi for vi in model.graph.input if vi.name in reads and vi.name not in inits]
        elem = onnx.helper.np_dtype_to_tensor_dtype
        inputs = list(graph_inputs)
        casts = []  # a float16-cached float32 tensor is fed as it is stored and cast back by onnxruntime
        for t in cached_inputs:
            if self._is_halved(t):
                inputs.append(onnx.helper.make_tensor_value_info(_half_name(t), onnx.TensorProto.FLOAT16,
                                                                 self.cache[t].shape[1:]))
                casts.append(onnx.helper.make_node("Cast", [_half_name(t)], [t], name=f"{_half_name(t)}_cast",
                                                   to=onnx.TensorProto.FLOAT))
            else:
                inputs.append(onnx.helper.make_tensor_value_info(t, elem(self.dtypes[t]), self.cache[t].shape[1:]))
        sub = onnx.helper.make_graph(
            casts + [nodes[i] for i in order],
            model.graph.name,
            inputs,
            [onnx.helper.make_empty_tensor_value_info(t) for t in outputs],
            [t for t in model.graph.initializer if t.name in reads],
        )
        out = onnx.helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
        out.functions.extend(model.functions)
        return out, cached_inputs


# `FrontierRunner._cheapest` tries every combination of choices up to this many (a frontier of one to three tensors
# and a cache of one to three: at most 3^3 x 2^3 = 216 on ResNet-50), else the greedy `_within_budget` decides.
MAX_CHOICES = 512


def node_costs(model: onnx.ModelProto) -> list[float]:
    """Per node of `model`, a relative cost: its multiply-adds (`metrics.node_macs`: Conv, Gemm, MatMul), else
    its output elements; 1 where a shape is unknown. Shapes from onnx's shape inference on the weightless copy
    `onnx_utils.light_copy` (batch and symbolic sizes: 1)."""
    g = model.graph
    light = light_copy(model)
    with contextlib.suppress(Exception):  # shapes are only a cost estimate: without them every node costs 1
        light = onnx.shape_inference.infer_shapes(light)
    graph = ModelGraph(light)
    costs = []
    for node in g.node:
        out = graph.shape(node.output[0]) if node.output else None
        macs = node_macs(graph, node)
        elements = np.prod([d if isinstance(d, int) and d > 0 else 1 for d in out], dtype=np.float64) if out else 1.0
        costs.append(float(macs) if macs else float(elements))
    return costs


def _recompute(frontier: list[str], cached: set[str], nodes: list[onnx.NodeProto], producer: dict[str, int],
               costs: list[float]) -> float:
    """The cost of computing every tensor of `frontier` from the `cached` tensors and the graph inputs."""
    seen: set[int] = set()
    stack = [producer[t] for t in frontier if t not in cached and t in producer]
    total = 0.0
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        total += costs[i]
        stack.extend(producer[x] for x in nodes[i].input if x and x not in cached and x in producer)
    return total


def _half_name(tensor: str) -> str:
    """The name of `tensor`'s float16 copy in a runner's sub-model (an input fed from, or an output stored to,
    the cache)."""
    return f"{tensor}::float16"


def _with_half_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """`model` also computing a float16 copy (`_half_name`) of each of `tensors` (float32 values it computes)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in tensors:
        out.graph.node.append(onnx.helper.make_node("Cast", [t], [_half_name(t)], name=f"{_half_name(t)}_cast",
                                                    to=onnx.TensorProto.FLOAT16))
        out.graph.output.append(onnx.helper.make_empty_tensor_value_info(_half_name(t)))
    return out
