"""The layout of src/lookalike: no import cycles and no import of a layer above.

The layer order is written down once, in docs/architecture.md (the block between the
`layers:begin` and `layers:end` markers); this test reads it from there, so the document
and the rule cannot drift apart. Every import counts, including the ones inside functions.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lookalike"
DOC = ROOT / "docs" / "architecture.md"
ENTRY = "__main__"
"""`python -m` entry modules run the faces; nothing imports them, so they sit on top."""


def read_layers(doc: Path = DOC) -> list[list[str]]:
    """The layers, lowest first, from the doc's block: one line a layer, the highest
    first, e.g. `L8  api cli` (words after `#` are a comment)."""
    text = doc.read_text(encoding="utf-8")
    match = re.search(r"<!-- layers:begin -->(.*?)<!-- layers:end -->", text, re.S)
    assert match, f"{doc} has no layers:begin/layers:end block"
    layers = []
    for line in match.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if re.match(r"^L\d+\s", line):
            layers.append(line.split()[1:])
    assert layers, f"{doc}: the layers block lists no layers"
    return layers[::-1]


def module_names(package: Path) -> dict[str, Path]:
    """Dotted module names (`lookalike.cli.search`) of every .py file in the package."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's own modules that `name` imports, resolved to module names."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` or `from a.b import c` names the deepest module that exists
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    # a package's __init__ gathering its own children is not an upward edge
    if is_package:
        found = {t for t in found if not t.startswith(name + ".")}
    return found


def layer_of(name: str, layers: list[list[str]], top: str) -> int | None:
    """Layer index of a module: its first part below the top package names the unit."""
    parts = name.split(".")
    if parts[-1] == ENTRY:
        return len(layers)
    if len(parts) == 1:
        return 0  # the package itself holds only its version
    unit = parts[1]
    for level, units in enumerate(layers):
        if unit in units:
            return level
    return None


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def layout_problems(package: Path, layers: list[list[str]]) -> list[str]:
    modules = module_names(package)
    top = package.name
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    problems = [f"cycle: {' -> '.join(c)}" for c in find_cycles(graph)]
    for name in sorted(graph):
        mine = layer_of(name, layers, top)
        if mine is None:
            problems.append(f"{name}: not in any layer of docs/architecture.md")
            continue
        for target in sorted(graph[name]):
            theirs = layer_of(target, layers, top)
            if theirs is not None and theirs > mine:
                problems.append(f"upward import: {name} (L{mine}) imports {target} (L{theirs})")
    return problems


def test_src_has_no_cycles_and_no_upward_imports():
    problems = layout_problems(PACKAGE, read_layers())
    assert not problems, "\n".join(problems)


def test_every_layer_unit_in_the_doc_exists():
    """A stale name in the doc would silently allow nothing; keep the list true."""
    modules = module_names(PACKAGE)
    units = {name.split(".")[1] for name in modules if name.count(".") >= 1}
    missing = [u for layer in read_layers() for u in layer if u not in units]
    assert not missing, f"docs/architecture.md names units that do not exist: {missing}"


# ---------------------------------------------------------------- the checker itself


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, body in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(body))
    return root


LAYERS = [["low"], ["mid"], ["high"]]


def test_checker_finds_a_cycle_through_a_lazy_import(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "__init__.py": "",
            "low.py": "def f():\n    from .mid import g\n",
            "mid.py": "from . import low\n",
            "high.py": "",
        },
    )
    problems = layout_problems(pkg, LAYERS)
    assert "cycle: pkg.low -> pkg.mid" in problems
    assert "upward import: pkg.low (L0) imports pkg.mid (L1)" in problems


def test_checker_finds_upward_and_unplaced_modules(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "__init__.py": "",
            "low.py": "import pkg.high.deep as d\n",
            "mid.py": "x = 1\n",
            "high/__init__.py": "from .deep import y\n",
            "high/deep.py": "from pkg import mid\n",
            "stray.py": "",
        },
    )
    problems = layout_problems(pkg, LAYERS)
    assert "upward import: pkg.low (L0) imports pkg.high.deep (L2)" in problems
    assert "pkg.stray: not in any layer of docs/architecture.md" in problems
    # downward imports, and a package's __init__ gathering its children, are fine
    assert not [p for p in problems if p.startswith(("upward import: pkg.mid", "cycle"))]
    assert not [p for p in problems if "pkg.high (L2) imports pkg.high.deep" in p]


def test_layers_block_is_read_highest_first(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text(
        "x\n<!-- layers:begin -->\n```\nL1  b c   # top\nL0  a\n```\n<!-- layers:end -->\n"
    )
    assert read_layers(doc) == [["a"], ["b", "c"]]
    doc.write_text("no block here\n")
    with pytest.raises(AssertionError):
        read_layers(doc)
