"""One number per ranking from its ablation curves: how much more its top channels matter.

Examples
--------
>>> import pandas as pd
>>> curves = pd.DataFrame({"ranking": ["pcace"] * 4, "selection": ["top", "top",
...                        "random", "random"], "m": [1, 2, 1, 2],
...                        "score_drop": [0.5, 0.9, 0.1, 0.2]})
>>> faithfulness_summary(curves).mean_gap.round(2).tolist()  # doctest: +SKIP
[0.55]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..core.voice import option

__all__ = ["faithfulness_summary"]


def faithfulness_summary(curves: pd.DataFrame, metric: str = "score_drop") -> pd.DataFrame:
    """One number per ranking: how much more its top channels matter than random ones.

    For each ranking, ``gap(m) = metric(top m) - mean metric(random m)`` at every
    size ``m`` that both have. ``area`` integrates it over ``log2 m``
    (trapezoid rule; sizes are usually powers of two, so each doubling weighs the
    same), and ``mean_gap`` divides by the ``log2 m`` span: the average excess
    drop, in score units (with a single size, the gap itself). Larger = ablating
    the ranking's top channels hurts more than ablating random ones.

    Parameters
    ----------
    curves : pandas.DataFrame
        The output of :func:`ablate`.
    metric : {"score_drop", "score_change", "accuracy_drop", "variance_share"}, default "score_drop"
        The curve compared. ``"score_drop"`` (mean score lost) suits rankings
        of what the score needs; ``"score_change"`` (mean ``|change|`` of each
        image's score) and ``"variance_share"`` (the share of the score's
        variance across images that runs through the channels; best measured
        with ``mode="resample"``) suit rankings of what the score varies with,
        such as PCACE: under mean ablation a channel whose effect on the score
        is linear moves every image's score but not their mean.

    Returns
    -------
    pandas.DataFrame
        One row per ranking, sorted by ``area`` (descending): ``ranking``,
        ``area``, ``mean_gap``, ``mean_gap_sd_units`` (mean over sizes of the gap
        divided by the random sets' standard deviation, where that is > 0),
        ``bottom_mean_gap`` (the same for the bottom channels; negative = the
        bottom channels matter less than random ones), ``top_minus_bottom``
        (``mean_gap - bottom_mean_gap``) and, when accuracy was measured and is
        not the metric, ``accuracy_mean_gap``. ``attrs["metric"]`` names the
        metric, ``attrs["mode"]`` the ablation mode of the curves (when they
        say).

    Examples
    --------
    >>> import pandas as pd
    >>> c = pd.DataFrame({"ranking": ["a", "a", "a", "a", "random", "random"],
    ...                   "selection": ["top", "top", "bottom", "bottom", "random", "random"],
    ...                   "m": [1, 4, 1, 4, 1, 4], "score_drop": [1.0, 3.0, 0.0, 0.5, 0.5, 1.0],
    ...                   "score_drop_sd": [None, None, None, None, 0.1, 0.2]})
    >>> faithfulness_summary(c)[["ranking", "area", "mean_gap"]].values.tolist()
    [['a', 2.5, 1.25]]
    """
    _check_curves(curves, metric)
    random = curves[curves.selection == "random"].set_index("m")
    if random.empty:
        raise ValueError("curves has no random rows to compare with")
    whole = curves.attrs.get("n_channels")
    if whole is not None:
        # m = C ablates the whole layer: top, bottom and random sets are the same set, and
        # its gap is 0 by construction; averaged in, it would only dilute the others
        random = random[random.index < int(whole)]
        if random.empty:
            raise ValueError(f"every size ablates all {whole} channels of the layer, where "
                             "every ranking is the same; give sizes below the channel count")
    has_acc = "accuracy_drop" in curves.columns and metric != "accuracy_drop"
    rows = [_ranking_entry(curves, random, name, metric, has_acc)
            for name in [r for r in dict.fromkeys(curves.ranking) if r != "random"]]
    columns = ["ranking", "area", "mean_gap", "mean_gap_sd_units", "bottom_mean_gap",
               "top_minus_bottom"] + (["accuracy_mean_gap"] if has_acc else [])
    table = pd.DataFrame(rows, columns=columns)
    table = table.sort_values("area", ascending=False, kind="stable").reset_index(drop=True)
    table.attrs["metric"] = metric
    table.attrs["mode"] = curves.attrs.get("mode")
    return table


def _check_curves(curves: pd.DataFrame, metric: str) -> None:
    """Raise unless ``metric`` is known and ``curves`` has the columns it needs."""
    metrics = ("score_drop", "score_change", "accuracy_drop", "variance_share")
    if metric not in metrics:
        raise ValueError(f"{option('metric', repr(metric))}: the metric must be one of "
                         f"{metrics}")
    needed = {"ranking", "selection", "m", metric, f"{metric}_sd"}
    if not isinstance(curves, pd.DataFrame) or not needed <= set(curves.columns):
        raise ValueError(f"curves must be the DataFrame that ablate returns, with columns "
                         f"{sorted(needed)}" + (" (accuracy needs labels)"
                                                if metric == "accuracy_drop" else ""))
    if metric == "variance_share" and not curves[metric].notna().any():
        raise ValueError(f"{option('metric', 'variance_share')}: the score is the same for "
                         "every image, so no share of its variance runs through any channel; "
                         f"use {option('metric', 'score_drop')}")


def _ranking_entry(curves: pd.DataFrame, random: pd.DataFrame, name: str, metric: str,
                   has_acc: bool) -> dict[str, Any]:
    """The summary row of ranking ``name``; ``random`` holds the random rows indexed by m."""
    entry: dict[str, Any] = {"ranking": name}
    for selection in ("top", "bottom"):
        sub = curves[(curves.ranking == name) & (curves.selection == selection)]
        sub = sub[sub.m.isin(random.index)].sort_values("m")
        if sub.empty:
            raise ValueError(f"ranking {name!r} has no {selection} rows at the random sizes")
        ms = sub.m.to_numpy()
        gap = sub[metric].to_numpy() - random.loc[ms, metric].to_numpy()
        area, mean_gap = _area(ms, gap)
        if selection == "bottom":
            entry["bottom_mean_gap"] = mean_gap
            continue
        sd = random.loc[ms, f"{metric}_sd"].to_numpy(dtype=float)
        ok = sd > 0
        entry.update({"area": area, "mean_gap": mean_gap,
                      "mean_gap_sd_units": float(np.mean(gap[ok] / sd[ok]))
                      if ok.any() else np.nan})
        if has_acc:
            acc_gap = sub.accuracy_drop.to_numpy() - random.loc[ms, "accuracy_drop"].to_numpy()
            entry["accuracy_mean_gap"] = _area(ms, acc_gap)[1]
    entry["top_minus_bottom"] = entry["mean_gap"] - entry["bottom_mean_gap"]
    return entry


def _area(ms: np.ndarray, gap: np.ndarray) -> tuple[float, float]:
    x = np.log2(ms.astype(float))
    if len(x) == 1:
        return float(gap[0]), float(gap[0])
    area = float(np.sum((gap[1:] + gap[:-1]) / 2 * np.diff(x)))
    return area, area / float(x[-1] - x[0])
