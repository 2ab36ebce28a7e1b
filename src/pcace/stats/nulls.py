"""One entry for the permutation null of a layer (:func:`null_table`) or of a network
(:func:`shared_null_tables`): ``"shared"``, ``"pooled"`` (cheap) or ``"exact"``.

:func:`pcace.rank` calls :func:`shared_null_tables` once for all its layers (the default,
``null="shared"``) or :func:`null_table` for each layer; either runs the null through an
engine and returns the table of :func:`pcace.stats.null.null_summary` (the same columns
whichever method ran) with a record of what ran, for the manifest.

- ``"shared"`` (default of :func:`pcace.rank`, :func:`pcace.stats.pooled.shared_null`): one
  pool for the channels of every layer (per number of non-zero components and tie class)
  of ``max(1000, 20 C)`` values, ``C`` the largest layer's channels, drawn evenly from all
  of them: a few ACE problems per channel (about 2 on ResNet-18). Calibrated over a
  network's channels as far as its layers' nulls agree (``benchmarks/README.md``, "Cheap
  null"); on one layer it is ``"pooled"`` with the permutations spread evenly.
- ``"pooled"`` (:mod:`pcace.stats.pooled`): each channel against
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

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..core.validation import integer
from ..engines.engine import Engine
from .null import null_summary, permutation_null
from .pooled import (
    PooledNull,
    _components,
    channel_groups,
    pooled_null,
    pooled_summary,
    shared_null,
)

__all__ = ["NULL_METHODS", "null_table", "shared_null_tables"]

#: The permutation nulls :func:`null_table` runs, the default first.
NULL_METHODS = ("shared", "pooled", "exact")


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
    method : {"pooled", "shared", "exact"}, default "pooled"
        Which null (see the module's description; ``"shared"`` on one layer: its pool of
        ``max(pool, min_per_channel * C)`` values spread evenly over its channels).
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
    if method == "shared":  # one layer: its own bank, spread evenly over its channels
        tables, records = shared_null_tables({"": observed}, {"": z}, scores, pool=pool,
                                             min_per_channel=min_per_channel, **common)
        table = tables[""]
        if channels is not None:
            table["channel"] = np.asarray(channels)
        return table, records[""]
    pooled = pooled_null(z, scores, pool, min_per_channel=min_per_channel, **common)
    table = pooled_summary(observed, pooled, channels=channels)
    return table, {"null": "pooled", **_record(pooled), "heterogeneity_p": _heterogeneity(pooled)}


def shared_null_tables(
    observed: Mapping[str, Any],
    layers: Mapping[str, Any],
    scores: Any,
    *,
    pool: int = 1000,
    min_per_channel: int = 20,
    seed: int = 0,
    chunk: int | None = None,
    score: str = "maximal",
    ace_options: dict | None = None,
    engine: Engine | None = None,
    progress: bool = False,
) -> tuple[dict[str, pd.DataFrame], dict[str, dict[str, Any]]]:
    """:func:`null_table`'s columns for every layer of a network, against one shared null.

    The null is :func:`pcace.stats.pooled.shared_null`: one bank of permutation values per
    group of channels (same number of non-zero components, same tie class), drawn evenly
    from the channels of every layer, ``max(pool, min_per_channel * C)`` values with ``C``
    the largest layer. p-values are each channel's rank in its bank; q-values are
    Benjamini-Hochberg within each layer.

    Parameters
    ----------
    observed : mapping of str to array_like
        Layer -> ``(C,)`` PCACE values.
    layers : mapping of str to array_like
        Layer -> ``(C, N, k)`` components, the same keys (every layer over the same images).
    scores : array_like
        ``(N,)`` score per image.
    pool, min_per_channel, seed, chunk, score, ace_options, engine, progress
        As for :func:`null_table`.

    Returns
    -------
    tables : dict of str to pandas.DataFrame
        Per layer, the columns of :func:`pcace.stats.null.null_summary`.
    records : dict of str to dict
        Per layer: ``null`` (``"shared"``), ``ace_problems`` (this layer's share),
        ``permutations`` (the most any of its channels got), ``pool_size`` (values its
        channels were compared with, the smallest over its groups), ``shared_by`` (layers
        in the bank) and ``heterogeneity_p``: a Kruskal-Wallis test that the layers'
        contributions to the largest bank share one distribution (NaN with one layer).

    Examples
    --------
    >>> import numpy as np
    >>> from pcace import ace
    >>> rng = np.random.default_rng(0)
    >>> y = rng.normal(size=120)
    >>> z = {"a": rng.normal(size=(4, 120, 3)), "b": rng.normal(size=(8, 120, 3))}
    >>> z["b"][0, :, 0] += 2 * y                          # one channel carries the score
    >>> obs = {name: ace(v, y).rho for name, v in z.items()}
    >>> tables, records = shared_null_tables(obs, z, y, pool=200, min_per_channel=10)
    >>> bool(tables["b"].q_value[0] < 0.05), int((tables["a"].q_value < 0.05).sum())
    (True, 0)
    >>> records["a"]["pool_size"], sum(r["ace_problems"] for r in records.values())
    (200, 200)
    """
    if set(observed) != set(layers):
        raise ValueError("observed and layers must name the same layers; got "
                         f"{sorted(map(str, observed))} and {sorted(map(str, layers))}")
    nulls = shared_null(layers, scores, pool, seed, chunk, min_per_channel=min_per_channel,
                        score=score, ace_options=ace_options, progress=progress,
                        engine=engine)
    tables = {name: pooled_summary(observed[name], nulls[name]) for name in layers}
    spread = _between_layers(nulls)
    records = {name: {"null": "shared", **_record(nulls[name]), "shared_by": len(nulls),
                      "heterogeneity_p": spread} for name in layers}
    return tables, records


def _record(null: PooledNull) -> dict[str, int]:
    """ACE problems, most permutations of a channel and the smallest pool of one layer."""
    sizes = [null.pool(int(g)).size for g in np.unique(null.groups[null.groups >= 0])]
    per = np.isfinite(null.values).sum(axis=1)
    return {"ace_problems": null.problems, "permutations": int(per.max()) if per.size else 0,
            "pool_size": int(min(sizes)) if sizes else 0}


def _between_layers(nulls: Mapping[str, PooledNull]) -> float:
    """Kruskal-Wallis p-value across layers' contributions to the largest bank."""
    if len(nulls) < 2:
        return float("nan")
    g = _largest(np.concatenate([null.groups for null in nulls.values()]))
    return _kruskal([null.values[null.groups == g].ravel() for null in nulls.values()])


def _heterogeneity(null: PooledNull) -> float:
    """Kruskal-Wallis p-value across the channels of the largest pool (NaN if < 2)."""
    return _kruskal(list(null.values[null.groups == _largest(null.groups)]))


def _largest(groups: np.ndarray) -> int:
    """The group with the most channels (-1, no group, when every channel is dead)."""
    live, counts = np.unique(groups[groups >= 0], return_counts=True)
    return int(live[np.argmax(counts)]) if live.size else -1


def _kruskal(parts: list[np.ndarray]) -> float:
    """Kruskal-Wallis p-value across the finite values of each part (NaN below 2 parts)."""
    finite = [p[np.isfinite(p)] for p in parts]
    finite = [p for p in finite if p.size]
    if len(finite) < 2:
        return float("nan")
    from scipy.stats import kruskal

    return float(kruskal(*finite).pvalue)
