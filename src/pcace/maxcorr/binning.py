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

    ``merge``: the union of ``nbins`` bins of equal counts, the two outermost of them cut
    further into bins of 1, 1, 2, 2, 4, 4, ... observations from the ends, and ``cells``
    cells of equal width over ``[xs[0], xs[-1]]`` (the last two keep the observations of
    sparse tails apart); an edge that would split tied values moves forward past them.
    Otherwise (or when ``nbins >= n``) one bin per distinct value.
    """
    n = xs.size
    if not merge or nbins >= n:
        edges = np.empty(n + 1, np.int64)
        edges[0] = 0
        m = 1
        for t in range(1, n):
            if xs[t] > xs[t - 1]:
                edges[m] = t
                m += 1
        edges[m] = n
        return edges[:m + 1].copy()
    cand = np.empty(nbins + cells + 128, np.int64)
    m = 0
    for i in range(1, nbins):  # equal counts
        cand[m] = (2 * i * n + nbins) // (2 * nbins)  # round(i * n / nbins)
        m += 1
    size, step, c = 1, 0, 1
    while c < n / nbins and m < cand.size - 1:  # the outermost bins split: 1, 1, 2, 2, 4, ...
        cand[m] = c
        cand[m + 1] = n - c
        m += 2
        step += 1
        if step % 2 == 0:
            size *= 2
        c += size
    r = 0
    for i in range(1, cells):  # equal widths: each cut's first observation at or above it
        cut = xs[0] + i * ((xs[n - 1] - xs[0]) / cells)
        while r < n and xs[r] < cut:
            r += 1
        cand[m] = r
        m += 1
    cand = np.sort(cand[:m])
    edges = np.empty(m + 2, np.int64)
    edges[0] = 0
    k = 1
    for e in cand:
        while 0 < e < n and xs[e] <= xs[e - 1]:  # never split tied values
            e += 1
        if edges[k - 1] < e < n:
            edges[k] = e
            k += 1
    edges[k] = n
    return edges[:k + 1].copy()


@njit(cache=True)
def anchored_sums(w, xc, v, pv, pxv, mid):  # pragma: no cover - compiled
    """Running sums over bins of ``w * v`` and ``w * xc * v`` (length nb + 1), zero at the
    median's bin ``mid`` and accumulated outwards from it.

    Window sums are differences of these. Accumulated from the median, they hold only the
    values between a window and the median, never an outlier on the far side, so the
    differences keep their precision when a variable spans many orders of magnitude.
    """
    nb = v.size
    pv[mid] = 0.0
    pxv[mid] = 0.0
    for b in range(mid, nb):
        pv[b + 1] = pv[b] + w[b] * v[b]
        pxv[b + 1] = pxv[b] + w[b] * xc[b] * v[b]
    for b in range(mid - 1, -1, -1):
        pv[b] = pv[b + 1] - w[b] * v[b]
        pxv[b] = pxv[b + 1] - w[b] * xc[b] * v[b]


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
def _quartile_scale(xs, constant):
    """acepack's scale of sorted ``xs``: x(3i) - x(i), i = n/4 (1-based), widened until > 0."""
    n = xs.size
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
    return scale


@njit(cache=True)
def bin_geometry(xs, edges):  # pragma: no cover - compiled
    """Everything the binned smoothers reuse about one sorted variable and its bins.

    Returns ``(n, nb, w, xc, constant, where, frac, widths, x_mean, inv_ss, cv_scale,
    mid)``: counts ``w`` and mean abscissae ``xc`` (centred at the median) of the ``nb``
    bins; ``mid`` the bin of the median; for each span and bin the bins holding its
    window's two ends (``where`` ``(3, 2, nb)``) and the ranks of them inside (``frac``);
    the window's mean abscissa, inverse sum of squares and leave-one-out scale (as
    :func:`pcace.maxcorr.kernels._axis`).
    """
    n = xs.size
    nb = edges.size - 1
    mean = xs[n // 2]  # the median: sums stay exact where outliers swamp the mean
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
    vsmlsq = (_EPS * _quartile_scale(xs, constant)) ** 2
    mid = 0
    while edges[mid + 1] <= n // 2:
        mid += 1
    px = np.empty(nb + 1)
    pxx = np.empty(nb + 1)
    anchored_sums(w, xc, xc, px, pxx, mid)
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
    return n, nb, w, xc, constant, where, frac, widths, x_mean, inv_ss, cv_scale, mid


#: ``bins="auto"`` bins problems of at least this many observations. 2,500 since
#: 8 December (5,000 before): on the shared ResNet-20's PCACE problems at n = 2,500 the 99th
#: percentile of |binned - exact| is 4e-4 (3e-3 against permuted scores), the channels'
#: order per layer Spearman >= 0.997, at 1.8x the speed; split halves of 5,000 images are
#: binned with it (benchmarks/README.md, "Binned ACE from n = 2,500").
AUTO_MIN_N = 2_500
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
        from ..core.voice import option

        exact = option("ace_options", "none", python="{'bins': None}")
        raise ValueError(f"bins must be at least {MIN_BINS} (the supersmoother's spans need "
                         f"bins to average over); got {bins}. Use {exact} for exact ACE")
    return None if bins >= n else int(bins)


def split_bins(bins: int) -> tuple[int, int]:
    """Quantile bins and equal-width cells of a budget of ``bins`` bins.

    Examples
    --------
    >>> split_bins(1000)
    (500, 500)
    """
    return (bins + 1) // 2, bins // 2

