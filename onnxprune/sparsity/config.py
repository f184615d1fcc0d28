"""SparsityConfig: what fine-grained pruning zeroes and how it chooses, and its data requirements."""

from __future__ import annotations

from dataclasses import dataclass, field

from onnxprune.errors import UsageError, missing_calibration
from onnxprune.sparsity.layers import LayerRules
from onnxprune.sparsity.patterns import Pattern, parse_pattern
from onnxprune.sparsity.scoring import ALLOCATIONS, SCORES

__all__ = ["SPARSE_REPAIRS", "SparsityConfig"]

SPARSE_REPAIRS = ("none", "bias", "ls", "seq")


@dataclass(frozen=True)
class SparsityConfig:
    """Fine-grained pruning settings.

    Attributes:
        sparsity: fraction of the prunable weights (`layers.sparse_layers`) to zero, in [0, 1); 0 changes
            nothing. An N:M pattern zeroes 1 - N/M: any other non-zero value is a usage error.
        pattern: ``unstructured`` | ``group:RxC`` | ``block:RxC`` | ``nm:N:M`` (`patterns.parse_pattern`).
        criterion: ``magnitude`` | ``wanda`` | ``obs``, or None: magnitude without calibration data, wanda
            with it, obs (chosen inside the SparseGPT solver) with the ``ls``/``seq`` repair.
        allocation: ``uniform`` | ``global`` | ``lamp`` (`scoring.allocate`).
        repair: ``none`` (zero the weights), ``bias`` (data-free: the zeroed weights' mean contribution, from
            BatchNorm statistics, folded into the bias), ``ls`` (SparseGPT on the calibration Hessian of each
            layer's input in the model as given) or ``seq`` (SparseGPT layer by layer on the inputs of the
            already sparsified model, fitted to the given model's outputs).
        rules: which layers stay dense.
        damp: ridge of the solver, relative to the mean diagonal of H.
        block: columns per SparseGPT block.
        seed: sampling of Hessian rows.
        calib_samples: use the first N calibration samples (None: all).
        refit_dense: with ``seq``, also refit the layers kept dense (the classifier, small layers) that have a
            pruned layer upstream to the sparsified model's inputs (weights and bias; no zeros added).
    """

    sparsity: float = 0.5
    pattern: str = "unstructured"
    criterion: str | None = None
    allocation: str = "uniform"
    repair: str = "none"
    rules: LayerRules = field(default_factory=LayerRules)
    damp: float = 0.01
    block: int = 128
    seed: int = 0
    calib_samples: int | None = None
    refit_dense: bool = True

    def __post_init__(self) -> None:
        p = self.parsed  # raises on a bad pattern
        if not 0 <= self.sparsity < 1:
            raise UsageError(f"sparsity must be in [0, 1), got {self.sparsity}")
        fixed = p.fixed_sparsity
        if fixed is not None and self.sparsity and abs(self.sparsity - fixed) > 1e-9:
            raise UsageError(f"--pattern {p.text} zeroes exactly {fixed:g} of the weights: give --sparsity {fixed:g} "
                             "or leave it out")
        if self.criterion is not None and self.criterion not in SCORES:
            raise UsageError(f"unknown sparse criterion {self.criterion!r} (choose from {', '.join(SCORES)})")
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"--allocation {self.allocation} does not apply to --sparsity "
                             f"(choose from {', '.join(ALLOCATIONS)})")
        if self.repair not in SPARSE_REPAIRS:
            raise UsageError(f"unknown repair {self.repair!r} for --sparsity (choose from {', '.join(SPARSE_REPAIRS)})")

    @property
    def parsed(self) -> Pattern:
        return parse_pattern(self.pattern)

    def score(self, has_calib: bool) -> str:
        """The criterion in effect (`criterion`, or the default for the data and repair at hand)."""
        if self.criterion is not None:
            return self.criterion
        if not has_calib:
            return "magnitude"
        return "obs" if self.repair in ("ls", "seq") else "wanda"

    def check_data(self, has_calib: bool) -> None:
        """Raise UsageError when the config needs calibration samples and has none."""
        if has_calib:
            return
        if self.repair in ("ls", "seq"):
            raise missing_calibration(f"repair {self.repair!r} with --sparsity", fallback="--repair bias")
        if self.criterion in ("wanda", "obs"):
            raise missing_calibration(f"sparse criterion {self.criterion!r}")
