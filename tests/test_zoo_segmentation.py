"""Semantic segmentation and detection from torchvision (`models/zoo_segmentation.py`): LR-ASPP, DeepLabV3 and FCN
segmenters (static and dynamic image size), SSDlite and Faster R-CNN exported with their post-processing.

Each model: the analysis finds the groups it should (exact counts: a regression that freezes a head shows), its
barriers and frozen weights are the ones expected with their reasons, silencing a group's channels equals removing
them (`dead_channel_check`; a detector compares what it computes before its data-dependent selection, see
`zoo_segmentation.HEAD_OUTPUTS`), ratio 0 changes nothing, and a 40% prune runs in onnxruntime, equal to the masked
original, with the original's output shapes (a mask keeps the input's height and width).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from models import zoo
from models.zoo_segmentation import HEAD_OUTPUTS
from onnxprune.channels import ChannelAnalysis, ChannelGroup, analyze
from onnxprune.graph import ModelGraph
from onnxprune.importer import check_model, import_model
from onnxprune.metrics import count_params
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.rewrite import apply_mask, apply_plan
from onnxprune.shape_inference import infer_shapes
from onnxprune.verify import max_rel_error, random_inputs, run

GROUPS = {
    "lraspp_mobilenet_v3_large": 30,
    "lraspp_mobilenet_v3_large_dynamic": 30,  # 29 before Resize followed run-time sizes: the head's 128 froze
    "deeplabv3_mobilenet_v3_large": 36,
    "deeplabv3_mobilenet_v3_large_dynamic": 36,  # 35 before: the ASPP pooling branch's 256 froze
    "fcn_resnet50": 38,
    "ssdlite320_mobilenet_v3_large": 37,
    "fasterrcnn_mobilenet_v3_large_320_fpn": 34,  # 33 before RoiAlign / ScatterElements rules: the FPN output froze
}
# Weights of a group each test silences by name (the heads), besides a sample of the others.
HEADS = {
    "lraspp_mobilenet_v3_large": ["model.classifier.cbr.0.weight"],  # gated by the sigmoid branch, resized
    "lraspp_mobilenet_v3_large_dynamic": ["model.classifier.cbr.0.weight"],
    "deeplabv3_mobilenet_v3_large": ["model.classifier.0.convs.4.1.weight", "model.classifier.0.project.0.weight"],
    "deeplabv3_mobilenet_v3_large_dynamic": ["model.classifier.0.convs.4.1.weight"],  # the pooling branch
    "fcn_resnet50": ["model.classifier.0.weight"],
    "ssdlite320_mobilenet_v3_large": ["model.head.classification_head.module_list.5.0.0.weight"],
    "fasterrcnn_mobilenet_v3_large_320_fpn": ["model.backbone.fpn.layer_blocks.0.0.weight",  # -> RoiAlign, fc6
                                              "model.roi_heads.box_head.fc6.weight"],
}
# What stays whole, by reason: kernel axes, the image's colour channels, the class (and box) outputs.
FROZEN = {"not a channel axis of Conv", "graph input/output"}
DYNAMIC_FROZEN = FROZEN | {"not a channel axis of Resize"}  # the class axis: its run-time size is not inferred
DETECTOR_FROZEN = {
    "ssdlite320_mobilenet_v3_large": FROZEN | {"merged into a larger axis by reshape", "axis indexed by GatherND",
                                              "positions returned as indices by NonZero"},
    "fasterrcnn_mobilenet_v3_large_320_fpn": FROZEN | {
        "merged into a larger axis by reshape", "gathered axis", "strided or unsized slice",
        "removal would be inexact (Softmax over this axis); see --allow-inexact"},
}
def _model(name: str) -> onnx.ModelProto:
    try:
        path = zoo.zoo_model(name)
    except zoo.ZooError as exc:
        pytest.skip(str(exc))
    return import_model(path, zoo.INPUT_SHAPES.get(name))


def _compared(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """`model` with the outputs the equivalence is judged on (a detector's head outputs; else its own)."""
    if name not in HEAD_OUTPUTS:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in HEAD_OUTPUTS[name])
    return out


def _dead_channel_error(analysis: ChannelAnalysis, group: ChannelGroup, inputs: dict, name: str) -> float:
    """Half of the group's channels silenced in the original vs removed (as `verify.dead_channel_check`)."""
    rng = np.random.default_rng([0, group.id])
    labels = group.labels[np.sort(rng.choice(group.size, max(1, group.size // 2), replace=False))]
    pruned = infer_shapes(apply_plan(analysis, labels))
    check_model(pruned)
    masked = apply_mask(analysis, labels)
    return max_rel_error(run(_compared(masked, name), inputs), run(_compared(pruned, name), inputs))


def _sampled_groups(analysis: ChannelAnalysis, name: str, extra: int) -> list[ChannelGroup]:
    heads = [g for g in analysis.groups if any(m.tensor in HEADS[name] and m.axis == 0 for m in g.param_members)]
    assert len(heads) == len(HEADS[name]), [[str(m) for m in g.param_members] for g in heads]
    rest = [g for g in analysis.groups if g not in heads]
    picked = np.random.default_rng(0).choice(len(rest), min(extra, len(rest)), replace=False)
    return heads + [rest[i] for i in sorted(picked)]


def _check_analysis(name: str, model: onnx.ModelProto, extra_groups: int) -> ChannelAnalysis:
    analysis = analyze(ModelGraph(model))
    assert len(analysis.groups) == GROUPS[name], sorted(g.size for g in analysis.groups)
    frozen = {row["reason"] for row in analysis.frozen_weights()}
    barriers = {(b.op_type, b.reason) for b in analysis.barriers}
    if name in DETECTOR_FROZEN:
        # no barrier in the batched NMS's If either: its branch output Constant has a rule, and its Slice axes,
        # Unsqueezed inside the branch from an outer constant, fold (`canonical._fold_constant_shape_ops`)
        assert frozen <= DETECTOR_FROZEN[name] and not barriers, (frozen, barriers)
    else:
        assert frozen <= (DYNAMIC_FROZEN if name.endswith("_dynamic") else FROZEN) and not barriers, (frozen, barriers)
    inputs = random_inputs(model, seed=3)
    for group in _sampled_groups(analysis, name, extra_groups):
        error = _dead_channel_error(analysis, group, inputs, name)
        assert error <= 1e-5, f"{name} group {group.id} {[str(m) for m in group.param_members][:3]}: {error}"
    return analysis


def _check_prune(name: str, model: onnx.ModelProto, sizes: list[dict[str, int]]) -> None:
    """Ratio 0 gives the original outputs bit for bit; ratio 0.4 runs, fewer parameters, the masked original's
    outputs (at every image size of a dynamic model) with its shapes."""
    inputs = [random_inputs(model, seed=5, dims=dims) for dims in sizes]
    untouched = PrunePass(PruneConfig(ratio=0.0)).run(model).model
    for feed in inputs:
        assert max_rel_error(run(model, feed), run(untouched, feed)) == 0.0
    result = PrunePass(PruneConfig(ratio=0.4)).run(model)
    check_model(result.model)
    assert count_params(ModelGraph(result.model)) < 0.75 * count_params(ModelGraph(model))
    analysis = result.info["analysis"]
    masked = apply_mask(analysis, result.info["plan"].labels(analysis))
    for feed in inputs:
        got, expected = run(result.model, feed), run(masked, feed)
        assert [o.shape for o in got] == [o.shape for o in run(model, feed)]
        assert max_rel_error(run(_compared(masked, name), feed), run(_compared(result.model, name), feed)) <= 1e-5
        if name in HEAD_OUTPUTS or name.startswith("fasterrcnn"):
            boxes, scores, labels = got
            assert boxes.shape[1:] == (4,) and scores.shape == labels.shape == boxes.shape[:1]
            assert np.isfinite(boxes).all() and np.isfinite(scores).all()
        else:
            (mask,) = got
            image = next(iter(feed.values()))
            assert mask.shape == (image.shape[0], 21, *image.shape[2:])
            assert max_rel_error(expected, got) <= 1e-5


# ---- fast tier: the head patterns each fix is about --------------------------------------------------------
def test_lraspp_dynamic_size_prunes_its_head():
    """LR-ASPP exported for any image size: both Resizes read their sizes from Shape at run time. The channel
    element is the resized tensor's own channel count, so the head's 128 channels (gated by the sigmoid branch,
    then resized) are a group; the pruned model takes any size and equals the masked original at each."""
    name = "lraspp_mobilenet_v3_large_dynamic"
    model = _model(name)
    _check_analysis(name, model, extra_groups=2)
    _check_prune(name, model, [{"height": 64, "width": 80}, {"height": 120, "width": 72}])


def test_deeplabv3_aspp():
    """DeepLabV3's ASPP: parallel dilated convs and a pooled branch resized back, concatenated, projected."""
    name = "deeplabv3_mobilenet_v3_large"
    model = _model(name)
    _check_analysis(name, model, extra_groups=2)
    _check_prune(name, model, [{}])


def test_detectors_keep_their_backbone_and_heads_prunable():
    """SSDlite and Faster R-CNN with their post-processing: the analysis does not stop at NonZero, TopK, NMS,
    RoiAlign, the level-merging ScatterElements or the batched NMS's If: no barrier. Faster R-CNN's FPN output
    (RPN head and box head fc6 included) is one exact group."""
    for name in ("ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn"):
        _check_analysis(name, _model(name), extra_groups=0)


# ---- slow tier: every model whole ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GROUPS))
def test_zoo_segmentation_and_detection(name):
    model = _model(name)
    _check_analysis(name, model, extra_groups=8)
    dynamic = [{"height": 64, "width": 80}, {"height": 120, "width": 72}]
    _check_prune(name, model, dynamic if name.endswith("_dynamic") else [{}])
