"""Human-readable output for the CLI: rich tables for prune (both modes), analyze and sensitivity.

`print_prune_summary` prints one layout for every prune mode: a size table (parameters, MACs, and for
unconstrained pruning the non-zero parameters) and a settings table naming the mode, criterion, ratio or
target, allocation, rounding, repair, what was removed and the verification result. rich is imported only
when something is printed, so importing this module costs nothing.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from onnxprune.channels import ChannelAnalysis
    from onnxprune.sensitivity import SensitivityRow

# What `sensitivity.relative_error` measures: sqrt(sum (pruned - original)^2 / sum original^2) over every
# element of every output and every sample. Named in the sensitivity table's title and its JSON (`metric`).
SENSITIVITY_METRIC = "relative L2 error of all outputs"


# The `prune --json` contract: these keys, in this order, in every mode; null where the mode or the options
# leave one empty (README, "Command line"). `prune_record` fills the gaps and refuses a key not listed here.
PRUNE_KEYS = (
    "input", "output", "tool", "mode", "config", "params_before", "params_after", "effective_params_after",
    "macs_before", "macs_after", "groups", "groups_pruned", "channels_removed", "group_sizes", "plan", "barriers",
    "repair", "sensitivity", "sparsity", "latency", "refine", "verification", "units", "boundaries", "layout",
    "copies", "tuned", "notices", "seconds",
)


def prune_record(record: dict) -> dict:
    """`record` (a mode's summary plus the CLI's input, output, verification, latency, refine) as the one prune
    JSON record: every key of `PRUNE_KEYS` in its order, the missing ones null (``notices``: an empty list).
    Constrained mode's ``effective_params_after`` is ``params_after`` less the weights ``--sparsity`` zeroed."""
    unknown = set(record) - set(PRUNE_KEYS)
    if unknown:
        raise AssertionError(f"prune JSON keys outside the contract: {sorted(unknown)}")
    out = {key: record.get(key) for key in PRUNE_KEYS}
    out["mode"] = out["mode"] or "constrained"
    out["notices"] = out["notices"] or []
    if out["effective_params_after"] is None and isinstance(out["params_after"], int):
        out["effective_params_after"] = out["params_after"] - int((out["sparsity"] or {}).get("zeroed", 0))
    return out


def _console() -> Console:
    """A rich console on stdout whose closed pipe raises BrokenPipeError (the CLI then exits quietly with 0;
    rich's own handling would exit with status 1)."""
    from rich.console import Console

    class _PipeConsole(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError

    return _PipeConsole()


def _fmt(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _pct(after: int, before: int) -> str:
    return f"{100 * (1 - after / before):.1f}%" if before else "-"


def print_prune_summary(s: dict, shown: tuple[str, ...] = ()) -> None:
    """The summary of `onnxprune prune`, constrained or unconstrained (the CLI's JSON record), then its notices
    as ``note:`` lines, but those in `shown` (printed before the work) and the latency one (a table row)."""
    from rich.table import Table

    console = _console()
    unconstrained = s.get("mode") == "unconstrained"
    title = f"onnxprune: {s['input']} -> {s['output']}" + (" (unconstrained)" if unconstrained else "")
    console.print(title, markup=False, highlight=False)  # a line, not a table title: long paths stay whole
    sizes = Table()
    for col in ("", "before", "after", "removed"):
        sizes.add_column(col, justify="right")
    stored = "params (stored)" if unconstrained else "params"
    sizes.add_row(stored, _fmt(s["params_before"]), _fmt(s["params_after"]), _pct(s["params_after"], s["params_before"]))
    if unconstrained and "effective_params_after" in s:
        eff = s["effective_params_after"]
        sizes.add_row("params (nonzero)", _fmt(s["params_before"]), _fmt(eff), _pct(eff, s["params_before"]))
    sizes.add_row("MACs", _fmt(s["macs_before"]), _fmt(s["macs_after"]), _pct(s["macs_after"], s["macs_before"]))
    console.print(sizes)
    settings = Table(show_header=False, title="how")
    settings.add_column("setting", style="bold")
    settings.add_column("value")
    for name, value in settings_rows(s):
        settings.add_row(name, value)
    console.print(settings)
    _print_barriers(console, s.get("barriers") or [])
    for notice in s.get("notices") or []:
        if notice not in shown and not notice.startswith("latency not measured"):
            console.print(f"note: {notice}", markup=False, highlight=False)


def recorded_allocation(config: dict) -> str:
    """The allocation a prune record names (either mode); records written before it was stored (always, since the
    default for a parameter target became lamp) ran the old default: global with --global or a latency target,
    else uniform."""
    return str(config.get("allocation") or (
        "global" if config.get("global_ranking") or config.get("target_latency") else "uniform"))


def settings_rows(s: dict) -> list[tuple[str, str]]:
    """(setting, value) rows of a prune summary: how the channels were chosen, what went, the check."""
    config = s.get("config") or {}
    unconstrained = s.get("mode") == "unconstrained"
    rows = [("mode", "unconstrained (each coupled layer keeps its own channels)" if unconstrained else "constrained")]
    rows.append(("criterion", str(config.get("criterion", "-"))))
    target = next(((k, config[k]) for k in ("target_params", "target_macs") if config.get(k) is not None), None)
    if target is not None:
        rows.append(("target", f"keep {target[1]} of the {'parameters' if target[0] == 'target_params' else 'MACs'}"))
    else:
        rows.append(("ratio", f"{config.get('ratio', '-')} of the channels of each group"
                     if not unconstrained else f"{config.get('ratio', '-')} of the channels of each layer"))
    if unconstrained:
        extra = [f"drive {config.get('drive', 'free')}"]
        if config.get("share"):
            extra.append(f"share {config['share']}")
        if config.get("union_cap") is not None:
            extra.append(f"union cap {config['union_cap']}")
        rows.append(("allocation", f"{recorded_allocation(config)}; per layer, " + ", ".join(extra)))
        multiple = config.get("stream_multiple", 1)
        rows.append(("rounding", "none" if multiple == 1 else f"stream widths a multiple of {multiple}"))
    else:
        allocation = recorded_allocation(config)
        if config.get("target_latency"):
            allocation += ", importance per millisecond saved" if allocation != "uniform" else ""
            wanted = str(config["target_latency"])
            rows[-1] = ("target", f"latency {wanted}" + (" of the dense model's" if wanted.lower().endswith("x") else ""))
        rows.append(("allocation", str(allocation)))
        rows.append(("rounding", rounding_text(config)))
    rows.append(("repair", repair_text(config, s.get("repair"))))
    pruned = f"{s.get('groups_pruned', 0)} of {s.get('groups', '-')}"
    if s.get("channels_removed") is not None:
        pruned += f", {s['channels_removed']} channels removed"
    rows.append(("groups pruned", pruned))
    if unconstrained:
        copies = s.get("copies") or {}
        rows.append(("copies", f"{copies.get('copy_ops', 0)} copy ops, {copies.get('bytes', 0)} bytes per inference"))
    if s.get("sparsity"):
        rows.append(("sparsity", sparsity_text(s["sparsity"])))
    rows.append(("verification", verification_text(s.get("verification"))))
    if s.get("latency"):
        rows.append(("latency", latency_text(s["latency"])))
    else:
        missing = next((n for n in s.get("notices") or [] if n.startswith("latency not measured")), None)
        if missing:
            rows.append(("latency", missing.removeprefix("latency ")))
    if s.get("seconds") is not None:
        rows.append(("time", f"{s['seconds']:.2f} s"))
    return rows


def rounding_text(config: dict) -> str:
    """How kept channel counts were rounded (``round_to``: 1, N or auto)."""
    round_to = config.get("round_to", 1)
    if round_to == "auto":
        return f"auto: kept channels at the bottom of latency steps measured on {config.get('latency_backend', 'ort')}"
    return "none" if round_to == 1 else f"kept channels a multiple of {round_to}"


def latency_text(latency: dict) -> str:
    """One line about a measured latency (the summary's ``latency`` record)."""
    text = (f"{latency['speedup']:.2f}x faster on {latency['backend']} ({latency['dense_ms']:.3g} -> "
            f"{latency['pruned_ms']:.3g} ms; predicted {latency['predicted_speedup']:.2f}x), MACs "
            f"{latency['macs_reduction']:.2f}x fewer: efficiency {latency['efficiency']:.2f}")
    if latency.get("target"):
        text += f"; target {latency['target']} {'reached' if latency.get('reached') else 'NOT reached'} " \
                f"after {latency.get('iterations', 1)} measurement(s)"
    if latency.get("message"):
        text += f" ({latency['message']})"
    return text


def sparsity_text(sp: dict) -> str:
    """One line about fine-grained pruning (the summary's ``sparsity`` record, `sparsity.SparsityReport`)."""
    return (f"{sp.get('pattern')}: {sp.get('achieved', 0):.1%} of {_fmt(sp.get('prunable_weights', 0))} prunable "
            f"weights zero ({sp.get('model_sparsity', 0):.1%} of the model) in {len(sp.get('layers') or {})} layers, "
            f"{len(sp.get('dense') or {})} dense; {sp.get('criterion')}, {sp.get('allocation')}, repair "
            f"{sp.get('repair')} ({sp.get('repaired', 0)} repaired)")


def repair_text(config: dict, info: dict | None) -> str:
    """One line about the repair a record's `config` names and what it did (the record's ``repair``,
    `repair.RepairReport.as_dict`), for the text and the HTML reports."""
    method = str(config.get("repair", "none")) + (" + stream targets" if config.get("stream_repair") else "")
    if not isinstance(info, dict):
        return method
    skipped = info.get("skipped")
    n_skipped = len(skipped) if isinstance(skipped, dict) else skipped
    text = f"{method}: {info.get('repaired', 0)} layers repaired, {n_skipped or 0} skipped"
    if info.get("added_biases"):
        text += f", {info['added_biases']} biases added"
    relu = info.get("relu_refit")
    if isinstance(relu, dict):
        text += (f"; relu refit: {relu.get('refitted', 0)} layers, post-activation error "
                 f"{relu.get('error_before', 0):.3g} -> {relu.get('error_after', 0):.3g}")
    return text


def verification_text(cert: dict | None) -> str:
    """One line about an equivalence certificate (`certificate.Certificate.as_dict`), or 'not run'."""
    if not cert:
        return "not run (--verify checks the pruned model in onnxruntime)"
    error = cert.get("exact_max_error")
    shown = "non-finite" if error is None else f"{error:.2g}"
    verdict = "passed" if cert.get("passed") else "FAILED"
    sign = "<=" if cert.get("passed") else ">"
    return f"{verdict}: max error {shown} {sign} tolerance {cert.get('tolerance', 0):.0e} ({cert.get('inputs', '')})"


def print_analysis(result: dict, analysis: ChannelAnalysis | None = None) -> None:
    """The summary of `onnxprune analyze`: sizes, groups, barriers, weights that stay whole."""
    from rich.table import Table

    console = _console()
    console.print(
        f"params {_fmt(result['params'])}, MACs {_fmt(result['macs'])}, "
        f"prunable params {_fmt(result['prunable_params'])} in {len(result['groups'])} groups"
    )
    table = Table(title="coupled channel groups")
    for col in ("id", "channels", "params", "members"):
        table.add_column(col, justify="right" if col != "members" else "left")
    for g in result["groups"]:
        members = ", ".join(g["members"][:4]) + (f" (+{len(g['members']) - 4})" if len(g["members"]) > 4 else "")
        table.add_row(str(g["id"]), str(g["channels"]), _fmt(g["params"]), members)
    console.print(table)
    _print_barriers(console, result["barriers"])
    _print_frozen(console, result.get("frozen_weights", []))


def _print_frozen(console: Console, frozen: list[dict]) -> None:
    """Why weight axes are not prunable: one row per reason (`ChannelAnalysis.frozen_weights`)."""
    from rich.table import Table

    if not frozen:
        return
    table = Table(title="weight axes that stay whole, by reason")
    for col in ("reason", "weight axes", "examples", "at nodes"):
        table.add_column(col)
    for row in frozen:
        more = " ..." if row["count"] > len(row["examples"]) else ""
        table.add_row(row["reason"], str(row["count"]), ", ".join(row["examples"]) + more, ", ".join(row["nodes"]))
    console.print(table)


def _print_barriers(console: Console, barriers: list[dict]) -> None:
    from rich.table import Table

    if not barriers:
        return
    table = Table(title=f"barriers ({len(barriers)}): channels through these are frozen")
    for col in ("node", "op", "reason"):
        table.add_column(col)
    for b in barriers[:30]:
        table.add_row(b["node"], b["op_type"], b["reason"])
    console.print(table)
    if len(barriers) > 30:
        console.print(f"... and {len(barriers) - 30} more")


def print_sensitivity(rows: list[SensitivityRow], ratios: list[float], criterion: str, repair: str) -> None:
    """Per-group output error at each ratio (`sensitivity.SensitivityRow`s); '-' where no channel goes."""
    from rich.table import Table

    table = Table(title=f"{SENSITIVITY_METRIC} when pruning one group ({criterion}, repair {repair})")
    for col in ("group", "channels", "params", "members"):
        table.add_column(col)
    for r in ratios:
        table.add_column(f"{r:.0%}", justify="right")
    for row in rows:
        table.add_row(str(row.group), str(row.channels), str(row.params), row.members,
                      *("-" if math.isnan(e) else f"{e:.3g}" for e in row.errors))
    _console().print(table)
