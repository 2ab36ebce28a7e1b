"""What the report page shows, as plain values for its template (``templates/report.html``).

Nothing here writes markup: the functions turn a run (its tables, manifest, evidence and
figures) into dictionaries and lists of strings, and the template lays them out and escapes
them. :func:`page_context` is the whole one-target page; :func:`layer_table_view` and
:func:`verdict_view` serve the notebook fragment too.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from ..core.files import safe_name
from ..core.voice import action
from .cam import resolve_cam_target
from .evidence import (
    ALPHA,
    full_layers,
    layer_order,
    no_null_text,
    run_evidence,
    with_significance,
)
from .featurevis import CLEAR_FACTOR
from .maps import featurevis_reasons
from .pages import figure_view

__all__ = ["CI_SENTENCE", "TABLE_COLUMNS", "anchor", "channel_table_view",
           "evidence_images", "layer_table_view", "no_assets_text", "page_context", "skipped_text",
           "summary_items", "target_text", "verdict_view"]

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

CI_SENTENCE = ("The bootstrap intervals are bias-corrected: ACE overestimates the maximal "
               "correlation of weak channels, so their interval lies below the raw PCACE value "
               "and may exclude it; that is the correction working, not an error.")

def no_assets_text() -> str:
    """What a report of a run without assets lacks, and how to get it, in the caller's words.

    Examples
    --------
    >>> no_assets_text()[:37]
    'This run was saved without assets, so'
    """
    return ("This run was saved without assets, so there are no activation maps, CAM "
            "comparison, ACE transforms or feature visualisations: they need the model and "
            f"the images; {action('collect_assets')}.")


def anchor(layer: str) -> str:
    """The id of a layer's section (or table row) on the page."""
    return "layer-" + safe_name(layer).replace(".", "-")


def target_text(target: Any) -> str:
    """The run's target in words (``class logit 3``), else its JSON."""
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


def skipped_text(manifest: dict) -> str:
    """`` (2 unreadable images skipped: a.jpg, b.png)`` when the run skipped files, else empty.

    Examples
    --------
    >>> skipped_text({"data": {"skipped_images": 2, "skipped_files": ["/x/a.jpg", "/x/b.png"]}})
    ' (2 unreadable images skipped: a.jpg, b.png)'
    >>> skipped_text({"data": {"skipped_images": 0}})
    ''
    """
    data = manifest.get("data") if isinstance(manifest, dict) else None
    data = data if isinstance(data, dict) else {}
    count = int(data.get("skipped_images") or 0)
    if not count:
        return ""
    names = [str(f).replace("\\", "/").rsplit("/", 1)[-1]
             for f in data.get("skipped_files") or []]
    listed = ", ".join(names[:5]) + (f" and {count - 5} more" if count > 5 and names else "")
    return (f" ({count} unreadable image{'s' if count != 1 else ''} skipped"
            + (f": {listed}" if names else "") + ")")


def summary_items(result: Any) -> list[tuple[str, Any]]:
    """The run summary's ``(term, value)`` pairs; those without a value are left out."""
    m = result.manifest
    data = m.get("data", {}) if isinstance(m.get("data"), dict) else {}
    n = data.get("n_images", m.get("n_images"))
    if n is None and result.scores is not None:
        n = len(result.scores)
    timings = m.get("timings") or {}
    items = [
        ("model", _model_text(m.get("model"))),
        ("data", _data_text(m.get("data"))),
        ("target (score)", target_text(m.get("target"))),
        ("images N", f"{n}{skipped_text(m)}" if n is not None else None),
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
    return [(k, v) for k, v in items if v is not None]


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


def _row_classes(rec: dict, has_sig: bool, top: int) -> str:
    classes = []
    if "dead" in rec and _fmt(rec["dead"], "bool")[1] == "1":
        classes.append("dead")
    if has_sig:
        if not bool(rec["significant"]):
            classes.append("ns")
        elif "rank" in rec and pd.notna(rec["rank"]) and int(rec["rank"]) <= top:
            classes.append("top")
    return " ".join(classes)


def channel_table_view(result: Any, top: int = 10) -> dict[str, Any]:
    """The channel table: its columns, and per channel its cells as (sort key, text).

    A cell's sort key is None for text columns (the table sorts them by their text).
    """
    ch = with_significance(result.channels)
    sort_cols = [c for c in ("layer_order", "rank", "channel") if c in ch]
    ch = ch.sort_values(sort_cols, kind="stable") if sort_cols else ch
    ends = {"ci_low": "ci_high", "rank_low": "rank_high"}
    cols = [(c, label, kind) for c, label, kind in TABLE_COLUMNS
            if c in ch and (c not in ends or ends[c] in ch)]
    has_sig = "significant" in ch
    rows = []
    for rec in ch.to_dict("records"):
        cells: list[tuple[str | None, str]] = []
        for c, _, kind in cols:
            if kind.startswith("range"):
                lo, key = _fmt(rec[c], kind[5:])
                hi, _ = _fmt(rec[ends[c]], kind[5:])
                text = f"{lo}\u2013{hi}" if lo and hi else ""
            else:
                text, key = _fmt(rec[c], kind)
            cells.append((key if kind != "text" else None, text))
        rows.append({"layer": rec["layer"], "channel": int(rec["channel"]),
                     "classes": _row_classes(rec, has_sig, top), "cells": cells})
    columns = [{"name": c, "label": label, "type": "text" if kind == "text" else "number"}
               for c, label, kind in cols]
    return {"columns": columns, "rows": rows, "has_sig": has_sig,
            "ci_text": CI_SENTENCE if "ci_low" in ch else ""}


def _num(v: Any, digits: int = 2) -> str:
    return f"{float(v):.{digits}f}" if v is not None and pd.notna(v) else ""


def _repro(rec: dict) -> str:
    rho = rec.get("split_half_spearman")
    if rho is None or not pd.notna(rho):
        return ""
    lo, hi = rec.get("split_half_spearman_low"), rec.get("split_half_spearman_high")
    band = f" ({_num(lo)}\u2013{_num(hi)})" if pd.notna(lo) and pd.notna(hi) else ""
    return _num(rho) + band


def _layer_cell(c: str, rec: dict, info: dict) -> str:
    if c == "significant_share":
        return f"{rec[c]:.0%}" if pd.notna(rec[c]) else ""
    if c == "split_half_spearman":
        return _repro(rec)
    if c == "split_half_top10":
        return _num(rec[c])
    if c == "median_adj":
        return _num(rec[c], 3)
    if c == "channels":
        return str(int(rec[c]))
    return _num(info.get(c), 3)


def layer_table_view(result: Any, evidence: pd.DataFrame, full: list[str]) -> dict[str, Any]:
    """One row per layer with its evidence; rows of layers without full sections are the
    targets of the navigation for those layers and carry their evidence sentence."""
    ly = result.layers.set_index("layer") if not result.layers.empty else None
    cols = [("channels", "channels"), ("median", "median PCACE"), ("max", "max")]
    if evidence.has_null.any():
        cols += [("significant_share", "beat null"), ("median_adj", "median adj.")]
    if evidence.split_half_spearman.notna().any():
        cols += [("split_half_spearman", "split-half Spearman"), ("split_half_top10", "top-10")]
    rows = []
    for rec in evidence.to_dict("records"):
        layer = rec["layer"]
        info = ly.loc[layer].to_dict() if ly is not None and layer in ly.index else {}
        rows.append({"layer": layer, "anchor": anchor(layer), "full": layer in full,
                     "evidence": rec["evidence"],
                     "cells": [_layer_cell(c, rec, info) for c, _ in cols],
                     "tops": info.get("top_channels", ""), "say": rec["evidence_text"]})
    return {"columns": [label for _, label in cols], "rows": rows}


def evidence_images(result: Any) -> str:
    """`` with N images`` when the run records N, else empty."""
    from .evidence import _n_images

    n = _n_images(result)
    return f" with {n} images" if n else ""


def _list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def verdict_view(result: Any, evidence: pd.DataFrame, full: list[str]) -> dict[str, Any]:
    """The report's answer in plain words (``text``), and whether it is a warning (``note``):
    which layers carry evidence, and what to do."""
    n = len(evidence)
    if not evidence.has_null.any():
        return {"note": True, "text": no_null_text() + " Layers drawn in full are the "
                f"{len(full)} with the highest values, which says nothing about chance."}
    strong = evidence.layer[evidence.evidence == "strong"].tolist()
    weak = evidence.layer[evidence.evidence == "weak"].tolist()
    n_img = evidence_images(result)
    if not strong and not weak:
        return {"note": True, "text": (
            f"No layer carries evidence: in none of the {n} layers does any channel "
            f"beat the permutation null{n_img}. The rankings are indistinguishable "
            "from chance, so more images are needed before they can be read. The "
            f"{len(full)} layers with the highest null-corrected values are drawn in "
            "full below for orientation only.")}
    parts = []
    if strong:
        parts.append(f"{len(strong)} of {n} layers {'carries' if len(strong) == 1 else 'carry'} "
                     f"strong evidence ({_list(strong)})")
    if weak:
        among = "" if strong else f" of {n} layer{'s' if n != 1 else ''}"
        parts.append(f"{len(weak)}{among} {'carries' if len(weak) == 1 else 'carry'} weak "
                     f"evidence ({_list(weak)})")
    rest = n - len(strong) - len(weak)
    tail = (f"; the other {rest} do not beat chance{n_img}: more images are needed to rank "
            "their channels, and they are listed in the table only." if rest else ".")
    left_out = len(strong) + len(weak) - len([x for x in full if x in strong + weak])
    if left_out > 0:
        tail += (f" To keep the report light, {len(full)} of them (the strongest) have full "
                 f"sections; the other {left_out} are rows of the layer table "
                 f"({action('draw_layers', run_dir=result.run_dir or 'RUN_DIR')}).")
    return {"note": False, "text": "; ".join(parts) + tail}


def _featurevis_note(info: dict | None, made_for: list[str] | None = None) -> str:
    """Why a layer section has no feature visualisations."""
    if not info and made_for:
        return (f"No feature visualisations for this layer: to keep the report cheap they "
                f"are made for {len(made_for)} layer{'s' if len(made_for) != 1 else ''} "
                f"only, the strongest ({', '.join(made_for)}).")
    if not info:
        return "No feature visualisations saved for this layer."
    reasons = featurevis_reasons(info)
    said = "; ".join(f"channel {c}: the synthetic input {r}"
                     for c, r in zip(info["channels"], reasons, strict=True) if r)
    return ("Feature visualisations not shown: no synthetic input excites its channel "
            f"clearly more than the strongest of the {info.get('reference_images', 'reference')} "
            f"images (at least {CLEAR_FACTOR:g} times, and above zero), so a picture would say "
            f"nothing the data do not. {said[0].upper() + said[1:]}.")


def _section_view(result: Any, layer: str, figs: list[Any], assets: Any,
                  ev: dict) -> dict[str, Any]:
    row = result.layers[result.layers.layer == layer]
    facts = ""
    if not row.empty:
        r = row.iloc[0]
        facts = (f"{int(r.channels)} channels, maps {int(r.height)}x"
                 f"{int(r.width)}; median PCACE {r['median']:.3f}, max {r['max']:.3f}"
                 + (f", {int(r.dead)} dead" if "dead" in r and r.dead else "")
                 + (f"; top channels {r.top_channels}" if "top_channels" in r else ""))
    names = {f.name.split("_", 1)[0] for f in figs}
    notes = []
    if assets is None:
        notes.append("No activation maps for this layer: the run has no assets.")
    elif layer not in assets.layers:
        notes.append("No assets were saved for this layer.")
    else:
        if "ace" not in names:
            notes.append("No ACE transforms saved for this layer (they need the "
                         "principal components that pcace.rank keeps in memory).")
        if "featurevis" not in names:
            notes.append(_featurevis_note(assets.layer(layer).get("featurevis"),
                                          assets.index.get("featurevis_layers")))
    return {"layer": layer, "anchor": anchor(layer), "evidence": ev.get("evidence", "unknown"),
            "text": ev.get("evidence_text", ""), "facts": facts,
            "figures": [figure_view(f) for f in figs], "notes": notes}


def page_context(result: Any, assets: Any, figures: list[Any], title: str | None,
                 full: list[str] | None = None) -> dict[str, Any]:
    """Everything ``templates/report.html`` shows of a one-target run.

    Parameters
    ----------
    result : PCACEResult
        The run.
    assets : Assets or None
        Its assets, when saved.
    figures : list of RenderedFigure
        The figures, in report order (:func:`pcace.viz.render_figures`).
    title : str, optional
        The page title; default names the model and the target.
    full : list of str, optional
        The layers with full sections; default :func:`pcace.viz.evidence.full_layers`.

    Returns
    -------
    dict
        The template's context.
    """
    m = result.manifest
    model = m.get("model", {})
    model_name = model.get("class", "model") if isinstance(model, dict) else str(model)
    layers = layer_order(result)
    evidence = run_evidence(result)
    full = full_layers(result, evidence) if full is None else full
    by_section: dict[str, list[Any]] = {}
    for f in figures:
        by_section.setdefault(f.section, []).append(f)
    ev_of = {r["layer"]: r for r in evidence.to_dict("records")}
    level = dict(zip(evidence.layer, evidence.evidence, strict=True))
    return {
        "title": title or f"PCACE report: {model_name}, {target_text(m.get('target'))}",
        "chips": [{"layer": n, "anchor": anchor(n), "level": level.get(n, "unknown")}
                  for n in layers],
        "summary_verdict": verdict_view(result, evidence, full),
        "summary": summary_items(result),
        "overview": [figure_view(f) for f in by_section.get("overview", [])],
        "layers": layer_table_view(result, evidence, full),
        "channels": channel_table_view(result), "alpha": ALPHA, "no_null_text": no_null_text(),
        "no_assets": no_assets_text() if assets is None else "",
        "cam": [figure_view(f) for f in by_section.get("cam", [])],
        "sections": [_section_view(result, layer, by_section.get(layer, []), assets,
                                   ev_of.get(layer, {})) for layer in layers if layer in full],
        "notes": (assets.index.get("notes") or []) if assets is not None else [],
        "version": m.get("pcace_version", ""),
    }
