"""PruneConfig: what constrained channel pruning removes and how it chooses, and its data requirements.

One config drives the whole pruning pipeline (select -> repair -> remove, see `onnxprune.passes.pruning`):
the selection records it, the repair reads its method from there and the summary reports it. `check_data`
says, before any model is read, whether the config needs calibration data it does not have.

Latency: ``round_to="auto"`` keeps every group at the bottom of a latency step measured on
`latency_backend` (a latency table per model, cached on disk under `latency_cache`); ``target_latency``
("0.6x" or "12ms") chooses the removal by importance per millisecond and verifies it by measurement. The
library's default stays ``round_to=1`` (nothing is measured unless asked); the command line's default is
``auto``.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxprune.allocation import ALLOCATIONS, default_allocation
from onnxprune.criteria import CRITERIA, DATA_CRITERIA
from onnxprune.errors import UsageError, missing_calibration
from onnxprune.latency_allocation import parse_latency_target
from onnxprune.repair import REPAIRS


@dataclass(frozen=True)
class PruneConfig:
    """What to remove and how to choose it."""

    ratio: float = 0.3
    criterion: str = "l1"
    global_ranking: bool = False
    round_to: int | str = 1  # N: kept counts are multiples of N; "auto": bottoms of measured latency steps
    allow_inexact: bool = False  # also prune hidden sizes under LayerNorm / softmax axes
    max_group_ratio: float = 0.9
    seed: int = 0
    repair: str = "none"  # none | bias (data-free, BatchNorm statistics) | ls | seq (calibrated least squares)
    relu_refit: bool = False  # seq: then refit layers that feed a ReLU on the post-ReLU error (`repair_relu`)
    allocation: str | None = None  # uniform | global | lamp | sensitivity | knapsack; None: `default_allocation`
    target_params: str | None = None  # keep N parameters, or P% of them (overrides ratio)
    target_macs: str | None = None  # keep N MACs, or P% of them (overrides ratio)
    calib_samples: int | None = None
    target_latency: str | None = None  # "0.6x" of the dense latency or "12ms" (overrides ratio)
    latency_backend: str = "ort"  # where latency is measured: ort, ort:EPName, or a target (x86, rpc, ...)
    latency_threads: int = 1
    rpc: str | None = None  # HOST:PORT of a TVM RPC tracker
    device_key: str | None = None  # the tracker's device key
    latency_cache: str | None = None  # folder of cached latency tables (default $ONNXPRUNE_LATENCY_CACHE)

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise UsageError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.round_to != "auto" and (
                isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1):
            raise UsageError(f"round-to must be auto or an integer >= 1, got {self.round_to!r}")
        if self.target_latency is not None:
            parse_latency_target(self.target_latency)
            if self.target_params is not None or self.target_macs is not None:
                raise UsageError("give at most one of --target-latency, --target-params and --target-macs")
        if self.latency_threads < 1:
            raise UsageError(f"latency threads must be >= 1, got {self.latency_threads}")
        if self.seed < 0:  # numpy's generators take none
            raise UsageError(f"seed must be >= 0, got {self.seed}")
        if self.calib_samples is not None and self.calib_samples < 1:
            raise UsageError(f"calib-samples must be >= 1, got {self.calib_samples}")
        if self.rpc is not None and not self.device_key:
            raise UsageError("--rpc needs --device-key (the key the device registered with the tracker)")
        if self.repair not in REPAIRS:
            raise UsageError(f"unknown repair {self.repair!r} (choose from {', '.join(REPAIRS)})")
        if self.relu_refit and self.repair != "seq":
            raise UsageError("--relu-refit refines the sequential repair: it needs --repair seq")
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise UsageError(f"unknown allocation {self.allocation!r} (choose from {', '.join(ALLOCATIONS)})")
        if self.target_params is not None and self.target_macs is not None:
            raise UsageError("give at most one of --target-params and --target-macs")

    @property
    def allocation_name(self) -> str:
        """The allocation; by default global with --global or a latency target (importance per ms), lamp for a
        parameter target, else uniform (`allocation.default_allocation`)."""
        return self.allocation or default_allocation(
            global_ranking=self.global_ranking, latency_target=bool(self.target_latency),
            params_target=self.target_params is not None)

    @property
    def measures_latency(self) -> bool:
        """Whether the selection measures latency (auto rounding or a latency target)."""
        return self.round_to == "auto" or self.target_latency is not None


def check_data(
    config: PruneConfig, *, has_calib: bool, has_stats: bool = False, custom_criterion: bool = False
) -> list[str]:
    """Fail early when data is required but missing; return one-line notices for data-free fallbacks.

    Args:
        config: the pruning config.
        has_calib: calibration samples will be given.
        has_stats: precomputed calibration statistics will be given (they stand in for samples, except
            for the sequential repair, which runs the model).
        custom_criterion: a `Criterion` instance replaces `config.criterion`.

    Raises:
        UsageError: an unknown criterion, or a criterion, repair or allocation that needs samples without them.
    """
    c = config
    if not custom_criterion and c.criterion not in CRITERIA:
        raise UsageError(f"unknown criterion {c.criterion!r} (choose from {', '.join(sorted(CRITERIA))})")
    if not has_calib and c.repair == "seq":
        raise missing_calibration("repair 'seq'", fallback="--repair bias")
    if has_stats:
        return []
    if not has_calib and not custom_criterion and c.criterion in DATA_CRITERIA:
        raise missing_calibration(f"criterion {c.criterion!r}")
    if not has_calib and c.repair == "ls":
        raise missing_calibration("repair 'ls'", fallback="--repair bias")
    notices = []
    if not has_calib and not custom_criterion and c.criterion == "obs":
        notices.append("criterion obs without --calib: using the data-free BatchNorm Hessian surrogate")
    return notices
