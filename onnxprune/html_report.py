"""One self-contained HTML page about a pruned model, built from what onnxprune stored in it.

Start reading at `render_report`. The page is built from:

* ``metadata_props["onnxprune.summary"]`` (written by the pruning passes, see `metadata.stamp`): sizes
  before and after, the configuration, the plan ``{group id: channels removed}``, repair, notices;
* ``metadata_props["onnxprune.certificate"]`` when present (`certificate.store`): the verification;
* the model itself: one row per Conv/ConvTranspose/Gemm/MatMul whose weight is an initializer, with its
  output channels (and the channels before pruning when the original model is given).

Two optional summary entries add sections when present:

* ``group_sizes``: ``{group id: channels before pruning}`` for every group: kept/total per group;
* ``sensitivity``: the shape ``onnxprune sensitivity --json`` prints, ``{"metric": "relative L2 error of all
  outputs", "ratios": [0.1, 0.3, ...],
  "groups": [{"id": 0, "channels": 64, "params": 36928, "members": "conv1.weight[axis 0]", "errors":
  [float | null, ...]}, ...]}`` with one error per ratio (the `report.SENSITIVITY_METRIC` when only that group
  loses that fraction of its channels; null where the ratio removes no channel): a table and curves.

Self-contained means readable offline and inert: inline CSS, plots as inline SVG drawn by matplotlib on a
standalone `Figure` (never pyplot, never `matplotlib.use`: the caller's backend and figures are untouched),
no script, no external URL (a Content-Security-Policy forbids loading anything), every string that comes
from the model HTML-escaped.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxprune.certificate import read as read_certificate
from onnxprune.errors import ModelError
from onnxprune.graph import ModelGraph
from onnxprune.io import write_atomically
from onnxprune.metadata import SUMMARY_KEY, read_json_entry
from onnxprune.quantized import source_initializer
from onnxprune.report import SENSITIVITY_METRIC, recorded_allocation, repair_text

MAX_PLOTTED_LAYERS = 300  # a bar per layer stays visible up to about this many
MAX_LEGEND_GROUPS = 12
MAX_NAMED_LAYERS = 80  # beyond this, bars without names (the table has them)

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #1d2430; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 1.8em;
     border-bottom: 1px solid #d8dde6; padding-bottom: 0.2em; }
.sub { color: #5a6475; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d8dde6; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f1f4f8; } td.num { text-align: right; white-space: nowrap; }
td.name { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: 0.92em;
          word-break: break-all; }
.pass { color: #116b2f; font-weight: 600; } .fail { color: #a4161a; font-weight: 600; }
.note { color: #5a6475; }
figure { margin: 0.8em 0; } figcaption { color: #5a6475; font-size: 0.92em; }
svg { max-width: 100%; height: auto; }
"""


@dataclass(frozen=True)
class LayerRow:
    """One weighted layer: its node, weight and output channels (before pruning when known)."""

    node: str
    op_type: str
    weight: str
    shape: tuple[int, ...]
    channels: int
    channels_before: int | None = None


def render_report(model: onnx.ModelProto, title: str, original: onnx.ModelProto | None = None) -> str:
    """The HTML page (a str) for a model pruned by onnxprune.

    Args:
        model: the pruned model (its weights may be lazy: only initializer dims are read).
        title: page title, e.g. the model's file name.
        original: the model before pruning, to show per-layer channels before/after (matched by weight name).

    Raises:
        ModelError: the model holds no onnxprune summary, or an unreadable one.
    """
    summary = read_summary(model, title)
    certificate = read_certificate(model)
    layers = layer_rows(model, original)
    parts = [
        _head(title, summary),
        _summary_section(summary),
        _config_section(summary),
        _verification_section(certificate),
        _layers_section(layers),
        _groups_section(summary),
        _sensitivity_section(summary.get("sensitivity")),
        "<footer class='note'>"
        + _esc(f"Written by {summary.get('tool', 'onnxprune')}; self-contained, no network access needed.")
        + "</footer>\n</body>\n</html>\n",
    ]
    return "".join(parts)


def write_report(
    model_path: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    original_path: str | os.PathLike | None = None,
) -> Path:
    """Render the report of a model file and write it atomically; returns the output path.

    Args:
        model_path: the pruned model file.
        out_path: the HTML file; default ``NAME.report.html`` beside the model.
        original_path: the model before pruning (optional), for per-layer before/after channels.

    Raises:
        ModelError: the model file is unreadable or holds no onnxprune metadata.
        OnnxPruneError: the output cannot be written.
    """
    from onnxprune.importer import load_model

    model_path = Path(model_path)
    out = (
        Path(out_path)
        if out_path is not None
        else model_path.with_name(model_path.name.removesuffix(".onnx") + ".report.html")
    )
    model = load_model(model_path, check=False)
    original = load_model(original_path, check=False) if original_path is not None else None
    page = render_report(model, model_path.name, original).encode("utf-8")
    write_atomically(out, lambda f: f.write(page))
    return out


def original_mismatch(model_path: str | os.PathLike, original_path: str | os.PathLike) -> str | None:
    """Why `original_path` is likely not the model `model_path` was pruned from (its SHA-256 is not the one
    the equivalence certificate recorded), or None (it is, or the model carries no certificate)."""
    from onnxprune.certificate import read, sha256_of
    from onnxprune.importer import load_model

    cert = read(load_model(model_path, check=False)) or {}
    recorded = cert.get("input_sha256")
    if not recorded or sha256_of(original_path) == recorded:
        return None
    return (f"--original {original_path} is not the file {Path(model_path).name} was pruned from (its SHA-256 "
            "differs from the certificate's): the before / after columns compare other models")


def read_summary(model: onnx.ModelProto, where: str = "model") -> dict:
    """The ``onnxprune.summary`` record of a model.

    Raises:
        ModelError: there is none, or it is not a JSON object.
    """
    try:
        value = read_json_entry(model, SUMMARY_KEY)
    except ValueError as exc:
        raise ModelError(f"{where}: {exc}") from None
    if value is None:
        raise ModelError(f"{where}: no onnxprune metadata (was it written by onnxprune?)")
    return value


# ---- layers -----------------------------------------------------------------------------------------
def layer_rows(model: onnx.ModelProto, original: onnx.ModelProto | None = None) -> list[LayerRow]:
    """Conv/ConvTranspose/Gemm/MatMul nodes whose weight is an initializer (or a dequantized one), in graph
    order."""
    before = {r.weight: r.channels for r in _layers(original)} if original is not None else {}
    return [
        LayerRow(r.node, r.op_type, r.weight, r.shape, r.channels, before.get(r.weight))
        for r in _layers(model)
    ]


def _layers(model: onnx.ModelProto) -> list[LayerRow]:
    dims = {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}
    graph = ModelGraph(model)
    rows = []
    for k, node in enumerate(model.graph.node):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        # a quantized (QDQ) weight: the integer initializer behind its DequantizeLinear
        shape = dims.get(node.input[1]) or dims.get(source_initializer(graph, node.input[1]) or "")
        if not shape or len(shape) < 2:
            continue
        channels = _output_channels(node, shape)
        rows.append(
            LayerRow(node.name or f"{node.op_type}_{k}", node.op_type, node.input[1], shape, channels)
        )
    return rows


def _output_channels(node: onnx.NodeProto, shape: tuple[int, ...]) -> int:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        return shape[0]
    if node.op_type == "ConvTranspose":  # weight (C_in, C_out / group, k...)
        return shape[1] * int(attrs.get("group", 1))
    if node.op_type == "Gemm":
        return shape[0] if attrs.get("transB", 0) else shape[1]
    return shape[-1]  # MatMul: x @ W


# ---- sections ---------------------------------------------------------------------------------------
def _head(title: str, summary: dict) -> str:
    mode = summary.get("mode", "constrained")
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'\">\n"
        f"<title>{_esc(title)}: onnxprune report</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_esc(title)}</h1>\n<p class='sub'>{_esc(f'onnxprune report, {mode} pruning')}</p>\n"
    )


def _summary_section(s: dict) -> str:
    config = s.get("config") or {}
    rows = []
    for label, key in (("parameters", "params"), ("MACs (batch 1)", "macs")):
        before, after = s.get(f"{key}_before"), s.get(f"{key}_after")
        if isinstance(before, int) and isinstance(after, int):
            rows.append([label, _int(before), _int(after), _removed_pct(before, after)])
    if isinstance(s.get("effective_params_after"), int) and isinstance(s.get("params_before"), int):
        eff = s["effective_params_after"]
        rows.append(
            [
                "non-zero parameters",
                _int(s["params_before"]),
                _int(eff),
                _removed_pct(s["params_before"], eff),
            ]
        )
    sizes = _table(["", "before", "after", "removed"], rows, numeric={1, 2, 3}, table_id="summary")
    facts = []
    if "groups" in s:
        facts.append(["groups pruned", f"{s.get('groups_pruned', 0)} of {s['groups']}"])
    elif "groups_pruned" in s:
        facts.append(["groups pruned", str(s["groups_pruned"])])
    if "channels_removed" in s:
        facts.append(["channels removed", _int(s["channels_removed"])])
    if "criterion" in config:
        facts.append(["criterion", str(config["criterion"])])
    if "ratio" in config:
        facts.append(["ratio", str(config["ratio"])])
    for key in ("target_params", "target_macs"):
        if config.get(key) is not None:
            facts.append([key.replace("_", " "), str(config[key])])
    if "global_ranking" in config or "allocation" in config:
        facts.append(["allocation", recorded_allocation(config)])
    if "round_to" in config:
        facts.append(
            [
                "rounding",
                "none" if config["round_to"] == 1 else f"kept channels a multiple of {config['round_to']}",
            ]
        )
    if "repair" in config:
        facts.append(["repair", repair_text(config, s.get("repair"))])
    for key in ("tool", "seconds"):
        if key in s:
            facts.append([key, str(s[key])])
    notices = s.get("notices") or []
    note_html = "<ul>" + "".join(f"<li>{_esc(str(n))}</li>" for n in notices) + "</ul>\n" if notices else ""
    return (
        "<section>\n<h2>Summary</h2>\n"
        + sizes
        + _table(["", "value"], facts, table_id="facts")
        + note_html
        + "</section>\n"
    )


def _config_section(s: dict) -> str:
    config = s.get("config") or {}
    if not config:
        return ""
    rows = [[str(k), _value(v)] for k, v in config.items()]
    return (
        "<section>\n<h2>Configuration</h2>\n"
        + _table(["option", "value"], rows, table_id="config")
        + "</section>\n"
    )


def _verification_section(cert: dict | None) -> str:
    head = "<section>\n<h2>Verification</h2>\n"
    if cert is None:
        return (
            head
            + "<p class='note' id='not-verified'>Not verified: the model holds no equivalence certificate.</p>\n</section>\n"
        )
    passed = cert.get("passed") is True
    verdict = (
        f"<p class='{'pass' if passed else 'fail'}' id='verdict'>"
        f"{'PASSED' if passed else 'FAILED'}: the pruned model "
        f"{'computes' if passed else 'does not compute'} what the original computes with the removed "
        "channels silenced.</p>\n"
    )
    labels = {
        "exact_max_error": "max relative error, masked original vs pruned",
        "tolerance": "tolerance",
        "output_change": "max relative output change, original vs pruned",
        "inputs": "inputs",
        "tool": "tool",
        "input_sha256": "input model SHA-256",
        "seconds": "seconds",
    }
    rows = [[labels[k], _value(cert.get(k))] for k in labels if k in cert]
    rows += [[str(k), _value(v)] for k, v in cert.items() if k not in labels and k != "passed"]
    return head + verdict + _table(["", "value"], rows, table_id="verification") + "</section>\n"


def _layers_section(rows: list[LayerRow]) -> str:
    head = "<section>\n<h2>Kept channels per layer</h2>\n"
    if not rows:
        return (
            head
            + "<p class='note'>No Conv, Gemm or MatMul layer with an initializer weight.</p>\n</section>\n"
        )
    known = any(r.channels_before is not None for r in rows)
    headers = ["layer", "op", "weight", "shape", "output channels"] + (["before", "kept"] if known else [])
    table = []
    for r in rows:
        cells = [r.node, r.op_type, r.weight, "×".join(map(str, r.shape)), str(r.channels)]
        if known:
            before = r.channels_before
            cells += [str(before) if before is not None else "-", _pct(r.channels, before) if before else "-"]
        table.append(cells)
    numeric = {4, 5, 6} if known else {4}
    plotted = rows[:MAX_PLOTTED_LAYERS]
    caption = "Output channels of each layer" + (
        " before (light) and after pruning" if known else " after pruning"
    )
    if len(rows) > len(plotted):
        caption += f"; the first {len(plotted)} of {len(rows)} layers"
    return (
        head
        + _figure(_layer_plot(plotted, known), caption)
        + _table(headers, table, numeric=numeric, names={0, 2}, table_id="layers")
        + "</section>\n"
    )


def _groups_section(s: dict) -> str:
    plan = s.get("plan")
    if not isinstance(plan, dict):
        return ""
    sizes: dict = s["group_sizes"] if isinstance(s.get("group_sizes"), dict) else {}
    ids = sorted(
        set(plan) | set(sizes),
        key=lambda g: (not str(g).isdigit(), int(g) if str(g).isdigit() else 0, str(g)),
    )
    rows = []
    for gid in ids:
        removed = int(plan.get(gid, 0))
        size = sizes.get(gid)
        if isinstance(size, int):
            rows.append([str(gid), str(size), str(removed), str(size - removed), _pct(size - removed, size)])
        else:
            rows.append([str(gid), "-", str(removed), "-", "-"])
    note = "" if sizes else "<p class='note'>Group sizes were not recorded: removed channels only.</p>\n"
    return (
        "<section>\n<h2>Kept channels per group</h2>\n"
        + note
        + _table(
            ["group", "channels", "removed", "kept", "kept %"], rows, numeric={1, 2, 3, 4}, table_id="groups"
        )
        + "</section>\n"
    )


def _sensitivity_section(sens) -> str:
    if not isinstance(sens, dict) or not sens.get("groups"):
        return ""
    ratios = [float(r) for r in sens.get("ratios", [])]
    groups = sens["groups"]
    headers = ["group", "channels", "params", "members"] + [f"{r:.0%}" for r in ratios]
    rows = []
    for g in groups:
        errors = list(g.get("errors") or [])
        rows.append(
            [
                str(g.get("id", "")),
                str(g.get("channels", "")),
                _int(g.get("params")),
                str(g.get("members", "")),
                *(_sci(e) for e in errors),
            ]
        )
    numeric = {1, 2} | set(range(4, 4 + len(ratios)))
    metric = str(sens.get("metric") or SENSITIVITY_METRIC)
    caption = f"{metric[:1].upper()}{metric[1:]} when only one group loses the given fraction of its channels"
    return (
        "<section>\n<h2>Sensitivity</h2>\n"
        + _figure(_sensitivity_plot(groups, ratios), caption)
        + _table(headers, rows, numeric=numeric, names={3}, table_id="sensitivity")
        + "</section>\n"
    )


# ---- plots ------------------------------------------------------------------------------------------
def _layer_plot(rows: list[LayerRow], known: bool) -> str:
    """Bars of output channels per layer: horizontal with names up to `MAX_NAMED_LAYERS`, else unnamed."""
    from matplotlib.figure import Figure

    n = len(rows)
    named = n <= MAX_NAMED_LAYERS
    fig = Figure(figsize=(8.0, 1.2 + 0.17 * n) if named else (min(16.0, max(8.0, 0.05 * n)), 3.6))
    ax = fig.subplots()
    bar = ax.barh if named else ax.bar
    x = range(n)
    if known:
        bar(x, [r.channels_before or 0 for r in rows], color="#c9d6ea", label="before")
    bar(x, [r.channels for r in rows], color="#2f6db5", label="after" if known else "output channels")
    if named:
        ax.set_yticks(list(x), [_shorten(r.node) for r in rows], fontsize=7, parse_math=False)
        ax.set_ylim(n - 0.4, -0.6)  # graph order from the top
        ax.set_xlabel("output channels")
        ax.grid(True, axis="x", alpha=0.3)
    else:
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_xlabel("layer (graph order)")
        ax.set_ylabel("output channels")
        ax.grid(True, axis="y", alpha=0.3)
    if known:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _svg(fig, "layers")


def _shorten(name: str, limit: int = 48) -> str:
    """A plot label: long names keep their start and end (the table has them whole)."""
    return name if len(name) <= limit else name[: limit // 2 - 1] + "…" + name[-(limit // 2) :]


def _sensitivity_plot(groups: list[dict], ratios: list[float]) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    drawn = 0
    for g in groups:
        errors = [_positive(e) for e in (g.get("errors") or [])][: len(ratios)]
        if all(math.isnan(e) for e in errors):
            continue
        label = f"group {g.get('id', '?')} ({g.get('channels', '?')} ch)"
        ax.plot([r * 100 for r in ratios[: len(errors)]], errors, marker="o", markersize=3, label=label)
        drawn += 1
    ax.set_xlabel("channels removed from the group (%)")
    ax.set_ylabel(SENSITIVITY_METRIC)
    if drawn:
        ax.set_yscale("log")
        if drawn <= MAX_LEGEND_GROUPS:
            ax.legend(fontsize=7, ncol=2)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _svg(fig, "sensitivity")


def _positive(e) -> float:
    """A plottable error for a log axis: None, non-numbers and values <= 0 become NaN (a gap)."""
    return float(e) if isinstance(e, (int, float)) and math.isfinite(e) and e > 0 else math.nan


def _svg(fig, prefix: str) -> str:
    """The figure as an inline ``<svg>`` element: text as text, no XML prolog or metadata, ids prefixed.

    The prolog's DOCTYPE and the RDF metadata carry URLs; ids are prefixed because several inline SVGs
    share one HTML document (matplotlib numbers each figure's ids from 1)."""
    import matplotlib

    buf = io.StringIO()
    # A temporary rc context: text stays text (small, selectable, no glyph outlines) and ids are
    # deterministic; the caller's settings are restored on exit.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "onnxprune"}):
        fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}-\1"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}-\1)", svg)
    svg = re.sub(r'href="#([^"]+)"', rf'href="#{prefix}-\1"', svg)
    return svg.strip() + "\n"


# ---- formatting -------------------------------------------------------------------------------------
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _esc(text: str) -> str:
    """HTML-escaped text; control characters (invalid in HTML) become U+FFFD."""
    return html.escape(_CONTROL.sub("\ufffd", text), quote=True)


def _table(
    headers: list[str],
    rows: list[list[str]],
    numeric: Collection[int] = (),
    names: Collection[int] = (),
    table_id: str = "",
) -> str:
    """An HTML table; every cell is escaped. `numeric` columns align right, `names` use a monospace font."""
    out = [f"<table id='{table_id}'>\n" if table_id else "<table>\n", "<thead><tr>"]
    out += [f"<th>{_esc(h)}</th>" for h in headers]
    out.append("</tr></thead>\n<tbody>\n")
    for row in rows:
        out.append("<tr>")
        for k, cell in enumerate(row):
            cls = " class='num'" if k in numeric else " class='name'" if k in names else ""
            out.append(f"<td{cls}>{_esc(cell)}</td>")
        out.append("</tr>\n")
    out.append("</tbody>\n</table>\n")
    return "".join(out)


def _figure(svg: str, caption: str) -> str:
    return f"<figure>\n{svg}<figcaption>{_esc(caption)}</figcaption>\n</figure>\n"


def _int(n) -> str:
    return f"{n:,}" if isinstance(n, int) else "-"


def _pct(part: int, whole: int | None) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _removed_pct(before: int, after: int) -> str:
    return f"{100 * (1 - after / before):.1f}%" if before else "-"


def _sci(e) -> str:
    return f"{e:.3g}" if isinstance(e, (int, float)) and math.isfinite(e) else "-"


def _value(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if isinstance(v, bool) else "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return str(v)
