"""The house's rules, checked on the source: stages in order, no cycles, small modules.

Every import of every module counts, also those inside functions, and importing a
submodule counts as importing each package above it (its ``__init__`` runs first). The
stages, lowest first, are :data:`STAGES`; a module may import its own stage and those
below it. The top-level modules (``pcace/__init__.py``, ``__main__.py`` and the public
shortcuts such as ``pcace/zoo.py``) form the top and nothing inside a stage imports them.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "pcace"

#: The stages, lowest first: the pipeline's order (DESIGN: data flows down this list).
STAGES = ["core", "inputs", "capture", "reduce", "maxcorr", "engines", "stats", "results",
          "viz", "run", "cli"]

MAX_MODULE_LINES = 700
LONG_FUNCTION = 80
MAX_LONG_FUNCTIONS = 5
MAX_FUNCTION_LINES = 150


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def _targets(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """Every pcace module ``name`` imports, with the names it takes and the line."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(name, path).split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.split(".")[0] == "pcace":
                continue
            names = [a.name for a in node.names]
            subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
            out.append((module, [n for n in names if f"{module}.{n}" not in MODULES],
                        node.lineno))
            out += [(s, [], node.lineno) for s in subs]
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names
                    if a.name.split(".")[0] == "pcace"]
    return out


def _with_parents(module: str) -> list[str]:
    """A module and every package above it (whose ``__init__`` runs when it is imported)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)
            if ".".join(parts[:i]) in MODULES]


def _stage(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in STAGES:
        return STAGES.index(parts[1])
    return None  # the top: pcace itself, __main__ and the public shortcuts


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in MODULES.items():
        for module, _, _ in _targets(name, path):
            for target in _with_parents(module):
                if target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def test_every_stage_is_a_package():
    for stage in STAGES:
        assert (SRC / stage / "__init__.py").is_file(), stage


def test_imports_follow_the_stage_order():
    """A module imports only its own stage and those below; nothing in a stage imports the
    top (``pcace`` itself or a public shortcut)."""
    wrong = []
    for name, path in MODULES.items():
        mine = _stage(name)
        if mine is None:
            continue
        for module, _, line in _targets(name, path):
            theirs = _stage(module)
            if theirs is None or theirs > mine:
                wrong.append(f"{path.relative_to(SRC.parent)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = _graph()
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [node, nxt]
                                          if nxt in trail else [node, nxt]))
            elif nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for node in sorted(MODULES):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def test_no_private_names_across_subpackages():
    wrong = []
    for name, path in MODULES.items():
        mine = name.split(".")[:2]
        for module, names, line in _targets(name, path):
            other = module.split(".")[:2] != mine
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if other and (private or any(p.startswith("_") for p in module.split(".")[1:])):
                wrong.append(f"{path.relative_to(SRC.parent)}:{line} {module} {private}")
    assert not wrong, "\n".join(wrong)


def _function_lengths() -> list[tuple[int, str]]:
    out = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                out.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(out, reverse=True)


def test_modules_and_functions_are_small():
    big = [f"{p.relative_to(SRC.parent)}: {n} lines" for p in MODULES.values()
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not big, "\n".join(big)
    long = [(n, f) for n, f in _function_lengths() if n > LONG_FUNCTION]
    assert len(long) <= MAX_LONG_FUNCTIONS, long
    assert all(n <= MAX_FUNCTION_LINES for n, _ in long), long


@pytest.mark.parametrize("edge", [("pcace.stats.null", "pcace.run.rank"),
                                  ("pcace.core.validation", "pcace.inputs.data")])
def test_the_checks_can_fail(edge, tmp_path):
    """The stage rule itself: an upward import is found (checked on a made-up edge)."""
    low, high = edge
    assert _stage(low) < _stage(high)
