"""Compiled CPU backend of ACE: one problem per thread, no Python in the loops.

This is the same algorithm as the batched torch backend (:mod:`pcace.maxcorr.smoothers`
and :func:`pcace.maxcorr.ace._run`), written as plain loops over one problem and
compiled with numba. Problems run in parallel over the CPU's cores, on pcace's own
threads (:mod:`pcace.core.threads`). The two
backends are independent implementations of one specification; the tests hold
them to agree to 1e-8.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..core.threads import parallel_ranges

ORDERED, MONOTONE, LINEAR, CATEGORICAL = 0, 1, 2, 3
KIND_CODES = {"ordered": ORDERED, "monotone": MONOTONE, "linear": LINEAR,
              "categorical": CATEGORICAL}

_SPANS = np.array([0.05, 0.2, 0.5])
_EPS = 1e-3
_SML = 1e-4
_BIG = 1e20
_LEVERAGE_FLOOR = 1e-6  # see pcace.maxcorr.smoothers


@njit(cache=True)
def _axis(xs):
    """Everything the smoothers reuse about one sorted abscissa."""
    n = xs.size
    xc = xs - xs[n // 2]  # centred at the median: see _anchored_sums
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
    widths = np.empty(3, np.int64)
    halves = np.empty(3, np.int64)
    x_mean = np.empty((3, n))
    inv_ss = np.empty((3, n))
    cv_scale = np.empty((3, n))
    px = np.empty(n + 1)
    pxx = np.empty(n + 1)
    _anchored_sums(xc, xc, px, pxx)
    for s in range(3):
        ibw = max(2, int(0.5 * _SPANS[s] * n + 0.5))
        width = min(2 * ibw + 1, n)
        widths[s] = width
        halves[s] = ibw
        for t in range(n):
            lo = min(max(t - ibw, 0), n - width)
            sx = px[lo + width] - px[lo]
            sxx = pxx[lo + width] - pxx[lo]
            m = sx / width
            ss = max(sxx - sx * m, 0.0)
            x_mean[s, t] = m
            inv = 1.0 / ss if ss > vsmlsq else 0.0
            inv_ss[s, t] = inv
            dev = xc[t] - m
            oml = 1.0 - (1.0 / width + dev * dev * inv)
            cv_scale[s, t] = 1.0 / oml if oml > _LEVERAGE_FLOOR else 0.0
    start = np.empty(n, np.int64)
    end = np.empty(n, np.int64)
    has_ties = False
    t = 0
    while t < n:
        t0 = t
        while t + 1 < n and xs[t + 1] <= xs[t]:
            t += 1
        if t > t0:
            has_ties = True
        for u in range(t0, t + 1):
            start[u] = t0
            end[u] = t + 1
        t += 1
    return xc, constant, widths, halves, x_mean, inv_ss, cv_scale, start, end, has_ties


@njit(cache=True)
def _tie_average(v, start, end, has_ties):
    if not has_ties:
        return v
    n = v.size
    p = np.empty(n + 1)
    _anchored_sums(v, v, p, np.empty(n + 1))  # as the torch backend's prefix
    out = np.empty(n)
    for t in range(n):
        out[t] = (p[end[t]] - p[start[t]]) / (end[t] - start[t])
    return out


@njit(cache=True)
def _anchored_sums(xc, y, py, pxy):
    """Running sums of ``y`` and ``xc * y`` (length n + 1), zero at the median's position
    and accumulated outwards from it.

    Every window sum is a difference of two of these. Accumulated from the middle, they
    hold only the values between a window and the middle, never an outlier on the far
    side, so the differences keep their digits when a variable spans many orders of
    magnitude (summed from one end, one value of 1e16 swamps every later window).
    """
    n = y.size
    mid = n // 2
    py[mid] = 0.0
    pxy[mid] = 0.0
    for t in range(mid, n):
        py[t + 1] = py[t] + y[t]
        pxy[t + 1] = pxy[t] + xc[t] * y[t]
    for t in range(mid - 1, -1, -1):
        py[t] = py[t + 1] - y[t]
        pxy[t] = pxy[t + 1] - xc[t] * y[t]



@njit(cache=True)
def _line_from_sums(ax, s, y, py, pxy, fit, resid, cross_validate):
    xc, _, widths, halves, x_mean, inv_ss, cv_scale, start, end, has_ties = ax
    n = y.size
    width = widths[s]
    ibw = halves[s]
    for t in range(n):
        lo = min(max(t - ibw, 0), n - width)
        sy = py[lo + width] - py[lo]
        sxy = pxy[lo + width] - pxy[lo]
        slope = (sxy - x_mean[s, t] * sy) * inv_ss[s, t]
        fit[t] = slope * (xc[t] - x_mean[s, t]) + sy / width
        if cross_validate:
            scale = cv_scale[s, t]
            resid[t] = abs(y[t] - fit[t]) * scale if scale != 0.0 else _BIG
    if has_ties:
        fit[:] = _tie_average(fit, start, end, has_ties)


@njit(cache=True)
def _running_line(ax, s, y, fit, resid, cross_validate):
    n = y.size
    py = np.empty(n + 1)
    pxy = np.empty(n + 1)
    _anchored_sums(ax[0], y, py, pxy)
    _line_from_sums(ax, s, y, py, pxy, fit, resid, cross_validate)


@njit(cache=True)
def _smooth_residuals(ax, resid, rpy, rpxy, out):
    """Leave-one-out residuals smoothed over the midrange span, into ``out``.

    A residual of _BIG (a point of leverage 1, see pcace.maxcorr.smoothers) is undefined:
    it stays out of the sums, and every point whose window holds one gets _BIG, so that
    span is not chosen there. Summed in, its 1e20 would leave only rounding noise in the
    windows around it.
    """
    n = resid.size
    counts = np.zeros(n + 1)
    for t in range(n):
        counts[t + 1] = counts[t] + (1.0 if resid[t] >= _BIG else 0.0)
    if counts[n] > 0:
        for t in range(n):
            if resid[t] >= _BIG:
                resid[t] = 0.0
    _anchored_sums(ax[0], resid, rpy, rpxy)
    _line_from_sums(ax, 1, resid, rpy, rpxy, out, resid, False)
    if counts[n] > 0:
        width = ax[2][1]
        ibw = ax[3][1]
        for t in range(n):
            lo = min(max(t - ibw, 0), n - width)
            if counts[lo + width] > counts[lo]:
                out[t] = _BIG


@njit(cache=True)
def _supersmoother(ax, y, alpha):
    n = y.size
    if ax[1]:
        return np.full(n, y.mean())
    fits = np.empty((3, n))
    cv = np.empty((3, n))
    resid = np.empty(n)
    py = np.empty(n + 1)  # the response's running sums serve all three spans
    pxy = np.empty(n + 1)
    _anchored_sums(ax[0], y, py, pxy)
    rpy = np.empty(n + 1)
    rpxy = np.empty(n + 1)
    for s in range(3):
        _line_from_sums(ax, s, y, py, pxy, fits[s], resid, True)
        _smooth_residuals(ax, resid, rpy, rpxy, cv[s])
    spans = best_spans(cv, alpha)
    smoothed = np.empty(n)
    _running_line(ax, 1, spans, smoothed, resid, False)
    mixed = mix_spans(smoothed, fits)
    out = np.empty(n)
    _running_line(ax, 0, mixed, out, resid, False)
    return out


@njit(cache=True)
def best_spans(cv, alpha):
    """Per point, the span with the smallest cross-validated residual ``cv`` (3, n),
    moved towards the woofer by the bass enhancement ``alpha`` (acepack's rule).

    Shared by the exact engine and binned ACE (:mod:`pcace.maxcorr.binned_smoothers`).
    """
    n = cv.shape[1]
    spans = np.empty(n)
    power = 10.0 - alpha
    whole = power == np.floor(power) and 0.0 <= power <= 10.0  # pow() is the slow part
    for t in range(n):
        resmin = cv[0, t]
        span = _SPANS[0]
        for s in range(1, 3):
            if cv[s, t] < resmin:
                resmin = cv[s, t]
                span = _SPANS[s]
        if 0.0 < alpha <= 10.0 and resmin < cv[2, t]:
            woofer = cv[2, t] if cv[2, t] != 0 else 1.0
            base = max(_SML, resmin / woofer)
            if whole:
                factor = 1.0
                for _ in range(int(power)):
                    factor *= base
            else:
                factor = base ** power
            span += (_SPANS[2] - span) * factor
        spans[t] = span
    return spans


@njit(cache=True)
def mix_spans(smoothed, fits):
    """Per point, the fits (3, n) of the two spans around its smoothed span, interpolated."""
    n = smoothed.size
    mixed = np.empty(n)
    for t in range(n):
        sp = min(max(smoothed[t], _SPANS[0]), _SPANS[2])
        if sp < _SPANS[1]:
            f = (_SPANS[1] - sp) / (_SPANS[1] - _SPANS[0])
            mixed[t] = (1 - f) * fits[1, t] + f * fits[0, t]
        else:
            f = (sp - _SPANS[1]) / (_SPANS[2] - _SPANS[1])
            mixed[t] = (1 - f) * fits[1, t] + f * fits[2, t]
    return mixed


@njit(cache=True)
def _isotonic(v):
    """Least-squares non-decreasing fit (pool adjacent violators)."""
    n = v.size
    level = np.empty(n)
    weight = np.empty(n)
    count = 0
    for t in range(n):
        level[count] = v[t]
        weight[count] = 1.0
        count += 1
        while count > 1 and level[count - 2] > level[count - 1]:
            w = weight[count - 2] + weight[count - 1]
            level[count - 2] = (level[count - 2] * weight[count - 2]
                                + level[count - 1] * weight[count - 1]) / w
            weight[count - 2] = w
            count -= 1
    out = np.empty(n)
    t = 0
    for c in range(count):
        for _ in range(int(weight[c])):
            out[t] = level[c]
            t += 1
    return out


@njit(cache=True)
def _ramp_flat_runs(v):
    n = v.size
    out = v.copy()
    j = 0
    while j < n:
        j0 = j
        while j + 1 < n and out[j + 1] == out[j]:
            j += 1
        if j > j0:
            a = 0.5 * (out[j0] - out[j0 - 1]) if j0 > 0 else 0.0
            b = 0.5 * (out[j + 1] - out[j]) if j < n - 1 else 0.0
            d = (a + b) / (j - j0)
            if a == 0.0 or b == 0.0:
                d *= 2.0
            if a == 0.0:
                a = b
            for i in range(j0, j + 1):
                out[i] = out[i] - a + d * (i - j0)
        j += 1
    return out


@njit(cache=True)
def _smooth(kind, ax, y, alpha):
    xc, constant, _, _, _, _, _, start, end, has_ties = ax
    n = y.size
    if kind == CATEGORICAL:
        if has_ties:
            return _tie_average(y, start, end, has_ties)
        return y.copy()
    if kind == LINEAR:
        xm = xc - xc.mean()  # xc is centred at the median (see _anchored_sums)
        ss = 0.0
        sxy = 0.0
        for t in range(n):
            ss += xm[t] * xm[t]
            sxy += xm[t] * y[t]
        slope = sxy / ss if ss > 0 else 0.0
        return slope * xm
    fit = _supersmoother(ax, y, alpha)
    if kind == MONOTONE:
        up = _isotonic(fit)
        down = _isotonic(fit[::-1])[::-1]
        if np.sum((fit - up) ** 2) < np.sum((fit - down) ** 2):
            fit = _ramp_flat_runs(up)
        else:
            fit = _ramp_flat_runs(down)
        fit = _tie_average(fit, start, end, has_ties)
    return fit


@njit(nogil=True, cache=True)
def sort_rows(lo, hi, ys, rows, out):  # pragma: no cover - compiled
    """``out[i] = stable_argsort(ys[rows[i]])`` for ``lo <= i < hi`` (for
    :func:`pcace.core.threads.parallel_ranges`)."""
    for i in range(lo, hi):
        out[i] = stable_argsort(ys[rows[i]])


#: From this many values on, :func:`stable_argsort` radix-sorts (3.8x faster than
#: mergesort at 50,000 float64 values, slower below about a thousand).
RADIX_MIN = 1000


@njit(cache=True)
def stable_argsort(v):
    """The stable sort order of a finite float64 vector: ``np.argsort(v, kind="stable")``.

    An LSD radix sort (8 bits a pass, a pass skipped where every key shares its byte) on
    the values' bits mapped to order-preserving unsigned keys (-0.0 taken as 0.0) from
    :data:`RADIX_MIN` values on, numpy's mergesort below. The same order as mergesort
    (``tests/test_ace.py``), so every sort in ACE may use either.
    """
    n = v.size
    if n < RADIX_MIN:
        return np.argsort(v, kind="mergesort")
    keys = np.empty(n, np.uint64)
    bits = np.ascontiguousarray(v).view(np.uint64)
    sign = np.uint64(1) << np.uint64(63)
    for i in range(n):
        b = np.uint64(0) if v[i] == 0.0 else bits[i]
        keys[i] = ~b if b & sign else b | sign
    order = np.arange(n)
    other = np.empty(n, np.int64)
    spare = np.empty(n, np.uint64)
    counts = np.empty(256, np.int64)
    for shift in range(0, 64, 8):
        sh = np.uint64(shift)
        counts[:] = 0
        for i in range(n):
            counts[(keys[i] >> sh) & np.uint64(255)] += 1
        if counts.max() == n:
            continue
        total = 0
        for d in range(256):
            c = counts[d]
            counts[d] = total
            total += c
        for i in range(n):
            d = (keys[i] >> sh) & np.uint64(255)
            p = counts[d]
            counts[d] = p + 1
            other[p] = order[i]
            spare[p] = keys[i]
        order, other = other, order
        keys, spare = spare, keys
    return order


@njit(cache=True)
def _x_axes(x):
    """Sort orders and smoother axes of every column of one problem's ``x`` (n, k)."""
    orders = full_orders(x)
    return orders, _axes_of(x, orders)


@njit(cache=True)
def _axes_of(x, orders):
    """The smoother axes of the columns of ``x`` (n, k) sorted by ``orders`` (k, n)."""
    axes = []
    for j in range(x.shape[1]):
        axes.append(_axis(x[orders[j], j]))
    return axes


@njit(cache=True)
def _one(x, y, x_kinds, y_kind, delrsq, max_iter, alpha, nterm,
         theta, phi):
    orders, axes = _x_axes(x)
    y_order = stable_argsort(y)
    y_ax = _axis(y[y_order])
    return _solve(x, y, orders, axes, y_order, y_ax, x_kinds, y_kind, delrsq, max_iter,
                  alpha, nterm, theta, phi)


@njit(cache=True)
def _solve(x, y, orders, axes, y_order, y_ax, x_kinds, y_kind, delrsq, max_iter, alpha,
           nterm, theta, phi):
    """One problem given the sorted axes of its columns and of its response."""
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
        phi[:, j] = xc[:, j] * coef[j]

    rsq = 0.0
    history = np.full(nterm, 100.0)
    iterations = 0
    converged = False
    degenerate = False
    target = np.empty(n)
    target_s = np.empty(n)
    resid = np.empty(n)
    for it in range(1, max_iter + 1):
        iterations = it
        for nit in range(1, max_iter + 1):
            rsq_start = rsq
            for t in range(n):
                resid[t] = theta[t] - phi[t].sum()
            for j in range(k):
                order = orders[j]
                for t in range(n):
                    target[t] = resid[t] + phi[t, j]
                for t in range(n):
                    target_s[t] = target[order[t]]
                if axes[j][1]:  # constant column: nothing to fit
                    fit_s = np.zeros(n)
                else:
                    fit_s = _smooth(x_kinds[j], axes[j], target_s, alpha)
                    fit_s = fit_s - fit_s.mean()
                sv = 1.0 - np.mean((target_s - fit_s) ** 2)
                if sv > rsq:
                    rsq = sv
                    for t in range(n):
                        phi[order[t], j] = fit_s[t]
                        resid[order[t]] = target_s[t] - fit_s[t]
            if rsq - rsq_start <= delrsq or nit >= max_iter or k == 1:
                break
        total = np.empty(n)
        for t in range(n):
            total[t] = phi[t].sum()
        for t in range(n):
            target_s[t] = total[y_order[t]]
        fit_s = _smooth(y_kind, y_ax, target_s, alpha)
        fit_s = fit_s - fit_s.mean()
        var = np.mean(fit_s ** 2)
        if var <= 0:
            degenerate = True
            break
        scale = 1.0 / np.sqrt(var)
        for t in range(n):
            theta[y_order[t]] = fit_s[t] * scale
        rsq = 1.0 - np.mean((theta - total) ** 2)
        history[(it - 1) % nterm] = rsq
        if history.max() - history.min() <= delrsq:
            converged = True
            break

    if degenerate:
        return 0.0, 0.0, iterations, True
    total = np.empty(n)
    for t in range(n):
        total[t] = phi[t].sum()
    tc = total - total.mean()
    hc = theta - theta.mean()
    denom = np.sqrt(np.sum(tc * tc) * np.sum(hc * hc))
    rho = np.sum(tc * hc) / denom if denom > 0 else 0.0
    return rho, rsq, iterations, converged


@njit(nogil=True, cache=True)
def _ace_range(lo, hi, x, y, x_kinds, y_kind, delrsq, max_iter, alpha, rho, rsq, theta, phi,
               iterations, converged):  # pragma: no cover - compiled
    for i in range(lo, hi):
        r, q, it, c = _one(x[i], y[i], x_kinds, y_kind, delrsq, max_iter, alpha, 3,
                           theta[i], phi[i])
        rho[i] = r
        rsq[i] = q
        iterations[i] = it
        converged[i] = c


def ace_batch(x, y, x_kinds, y_kind, delrsq, max_iter, alpha):
    """Solve ``b`` problems: ``x`` (b, n, k), ``y`` (b, n), float64, already validated."""
    b, n, k = x.shape
    rho = np.empty(b)
    rsq = np.empty(b)
    iterations = np.empty(b, np.int64)
    converged = np.empty(b, np.bool_)
    theta = np.empty((b, n))
    phi = np.empty((b, n, k))
    parallel_ranges(_ace_range, b, x, y, x_kinds, np.int64(y_kind), float(delrsq),
                    np.int64(max_iter), float(alpha), rho, rsq, theta, phi, iterations,
                    converged)
    return rho, rsq, theta, phi, iterations, converged


@njit(cache=True)
def _first_correlation(phi, theta):
    """``|corr(phi[:, 0], theta)|``, 0 where one side is constant."""
    a = phi[:, 0] - phi[:, 0].mean()
    b = theta - theta.mean()
    den = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return abs(np.sum(a * b) / den) if den > 0 else 0.0


@njit(nogil=True, cache=True)
def _indexed_range(lo, hi, z, ys, y_orders, y_groups, channels, rows, images, subset, x_kinds,
                   y_kind, delrsq, max_iter, alpha, rho, first, iterations,
                   converged):  # pragma: no cover - compiled
    n, k = ys.shape[1], z.shape[2]
    theta = np.empty(n)
    phi = np.empty((n, k))
    pos = np.full(z.shape[1] if subset else 0, -1, np.int64)
    c_now = channels[lo]
    if subset:
        full = full_orders(z[c_now])
    else:
        orders, axes = _x_axes(z[c_now])
    g_now = y_groups[rows[lo]]
    y_ax = _axis(ys[rows[lo]][y_orders[rows[lo]]])
    for i in range(lo, hi):
        c, r = channels[i], rows[i]
        if c != c_now:
            c_now = c
            if subset:
                full = full_orders(z[c])
            else:
                orders, axes = _x_axes(z[c])
        if y_groups[r] != g_now:
            g_now = y_groups[r]
            y_ax = _axis(ys[r][y_orders[r]])
        if subset:  # the images of row r only: their orders filtered from the channel's
            x = gather_rows(z[c], images[r])
            orders = subset_orders(full, images[r], pos)
            axes = _axes_of(x, orders)
        else:
            x = z[c]
        v, _, it, ok = _solve(x, ys[r], orders, axes, y_orders[r], y_ax, x_kinds, y_kind,
                              delrsq, max_iter, alpha, 3, theta, phi)
        rho[i] = v
        first[i] = _first_correlation(phi, theta)
        iterations[i] = it
        converged[i] = ok


@njit(cache=True)
def full_orders(x):
    """``(k, N)`` stable sort orders of the columns of ``x`` ``(N, k)``."""
    n, k = x.shape
    out = np.empty((k, n), np.int64)
    for j in range(k):
        out[j] = stable_argsort(x[:, j])
    return out


@njit(cache=True)
def gather_rows(x, idx):
    """``x[idx]`` for ``x`` ``(N, k)``, contiguous."""
    out = np.empty((idx.size, x.shape[1]))
    for t in range(idx.size):
        out[t] = x[idx[t]]
    return out


@njit(cache=True)
def subset_orders(full, idx, pos):
    """Sort orders ``(k, M)`` of the rows ``idx`` (ascending) of a matrix whose columns'
    stable orders are ``full`` ``(k, N)``: the full orders filtered in ``O(N)``, equal to
    a stable sort of the subset. ``pos`` is ``(N,)`` scratch, all -1 (left so)."""
    k, n = full.shape
    m = idx.size
    for t in range(m):
        pos[idx[t]] = t
    out = np.empty((k, m), np.int64)
    for j in range(k):
        t = 0
        for u in range(n):
            p = pos[full[j, u]]
            if p >= 0:
                out[j, t] = p
                t += 1
    for t in range(m):
        pos[idx[t]] = -1
    return out


def ace_indexed(z, ys, y_orders, y_groups, channels, rows, x_kinds, y_kind, delrsq,
                max_iter, alpha, images=None):
    """Problems ``(z[channels[i]], ys[rows[i]])`` without gathering them.

    ``y_orders`` holds each row's stable sort order, ``y_groups`` a label per row, equal
    for consecutive rows whose sorted values are equal (permutations of one score).
    Consecutive problems that share a channel share its sorted axes, and those whose rows
    share a group share the response's axis: the sorting and smoother set-up of a
    permutation null is done once per channel, not once per permutation.

    ``images`` ``(R, M)`` (ascending rows): problem ``i`` sees the images
    ``images[rows[i]]`` of ``z[channels[i]]`` only (``ys`` is then ``(R, M)``); a
    channel's columns are sorted once over all its images for its consecutive problems,
    and each subset's orders filtered from them.
    """
    b = channels.size
    subset = images is not None
    images = np.zeros((0, 0), np.int64) if images is None else images
    rho = np.empty(b)
    first = np.empty(b)
    iterations = np.empty(b, np.int64)
    converged = np.empty(b, np.bool_)
    parallel_ranges(_indexed_range, b, z, ys, y_orders, y_groups, channels, rows, images,
                    subset, x_kinds, np.int64(y_kind), float(delrsq), np.int64(max_iter),
                    float(alpha), rho, first, iterations, converged)
    return rho, first, iterations, converged
