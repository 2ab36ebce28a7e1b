"""The run's shared null: one permutation null for the channels of every layer.

With ``null="shared"`` (the default) the scoring stage leaves the null out, and once every
layer is scored (or restored from its checkpoint) :func:`add_shared_null` runs
:func:`pcace.stats.nulls.shared_null_tables` once per (label, target) over all layers'
components and puts its columns into each layer's table, after ``dead``, where the
per-layer nulls put them. A resumed run recomputes it from the checkpointed components,
so it returns what an uninterrupted run would.

Examples
--------
>>> import pandas as pd
>>> t = pd.DataFrame({"layer": "a", "channel": [0, 1], "target": "t", "dead": False,
...                   "boot_low": 0.1})
>>> _insert_columns(t, t.target == "t", pd.DataFrame({"p_value": [0.5, 0.01]}))
>>> list(t.columns), t.p_value.tolist()
(['layer', 'channel', 'target', 'dead', 'p_value', 'boot_low'], [0.5, 0.01])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..core.stopwatch import Stopwatch
from ..engines.engine import Engine
from ..stats.nulls import shared_null_tables
from .groups import ImageGroup
from .scoring import ScoredLayers, null_key

__all__ = ["add_shared_null"]


def add_shared_null(scored: ScoredLayers, scores: np.ndarray, groups: list[ImageGroup],
                    target_names: list[str], *, seed: int, score: str, ace_options: dict,
                    engine: Engine | None, chunk: Any = None,
                    watch: Stopwatch | None = None) -> None:
    """The shared null's columns in every scored layer's table, and its manifest records.

    ``scored.tables`` (one table per layer, rows per label and target) gain ``null_mean``,
    ``null_sd``, ``null_q95``, ``p_value``, ``q_value``, ``pcace_adj`` and
    ``pcace_adj_linear``; ``scored.nulls[layer][key]`` the record of each (label, target).
    """
    watch = watch or Stopwatch()
    tables = {t.layer.iloc[0]: t for t in scored.tables if len(t)}
    if not tables:
        return
    for group in groups:
        comps = {name: scored.components[name if group.label is None else (name, group.label)]
                 for name in tables}
        for j, column in enumerate(group.columns):
            target = target_names[column]
            rows = {name: _rows(t, group.label, target) for name, t in tables.items()}
            observed = {name: t.pcace.to_numpy()[rows[name]] for name, t in tables.items()}
            with watch("null"):
                found, records = shared_null_tables(
                    observed, comps, group.scores(scores)[:, j], seed=seed, score=score,
                    ace_options=ace_options, engine=engine, chunk=chunk)
            key = null_key(group.label, target)
            for name, table in tables.items():
                _insert_columns(table, rows[name], found[name])
                scored.nulls.setdefault(name, {})[key] = {
                    k: v for k, v in records[name].items() if k != "null"}


def _rows(table: pd.DataFrame, label: Any, target: str) -> np.ndarray:
    mine = table.target.astype(str).to_numpy() == target
    if label is not None:
        mine &= (table.label == label).to_numpy()
    return mine


def _insert_columns(table: pd.DataFrame, rows: Any, summary: pd.DataFrame) -> None:
    """``summary``'s columns (not ``channel``, ``pcace``) into ``rows`` of ``table``, placed
    after ``dead`` when new."""
    at = list(table.columns).index("dead") + 1 if "dead" in table.columns else len(table.columns)
    for column in summary.columns:
        if column in ("channel", "pcace"):
            continue
        if column not in table.columns:
            table.insert(at, column, np.nan)
        table.loc[np.asarray(rows), column] = summary[column].to_numpy()
        at = list(table.columns).index(column) + 1
