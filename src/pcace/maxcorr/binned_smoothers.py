"""The supersmoother and its kin on bins, weighted by their counts (binned ACE).

A bin's observations sit at the bin's mean abscissa; a smoother call receives the sums of
its target over the bins (one scatter-add) and returns one fitted value per bin. The
windows keep acepack's spans in observations: a window holds ``2 * ibw + 1`` of them
(``ibw`` as for all n observations), counted in ranks, the bins at its two ends with the
fraction of their observations inside (:func:`pcace.maxcorr.binning.bin_geometry`); a
bin's window is centred on its mean rank. The span selection smooths each bin's mean
absolute leave-one-out residual over its observations (a pass over the observations).
With one bin per observation this is exactly :mod:`pcace.maxcorr.kernels`'s smoother.

Examples
--------
>>> import numpy as np
>>> from pcace.maxcorr.binning import bin_edges, bin_geometry, bin_index
>>> x = np.linspace(-1, 1, 2000)
>>> edges = bin_edges(x, 100, 100, True)
>>> g, bins = bin_geometry(x, edges), bin_index(np.arange(2000), edges)
>>> sums, squares = np.zeros(g[1]), np.zeros(g[1])
>>> accumulate(x ** 2, bins, g[1], sums, squares)
>>> fit = smooth_bins(0, g, sums, 5.0, x ** 2, bins)
>>> bool(np.abs(fit[bins] - x ** 2).max() < 0.03)  # a bin holds 20 of the 2,000 points
True
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .binning import anchored_sums
from .kernels import CATEGORICAL, LINEAR, MONOTONE, best_spans, mix_spans

_BIG = 1e20


@njit(cache=True)
def _line(g, s, v, pv, pxv, fit):
    """Running-line fit of per-bin values ``v`` (weights: counts) with span ``s``."""
    _, nb, _, xc, _, where, frac, widths, x_mean, inv_ss, _, _ = g
    width = widths[s]
    for b in range(nb):
        klo, khi = where[s, 0, b], where[s, 1, b]
        flo, fhi = frac[s, 0, b], frac[s, 1, b]
        sy = (pv[khi] + fhi * v[khi]) - (pv[klo] + flo * v[klo])
        sxy = (pxv[khi] + fhi * xc[khi] * v[khi]) - (pxv[klo] + flo * xc[klo] * v[klo])
        slope = (sxy - x_mean[s, b] * sy) * inv_ss[s, b]
        fit[b] = slope * (xc[b] - x_mean[s, b]) + sy / width


@njit(cache=True)
def _absolute_residuals(fits, target, bins):
    """Sums over each bin of ``|target - fit|`` for the three spans' fits, ``(nb, 3)``."""
    nb = fits.shape[1]
    f = np.ascontiguousarray(fits.T)
    out = np.zeros((nb, 3))
    for t in range(target.size):
        b = bins[t]
        v = target[t]
        out[b, 0] += abs(v - f[b, 0])
        out[b, 1] += abs(v - f[b, 1])
        out[b, 2] += abs(v - f[b, 2])
    return out


@njit(cache=True)
def _supersmoother(g, sums, alpha, target, bins):
    """Friedman's supersmoother on the bins: ``sums`` of ``target`` over its ``bins``."""
    n, nb, w, xc, constant, _, _, _, _, _, cv_scale, mid = g
    if constant:
        return np.full(nb, sums[:nb].sum() / n)
    v = np.empty(nb)
    for b in range(nb):
        v[b] = sums[b] / w[b]
    pv = np.empty(nb + 1)
    pxv = np.empty(nb + 1)
    anchored_sums(w, xc, v, pv, pxv, mid)
    fits = np.empty((3, nb))
    cv = np.empty((3, nb))
    resid = np.empty(nb)
    rpv = np.empty(nb + 1)
    rpxv = np.empty(nb + 1)
    for s in range(3):
        _line(g, s, v, pv, pxv, fits[s])
    absolute = _absolute_residuals(fits, target, bins)
    for s in range(3):
        for b in range(nb):
            scale = cv_scale[s, b]
            resid[b] = absolute[b, s] / w[b] * scale if scale != 0.0 else _BIG
        anchored_sums(w, xc, resid, rpv, rpxv, mid)
        _line(g, 1, resid, rpv, rpxv, cv[s])
    spans = best_spans(cv, alpha)
    smoothed = np.empty(nb)
    anchored_sums(w, xc, spans, rpv, rpxv, mid)
    _line(g, 1, spans, rpv, rpxv, smoothed)
    mixed = mix_spans(smoothed, fits)
    out = np.empty(nb)
    anchored_sums(w, xc, mixed, rpv, rpxv, mid)
    _line(g, 0, mixed, rpv, rpxv, out)
    return out


@njit(cache=True)
def _isotonic(v, w):
    """Weighted least-squares non-decreasing fit (pool adjacent violators)."""
    nb = v.size
    level = np.empty(nb)
    weight = np.empty(nb)
    size = np.empty(nb, np.int64)
    count = 0
    for b in range(nb):
        level[count] = v[b]
        weight[count] = w[b]
        size[count] = 1
        count += 1
        while count > 1 and level[count - 2] > level[count - 1]:
            total = weight[count - 2] + weight[count - 1]
            level[count - 2] = (level[count - 2] * weight[count - 2]
                                + level[count - 1] * weight[count - 1]) / total
            weight[count - 2] = total
            size[count - 2] += size[count - 1]
            count -= 1
    out = np.empty(nb)
    b = 0
    for c in range(count):
        for _ in range(size[c]):
            out[b] = level[c]
            b += 1
    return out


@njit(cache=True)
def _ramp_flat_runs(v, pos):
    """acepack's ramps over flat runs, with bins at positions ``pos`` (their mean ranks)."""
    nb = v.size
    out = v.copy()
    j = 0
    while j < nb:
        j0 = j
        while j + 1 < nb and out[j + 1] == out[j]:
            j += 1
        if j > j0:
            a = 0.5 * (out[j0] - out[j0 - 1]) if j0 > 0 else 0.0
            b = 0.5 * (out[j + 1] - out[j]) if j < nb - 1 else 0.0
            d = (a + b) / (pos[j] - pos[j0])
            if a == 0.0 or b == 0.0:
                d *= 2.0
            if a == 0.0:
                a = b
            for i in range(j0, j + 1):
                out[i] = out[i] - a + d * (pos[i] - pos[j0])
        j += 1
    return out


@njit(cache=True)
def smooth_bins(kind, g, sums, alpha, target, bins):
    """The fitted value of each bin for a variable of ``kind``."""
    _, nb, w, xc, _, _, _, _, _, _, _, _ = g
    if kind == CATEGORICAL:
        return sums[:nb] / w
    if kind == LINEAR:  # least squares on the abscissa centred at its mean
        d = xc - np.sum(w * xc) / np.sum(w)
        ss = 0.0
        sxy = 0.0
        for b in range(nb):
            ss += w[b] * d[b] * d[b]
            sxy += d[b] * sums[b]
        slope = sxy / ss if ss > 0 else 0.0
        return slope * d
    fit = _supersmoother(g, sums, alpha, target, bins)
    if kind == MONOTONE:
        up = _isotonic(fit, w)
        down = _isotonic(fit[::-1].copy(), w[::-1].copy())[::-1]
        pos = np.empty(nb)
        acc = 0.0
        for b in range(nb):
            pos[b] = acc + 0.5 * (w[b] - 1.0)
            acc += w[b]
        if np.sum(w * (fit - up) ** 2) < np.sum(w * (fit - down) ** 2):
            fit = _ramp_flat_runs(up, pos)
        else:
            fit = _ramp_flat_runs(down.copy(), pos)
    return fit


@njit(cache=True)
def accumulate(values, bins, nb, sums, squares):
    """Sums and sums of squares of ``values`` over ``bins`` (first ``nb`` entries)."""
    for b in range(nb):
        sums[b] = 0.0
        squares[b] = 0.0
    for t in range(values.size):
        b = bins[t]
        sums[b] += values[t]
        squares[b] += values[t] * values[t]


@njit(cache=True)
def centred_fit(kind, g, sums, squares, alpha, target, bins):
    """The bins' fitted values, centred over the observations; the weighted squared error."""
    n, nb, w, _, _, _, _, _, _, _, _, _ = g
    fit = smooth_bins(kind, g, sums, alpha, target, bins)
    mean = 0.0
    for b in range(nb):
        mean += w[b] * fit[b]
    mean /= n
    sse = 0.0
    for b in range(nb):
        fit[b] -= mean
        sse += squares[b] - 2.0 * fit[b] * sums[b] + w[b] * fit[b] * fit[b]
    return fit, sse


