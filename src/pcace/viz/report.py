"""One self-contained HTML file per run: summary, figures, a sortable channel table.

:func:`write_report` reads a run directory (``run.json``, the CSV tables and, when
present, ``assets/``), draws the figures, writes them to ``figures/`` (palette PNGs, or
JPEGs for figures with photographs where smaller), and writes ``report.html`` with the same
figures embedded as base64. It says per layer whether the ranking carries evidence, and
draws full sections only for layers that do (or the best few when none does); the rest are
rows of the layer table. The page has inline CSS and a small inline script (sorting and
filtering of the channel table) and refers to nothing outside itself.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..core.files import safe_name
from ._common import figure_bytes
from ._html import CSS, JS, NOTEBOOK_CSS
from .assets import Assets, load_assets
from .cam import resolve_cam_target
from .evidence import (
    NO_NULL_TEXT,
    full_layers,
    layer_order,
    run_evidence,
    significance,
    with_significance,
)
from .figures import ace_transforms, channel_ranking, layer_overview
from .maps import activation_maps, feature_visualisations, overlay_maps, weighted_vs_cam

REPORT_FILE = "report.html"
FIGURE_DIR = "figures"

#: Channel-table columns in display order (those present in the run are shown) and format.
TABLE_COLUMNS: list[tuple[str, str, str]] = [
    ("layer", "layer", "text"), ("channel", "channel", "int"), ("rank", "rank", "int"),
    ("pcace", "PCACE", "3f"), ("pcace_adj", "PCACE adj.", "3f"),
    ("null_mean", "null mean", "3f"), ("null_q95", "null q95", "3f"),
    ("p_value", "p", "3g"), ("q_value", "q", "3g"), ("significant", "beats null", "bool"),
    ("ci_low", "PCACE CI", "range3f"),
    ("rank_low", "rank CI", "rangeint"), ("n_components", "k", "int"),
    ("explained_variance", "expl. var.", "3f"), ("dead", "dead", "bool"),
]


@dataclass
class RenderedFigure:
    """A figure of the report: where it belongs, its encoded bytes and file."""

    section: str
    name: str
    caption: str
    data: bytes
    path: Path
    format: str = "png"

    @property
    def png(self) -> bytes:
        """The encoded bytes (kept under this name for older callers; see ``format``)."""
        return self.data


@dataclass
class _Job:
    section: str
    name: str
    caption: str
    draw: Callable[[], Figure]
    photo: bool = False


CI_SENTENCE = ("The bootstrap intervals are bias-corrected: ACE overestimates the maximal "
               "correlation of weak channels, so their interval lies below the raw PCACE value "
               "and may exclude it; that is the correction working, not an error.")
GREY_SENTENCE = ("Channels that do not beat the permutation null (q > 0.05) are grey; "
                 "the top channels that do are green.")


def _figure_jobs(result: Any, assets: Assets | None, full: list[str], top: int,
                 sig: bool) -> list[_Job]:
    """Every figure the report shows, in order, not yet drawn."""
    grey = f" {GREY_SENTENCE}" if sig else ""
    jobs = [_Job("overview", "overview", "Each dot is one channel; boxes span the quartiles, the "
                 "orange line is the median. A grey band (when the run computed a permutation "
                 "null) spans the null's mean to its 95th percentile: values inside it are what "
                 "unrelated data give." + (" Dots of channels that do not beat the null are "
                                           "light grey." if sig else ""),
                 lambda: layer_overview(result))]
    if assets is not None and assets.layers:
        cam = assets.index.get("cam")
        shown = [n for n in full if n in assets.layers][-4:] or None
        jobs.append(_Job(
            "cam", "weighted_vs_cam", "Where the maps are high on each example image. "
            "PCACE-weighted: all channels of a layer, weighted by their PCACE value. "
            + (f"{cam['method']} of the {cam['layer']} output for {cam['what']}. " if cam else "")
            + "Each map is min-max scaled on its own.",
            lambda: weighted_vs_cam(assets, layers=shown), photo=True))
    ci = "ci_low" in result.channels
    for layer in full:
        jobs += _layer_jobs(result, assets, layer, top, grey, ci)
    return jobs


def _layer_jobs(result: Any, assets: Assets | None, layer: str, top: int, grey: str,
                ci: bool) -> list[_Job]:
    stem = safe_name(layer)
    shown = min(top, int((result.channels.layer == layer).sum()))
    jobs = [_Job(layer, f"ranking_{stem}", f"{layer}: channels sorted by PCACE; the top {shown} "
                 f"named at right{' with bootstrap intervals' if ci else ''}.{grey}"
                 + (f" {CI_SENTENCE}" if ci else ""),
                 lambda: channel_ranking(result, layer, top=top))]
    if assets is None or layer not in assets.layers:
        return jobs
    jobs.append(_Job(layer, f"maps_{stem}", "Activation maps of the top (green) and bottom "
                     "(purple) channels on the example images; one colour scale per row "
                     "(colour bar at right)." + (" Titles of channels that do not beat the "
                                                 "null are grey." if grey else ""),
                     lambda: activation_maps(assets, layer), photo=True))
    jobs.append(_Job(layer, f"overlay_{stem}", "The same maps upsampled to the image and laid "
                     "over it (same colour scale per row).", lambda: overlay_maps(assets, layer),
                     photo=True))
    entry = assets.layer(layer)
    if entry.get("ace") and assets.array(layer, "ace_theta") is not None:
        ace = entry["ace"]
        jobs.append(_Job(
            layer, f"ace_{stem}", "ACE transforms of the top channel: the transform of the "
            "score and of each principal component of the channel's maps; their correlation "
            "is the channel's PCACE value.",
            lambda: ace_transforms(
                assets.array(layer, "ace_theta"), assets.array(layer, "ace_phi"),
                assets.arrays["scores"], assets.array(layer, "ace_z"),
                f"{layer}, channel {ace['channel']}: ACE transforms", rho=ace["rho"])))
    if entry.get("featurevis") and assets.array(layer, "featurevis") is not None:
        jobs.append(_Job(layer, f"featurevis_{stem}", FEATUREVIS_CAPTION,
                         lambda: feature_visualisations(assets, layer), photo=True))
    return jobs


FEATUREVIS_CAPTION = (
    "Inputs synthesised to excite each top channel: gradient ascent on a decorrelated "
    "Fourier-space image (1/f-scaled frequencies, colours decorrelated with the images' own "
    "colour covariance), robust to random jitter, scaling and rotation. 'excites' compares "
    "the channel's response to the synthetic input with the strongest response among the "
    "reference images; 'variation' is its spatial variation relative to the images'.")


def render_figures(run_dir: str | Path, result: Any = None,
                   assets: Assets | None = None, top: int = 10, *,
                   layers: list[str] | None = None,
                   progress: bool = False, figure_dir: str = "",
                   use_assets: bool = True) -> list[RenderedFigure]:
    """Draw the report's figures and write each to ``run_dir/figures/``.

    Only the layers that carry evidence get full sections (ranking, maps, overlays, ACE
    transforms, feature visualisations); when none does, the best few do (see
    :func:`pcace.viz.evidence.full_layers`). Charts are written as palette PNGs, figures
    with photographs or colour maps as the smaller of a palette PNG and a JPEG.

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
    layers : list of str, optional
        Layers drawn in full; default :func:`~pcace.viz.evidence.full_layers`.
    progress : bool
        Show a progress bar on stderr.
    figure_dir : str
        Folder of the figures under ``run_dir`` (default ``figures``).
    use_assets : bool
        False: draw only the figures that need no assets (one target of a run with
        several, whose assets belong to no target in particular).

    Returns
    -------
    list of RenderedFigure
        In report order: ``overview``, ``cam``, then per layer.

    Examples
    --------
    >>> from pcace.viz import render_figures
    >>> [f.path.name for f in render_figures("runs/demo")][:2]  # doctest: +SKIP
    ['overview.png', 'weighted_vs_cam.jpeg']
    """
    from ..core.progress import progress_bar
    from ..results.result import load

    root = Path(run_dir)
    result = load(root) if result is None else result
    assets = (load_assets(root) if assets is None else assets) if use_assets else None
    full = full_layers(result) if layers is None else list(layers)
    sig = significance(result.channels) is not None
    out_dir = root / (figure_dir or FIGURE_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*"):
        if old.suffix in (".png", ".jpeg", ".jpg") and old.is_file():
            old.unlink()
    rendered: list[RenderedFigure] = []
    jobs = _figure_jobs(result, assets, full, top, sig)
    for job in progress_bar(jobs, desc="report figures", unit="fig", disable=not progress):
        data, fmt = figure_bytes(job.draw(), photo=job.photo)
        path = out_dir / f"{job.name}.{fmt}"
        path.write_bytes(data)
        rendered.append(RenderedFigure(job.section, job.name, job.caption, data, path, fmt))
    return rendered


def write_target_report(root: Path, result: Any, *, title: str | None = None, top: int = 10,
                        layers: list[str] | None = None, progress: bool = False) -> Path:
    """Write the one-target report of a loaded run: ``root/report.html`` and its figures
    (:func:`pcace.viz.write_report` chooses it for a run of one target)."""
    assets = load_assets(root)
    full = full_layers(result) if layers is None else list(layers)
    figures = render_figures(root, result, assets, top=top, layers=full, progress=progress)
    page = _page(result, assets, figures, title, full)
    path = root / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------- HTML pieces

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _anchor(layer: str) -> str:
    return "layer-" + safe_name(layer).replace(".", "-")


def _img(fig: RenderedFigure) -> str:
    data = base64.b64encode(fig.data).decode("ascii")
    return (f'<figure id="fig-{_e(fig.name)}"><img src="data:image/{fig.format};base64,{data}" '
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
        ("layers / channels", f"{len(layer_order(result))} / {len(result.channels)}"),
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


def _channel_table(result: Any, top: int = 10) -> str:
    ch = with_significance(result.channels)
    sort_cols = [c for c in ("layer_order", "rank", "channel") if c in ch]
    ch = ch.sort_values(sort_cols, kind="stable") if sort_cols else ch
    ends = {"ci_low": "ci_high", "rank_low": "rank_high"}
    cols = [(c, label, kind) for c, label, kind in TABLE_COLUMNS
            if c in ch and (c not in ends or ends[c] in ch)]
    head = "".join(f'<th data-type="{"text" if kind == "text" else "number"}" '
                   f'data-col="{_e(c)}">{_e(label)}</th>' for c, label, kind in cols)
    has_sig = "significant" in ch
    body = []
    for rec in ch.to_dict("records"):
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
        body.append(f'<tr data-layer="{_e(rec["layer"])}" data-channel="{_e(int(rec["channel"]))}"'
                    f'{_row_class(rec, has_sig, top)}>{"".join(cells)}</tr>')
    legend = ('<p class="stats"><span class="swatch top"></span> a top channel that beats the '
              'permutation null (q \u2264 0.05) &nbsp; <span class="swatch ns"></span> grey: '
              "does not beat it (indistinguishable from chance)</p>" if has_sig else
              f'<p class="stats">{_e(NO_NULL_TEXT)}</p>')
    ci = f'<p class="stats">{_e(CI_SENTENCE)}</p>' if "ci_low" in ch else ""
    return ('<div class="controls"><label for="channel-filter">Filter</label>'
            '<input id="channel-filter" type="search" autocomplete="off" '
            'placeholder="layer and/or channel, e.g. conv2 7">'
            '<span id="channel-count" class="stats"></span></div>' + legend + ci +
            '<div class="table-wrap"><table id="channel-table" class="sortable">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
            '<p class="stats">Click a column header to sort (again to reverse).</p>')


def _row_class(rec: dict, has_sig: bool, top: int) -> str:
    classes = []
    if "dead" in rec and _fmt(rec["dead"], "bool")[1] == "1":
        classes.append("dead")
    if has_sig:
        if not bool(rec["significant"]):
            classes.append("ns")
        elif "rank" in rec and pd.notna(rec["rank"]) and int(rec["rank"]) <= top:
            classes.append("top")
    return f' class="{" ".join(classes)}"' if classes else ""


def _num(v: Any, digits: int = 2) -> str:
    return f"{float(v):.{digits}f}" if v is not None and pd.notna(v) else ""


def _badge(level: str) -> str:
    return f'<span class="ev ev-{_e(level)}">{_e(level)}</span>'


def _repro(rec: dict) -> str:
    rho = rec.get("split_half_spearman")
    if rho is None or not pd.notna(rho):
        return ""
    lo, hi = rec.get("split_half_spearman_low"), rec.get("split_half_spearman_high")
    band = f" ({_num(lo)}\u2013{_num(hi)})" if pd.notna(lo) and pd.notna(hi) else ""
    return _num(rho) + band


def _layer_table(result: Any, evidence: pd.DataFrame, full: list[str]) -> str:
    """One row per layer with its evidence; rows of layers without full sections are the
    targets of the navigation for those layers and carry their evidence sentence."""
    ly = result.layers.set_index("layer") if not result.layers.empty else None
    cols = [("channels", "channels"), ("median", "median PCACE"), ("max", "max")]
    if evidence.has_null.any():
        cols += [("significant_share", "beat null"), ("median_adj", "median adj.")]
    if evidence.split_half_spearman.notna().any():
        cols += [("split_half_spearman", "split-half Spearman"), ("split_half_top10", "top-10")]
    head = ("<th>layer</th><th>evidence</th>" + "".join(f"<th>{_e(lab)}</th>" for _, lab in cols)
            + "<th>top channels</th><th>what it supports</th>")
    rows = []
    for rec in evidence.to_dict("records"):
        layer = rec["layer"]
        info = ly.loc[layer].to_dict() if ly is not None and layer in ly.index else {}
        link = (f'<a href="#{_anchor(layer)}">{_e(layer)}</a>' if layer in full
                else _e(layer))
        cells = [f"<td>{link}</td>", f"<td>{_badge(rec['evidence'])}</td>"]
        for c, _ in cols:
            if c == "significant_share":
                text = f"{rec[c]:.0%}" if pd.notna(rec[c]) else ""
            elif c == "split_half_spearman":
                text = _repro(rec)
            elif c == "split_half_top10":
                text = _num(rec[c])
            elif c in ("median_adj",):
                text = _num(rec[c], 3)
            elif c == "channels":
                text = str(int(rec[c]))
            else:
                text = _num(info.get(c), 3)
            cells.append(f"<td>{_e(text)}</td>")
        cells.append(f'<td class="tops">{_e(info.get("top_channels", ""))}</td>')
        cells.append(f'<td class="say">{_e(rec["evidence_text"])}</td>')
        row_id = "" if layer in full else f' id="{_anchor(layer)}"'
        rows.append(f'<tr{row_id} data-layer-row="{_e(layer)}" data-evidence='
                    f'"{_e(rec["evidence"])}" class="ev-row-{_e(rec["evidence"])}">'
                    f"{''.join(cells)}</tr>")
    return (f'<div class="table-wrap wide"><table id="layer-table"><thead><tr>{head}</tr>'
            f"</thead><tbody>{''.join(rows)}</tbody></table></div>")


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


NO_ASSETS = ("This run was saved without assets, so there are no activation maps, CAM "
             "comparison, ACE transforms or feature visualisations: they need the model and "
             "the images, at rank time (pcace rank ... --report) or with "
             "pcace.viz.collect_assets(run_dir, model, images, result).")


def _verdict(result: Any, evidence: pd.DataFrame, full: list[str]) -> str:
    """The report's answer in plain words: which layers carry evidence, and what to do."""
    n = len(evidence)
    if not evidence.has_null.any():
        return _note(NO_NULL_TEXT + " Layers drawn in full are the "
                     f"{len(full)} with the highest values, which says nothing about chance.")
    strong = evidence.layer[evidence.evidence == "strong"].tolist()
    weak = evidence.layer[evidence.evidence == "weak"].tolist()
    n_img = evidence_images(result)
    if not strong and not weak:
        return _note(f"No layer carries evidence: in none of the {n} layers does any channel "
                     f"beat the permutation null{n_img}. The rankings are indistinguishable "
                     "from chance, so more images are needed before they can be read. The "
                     f"{len(full)} layers with the highest null-corrected values are drawn in "
                     "full below for orientation only.")
    parts = []
    if strong:
        parts.append(f"{len(strong)} of {n} layers {'carries' if len(strong) == 1 else 'carry'} "
                     f"strong evidence ({_list(strong)})")
    if weak:
        parts.append(f"{len(weak)} {'carries' if len(weak) == 1 else 'carry'} weak evidence "
                     f"({_list(weak)})")
    rest = n - len(strong) - len(weak)
    tail = (f"; the other {rest} do not beat chance{n_img}: more images are needed to rank "
            "their channels, and they are listed in the table only." if rest else ".")
    left_out = len(strong) + len(weak) - len([x for x in full if x in strong + weak])
    if left_out > 0:
        tail += (f" To keep the report light, {len(full)} of them (the strongest) have full "
                 f"sections; the other {left_out} are rows of the layer table "
                 "(write_report(run_dir, layers=[...]) draws chosen layers in full).")
    return f'<p class="verdict">{_e("; ".join(parts) + tail)}</p>'


def evidence_images(result: Any) -> str:
    from .evidence import _n_images

    n = _n_images(result)
    return f" with {n} images" if n else ""


def _list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _layer_section(result: Any, layer: str, figs: list[RenderedFigure],
                   assets: Assets | None, ev: dict) -> str:
    row = result.layers[result.layers.layer == layer]
    facts = ""
    if not row.empty:
        r = row.iloc[0]
        facts = (f'<p class="stats">{int(r.channels)} channels, maps {int(r.height)}x'
                 f"{int(r.width)}; median PCACE {r['median']:.3f}, max {r['max']:.3f}"
                 + (f", {int(r.dead)} dead" if "dead" in r and r.dead else "")
                 + (f"; top channels {_e(r.top_channels)}" if "top_channels" in r else "")
                 + "</p>")
    level = ev.get("evidence", "unknown")
    say = f'<p class="say ev-say-{_e(level)}">{_badge(level)} {_e(ev.get("evidence_text", ""))}</p>'
    parts = [f'<section id="{_anchor(layer)}" class="layer" data-layer="{_e(layer)}" '
             f'data-evidence="{_e(level)}">', f"<h2>Layer {_e(layer)}</h2>", say, facts]
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


def _nav(layers: list[str], evidence: pd.DataFrame, has_cam: bool) -> str:
    level = dict(zip(evidence.layer, evidence.evidence, strict=True))
    main = ['<a href="#summary">Summary</a>', '<a href="#overview">Layers</a>',
            '<a href="#channels">Channels</a>']
    if has_cam:
        main.append('<a href="#cam">PCACE vs CAM</a>')
    chips = [f'<a class="chip lv-{_e(level.get(n, "unknown"))}" href="#{_anchor(n)}" '
             f'title="evidence: {_e(level.get(n, "unknown"))}">{_e(n)}</a>' for n in layers]
    return (f'<nav id="nav"><div class="nav-main">{" ".join(main)}</div>'
            f'<div class="nav-layers">{" ".join(chips)}</div></nav>')


def _page(result: Any, assets: Assets | None, figures: list[RenderedFigure],
          title: str | None, full: list[str] | None = None) -> str:
    m = result.manifest
    model = m.get("model", {})
    model_name = model.get("class", "model") if isinstance(model, dict) else str(model)
    title = title or f"PCACE report: {model_name}, {_target_text(m.get('target'))}"
    layers = layer_order(result)
    evidence = run_evidence(result)
    full = full_layers(result, evidence) if full is None else full
    by_section: dict[str, list[RenderedFigure]] = {}
    for f in figures:
        by_section.setdefault(f.section, []).append(f)
    ev_of = {r["layer"]: r for r in evidence.to_dict("records")}
    body = [
        f'<header><h1>{_e(title)}</h1><p class="lead">Channels of each layer ranked by PCACE, '
        "the maximal correlation (ACE on the first principal components of a channel's "
        "activation maps) with the network's score (Casacuberta, Suel &amp; Flaxman, "
        f"arXiv:2112.15571).</p>{_nav(layers, evidence, 'cam' in by_section)}</header>",
        f'<section id="summary"><h2>Run summary</h2>{_verdict(result, evidence, full)}'
        f"{_summary(result)}</section>",
        '<section id="overview"><h2>Layers</h2>',
        *[_img(f) for f in by_section.get("overview", [])],
        '<p class="stats">Layers whose names link have full sections below; the others are '
        "summarised here.</p>", _layer_table(result, evidence, full), "</section>",
        f'<section id="channels"><h2>Channels</h2>{_channel_table(result)}</section>',
    ]
    if assets is None:
        body.append(_note(NO_ASSETS))
    if "cam" in by_section:
        body += ['<section id="cam"><h2>PCACE-weighted maps vs CAM</h2>',
                 *[_img(f) for f in by_section["cam"]], "</section>"]
    body += [_layer_section(result, layer, by_section.get(layer, []), assets,
                            ev_of.get(layer, {})) for layer in layers if layer in full]
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


def result_html(result: Any, *, overview: bool = True) -> str:
    """A PCACE result as an HTML fragment for a notebook: the layer table and the overview.

    The layer table says per layer whether its ranking carries evidence (share of channels
    beating the permutation null, median null-corrected value, split-half
    reproducibility) in plain words; the overview figure is embedded as an image.
    Nothing outside the fragment is referred to.

    Parameters
    ----------
    result : PCACEResult
        A run.
    overview : bool
        Embed the overview figure (off: the table only, instant).

    Returns
    -------
    str
        HTML (a ``<div>`` with a scoped style block).

    Examples
    --------
    >>> from pcace.viz import result_html
    >>> html = result_html(result)  # doctest: +SKIP
    >>> from IPython.display import HTML; HTML(html)  # doctest: +SKIP
    """
    evidence = run_evidence(result)
    n_img = evidence_images(result)
    head = (f"<p><b>PCACE</b>: {len(evidence)} layers, {len(result.channels)} channels"
            f"{_e(n_img)}.</p>")
    fig = ""
    if overview and not result.channels.empty:
        data, fmt = figure_bytes(layer_overview(result))
        fig = (f'<img alt="overview" src="data:image/{fmt};base64,'
               f'{base64.b64encode(data).decode("ascii")}" style="max-width:100%">')
    full = evidence.layer[evidence.evidence.isin(("strong", "weak"))].tolist()
    table = _layer_table(result, evidence, full).replace(' id="layer-table"',
                                                          ' class="pcace-layers"')
    table = re.sub(r'<a href="#[^"]*">([^<]*)</a>', r"\1", table)
    table = re.sub(r' id="layer-[^"]*"', "", table)
    return (f'<div class="pcace-result"><style>{NOTEBOOK_CSS}</style>{head}'
            f"{_verdict(result, evidence, full)}{table}{fig}</div>")
