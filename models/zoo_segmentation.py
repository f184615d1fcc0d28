"""Builders of the zoo's semantic-segmentation and detection models (torchvision, random init, nothing downloads).

Segmentation (`segmentation_builder`): LR-ASPP and DeepLabV3 on MobileNetV3-Large, FCN on a dilated ResNet-50,
``weights=None, weights_backbone=None``, ``aux_loss`` off; the export returns the ``"out"`` mask logits
``[1, 21, H, W]`` (bilinear Resize back to the input size). Static entries take ``[1, 3, 96, 128]`` (not square,
so a swapped height and width shows); ``dynamic=True`` keeps batch, height and width symbolic, as users export a
segmenter for any image size: every Resize then reads its ``sizes`` from ``Shape`` at run time.

Detection (`detection_builder`): SSDlite320 and Faster R-CNN (MobileNetV3-Large 320 FPN) with their
post-processing (score filtering, TopK, NonMaxSuppression, box decoding; Faster R-CNN also the RPN and RoIAlign)
at a fixed 320x320 input, returning ``boxes [N, 4], scores [N], labels [N]`` for one image (N data-dependent).
The CPU torch wheel here comes with a torchvision whose C++ ops do not load; `_detection_ops` gives
``torchvision::nms`` and ``torchvision::roi_align`` Python kernels for the one traced example, so the trace
records the ops and the exporter writes ONNX ``NonMaxSuppression`` / ``RoiAlign`` as with the C++ ops.
Measured here (torch 2.13, torchvision 0.28, 2 shared cores): SSDlite builds in ~15 s (export ~5 s, the rest is
the BatchNorm calibration's NMS in numpy), Faster R-CNN in ~10 s (export ~3 s), the segmenters in 2-6 s.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from models.zoo_builders import _export, _torchvision

SEGMENTATION_SIZE = (96, 128)  # height, width
DETECTION_SIZE = 320  # the *320* detectors resize to 320 inside the model anyway

# What a detector computes before its data-dependent selection (score filter, TopK, NMS): equivalence tests
# compare these. A pruned conv sums fewer terms, and that float32 rounding can flip a near-tie in the selection:
# SSDlite keeps 300 of ~27,000 candidates, and with an earlier draw of its random weights one silenced group
# changed its boxes (error 0.89) while its head outputs agreed to 1e-7 (with this draw the whole outputs agree
# too, <= 1.1e-6 over all 37 groups, but which tie flips is luck). Faster R-CNN has weights after its selection
# (the RoI head) and is compared whole: its 34 groups agree to <= 4.1e-7 at the tests' inputs.
HEAD_OUTPUTS: dict[str, tuple[str, ...]] = {
    "ssdlite320_mobilenet_v3_large": ("/model/head/regression_head/Concat_12_output_0",
                                      "/model/head/classification_head/Concat_12_output_0"),
}


def segmentation_builder(arch: str, dynamic: bool = False) -> Callable[[Path], None]:
    """``torchvision.models.segmentation.<arch>``, random weights (seeded), exported returning the ``out`` mask."""

    def build(path: Path) -> None:
        import torch

        tv = _torchvision()
        torch.manual_seed(0)
        options: dict[str, Any] = {"weights": None, "weights_backbone": None}
        if not arch.startswith("lraspp"):
            options["aux_loss"] = False
        model = getattr(tv.models.segmentation, arch)(**options)
        _calibrate_batchnorm(model, lambda: model(torch.randn(4, 3, *SEGMENTATION_SIZE)))
        axes = {"input": {0: "batch", 2: "height", 3: "width"}, "out": {0: "batch", 2: "height", 3: "width"}}
        _export(_MaskOnly.wrap(model), (torch.randn(1, 3, *SEGMENTATION_SIZE),), path, ["input"], ["out"],
                dynamic_axes=axes if dynamic else None)  # fmt: skip

    return build


def _calibrate_batchnorm(model: Any, forward: Callable[[], Any]) -> None:
    """Random BatchNorm affine parameters (seeded by the caller), then the random network's own statistics.

    With torchvision's initialisation (running mean 0, variance 1) the MobileNetV3 activations die out with depth:
    the DeepLabV3 mask held 64 distinct values and silencing half of a group changed it by exactly 0, and every
    SSDlite score was 1/91, so no equivalence test could tell a wrong prune. Statistics averaged over a random
    batch (`forward` runs one) keep each layer's output at the scale its affine parameters give, as trained
    statistics do (affine parameters drawn after the statistics shifted every layer's input away from them:
    Faster R-CNN's RPN logits grew to a standard deviation of 165).

    The BatchNorm closing a residual branch gets a small scale, as trained networks have (torchvision's
    ``zero_init_residual`` starts it at 0): with unit scales the random FCN amplified float32 rounding ~400-fold
    (onnxruntime's own BatchNorm folding changed its mask by 9.6e-5, an exact prune's dead-channel check by
    3.4e-5, over the 1e-5 bar); with scales in [0.1, 0.3] the folding changes it by 3.6e-6, the worst
    dead-channel check by 1.8e-6. The batch is standard-normal images, what the tests feed
    (`verify.random_inputs`): calibrated on [0, 1] images, Faster R-CNN's FPN outputs reached 1e3 on those."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.3, 0.3)
            norm.reset_running_stats()
            norm.momentum = None  # a plain average over the batches seen
        for norm in _residual_closers(model):
            norm.weight.uniform_(0.1, 0.3)
        model.eval()
        for norm in norms:
            norm.train()
        forward()  # the model in eval mode, its BatchNorms in training mode: they average the batch statistics
    model.eval()


def _residual_closers(model: Any) -> Iterator[Any]:
    """The last BatchNorm of every residual branch (ResNet blocks, MobileNetV3 blocks with a skip)."""
    for block in model.modules():
        kind = type(block).__name__
        if kind == "Bottleneck":
            yield block.bn3
        elif kind == "BasicBlock":
            yield block.bn2
        elif kind == "InvertedResidual" and getattr(block, "use_res_connect", False):
            yield block.block[-1][1]  # the projection's Conv2dNormActivation: conv, BatchNorm


class _MaskOnly:
    """Wraps a torchvision segmentation model: image -> its ``out`` logits (the dict is not exportable)."""

    @staticmethod
    def wrap(model: Any) -> Any:
        import torch

        class MaskOnly(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.model(x)["out"]

        return MaskOnly()


def detection_builder(arch: str, **options: Any) -> Callable[[Path], None]:
    """``torchvision.models.detection.<arch>`` (random weights, seeded) with its post-processing, one image."""

    def build(path: Path) -> None:
        import torch

        tv = _torchvision()
        torch.manual_seed(0)
        model = getattr(tv.models.detection, arch)(weights=None, weights_backbone=None, **options)
        image = torch.rand(1, 3, DETECTION_SIZE, DETECTION_SIZE)
        with _detection_ops():
            _calibrate_batchnorm(model, lambda: model(list(torch.randn(4, 3, DETECTION_SIZE, DETECTION_SIZE))))
            _export(_Detections.wrap(model), (image,), path, ["images"], ["boxes", "scores", "labels"])

    return build


class _Detections:
    """Wraps a torchvision detector: a ``[1, 3, H, W]`` batch -> boxes, scores, labels of its one image."""

    @staticmethod
    def wrap(model: Any) -> Any:
        import torch

        class Detections(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                found = self.model(list(images))[0]
                return found["boxes"], found["scores"], found["labels"]

        return Detections()


_KERNELS: Any = None  # the Library holding the Python kernels, kept alive for the process


@contextlib.contextmanager
def _detection_ops() -> Iterator[None]:
    """torchvision's NMS and RoIAlign traceable without its C++ ops (a no-op where they load).

    Registers Python CPU kernels for ``torchvision::nms`` (whose schema `_torchvision` defines) and
    ``torchvision::roi_align`` once, and for the duration lets torchvision's wrappers call them (they check
    for the C++ extension first, and RoIAlign would otherwise trace its pure-Python fallback op by op)."""
    global _KERNELS
    import torch
    import torchvision.extension

    if torchvision.extension._has_ops():
        yield
        return
    boxes, roi_align = sys.modules["torchvision.ops.boxes"], sys.modules["torchvision.ops.roi_align"]
    if _KERNELS is None:
        library = torch.library.Library("torchvision", "FRAGMENT")
        library.define("roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                       "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor")  # fmt: skip
        library.impl("nms", _untraced(_nms), "CPU")
        library.impl("roi_align", _untraced(inspect.unwrap(roi_align._roi_align)), "CPU")
        _KERNELS = library
    saved = boxes._assert_has_ops, roi_align._assert_has_ops, roi_align._has_ops
    boxes._assert_has_ops = roi_align._assert_has_ops = _ops_loaded
    roi_align._has_ops = _has_ops
    try:
        yield
    finally:
        boxes._assert_has_ops, roi_align._assert_has_ops, roi_align._has_ops = saved


def _ops_loaded() -> None:  # a def, not a lambda: batched_nms is scripted while tracing and compiles this
    return None


def _has_ops() -> bool:
    return True


def _untraced(kernel: Callable[..., Any]) -> Callable[..., Any]:
    """The kernel computes the traced example only: the tracer records the op, not the kernel's steps."""

    def run(*args: Any) -> Any:
        import torch

        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            return kernel(*args)
        finally:
            torch._C._set_tracing_state(state)

    return run


def _nms(boxes: Any, scores: Any, iou_threshold: float) -> Any:
    """Greedy NMS as torchvision's kernel computes it: indices kept, by decreasing score."""
    import numpy as np
    import torch

    b = boxes.detach().numpy().astype(np.float64)
    order = np.argsort(-scores.detach().numpy(), kind="stable")
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        width = np.clip(np.minimum(b[best, 2], b[rest, 2]) - np.maximum(b[best, 0], b[rest, 0]), 0, None)
        height = np.clip(np.minimum(b[best, 3], b[rest, 3]) - np.maximum(b[best, 1], b[rest, 1]), 0, None)
        overlap = width * height
        iou = overlap / np.maximum(area[best] + area[rest] - overlap, 1e-12)
        keep.append(best)
        order = rest[iou <= iou_threshold]
    return torch.tensor(keep, dtype=torch.int64)
