"""The layering contract (ARCHITECTURE.md), checked on the import graph of the package as it installs.

The source folders `onnxprune/`, `passes/` and `targets/` install as one package: `onnxprune`,
`onnxprune.passes`, `onnxprune.targets`. import-linter and grimp scan a package's folder, so the test copies
the sources into that installed layout first and analyses the copy. Every import counts, including the ones
inside functions (an import moved into a function still makes a dependency and can still close a cycle).

Contract (the `[tool.importlinter]` section of pyproject.toml holds the layers part for `lint-imports`):
- core (`onnxprune.*` except `cli` and the facade `onnxprune/__init__.py`) imports neither `onnxprune.passes`
  nor `onnxprune.targets`; passes never import targets; only the CLI and the facade compose everything;
- `tvm` is imported only inside `onnxprune.targets`;
- no import cycles between modules;
- no module over 600 lines.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = {"onnxprune": ROOT / "onnxprune", "onnxprune/passes": ROOT / "passes", "onnxprune/targets": ROOT / "targets"}
COMPOSERS = {"onnxprune", "onnxprune.cli"}
MAX_LINES = 600

grimp = pytest.importorskip("grimp")


@pytest.fixture(scope="module")
def installed_tree(tmp_path_factory) -> Path:
    """The package's Python sources copied into the layout `pip install` gives them."""
    top = tmp_path_factory.mktemp("layout")
    for dest, src in LAYOUT.items():
        for path in src.rglob("*.py"):
            target = top / dest / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return top


@pytest.fixture(scope="module")
def graph(installed_tree):
    sys.path.insert(0, str(installed_tree))
    saved = {k: v for k, v in sys.modules.items() if k == "onnxprune" or k.startswith("onnxprune.")}
    for k in saved:
        del sys.modules[k]  # grimp must find the copy, not the installed (editable) package
    try:
        yield grimp.build_graph("onnxprune", include_external_packages=True, cache_dir=None)
    finally:
        sys.path.remove(str(installed_tree))
        for k in [k for k in sys.modules if k == "onnxprune" or k.startswith("onnxprune.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _layer(module: str) -> str:
    if module in COMPOSERS:
        return "composer"
    for layer in ("passes", "targets"):
        if module == f"onnxprune.{layer}" or module.startswith(f"onnxprune.{layer}."):
            return layer
    return "core" if module.startswith("onnxprune") else "external"


FORBIDDEN = {"core": {"passes", "targets"}, "passes": {"targets"}}


def test_lower_layers_never_import_upper_ones(graph):
    violations = []
    for module in sorted(m for m in graph.modules if _layer(m) in FORBIDDEN):
        for imported in graph.find_modules_directly_imported_by(module):
            if _layer(imported) in FORBIDDEN[_layer(module)]:
                line = graph.get_import_details(importer=module, imported=imported)
                where = line[0]["line_number"] if line else "?"
                violations.append(f"{module}:{where} imports {imported}")
    assert not violations, "layering broken:\n" + "\n".join(violations)


def test_tvm_only_inside_targets(graph):
    if "tvm" not in graph.modules:
        return  # nothing imports tvm at all
    importers = graph.find_modules_that_directly_import("tvm")
    outside = sorted(m for m in importers if _layer(m) != "targets")
    assert not outside, f"tvm imported outside onnxprune.targets: {outside}"


def test_no_import_cycles(graph):
    import networkx as nx

    modules = [m for m in graph.modules if m.startswith("onnxprune")]
    digraph = nx.DiGraph()
    digraph.add_nodes_from(modules)
    for m in modules:
        for imported in graph.find_modules_directly_imported_by(m):
            # A package's __init__ importing its own submodules (re-exports) is how packages work; a cycle
            # through a parent package that a submodule imports back is not counted twice.
            if imported.startswith("onnxprune") and not m.startswith(imported + "."):
                digraph.add_edge(m, imported)
    cycles = list(nx.simple_cycles(digraph, length_bound=12))
    shown = "\n".join(" -> ".join(c + [c[0]]) for c in sorted(cycles, key=len)[:10])
    assert not cycles, f"{len(cycles)} import cycles, e.g.:\n{shown}"


def test_import_linter_contracts(installed_tree):
    lint = shutil.which("lint-imports")
    if lint is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    env = {"PYTHONPATH": str(installed_tree), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    proc = subprocess.run([lint, str(ROOT / "pyproject.toml"), "--no-cache"], cwd=installed_tree,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_no_module_over_the_size_limit():
    long = []
    for src in LAYOUT.values():
        for path in src.rglob("*.py"):
            lines = sum(1 for _ in path.open(encoding="utf-8"))
            if lines > MAX_LINES:
                long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not long, "split these by concept:\n" + "\n".join(long)
