"""Bins for binned ACE: each variable cut once into bins of its quantiles and of equal width.

Binned ACE (:mod:`pcace.maxcorr.binned`) smooths on bins instead of observations. The
bins of a variable are the union of about ``nbins`` bins of equal counts and ``cells``
cells of equal width over its range (which keep a sparse tail's observations apart); an
edge never splits a group of tied values, so tied observations share a bin and, later,
one fitted value. This module makes the bins, the geometry of the supersmoother's
windows over them, and resolves the ``bins`` option of :func:`pcace.ace`.

Examples
--------
>>> import numpy as np
>>> xs = np.array([0.0, 0, 0, 1, 2, 3, 4, 5, 6, 100])
>>> bin_edges(xs, 4, 2, True).tolist()      # ties at 0 kept together, 100 alone
[0, 3, 5, 8, 9, 10]
>>> resolve_bins("auto", 300) is None
True
"""

from __future__ import annotations

import numpy as np
from numba import njit

SPANS = np.array([0.05, 0.2, 0.5])
_EPS = 1e-3
_LEVERAGE_FLOOR = 1e-6  # see pcace.maxcorr.smoothers


@njit(cache=True)
def bin_edges(xs, nbins, cells, merge):  # pragma: no cover - compiled
    """Rank edges ``(m + 1,)`` of bins over sorted ``xs``.

    ``merge``: the union of about ``nbins`` bins of equal counts (each edge moved forward
    to the end of the group of tied values it would split) and ``cells`` cells of equal
    width over ``[xs[0], xs[-1]]`` (which keep sparse tails apart). Otherwise (or when
    ``nbins >= n``) one bin per distinct value.
    """
    n = xs.size
    edges = np.empty(n + 1, np.int64)
    edges[0] = 0
    m = 1
    if not merge or nbins >= n:
        for t in range(1, n):
            if xs[t] > xs[t - 1]:
                edges[m] = t
                m += 1
        edges[m] = n
        return edges[:m + 1].copy()
    quantile = np.empty(max(nbins, 1), np.int64)
    nq = 0
    for i in range(1, nbins):
        r = (2 * i * n + nbins) // (2 * nbins)  # round(i * n / nbins)
        while r < n and xs[r] <= xs[r - 1]:
            r += 1
        if r < n and (nq == 0 or r > quantile[nq - 1]):
            quantile[nq] = r
            nq += 1
    width = np.empty(max(cells, 1), np.int64)
    nw = 0
    r = 0
    for c in range(1, cells):
        cut = xs[0] + c * ((xs[n - 1] - xs[0]) / cells)
        while r < n and xs[r] < cut:
            r += 1
        if 0 < r < n and (nw == 0 or r > width[nw - 1]):
            width[nw] = r
            nw += 1
    a = 0
    b = 0
    while a < nq or b < nw:
        if b == nw or (a < nq and quantile[a] <= width[b]):
            e = quantile[a]
            a += 1
        else:
            e = width[b]
            b += 1
        if e > edges[m - 1]:
            edges[m] = e
            m += 1
    edges[m] = n
    return edges[:m + 1].copy()


@njit(cache=True)
def bin_index(order, edges):  # pragma: no cover - compiled
    """The bin of every observation (``(n,)`` int32), from its sort order and the edges."""
    n = order.size
    out = np.empty(n, np.int32)
    for b in range(edges.size - 1):
        for t in range(edges[b], edges[b + 1]):
            out[order[t]] = b
    return out


@njit(cache=True)
def _locate(r, start, w, nb, k):
    """Bin ``k' >= k`` holding rank ``r`` and the ranks of it below ``r``."""
    while k < nb - 1 and start[k + 1] <= r:
        k += 1
    return k, r - start[k]


@njit(cache=True)
def bin_geometry(xs, edges):  # pragma: no cover - compiled
    """Everything the binned smoothers reuse about one sorted variable and its bins.

    Returns ``(n, nb, w, xc, constant, where, frac, widths, x_mean, inv_ss, cv_scale)``:
    counts ``w`` and centred mean abscissae ``xc`` of the ``nb`` bins; for each span and
    bin the bins holding its window's two ends (``where`` ``(3, 2, nb)``) and the ranks of
    them inside (``frac``); the window's mean abscissa, inverse sum of squares and
    leave-one-out scale (as :func:`pcace.maxcorr.kernels._axis`).
    """
    n = xs.size
    nb = edges.size - 1
    mean = xs.mean()
    w = np.empty(nb)
    xc = np.empty(nb)
    start = np.empty(nb)
    for b in range(nb):
        s = 0.0
        for t in range(edges[b], edges[b + 1]):
            s += xs[t] - mean
        w[b] = edges[b + 1] - edges[b]
        xc[b] = s / w[b]
        start[b] = edges[b]
    constant = xs[n - 1] <= xs[0]
    i = n // 4
    j = 3 * i
    scale = xs[j - 1] - xs[i - 1]
    if not constant:
        while scale <= 0.0:
            if j < n:
                j += 1
            if i > 1:
                i -= 1
            scale = xs[j - 1] - xs[i - 1]
    vsmlsq = (_EPS * scale) ** 2
    px = np.zeros(nb + 1)
    pxx = np.zeros(nb + 1)
    for b in range(nb):
        px[b + 1] = px[b] + w[b] * xc[b]
        pxx[b + 1] = pxx[b] + w[b] * xc[b] * xc[b]
    where = np.empty((3, 2, nb), np.int64)
    frac = np.empty((3, 2, nb))
    widths = np.empty(3, np.int64)
    x_mean = np.empty((3, nb))
    inv_ss = np.empty((3, nb))
    cv_scale = np.empty((3, nb))
    for s in range(3):
        ibw = max(2, int(0.5 * SPANS[s] * n + 0.5))
        width = min(2 * ibw + 1, n)
        widths[s] = width
        klo = 0
        khi = 0
        for b in range(nb):
            centre = start[b] + 0.5 * (w[b] - 1.0)
            lo = min(max(centre - ibw, 0.0), float(n - width))
            klo, flo = _locate(lo, start, w, nb, klo)
            khi, fhi = _locate(lo + width, start, w, nb, khi)
            where[s, 0, b], where[s, 1, b] = klo, khi
            frac[s, 0, b], frac[s, 1, b] = flo, fhi
            sx = (px[khi] + fhi * xc[khi]) - (px[klo] + flo * xc[klo])
            sxx = (pxx[khi] + fhi * xc[khi] * xc[khi]) - (pxx[klo] + flo * xc[klo] * xc[klo])
            m = sx / width
            ss = max(sxx - sx * m, 0.0)
            x_mean[s, b] = m
            inv = 1.0 / ss if ss > vsmlsq else 0.0
            inv_ss[s, b] = inv
            dev = xc[b] - m
            oml = 1.0 - (1.0 / width + dev * dev * inv)
            cv_scale[s, b] = 1.0 / oml if oml > _LEVERAGE_FLOOR else 0.0
    return n, nb, w, xc, constant, where, frac, widths, x_mean, inv_ss, cv_scale


#: ``bins="auto"`` bins problems of at least this many observations.
AUTO_MIN_N = 5_000
#: The number of bins ``bins="auto"`` uses.
AUTO_BINS = 1_000
#: The fewest bins an explicit ``bins`` may ask for.
MIN_BINS = 20


def resolve_bins(bins: str | int | None, n: int) -> int | None:
    """The number of bins ACE uses for ``n`` observations, or None for exact ACE.

    Parameters
    ----------
    bins : "auto", int or None
        ``"auto"``: :data:`AUTO_BINS` bins from :data:`AUTO_MIN_N` observations on, exact
        below. An int: at most that many bins (half of them of equal counts, half of equal
        width); exact when it is at least ``n``. None: exact.
    n : int
        Observations per problem.

    Returns
    -------
    int or None

    Raises
    ------
    ValueError
        For anything else, or an int below :data:`MIN_BINS`.

    Examples
    --------
    >>> resolve_bins("auto", 300) is None, resolve_bins("auto", 50_000)
    (True, 1000)
    >>> resolve_bins(4000, 2000) is None
    True
    """
    if bins is None:
        return None
    if isinstance(bins, str):
        if bins != "auto":
            raise ValueError(f"bins must be 'auto', None or an int >= {MIN_BINS}; got {bins!r}")
        return AUTO_BINS if n >= AUTO_MIN_N else None
    if isinstance(bins, (bool, np.bool_)) or not isinstance(bins, (int, np.integer)):
        raise ValueError(f"bins must be 'auto', None or an int >= {MIN_BINS}; got {bins!r}")
    if bins < MIN_BINS:
        raise ValueError(f"bins must be at least {MIN_BINS} (the supersmoother's spans need "
                         f"bins to average over); got {bins}. Use bins=None for exact ACE")
    return None if bins >= n else int(bins)


def split_bins(bins: int) -> tuple[int, int]:
    """Quantile bins and equal-width cells of a budget of ``bins`` bins.

    Examples
    --------
    >>> split_bins(1000)
    (500, 500)
    """
    return (bins + 1) // 2, bins // 2

