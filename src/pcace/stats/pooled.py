"""A permutation null pooled over the channels of a layer: few ACE runs per channel.

The exact null (:func:`pcace.stats.null.permutation_null`) re-scores every channel
against ``B`` permutations of the score: ``C * B`` ACE problems per layer, and a p-value
no smaller than ``1 / (B + 1)``. But the null distributions of a layer's channels are
nearly the same: the same ``n`` images, the same ``k`` standardised principal components,
the same score. :func:`pooled_null` therefore scores each channel against only ``b`` of
its own permutations (``b = max(min_per_channel, ceil(pool / C))``, each problem a fresh
permutation) and :func:`pooled_summary` compares every channel with all ``C * b`` values
of its layer:

    p_c = (1 + #{null values of the layer >= observed_c}) / (C b + 1).

With the defaults (``pool = 1000``, ``min_per_channel = 20``) a layer costs
``max(1000, 20 C)`` ACE problems (1,000 for 16 to 50 channels, 1,280 for 64, 10,240
for 512), against ``100 C`` for today's default exact null (``B = 100``) and ``1000 C``
for one that resolves p-values as finely. The pool holds at least ``20 C`` values, so a
lone strong channel can reach Benjamini-Hochberg's smallest threshold ``0.05 / C``.

Validity and limits
-------------------
Under the hypothesis that no channel relates to the score, the pooled null is the
mixture of the channels' nulls, so the share of a layer's channels with ``p <= alpha``
is ``alpha`` on average (on the shared ResNet-20 with hashed scores: within 1 percentage
point of the exact null's share, ``benchmarks/README.md``, section "Cheap null"). For one
channel the p-value is exact only as far as its null equals its pool's. On the shared
ResNet-20 (cat logit, k = 3) channels' null means differ by up to 0.01 (0.113-0.125 at
N = 1,000), more in early layers and for channels with heavy-tailed components; the rate
at which a channel's own null values reach ``p <= 0.05`` against the pool averages 4.8%
and ranges 0.9-9.0% (3% of channels above 7%, where the measurement's noise alone puts
2%). Ties matter most: a channel silent on many images has a much smaller null, so
channels are pooled only with channels of the same number of non-zero components and the
same tie class (:func:`channel_groups`); within a pool, very different component shapes
(normal next to log-normal) still give light-tailed channels rates up to about 7.5% at a
nominal 5%. Dead channels (all zero) get ``p = 1`` and no ACE run. For a claim about one
channel use the exact null (:func:`pcace.stats.null.permutation_null`).

Examples
--------
>>> import numpy as np
>>> from pcace import ace
>>> rng = np.random.default_rng(0)
>>> z = rng.normal(size=(8, 100, 3))                   # 8 channels, 100 images, k = 3
>>> y = z[0, :, 0] ** 2 + 0.5 * rng.normal(size=100)   # channel 0 carries the score
>>> null = pooled_null(z, y, pool=200, min_per_channel=5, seed=1)
>>> null.values.shape, null.problems                   # 25 permutations per channel
((8, 25), 200)
>>> table = pooled_summary(ace(z, y).rho, null)
>>> bool(table.p_value[0] < 0.01), bool((table.p_value[1:] > 0.01).all())
(True, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..core.validation import MIN_OBSERVATIONS, float64_array, integer, score_kind
from ..core.validation import scores as check_scores
from ..engines.engine import Engine, LocalEngine, Problems
from .common import DEFAULT_PLAN, channel_ids
from .null import _adjust_linear, _adjust_squared, benjamini_hochberg

__all__ = ["PooledNull", "channel_groups", "pool_plan", "pooled_null", "pooled_summary",
           "shared_null", "shared_plan", "tie_fraction"]

#: Bytes of permuted scores held per batch of problems handed to the engine.
BATCH_BYTES = 64 * 2**20
#: Edges of the tie classes of :func:`channel_groups` (share of tied images).
TIE_EDGES = (0.05, 0.25, 0.5, 0.75)


@dataclass(frozen=True)
class PooledNull:
    """Per-channel permutation values and the pool each channel belongs to.

    Attributes
    ----------
    values : numpy.ndarray
        ``(C, b)`` float64: channel ``c``'s values against its own permutations of the
        score; NaN past the permutations a channel got (channels of a small pool get
        more) and for dead channels.
    groups : numpy.ndarray
        ``(C,)`` int: the pool of each channel (:func:`channel_groups`); -1 for a dead
        channel.
    bank : mapping of int to numpy.ndarray, optional
        Sorted null values per group shared by several layers (:func:`shared_null`);
        None: each pool is this layer's own values.
    """

    values: np.ndarray
    groups: np.ndarray
    bank: Mapping[int, np.ndarray] | None = None

    @property
    def problems(self) -> int:
        """ACE problems solved (non-NaN values)."""
        return int(np.isfinite(self.values).sum())

    def pool(self, group: int) -> np.ndarray:
        """The sorted null values of one pool (the shared bank's, when there is one)."""
        if self.bank is not None:
            return self.bank[int(group)]
        v = self.values[self.groups == group]
        return np.sort(v[np.isfinite(v)])


def pool_plan(groups: np.ndarray, pool: int, min_per_channel: int) -> np.ndarray:
    """Permutations per channel: ``max(min_per_channel, ceil(pool / size of its group))``.

    Examples
    --------
    >>> pool_plan(np.array([0, 0, 0, 0, 1, -1]), pool=100, min_per_channel=20).tolist()
    [25, 25, 25, 25, 100, 0]
    """
    out = np.zeros(groups.shape, dtype=np.int64)
    for g in np.unique(groups[groups >= 0]):
        members = groups == g
        out[members] = max(min_per_channel, math.ceil(pool / int(members.sum())))
    return out


def tie_fraction(z: Any) -> np.ndarray:
    """Per channel, the largest share of images tied with another on one component.

    ``1 - (distinct values) / N``, maximised over the channel's non-zero components: 0
    for continuous components, about 0.5 for a channel that is silent (all zero) on half
    the images.

    Examples
    --------
    >>> import numpy as np
    >>> z = np.stack([np.arange(8.0)[:, None], np.r_[np.zeros(4), np.arange(1.0, 5.0)][:, None]])
    >>> tie_fraction(z).tolist()
    [0.0, 0.375]
    """
    rows = np.sort(np.ascontiguousarray(np.swapaxes(_native(z), 1, 2)), axis=2)  # (C, k, N)
    distinct = 1 + (np.diff(rows, axis=2) != 0).sum(axis=2)       # (C, k)
    unused = ~(rows != 0).any(axis=2)                              # all-zero components
    distinct = np.where(unused, rows.shape[2], distinct)
    return (1.0 - distinct / rows.shape[2]).max(axis=1)


def _native(z: Any) -> np.ndarray:
    """``z`` as NumPy in its own float dtype (float32 ties are float64's: the widening is
    exact), float64 otherwise; a view where it can be."""
    a = z.detach().cpu().numpy() if isinstance(z, torch.Tensor) else np.asarray(z)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)


def channel_groups(z: Any) -> np.ndarray:
    """The pool of each channel: its number of non-zero components and its tie class.

    Channels share a pool when they have the same number of non-zero components and
    their :func:`tie_fraction` falls in the same class of :data:`TIE_EDGES` (ties make
    ACE's smoothers fit less, so a channel silent on many images has a smaller null);
    -1 marks a dead channel.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=(4, 40, 2)); z[1, :, 1] = 0; z[2, :20] = 0; z[3] = 0
    >>> channel_groups(z).tolist()
    [20, 10, 22, -1]
    """
    za = _native(z)
    nonzero = (za != 0).any(axis=1).sum(axis=1).astype(np.int64)
    ties = np.searchsorted(np.asarray(TIE_EDGES), tie_fraction(za), side="right")
    return np.where(nonzero > 0, 10 * nonzero + ties, -1)


def pooled_null(
    z: Any,
    scores: Any,
    pool: int = 1000,
    seed: int = 0,
    chunk: int | None = None,
    *,
    min_per_channel: int = 20,
    score: str = "maximal",
    ace_options: dict | None = None,
    progress: bool = False,
    engine: Engine | None = None,
) -> PooledNull:
    """Every channel's values against a few permutations of its own, for a pooled null.

    Parameters
    ----------
    z : torch.Tensor or numpy.ndarray
        ``(C, N, k)`` principal-component scores of ONE layer (a CUDA tensor runs ACE on
        its device).
    scores : array_like
        ``(N,)`` score per image.
    pool : int, default 1000
        Null values wanted per pool (per layer, when every channel has ``k`` non-zero
        components): the p-value's resolution is ``1 / (pool + 1)`` or finer.
    seed : int, default 0
        Seed of the permutations (one fresh permutation per ACE problem).
    chunk : int, optional
        ACE problems per call (default: as many as fit in about 128 MB).
    min_per_channel : int, default 20
        Permutations per channel at least; the pool then holds at least ``20 C``
        values, so BH's smallest threshold ``0.05 / C`` can be reached.
    score, ace_options, progress, engine
        As for :func:`pcace.stats.null.permutation_null`.

    Returns
    -------
    PooledNull
        ``values`` ``(C, b)`` and ``groups``; ``problems`` ACE runs, about
        ``max(pool, min_per_channel * C)``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=(4, 60, 2)); z[3] = 0                  # channel 3 is dead
    >>> n = pooled_null(z, rng.normal(size=60), pool=30, min_per_channel=4)
    >>> n.values.shape, n.groups.tolist(), n.problems
    ((4, 10), [20, 20, 20, -1], 30)
    """
    pool = integer(pool, "pool")
    min_per_channel = integer(min_per_channel, "min_per_channel")
    integer(seed, "seed", minimum=None)
    score_kind(score)
    zt = _components(z)
    c, n, k = zt.shape
    y = check_scores(scores, n)
    step = DEFAULT_PLAN.ace_problems(n, k) if chunk is None else integer(chunk, "chunk")
    groups = channel_groups(zt)
    per = pool_plan(groups, pool, min_per_channel)
    from tqdm.auto import tqdm

    with tqdm(total=int(per.sum()), desc="pooled null", unit="fit",
              disable=not progress) as bar:
        values = _permuted_values(zt, y, per, np.random.default_rng(int(seed)),
                                  engine=engine, chunk=step, score=score,
                                  ace_options=ace_options, progress=bar.update)
    values[groups < 0] = np.nan
    return PooledNull(values=values, groups=groups)


def _permuted_values(zt: torch.Tensor, y: np.ndarray, per: np.ndarray,
                     rng: np.random.Generator, *, engine: Engine | None, chunk: int,
                     score: str, ace_options: dict | None, progress: Any) -> np.ndarray:
    """``(C, max(per))`` values: channel ``c`` against ``per[c]`` fresh permutations of
    ``y`` (NaN past them)."""
    c, n = int(zt.shape[0]), int(zt.shape[1])
    values = np.full((c, max(1, int(per.max()) if per.size else 1)), np.nan)
    channels = np.repeat(np.arange(c), per)          # each channel's problems consecutive
    slots = np.concatenate([np.arange(b) for b in per]) if channels.size else channels
    run_on = LocalEngine() if engine is None else engine
    rows = max(1, BATCH_BYTES // (8 * n))
    src: Any = zt.numpy() if zt.device.type == "cpu" else zt
    for lo in range(0, channels.size, rows):
        hi = min(channels.size, lo + rows)
        perms = rng.permuted(np.tile(np.arange(n), (hi - lo, 1)), axis=1)
        ys: Any = y[perms]
        if zt.device.type != "cpu":
            ys = torch.as_tensor(ys, device=zt.device)
        problems = Problems(src, ys, channels[lo:hi], order="paired")
        values[channels[lo:hi], slots[lo:hi]] = run_on.values(
            problems, chunk=chunk, score=score, ace_options=dict(ace_options or {}),
            stage="null", progress=progress)
    return values


def shared_plan(groups: Mapping[str, np.ndarray], sizes: Mapping[str, int], pool: int,
                min_per_channel: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Permutations per channel for a bank shared by every layer: each group's bank holds
    ``max(pool, min_per_channel * C)`` values, ``C`` the largest layer with channels in
    the group, spread as evenly as possible over all its channels (the odd ones at random).

    Examples
    --------
    >>> plan = shared_plan({"a": np.array([0, 0]), "b": np.array([0, 0, 0, -1])},
    ...                    {"a": 2, "b": 4}, pool=10, min_per_channel=2)
    >>> sorted(np.concatenate(list(plan.values())).tolist()), int(plan["b"][3])
    ([0, 2, 2, 2, 2, 2], 0)
    """
    names = list(groups)
    members: dict[int, list[tuple[str, int]]] = {}
    for name in names:
        for c in np.flatnonzero(groups[name] >= 0):
            members.setdefault(int(groups[name][c]), []).append((name, int(c)))
    out = {name: np.zeros(groups[name].shape, dtype=np.int64) for name in names}
    rng = np.random.default_rng([int(seed), 2**20])
    for g in sorted(members):
        who = members[g]
        largest = max(int(sizes[name]) for name in {name for name, _ in who})
        bank = max(pool, min_per_channel * largest)
        each, odd = divmod(bank, len(who))
        extra = np.zeros(len(who), dtype=np.int64)
        extra[rng.permutation(len(who))[:odd]] = 1
        for (name, c), more in zip(who, extra, strict=True):
            out[name][c] = each + more
    return out


def shared_null(
    layers: Mapping[str, Any],
    scores: Any,
    pool: int = 1000,
    seed: int = 0,
    chunk: int | None = None,
    *,
    min_per_channel: int = 20,
    score: str = "maximal",
    ace_options: dict | None = None,
    progress: bool = False,
    engine: Engine | None = None,
) -> dict[str, PooledNull]:
    """A pooled null whose pools are shared by all layers: a few ACE runs per channel.

    :func:`pooled_null` gives every layer its own pool of ``max(pool, 20 C)`` values.
    The layers of one network share ``n`` and ``k``, and their channels' nulls differ
    about as little between layers as within one (``benchmarks/README.md``, "Cheap
    null"); here each pool (the channels of every layer with the same number of non-zero
    components and tie class, :func:`channel_groups`) holds ``max(pool, min_per_channel *
    C)`` values, ``C`` the largest layer's channels, drawn evenly from all its channels:
    ResNet-18's 4,800 channels cost 10,240 ACE problems instead of 96,000 (1,280 instead
    of 20,880 for the CIFAR ResNet-20's 688). Each layer's p-values, q-values (BH within
    the layer) and ``pcace_adj`` come from :func:`pooled_summary` with its
    :class:`PooledNull`, whose ``pool`` is the shared bank.

    Parameters
    ----------
    layers : mapping of str to array_like
        Each layer's ``(C, N, k)`` components (the same ``N`` images in the same order).
    scores : array_like
        ``(N,)`` score per image.
    pool, seed, chunk, min_per_channel, score, ace_options, progress, engine
        As for :func:`pooled_null`; ``min_per_channel`` times the largest layer's channel
        count is the smallest bank, so BH's smallest threshold ``0.05 / C`` can be reached
        in every layer.

    Returns
    -------
    dict of str to PooledNull
        Per layer: its channels' own values (``(C, b)``), its groups, and the shared
        ``bank`` (sorted values per group).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.normal(size=100)
    >>> layers = {"a": rng.normal(size=(4, 100, 2)), "b": rng.normal(size=(6, 100, 2))}
    >>> nulls = shared_null(layers, y, pool=60, min_per_channel=5)
    >>> sum(n.problems for n in nulls.values()), nulls["a"].pool(20).size
    (60, 60)
    """
    pool = integer(pool, "pool")
    min_per_channel = integer(min_per_channel, "min_per_channel")
    integer(seed, "seed", minimum=None)
    score_kind(score)
    if not layers:
        raise ValueError("layers is empty: give at least one layer's components")
    zs = {name: _components(z, widen=False) for name, z in layers.items()}
    n = {int(z.shape[1]) for z in zs.values()}
    if len(n) != 1:
        raise ValueError(f"every layer's components must hold the same images; got N = "
                         f"{sorted(n)}")
    y = check_scores(scores, n.pop())
    groups = {name: channel_groups(z) for name, z in zs.items()}
    per = shared_plan(groups, {name: int(z.shape[0]) for name, z in zs.items()}, pool,
                      min_per_channel, seed)
    from tqdm.auto import tqdm

    values = {}
    with tqdm(total=int(sum(int(p.sum()) for p in per.values())), desc="pooled null",
              unit="fit", disable=not progress) as bar:
        for i, (name, zt) in enumerate(zs.items()):
            step = (DEFAULT_PLAN.ace_problems(int(zt.shape[1]), int(zt.shape[2]))
                    if chunk is None else integer(chunk, "chunk"))
            values[name] = _permuted_values(
                zt.to(torch.float64), y, per[name], np.random.default_rng([int(seed), i]),
                engine=engine,
                chunk=step, score=score, ace_options=ace_options, progress=bar.update)
            values[name][groups[name] < 0] = np.nan
    bank: dict[int, np.ndarray] = {}
    for g in {int(x) for gs in groups.values() for x in gs[gs >= 0]}:
        parts = [values[name][groups[name] == g] for name in zs]
        flat = np.concatenate([p[np.isfinite(p)] for p in parts])
        bank[g] = np.sort(flat)
    return {name: PooledNull(values=values[name], groups=groups[name], bank=bank)
            for name in zs}


def _components(z: Any, *, widen: bool = True) -> torch.Tensor:
    """``z`` as a float64 tensor (on its device), checked; with ``widen=False`` a float32
    one stays float32 (checked only: the null widens one layer at a time, not every
    layer's components at once)."""
    if isinstance(z, torch.Tensor) and z.device.type != "cpu":
        zt = z.detach()
        if zt.dtype not in (torch.float32, torch.float64):
            zt = zt.to(torch.float64)
    else:  # float32 or float64 NumPy (_native), as a tensor without a copy
        zt = torch.as_tensor(_native(z) if isinstance(z, (np.ndarray, torch.Tensor))
                             else float64_array(z, "z"))
    if zt.ndim != 3:
        raise ValueError(f"z must have shape (C, N, k); got {tuple(zt.shape)}. "
                         "For one channel use z[None]")
    if zt.shape[1] < MIN_OBSERVATIONS:
        raise ValueError(f"a permutation null needs at least {MIN_OBSERVATIONS} images; "
                         f"got {zt.shape[1]}")
    if zt.shape[0] < 1 or zt.shape[2] < 1:
        raise ValueError(f"z is empty: shape {tuple(zt.shape)}")
    if not bool(torch.isfinite(zt).all()):
        raise ValueError("z holds NaN or inf")
    return zt.to(torch.float64) if widen else zt


def pooled_summary(observed: Any, null: PooledNull, *,
                   channels: Sequence[int] | None = None) -> pd.DataFrame:
    """p- and q-values and null-corrected values of one layer against its pooled null.

    The columns and their meaning are those of :func:`pcace.stats.null.null_summary`,
    with each channel's null being its pool: ``null_mean``, ``null_sd``, ``null_q95``
    and the ``mean(null^2)`` of ``pcace_adj`` are the pool's (the same for every
    channel of a pool), and ``p_value = (1 + #{pool >= observed}) / (M + 1)`` with
    ``M`` the pool's size. Dead channels get ``p = 1`` and zeros.

    Parameters
    ----------
    observed : array_like
        ``(C,)`` PCACE values of the layer's channels.
    null : PooledNull
        From :func:`pooled_null` for the same channels.
    channels : sequence of int, optional
        Channel ids for the ``channel`` column (default ``0 .. C-1``).

    Returns
    -------
    pandas.DataFrame
        ``channel``, ``pcace``, ``null_mean``, ``null_sd``, ``null_q95``, ``p_value``,
        ``q_value`` (BH over the channels passed in), ``pcace_adj``,
        ``pcace_adj_linear``.

    Examples
    --------
    >>> import numpy as np
    >>> null = PooledNull(np.tile(np.linspace(0.1, 0.4, 33), (3, 1)), np.array([3, 3, 3]))
    >>> pooled_summary([0.5, 0.2, 0.1], null).p_value.round(3).tolist()
    [0.01, 0.67, 1.0]
    """
    obs = float64_array(observed, "observed")
    if not isinstance(null, PooledNull):
        raise TypeError(f"null must be a PooledNull (from pooled_null); got "
                        f"{type(null).__name__}")
    if obs.ndim != 1 or obs.shape[0] != null.values.shape[0]:
        raise ValueError(f"observed must have shape ({null.values.shape[0]},), one value "
                         f"per channel of the null; got {obs.shape}")
    if not np.all(np.isfinite(obs)):
        raise ValueError("observed holds NaN or inf")
    ids = channel_ids(channels, obs.shape[0])
    cols = {name: np.zeros(obs.shape[0]) for name in
            ("null_mean", "null_sd", "null_q95", "mean_sq")}
    p = np.ones(obs.shape[0])
    for g in np.unique(null.groups[null.groups >= 0]):
        members = null.groups == g
        values = null.pool(int(g))
        m = values.size
        exceed = m - np.searchsorted(values, obs[members], side="left")
        p[members] = (1.0 + exceed) / (m + 1.0)
        cols["null_mean"][members] = values.mean()
        cols["null_sd"][members] = values.std(ddof=1) if m > 1 else 0.0
        cols["null_q95"][members] = np.quantile(values, 0.95)
        cols["mean_sq"][members] = np.mean(values ** 2)
    return pd.DataFrame({
        "channel": ids,
        "pcace": obs,
        "null_mean": cols["null_mean"],
        "null_sd": cols["null_sd"],
        "null_q95": cols["null_q95"],
        "p_value": p,
        "q_value": benjamini_hochberg(p),
        "pcace_adj": _adjust_squared(obs, cols["mean_sq"]),
        "pcace_adj_linear": _adjust_linear(obs, cols["null_mean"]),
    })
