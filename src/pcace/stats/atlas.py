"""Reading a run with many classes: evidence per layer and class, and channel selectivity.

A run with several targets (``target="all"``) or one per label (``per_label=True``) holds,
for every class, every layer and channel. :func:`class_evidence` condenses it to one number
per (layer, class); :func:`selectivity` says, per channel of a layer, which classes it
carries information about. :func:`pcace.viz.class_atlas` draws both.

Examples
--------
>>> atlas = pcace.rank(model, (images, labels), per_label=True)  # doctest: +SKIP
>>> class_evidence(atlas)[0].round(2)  # doctest: +SKIP
>>> selectivity(atlas, "layer3.2.conv2").head()  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .common import significant
from .null import share_significant

__all__ = ["class_column", "class_evidence", "selectivity"]


def class_column(channels: pd.DataFrame) -> pd.Series:
    """The class each row of a channel table belongs to, as a string.

    The target for a multi-target run or a per-label run with one target per label (its
    own class); ``label/target`` when each label was scored on several targets.

    Examples
    --------
    >>> t = pd.DataFrame({"label": [0, 0], "target": ["cat", "dog"]})
    >>> class_column(t).tolist()
    ['0/cat', '0/dog']
    """
    target = channels["target"].astype(str) if "target" in channels.columns else \
        pd.Series("score", index=channels.index)
    if "label" in channels.columns and \
            channels.groupby("label")["target"].nunique().max() > 1:
        return channels["label"].astype(str) + "/" + target
    return target


def _classes_in_order(channels: pd.DataFrame, cls: pd.Series) -> list[str]:
    return list(pd.unique(cls))


def class_evidence(result: Any, alpha: float = 0.05) -> tuple[pd.DataFrame, str]:
    """One number per (layer, class): how much class information the layer carries.

    The share of its channels with ``q <= alpha`` when the run has a permutation null;
    else the median ``pcace_adj``; else the median raw value (biased upwards: compare
    within a run only).

    Parameters
    ----------
    result : PCACEResult
        A run with several targets or ``per_label``.
    alpha : float
        False-discovery rate for the share of significant channels.

    Returns
    -------
    (pandas.DataFrame, str)
        Layers (network order) x classes, and the name of the measure.

    Examples
    --------
    >>> ch = pd.DataFrame({"layer": ["a"] * 4, "layer_order": 0, "channel": [0, 1] * 2,
    ...                    "target": ["x", "x", "y", "y"], "pcace": [0.1, 0.3, 0.5, 0.9]})
    >>> table, measure = class_evidence(type("R", (), {"channels": ch})())
    >>> measure, table.loc["a"].tolist()
    ('median PCACE (raw)', [0.2, 0.7])
    """
    ch = result.channels
    cls = class_column(ch)
    if "q_value" in ch.columns:
        measure = f"share of channels with q <= {alpha:g}"
        values = ch.groupby([ch.layer, cls]).q_value.apply(share_significant, alpha=alpha)
    elif "pcace_adj" in ch.columns:
        measure = "median null-corrected value (pcace_adj)"
        values = ch.groupby([ch.layer, cls]).pcace_adj.median()
    else:
        measure = "median PCACE (raw)"
        values = ch.groupby([ch.layer, cls]).pcace.median()
    table = values.unstack()
    order = ch.groupby("layer").layer_order.first().sort_values().index if \
        "layer_order" in ch.columns else pd.unique(ch.layer)
    table = table.reindex(index=list(order), columns=_classes_in_order(ch, cls))
    table.index.name, table.columns.name = "layer", "class"
    return table, measure


def selectivity(result: Any, layer: str, alpha: float = 0.05) -> pd.DataFrame:
    """Per channel of ``layer``: its value for each class and the classes it informs about.

    Parameters
    ----------
    result : PCACEResult
        A run with several targets or ``per_label``.
    layer : str
        One of its layers.
    alpha : float
        A channel informs about a class when its ``q_value`` there is at most ``alpha``
        (runs with a permutation null); without a null, ``classes`` is empty.

    Returns
    -------
    pandas.DataFrame
        One row per channel: a column per class with its value (``pcace_adj`` when the
        run has it, else ``pcace``), ``best_class``, ``n_classes`` (classes with
        ``q <= alpha``) and ``classes`` (those, best first), sorted by ``best_class`` and
        value.

    Examples
    --------
    >>> ch = pd.DataFrame({"layer": "a", "channel": [0, 1, 0, 1], "target": list("xxyy"),
    ...                    "pcace": [0.9, 0.1, 0.2, 0.8], "q_value": [0.01, 0.5, 0.5, 0.02]})
    >>> selectivity(type("R", (), {"channels": ch})(), "a")[["best_class", "classes"]]
    ... # doctest: +NORMALIZE_WHITESPACE
    class   best_class classes
    channel
    0                x       x
    1                y       y
    """
    ch = result.channels
    sub = ch[ch.layer == layer]
    if sub.empty:
        raise ValueError(f"no layer {layer!r} in this run; layers: {list(pd.unique(ch.layer))}")
    cls = class_column(sub)
    column = "pcace_adj" if "pcace_adj" in sub.columns else "pcace"
    table = sub.assign(_class=cls).pivot(index="channel", columns="_class", values=column)
    table = table[_classes_in_order(sub, cls)]
    table.columns.name = "class"
    values = table.to_numpy(dtype=float)
    table["best_class"] = np.asarray(table.columns[: values.shape[1]])[
        np.nanargmax(np.nan_to_num(values, nan=-np.inf), axis=1)]
    if "q_value" in sub.columns:
        q = sub.assign(_class=cls).pivot(index="channel", columns="_class", values="q_value")
        q = q[table.columns[: values.shape[1]]].to_numpy(dtype=float)
        hits = significant(q, alpha)
        order = np.argsort(-np.nan_to_num(values, nan=-np.inf), axis=1)
        names = np.asarray(table.columns[: values.shape[1]])
        table["n_classes"] = hits.sum(axis=1)
        table["classes"] = [" ".join(names[j] for j in row if hit[j])
                            for row, hit in zip(order, hits, strict=True)]
    else:
        table["n_classes"] = 0
        table["classes"] = ""
    position = {c: i for i, c in enumerate(table.columns[: values.shape[1]])}
    keys = pd.DataFrame({"c": table.best_class.map(position), "v": -np.nanmax(values, axis=1)},
                        index=table.index)
    return table.loc[keys.sort_values(["c", "v"], kind="stable").index]
