"""The machinery of the split-half check: halves drawn, ACE on an engine, agreement.

:func:`pcace.stats.evidence.split_half` is the public entry; this module holds its
parts: the Spearman-Brown projection, the draw of the halves, the ACE runs on both
halves (through an :class:`~pcace.engines.engine.Engine`), the number of splits an
adaptive check still needs, and the agreement of two halves' values.

Examples
--------
>>> import numpy as np
>>> a = np.array([[1.0, 2.0, 3.0, 4.0]]); b = np.array([[1.0, 3.0, 2.0, 4.0]])
>>> float(_spearman_rows(a, b)[0]), spearman_brown(0.8)
(0.8, 0.888888888888889)
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from ..core.validation import MIN_OBSERVATIONS, integer
from ..engines.engine import Engine, LocalEngine, Problems
from .common import DEFAULT_PLAN, draw_varying, spearman

__all__ = ["spearman_brown"]


def spearman_brown(r: Any) -> Any:
    """Project a split-half correlation to the full sample: ``2 r / (1 + r)`` for ``r > 0``.

    Two halves of ``N/2`` images each agree less than two samples of ``N`` images;
    if a channel's value is its true value plus noise whose variance falls like
    ``1/N``, the agreement of two ``N``-samples is ``2 r / (1 + r)``. Non-positive
    ``r`` (no measurable agreement) is returned unchanged; NaN stays NaN.

    Parameters
    ----------
    r : float or array_like
        Split-half correlation(s) in ``[-1, 1]``.

    Returns
    -------
    float or numpy.ndarray
        Same shape as ``r``.

    Examples
    --------
    >>> spearman_brown(0.5), spearman_brown(-0.2)
    (0.6666666666666666, -0.2)
    """
    a = np.asarray(r, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(a > 0, 2.0 * a / (1.0 + a), a)
    return float(out) if out.ndim == 0 else out


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation along the last axis (average ranks for ties); NaN if constant."""
    return spearman(a, b, axis=-1)


def _resampled_spearman(a: np.ndarray, b: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """``_spearman_rows(a[:, pick], b[:, pick])`` for every resample, without ranking each.

    ``a``, ``b`` ``(S, C)``; ``pick`` ``(R, C)`` channel indices drawn with replacement.
    Returns ``(R, S)``. A resample holds channel ``j`` ``h_j`` times, so its Spearman
    correlation is the ``h``-weighted Pearson correlation of the channels' ranks within
    the resample, and a channel's average rank there follows from the counts of the
    distinct values below and equal to its own: ``O(R C)`` per split instead of a sort of
    every resample. Equal to ranking the resamples (``tests/test_null_split.py``).
    """
    r_count, c = pick.shape
    flat = (np.arange(r_count)[:, None] * c + pick).ravel()
    counts = np.bincount(flat, minlength=r_count * c).reshape(r_count, c).astype(np.float64)
    mid = (c + 1) / 2.0  # the mean rank of any c values
    out = np.empty((r_count, a.shape[0]))
    for s in range(a.shape[0]):
        dev = [_resampled_ranks(v[s], counts) - mid for v in (a, b)]
        num = (counts * dev[0] * dev[1]).sum(axis=1)
        den = np.sqrt((counts * dev[0] ** 2).sum(axis=1) * (counts * dev[1] ** 2).sum(axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, s] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


def _resampled_ranks(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``(R, C)``: each channel's average rank in each resample (``counts`` ``(R, C)``)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    new_value = np.r_[True, ordered[1:] != ordered[:-1]]
    starts = np.flatnonzero(new_value)
    group = np.empty(values.size, np.int64)
    group[order] = np.cumsum(new_value) - 1
    per = np.add.reduceat(counts[:, order], starts, axis=1)   # (R, distinct values)
    below = np.cumsum(per, axis=1) - per
    return (below + (per + 1.0) / 2.0)[:, group]


def _top_overlap(a: np.ndarray, b: np.ndarray, t: int) -> np.ndarray:
    """Share of the top ``t`` of each row of ``a`` that is in the top ``t`` of ``b``."""
    ta = np.argsort(-a, axis=-1, kind="stable")[..., :t]
    tb = np.argsort(-b, axis=-1, kind="stable")[..., :t]
    hits = (ta[..., :, None] == tb[..., None, :]).any(-1).sum(-1)
    return hits / t


def _checked_components(components: Any) -> tuple[Any, bool]:
    """``(C, N, k)`` components as float64 NumPy (or a CUDA tensor), checked."""
    on_gpu = isinstance(components, torch.Tensor) and components.device.type != "cpu"
    if isinstance(components, torch.Tensor):
        zt = components.detach()
        z: Any = zt if on_gpu else zt.to(torch.float64).numpy()
    else:
        try:
            z = np.asarray(components, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"components must be a numeric array: {err}") from None
    if z.ndim != 3:
        raise ValueError(f"components must have shape (C, N, k); got {tuple(z.shape)}. "
                         "For one channel use components[None]")
    c, n, k = (int(d) for d in z.shape)
    if c < 1 or k < 1:
        raise ValueError(f"components is empty: shape {tuple(z.shape)}")
    if n // 2 < MIN_OBSERVATIONS:
        raise ValueError(f"a split-half check needs at least {2 * MIN_OBSERVATIONS} images; "
                         f"got {n}")
    finite = bool(torch.isfinite(z).all()) if on_gpu else bool(np.isfinite(z).all())
    if not finite:
        raise ValueError("components holds NaN or inf")
    return z, on_gpu


def _checked_scores(scores: Any, n: int) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    y = np.asarray(scores, dtype=np.float64)
    if y.shape != (n,):
        raise ValueError(f"scores must have shape ({n},), one per image; got {y.shape}")
    if not np.isfinite(y).all():
        raise ValueError("scores holds NaN or inf")
    if np.ptp(y) <= 0:
        raise ValueError("scores is constant; nothing to rank against")
    return y


def _draw_halves(y: np.ndarray, half: int, s_count: int,
                 rng: np.random.Generator) -> np.ndarray:
    """``(S, 2, half)`` sorted image indices of the two halves of each split."""
    n = y.size
    halves = np.empty((s_count, 2, half), dtype=np.int64)

    def draw() -> tuple[np.ndarray, np.ndarray]:
        perm = rng.permutation(n)
        return perm[:half], perm[half:2 * half]

    for s in range(s_count):
        a, b = draw_varying(draw, y)
        halves[s, 0], halves[s, 1] = np.sort(a), np.sort(b)
    return halves


def _live_channels(z: Any, on_gpu: bool) -> np.ndarray:
    if on_gpu:
        return torch.nonzero((z != 0).flatten(1).any(1)).flatten().cpu().numpy()
    return np.flatnonzero((z != 0).reshape(z.shape[0], -1).any(1))


class _HalfRunner:
    """Every channel's values on both halves of splits ``lo .. hi - 1`` (ACE on an engine)."""

    def __init__(self, z: Any, y: np.ndarray, halves: np.ndarray, live: np.ndarray,
                 chunk: int | None, options: dict, engine: Engine | None,
                 on_gpu: bool) -> None:
        self.z, self.y, self.halves, self.live = z, y, halves, live
        half, k = halves.shape[2], int(z.shape[2])
        self.step = DEFAULT_PLAN.ace_problems(half, k) if chunk is None else \
            integer(chunk, "chunk")
        self.options, self.on_gpu = options, on_gpu
        self.engine = LocalEngine() if engine is None else engine

    def values(self, lo: int, hi: int) -> np.ndarray:
        """``(hi - lo, 2, C)``; dead channels 0."""
        c = int(self.z.shape[0])
        out = np.zeros((hi - lo, 2, c))
        if self.live.size == 0 or hi <= lo:
            return out
        half = self.halves.shape[2]
        idx = self.halves[lo:hi].reshape(2 * (hi - lo), half)          # (2S, half)
        ys: Any = self.y[idx]
        if self.on_gpu:
            ys = torch.as_tensor(ys, device=self.z.device, dtype=self.z.dtype)
        # channel-major: a channel's columns are sorted once for all its halves
        problems = Problems(self.z, ys, self.live, order="channel", images=idx)
        flat = self.engine.values(problems, chunk=self.step, score="maximal",
                                  ace_options=self.options, stage="split_half")
        out[:, :, self.live] = flat.reshape(self.live.size, hi - lo, 2).transpose(1, 2, 0)
        return out


def _splits_needed(values: np.ndarray, width: float | None, level: float, c: int,
                   done: int, settled_below: float | None = None) -> int:
    """Splits after which the interval of the mean projected agreement is about ``width``.

    The interval is the Monte Carlo one of the average over splits (Student t on the
    per-split Spearman correlations, projected with :func:`spearman_brown`): the part
    of the uncertainty that more splits remove. ``done`` when it is already narrower
    (or when the agreement cannot be measured), or when its upper end is below
    ``settled_below``: more splits cannot lift the agreement to a reading above it.
    """
    if width is None:
        return values.shape[0] + 1
    if c < 3:
        return done
    rho = _spearman_rows(values[:, 0], values[:, 1])
    rho = rho[np.isfinite(rho)]
    if rho.size < 2:
        return done + 1
    from scipy.stats import t as student

    mean, sd = float(rho.mean()), float(rho.std(ddof=1))
    half = float(student.ppf(0.5 + level / 2, rho.size - 1)) * sd / math.sqrt(rho.size)
    upper = float(spearman_brown(min(1.0, mean + half)))
    now = upper - float(spearman_brown(max(-1.0, mean - half)))
    if now < width or (settled_below is not None and upper < settled_below):
        return done
    return max(done + 1, math.ceil(rho.size * (now / width) ** 2))


def _agreement(va: np.ndarray, vb: np.ndarray, top: int, level: float, resamples: int,
               rng: np.random.Generator) -> dict[str, Any]:
    """Spearman (projected, raw, interval) and top-set overlap of the two halves' values."""
    c = va.shape[1]
    t = min(top, c // 2)
    if c >= 3:
        rho = _spearman_rows(va, vb)                      # (S,)
        r_half = float(np.nanmean(rho)) if np.isfinite(rho).any() else math.nan
        r_sd = float(np.nanstd(rho, ddof=1)) if np.isfinite(rho).sum() > 1 else math.nan
    else:
        r_half = r_sd = math.nan
    low = high = math.nan
    if c >= 5 and math.isfinite(r_half):
        pick = rng.integers(0, c, size=(resamples, c))
        boot = _resampled_spearman(va, vb, pick)             # (R, S)
        with warnings.catch_warnings():                   # all-NaN rows: resamples of
            warnings.simplefilter("ignore", RuntimeWarning)  # one channel value only
            per = np.nanmean(boot, axis=1)                # (R,) mean over splits
        per = per[np.isfinite(per)]
        if per.size:
            lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
            low = float(spearman_brown(np.quantile(per, lo_q)))
            high = float(spearman_brown(np.quantile(per, hi_q)))
    return {
        "spearman": float(spearman_brown(r_half)) if math.isfinite(r_half) else math.nan,
        "spearman_low": low,
        "spearman_high": high,
        "spearman_half": r_half,
        "spearman_half_sd": r_sd,
        "top_overlap": float(_top_overlap(va, vb, t).mean()) if t >= 1 else math.nan,
        "top_size": int(t),
        "top_chance": t / c if t >= 1 else math.nan,
    }
