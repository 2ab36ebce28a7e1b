"""Permutation p-values with a generalized Pareto tail (Knijnenburg et al. 2009).

With ``M`` null values a permutation p-value ``(1 + e) / (M + 1)`` (``e`` values at or
above the observed one) cannot go below ``1 / (M + 1)``, and when ``e`` is small it is
noisy. Knijnenburg, Wessels, Reinders and Shmulevich ("Fewer permutations, more accurate
P-values", Bioinformatics 25 (2009) i161-i168) fit a generalized Pareto distribution (GPD)
to the largest null values: above a high threshold ``t`` the excesses of almost any
continuous distribution are close to a GPD (Pickands-Balkema-de Haan), so for an observed
value ``x > t``

    p = (m / M) * P_GPD(X > x - t),

with ``m`` the number of null values above ``t``. :func:`tail_p_values` uses that
estimate where fewer than ``min_exceed`` (default 10, as in the paper) null values reach
the observed one, and the plain permutation p-value elsewhere.

Choices here (measured in ``benchmarks/README.md``, section "Cheap null"):

- ``m = min(250, M // 4)`` excesses (the paper starts at 250), the threshold halfway
  between the ``m``-th and ``(m+1)``-th largest value;
- the GPD fitted by probability-weighted moments (Hosking and Wallis 1987: closed form,
  no optimiser, unbiased for the shapes met here, ``xi`` in about ``[-0.5, 0]``);
- the tail estimate is never above the plain permutation p-value's upper end
  ``(1 + e) / (M + 1)``, and never below ``floor / (M + 1)`` (default ``floor = 0.01``:
  at most two decades of extrapolation; a bounded GPD, ``xi < 0``, would otherwise give 0
  beyond its end point, a claim no finite null supports).

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> null = rng.exponential(size=2000)           # P(X > x) = exp(-x), a GPD with xi = 0
>>> p = tail_p_values([2.0, 9.0], null)
>>> bool(0.12 < p[0] < 0.15), bool(0.3e-4 < p[1] < 3e-4)  # exp(-2) = 0.135, exp(-9) = 1.2e-4
(True, True)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.validation import float64_array, integer

__all__ = ["fit_gpd", "gpd_sf", "tail_p_values"]

#: Null values at or above the observed one below which the tail fit replaces the
#: permutation p-value (Knijnenburg et al. 2009 use 10).
MIN_EXCEED = 10
#: Largest number of excesses the tail fit uses (the paper's starting value).
MAX_TAIL = 250


def fit_gpd(excess: Any) -> tuple[float, float]:
    """Shape ``xi`` and scale ``sigma`` of a GPD, by probability-weighted moments.

    Hosking and Wallis (1987, Technometrics 29: 339-349): with ``a0 = mean(x)`` and
    ``a1 = mean(x_(j) (m - j) / (m - 1))`` (ascending order, ``j = 1..m``),
    ``kappa = a0 / (a0 - 2 a1) - 2`` and ``sigma = 2 a0 a1 / (a0 - 2 a1)``; the
    shape in scipy's sign convention (``scipy.stats.genpareto``'s ``c``) is
    ``xi = -kappa``.

    Parameters
    ----------
    excess : array_like
        ``(m,)`` positive excesses over the threshold, ``m >= 5``.

    Returns
    -------
    tuple of float
        ``(xi, sigma)``; ``P(X > x) = (1 + xi x / sigma) ** (-1 / xi)``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(1).exponential(2.0, size=20000)
    >>> [round(v, 1) for v in fit_gpd(x)]
    [0.0, 2.0]
    """
    x = np.sort(float64_array(excess, "excess").ravel())
    m = x.size
    if m < 5:
        raise ValueError(f"a tail fit needs at least 5 excesses; got {m}")
    if not np.all(np.isfinite(x)) or x[0] < 0:
        raise ValueError("excesses must be finite and non-negative")
    a0 = x.mean()
    a1 = float(np.mean(x * (m - 1 - np.arange(m)) / (m - 1)))
    den = a0 - 2.0 * a1
    if a0 <= 0 or den <= 0:
        return 0.0, float(max(a0, np.finfo(float).tiny))
    kappa = a0 / den - 2.0
    return float(-kappa), float(2.0 * a0 * a1 / den)


def gpd_sf(x: Any, xi: float, sigma: float) -> np.ndarray:
    """``P(X > x)`` of a GPD with shape ``xi`` and scale ``sigma`` (0 beyond a bounded end).

    Examples
    --------
    >>> gpd_sf([0.0, 1.0], 0.0, 1.0).round(4).tolist()
    [1.0, 0.3679]
    """
    x = np.maximum(np.asarray(x, dtype=np.float64), 0.0)
    if abs(xi) < 1e-9:
        return np.exp(-x / sigma)
    base = 1.0 + xi * x / sigma
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(base > 0, np.abs(base) ** (-1.0 / xi), 0.0)
    return out


def tail_p_values(observed: Any, null: Any, *, min_exceed: int = MIN_EXCEED,
                  tail: int | None = None, floor: float = 0.01) -> np.ndarray:
    """Permutation p-values against one null, with a GPD tail where the null runs out.

    Parameters
    ----------
    observed : array_like
        ``(C,)`` observed values, all compared with the same null.
    null : array_like
        ``(M,)`` null values (e.g. a layer's pooled permutation values).
    min_exceed : int, default 10
        Below this many null values ``>=`` the observed one, the GPD estimate is used.
        0 turns the tail off (plain permutation p-values).
    tail : int, optional
        Excesses fitted; default ``min(250, M // 4)``. With fewer than 20 no tail is fitted.
    floor : float, default 0.01
        The tail estimate is at least ``floor / (M + 1)``.

    Returns
    -------
    numpy.ndarray
        ``(C,)`` p-values in ``(0, 1]``: ``(1 + e) / (M + 1)`` where ``e >= min_exceed``,
        the GPD estimate (capped at ``(1 + e) / (M + 1)``) elsewhere.

    Examples
    --------
    >>> import numpy as np
    >>> null = np.linspace(0, 1, 99)
    >>> tail_p_values([0.5, 2.0], null, min_exceed=0).tolist()
    [0.5, 0.01]
    """
    obs = float64_array(observed, "observed").ravel()
    nul = np.sort(float64_array(null, "null").ravel())
    if nul.size == 0:
        raise ValueError("null is empty")
    if not (np.all(np.isfinite(obs)) and np.all(np.isfinite(nul))):
        raise ValueError("observed and null must be finite")
    min_exceed = integer(min_exceed, "min_exceed", minimum=0)
    if not 0 < floor <= 1:
        raise ValueError(f"floor must be in (0, 1]; got {floor}")
    m_all = nul.size
    exceed = m_all - np.searchsorted(nul, obs, side="left")
    p = (1.0 + exceed) / (m_all + 1.0)
    m = min(MAX_TAIL, m_all // 4) if tail is None else integer(tail, "tail")
    use = exceed < min_exceed
    if m < 20 or not use.any() or m >= m_all:
        return p
    top = nul[::-1]
    threshold = 0.5 * (top[m - 1] + top[m])
    if top[m - 1] <= threshold:                   # ties at the threshold: no tail to fit
        return p
    xi, sigma = fit_gpd(top[:m] - threshold)
    est = (m / m_all) * gpd_sf(obs[use] - threshold, xi, sigma)
    p[use] = np.clip(est, floor / (m_all + 1.0), p[use])
    return p
