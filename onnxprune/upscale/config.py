"""The options of unconstrained pruning (`UnconstrainedConfig`); each field's comment says what it changes."""

from __future__ import annotations

from dataclasses import dataclass, field

from onnxprune.allocation import default_allocation
from onnxprune.errors import UsageError
from onnxprune.upscale.costmodel import CostModel

DRIVES = ("free", "writer", "reader", "coupled")
CRITERIA = ("energy", "bn", "l1", "l2")
REPAIRS = ("none", "mean", "ls", "seq")
ALLOCATIONS = ("uniform", "global", "lamp", "knapsack")


@dataclass(frozen=True)
class UnconstrainedConfig:
    """ratio: fraction of channels each unit drops; criterion: how a unit scores its own channels."""

    ratio: float = 0.3
    criterion: str = "energy"  # "energy" (BN-aware, data-free), "l1" or "l2" (BN-folded weight norms)
    reorder: bool = True
    absorb: bool = True  # let the cost model absorb copies into weights (reordered export only)
    # Round the stream width up to a multiple of this (1: exact union): onnxruntime's blocked NCHWc convs
    # need channel counts that are multiples of the block (16 with AVX-512, 8 with AVX2).
    stream_multiple: int = 16
    cost: CostModel = field(default_factory=CostModel)
    # Blend of each unit's own ranking with the group's shared (constrained) ranking: a unit scores its
    # channels by (1 - share) * own + share * shared, both mean-normalised. 0: fully unconstrained;
    # 1: every unit keeps the same channels (constrained pruning with the same criterion, no copies).
    # In between the kept sets overlap more, so the stream union (and the copies) stay narrower.
    share: float = 0.0
    # After the plan, on calibration inputs (`upscale.repair.repair_plan`): "mean" restores every Conv/Gemm
    # output's mean; "ls" refits each layer's kept columns by ridge least squares on the original's inputs;
    # "seq" the same on the masked, already repaired model's own inputs, layer by layer; "none": masks only.
    repair: str = "none"
    # repair="seq" only: writers into a residual stream (conv -> BatchNorm -> Add) refit toward the original
    # stream minus what the other Add input now carries, so later writers compensate the channels earlier
    # ones dropped (`upscale.stream_repair`); False: every layer toward its own original output.
    stream_repair: bool = False
    # repair="seq" only: then every layer that feeds a ReLU is refitted on the error after the ReLU, not before it
    # (`repair_relu.refit_relu` on the plan's silenced positions; constrained mode's `--relu-refit`).
    relu_refit: bool = False
    # With calibration inputs (a repair needs them): readers weight their columns by their input's
    # measured per-channel energy (`scores.measured_energy`) instead of BatchNorm statistics.
    measure: bool = True
    # Stream budget: the stream (union) may hold at most union_cap x the per-unit kept count channels,
    # the group's top ones by the shared ranking; each unit keeps its own top channels among them.
    # None: unbounded (UPSCALE: the union is whatever the units choose); 1: constrained-like streams.
    union_cap: float | None = None
    # Measured layout choice (reordered export): with tune > 0 the export is built under a few cost
    # models (the fitted one, copies cheaper / dearer, everything absorbed, copies only) and the one
    # running fastest in onnxruntime (median of `tune` runs, `tune_threads` intra-op threads) is kept.
    tune: int = 0
    tune_threads: int = 1
    # How the naive export (reorder=False) scatters a writer's channels into the stream: "scatter" is
    # UPSCALE's naive export (ScatterND into a zero stream, what `out[:, idx] = y` exports to);
    # "pad_gather" is a cheaper scatter (one zero channel appended by Pad, then one Gather).
    naive: str = "scatter"
    # Who chooses the channels of a stream (see `build_plan`): "free": every unit its own top ones;
    # "writer": writers (producer units) choose, each reader chooses among the channels the writers that
    # reach it keep (UPSCALE's writer-driven setting: a producer->readers fork is never hurt, a residual
    # stream's readers choose among the union); "reader": readers choose, each writer keeps what the
    # readers it reaches keep (a writer with no reader reached keeps its own top ones); "coupled" (default):
    # writers keep what their readers use, readers what their writers cover (`coupled`; better than "free"
    # in accuracy, CIFAR ResNet20 at 40%: 86.04 vs 83.53 with seq repair, 31.45 vs 23.09 data-free, and
    # in latency: its streams stay narrow).
    drive: str = "coupled"
    # drive="coupled" only, with calibration inputs: "ls" lets each reader keep the input channels whose
    # removal its least-squares refit (the ls/seq repair) repairs worst (`coupled.ReaderLS`, OBS on its
    # calibration Hessian) instead of its own criterion ranking; "score": the criterion's ranking; "seq"
    # (repair="seq"): "ls" for the plan, then every reader of a stream with several writers chooses again
    # when the sequential repair fits it, on the pruned and repaired model's own inputs
    # (`stream_repair.choose_columns`: greedy OBS on what the writers really left on the stream).
    reader_choice: str = "score"
    # drive="reader" only: readers keep fewer channels until each group holds no more parameters than
    # constrained pruning keeps at the same ratio (writers keep their readers' union, more than k).
    group_budget: bool = False
    # How groups share the removal (`upscale.allocate`, constrained pruning's allocations): "uniform" (every
    # group the ratio), "global" or "lamp" (layer-adaptive budgets), "knapsack" (measured error per parameter
    # removed, `allocate.knapsack_curves`; needs calibration inputs); with a target, the order it walks.
    # None: as in constrained mode (`allocation.default_allocation`), lamp with a target, else uniform.
    allocation: str | None = None
    # Parameters to keep: a count or "P%" of the input's (nonzero parameters: what every unit keeps; the
    # pass resolves a percentage on the model it prunes); None: the ratio decides.
    target_params: int | str | None = None
    # Allowed kept counts per group id of the unsplit model's channel analysis (ascending, ending with the
    # group size; `--round-to N` multiples or a latency grid): every unit keeps one of them.
    keep_counts: dict[int, tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise UsageError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.stream_multiple < 1:
            raise UsageError(f"stream_multiple must be >= 1, got {self.stream_multiple}")
        if self.criterion not in CRITERIA:
            raise UsageError(f"unconstrained criterion must be energy, bn, l1 or l2, got {self.criterion!r}")
        if self.repair not in REPAIRS:
            raise UsageError(f"unconstrained repair must be one of {', '.join(REPAIRS)}, got {self.repair!r}")
        if self.allocation is None:  # resolved here, so the record and every reader see the allocation that runs
            object.__setattr__(self, "allocation", default_allocation(params_target=self.target_params is not None))
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"unconstrained allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if isinstance(self.target_params, int) and self.target_params < 1:
            raise UsageError(f"target_params must be a positive count, got {self.target_params}")
        for gid, counts in (self.keep_counts or {}).items():
            if not counts or any(c < 1 for c in counts) or list(counts) != sorted(set(counts)):
                raise UsageError(f"keep_counts of group {gid} must be ascending positive counts, got {counts}")
        if not 0 <= self.share <= 1:
            raise UsageError(f"share must be in [0, 1], got {self.share}")
        if self.tune < 0 or self.tune_threads < 1:
            raise UsageError(f"tune must be >= 0 and tune_threads >= 1, got {self.tune}, {self.tune_threads}")
        if self.union_cap is not None and self.union_cap < 1:
            raise UsageError(f"union_cap must be >= 1 (or None), got {self.union_cap}")
        if self.drive not in DRIVES:
            raise UsageError(f"drive must be one of {', '.join(DRIVES)}, got {self.drive!r}")
        if self.reader_choice not in ("score", "ls", "seq"):
            raise UsageError(f"reader_choice must be score, ls or seq, got {self.reader_choice!r}")
        if self.reader_choice != "score" and self.drive != "coupled":
            raise UsageError(f"reader_choice={self.reader_choice!r} chooses within drive='coupled' only")
        if self.relu_refit and self.repair != "seq":
            raise UsageError("relu_refit refines the sequential repair: it needs repair='seq'")
        if self.reader_choice == "seq" and self.repair != "seq":
            raise UsageError("reader_choice='seq' chooses during the sequential repair: it needs repair='seq'")
        if self.naive not in ("scatter", "pad_gather"):
            raise UsageError(f"naive export must be scatter or pad_gather, got {self.naive!r}")
