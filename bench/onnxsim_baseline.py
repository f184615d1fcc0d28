"""onnxsim 0.8.1 structured pruning as a baseline, pruned to a given parameter count.

onnxsim prunes output channels of producer -> consumer chains it can prove safe
(`onnxsim.pruning.apply_structured_pruning`: filter / row L2 norm; `apply_structured_wanda_pruning`:
``||W_row||_2 * ||X||_2`` with calibration activations). It takes a per-chain `sparsity`, not a
parameter target, and expects BatchNormalization already folded into the convolutions, so a baseline
run is ``onnxsim.simplify`` (folds BN, the way its own pipeline prepares a model) followed by the
pruning call, with `sparsity` bisected until the pruned model has as close as possible to the
parameter count our pruner reached (fractions removed are relative to each tool's own starting model,
the simplified model for onnxsim).

Start reading at `match_fraction`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.graph import ModelGraph
from onnxprune.metrics import count_params

METHODS = ("onnxsim-l2", "onnxsim-wanda")


@dataclass(frozen=True)
class BaselineResult:
    model: onnx.ModelProto
    sparsity: float  # onnxsim's per-chain sparsity argument
    removed: float  # fraction of the simplified model's parameters removed


def simplified(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim.simplify (BN folded into Conv, constants folded): onnxsim's own starting point."""
    import onnxsim

    out, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim.simplify could not validate the simplified model")
    return out


def pruner(method: str, calibration: Sequence[dict[str, np.ndarray]] | None = None) -> Callable:
    """`sparsity -> pruned model` function of one onnxsim method on a model."""
    from onnxsim import pruning

    if method == "onnxsim-l2":
        return lambda m, s: pruning.apply_structured_pruning(m, sparsity=s)
    if method == "onnxsim-wanda":
        if calibration is None:
            raise ValueError("onnxsim-wanda needs calibration batches")
        return lambda m, s: pruning.apply_structured_wanda_pruning(m, calibration_data=list(calibration), sparsity=s)
    raise ValueError(f"unknown baseline {method!r} (choose from {', '.join(METHODS)})")


def match_fraction(
    model: onnx.ModelProto, prune: Callable, fraction: float, *, steps: int = 9, hi: float = 0.95
) -> BaselineResult | None:
    """Bisect onnxsim's `sparsity` so `fraction` of `model`'s parameters are removed (closest run).

    `model` is the simplified model. Returns None when onnxsim removes nothing at any sparsity (it cannot
    prune the model at all); if even `hi` removes less than `fraction`, the run at `hi` is returned (its
    `removed` says how far it got).
    """
    total = count_params(ModelGraph(model))
    cache: dict[float, BaselineResult] = {}

    def run(s: float) -> BaselineResult:
        if s not in cache:
            pruned = prune(model, s)
            cache[s] = BaselineResult(pruned, s, 1 - count_params(ModelGraph(pruned)) / total)
        return cache[s]

    top = run(hi)
    if top.removed <= 0:
        return None
    if top.removed < fraction:
        return top
    lo_s, hi_s = 0.0, hi
    for _ in range(steps):
        mid = (lo_s + hi_s) / 2
        if run(mid).removed < fraction:
            lo_s = mid
        else:
            hi_s = mid
    return min(cache.values(), key=lambda r: (abs(r.removed - fraction), r.sparsity))


BASELINE_STYLES = {
    "onnxsim-l2": {"color": "k", "ls": ":", "marker": "x"},
    "onnxsim-wanda": {"color": "0.4", "ls": "-.", "marker": "+"},
}


def plot_curves(
    path: str, results: dict, fractions: Sequence[float], criteria: Sequence[str], repairs: Sequence[str],
    baselines: Sequence[str], *, xlabel: str, ylabel: str, title: str, styles: dict | None = None,
    reference: float | None = None, height: float = 4.4,
) -> None:  # fmt: skip
    """One panel per repair: each criterion's score against the percentage removed, onnxsim on every panel.

    `results[criterion, repair, fraction]` and `results[baseline, "-", fraction]` are (score, fraction
    removed); a baseline misses fractions it could not reach. `reference` draws the unpruned score.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = BASELINE_STYLES if styles is None else styles
    fig, axes = plt.subplots(1, len(repairs), figsize=(5 * len(repairs), height), dpi=110, sharey=True)
    axes = np.atleast_1d(axes)
    for ax, rep in zip(axes, repairs):
        for crit in criteria:
            ax.plot([results[crit, rep, f][1] * 100 for f in fractions], [results[crit, rep, f][0] for f in fractions],
                    marker="o", ms=3, label=crit)  # fmt: skip
        for b in baselines:
            pts = [(results[b, "-", f][1] * 100, results[b, "-", f][0]) for f in fractions if (b, "-", f) in results]
            if pts:
                ax.plot(*zip(*pts), label=b, **styles.get(b, {}))
        if reference is not None:
            ax.axhline(reference, color="k", ls="--", lw=0.8, label="unpruned")
        ax.set_title(f"repair: {rep}")
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


def sweep_args(
    ap, argv, *, fractions: str, criteria: str, repairs: str, allocation: str, calib_samples: int, plot: str
) -> tuple:
    """Add the options of a criterion x repair x fraction sweep against onnxsim (with these defaults) to the
    parser `ap` and parse `argv`; returns (args, fractions, criteria, repairs, baselines) as lists."""
    ap.add_argument("--fractions", default=fractions)
    ap.add_argument("--criteria", default=criteria)
    ap.add_argument("--repairs", default=repairs)
    ap.add_argument("--allocation", default=allocation, choices=("uniform", "global", "lamp"))
    ap.add_argument("--calib-samples", type=int, default=calib_samples)
    ap.add_argument("--baselines", default=",".join(METHODS), help="comma list, or '' for none")
    ap.add_argument("--plot", default=plot)
    args = ap.parse_args(argv)
    split = [float(f) for f in args.fractions.split(",")], args.criteria.split(","), args.repairs.split(",")
    return (args, *split, [b for b in args.baselines.split(",") if b])
