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

SRC = Path(__file__).resolve().parents[1] / "src" / "pcace"

#: The stages, lowest first: the pipeline's order (DESIGN: data flows down this list).
STAGES = ["core", "inputs", "capture", "reduce", "maxcorr", "engines", "stats", "results",
          "viz", "run", "cli"]

MAX_MODULE_LINES = 700
LONG_FUNCTION = 80
MAX_LONG_FUNCTIONS = 5
MAX_FUNCTION_LINES = 150


def _modules(src: Path = SRC) -> dict[str, Path]:
    out = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def _targets(name: str, path: Path, modules: dict[str, Path] = MODULES
             ) -> list[tuple[str, list[str], int]]:
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
            subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
            out.append((module, [n for n in names if f"{module}.{n}" not in modules],
                        node.lineno))
            out += [(s, [], node.lineno) for s in subs]
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names
                    if a.name.split(".")[0] == "pcace"]
    return out


def _with_parents(module: str, modules: dict[str, Path] = MODULES) -> list[str]:
    """A module and every package above it (whose ``__init__`` runs when it is imported)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)
            if ".".join(parts[:i]) in modules]


def _stage(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in STAGES:
        return STAGES.index(parts[1])
    return None  # the top: pcace itself, __main__ and the public shortcuts


def _graph(modules: dict[str, Path] = MODULES) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for module, _, _ in _targets(name, path, modules):
            for target in _with_parents(module, modules):
                if target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def _upward(modules: dict[str, Path] = MODULES) -> list[str]:
    wrong = []
    for name, path in modules.items():
        mine = _stage(name)
        if mine is None:
            continue
        for module, _, line in _targets(name, path, modules):
            theirs = _stage(module)
            if theirs is None or theirs > mine:
                wrong.append(f"{path.name}:{line} ({name}) imports {module}")
    return wrong


def _cycles(modules: dict[str, Path] = MODULES) -> list[str]:
    graph = _graph(modules)
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                path = trail + [node]
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for node in sorted(modules):
        if node not in state:
            visit(node, [])
    return cycles


def test_every_stage_is_a_package():
    for stage in STAGES:
        assert (SRC / stage / "__init__.py").is_file(), stage


def test_imports_follow_the_stage_order():
    """A module imports only its own stage and those below; nothing in a stage imports the
    top (``pcace`` itself or a public shortcut)."""
    wrong = _upward()
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    cycles = _cycles()
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


def test_the_checks_find_what_they_are_for(tmp_path):
    """On a made-up package: an upward import inside a function, a cycle through a package's
    ``__init__``, and an import of the top are all found."""
    root = tmp_path / "pcace"
    for stage in ("core", "run"):
        (root / stage).mkdir(parents=True)
    files = {
        "__init__.py": "from .run.go import go\n",
        "core/__init__.py": "",
        "core/a.py": "def f():\n    from ..run import go\n",  # upward, inside a function
        "run/__init__.py": "from .go import go\n",
        "run/go.py": "from . import helper\ndef go():\n    pass\n",
        "run/helper.py": "from .go import go\n",  # go -> helper -> go
        "run/top.py": "import pcace\n",  # a stage importing the top
    }
    for name, text in files.items():
        (root / name).write_text(text)
    modules = _modules(root)
    wrong = _upward(modules)
    assert any("pcace.core.a" in w and "pcace.run" in w for w in wrong), wrong
    assert any("pcace.run.top" in w for w in wrong), wrong
    assert any("pcace.run.go" in c and "pcace.run.helper" in c for c in _cycles(modules))
