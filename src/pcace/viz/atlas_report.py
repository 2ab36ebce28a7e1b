"""The HTML report of a run with several targets, or one per label: an overview and a page each.

``report.html`` is the overview: the class atlas (layers x targets evidence, and the last
layer's channel selectivity, :func:`pcace.viz.class_atlas`) and one row per target with
its verdict, its best layer and that layer's top channels, linking to the target's own
page. ``report-<target>.html`` is, for each target, the report a one-target run would get
(:meth:`pcace.PCACEResult.subset`), with its figures under ``figures/<target>/``. Like
the one-target report, every page is self-contained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ..core.files import atomic_write, safe_name
from ._common import figure_bytes
from .assets import load_assets
from .evidence import full_layers, report_groups, run_evidence
from .pages import figure_view, render_page, write_page
from .report import REPORT_FILE, RenderedFigure, render_figures
from .report_view import page_context, skipped_text

__all__ = ["report_groups", "write_atlas_report"]


def _page_file(name: str) -> str:
    return f"report-{safe_name(name)}.html"


def _row(name: str, sub: Any, evidence: pd.DataFrame) -> dict[str, Any]:
    counts = evidence.evidence.value_counts()
    ranked = evidence.assign(
        key=evidence.significant_share.fillna(-1.0) + 1e-3 * evidence.median_adj.fillna(0.0))
    best = ranked.sort_values("key", ascending=False).iloc[0]
    top = sub.channels[(sub.channels.layer == best.layer)].sort_values("rank").head(5)
    share = best.significant_share
    return {"name": name, "page": _page_file(name), "strong": int(counts.get("strong", 0)),
            "weak": int(counts.get("weak", 0)), "none": int(counts.get("none", 0)),
            "layer": best.layer, "share": "" if pd.isna(share) else f"{share:.0%}",
            "top": ", ".join(f"{c} ({v:.2f})" for c, v in
                             zip(top.channel, top.pcace, strict=True))}


def _overview(result: Any, rows: list[dict[str, Any]], atlas: RenderedFigure | None,
              title: str) -> str:
    m = result.manifest
    per_label = bool(m.get("per_label"))
    what = ("each label's images ranked against " +
            ("its own class's score" if m.get("data", {}).get("own_class") else "the score")
            if per_label else f"{len(rows)} targets from one forward pass")
    n_images = f"{m.get('data', {}).get('n_images', '?')}{skipped_text(m)}"
    return render_page("atlas.html", title=title, n_images=n_images,
                       what=what, atlas=figure_view(atlas) if atlas is not None else None,
                       rows=rows, version=m.get("pcace_version", ""))


def write_atlas_report(root: Path, result: Any, *, top: int = 10,
                       progress: bool = False) -> Path:
    """Write ``root/report.html`` (the overview) and one ``report-<target>.html`` per target.

    Parameters
    ----------
    root : pathlib.Path
        The run directory.
    result : PCACEResult
        The run, with several targets or ``per_label``.
    top : int
        Channels labelled in each target's ranking figures.
    progress : bool
        Show progress bars on stderr.

    Returns
    -------
    pathlib.Path
        The overview's path.
    """
    from .figures import class_atlas

    model = result.manifest.get("model", {})
    model_name = model.get("class", "model") if isinstance(model, dict) else str(model)
    rows = []
    for target, label, name in report_groups(result):
        sub = result.subset(target=target, label=label)
        evidence = run_evidence(sub)
        full = full_layers(sub, evidence)
        folder = f"figures/{safe_name(name)}"
        assets = load_assets(root, part=safe_name(name))  # collect_assets made per target
        figures = render_figures(root, sub, assets, top=top, layers=full, progress=progress,
                                 figure_dir=folder, use_assets=assets is not None)
        page = render_page("report.html", **page_context(
            sub, assets, figures, f"PCACE report: {model_name}, {name}", full))
        write_page(root / _page_file(name), page)
        rows.append(_row(name, sub, evidence))
    atlas = None
    try:
        data, fmt = figure_bytes(class_atlas(result))
    except ValueError:  # e.g. a run whose targets carry no values to compare
        data = b""
    if data:
        path = atomic_write(root / "figures" / f"class_atlas.{fmt}", data)
        atlas = RenderedFigure("atlas", "class_atlas",
                               "Left: per layer and target, the evidence of its channels. "
                               "Right: the last layer's channels and the targets they carry "
                               "information about.", data, path, fmt)
    return write_page(root / REPORT_FILE, _overview(
        result, rows, atlas, f"PCACE report: {model_name}, {len(rows)} targets"))
