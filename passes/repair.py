"""RepairChannelsPass: refit the consumers of the selected channels before they are removed.

The second pass of constrained pruning (select -> repair -> remove). It reads the pending
`ChannelSelection` and repairs with the selection's config: ``bias`` (data-free, BatchNorm statistics) and
``ls`` (calibrated least squares, on the selection's statistics) via `onnxprune.repair.repair_weights`,
``seq`` (least squares layer by layer on the pruned model's own activations) via `repair_sequential`, then
with ``relu_refit`` the layers that feed a ReLU refitted on the post-ReLU error (`onnxprune.repair_relu`).
Quantized (QDQ) weights are refitted by ``seq`` as floats and written back as integers on their own grid
(`onnxprune.quantized_repair`).

Repair changes weights (and may add biases), never which positions exist, so the selection carries over:
`onnxprune.repair.reanalyze` analyses the repaired model once and maps the removed positions onto it (and
checks that the coupling did not change). The re-analysed selection is recorded as pending on the repaired
model for `RemoveChannelsPass`. With repair ``none`` or nothing selected the pass changes nothing.
"""

from __future__ import annotations

from dataclasses import replace

from onnxprune.calibration import check_calib
from onnxprune.calibration_data import CalibLike, as_calibration
from onnxprune.errors import OnnxPruneError, missing_calibration
from onnxprune.passes.select import ChannelSelection, pending_selection
from onnxprune.passmanager import Pass, PassResult, analyses
from onnxprune.quantized_repair import float_view, requantize
from onnxprune.repair import reanalyze, repair_sequential, repair_weights
from onnxprune.repair_relu import refit_relu
from onnxprune.verify import nonfinite_weights


class RepairChannelsPass(Pass):
    """Repair the model for the pending channel removal, as the selection's config says.

    Args:
        calib: calibration samples; required by the ``seq`` repair, which runs the model on them.
    """

    def __init__(self, calib: CalibLike | None = None) -> None:
        self.calib = as_calibration(calib)

    def requires(self, model):
        selection = pending_selection(model)
        if selection.config.repair == "seq" and self.calib is None:
            raise missing_calibration("repair 'seq'", fallback="--repair bias")

    def call(self, model):
        selection = pending_selection(model)
        c = selection.config
        if c.repair == "none" or selection.empty:
            return PassResult(model, False)
        # quantized (QDQ) weights are refitted as floats and quantized again on their own grid afterwards (the
        # selection's statistics were collected on the same float view: `select.calibration_statistics`)
        view, dequantized = float_view(model)
        base, base_labels = reanalyze(selection.analysis, selection.labels, view, c.allow_inexact)
        if c.repair == "seq":
            data = check_calib(self.calib, model, c.calib_samples)
            repaired, report = repair_sequential(base, base_labels, data, seed=c.seed,
                                                 dense=None if dequantized else selection.dense_rows)  # fmt: skip
        else:
            repaired, report = repair_weights(base, base_labels, c.repair, selection.stats)
        analysis, labels = reanalyze(base, base_labels, repaired, c.allow_inexact)
        refit = c.repair == "seq" and c.relu_refit
        if refit:
            repaired, relu = refit_relu(base, base_labels, analysis, labels, data, seed=c.seed)
            report.relu_refit = relu.as_dict()
        broken = nonfinite_weights(view, repaired)  # on the floats: a NaN rounded into an integer is any integer
        if dequantized and not broken:
            repaired, requantized = requantize(repaired, dequantized, model)
            report.requantized = requantized.as_dict()
        if (refit or dequantized) and not broken:  # the model changed again: the selection's positions on it
            analysis, labels = reanalyze(selection.analysis, selection.labels, repaired, c.allow_inexact)
        if broken:
            raise OnnxPruneError(f"the {c.repair} repair wrote NaN or infinite values into {len(broken)} weight(s) "
                                 f"({', '.join(broken[:3])}): degenerate calibration data or statistics")
        after = replace(selection, analysis=analysis, labels=labels, repair=report, dense_rows=None)
        analyses().put(repaired, ChannelSelection, after)
        return PassResult(repaired, repaired is not model, artifacts=(report,))
