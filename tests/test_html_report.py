"""The HTML report: well-formed, self-contained, faithful to the stored summary, escaped; and in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import onnx
import pytest

from onnxprune.certificate import certify, store
from onnxprune.errors import ModelError
from onnxprune.html_report import layer_rows, render_report, write_report
from onnxprune.importer import import_model
from onnxprune.metadata import SUMMARY_KEY, set_metadata

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT / "models" / "fashion_mnist_cnn.onnx"
SVG_NAMESPACES = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
TABLES = ("summary", "facts", "config", "layers", "groups")


class Page(HTMLParser):
    """Checks nesting (every opened tag closed, in order) and collects each table's rows by table id."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag in VOID:
            return
        self.stack.append(tag)
        if tag == "table":
            self._table = dict(attrs).get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> Page:
    parser = Page()
    parser.feed(page)
    parser.close()
    assert not parser.errors, parser.errors[:5]
    assert not parser.stack, f"never closed: {parser.stack}"
    return parser


@pytest.fixture(scope="module")
def pruned():
    """(original, pruned model with summary and certificate, PassResult) of the Fashion-MNIST CNN at 0.3."""
    from onnxprune.passes.pruning import PruneConfig, PrunePass

    original = import_model(CNN)
    result = PrunePass(PruneConfig(ratio=0.3)).run(original)
    assert result.modified
    return original, result


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _body(rows: list[list[str]]) -> list[list[str]]:
    return rows[1:]  # the header row


def test_summary_numbers_and_tables(pruned):
    _, result = pruned
    summary = result.info["summary"]
    page = parse(render_report(result.model, "cnn.pruned.onnx"))
    assert set(TABLES) <= set(page.tables)
    sizes = {row[0]: row[1:] for row in _body(page.tables["summary"])}
    assert sizes["parameters"][:2] == [f"{summary['params_before']:,}", f"{summary['params_after']:,}"]
    assert sizes["MACs (batch 1)"][:2] == [f"{summary['macs_before']:,}", f"{summary['macs_after']:,}"]
    removed = 100 * (1 - summary["params_after"] / summary["params_before"])
    assert sizes["parameters"][2] == f"{removed:.1f}%"
    facts = dict(_body(page.tables["facts"]))
    assert facts["groups pruned"] == f"{summary['groups_pruned']} of {summary['groups']}"
    assert facts["channels removed"] == f"{summary['channels_removed']:,}"
    assert facts["criterion"] == "l1" and facts["allocation"] == "uniform" and facts["repair"] == "none"
    assert facts["rounding"] == "none"
    groups = _body(page.tables["groups"])
    assert [(g[0], g[2]) for g in groups] == [(k, str(v)) for k, v in summary["plan"].items()]
    assert "<svg" in render_report(result.model, "cnn.pruned.onnx")


def test_layer_table_matches_the_model(pruned):
    original, result = pruned
    page = parse(render_report(result.model, "cnn", original=original))
    rows = _body(page.tables["layers"])
    weights = {t.name: list(t.dims) for t in result.model.graph.initializer}
    layers = [n for n in result.model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(rows) == len(layers)
    for row, node in zip(rows, layers):
        assert row[0] == node.name and row[2] == node.input[1]
        dims = weights[node.input[1]]
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        assert row[4] == str(dims[0] if node.op_type == "Conv" or trans_b else dims[1])
    before = {r.weight: r.channels for r in layer_rows(original)}
    assert all(row[5] == str(before[row[2]]) for row in rows)
    assert any(int(row[4]) < int(row[5]) for row in rows)


def test_verification_section(pruned):
    original, result = pruned
    model = _copy(result.model)
    page = parse(render_report(model, "cnn"))
    assert "verification" not in page.tables
    assert "Not verified" in "".join(page.text)
    analysis = result.info["analysis"]
    cert = certify(original, model, analysis, result.info["plan"].labels(analysis), input_path=CNN)
    store(model, cert)
    page = parse(render_report(model, "cnn"))
    rows = dict(_body(page.tables["verification"]))
    assert rows["input model SHA-256"] == cert.input_sha256
    assert rows["inputs"] == cert.inputs and rows["tool"] == cert.tool
    assert float(rows["max relative error, masked original vs pruned"]) == pytest.approx(
        cert.exact_max_error, rel=0.01
    )
    assert "PASSED" in "".join(page.text)


def test_self_contained_no_urls(pruned):
    _, result = pruned
    page = render_report(result.model, "cnn")
    assert set(re.findall(r"https?://[^\s\"'<>)]+", page)) <= SVG_NAMESPACES
    tags = set(parse(page).tags)
    assert not tags & {"script", "link", "img", "iframe", "object", "embed"}
    assert "Content-Security-Policy" in page


def test_names_are_escaped(pruned):
    _, result = pruned
    model = _copy(result.model)
    evil = "<script>alert(1)</script>"
    model.graph.node[0].name = evil + "$\\frac{$"  # also no mathtext parse of '$' in plot labels
    page = render_report(model, f"<b>{evil}</b>")
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    parsed = parse(page)
    assert "script" not in parsed.tags and "b" not in parsed.tags
    assert _body(parsed.tables["layers"])[0][0] == evil + "$\\frac{$"


def test_model_without_metadata_is_refused():
    model = onnx.load(str(CNN))
    with pytest.raises(ModelError, match=r"no onnxprune metadata \(was it written by onnxprune\?\)"):
        render_report(model, "plain.onnx")
    set_metadata(model, SUMMARY_KEY, "{not json")
    with pytest.raises(ModelError, match="not a JSON object"):
        render_report(model, "plain.onnx")


def test_optional_group_sizes_and_sensitivity(pruned):
    _, result = pruned
    model = _copy(result.model)
    summary = json.loads(next(p.value for p in model.metadata_props if p.key == SUMMARY_KEY))
    analysis = result.info["analysis"]
    summary["group_sizes"] = {str(g.id): g.size for g in analysis.groups}
    summary["sensitivity"] = {
        "ratios": [0.1, 0.5],
        "groups": [
            {"id": 0, "channels": 32, "params": 320, "members": "<a>.weight[axis 0]", "errors": [None, 0.25]},
            {"id": 1, "channels": 64, "params": 640, "members": "b.weight[axis 0]", "errors": [0.01, 0.5]},
        ],
    }
    set_metadata(model, SUMMARY_KEY, json.dumps(summary))
    page_text = render_report(model, "cnn")
    page = parse(page_text)
    groups = {row[0]: row for row in _body(page.tables["groups"])}
    for g in analysis.groups:
        removed = summary["plan"].get(str(g.id), 0)
        assert groups[str(g.id)][1:4] == [str(g.size), str(removed), str(g.size - removed)]
    sens = _body(page.tables["sensitivity"])
    assert sens[0] == ["0", "32", "320", "<a>.weight[axis 0]", "-", "0.25"]
    assert sens[1][4:] == ["0.01", "0.5"]
    assert page_text.count("<svg") == 2


def test_other_summaries_render():
    """A summary with other keys (the unconstrained pass's) renders what it has, with no error."""
    model = onnx.load(str(CNN))
    record = {"mode": "unconstrained", "config": {"ratio": 0.5}, "params_before": 1000, "params_after": 900,
              "effective_params_after": 600, "groups_pruned": 2, "seconds": 0.1}  # fmt: skip
    set_metadata(model, SUMMARY_KEY, json.dumps(record))
    page = parse(render_report(model, "u"))
    sizes = {row[0]: row[1:] for row in _body(page.tables["summary"])}
    assert sizes["non-zero parameters"] == ["1,000", "600", "40.0%"]


def test_deterministic_and_leaves_matplotlib_alone(pruned):
    import matplotlib

    _, result = pruned
    backend, fonttype = matplotlib.get_backend(), matplotlib.rcParams["svg.fonttype"]
    had_pyplot = "matplotlib.pyplot" in sys.modules
    first = render_report(result.model, "cnn")
    assert render_report(result.model, "cnn") == first
    assert matplotlib.get_backend() == backend and matplotlib.rcParams["svg.fonttype"] == fonttype
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot


def test_write_report(pruned, tmp_path):
    _, result = pruned
    from onnxprune.io import save_model

    path = save_model(result.model, tmp_path / "cnn.pruned.onnx")
    out = write_report(path, original_path=CNN)
    assert out == tmp_path / "cnn.pruned.report.html"
    page = parse(out.read_text(encoding="utf-8"))
    assert len(_body(page.tables["layers"])[0]) == 7  # with the before/kept columns
    assert write_report(path, tmp_path / "r.html") == tmp_path / "r.html"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cnn.pruned.onnx",
        "cnn.pruned.report.html",
        "r.html",
    ]


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`)")
def test_in_a_headless_browser(pruned, tmp_path):
    original, result = pruned
    summary = result.info["summary"]
    html_path = tmp_path / "report.html"
    html_path.write_text(render_report(result.model, "cnn.pruned.onnx", original=original), encoding="utf-8")
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom", html_path.as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = parse(proc.stdout)
    assert set(TABLES) <= set(dom.tables)
    sizes = {row[0]: row[1:] for row in _body(dom.tables["summary"])}
    assert sizes["parameters"][:2] == [f"{summary['params_before']:,}", f"{summary['params_after']:,}"]
    assert len(_body(dom.tables["layers"])) == len(layer_rows(result.model))
    assert "svg" in dom.tags


def test_report_notes_an_original_that_is_not_the_pruned_models(tmp_path, capsys):
    """--original is checked against the SHA-256 the certificate recorded: another model's before / after
    columns would compare unrelated layers without a word."""
    from onnxprune.cli import main

    out = tmp_path / "cnn.pruned.onnx"
    assert main(["prune", str(CNN), "-o", str(out), "--verify", "--json"]) == 0
    capsys.readouterr()
    other = ROOT / "models" / "fashion_mnist_resnet.onnx"
    assert main(["report", str(out), "--original", str(other), "-o", str(tmp_path / "a.html")]) == 0
    assert "is not the file cnn.pruned.onnx was pruned from" in capsys.readouterr().err
    assert main(["report", str(out), "--original", str(CNN), "-o", str(tmp_path / "b.html")]) == 0
    assert capsys.readouterr().err == ""


def test_the_allocation_of_a_record_without_one_is_the_default_it_ran_with():
    """Records written before the allocation was stored ran the old default: global with --global or a latency
    target, else uniform (the HTML page once said uniform for a latency target); a stored one is read as is."""
    from onnxprune.report import recorded_allocation

    assert recorded_allocation({"ratio": 0.3}) == "uniform"
    assert recorded_allocation({"target_params": "70%"}) == "uniform"
    assert recorded_allocation({"target_latency": "0.6x"}) == "global"
    assert recorded_allocation({"global_ranking": True}) == "global"
    assert recorded_allocation({"target_params": "70%", "allocation": "lamp"}) == "lamp"
