"""Human-readable output for the CLI: rich tables for prune, analyze and sensitivity, the unconstrained summary."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _fmt(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _pct(after: int, before: int) -> str:
    return f"{100 * (1 - after / before):.1f}%" if before else "-"


def print_prune_summary(s: dict) -> None:
    console = Console()
    table = Table(title=f"onnxprune: {s['input']} -> {s['output']}")
    for col in ("", "before", "after", "removed"):
        table.add_column(col, justify="right")
    table.add_row("params", _fmt(s["params_before"]), _fmt(s["params_after"]), _pct(s["params_after"], s["params_before"]))
    table.add_row("MACs", _fmt(s["macs_before"]), _fmt(s["macs_after"]), _pct(s["macs_after"], s["macs_before"]))
    console.print(table)
    console.print(
        f"groups pruned: {s['groups_pruned']} of {s['groups']}, channels removed: {s['channels_removed']}, "
        f"{s['seconds']:.2f} s"
    )
    _print_barriers(console, s["barriers"])


def print_analysis(result: dict, analysis) -> None:
    console = Console()
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
    """Why weight axes are not prunable, grouped by reason (most weights first)."""
    if not frozen:
        return
    by_reason: dict[str, list[str]] = {}
    for f in frozen:
        reason = f["reason"].split(" (")[0]
        by_reason.setdefault(reason, []).append(f"{f['tensor']}:{f['axis']}")
    table = Table(title="weight axes that stay whole, by reason")
    for col in ("reason", "weight axes", "examples"):
        table.add_column(col)
    for reason, items in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        table.add_row(reason, str(len(items)), ", ".join(items[:3]) + (" ..." if len(items) > 3 else ""))
    console.print(table)


def _print_barriers(console: Console, barriers: list[dict]) -> None:
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


def print_sensitivity(rows, ratios: list[float], criterion: str, repair: str) -> None:
    """Per-group output error at each ratio (`sensitivity.SensitivityRow`s); '-' where no channel goes."""
    import math

    table = Table(title=f"output error when pruning one group ({criterion}, repair {repair})")
    for col in ("group", "channels", "params", "members"):
        table.add_column(col)
    for r in ratios:
        table.add_column(f"{r:.0%}", justify="right")
    for row in rows:
        table.add_row(str(row.group), str(row.channels), str(row.params), row.members,
                      *("-" if math.isnan(e) else f"{e:.3g}" for e in row.errors))
    Console().print(table)


def print_unconstrained_summary(s: dict) -> None:
    """Three lines: input -> output, stored and nonzero parameters, copy operators per inference."""
    c = s.get("copies", {})
    print(f"{s['input']} -> {s['output']} (unconstrained)")
    print(f"params {s.get('params_before')} -> {s.get('params_after')} stored, {s.get('effective_params_after')} nonzero")
    print(f"copy ops {c.get('copy_ops', 0)} {c.get('ops', {})}, {c.get('bytes', 0)} bytes per inference")
