"""One entry for a layer's permutation null: ``method="pooled"`` (cheap) or ``"exact"``.

:func:`null_table` is what :func:`pcace.rank` calls for each layer: it runs the chosen null
through an engine and returns the table of :func:`pcace.stats.null.null_summary` (the same
columns whichever method ran) with a record of what ran, for the manifest.

- ``"pooled"`` (default, :mod:`pcace.stats.pooled`): each channel against
  ``max(20, ceil(1000 / C))`` permutations of its own, every channel compared with the
  layer's pool of ``max(1000, 20 C)`` values. Calibrated over a layer's channels; for one
  channel as far as its null equals its layer's (the validity and limits are in
  :mod:`pcace.stats.pooled` and ``benchmarks/README.md``, section "Cheap null").
- ``"exact"`` (:func:`pcace.stats.null.permutation_null`): every channel against the same
  ``permutations`` permutations, ``C * permutations`` ACE problems; each channel's p-value
  is exact. Use it for claims about single channels.

Examples
--------
>>> import numpy as np
>>> from pcace import ace
>>> rng = np.random.default_rng(0)
>>> z = rng.normal(size=(6, 80, 2)); y = z[0, :, 0] + 0.3 * rng.normal(size=80)
>>> table, record = null_table(ace(z, y).rho, z, y, pool=120, min_per_channel=10)
>>> record["null"], record["ace_problems"], bool(table.q_value[0] <= 0.05)
('pooled', 120, True)
>>> table, record = null_table(ace(z, y).rho, z, y, method="exact", permutations=30)
>>> record["ace_problems"], list(table.columns[:3])
(180, ['channel', 'pcace', 'null_mean'])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..core.validation import integer
from ..engines.engine import Engine
from .null import null_summary, permutation_null
from .pooled import _components, channel_groups, pooled_null, pooled_summary

__all__ = ["NULL_METHODS", "null_table"]

#: The permutation nulls :func:`null_table` runs, the default first.
NULL_METHODS = ("pooled", "exact")


def null_table(
    observed: Any,
    z: Any,
    scores: Any,
    *,
    method: str = "pooled",
    permutations: int = 100,
    pool: int = 1000,
    min_per_channel: int = 20,
    seed: int = 0,
    chunk: int | None = None,
    score: str = "maximal",
    ace_options: dict | None = None,
    engine: Engine | None = None,
    progress: bool = False,
    channels: Sequence[int] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """p- and q-values, null statistics and ``pcace_adj`` of one layer's channels.

    Parameters
    ----------
    observed : array_like
        ``(C,)`` the layer's PCACE values (computed with ``score`` and ``ace_options``).
    z : torch.Tensor or numpy.ndarray
        ``(C, N, k)`` the layer's principal components (a CUDA tensor runs on its device).
    scores : array_like
        ``(N,)`` the score per image.
    method : {"pooled", "exact"}, default "pooled"
        Which null (see the module's description).
    permutations : int, default 100
        ``"exact"`` only: permutations per channel (the same for every channel).
    pool, min_per_channel : int, default 1000 and 20
        ``"pooled"`` only: null values wanted per layer, and permutations per channel at
        least (:func:`pcace.stats.pooled.pooled_null`).
    seed : int, default 0
        Seed of the permutations.
    chunk, score, ace_options, engine, progress
        As for :func:`pcace.stats.null.permutation_null`.
    channels : sequence of int, optional
        Channel ids for the ``channel`` column.

    Returns
    -------
    table : pandas.DataFrame
        The columns of :func:`pcace.stats.null.null_summary`, one row per channel.
    record : dict
        ``null`` (the method), ``ace_problems`` (ACE runs made), ``permutations`` (per
        channel: an int for ``"exact"``, the most any channel got for ``"pooled"``) and,
        for ``"pooled"``, ``pool_size`` (null values each channel was compared with, the
        smallest over the layer's pools) and ``heterogeneity_p``: a Kruskal-Wallis test
        that the channels of the largest pool share one null distribution (NaN with
        fewer than 2 channels). A small value (say below 0.001) says the channels' nulls
        differ measurably, so single channels' p-values are approximate there: use
        ``"exact"`` for claims about them.
    """
    if method not in NULL_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, NULL_METHODS))}; "
                         f"got {method!r}")
    common = dict(seed=seed, chunk=chunk, score=score, ace_options=ace_options,
                  engine=engine, progress=progress)
    if method == "exact":
        b = integer(permutations, "permutations")
        null = permutation_null(z, scores, b, **common)
        table = null_summary(observed, null, channels=channels)
        live = int((channel_groups(_components(z)) >= 0).sum())
        return table, {"null": "exact", "ace_problems": live * b, "permutations": b}
    pooled = pooled_null(z, scores, pool, min_per_channel=min_per_channel, **common)
    table = pooled_summary(observed, pooled, channels=channels)
    sizes = [pooled.pool(int(g)).size for g in np.unique(pooled.groups[pooled.groups >= 0])]
    per = np.isfinite(pooled.values).sum(axis=1)
    return table, {"null": "pooled", "ace_problems": pooled.problems,
                   "permutations": int(per.max()) if per.size else 0,
                   "pool_size": int(min(sizes)) if sizes else 0,
                   "heterogeneity_p": _heterogeneity(pooled)}


def _heterogeneity(null: Any) -> float:
    """Kruskal-Wallis p-value across the channels of the largest pool (NaN if < 2)."""
    groups, counts = np.unique(null.groups[null.groups >= 0], return_counts=True)
    if groups.size == 0 or counts.max() < 2:
        return float("nan")
    rows = null.values[null.groups == groups[np.argmax(counts)]]
    from scipy.stats import kruskal

    return float(kruskal(*[r[np.isfinite(r)] for r in rows]).pvalue)
