"""Binned ACE for large n: every smoother runs on bins of its variable, not on observations.

At large n each smoother call of exact ACE (:mod:`pcace.maxcorr.kernels`) walks all n
sorted observations about twenty times. Here each variable is cut once into bins
(:mod:`pcace.maxcorr.binning`: about equal counts plus equal-width cells; tied values
share a bin). A smoother call then costs a scatter-add of its target into the bins, a
pass for the leave-one-out residuals, the supersmoother over the bins weighted by their
counts (:mod:`pcace.maxcorr.binned_smoothers`), and a gather of the fitted values back to
the observations; the iteration itself is exact ACE's. Tied observations share their
transformed value; with one bin per observation the answers are exact ACE's.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(1, 20_000, 2))
>>> y = np.sin(2 * x[:, :, 0]) + 0.5 * rng.normal(size=(1, 20_000))
>>> rho = ace_batch(x, y, np.zeros(2, np.int64), 0, 500, 500, 0.01, 20, 5.0)[0]
>>> bool(abs(rho[0] - 0.81) < 0.02)
True
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..core.threads import parallel_ranges
from .binned_smoothers import accumulate, centred_fit
from .binning import bin_edges, bin_geometry, bin_index
from .kernels import (
    CATEGORICAL,
    LINEAR,
    full_orders,
    gather_rows,
    stable_argsort,
    subset_orders,
)


@njit(cache=True)
def _start(x, y, theta, phi):
    """acepack's start: standardised ``y``; centred ``x`` scaled by least squares."""
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


@njit(cache=True)
def _sum_phi(phi, out):
    """``out[t] = sum_j phi[j, t]``."""
    k, n = phi.shape
    for t in range(n):
        s = 0.0
        for j in range(k):
            s += phi[j, t]
        out[t] = s


@njit(cache=True)
def _targets(resid, phi_j, bins, nb, target, sums, squares):
    """``target = resid + phi_j``, with its sums and sums of squares over ``bins``."""
    for b in range(nb):
        sums[b] = 0.0
        squares[b] = 0.0
    for t in range(resid.size):
        v = resid[t] + phi_j[t]
        target[t] = v
        b = bins[t]
        sums[b] += v
        squares[b] += v * v


@njit(cache=True)
def _backfit(xgeo, xbins, x_kinds, alpha, theta, phi, rsq, resid, target, sums, squares):
    """One inner sweep over the columns (each phi_j smoothed, kept if rsq improves)."""
    k, n = phi.shape
    _sum_phi(phi, resid)
    for t in range(n):
        resid[t] = theta[t] - resid[t]
    for j in range(k):
        g = xgeo[j]
        bins = xbins[j]
        if g[4]:  # constant column: nothing to fit
            for t in range(n):
                target[t] = resid[t] + phi[j, t]
            sv = 1.0 - np.mean(target ** 2)
            if sv > rsq:
                rsq = sv
                for t in range(n):
                    phi[j, t] = 0.0
                    resid[t] = target[t]
            continue
        _targets(resid, phi[j], bins, g[1], target, sums, squares)
        fit, sse = centred_fit(x_kinds[j], g, sums, squares, alpha, target, bins)
        sv = 1.0 - sse / n
        if sv > rsq:
            rsq = sv
            for t in range(n):
                f = fit[bins[t]]
                phi[j, t] = f
                resid[t] = target[t] - f
    return rsq


@njit(cache=True)
def _new_theta(ygeo, ybins, y_kind, alpha, theta, phi, total, sums, squares):
    """The outer step: theta = E[sum_j phi_j | y], standardised. Returns rsq, or NaN when
    the smoothed sum is constant (a degenerate problem)."""
    n = theta.size
    _sum_phi(phi, total)
    accumulate(total, ybins, ygeo[1], sums, squares)
    fit, _ = centred_fit(y_kind, ygeo, sums, squares, alpha, total, ybins)
    w = ygeo[2]
    var = 0.0
    for b in range(ygeo[1]):
        var += w[b] * fit[b] * fit[b]
    var /= n
    if var <= 0:
        return np.nan
    scale = 1.0 / np.sqrt(var)
    sse = 0.0
    for t in range(n):
        theta[t] = fit[ybins[t]] * scale
        sse += (theta[t] - total[t]) ** 2
    return 1.0 - sse / n


@njit(cache=True)
def _correlation(phi, theta, total):
    """``corr(sum_j phi_j, theta)``; 0 where one side is constant."""
    _sum_phi(phi, total)
    tc = total - total.mean()
    hc = theta - theta.mean()
    denom = np.sqrt(np.sum(tc * tc) * np.sum(hc * hc))
    return np.sum(tc * hc) / denom if denom > 0 else 0.0


@njit(cache=True)
def solve(x, y, xgeo, xbins, ygeo, ybins, x_kinds, y_kind, delrsq, max_iter, alpha, nterm,
          theta, phi):  # pragma: no cover - compiled
    """One binned problem. ``phi`` is ``(k, n)`` (column-major); ``theta`` ``(n,)``.

    The iteration is :func:`pcace.maxcorr.kernels._solve`'s, with each smoother call on the
    bins of its variable. Returns ``rho, rsq, iterations, converged``.
    """
    n, k = x.shape
    _start(x, y, theta, phi)
    nbmax = ygeo[1]
    for j in range(k):
        nbmax = max(nbmax, xgeo[j][1])
    sums = np.empty(nbmax)
    squares = np.empty(nbmax)
    resid = np.empty(n)
    target = np.empty(n)
    rsq = 0.0
    history = np.full(nterm, 100.0)
    iterations = 0
    for it in range(1, max_iter + 1):
        iterations = it
        for nit in range(1, max_iter + 1):
            rsq_start = rsq
            rsq = _backfit(xgeo, xbins, x_kinds, alpha, theta, phi, rsq, resid, target, sums,
                           squares)
            if rsq - rsq_start <= delrsq or nit >= max_iter or k == 1:
                break
        new = _new_theta(ygeo, ybins, y_kind, alpha, theta, phi, target, sums, squares)
        if np.isnan(new):
            return 0.0, 0.0, iterations, True  # degenerate: the sum of phi is flat in y
        rsq = new
        history[(it - 1) % nterm] = rsq
        if history.max() - history.min() <= delrsq:
            return _correlation(phi, theta, target), rsq, iterations, True
    return _correlation(phi, theta, target), rsq, iterations, False


@njit(cache=True)
def _variable(v, nbins, cells, merge):
    """Bin geometry and bin of each observation of one variable."""
    # ties share a bin: any order of them gives the same bins
    return _sorted_variable(v, stable_argsort(v), nbins, cells, merge)


@njit(cache=True)
def _sorted_variable(v, order, nbins, cells, merge):
    """:func:`_variable` given the variable's sort order."""
    vs = v[order]
    edges = bin_edges(vs, nbins, cells, merge)
    return bin_geometry(vs, edges), bin_index(order, edges)


@njit(cache=True)
def _x_variables(x, x_kinds, nbins, cells):
    """Binned geometry ``list`` and bins ``(k, n)`` of every column of one problem."""
    return _ordered_variables(x, full_orders(x), x_kinds, nbins, cells)


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


@njit(cache=True)
def _ordered_variables(x, orders, x_kinds, nbins, cells):
    """:func:`_x_variables` of ``x`` ``(M, k)`` given its columns' sort orders."""
    n, k = x.shape
    bins = np.empty((k, n), np.int32)
    geos = []
    for j in range(k):
        merge = x_kinds[j] != LINEAR and x_kinds[j] != CATEGORICAL
        g, b = _sorted_variable(np.ascontiguousarray(x[:, j]), orders[j], nbins, cells, merge)
        geos.append(g)
        bins[j] = b
    return geos, bins


@njit(nogil=True, cache=True)
def _indexed_range(lo, hi, z, ys, y_orders, y_groups, channels, rows, images, subset, x_kinds,
                   y_kind, nbins, cells, delrsq, max_iter, alpha, rho, first, iterations,
                   converged):  # pragma: no cover - compiled
    n, k = ys.shape[1], z.shape[2]
    theta = np.empty(n)
    phi = np.empty((k, n))
    pos = np.full(z.shape[1] if subset else 0, -1, np.int64)
    y_merge = y_kind != LINEAR and y_kind != CATEGORICAL
    c_now = channels[lo]
    if subset:
        full = full_orders(z[c_now])
    else:
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
            if subset:
                full = full_orders(z[c])
            else:
                geos, bins = _x_variables(z[c], x_kinds, nbins, cells)
        if y_groups[r] != g_now:
            g_now = y_groups[r]
            edges = bin_edges(ys[r][y_orders[r]], nbins, cells, y_merge)
            yg = bin_geometry(ys[r][y_orders[r]], edges)
        if r != r_now:
            r_now = r
            yb = bin_index(y_orders[r], edges)
        if subset:  # the images of row r only: their orders filtered from the channel's
            x = gather_rows(z[c], images[r])
            geos, bins = _ordered_variables(x, subset_orders(full, images[r], pos),
                                            x_kinds, nbins, cells)
        else:
            x = z[c]
        v, _, it, ok = solve(x, ys[r], geos, bins, yg, yb, x_kinds, y_kind, delrsq,
                             max_iter, alpha, 3, theta, phi)
        rho[i] = v
        first[i] = _first_correlation(phi, theta)
        iterations[i] = it
        converged[i] = ok


def ace_indexed(z, ys, y_orders, y_groups, channels, rows, x_kinds, y_kind, nbins, cells,
                delrsq, max_iter, alpha, images=None):
    """Binned :func:`pcace.maxcorr.kernels.ace_indexed`: problems ``(z[c], ys[r])``.

    A channel's bins are made once for its consecutive problems, a response's bin
    geometry once per group of rows with equal sorted values (only each row's bin of
    every observation is new). ``images``: as for
    :func:`pcace.maxcorr.kernels.ace_indexed`.
    """
    b = channels.size
    subset = images is not None
    images = np.zeros((0, 0), np.int64) if images is None else images
    rho = np.empty(b)
    first = np.empty(b)
    iterations = np.empty(b, np.int64)
    converged = np.empty(b, np.bool_)
    parallel_ranges(_indexed_range, b, z, ys, y_orders, y_groups, channels, rows, images,
                    subset, x_kinds, np.int64(y_kind), np.int64(nbins), np.int64(cells),
                    float(delrsq), np.int64(max_iter), float(alpha), rho, first, iterations,
                    converged)
    return rho, first, iterations, converged
