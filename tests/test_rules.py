"""Every channel rule, one row each in `TABLE`: a tiny model around the operator, checked three ways.

Adding an operator = one rule file + one row here (`test_every_registered_op_has_a_row` fails without it).
For each (row, op type):

* coupling: the analysis finds groups of the expected sizes, or the operator is a barrier;
* dead-channel equivalence: every group, half its channels silenced in the original (`rewrite.apply_mask`)
  vs removed (`rewrite.apply_plan`), gives the same outputs in onnxruntime with optimisations off
  (`verify.dead_channel_check`);
* facts (`rules.facts.op_facts`): ``same_shape`` - the output has the input's shape and type;
  ``zero_preserving`` - with one channel silenced, the operator's output channel is exactly zero.

The models live in `rule_models.py`. Most rows put the operator between two 1x1 convolutions
(`sandwich`), so the channels it passes have a producer and a consumer holding weights:
``x -> Conv(3->C) -> t -> [op] -> u -> Conv(->2) -> y``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from conftest import canonical
from onnx import helper
from rule_models import (
    C,
    along,
    arg_reduce,
    attention,
    broadcasting,
    clip,
    contrib,
    conv_variant,
    crop_channels,
    cumsum,
    depth_space,
    depth_space_zero_check,
    einsum,
    fill_like,
    gather,
    gather_elements,
    gather_nd,
    gather_sizes,
    group_norm_torch,
    if_branches,
    if_constant_branch,
    integer_operator,
    layout,
    linear,
    loop_carry,
    non_max_suppression,
    nonzero,
    norm,
    norm_over_channels,
    pad,
    pad_channels,
    pad_channels_attribute,
    pad_residual,
    passthrough,
    pool,
    quantized,
    range_positions,
    recurrent,
    reduce,
    reduce_channels,
    resize,
    resize_to_run_time_sizes,
    roi_align,
    rotary,
    sandwich,
    scan_rows,
    scatter_levels,
    shape_reader,
    top_k,
    unary,
    unsqueeze,
    zero_channels,
    zero_state,
)

from onnxprune.channels import ChannelAnalysis, analyze
from onnxprune.graph import ModelGraph
from onnxprune.onnx_utils import all_graphs
from onnxprune.rewrite import apply_mask
from onnxprune.rules import RULES, ChannelRule
from onnxprune.rules.base import RuleRegistry
from onnxprune.rules.elementwise import BINARY, UNARY
from onnxprune.rules.facts import op_facts
from onnxprune.verify import dead_channel_check, random_inputs, run, session


# ---- the table --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One rule (or one variant of it): the op types it covers, at which opset, and what the analysis finds.

    `groups` are the sorted sizes of the groups the analysis finds; None means the operator is a barrier
    (then `zero_check` checks a declared zero-preserving fact directly, as no group passes the operator).
    """

    name: str
    ops: tuple[str, ...]
    build: Callable[[str, int], onnx.ModelProto]
    groups: tuple[int, ...] | None
    opset: int = 21
    zero_check: Callable[[str, int], None] | None = None
    tolerance: float = 1e-5
    check_facts: bool = True  # False where the operator does not pass the channel on (reduces it)


POOLS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "MaxRoiPool")  # fmt: skip
REDUCTIONS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")  # fmt: skip
SOFTMAXES = ("Softmax", "LogSoftmax", "Hardmax")

TABLE = [
    Row("unary", UNARY, sandwich(unary), (C,)),
    Row("dropout", ("Dropout",), sandwich(passthrough), (C,)),
    Row("clip", ("Clip",), sandwich(clip), (C,)),
    Row("broadcasting", BINARY, sandwich(broadcasting), (C,)),
    Row("conv", ("Conv",), conv_variant("regular"), (C,)),
    Row("conv depthwise", ("Conv",), conv_variant("depthwise"), (C,)),
    Row("conv grouped", ("Conv",), conv_variant("grouped"), (2,)),
    Row("conv transpose", ("ConvTranspose",), conv_variant("regular"), (3, C)),
    Row("linear", ("Gemm", "MatMul"), linear, (C,)),
    Row("einsum", ("Einsum",), einsum, (C, C)),
    Row("attention 3-D, grouped-query", ("Attention",), attention("3d"), (2,), opset=23),
    Row("attention 4-D heads, grouped-query", ("Attention",), attention("4d"), (2,), opset=23),
    Row("attention 4-D features", ("Attention",), attention("4d-features"), (2, 3), opset=23),
    Row("rotary embedding 3-D", ("RotaryEmbedding",), rotary("3d"), (3,), opset=23),
    Row("rotary embedding 4-D", ("RotaryEmbedding",), rotary("4d"), (3,), opset=23),
    Row("per-channel norms", ("BatchNormalization", "InstanceNormalization"), sandwich(norm), (C,)),
    Row("group norm", ("GroupNormalization",), sandwich(norm), (2,)),
    Row("group norm as torch exports it: reshapes regroup the channels", ("Reshape",), sandwich(group_norm_torch),
        (2,), opset=17),
    Row("layer norm", ("LayerNormalization",), sandwich(norm, rank=3, spatial=5), (C,)),
    Row("rms norm", ("RMSNormalization",), sandwich(norm, rank=3, spatial=5), (C,), opset=23),
    Row("rms norm over the channels", ("RMSNormalization",), norm_over_channels, (C,), opset=23),
    Row("onnxruntime contrib: packed attention", ("Attention",), contrib, (2, 6)),
    Row("onnxruntime contrib: Gelu family", ("Gelu", "QuickGelu", "FastGelu", "BiasGelu"), contrib, (C,)),
    Row("onnxruntime contrib: skip norms", ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"), contrib,
        (C,)),
    Row("pool", POOLS, sandwich(pool), (C,)),
    Row("resize", ("Resize",), sandwich(resize), (C,)),
    Row("resize to sizes read at run time", ("Resize",), sandwich(resize_to_run_time_sizes, spatial="W"), (C,)),
    Row("roi align", ("RoiAlign",), sandwich(roi_align, spatial=4), (C,)),
    Row("upsample", ("Upsample",), sandwich(resize), (C,), opset=9),
    Row("pad", ("Pad",), sandwich(pad), (C,)),
    Row("pad channels", ("Pad",), sandwich(pad_channels), (3, C)),
    Row("pad channels opset 10", ("Pad",), sandwich(pad_channels_attribute), (3, C), opset=10),
    Row("crop channels", ("Pad",), sandwich(crop_channels), (2, C - 2)),
    Row("pad residual", ("Pad",), sandwich(pad_residual), (C, C)),
    Row("reduce", REDUCTIONS, sandwich(reduce), (C,)),
    Row("reduce over channels", ("ReduceSum",), sandwich(reduce_channels), (C,), check_facts=False),
    Row("arg reduce", ("ArgMax", "ArgMin"), sandwich(arg_reduce), (C,)),
    Row("top-k over positions", ("TopK",), sandwich(top_k(-1), spatial=4), ()),
    Row("top-k values only", ("TopK",), sandwich(top_k(-1, read_indices=False), spatial=4), (C,)),
    Row("top-k over the channels", ("TopK",), sandwich(top_k(1, read_indices=False), spatial=4), ()),
    Row("softmax", SOFTMAXES, sandwich(along(-1)), (C,)),
    Row("softmax coerced", SOFTMAXES, sandwich(along(2)), (C,), opset=11),
    Row("layout", ("Reshape", "Flatten", "Transpose", "Squeeze", "Expand", "Tile"), layout, (C,)),
    Row("concat", ("Concat",), layout, (C, C)),
    Row("split", ("Split",), layout, (C // 2, C // 2)),
    Row("slice", ("Slice",), layout, (2, C)),
    Row("unsqueeze", ("Unsqueeze",), unsqueeze, (C,)),
    Row("gather", ("Gather",), gather, (C,)),
    Row("gather read only for its sizes", ("Gather",), gather_sizes, (C,)),
    Row("gather nd", ("GatherND",), gather_nd, (C,)),
    Row("gather elements", ("GatherElements",), gather_elements, (C,)),
    Row("scatter elements, index broadcast to a constant size", ("ScatterElements", "Expand"), scatter_levels(False),
        (C,)),
    Row("scatter elements, index broadcast to a run-time size", ("ScatterElements", "Expand"), scatter_levels(True),
        (C,)),
    Row("nonzero: positions read, no barrier", ("NonZero",), sandwich(nonzero), ()),
    Row("non-max suppression: positions read, no barrier", ("NonMaxSuppression",), sandwich(non_max_suppression), ()),
    Row("shape readers", ("Shape", "Size"), shape_reader, (C,)),
    Row("cumsum", ("CumSum",), sandwich(cumsum), (C,)),
    Row("range", ("Range",), sandwich(range_positions, spatial="W"), (C,)),
    Row("recurrent", ("LSTM", "GRU", "RNN"), recurrent, (3, C)),
    Row("recurrent zero state", ("ConstantOfShape",), zero_state, (3, C)),
    Row("zero fill of a run-time shape", ("ConstantOfShape",), sandwich(fill_like(0.0), spatial="W"), (C,)),
    Row("zero channels concatenated", ("ConstantOfShape",), sandwich(zero_channels, spatial="W"), (2, C)),
    Row("nonzero fill: frozen, not a barrier", ("ConstantOfShape",), sandwich(fill_like(1.0), spatial="W"), ()),
    Row("if", ("If",), if_branches, (C,)),
    Row("if, a branch returning a Constant", ("If", "Constant"), if_constant_branch, (C,), check_facts=False),
    Row("loop", ("Loop",), loop_carry, (C,)),
    Row("scan", ("Scan",), scan_rows, (C,)),
    Row("quantize / dequantize (QDQ)", ("QuantizeLinear", "DequantizeLinear"), quantized(per_channel=False), (C,)),
    Row("QDQ per-channel activations", ("QuantizeLinear", "DequantizeLinear"), quantized(per_channel=True), (C,)),
    Row("QDQ opset 13", ("QuantizeLinear", "DequantizeLinear"), quantized(per_channel=False), (C,), opset=13),
    Row("integer operators (facts only)", ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"),
        integer_operator, None),
    Row("depth/space (facts only)", ("DepthToSpace", "SpaceToDepth"), depth_space, None, zero_check=depth_space_zero_check),
]  # fmt: skip

CASES = [pytest.param(row, op, id=f"{row.name}:{op}") for row in TABLE for op in row.ops]


def _node_of(model: onnx.ModelProto, op: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == op)


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in {o.name for o in out.graph.output})
    return out


@pytest.fixture(scope="module")
def analysed():
    """(row, op) -> (canonical model, analysis), built once per module."""
    cache: dict[tuple[str, str], tuple[onnx.ModelProto, ChannelAnalysis]] = {}

    def get(row: Row, op: str):
        if (row.name, op) not in cache:
            model = canonical(row.build(op, row.opset))
            cache[row.name, op] = model, analyze(ModelGraph(model))
        return cache[row.name, op]

    return get


@pytest.mark.parametrize(("row", "op"), CASES)
def test_coupling(row: Row, op: str, analysed):
    model, analysis = analysed(row, op)
    assert any(n.op_type == op for g in all_graphs(model.graph) for n in g.node), \
        f"canonicalisation removed the {op} under test"
    barriers = [b.op_type for b in analysis.barriers]
    if row.groups is None:
        assert op in barriers
        return
    assert not barriers, analysis.barriers
    assert tuple(sorted(g.size for g in analysis.groups)) == row.groups


@pytest.mark.parametrize("op", ["QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"])
def test_integer_operators_are_barriers_that_say_what_to_do(op, analysed):
    row = next(r for r in TABLE if r.name.startswith("integer operators"))
    _, analysis = analysed(row, op)
    (barrier,) = [b for b in analysis.barriers if b.op_type == op]
    assert barrier.reason.startswith("integer operator (QOperator format): prune the float model, or its QDQ")


@pytest.mark.parametrize(("row", "op"), CASES)
def test_dead_channel_equivalence(row: Row, op: str, analysed):
    model, analysis = analysed(row, op)
    inputs = random_inputs(model, seed=3)
    assert all(np.isfinite(o).all() for o in run(model, inputs)), "the row must compute finite values"
    for group in analysis.groups:
        result = dead_channel_check(analysis, group, inputs)
        assert result.error <= row.tolerance, f"group {group.id} {[str(m) for m in group.members]}: {result.error}"


@pytest.mark.parametrize(("row", "op"), CASES)
def test_declared_facts_hold(row: Row, op: str, analysed):
    if not row.check_facts:
        pytest.skip("the operator reduces the channel axis here; its facts are checked in another row")
    facts = op_facts(op, "", row.opset)
    model, analysis = analysed(row, op)
    node = _node_of(model, op)
    x, y = node.input[0], node.output[0]
    inputs = random_inputs(model, seed=4)
    if facts.same_shape:
        got_x, got_y = run(_with_outputs(model, [x, y]), inputs)[-2:]
        assert got_y.shape == got_x.shape and got_y.dtype == got_x.dtype
    if not facts.zero_preserving:
        return
    if row.zero_check is not None:
        row.zero_check(op, row.opset)
        return
    # Silence one channel of the group that holds the operator's output; that output channel must be 0.
    group = next(g for g in analysis.groups if any(m.tensor == y for m in g.members))
    masked = _with_outputs(apply_mask(analysis, group.labels[:1]), [x, y])
    values = dict(zip([o.name for o in session(masked).get_outputs()], run(masked, inputs)))
    for member in group.members:
        if member.tensor in (x, y):
            positions = member.positions[member.channel_of == 0]
            silenced = np.take(values[member.tensor], positions, axis=member.axis)
            assert silenced.size and np.all(silenced == 0), f"{member}: silenced channel is not zero"


def test_every_registered_op_has_a_row():
    """A new rule (or a new opset range of one) needs a row in TABLE."""
    missing = []
    for reg in RULES.registrations():
        if not any(reg.op_type in row.ops and reg.covers(row.opset) for row in TABLE):
            missing.append(f"{reg.op_type} (opsets {reg.since}..{reg.until or ''}, {type(reg.rule).__name__})")
    assert not missing, "rows missing in tests/test_rules.py TABLE: " + ", ".join(missing)


def test_registry_opset_ranges_and_facts_only_entries():
    registry = RuleRegistry()

    class Old(ChannelRule):
        zero_preserving = ("Op",)

    class New(ChannelRule):
        same_shape = ("Op",)

    class FactsOnly(ChannelRule):
        couples = False

    registry.register("Op", until=12)(Old)
    registry.register("Op", since=13)(New)
    registry.register("Other")(FactsOnly)
    assert isinstance(registry.get("", "Op", 11), Old) and isinstance(registry.get("ai.onnx", "Op", 13), New)
    assert isinstance(registry.get("", "Op"), New)  # opset unknown: the newest rule
    assert registry.get("", "Other") is None and registry.registration("", "Other").rule.facts("Other").same_shape is False
    assert registry.get("com.example", "Op", 13) is None
    assert registry.op_types() == ["Op"]
    with pytest.raises(ValueError, match="two channel rules"):
        registry.register("Op", since=12)(New)
    registry.check()

    class Typo(ChannelRule):
        zero_preserving = ("Rleu",)

    registry.register("Relu")(Typo)
    with pytest.raises(ValueError, match="Rleu"):
        registry.check()


def test_softmax_rule_follows_the_opset():
    """Softmax changed at opset 13: before, it normalises every axis from `axis` on (input coerced to 2-D)."""
    assert type(RULES.get("", "Softmax", 11)).__name__ == "SoftmaxCoerced"
    assert type(RULES.get("", "Softmax", 13)).__name__ == "Softmax"
    assert RULES.get("", "DepthToSpace") is None and op_facts("DepthToSpace").zero_preserving
