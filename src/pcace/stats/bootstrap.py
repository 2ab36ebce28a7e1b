"""Bootstrap intervals for PCACE values and the stability of a layer's ranking.

:func:`bootstrap_values` resamples the images (by default half-samples drawn without
replacement) and recomputes PCA and ACE; :func:`bootstrap_summary` turns that into
bias-corrected intervals for the maximal correlation and percentile intervals for the
ranks; :func:`layer_stability` says how stable a layer's ranking is. Arrays in, arrays
or DataFrames out; nothing here touches a model.

Resampling schemes
------------------
Each replicate draws one set of images (the same for all channels).

- ``"half-sample"`` (default): ``N // 2`` distinct images drawn without replacement (the
  delete-d jackknife with d = N/2). For a statistic with sampling spread of order
  ``1/sqrt(N)`` the spread of half-sample values around the full-sample value matches the
  full-sample value's own sampling spread, and if its bias is of order ``1/N`` the
  half-sample mean lies about one bias above the full-sample value. Pair it with
  ``bootstrap_summary(..., method="half-sample")``.
- ``"replacement"``: ``N`` images with replacement (the classical bootstrap). Resamples
  hold tied rows (about 63% distinct images; ACE's smoother gives tied values one fitted
  value). Pair it with ``method="basic"`` or ``"percentile"``.

Replicates of an upward-biased statistic are more biased still: ACE overfits more on fewer
(or repeated) images. Half-samples sit above the full-sample value by about the value's own
bias, which ``method="half-sample"`` uses to correct for it; with-replacement replicates sit
higher still, by a less regular amount, and their percentile intervals under-cover badly. A
half-sample replicate costs less than a with-replacement one (half the images, no ties).

The half-sample interval
------------------------
PCACE is biased upwards (ACE overfits), by about ``b (1 - rho^2)`` on the squared scale,
with ``b`` falling like ``1/N``. A half-sample (``N/2`` images) overfits about twice as
much, so with ``v`` the observed value, ``h_1 .. h_B`` the half-sample values and
``d = mean(h^2) - v^2`` (the estimated bias of ``v^2``), ``method="half-sample"`` gives

    v^2 - d  +/-  z * sd(h^2) * (1 + d / (1 - v^2)),

clipped to ``[0, 1]`` and square-rooted. The spread of half-sample values matches the
full-sample value's sampling spread; the factor ``1 + d / (1 - v^2) = 1 / (1 - b)`` adds the
variance of the bias correction itself (under the model above, the corrected square is
``(v^2 - b) / (1 - b)``). The interval is therefore not centred on ``v`` and for weak
channels often lies entirely below it. For ``N`` odd the half-samples hold ``(N - 1) / 2``
images; the formula ignores the difference.

In simulations with known maximal correlation (``benchmarks/README.md``, "Statistics": ``N``
in {100, 300}, k = 3 components, linear and non-monotone relations, true values 0.3-0.9)
95% half-sample intervals covered the truth 91-100% of the time (98-100% at a true value of
0, where the interval starts at 0); the with-replacement intervals covered 54-94% (basic)
and 0-96% (percentile). Half-sample intervals are wider than the with-replacement ones, most
for weak relations at small ``N``: the price of correcting a bias that is itself estimated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..core.validation import MIN_OBSERVATIONS, float64_array, fraction, integer, score_kind
from ..core.validation import maps as check_maps
from ..core.validation import scores as check_scores
from ..engines.engine import Engine, LocalEngine, Problems
from .common import DEFAULT_PLAN, channel_ids, check_observed_matrix, draw_varying, spearman

#: Resampling schemes of :func:`bootstrap_values`.
SCHEMES = ("half-sample", "replacement")

#: Interval methods of :func:`bootstrap_summary` and the scheme whose replicates each expects.
INTERVALS = {"half-sample": "half-sample", "basic": "replacement", "percentile": "replacement"}


def interval_scheme(method: str) -> str:
    """The resampling scheme of :func:`bootstrap_values` that an interval method expects.

    Parameters
    ----------
    method : {"half-sample", "basic", "percentile"}
        A ``method`` of :func:`bootstrap_summary`.

    Returns
    -------
    str
        ``"half-sample"`` for ``"half-sample"``; ``"replacement"`` for the other two.

    Examples
    --------
    >>> interval_scheme("half-sample"), interval_scheme("basic")
    ('half-sample', 'replacement')
    """
    if not isinstance(method, str) or method not in INTERVALS:
        raise ValueError(f"interval method must be one of {tuple(INTERVALS)}; got {method!r}")
    return INTERVALS[method]


def bootstrap_values(maps: Any, scores: Any, components: int | float = 3, boots: int = 200,
                     seed: int = 0, *, scheme: str = "half-sample", chunk: int | None = None,
                     score: str = "maximal", ace_options: dict | None = None,
                     reduce_options: dict | None = None, progress: bool = False,
                     engine: Engine | None = None) -> np.ndarray:
    """PCACE values of every channel on ``B`` resamples of the images.

    Each replicate draws one set of images for all channels and recomputes each channel's
    standardisation, PCA and ACE on it. Schemes and the replicates' bias: module docstring.

    Parameters
    ----------
    maps : torch.Tensor
        Activations of one layer (or a chunk of its channels), ``(N, C, H, W)`` or ``(N, C, P)``.
    scores : array_like
        Score per image, ``(N,)``; or ``(N, T)``: each resample's PCA serves all targets
        (a resample is redrawn when any target is constant on it).
    components : int or float, default 3
        As for :func:`pcace.reduce.pca.principal_components`.
    boots : int, default 200
        ``B``, the number of resamples.
    seed : int, default 0
        Seed of the resamples (``np.random.default_rng(seed)``).
    scheme : {"half-sample", "replacement"}, default "half-sample"
        ``N // 2`` distinct images (needs ``N >= 20``) or ``N`` drawn with replacement.
    chunk : int, optional
        Replicates stacked along the channel axis in one PCA call. Default: as many as fit a
        2 GiB :class:`pcace.reduce.plan.MemoryPlan` (:func:`pcace.rank` passes its plan's).
    score : {"maximal", "first-component"}, default "maximal"
        As for :func:`permutation_null`.
    ace_options, reduce_options : dict, optional
        Keyword arguments for :func:`pcace.ace` and :func:`pcace.reduce.pca.principal_components`.
    progress : bool, default False
        Show a progress bar on stderr.
    engine : pcace.engines.engine.Engine, optional
        Where the ACE problems run (default: this process); the values do not depend on it.

    Returns
    -------
    numpy.ndarray
        ``(C, B)`` float64: clipped PCACE values per replicate, 0 where the channel is
        constant on the resample; ``(C, T, B)`` for ``(N, T)`` scores.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> maps = torch.randn(60, 2, 4, 4, generator=g)
    >>> y = maps[:, 0].flatten(1).mean(1).numpy()
    >>> bootstrap_values(maps, y, components=2, boots=5).shape
    (2, 5)
    >>> bootstrap_values(maps, y, components=2, boots=5, scheme="replacement").shape
    (2, 5)
    >>> bootstrap_values(maps, np.stack([y, -y ** 2], 1), components=2, boots=5).shape
    (2, 2, 5)
    """
    b_count = integer(boots, "boots")
    integer(seed, "seed", minimum=None)
    score_kind(score)
    _check_scheme(scheme)
    m = check_maps(maps, min_images=1)
    n, c = m.shape[0], m.shape[1]
    half, size = _resample_size(scheme, n)
    y = _score_columns(scores, n)
    options, red_options = dict(ace_options or {}), dict(reduce_options or {})
    draws = _draw_resamples(y, b_count, size, half, np.random.default_rng(int(seed)))
    step = DEFAULT_PLAN.replicates_per_call(size, c, m.shape[2]) if chunk is None \
        else integer(chunk, "chunk")
    out = np.zeros((c, y.shape[1], b_count), dtype=np.float64)
    run_on = LocalEngine() if engine is None else engine

    from ..core.progress import progress_bar

    with progress_bar(total=b_count, desc="bootstrap", unit="rep", disable=not progress) as bar:
        for start in range(0, b_count, step):
            reps = draws[start:start + step]  # (r, size)
            out[:, :, start:start + reps.shape[0]] = _batch_values(
                m, reps, y, components, score, options, red_options, run_on)
            bar.update(reps.shape[0])
    return out[:, 0] if np.ndim(scores) == 1 else out


def _check_scheme(scheme: str) -> None:
    """Raise unless ``scheme`` is one of :data:`SCHEMES`."""
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}; got {scheme!r}")


def _resample_size(scheme: str, n: int) -> tuple[bool, int]:
    """Whether ``scheme`` draws half-samples, and its resample size; raise if ``n`` is too few."""
    half = scheme == "half-sample"
    if n < (2 if half else 1) * MIN_OBSERVATIONS:
        raise ValueError(f"a {scheme} bootstrap needs at least "
                         f"{(2 if half else 1) * MIN_OBSERVATIONS} images; got {n}")
    return half, n // 2 if half else n


def _draw_resamples(y: np.ndarray, boots: int, size: int, half: bool,
                    rng: np.random.Generator) -> np.ndarray:
    """``(boots, size)`` image indices, each resample redrawn until no score column is constant."""
    n = y.shape[0]
    draws = np.empty((boots, size), dtype=np.int64)

    def draw() -> tuple[np.ndarray]:
        return (rng.permutation(n)[:size] if half else rng.integers(0, n, size=n),)

    for i in range(boots):
        draws[i] = draw_varying(draw, y)[0]
    return draws


def _batch_values(m: torch.Tensor, reps: np.ndarray, y: np.ndarray, components: int | float,
                  score: str, options: dict, red_options: dict, engine: Engine) -> np.ndarray:
    """``(C, T, r)`` values of the ``r`` resamples ``reps``, stacked into one PCA call."""
    from ..reduce.pca import principal_components

    (r, size), c = reps.shape, m.shape[1]
    index = torch.as_tensor(reps.T.copy(), device=m.device)  # (size, r)
    stacked = m[index.flatten()].reshape(size, r * c, *m.shape[2:])  # replicate-major
    red = principal_components(stacked, components, **red_options)
    out = np.empty((c, y.shape[1], r), dtype=np.float64)
    for j in range(y.shape[1]):
        values = _replicate_values(red, np.repeat(y[reps, j], c, axis=0), score,
                                   options, engine)  # scores (r*c, N), channel order
        out[:, j] = values.reshape(r, c).T
    return out


def _score_columns(scores: Any, n: int) -> np.ndarray:
    """Scores ``(N,)`` or ``(N, T)`` as ``(N, T)``, each column checked."""
    raw = float64_array(scores, "scores")
    if raw.ndim == 2 and raw.shape[0] == n:
        return np.stack([check_scores(raw[:, j], n) for j in range(raw.shape[1])], axis=1)
    return check_scores(raw, n)[:, None]


def _replicate_values(red: Any, ys: np.ndarray, score: str, options: dict,
                      engine: Engine) -> np.ndarray:
    """Values of the stacked replicate channels of ``red`` against their scores ``ys``."""
    z = red.scores
    dead = red.dead.cpu().numpy()
    values = np.zeros(len(ys))
    live = np.flatnonzero(~dead)
    if live.size:
        if z.device.type == "cpu":
            zl = z[torch.as_tensor(live)].to(torch.float64).numpy()
            problems = Problems(zl, ys[live], np.arange(live.size), order="paired")
        else:
            zl = z[torch.as_tensor(live, device=z.device)].to(torch.float64)
            problems = Problems(zl, torch.as_tensor(ys[live], device=z.device),
                                np.arange(live.size), order="paired")
        values[live] = engine.values(problems, chunk=max(1, live.size), score=score,
                                     ace_options=options, stage="bootstrap")
    return values


def _ranks_desc(values: np.ndarray) -> np.ndarray:
    """Ranks within each column, 1 = highest; ties share the lowest (best) rank."""
    from scipy.stats import rankdata

    return rankdata(-values, axis=0, method="min")


def _half_sample_interval(obs: np.ndarray, bt: np.ndarray, level: float
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Bias-corrected normal interval on the squared scale from half-sample replicates."""
    v2, h2 = obs ** 2, bt ** 2
    d = h2.mean(axis=1) - v2          # estimated bias of pcace^2 (the half-sample excess)
    centre = v2 - d
    free = 1.0 - v2
    inflate = 1.0 + np.maximum(d, 0.0) / np.where(free > 0, free, np.inf)
    spread = h2.std(axis=1, ddof=1) * inflate
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    return (np.sqrt(np.clip(centre - z * spread, 0.0, 1.0)),
            np.sqrt(np.clip(centre + z * spread, 0.0, 1.0)))


def _value_interval(obs: np.ndarray, bt: np.ndarray, level: float, method: str
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Each channel's interval for its maximal correlation by ``method``."""
    if method == "half-sample":
        return _half_sample_interval(obs, bt, level)
    q_lo = np.quantile(bt, (1.0 - level) / 2.0, axis=1)
    q_hi = np.quantile(bt, 1.0 - (1.0 - level) / 2.0, axis=1)
    if method == "percentile":
        return q_lo, q_hi
    return np.clip(2 * obs - q_hi, 0.0, 1.0), np.clip(2 * obs - q_lo, 0.0, 1.0)


def bootstrap_summary(observed: Any, boot: Any, level: float = 0.95, *,
                      method: str = "half-sample",
                      channels: Sequence[int] | None = None) -> pd.DataFrame:
    """Bootstrap intervals for the maximal correlations and the ranks of a set of channels.

    Parameters
    ----------
    observed : array_like
        ``(C,)`` PCACE values on all images.
    boot : array_like
        ``(C, B)`` from :func:`bootstrap_values`, drawn with the scheme that ``method``
        expects (:func:`interval_scheme`).
    level : float, default 0.95
        Coverage of the two-sided intervals.
    method : {"half-sample", "basic", "percentile"}, default "half-sample"
        ``"half-sample"``: a bias-corrected normal interval on the squared scale (see the
        module docstring). ``"basic"``: ``[2 v - q_hi, 2 v - q_lo]`` clipped to ``[0, 1]``;
        ``"percentile"``: ``[q_lo, q_hi]``, ``q`` the replicates' quantiles. Rank
        intervals are percentile intervals of the replicates' ranks whatever the method.
    channels : sequence of int, optional
        Channel ids for the ``channel`` column.

    Returns
    -------
    pandas.DataFrame
        One row per channel, in input order: ``channel``, ``pcace``, ``boot_mean``,
        ``boot_sd``, ``bias`` (``boot_mean - pcace``: with half-samples, an estimate of the
        value's upward bias), ``ci_low``, ``ci_high`` (the interval for the maximal
        correlation), ``rank`` (on all images; 1 = highest), ``rank_low`` and ``rank_high``
        (the interval of the rank among the channels passed in; ``rank_low`` is the better).

    Notes
    -----
    With ``v`` the observed value, ``h`` the half-sample values and ``d = mean(h^2) - v^2``
    (the estimated bias of ``v^2``), ``method="half-sample"`` gives
    ``v^2 - d +/- z * sd(h^2) * (1 + d / (1 - v^2))``, clipped to ``[0, 1]`` and
    square-rooted. Why, and how well it covers: the module docstring.

    Examples
    --------
    >>> import numpy as np
    >>> boot = np.array([[0.8, 0.9, 0.85, 0.95], [0.1, 0.3, 0.2, 0.4]])
    >>> t = bootstrap_summary([0.9, 0.2], boot, level=0.5, method="percentile")
    >>> t[["ci_low", "ci_high", "rank_low", "rank_high"]].round(3).values.tolist()
    [[0.838, 0.912, 1.0, 1.0], [0.175, 0.325, 2.0, 2.0]]
    >>> h = bootstrap_summary([0.9, 0.2], boot)          # as if half-sample replicates
    >>> h[["ci_low", "ci_high"]].round(3).values.tolist()
    [[0.794, 1.0], [0.0, 0.372]]
    """
    obs, bt = check_observed_matrix(observed, boot, "boot")
    lvl = fraction(level, "level")
    interval_scheme(method)
    if method == "half-sample" and bt.shape[1] < 2:
        raise ValueError("method='half-sample' needs at least 2 replicates (B >= 2)")
    ids = channel_ids(channels, obs.shape[0])
    lo_q, hi_q = (1.0 - lvl) / 2.0, 1.0 - (1.0 - lvl) / 2.0
    ci_low, ci_high = _value_interval(obs, bt, lvl, method)
    ranks = _ranks_desc(bt)
    rank_all = _ranks_desc(obs[:, None])[:, 0]
    mean = bt.mean(axis=1)
    return pd.DataFrame({
        "channel": ids,
        "pcace": obs,
        "boot_mean": mean,
        "boot_sd": bt.std(axis=1, ddof=1) if bt.shape[1] > 1 else np.zeros_like(obs),
        "bias": mean - obs,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "rank": rank_all,
        "rank_low": np.floor(np.quantile(ranks, lo_q, axis=1)).astype(int),
        "rank_high": np.ceil(np.quantile(ranks, hi_q, axis=1)).astype(int),
    })


def layer_stability(observed: Any, boot: Any, top: int = 10, *,
                    channels: Sequence[int] | None = None) -> dict[str, Any]:
    """How stable a layer's ranking is under resampling of the images.

    With half-sample replicates (the default of :func:`bootstrap_values`) this
    is the stability of the ranking on half the images, whose values vary
    about as much as the full-sample values do but are more biased.

    Parameters
    ----------
    observed : array_like
        ``(C,)`` PCACE values of one layer's channels on all images.
    boot : array_like
        ``(C, B)`` from :func:`bootstrap_values`.
    top : int, default 10
        Size of the top set (capped at ``C``).
    channels : sequence of int, optional
        Channel ids to use as keys (default ``0 .. C-1``).

    Returns
    -------
    dict
        - ``"spearman_mean"``, ``"spearman_sd"``: mean and standard deviation
          over replicates of the Spearman correlation between the replicate's
          values and the observed ones (NaN when a replicate or the observed
          values are all equal, left out of the mean);
        - ``"top"``: the observed top channels, best first;
        - ``"top_share"``: ``{channel: share of replicates in which it is in
          the replicate's top}`` for each observed top channel;
        - ``"top_retention"``: mean of those shares;
        - ``"replicates"``: ``B``; ``"top_size"``: the size used.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> obs = np.linspace(1, 0, 20)
    >>> boot = obs[:, None] + 0.01 * rng.normal(size=(20, 50))
    >>> s = layer_stability(obs, boot, top=5)
    >>> round(s["spearman_mean"], 2), s["top"], round(s["top_retention"], 2)
    (1.0, [0, 1, 2, 3, 4], 1.0)
    """
    obs, bt = check_observed_matrix(observed, boot, "boot")
    size = integer(top, "top")
    c, b = bt.shape
    ids = channel_ids(channels, c)
    size = min(size, c)
    rho = spearman(obs[:, None], bt, axis=0)
    order = np.argsort(-obs, kind="stable")[:size]
    boot_order = np.argsort(-bt, axis=0, kind="stable")[:size]  # (size, B)
    in_top = np.zeros((c, b), dtype=bool)
    in_top[boot_order, np.arange(b)[None, :]] = True
    shares = in_top[order].mean(axis=1)
    valid = rho[np.isfinite(rho)]
    return {
        "spearman_mean": float(valid.mean()) if valid.size else math.nan,
        "spearman_sd": float(valid.std(ddof=1)) if valid.size > 1 else math.nan,
        "top": [ids[i].item() for i in order],
        "top_share": {ids[i].item(): float(s) for i, s in zip(order, shares, strict=True)},
        "top_retention": float(shares.mean()),
        "replicates": int(b),
        "top_size": int(size),
    }

