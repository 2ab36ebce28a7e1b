"""The result's tables: channel rows ranked within each layer, one row per layer, evidence.

Examples
--------
>>> ch = pd.DataFrame({"layer": "c", "channel": [0, 1], "pcace": [0.2, 0.6],
...                    "rank": [2, 1], "dead": False, "n_components": 3})
>>> layer_summary(ch, {"c": (2, 4, 4)})[["layer", "median", "top_channels"]].values.tolist()
[['c', 0.4, '1 0']]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..core.stopwatch import Stopwatch
from ..engines.engine import Engine
from ..stats.evidence import layer_evidence, significant, split_half_table
from .groups import ImageGroup
from .scoring import ScoredLayers

__all__ = ["BASE_COLUMNS", "add_layer_statistics", "channel_table", "layer_summary",
           "stability_manifest"]

BASE_COLUMNS = ["layer", "layer_order", "channel", "target", "pcace", "rank", "n_components",
                "explained_variance", "dead"]


def layer_summary(channels: pd.DataFrame, shapes: dict[str, tuple[int, ...]],
                  top: int = 5) -> pd.DataFrame:
    """One row per layer (in the order of ``shapes``) summarising its channels' values.

    With a ``target`` (and ``label``) column, one row per (layer, label, target), in the
    order the channel table lists them.
    """
    keys = [k for k in ("label", "target") if k in channels.columns]
    rows = []
    for order, (name, shape) in enumerate(shapes.items()):
        layer = channels[channels.layer == name]
        if layer.empty:
            continue
        groups = layer.groupby(keys, sort=False) if keys else [((), layer)]
        for key, sub in groups:
            values = sub.pcace.to_numpy()
            best = sub.sort_values("rank").channel.head(top).tolist()
            rows.append({
                "layer": name, **dict(zip(keys, key, strict=True)), "order": order,
                "channels": len(sub), "height": shape[1],
                "width": shape[2], "mean": values.mean(), "median": float(np.median(values)),
                "q90": float(np.quantile(values, 0.9)), "max": values.max(),
                "dead": int(sub.dead.sum()), "components": float(sub.n_components.mean()),
                "top_channels": " ".join(map(str, best)),
            })
    return pd.DataFrame(rows)


def channel_table(tables: list[pd.DataFrame], names: list[str]) -> pd.DataFrame:
    """The channel rows of every layer in network order, ranked within each (layer, label,
    target), the base columns first."""
    if not tables:
        return pd.DataFrame(columns=BASE_COLUMNS)
    order = {n: i for i, n in enumerate(names)}
    tables = sorted(tables, key=lambda t: order.get(t.layer.iloc[0], -1) if len(t) else -1)
    channels = pd.concat(tables, ignore_index=True)
    channels["layer_order"] = channels.layer.map(order)
    keys = ["layer", *[k for k in ("label", "target") if k in channels.columns]]
    channels["rank"] = (channels.groupby(keys, sort=False).pcace
                        .rank(ascending=False, method="first").astype(int))
    base = [c for c in BASE_COLUMNS if c in channels.columns]
    if "label" in channels.columns:
        base.insert(base.index("channel"), "label")
    extra = [c for c in channels.columns if c not in base]
    return channels[base + extra]


def add_layer_statistics(layers: pd.DataFrame, channels: pd.DataFrame, scored: ScoredLayers,
                         scores: np.ndarray, groups: list[ImageGroup], target_names: list[str],
                         split_half: int, seed: int, ace_options: dict,
                         engine: Engine | None = None, watch: Stopwatch | None = None) -> None:
    """Evidence per (layer, label, target): null share, split-half, verdict; stability."""
    watch = watch or Stopwatch()
    if layers.empty:
        return
    if "q_value" in channels.columns:
        channels["significant"] = significant(channels.q_value)
    for g in groups:
        for j, column in enumerate(g.columns):
            with watch("split_half"):
                _add_group_evidence(layers, channels, scored, g, target_names[column],
                                    g.scores(scores)[:, j], split_half, seed, ace_options,
                                    engine)
    stability = scored.stability
    if stability:
        found = [stability.get(row.layer, {}).get(
            (getattr(row, "label", None), getattr(row, "target", None)), {})
            for row in layers.itertuples()]
        layers["rank_spearman"] = [s.get("spearman_mean") for s in found]
        layers["top10_retention"] = [s.get("top_retention") for s in found]


#: From this many images on, the split-half check first judges its interval after 3 splits
#: instead of 4. Measured on the shared ResNet-20 (cat logit, 19 layers): the adaptive
#: check's projected agreement is within 0.0082 of the 10-split value in every layer at
#: N = 5,000 (76 splits in all instead of 87) and within 0.0017 at N = 50,000 (57 instead
#: of 76); at N = 1,000 cat images 3 splits missed the 0.03 bar (0.033), so smaller runs
#: keep 4 (benchmarks/README.md, "Split halves from 3 splits at 5,000 images").
FEWER_SPLITS_FROM = 5_000


def first_splits(n_images: int) -> int:
    """Splits the split-half check runs before its first stopping decision.

    Examples
    --------
    >>> first_splits(1000), first_splits(50_000)
    (4, 3)
    """
    return 3 if n_images >= FEWER_SPLITS_FROM else 4


def _add_group_evidence(layers: pd.DataFrame, channels: pd.DataFrame, scored: ScoredLayers,
                        group: ImageGroup, target: str, scores: np.ndarray, split_half: int,
                        seed: int, ace_options: dict, engine: Engine | None) -> None:
    """The evidence columns of one (label, target)'s rows of the layer table."""
    mine = channels.target.astype(str) == target
    rows = layers.target.astype(str) == target
    if group.label is not None:
        mine &= channels.label == group.label
        rows &= layers.label == group.label
    split = None
    if split_half and scores.size >= 20:
        if group.label is None:
            comps = dict(scored.components)
        else:
            comps = {key[0]: z for key, z in scored.components.items()
                     if key[1] == group.label}
        # no more splits than a 95% interval of width 0.05 on the agreement needs, or
        # than it takes to settle that the ranking is not reproducible
        split = split_half_table(comps, scores, splits=split_half, seed=seed, width=0.05,
                                 settled=True, min_splits=first_splits(int(scores.size)),
                                 ace_options=ace_options, engine=engine)
    if "q_value" not in channels.columns and split is None:
        return
    evidence = layer_evidence(channels[mine], split, n_images=int(scores.size))
    evidence = evidence.drop(columns=["channels"]).set_index("layer")
    for column in evidence.columns:
        if column not in layers.columns:
            layers[column] = pd.Series(dtype=evidence[column].dtype)
            if evidence[column].dtype == object:
                layers[column] = layers[column].astype(object)
        layers.loc[rows, column] = layers.loc[rows, "layer"].map(evidence[column])


def stability_manifest(stability: dict[str, dict], plain: bool, per_label: bool
                       ) -> dict[str, Any]:
    """Per layer: its stability (one target), per target, or per label and target."""
    out: dict[str, Any] = {}
    for layer, entries in stability.items():
        for (label, target), stats in entries.items():
            if plain:
                out[layer] = stats
            elif per_label:
                out.setdefault(layer, {}).setdefault(str(label), {})[target] = stats
            else:
                out.setdefault(layer, {})[target] = stats
    return out
