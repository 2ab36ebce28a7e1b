"""Checks and defaults the statistics modules share (arrays in, arrays out)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..core.validation import float64_array, fraction
from ..reduce.plan import MemoryPlan

#: The working memory the statistics use when no plan is given (as ``pcace.rank`` with a
#: 2 GiB budget would give them).
DEFAULT_PLAN = MemoryPlan(2 * 2**30)

#: The false-discovery level at which a channel counts as beating the permutation null.
DEFAULT_ALPHA = 0.05


def significant(q_values: Any, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Per-channel flag: does the channel beat the permutation null at FDR ``alpha``?

    The one place pcace tests ``q <= alpha``.

    Parameters
    ----------
    q_values : array_like
        BH q-values (the ``q_value`` column of a channels table). NaN (no null
        computed) counts as not significant.
    alpha : float, default 0.05
        FDR level.

    Returns
    -------
    numpy.ndarray
        Boolean, ``q <= alpha``.

    Examples
    --------
    >>> significant([0.01, 0.05, 0.2, float("nan")]).tolist()
    [True, True, False, False]
    """
    a = fraction(alpha, "alpha")
    q = np.asarray(q_values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.asarray(q <= a)


def spearman(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman correlation of ``a`` and ``b`` along ``axis`` (average ranks for ties).

    ``a`` and ``b`` broadcast against each other; NaN where either is constant.

    Parameters
    ----------
    a, b : numpy.ndarray
        Values; ranked along ``axis``.
    axis : int, default -1
        The axis along which the correlation is taken.

    Returns
    -------
    numpy.ndarray
        The correlations, ``axis`` removed.

    Examples
    --------
    >>> float(spearman(np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4])))
    0.8
    """
    from scipy.stats import rankdata

    ra, rb = rankdata(a, axis=axis), rankdata(b, axis=axis)
    ra = ra - ra.mean(axis, keepdims=True)
    rb = rb - rb.mean(axis, keepdims=True)
    den = np.sqrt((ra * ra).sum(axis) * (rb * rb).sum(axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(axis) / np.where(den > 0, den, 1.0), np.nan)


def draw_varying(draw: Callable[[], Sequence[np.ndarray]], scores: np.ndarray
                 ) -> Sequence[np.ndarray]:
    """Call ``draw`` until every score column varies on every index set it returns.

    A resample or a half whose scores are all equal cannot be scored, so it is redrawn.

    Parameters
    ----------
    draw : callable
        Returns a sequence of image index arrays (one resample, or the two halves).
    scores : numpy.ndarray
        ``(N,)`` or ``(N, T)`` scores.

    Returns
    -------
    sequence of numpy.ndarray
        The first draw on which every score column varies.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> parts = draw_varying(lambda: (rng.permutation(6)[:3],), np.arange(6.0))
    >>> len(parts[0])
    3
    """
    while True:
        parts = draw()
        if all(np.ptp(scores[idx], axis=0).min() > 0 for idx in parts):
            return parts


def check_observed_matrix(observed: Any, matrix: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    obs = float64_array(observed, "observed")
    mat = float64_array(matrix, what)
    if obs.ndim != 1:
        raise ValueError(f"observed must have shape (C,); got {obs.shape}")
    if mat.ndim != 2 or mat.shape[0] != obs.shape[0]:
        raise ValueError(f"{what} must have shape (C, B) = ({obs.shape[0]}, B); got {mat.shape}")
    if mat.shape[1] < 1:
        raise ValueError(f"{what} has no replicates (B = 0)")
    if obs.shape[0] < 1:
        raise ValueError("observed is empty: pass at least one channel")
    if not np.all(np.isfinite(obs)):
        raise ValueError("observed holds NaN or inf")
    if not np.all(np.isfinite(mat)):
        raise ValueError(f"{what} holds NaN or inf")
    return obs, mat


def channel_ids(channels: Sequence[int] | None, c: int) -> np.ndarray:
    if channels is None:
        return np.arange(c)
    ids = np.asarray(channels)
    if ids.shape != (c,):
        raise ValueError(f"channels must name one id per channel ({c}); got shape {ids.shape}")
    return ids


