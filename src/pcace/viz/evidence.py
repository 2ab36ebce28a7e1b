"""Whether a run's numbers mean anything: per channel (beats chance?) and per layer (evidence).

The ranking tables may come from runs of any age: with or without a permutation null, with
or without the split-half reproducibility columns. These helpers read what is there and say
plainly what is missing, so that figures and the report never show a ranking as if it meant
something when the run cannot tell.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..core.voice import option
from ..stats.common import DEFAULT_ALPHA, significant
from ..stats.evidence import verdict

#: The false-discovery level at which a channel counts as beating the permutation null.
ALPHA = DEFAULT_ALPHA
#: Layers drawn in full (maps, overlays, transforms) when no layer carries evidence.
BEST_FEW = 3
#: At most this many layers are drawn in full, the strongest evidence first.
MAX_FULL = 8
#: Feature visualisations (the slowest asset) for at most this many of them by default.
MAX_FEATUREVIS = 3
EVIDENCE_LEVELS = ("strong", "weak", "none", "unknown")


def no_null_text() -> str:
    """What a run without a permutation null cannot say, and the fix, in the caller's words.

    Examples
    --------
    >>> no_null_text()[-38:]
    'rerun with permutations=199 (or more).'
    """
    return (f"No permutation null was computed for this run ({option('permutations', 0)}), "
            "so nothing says whether these values beat chance; rerun with "
            f"{option('permutations', 199)} (or more).")



def significance(channels: pd.DataFrame) -> pd.Series | None:
    """Per channel, whether it beats the permutation null; None when the run has no null.

    The ``significant`` column when present, else ``q_value <= 0.05``.

    Examples
    --------
    >>> import pandas as pd
    >>> significance(pd.DataFrame({"q_value": [0.01, 0.2]})).tolist()
    [True, False]
    >>> significance(pd.DataFrame({"pcace": [0.3]})) is None
    True
    """
    if "significant" in channels and channels.significant.notna().any():
        col = channels.significant
        if col.dtype == object:
            col = col.astype(str).str.lower().isin(("true", "1", "yes"))
        return col.fillna(False).astype(bool)
    if "q_value" in channels and channels.q_value.notna().any():
        return pd.Series(significant(channels.q_value.to_numpy(dtype=float), ALPHA),
                         index=channels.index)
    return None


def with_significance(channels: pd.DataFrame) -> pd.DataFrame:
    """The channel table with a boolean ``significant`` column when the run has a null."""
    sig = significance(channels)
    return channels if sig is None else channels.assign(significant=sig.to_numpy())


def _column(layers: pd.DataFrame, name: str) -> pd.Series:
    return layers[name] if name in layers else pd.Series(np.nan, index=layers.index)


def _n_images(result: Any) -> int | None:
    data = result.manifest.get("data") if isinstance(result.manifest, dict) else None
    n = data.get("n_images") if isinstance(data, dict) else None
    n = n if n is not None else result.manifest.get("n_images")
    if n is None and getattr(result, "scores", None) is not None:
        n = len(result.scores)
    return int(n) if n is not None else None


def evidence_sentence(level: str, share: float, n_sig: int, n_channels: int,
                      median_adj: float, spearman: float, n_images: int | None) -> str:
    """One plain sentence on what a layer's numbers support."""
    images = f"{n_images} images" if n_images else "this many images"
    if level == "unknown":
        return no_null_text()
    repro = (f"; two disjoint halves of the images rank its channels with Spearman "
             f"{spearman:.2f}" if np.isfinite(spearman) else "")
    if level == "none":
        return (f"No channel beats the permutation null (q \u2264 {ALPHA}) with {images}"
                f"{repro}: this layer's ranking is indistinguishable from chance; more "
                "images are needed before reading it.")
    adj = f", median null-corrected PCACE {median_adj:.2f}" if np.isfinite(median_adj) else ""
    strength = "Strong" if level == "strong" else "Weak"
    return (f"{strength} evidence: {n_sig} of {n_channels} channels ({share:.0%}) beat the "
            f"permutation null{adj}{repro}.")


def run_evidence(result: Any) -> pd.DataFrame:
    """One row per layer (network order): how much a finished run's ranking can be trusted.

    Reads a run of any age (:func:`pcace.stats.evidence.layer_evidence` computes the
    verdicts from arrays while a run is scored; this one reads them back from its tables,
    and applies the same rules to older runs that lack them).

    Columns: ``layer``, ``channels``, ``has_null``, ``n_significant``,
    ``significant_share``, ``median_adj``, ``split_half_spearman`` (with ``_low`` and
    ``_high``), ``split_half_top10``, ``evidence`` (``"strong"``, ``"weak"``, ``"none"``
    or ``"unknown"`` when the run has no null) and ``evidence_text`` (a sentence). Columns
    the run computed are used as they are; the others are derived from the channel table
    where possible, else left empty.

    Parameters
    ----------
    result : PCACEResult
        A run.

    Returns
    -------
    pandas.DataFrame
    """
    ch = with_significance(result.channels)
    names = layer_order(result)
    ly = result.layers.set_index("layer") if result.layers is not None and \
        not result.layers.empty else pd.DataFrame(index=pd.Index([], name="layer"))
    ly = ly.reindex(names)
    groups = ch.groupby("layer", sort=False)
    out = pd.DataFrame({"layer": names})
    out["channels"] = [int((ch.layer == n).sum()) for n in names]
    has_null = "significant" in ch
    out["has_null"] = has_null
    if has_null:
        n_sig = groups.significant.sum()
        out["n_significant"] = [int(n_sig.get(n, 0)) for n in names]
    else:
        out["n_significant"] = np.nan
    share = _column(ly, "significant_share").to_numpy(dtype=float)
    derived_share = out.n_significant / out.channels.clip(lower=1)
    out["significant_share"] = np.where(np.isfinite(share), share, derived_share)
    adj = _column(ly, "median_adj").to_numpy(dtype=float)
    if "pcace_adj" in ch:
        med = groups.pcace_adj.median()
        adj = np.where(np.isfinite(adj), adj, [med.get(n, np.nan) for n in names])
    out["median_adj"] = adj
    for col in ("split_half_spearman", "split_half_spearman_low", "split_half_spearman_high",
                "split_half_top10"):
        out[col] = _column(ly, col).to_numpy(dtype=float)
    given = _column(ly, "evidence").to_numpy(dtype=object)
    texts = _column(ly, "evidence_text").to_numpy(dtype=object)
    n_images = _n_images(result)
    levels, sentences = [], []
    for i, row in out.iterrows():
        if isinstance(given[i], str) and given[i]:  # the run's own verdict
            level = str(given[i]).lower()
            level = level if level in EVIDENCE_LEVELS else "unknown"
            text = texts[i] if isinstance(texts[i], str) and texts[i].strip() else \
                evidence_sentence(level, row.significant_share,
                                  int(row.n_significant) if np.isfinite(row.n_significant)
                                  else 0, int(row.channels), row.median_adj,
                                  row.split_half_spearman, n_images)
        elif has_null:  # an older run: the same rules as pcace.rank applies
            level, text = verdict(row.significant_share, row.split_half_spearman,
                                  row.split_half_spearman_low, n_images, ALPHA,
                                  row.split_half_spearman_high)
            text = text[:1].upper() + text[1:] + "."
        else:
            level, text = "unknown", no_null_text()
        levels.append(level)
        sentences.append(text)
    out["evidence"] = levels
    out["evidence_text"] = sentences
    return out


def layer_order(result: Any) -> list[str]:
    """The run's layers in network order."""
    layers = result.layers
    if layers is not None and not layers.empty:
        key = "order" if "order" in layers else None
        return (layers.sort_values(key) if key else layers).layer.tolist()
    ch = result.channels
    if "layer_order" in ch:
        return ch.groupby("layer").layer_order.first().sort_values().index.tolist()
    return list(dict.fromkeys(ch.layer))


def full_layers(result: Any, evidence: pd.DataFrame | None = None,
                best_few: int = BEST_FEW, max_full: int = MAX_FULL,
                strongest_first: bool = False) -> list[str]:
    """The layers worth full map sections: those with evidence, else the best few.

    A run of at most ``best_few`` layers shows them all. Otherwise: the layers whose
    evidence is ``"strong"`` or ``"weak"``, at most ``max_full`` of them (strong before
    weak, then by median null-corrected value); when none is, the ``best_few`` layers with
    the highest median null-corrected value (or, without a null, the highest 90th
    percentile of PCACE), so that a run without evidence still shows what its best layers
    look like.

    Returns
    -------
    list of str
        In network order, or with ``strongest_first`` from the strongest layer down.
    """
    ev = run_evidence(result) if evidence is None else evidence
    if len(ev) <= best_few:
        return _order(ev, strongest_first)
    with_ev = ev[ev.evidence.isin(("strong", "weak"))]
    if not with_ev.empty:
        ranked = with_ev.assign(_s=(with_ev.evidence == "strong").astype(int),
                                _a=with_ev.median_adj.fillna(-np.inf))
        best = ranked.sort_values(["_s", "_a"], ascending=False, kind="stable").layer
        best = best.head(max_full).tolist()
        return best if strongest_first else [n for n in ev.layer if n in best]
    key = ev.median_adj.to_numpy(dtype=float)
    if not np.isfinite(key).any():
        q90 = result.channels.groupby("layer").pcace.quantile(0.9)
        key = np.array([q90.get(n, np.nan) for n in ev.layer], dtype=float)
    key = np.where(np.isfinite(key), key, -np.inf)
    best = ev.layer.to_numpy()[np.argsort(-key, kind="stable")[:best_few]].tolist()
    return best if strongest_first else [n for n in ev.layer if n in best]


def _order(ev: pd.DataFrame, strongest_first: bool) -> list[str]:
    if not strongest_first:
        return ev.layer.tolist()
    key = ev.median_adj.fillna(-np.inf) + 10.0 * (ev.evidence == "strong") \
        + 5.0 * (ev.evidence == "weak")
    return ev.layer.to_numpy()[np.argsort(-key.to_numpy(), kind="stable")].tolist()


def report_groups(result: Any) -> list[tuple[Any, Any, str]]:
    """The ``(target, label, name)`` of each page: one per target, or per (label, target).

    Examples
    --------
    >>> report_groups(res)  # doctest: +SKIP
    [('cat', None, 'cat'), ('dog', None, 'dog')]
    """
    ch = result.channels
    keys = [k for k in ("label", "target") if k in ch.columns]
    if not keys:
        return [(None, None, "run")]
    pairs = ch[keys].drop_duplicates()
    out = []
    for rec in pairs.to_dict("records"):
        label, target = rec.get("label"), rec.get("target")
        name = str(target) if label is None else \
            (str(label) if target is None or str(target) == str(label)
             else f"{label}: {target}")
        out.append((None if target is None else str(target), label, name))
    if "target" in keys and "label" not in keys:
        order = {t: i for i, t in enumerate(result.targets)}
        out.sort(key=lambda g: order.get(g[0], len(order)))
    return out
