"""The HTML pages from Jinja2 templates shipped in the package (``pcace/viz/templates``).

One base layout (``base.html``), one style sheet (``style.css``) and one script
(``report.js``, whose parts each run only where the page has their elements) serve every
page: the one-target report (``report.html``), the overview of a run with several targets
or labels (``atlas.html``) and the notebook fragment (``fragment.html``, with its own scoped
``notebook.css``). Autoescaping is on, so every value a page shows is escaped once, by the
template. Pages are self-contained: the style, the script and the figures (base64) are
inline and nothing is loaded from elsewhere. Every page is written atomically.
"""

from __future__ import annotations

import base64
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from ..core.files import atomic_write

__all__ = ["TEMPLATES", "figure_view", "render_page", "static_text", "write_page"]

#: The folder of the templates inside the ``pcace.viz`` package.
TEMPLATES = "templates"


@lru_cache(maxsize=1)
def _environment() -> Environment:
    env = Environment(loader=PackageLoader("pcace.viz", TEMPLATES), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                      undefined=StrictUndefined)
    env.filters["code"] = code_spans
    return env


def code_spans(text: str) -> Markup:
    """Escaped text with its `backquoted` commands as ``<code>`` (the template filter
    ``code``).

    Examples
    --------
    >>> str(code_spans("run `pcace show a<b`"))
    'run <code>pcace show a&lt;b</code>'
    """
    parts = str(Markup.escape(text)).split("`")
    if len(parts) % 2 == 0:  # an unpaired backquote: leave the text as it is
        return Markup("`".join(parts))
    return Markup("".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)))


def _compact(text: str) -> str:
    """Lines without their indentation, and without blank or ``//`` comment lines (the
    files stay readable in the package; every page carries them, so they are kept small)."""
    lines = (line.strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line and not line.startswith("//")) + "\n"


@lru_cache(maxsize=8)
def static_text(name: str) -> Markup:
    """A style sheet or script of the templates folder, as trusted markup to inline.

    Examples
    --------
    >>> "data-ready" in static_text("report.js")
    True
    """
    text = files("pcace.viz").joinpath(TEMPLATES, name).read_text(encoding="utf-8")
    return Markup(_compact(text))


def render_page(template: str, **context: Any) -> str:
    """Render one of the package's templates with the shared style sheet and script.

    Parameters
    ----------
    template : str
        The template's file name (``report.html``, ``atlas.html``, ``fragment.html``).
    **context
        The values the template shows; strings are escaped by the template.

    Returns
    -------
    str
        The HTML.
    """
    context.setdefault("css", static_text("style.css"))
    context.setdefault("js", static_text("report.js"))
    return _environment().get_template(template).render(**context)


def figure_view(fig: Any) -> dict[str, str]:
    """What a template needs of a rendered figure: name, format, caption, base64 data."""
    return {"name": fig.name, "format": fig.format, "caption": fig.caption,
            "base64": base64.b64encode(fig.data).decode("ascii")}


def write_page(path: Path, html: str) -> Path:
    """Write a page atomically (:func:`pcace.core.files.atomic_write`): old page or new."""
    return atomic_write(path, html)
