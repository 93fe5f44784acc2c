"""The package's layering, read from the source with ``ast`` (nothing is imported, so the checks
take milliseconds): no import cycle between modules, the outputs layer below every writer,
commands only in the command layer, one definition of each shared constant, and a
docs/architecture.md that names every module.

Every import counts: at module level, inside functions (lazy imports) and under
``TYPE_CHECKING``; relative imports are resolved. ``from pkg import name`` is an edge to the
module ``pkg.name`` when that is a module, else to ``pkg`` (its ``__init__``). Importing
``a.b.c`` is an edge to ``a.b.c`` only: the parents' ``__init__`` run first, but a package
``__init__`` that re-exports its own modules is not a cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "shardtune"
PACKAGE = "shardtune"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


MODULES = _modules()


def _known(name: str) -> str | None:
    """``name`` or its nearest enclosing module that is ours (None: not shardtune)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> dict[str, int]:
    """shardtune modules ``module`` imports -> the line of the first such import."""
    path, is_package = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    found: dict[str, int] = {}

    def add(name: str | None, line: int) -> None:
        if name and name != module:
            found.setdefault(name, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_known(alias.name), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                add(full if full in MODULES else _known(target), node.lineno)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a closed path of module names) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is small (~150 modules)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_within(graph, set(group)) for group in groups]


def _path_within(graph: dict[str, dict[str, int]], group: set[str]) -> list[str]:
    """A shortest cycle through the group's first module, staying inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return paths[v] + [start]
                if w in group and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return sorted(group)  # pragma: no cover - a strongly connected group always closes


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    steps = [f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(steps + [cycle[-1]])


def test_the_graph_sees_lazy_relative_and_type_checking_imports(tmp_path):
    """The walker finds what a cycle hides behind: an import inside a function, a relative
    ``from ..x import y`` and a ``TYPE_CHECKING`` import (checked on modules known to have them)."""
    assert "shardtune.exits" in GRAPH["shardtune.cli"]  # from .exits import ... (module level)
    assert "shardtune.finetuning" in GRAPH["shardtune.cli"]  # inside a function
    assert "shardtune.config" in GRAPH["shardtune.cli"]  # from .config import parse_args (package)
    assert "shardtune.train.perf" in GRAPH["shardtune.train.loop"]  # under TYPE_CHECKING
    assert _cycles({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles between modules under src/shardtune (lazy imports count):\n" + \
        "\n".join(_describe(c, GRAPH) for c in cycles)


# --------------------------------------------------------------------------- layers

OUTPUTS = "shardtune.outputs"
# What the outputs layer (ownership, digests, atomic writes) may import: only the error type and
# itself. Everything that writes sits above it.
OUTPUTS_MAY_IMPORT = ("shardtune.outputs", "shardtune.config.errors")
# The command layer: argument parsing and `main`s live only here: cli.py, commands/, the recipe,
# any package's own cli.py or __main__.py, and the demo command.
COMMAND_LAYER = ("shardtune.cli", "shardtune.commands", "shardtune.finetuning", "shardtune.demo.run",
                 *(m for m in MODULES if m.rsplit(".", 1)[-1] in ("cli", "__main__")))
# Library packages that never import the command layer or the recipe.
LIBRARY = ("shardtune.checkpoint", "shardtune.config", "shardtune.data", "shardtune.model",
           "shardtune.parallel", "shardtune.train", "shardtune.outputs", "shardtune.infer")


def _in(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _violations(sources, allowed) -> list[str]:
    return [f"{m} imports {d} (line {line})" for m in sorted(GRAPH) if _in(m, sources)
            for d, line in sorted(GRAPH[m].items()) if not _in(d, allowed)]


def test_the_outputs_layer_is_below_every_writer():
    assert any(m.startswith(OUTPUTS + ".") for m in MODULES)
    bad = _violations([OUTPUTS], OUTPUTS_MAY_IMPORT)
    assert not bad, "the outputs layer must import nothing above it:\n" + "\n".join(bad)


def test_checkpoint_imports_neither_conversion_nor_training_nor_commands():
    above = ("shardtune.convert", "shardtune.train", "shardtune.infer", "shardtune.eval", "shardtune.demo",
             "shardtune.plan", *COMMAND_LAYER)
    bad = [v for v in _violations(["shardtune.checkpoint"], []) if _in(v.split(" imports ")[1].split()[0], above)]
    assert not bad, "checkpoint/ is below convert/, train/ and the commands:\n" + "\n".join(bad)


def test_library_modules_do_not_import_the_command_layer():
    bad = [v for v in _violations(LIBRARY, []) if _in(v.split(" imports ")[1].split()[0], COMMAND_LAYER)]
    assert not bad, "\n".join(bad)


def test_argument_parsing_lives_in_the_command_layer():
    """Library modules hold no argparse parser and no `main`: commands are in cli.py, commands/
    and the packages' own cli.py."""
    bad = []
    for module, (path, _) in MODULES.items():
        if _in(module, COMMAND_LAYER):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if "argparse" in names:
                    bad.append(f"{module}:{node.lineno} imports argparse")
            elif isinstance(node, ast.FunctionDef) and node.name == "main" and node in tree.body:
                bad.append(f"{module}:{node.lineno} defines main()")
    assert not bad, "command entry points outside the command layer:\n" + "\n".join(bad)


# --------------------------------------------------------------------------- one definition per rule


@pytest.mark.parametrize("name, value", [("IGNORE_INDEX", -100)])
def test_each_shared_constant_is_defined_once(name, value):
    """A constant is assigned in one module under src/ (the others import it)."""
    where = []
    for module, (path, _) in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                where.append(f"{module}:{node.lineno}")
    assert len(where) == 1, f"{name} is defined in {len(where)} modules: {where}"


# --------------------------------------------------------------------------- docs


ARCHITECTURE = ROOT / "docs" / "architecture.md"


def _named_in_doc(module: str, text: str) -> bool:
    """The convention (docs/architecture.md states it): a module is named by its path under
    src/shardtune/ (``checkpoint/layout.py``) anywhere in the page, or by its file name
    (``layout.py``) in its package's entry of the layout block (the lines from ``  checkpoint/``
    to the next entry); a package (its ``__init__.py``) by its folder (``checkpoint/``)."""
    parts = module.split(".")[1:]
    if not parts:
        return True  # shardtune/__init__.py: the page is about it
    is_package = MODULES[module][1]
    if ("/".join(parts) + ("/" if is_package else ".py")) in text:
        return True
    if is_package or len(parts) == 1:
        return False
    package = "/".join(parts[:-1])
    block = re.search(rf"(?ms)^  {re.escape(package)}/(.*?)(?=^  \S|^```)", text)
    return bool(block and re.search(rf"(?<![\w/]){re.escape(parts[-1])}\.py\b", block.group(1)))


def test_architecture_doc_names_every_module():
    text = ARCHITECTURE.read_text()
    missing = sorted(m for m in MODULES if not _named_in_doc(m, text))
    assert not missing, (
        "docs/architecture.md does not name these modules (add each to the layout block, by its path "
        "under src/shardtune/ or by its file name in its package's entry, with one line on its job): "
        + ", ".join(_doc_name(m) for m in missing))


def _doc_name(module: str) -> str:
    """How the page would name ``module``: ``checkpoint/layout.py``, or ``commands/`` for a package."""
    return module.removeprefix("shardtune.").replace(".", "/") + ("/" if MODULES[module][1] else ".py")


def test_architecture_doc_names_every_command():
    from shardtune.cli import COMMANDS

    text = ARCHITECTURE.read_text()
    missing = [c for c in COMMANDS if f"shardtune {c}" not in text]
    assert not missing, f"docs/architecture.md does not name the commands {missing}"


def test_architecture_doc_cites_only_files_that_exist():
    """A page or module the architecture page points to is in the repository (it once cited a
    DESIGN.md that was not)."""
    text = ARCHITECTURE.read_text()
    cited = set(re.findall(r"[\w./-]+\.md\b", text))
    missing = sorted(c for c in cited if not any((base / c).is_file() for base in (ROOT, ROOT / "docs")))
    assert not missing, f"docs/architecture.md cites files that are not in the repository: {missing}"

