"""One self-contained HTML file per run: summary, figures, a sortable channel table.

:func:`write_report` reads a run directory (``run.json``, the CSV tables and, when
present, ``assets/``), draws every figure, writes them as PNG files to ``figures/``,
and writes ``report.html`` with the same figures embedded as base64 PNG. The page has
inline CSS and a small inline script (sorting and filtering of the channel table) and
refers to nothing outside itself.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ._common import safe_name
from ._html import CSS, JS
from .assets import Assets, load_assets
from .cam import resolve_cam_target
from .figures import ace_transforms, channel_ranking, layer_overview
from .maps import activation_maps, feature_visualisations, overlay_maps, weighted_vs_cam

REPORT_FILE = "report.html"
FIGURE_DIR = "figures"

#: Channel-table columns in display order (those present in the run are shown) and format.
TABLE_COLUMNS: list[tuple[str, str, str]] = [
    ("layer", "layer", "text"), ("channel", "channel", "int"), ("rank", "rank", "int"),
    ("pcace", "PCACE", "3f"), ("pcace_adj", "PCACE adj.", "3f"),
    ("null_mean", "null mean", "3f"), ("null_q95", "null q95", "3f"),
    ("p_value", "p", "3g"), ("q_value", "q", "3g"), ("ci_low", "PCACE CI", "range3f"),
    ("rank_low", "rank CI", "rangeint"), ("n_components", "k", "int"),
    ("explained_variance", "expl. var.", "3f"), ("dead", "dead", "bool"),
]


@dataclass
class RenderedFigure:
    """A figure of the report: where it belongs, its PNG bytes and file."""

    section: str
    name: str
    caption: str
    png: bytes
    path: Path


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", pad_inches=0.12,
                facecolor="white")
    return buf.getvalue()


def render_figures(run_dir: str | Path, result: Any = None,
                   assets: Assets | None = None, top: int = 10) -> list[RenderedFigure]:
    """Draw every figure the run's files allow and write each to ``run_dir/figures/*.png``.

    Parameters
    ----------
    run_dir : path
        A run directory (from :meth:`PCACEResult.save`).
    result : PCACEResult, optional
        The run; read from ``run_dir`` when None.
    assets : Assets, optional
        Read from ``run_dir/assets`` when None (figures needing them are skipped if absent).
    top : int
        Channels labelled in the ranking figures.

    Returns
    -------
    list of RenderedFigure
        In report order: ``overview``, ``cam``, then per layer.

    Examples
    --------
    >>> from pcace.viz import render_figures
    >>> [f.path.name for f in render_figures("runs/demo")][:2]  # doctest: +SKIP
    ['overview.png', 'weighted_vs_cam.png']
    """
    from ..rank import load

    root = Path(run_dir)
    result = load(root) if result is None else result
    assets = load_assets(root) if assets is None else assets
    out_dir = root / FIGURE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    rendered: list[RenderedFigure] = []

    def add(section: str, name: str, caption: str, draw: Callable[[], Figure]) -> None:
        png = _png(draw())
        path = out_dir / f"{name}.png"
        path.write_bytes(png)
        rendered.append(RenderedFigure(section, name, caption, png, path))

    add("overview", "overview", "Each dot is one channel; boxes span the quartiles, the orange "
        "line is the median. A grey band (when the run computed a permutation null) spans the "
        "null's mean to its 95th percentile: values inside it are what unrelated data give.",
        lambda: layer_overview(result))
    if assets is not None and assets.layers:
        cam = assets.index.get("cam")
        add("cam", "weighted_vs_cam", "Where the maps are high on each example image. "
            "PCACE-weighted: all channels of a layer, weighted by their PCACE value. "
            + (f"{cam['method']} of the {cam['layer']} output for {cam['what']}. " if cam else "")
            + "Each map is min-max scaled on its own.", lambda: weighted_vs_cam(assets))
    for layer in _layer_names(result):
        stem = safe_name(layer)
        shown = min(top, int((result.channels.layer == layer).sum()))
        intervals = " with bootstrap intervals" if "ci_low" in result.channels else ""
        add(layer, f"ranking_{stem}", f"{layer}: channels sorted by PCACE; the top {shown} "
            f"named at right{intervals}.",
            lambda layer=layer: channel_ranking(result, layer, top=top))
        if assets is None or layer not in assets.layers:
            continue
        add(layer, f"maps_{stem}", "Activation maps of the top (green) and bottom (purple) "
            "channels on the example images; one colour scale per row (colour bar at right).",
            lambda layer=layer: activation_maps(assets, layer))
        add(layer, f"overlay_{stem}", "The same maps upsampled to the image and laid over it "
            "(same colour scale per row).", lambda layer=layer: overlay_maps(assets, layer))
        entry = assets.layer(layer)
        if entry.get("ace") and assets.array(layer, "ace_theta") is not None:
            ace = entry["ace"]
            add(layer, f"ace_{stem}", "ACE transforms of the top channel: the transform of the "
                "score and of each principal component of the channel's maps; their "
                "correlation is the channel's PCACE value.",
                lambda layer=layer, ace=ace: ace_transforms(
                    assets.array(layer, "ace_theta"), assets.array(layer, "ace_phi"),
                    assets.arrays["scores"], assets.array(layer, "ace_z"),
                    f"{layer}, channel {ace['channel']}: ACE transforms", rho=ace["rho"]))
        if entry.get("featurevis") and assets.array(layer, "featurevis") is not None:
            add(layer, f"featurevis_{stem}", "Inputs synthesised by gradient ascent to "
                "maximise each top channel's mean activation, shown as images.",
                lambda layer=layer: feature_visualisations(assets, layer))
    return rendered


def _layer_names(result: Any) -> list[str]:
    if result.layers is not None and not result.layers.empty:
        return result.layers.sort_values("order").layer.tolist()
    return list(dict.fromkeys(result.channels.layer))


def write_report(run_dir: str | Path, *, title: str | None = None, top: int = 10) -> Path:
    """Write ``run_dir/report.html`` (self-contained) and ``run_dir/figures/*.png``.

    Parameters
    ----------
    run_dir : path
        A run directory; assets (``run_dir/assets``, from :func:`collect_assets`) add the
        activation maps, CAM comparison, ACE transforms and feature visualisations.
    title : str, optional
        Page title; default names the model and the target.
    top : int
        Channels labelled in the ranking figures.

    Returns
    -------
    pathlib.Path
        The report's path.

    Examples
    --------
    >>> from pcace.viz import write_report
    >>> write_report("runs/demo")  # doctest: +SKIP
    PosixPath('runs/demo/report.html')
    """
    from ..rank import load

    root = Path(run_dir)
    result = load(root)
    assets = load_assets(root)
    figures = render_figures(root, result, assets, top=top)
    page = _page(result, assets, figures, title)
    path = root / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------- HTML pieces

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _anchor(layer: str) -> str:
    return "layer-" + safe_name(layer).replace(".", "-")


def _img(fig: RenderedFigure) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (f'<figure id="fig-{_e(fig.name)}"><img src="data:image/png;base64,{data}" '
            f'alt="{_e(fig.name)}" data-figure="{_e(fig.name)}">'
            f"<figcaption>{_e(fig.caption)}</figcaption></figure>")


def _target_text(target: Any) -> str:
    resolved = resolve_cam_target(target) if isinstance(target, dict) else None
    if resolved is not None and hasattr(resolved, "describe"):
        return resolved.describe()
    return json.dumps(target, default=str) if target is not None else "unknown"


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _spec_text(spec: dict) -> str:
    return ", ".join(f"{k}: {_value(v)}" for k, v in spec.items() if v is not None)


def _model_text(model: Any) -> str:
    if not isinstance(model, dict):
        return str(model)
    parts = [str(model.get("class", "model"))]
    if model.get("parameters") is not None:
        parts.append(f"{int(model['parameters']):,} parameters")
    spec = model.get("spec")
    if isinstance(spec, dict):
        parts.append(_spec_text(spec))
    elif spec:
        parts.append(str(spec))
    if model.get("weights_sha256"):
        parts.append(f"weights sha256 {str(model['weights_sha256'])[:12]}")
    return "; ".join(parts)


def _data_text(data: Any) -> str:
    if not isinstance(data, dict):
        return str(data)
    parts = []
    spec = data.get("spec")
    if isinstance(spec, dict):
        parts.append(_spec_text(spec))
    elif spec:
        parts.append(str(spec))
    if data.get("label") is not None:
        parts.append(f"images of label {data['label']}")
    return "; ".join(parts) or "not recorded"


def _summary(result: Any) -> str:
    m = result.manifest
    data = m.get("data", {}) if isinstance(m.get("data"), dict) else {}
    n = data.get("n_images", m.get("n_images"))
    if n is None and result.scores is not None:
        n = len(result.scores)
    timings = m.get("timings") or {}
    items = [
        ("model", _model_text(m.get("model"))),
        ("data", _data_text(m.get("data"))),
        ("target (score)", _target_text(m.get("target"))),
        ("images N", n),
        ("components k", m.get("components")),
        ("score", m.get("score", "maximal")),
        ("layers / channels", f"{len(_layer_names(result))} / {len(result.channels)}"),
        ("device", m.get("device")),
        ("created", m.get("created")),
        ("pcace version", m.get("pcace_version")),
        ("run time", f"{timings['total']:.1f} s" if isinstance(timings.get("total"), int | float)
         else None),
        ("seed", m.get("seed")),
    ]
    if m.get("interrupted"):
        items.append(("status", "interrupted: not every layer was scored"))
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items if v is not None)
    return f'<dl class="summary" id="run-summary">{rows}</dl>'


def _fmt(value: Any, kind: str) -> tuple[str, str]:
    """(display text, sort key) of one table cell."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)) or \
            (not isinstance(value, str) and pd.isna(value)):
        return "", ""
    if kind == "text":
        return str(value), str(value)
    if kind == "bool":
        flag = bool(value) if not isinstance(value, str) else value.lower() == "true"
        return ("yes" if flag else ""), ("1" if flag else "0")
    if kind == "int":
        return str(int(value)), str(int(value))
    v = float(value)
    text = f"{v:.3f}" if kind == "3f" else f"{v:.3g}"
    return text, repr(v)


def _channel_table(result: Any) -> str:
    ch = result.channels.copy()
    sort_cols = [c for c in ("layer_order", "rank", "channel") if c in ch]
    ch = ch.sort_values(sort_cols, kind="stable") if sort_cols else ch
    ends = {"ci_low": "ci_high", "rank_low": "rank_high"}
    cols = [(c, label, kind) for c, label, kind in TABLE_COLUMNS
            if c in ch and (c not in ends or ends[c] in ch)]
    head = "".join(f'<th data-type="{"text" if kind == "text" else "number"}" '
                   f'data-col="{_e(c)}">{_e(label)}</th>' for c, label, kind in cols)
    body = []
    records = ch.to_dict("records")
    for rec in records:
        cells = []
        for c, _, kind in cols:
            if kind.startswith("range"):
                lo, key = _fmt(rec[c], kind[5:])
                hi, _ = _fmt(rec[ends[c]], kind[5:])
                text = f"{lo}\u2013{hi}" if lo and hi else ""
            else:
                text, key = _fmt(rec[c], kind)
            cells.append(f'<td data-v="{_e(key)}">{_e(text)}</td>' if kind != "text"
                         else f"<td>{_e(text)}</td>")
        dead = "dead" in rec and _fmt(rec["dead"], "bool")[1] == "1"
        body.append(f'<tr data-layer="{_e(rec["layer"])}" data-channel="{_e(int(rec["channel"]))}"'
                    f'{" class=dead" if dead else ""}>{"".join(cells)}</tr>')
    return ('<div class="controls"><label for="channel-filter">Filter</label>'
            '<input id="channel-filter" type="search" autocomplete="off" '
            'placeholder="layer and/or channel, e.g. conv2 7">'
            '<span id="channel-count" class="stats"></span></div>'
            '<div class="table-wrap"><table id="channel-table" class="sortable">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
            '<p class="stats">Click a column header to sort (again to reverse).</p>')


def _layer_table(result: Any) -> str:
    ly = result.layers.sort_values("order") if not result.layers.empty else result.layers
    cols = [("layer", "layer"), ("channels", "channels"), ("height", "map H"),
            ("width", "map W"), ("mean", "mean"), ("median", "median"), ("q90", "q90"),
            ("max", "max"), ("dead", "dead"), ("top_channels", "top channels")]
    cols = [(c, lab) for c, lab in cols if c in ly]
    head = "".join(f"<th>{_e(lab)}</th>" for _, lab in cols)
    rows = []
    for rec in ly.to_dict("records"):
        cells = []
        for c, _ in cols:
            v = rec[c]
            if c == "layer":
                cells.append(f'<td><a href="#{_anchor(str(v))}">{_e(v)}</a></td>')
            elif isinstance(v, float) and c not in ("dead", "channels", "height", "width"):
                cells.append(f"<td>{v:.3f}</td>")
            else:
                cells.append(f"<td>{_e(v if not isinstance(v, float) else int(v))}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<table id="layer-table"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


NO_ASSETS = ("This run was saved without assets, so there are no activation maps, CAM "
             "comparison, ACE transforms or feature visualisations: they need the model and "
             "the images, at rank time (pcace rank ... --report) or with "
             "pcace.viz.collect_assets(run_dir, model, images, result).")


def _layer_section(result: Any, layer: str, figs: list[RenderedFigure],
                   assets: Assets | None) -> str:
    row = result.layers[result.layers.layer == layer]
    facts = ""
    if not row.empty:
        r = row.iloc[0]
        facts = (f'<p class="stats">{int(r.channels)} channels, maps {int(r.height)}x'
                 f"{int(r.width)}; median PCACE {r['median']:.3f}, max {r['max']:.3f}"
                 + (f", {int(r.dead)} dead" if "dead" in r and r.dead else "")
                 + (f"; top channels {_e(r.top_channels)}" if "top_channels" in r else "")
                 + "</p>")
    parts = [f'<section id="{_anchor(layer)}" class="layer" data-layer="{_e(layer)}">',
             f"<h2>Layer {_e(layer)}</h2>", facts]
    parts += [_img(f) for f in figs]
    names = {f.name.split("_", 1)[0] for f in figs}
    if assets is None:
        parts.append(_note("No activation maps for this layer: the run has no assets."))
    elif layer not in assets.layers:
        parts.append(_note("No assets were saved for this layer."))
    else:
        if "ace" not in names:
            parts.append(_note("No ACE transforms saved for this layer (they need the "
                               "principal components that pcace.rank keeps in memory)."))
        if "featurevis" not in names:
            parts.append(_note("No feature visualisations saved for this layer."))
    parts.append("</section>")
    return "".join(parts)


def _page(result: Any, assets: Assets | None, figures: list[RenderedFigure],
          title: str | None) -> str:
    m = result.manifest
    model = m.get("model", {})
    model_name = model.get("class", "model") if isinstance(model, dict) else str(model)
    title = title or f"PCACE report: {model_name}, {_target_text(m.get('target'))}"
    layers = _layer_names(result)
    by_section: dict[str, list[RenderedFigure]] = {}
    for f in figures:
        by_section.setdefault(f.section, []).append(f)
    nav = ['<a href="#summary">Summary</a>', '<a href="#overview">Layers</a>',
           '<a href="#channels">Channels</a>']
    if "cam" in by_section:
        nav.append('<a href="#cam">PCACE vs CAM</a>')
    nav += [f'<a href="#{_anchor(layer)}">{_e(layer)}</a>' for layer in layers]
    body = [
        f'<header><h1>{_e(title)}</h1><p class="lead">Channels of each layer ranked by PCACE, '
        "the maximal correlation (ACE on the first principal components of a channel's "
        "activation maps) with the network's score (Casacuberta, Suel &amp; Flaxman, "
        f"arXiv:2112.15571).</p><nav>{''.join(nav)}</nav></header>",
        f'<section id="summary"><h2>Run summary</h2>{_summary(result)}</section>',
        '<section id="overview"><h2>Layers</h2>',
        *[_img(f) for f in by_section.get("overview", [])],
        _layer_table(result), "</section>",
        f'<section id="channels"><h2>Channels</h2>{_channel_table(result)}</section>',
    ]
    if assets is None:
        body.append(_note(NO_ASSETS))
    if "cam" in by_section:
        body += ['<section id="cam"><h2>PCACE-weighted maps vs CAM</h2>',
                 *[_img(f) for f in by_section["cam"]], "</section>"]
    body += [_layer_section(result, layer, by_section.get(layer, []), assets)
             for layer in layers]
    notes = (assets.index.get("notes") or []) if assets is not None else []
    if notes:
        body.append('<section id="notes"><h2>Notes</h2>'
                    + "".join(_note(n) for n in notes) + "</section>")
    body.append(f'<footer>Written by pcace {_e(m.get("pcace_version", ""))}. This file is '
                "self-contained: figures are embedded, nothing is loaded from elsewhere."
                "</footer>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head>"
            f'<body data-ready="0"><main>{"".join(body)}</main>'
            f"<script>{JS}</script></body></html>\n")
