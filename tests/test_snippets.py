"""Every ```python block of README.md and docs/*.md runs, so the examples cannot drift.

The blocks of one file run in order in one namespace (a later block may use the names of an
earlier one, as a reader would in one session), in a temporary working directory laid out
like the one the docs assume, on small data: ``resnet20-12fca82f.th`` links to the shared
CIFAR ResNet-20 and ``cifar10/test/<class>/`` holds the first few images of each class.

A block that cannot run here (a Ray cluster, a download, a GPU) is preceded in the markdown
by an invisible marker with the reason::

    <!-- snippet: skip - needs a running Ray cluster (tests/test_ray_engine.py runs it) -->

Besides the data, the work that does not grow with it is turned down while the snippets
run (``EFFORT``: the gradient-ascent steps of the feature visualisations, the random sets of
an ablation), through the functions' defaults, so a snippet runs as written, on the same
code paths.

Where a block is followed by a ```text block of the output it prints, the lines of that
output that do not depend on the data (its first line, numbers aside, and the pointers to
the full tables and the report) must be what the block prints.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
CLASSES = ("cat",)           # the class folders the snippets read
PER_CLASS = 40               # images linked per class folder
EFFORT = {   # (module, function): {parameter: default while the snippets run}
    ("pcace.viz.assets", "collect_assets"): {"featurevis_steps": 8},
    ("pcace.stats.ablate", "ablate"): {"repeats": 2, "sizes": (1, 8), "resamples": 2},
}
SKIP = re.compile(r"<!--\s*snippet:\s*skip\b\s*[-:]?\s*(.*?)\s*-->", re.S)
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    """One fenced block: its language, first code line (1-based), code and skip reason."""

    lang: str
    line: int
    code: str
    skip: str | None = None


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file, in order; a skip marker on the nearest
    non-blank line before a block's fence applies to that block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = SKIP.search(prev)
        if "snippet:" in prev and marker is None:
            raise AssertionError(f"{path.name}:{i}: unreadable snippet marker {prev!r}")
        out.append(Block(m.group(1), i + 2, "\n".join(lines[i + 1:j]),
                         None if marker is None else marker.group(1)))
        i = j + 1
    return out


def python_blocks(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.lang == "python"]


def with_python() -> list[Path]:
    return [p for p in DOCS if python_blocks(p)]


def test_the_docs_have_snippets():
    names = {p.name for p in with_python()}
    assert {"README.md", "guide.md"} <= names, names


def test_skip_markers_give_a_reason():
    for path in DOCS:
        for b in blocks(path):
            if b.skip is not None:
                assert b.lang == "python", f"{path.name}:{b.line}: skip marker on a {b.lang} block"
                assert b.skip.strip(), f"{path.name}:{b.line}: skip marker without a reason"


@pytest.fixture
def workdir(shared_dir, tmp_path, monkeypatch):
    """A working directory with the paths the docs use, on a few images per class."""
    data = shared_dir / "data/cifar10"
    (tmp_path / "resnet20-12fca82f.th").symlink_to(data / "resnet20-12fca82f.th")
    for name in CLASSES:
        folder = tmp_path / "cifar10/test" / name
        folder.mkdir(parents=True)
        for image in sorted((data / "test" / name).glob("*.jpg"))[:PER_CLASS]:
            (folder / image.name).symlink_to(image)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for (module, name), values in EFFORT.items():
        _lower_defaults(monkeypatch, getattr(importlib.import_module(module), name), values)
    return tmp_path


def _lower_defaults(monkeypatch, fn, values: dict) -> None:
    """Change the defaults of ``fn``'s parameters for the test (restored after it)."""
    params = inspect.signature(fn).parameters
    positional = [p for p in params.values()
                  if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty]
    defaults = list(fn.__defaults__ or ())
    kwdefaults = dict(fn.__kwdefaults__ or {})
    for key, value in values.items():
        assert key in params and params[key].default is not params[key].empty, (fn, key)
        if key in kwdefaults:
            kwdefaults[key] = value
        else:
            defaults[[p.name for p in positional].index(key)] = value
    monkeypatch.setattr(fn, "__defaults__", tuple(defaults) or None)
    monkeypatch.setattr(fn, "__kwdefaults__", kwdefaults or None)


def _shown_output(path: Path, block: Block) -> str | None:
    """The ```text block right after ``block``, if the markdown shows one."""
    after = blocks(path)
    for a, b in zip(after, after[1:], strict=False):
        if a.line == block.line and b.lang == "text":
            between = path.read_text(encoding="utf-8").splitlines()[
                a.line + a.code.count("\n"):b.line - 2]
            if all(not s.strip() or s.strip() == "```" for s in between):
                return b.code
    return None


def _fixed_lines(text: str) -> list[str]:
    """The lines of a print-out that do not depend on the data: the first (its numbers
    replaced by #) and the pointers to the full tables and the report."""
    lines = text.strip().splitlines()
    head = re.sub(r"\d+", "#", lines[0]) if lines else ""
    return [head] + [s for s in lines if s.startswith(("Full tables:", "Report:"))]


@pytest.mark.parametrize("path", with_python(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_snippets_run(path: Path, workdir):
    todo = python_blocks(path)
    readme = python_blocks(REPO_ROOT / "README.md")
    if path.name == "index.md" and [b.code for b in todo] == [b.code for b in readme]:
        pytest.skip("docs/index.md repeats README.md's snippets, which run as README.md")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    namespace: dict = {"__name__": "__snippets__"}
    rel = path.relative_to(REPO_ROOT)
    skipped = []
    for block in todo:
        # padded with blank lines so that a traceback's line numbers are the markdown's
        code = compile("\n" * (block.line - 1) + block.code, str(rel), "exec")
        if block.skip is not None:      # compiled all the same: no syntax errors
            skipped.append(f"{rel}:{block.line} ({block.skip})")
            continue
        out = io.StringIO()
        error = None
        try:
            with contextlib.redirect_stdout(out):
                exec(code, namespace)
        except Exception:
            error = traceback.format_exc()
        finally:
            plt.close("all")
        if error is not None:
            pytest.fail(f"the snippet at {rel}:{block.line} fails:\n{error}"
                        f"its output:\n{out.getvalue()}", pytrace=False)
        shown = _shown_output(path, block)
        if shown is not None:
            printed = out.getvalue()
            assert _fixed_lines(printed) == _fixed_lines(shown), (
                f"the output shown after {rel}:{block.line} is not what it prints "
                f"(on {PER_CLASS} images per class):\n{printed}")
    if skipped:
        print("skipped:", *skipped, sep="\n  ")
