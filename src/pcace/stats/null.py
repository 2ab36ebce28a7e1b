"""The permutation null of PCACE values: p- and q-values and the null-corrected value.

A raw PCACE value is biased upwards: ACE with supersmoothers overfits, so two
independent variables get about 0.2 at n = 300 and k = 3, and about 0.5 at
n = 100 and k = 5. The bias depends on the number of images ``n``, the number of
components ``k`` and on the channel's components themselves. This module gives
the references needed before a value can be read as evidence:

- :func:`permutation_null` re-scores every channel against ``B`` permutations of
  the score (the same permutations for all channels). The principal components do
  not depend on the score, so only ACE re-runs.
- :func:`null_summary` turns observed values and their null into a null mean and
  95th percentile, permutation p-values, Benjamini-Hochberg q-values (the FDR
  family is the set of channels passed in: one layer) and ``pcace_adj``, a
  null-corrected value comparable across layers and runs.
- :func:`bootstrap_values` resamples the images (by default half-samples drawn
  without replacement), recomputes PCA and ACE; :func:`bootstrap_summary` turns
  that into bias-corrected intervals for the maximal correlation and percentile
  intervals for the ranks; :func:`layer_stability` says how stable a layer's
  ranking is.
- :func:`share_significant`: the share of a layer's channels with ``q <= alpha``.

Everything is arrays in, arrays or DataFrames out; nothing here touches a model.

The adjusted value
------------------
``pcace_adj`` corrects the squared value the way the adjusted R^2 corrects an
R^2 for overfitting: with ``b = mean(null^2)``, the mean squared value that the
pipeline returns on permuted scores for this channel,

    a = (pcace^2 - b) / (1 - b),        pcace_adj = sign(a) * sqrt(|a|).

If overfitting adds a fraction ``b`` of the unexplained variance to the fitted
squared correlation (``E[pcace^2] ~ rho^2 + b (1 - rho^2)``), ``a`` recovers
``rho^2``. ``pcace_adj`` is 0 at the null level (its mean over noise channels
is near 0; its median slightly below), 1 for a perfect relation, and on the
scale of a correlation. In simulations with ``n`` in {100, 300} and ``k`` in
{1, 3, 5} (``benchmarks/README.md``, section "Statistics"), noise channels'
raw values move from 0.16 to 0.52 while their adjusted values stay near 0, and
a planted channel's adjusted value stays closest to its true maximal
correlation. The linear chance correction ``(pcace - mean(null)) /
(1 - mean(null))`` is reported too (``pcace_adj_linear``): it is centred more
tightly at 0 for noise but shrinks true signals more, the more so for large
``k`` and small ``n``.

Examples
--------
>>> import numpy as np
>>> from pcace import ace
>>> rng = np.random.default_rng(0)
>>> z = rng.normal(size=(5, 100, 3))        # 5 channels, 100 images, k = 3
>>> y = z[0, :, 0] ** 2 + 0.5 * rng.normal(size=100)   # channel 0 carries the score
>>> obs = ace(z, y).rho
>>> null = permutation_null(z, y, permutations=99, seed=1)
>>> table = null_summary(obs, null)
>>> bool(table.p_value[0] == 0.01), bool((table.p_value[1:] > 0.01).all())
(True, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..core.validation import MIN_OBSERVATIONS, float64_array, integer, score_kind
from ..core.validation import scores as check_scores
from ..engines.engine import Engine, LocalEngine, Problems
from .common import DEFAULT_ALPHA, DEFAULT_PLAN, channel_ids, check_observed_matrix, significant


def permutation_null(
    z: Any,
    scores: Any,
    permutations: int = 1000,
    seed: int = 0,
    chunk: int | None = None,
    *,
    score: str = "maximal",
    ace_options: dict | None = None,
    progress: bool = False,
    engine: Engine | None = None,
) -> np.ndarray:
    """PCACE values of every channel against ``B`` permutations of the score.

    The same ``B`` permutations (drawn once with ``np.random.default_rng(seed)``)
    serve all channels, so nulls of channels of one layer, or of several layers
    scored with the same seed and images, are directly comparable. Principal
    components do not depend on the score, so only ACE re-runs: each batched
    call solves up to ``chunk`` (channel, permutation) problems.

    Parameters
    ----------
    z : torch.Tensor or numpy.ndarray
        Principal-component scores, shape ``(C, N, k)`` (``Reduction.scores`` or
        ``PCACEResult.components[layer]``). A CUDA tensor runs ACE's torch
        backend on that device; anything else the compiled CPU engine.
    scores : array_like
        The score per image, shape ``(N,)``.
    permutations : int, default 1000
        ``B``, the number of permutations.
    seed : int, default 0
        Seed of the permutations.
    chunk : int, optional
        Problems per ACE call. Default: as many as fit in about 128 MB
        (about 7,000 at ``N = 300``, ``k = 3``).
    score : {"maximal", "first-component"}, default "maximal"
        The value computed, as in :func:`pcace.rank`: the maximal correlation,
        or the published scripts' ``|corr(phi_1, theta)|``. Use the one that
        gave the observed values.
    ace_options : dict, optional
        Keyword arguments for :func:`pcace.ace` (use the same as for the
        observed values).
    progress : bool, default False
        Show a progress bar on stderr.
    engine : pcace.engines.engine.Engine, optional
        Where the ACE problems run (default: this process,
        :class:`pcace.engines.engine.LocalEngine`;
        a Ray engine fans them out over a cluster with the same values).

    Returns
    -------
    numpy.ndarray
        ``(C, B)`` float64: the clipped maximal correlation of channel ``c``
        with the ``b``-th permuted score. Dead channels (``z`` all zero) get 0
        without running ACE.

    Notes
    -----
    Cost: ``C * B`` ACE problems (timings in ``benchmarks/README.md``). The smallest
    p-value a
    permutation test can give is ``1 / (B + 1)``; with Benjamini-Hochberg over a
    layer of ``C`` channels a lone strong channel reaches ``q <= alpha`` only
    when ``B + 1 >= C / alpha`` (1,280 permutations for 64 channels at 0.05).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=(3, 60, 2))
    >>> permutation_null(z, rng.normal(size=60), permutations=20).shape
    (3, 20)
    """
    b_count = integer(permutations, "permutations")
    integer(seed, "seed", minimum=None)
    score_kind(score)
    options = dict(ace_options or {})
    on_gpu = isinstance(z, torch.Tensor) and z.device.type != "cpu"
    if on_gpu:
        zt = z.detach().to(torch.float64)
    else:
        zt = torch.as_tensor(float64_array(z, "z"))
    if zt.ndim != 3:
        raise ValueError(f"z must have shape (C, N, k); got {tuple(zt.shape)}. "
                         "For one channel use z[None]")
    c, n, k = zt.shape
    if n < MIN_OBSERVATIONS:
        raise ValueError(f"a permutation null needs at least {MIN_OBSERVATIONS} images; got {n}")
    if k < 1:
        raise ValueError("z has no components (k = 0)")
    if not bool(torch.isfinite(zt).all()):
        raise ValueError("z holds NaN or inf")
    y = check_scores(scores, n)
    step = DEFAULT_PLAN.ace_problems(n, k) if chunk is None else integer(chunk, "chunk")

    rng = np.random.default_rng(int(seed))
    perms = rng.permuted(np.tile(np.arange(n), (b_count, 1)), axis=1)  # (B, N)
    y_perm = y[perms]  # (B, N)

    null = np.zeros((c, b_count), dtype=np.float64)
    live = np.flatnonzero((zt != 0).flatten(1).any(dim=1).cpu().numpy())
    if live.size == 0:
        return null
    if on_gpu:
        y_src: Any = torch.as_tensor(y_perm, device=zt.device)
        z_src: Any = zt
    else:
        y_src, z_src = y_perm, zt.numpy()
    problems = Problems(z_src, y_src, live, order="channel")  # channel-major, as before

    from ..core.progress import progress_bar

    run_on = LocalEngine() if engine is None else engine
    with progress_bar(total=len(problems), desc="permutation null", unit="fit",
                      disable=not progress) as bar:
        flat = run_on.values(problems, chunk=step, score=score, ace_options=options,
                             stage="null", progress=bar.update)
    null[live] = flat.reshape(live.size, b_count)
    return null


def benjamini_hochberg(p_values: Any) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) of one family of tests.

    The q-values are SciPy's (:func:`scipy.stats.false_discovery_control` with
    ``method="bh"``); pcace adds its own checks: one family, finite p-values in
    ``[0, 1]`` (NaN is refused here; a channel without a null never reaches this
    function), and an empty family gives an empty result.

    Parameters
    ----------
    p_values : array_like
        ``(m,)`` p-values in ``[0, 1]``.

    Returns
    -------
    numpy.ndarray
        ``q_i = min_{j >= rank(i)} min(1, m p_(j) / j)``; reject at FDR ``alpha``
        where ``q <= alpha``.

    Examples
    --------
    >>> benjamini_hochberg([0.01, 0.04, 0.03, 0.5]).round(3).tolist()
    [0.04, 0.053, 0.053, 0.5]
    """
    p = float64_array(p_values, "p_values")
    if p.ndim != 1:
        raise ValueError(f"p_values must be one-dimensional; got shape {p.shape}")
    if p.size == 0:
        return p.copy()
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise ValueError("p_values must be finite and in [0, 1]")
    from scipy.stats import false_discovery_control

    return np.asarray(false_discovery_control(p, method="bh"), dtype=np.float64)


def adjusted_value(observed: Any, null: Any) -> np.ndarray:
    """``pcace_adj``: the squared value corrected for overfitting like an adjusted R^2.

    With ``b_c = mean_b(null[c, b]^2)``, ``a = (observed^2 - b_c) / (1 - b_c)``
    and ``pcace_adj = sign(a) sqrt(|a|)``: 0 at the null level, 1 for a perfect
    relation, negative below the null average. Dead channels (``b_c = 0``,
    observed 0) get 0; a channel whose null is all 1 gets 0.

    Parameters
    ----------
    observed : array_like
        ``(C,)`` PCACE values.
    null : array_like
        ``(C, B)`` from :func:`permutation_null`.

    Returns
    -------
    numpy.ndarray
        ``(C,)`` in ``[-1, 1]``.

    Examples
    --------
    >>> import numpy as np
    >>> adjusted_value([0.8, 0.3], np.full((2, 10), 0.3)).round(3).tolist()
    [0.777, 0.0]
    """
    obs, nul = check_observed_matrix(observed, null, "null")
    return _adjust_squared(obs, (nul ** 2).mean(axis=1))


def _adjust_squared(obs: np.ndarray, mean_sq: np.ndarray) -> np.ndarray:
    """``sign(a) sqrt(|a|)``, ``a = (obs^2 - mean_sq) / (1 - mean_sq)`` (0 where undefined)."""
    denom = 1.0 - mean_sq
    a = np.where(denom > 0, (obs ** 2 - mean_sq) / np.where(denom > 0, denom, 1.0), 0.0)
    return np.sign(a) * np.sqrt(np.abs(a))


def _adjust_linear(obs: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``(obs - mean) / (1 - mean)``, the linear chance correction (0 where undefined)."""
    denom = 1.0 - mean
    return np.where(denom > 0, (obs - mean) / np.where(denom > 0, denom, 1.0), 0.0)


def null_summary(observed: Any, null: Any, *,
                 channels: Sequence[int] | None = None) -> pd.DataFrame:
    """Permutation p-values, BH q-values and null-corrected values of one layer.

    Parameters
    ----------
    observed : array_like
        ``(C,)`` PCACE values of the channels of ONE layer (or of whatever set
        should form one FDR family).
    null : array_like
        ``(C, B)`` from :func:`permutation_null` for the same channels.
    channels : sequence of int, optional
        Channel ids for the ``channel`` column (default ``0 .. C-1``).

    Returns
    -------
    pandas.DataFrame
        One row per channel, in input order, with columns

        - ``channel``, ``pcace`` (the observed value);
        - ``null_mean``, ``null_sd``, ``null_q95``: mean, standard deviation
          and 95th percentile of the channel's null;
        - ``p_value``: ``(1 + #{b : null[c, b] >= observed[c]}) / (B + 1)``,
          valid (never anti-conservative) and at least ``1 / (B + 1)``;
        - ``q_value``: Benjamini-Hochberg over the channels passed in. The FDR
          family is this set: call once per layer for per-layer discoveries;
        - ``pcace_adj``: see :func:`adjusted_value` (comparable across layers
          and runs with different ``N`` and ``k``);
        - ``pcace_adj_linear``: ``(pcace - null_mean) / (1 - null_mean)``,
          the linear chance correction, for reference.

    Notes
    -----
    Dead channels (observed 0, null 0) get ``p = 1``. A channel that ties the
    whole null (observed equal to every null value) gets ``p = 1`` too.

    Examples
    --------
    >>> import numpy as np
    >>> null = np.tile(np.linspace(0.1, 0.4, 99), (2, 1))
    >>> t = null_summary([0.5, 0.2], null, channels=[7, 9])
    >>> t[["channel", "p_value"]].round(2).values.tolist()
    [[7.0, 0.01], [9.0, 0.67]]
    """
    obs, nul = check_observed_matrix(observed, null, "null")
    ids = channel_ids(channels, obs.shape[0])
    b = nul.shape[1]
    exceed = (nul >= obs[:, None]).sum(axis=1)
    p = (1.0 + exceed) / (b + 1.0)
    null_mean = nul.mean(axis=1)
    return pd.DataFrame({
        "channel": ids,
        "pcace": obs,
        "null_mean": null_mean,
        "null_sd": nul.std(axis=1, ddof=1) if b > 1 else np.zeros_like(obs),
        "null_q95": np.quantile(nul, 0.95, axis=1),
        "p_value": p,
        "q_value": benjamini_hochberg(p),
        "pcace_adj": adjusted_value(obs, nul),
        "pcace_adj_linear": _adjust_linear(obs, null_mean),
    })


def share_significant(q_values: Any, alpha: float = DEFAULT_ALPHA) -> float:
    """Share of a layer's channels whose q-value is at most ``alpha``.

    Parameters
    ----------
    q_values : array_like
        BH q-values of the channels of one layer (``null_summary(...).q_value``).
    alpha : float, default 0.05
        The FDR level.

    Returns
    -------
    float
        In ``[0, 1]``.

    Examples
    --------
    >>> share_significant([0.01, 0.2, 0.04, 0.5])
    0.5
    """
    q = float64_array(q_values, "q_values").ravel()
    if q.size == 0:
        raise ValueError("q_values is empty")
    if np.isnan(q).any():
        raise ValueError("q_values holds NaN")
    return float(np.mean(significant(q, alpha)))


