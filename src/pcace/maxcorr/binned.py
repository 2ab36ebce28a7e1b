"""Binned ACE for large n: the supersmoother on quantile bins, weighted by their counts.

At large n every smoother call of exact ACE (:mod:`pcace.maxcorr.kernels`) walks all n
sorted observations about twenty times. Here each variable is cut once into bins that
follow its quantiles (about equal counts; a group of tied values is never split, so tied
observations share one bin and one fitted value). A smoother call then costs one
scatter-add of the target into its bins (sums and sums of squares), a weighted
supersmoother over the bin representatives, and one gather of the fitted values back to
the observations.

The weighted supersmoother keeps the meaning of acepack's spans: a window holds
``2 * ibw + 1`` observations (``ibw`` as for n unbinned observations), measured in ranks;
the bins at its two ends count with the fraction of their observations that falls inside
(each bin's observations sit at its mean abscissa). A bin's window is centred on its
mean rank. The leave-one-out residuals the span selection smooths are root mean squares
over each bin's observations, from the bin's sums of the target and of its squares.
With one bin per observation (no ties) all of this is exactly the unbinned
supersmoother.

Linear and categorical variables get one bin per distinct value (their smoothers are
exact on those), ordered and monotone variables quantile bins.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..core.threads import parallel_ranges
from .kernels import CATEGORICAL, LINEAR, MONOTONE

_SPANS = np.array([0.05, 0.2, 0.5])
_EPS = 1e-3
_SML = 1e-4
_BIG = 1e20
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
        ibw = max(2, int(0.5 * _SPANS[s] * n + 0.5))
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


@njit(cache=True)
def _prefix(w, xc, v, pv, pxv):
    """Running sums over bins of ``w * v`` and ``w * xc * v`` (length nb + 1)."""
    pv[0] = 0.0
    pxv[0] = 0.0
    for b in range(v.size):
        pv[b + 1] = pv[b] + w[b] * v[b]
        pxv[b + 1] = pxv[b] + w[b] * xc[b] * v[b]


@njit(cache=True)
def _line(g, s, v, pv, pxv, fit):
    """Running-line fit of per-bin values ``v`` (weights: counts) with span ``s``."""
    _, nb, _, xc, _, where, frac, widths, x_mean, inv_ss, _ = g
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
    n, nb, w, xc, constant, _, _, _, _, _, cv_scale = g
    if constant:
        return np.full(nb, sums[:nb].sum() / n)
    v = np.empty(nb)
    for b in range(nb):
        v[b] = sums[b] / w[b]
    pv = np.empty(nb + 1)
    pxv = np.empty(nb + 1)
    _prefix(w, xc, v, pv, pxv)
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
        _prefix(w, xc, resid, rpv, rpxv)
        _line(g, 1, resid, rpv, rpxv, cv[s])
    spans = np.empty(nb)
    power = 10.0 - alpha
    whole = power == np.floor(power) and 0.0 <= power <= 10.0
    for b in range(nb):
        resmin = cv[0, b]
        span = _SPANS[0]
        for s in range(1, 3):
            if cv[s, b] < resmin:
                resmin = cv[s, b]
                span = _SPANS[s]
        if 0.0 < alpha <= 10.0 and resmin < cv[2, b]:
            woofer = cv[2, b] if cv[2, b] != 0 else 1.0
            base = max(_SML, resmin / woofer)
            if whole:
                factor = 1.0
                for _ in range(int(power)):
                    factor *= base
            else:
                factor = base ** power
            span += (_SPANS[2] - span) * factor
        spans[b] = span
    smoothed = np.empty(nb)
    _prefix(w, xc, spans, rpv, rpxv)
    _line(g, 1, spans, rpv, rpxv, smoothed)
    mixed = np.empty(nb)
    for b in range(nb):
        sp = min(max(smoothed[b], _SPANS[0]), _SPANS[2])
        if sp < _SPANS[1]:
            f = (_SPANS[1] - sp) / (_SPANS[1] - _SPANS[0])
            mixed[b] = (1 - f) * fits[1, b] + f * fits[0, b]
        else:
            f = (sp - _SPANS[1]) / (_SPANS[2] - _SPANS[1])
            mixed[b] = (1 - f) * fits[1, b] + f * fits[2, b]
    out = np.empty(nb)
    _prefix(w, xc, mixed, rpv, rpxv)
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
def _smooth(kind, g, sums, alpha, target, bins):
    """The fitted value of each bin for a variable of ``kind``."""
    _, nb, w, xc, _, _, _, _, _, _, _ = g
    if kind == CATEGORICAL:
        return sums[:nb] / w
    if kind == LINEAR:
        ss = 0.0
        sxy = 0.0
        for b in range(nb):
            ss += w[b] * xc[b] * xc[b]
            sxy += xc[b] * sums[b]
        slope = sxy / ss if ss > 0 else 0.0
        return slope * xc
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
def _accumulate(values, bins, nb, sums, squares):
    """Sums and sums of squares of ``values`` over ``bins`` (first ``nb`` entries)."""
    for b in range(nb):
        sums[b] = 0.0
        squares[b] = 0.0
    for t in range(values.size):
        b = bins[t]
        sums[b] += values[t]
        squares[b] += values[t] * values[t]


@njit(cache=True)
def _centred_fit(kind, g, sums, squares, alpha, target, bins):
    """The bins' fitted values, centred over the observations; the weighted squared error."""
    n, nb, w, _, _, _, _, _, _, _, _ = g
    fit = _smooth(kind, g, sums, alpha, target, bins)
    mean = 0.0
    for b in range(nb):
        mean += w[b] * fit[b]
    mean /= n
    sse = 0.0
    for b in range(nb):
        fit[b] -= mean
        sse += squares[b] - 2.0 * fit[b] * sums[b] + w[b] * fit[b] * fit[b]
    return fit, sse


@njit(cache=True)
def solve(x, y, xgeo, xbins, ygeo, ybins, x_kinds, y_kind, delrsq, max_iter, alpha, nterm,
          theta, phi):  # pragma: no cover - compiled
    """One binned problem. ``phi`` is ``(k, n)`` (column-major); ``theta`` ``(n,)``.

    The iteration is :func:`pcace.maxcorr.kernels._solve`'s, with each smoother call on the
    bins of its variable.
    """
    n, k = x.shape
    ym = y.mean()
    sd = np.sqrt(np.mean((y - ym) ** 2))
    for t in range(n):
        theta[t] = (y[t] - ym) / sd
    xc = np.empty((n, k))
    for j in range(k):
        xc[:, j] = x[:, j] - x[:, j].mean()
    coef = np.linalg.pinv(xc.T @ xc) @ (xc.T @ theta)
    for j in range(k):
        for t in range(n):
            phi[j, t] = xc[t, j] * coef[j]
    nbmax = ygeo[1]
    for j in range(k):
        nbmax = max(nbmax, xgeo[j][1])
    sums = np.empty(nbmax)
    squares = np.empty(nbmax)
    rsq = 0.0
    history = np.full(nterm, 100.0)
    iterations = 0
    converged = False
    degenerate = False
    resid = np.empty(n)
    target = np.empty(n)
    total = np.empty(n)
    for it in range(1, max_iter + 1):
        iterations = it
        for nit in range(1, max_iter + 1):
            rsq_start = rsq
            for t in range(n):
                s = 0.0
                for j in range(k):
                    s += phi[j, t]
                resid[t] = theta[t] - s
            for j in range(k):
                g = xgeo[j]
                bins = xbins[j]
                for t in range(n):
                    target[t] = resid[t] + phi[j, t]
                if g[4]:  # constant column: nothing to fit
                    sv = 1.0 - np.mean(target ** 2)
                    if sv > rsq:
                        rsq = sv
                        for t in range(n):
                            phi[j, t] = 0.0
                            resid[t] = target[t]
                    continue
                _accumulate(target, bins, g[1], sums, squares)
                fit, sse = _centred_fit(x_kinds[j], g, sums, squares, alpha, target, bins)
                sv = 1.0 - sse / n
                if sv > rsq:
                    rsq = sv
                    for t in range(n):
                        f = fit[bins[t]]
                        phi[j, t] = f
                        resid[t] = target[t] - f
            if rsq - rsq_start <= delrsq or nit >= max_iter or k == 1:
                break
        for t in range(n):
            s = 0.0
            for j in range(k):
                s += phi[j, t]
            total[t] = s
        _accumulate(total, ybins, ygeo[1], sums, squares)
        fit, _ = _centred_fit(y_kind, ygeo, sums, squares, alpha, total, ybins)
        var = 0.0
        for b in range(ygeo[1]):
            var += ygeo[2][b] * fit[b] * fit[b]
        var /= n
        if var <= 0:
            degenerate = True
            break
        scale = 1.0 / np.sqrt(var)
        sse = 0.0
        for t in range(n):
            theta[t] = fit[ybins[t]] * scale
            sse += (theta[t] - total[t]) ** 2
        rsq = 1.0 - sse / n
        history[(it - 1) % nterm] = rsq
        if history.max() - history.min() <= delrsq:
            converged = True
            break

    if degenerate:
        return 0.0, 0.0, iterations, True
    for t in range(n):
        s = 0.0
        for j in range(k):
            s += phi[j, t]
        total[t] = s
    tc = total - total.mean()
    hc = theta - theta.mean()
    denom = np.sqrt(np.sum(tc * tc) * np.sum(hc * hc))
    rho = np.sum(tc * hc) / denom if denom > 0 else 0.0
    return rho, rsq, iterations, converged


@njit(cache=True)
def _variable(v, nbins, cells, merge):
    """Sort order, bin geometry and bin of each observation of one variable."""
    order = np.argsort(v, kind="mergesort")
    vs = v[order]
    edges = bin_edges(vs, nbins, cells, merge)
    return bin_geometry(vs, edges), bin_index(order, edges)


@njit(cache=True)
def _x_variables(x, x_kinds, nbins, cells):
    """Binned geometry ``list`` and bins ``(k, n)`` of every column of one problem."""
    n, k = x.shape
    bins = np.empty((k, n), np.int32)
    geos = []
    for j in range(k):
        merge = x_kinds[j] != LINEAR and x_kinds[j] != CATEGORICAL
        g, b = _variable(np.ascontiguousarray(x[:, j]), nbins, cells, merge)
        geos.append(g)
        bins[j] = b
    return geos, bins


@njit(nogil=True, cache=True)
def _batch_range(lo, hi, x, y, x_kinds, y_kind, nbins, cells, delrsq, max_iter, alpha, rho, rsq,
                 theta, phi, iterations, converged):  # pragma: no cover - compiled
    n, k = x.shape[1], x.shape[2]
    phi_t = np.empty((k, n))
    y_merge = y_kind != LINEAR and y_kind != CATEGORICAL
    for i in range(lo, hi):
        geos, bins = _x_variables(x[i], x_kinds, nbins, cells)
        yg, yb = _variable(y[i], nbins, cells, y_merge)
        r, q, it, c = solve(x[i], y[i], geos, bins, yg, yb, x_kinds, y_kind, delrsq,
                            max_iter, alpha, 3, theta[i], phi_t)
        phi[i] = phi_t.T
        rho[i] = r
        rsq[i] = q
        iterations[i] = it
        converged[i] = c


def ace_batch(x, y, x_kinds, y_kind, nbins, cells, delrsq, max_iter, alpha):
    """Solve ``b`` problems binned: ``x`` (b, n, k), ``y`` (b, n), float64, validated.

    The outputs are those of :func:`pcace.maxcorr.kernels.ace_batch`.
    """
    b, n, k = x.shape
    rho = np.empty(b)
    rsq = np.empty(b)
    iterations = np.empty(b, np.int64)
    converged = np.empty(b, np.bool_)
    theta = np.empty((b, n))
    phi = np.empty((b, n, k))
    parallel_ranges(_batch_range, b, x, y, x_kinds, np.int64(y_kind), np.int64(nbins),
                    np.int64(cells), float(delrsq), np.int64(max_iter), float(alpha), rho, rsq,
                    theta, phi, iterations, converged)
    return rho, rsq, theta, phi, iterations, converged


@njit(cache=True)
def _first_correlation(phi, theta):
    """``|corr(phi[0], theta)|`` for column-major ``phi``; 0 where one side is constant."""
    a = phi[0] - phi[0].mean()
    b = theta - theta.mean()
    den = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return abs(np.sum(a * b) / den) if den > 0 else 0.0


@njit(nogil=True, cache=True)
def _indexed_range(lo, hi, z, ys, y_orders, y_groups, channels, rows, x_kinds, y_kind, nbins,
                   cells, delrsq, max_iter, alpha, rho, first, iterations,
                   converged):  # pragma: no cover - compiled
    n, k = z.shape[1], z.shape[2]
    theta = np.empty(n)
    phi = np.empty((k, n))
    y_merge = y_kind != LINEAR and y_kind != CATEGORICAL
    c_now = channels[lo]
    geos, bins = _x_variables(z[c_now], x_kinds, nbins, cells)
    r_now = rows[lo]
    g_now = y_groups[r_now]
    edges = bin_edges(ys[r_now][y_orders[r_now]], nbins, cells, y_merge)
    yg = bin_geometry(ys[r_now][y_orders[r_now]], edges)
    yb = bin_index(y_orders[r_now], edges)
    for i in range(lo, hi):
        c, r = channels[i], rows[i]
        if c != c_now:
            c_now = c
            geos, bins = _x_variables(z[c], x_kinds, nbins, cells)
        if y_groups[r] != g_now:
            g_now = y_groups[r]
            edges = bin_edges(ys[r][y_orders[r]], nbins, cells, y_merge)
            yg = bin_geometry(ys[r][y_orders[r]], edges)
        if r != r_now:
            r_now = r
            yb = bin_index(y_orders[r], edges)
        v, _, it, ok = solve(z[c], ys[r], geos, bins, yg, yb, x_kinds, y_kind, delrsq,
                             max_iter, alpha, 3, theta, phi)
        rho[i] = v
        first[i] = _first_correlation(phi, theta)
        iterations[i] = it
        converged[i] = ok


def ace_indexed(z, ys, y_orders, y_groups, channels, rows, x_kinds, y_kind, nbins, cells,
                delrsq, max_iter, alpha):
    """Binned :func:`pcace.maxcorr.kernels.ace_indexed`: problems ``(z[c], ys[r])``.

    A channel's bins are made once for its consecutive problems, a response's bin
    geometry once per group of rows with equal sorted values (only each row's bin of
    every observation is new).
    """
    b = channels.size
    rho = np.empty(b)
    first = np.empty(b)
    iterations = np.empty(b, np.int64)
    converged = np.empty(b, np.bool_)
    parallel_ranges(_indexed_range, b, z, ys, y_orders, y_groups, channels, rows, x_kinds,
                    np.int64(y_kind), np.int64(nbins), np.int64(cells), float(delrsq),
                    np.int64(max_iter),
                    float(alpha), rho, first, iterations, converged)
    return rho, first, iterations, converged


#: ``bins="auto"`` bins problems of at least this many observations.
AUTO_MIN_N = 10_000
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
