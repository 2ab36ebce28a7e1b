"""Compiled dense linear algebra of the reduce step: Gram matrices and top eigenpairs.

One channel per thread (pcace's own threads, :mod:`pcace.core.threads`), each with
single-threaded BLAS/LAPACK calls (the caller limits BLAS to one thread). Torch's batched
``eigh`` and ``qr`` on stacks of small matrices pay a
parallel region per matrix on the CPU, which costs far more than the arithmetic (and
collapses when another process holds a core); its batched matrix product computes both
halves of a symmetric Gram matrix, where BLAS's ``syrk`` computes one.

BLAS/LAPACK routines come from scipy's ``cython_blas``/``cython_lapack`` and are bound by
symbol names registered in each process (not by addresses baked into the code), so the
compiled code can be cached. Fortran convention: every argument is a pointer; a C-order
``(n, p)`` array is the column-major ``p x n`` matrix.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
from numba import njit, types
from numba.extending import get_cython_function_address

from ..core.threads import parallel_ranges


def _bind(module: str, name: str, n_args: int) -> types.ExternalFunction:
    symbol = f"pcace_scipy_{name}"
    llvm.add_symbol(symbol, get_cython_function_address(f"scipy.linalg.{module}", name))
    return types.ExternalFunction(symbol, types.void(*([types.voidptr] * n_args)))


_dsyevx = _bind("cython_lapack", "dsyevx", 20)  # scipy's own wrapper holds the GIL
_ssyevx = _bind("cython_lapack", "ssyevx", 20)
_ssyrk = _bind("cython_blas", "ssyrk", 10)
_dsyrk = _bind("cython_blas", "dsyrk", 10)


def gram(x: np.ndarray, pixel_side: bool, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gram matrices of a C-contiguous float32/float64 ``(C, N, P)`` block, in float64.

    ``pixel_side=False``: ``x[c] @ x[c].T`` (``N x N``); ``True``: ``x[c].T @ x[c]``
    (``P x P``). BLAS ``syrk`` in the block's precision (one triangle), mirrored and
    widened to float64 into ``out``, a C-contiguous float64 ``(C, m, m)`` array (a buffer
    the caller may reuse: fresh memory costs page faults). Returns ``out`` and each
    matrix's participation ratio over its order,
    ``trace(G)^2 / (||G||_F^2 m)`` in ``[1/m, 1]``: near 1 for a flat spectrum (noise),
    small when a few eigenvalues dominate (accumulated while mirroring, so it is free).
    """
    c, n, p = x.shape
    m = p if pixel_side else n
    if m > min(n, p):
        raise ValueError("gram: the Gram side must be the smaller one")
    if out.shape != (c, m, m):
        raise ValueError("gram: out must have shape (C, m, m)")
    spread = np.zeros(c)
    parallel_ranges(_gram_range, c, x, bool(pixel_side), out, spread)
    return out, spread


@njit(nogil=True, cache=True)
def _gram_range(lo, hi, x, pixel_side, out, spread):  # pragma: no cover - compiled
    _, n, p = x.shape
    m = out.shape[1]
    single = x.itemsize == 4
    for ci in range(lo, hi):
        uplo = np.array([ord("U")], np.uint8)
        # column-major A = x[ci]^T (p x n): images side A^T A, pixel side A A^T
        trans = np.array([ord("N") if pixel_side else ord("T")], np.uint8)
        order = np.array([m], np.int32)
        inner = np.array([n if pixel_side else p], np.int32)
        lda = np.array([p], np.int32)
        alpha = np.ones_like(x[ci, 0, :1])  # in the block's dtype
        beta = np.zeros_like(alpha)
        g = np.zeros_like(x[ci, :m, :m])  # m <= min(n, p), checked above
        if single:
            _ssyrk(uplo.ctypes, trans.ctypes, order.ctypes, inner.ctypes, alpha.ctypes,
                   x[ci].ctypes, lda.ctypes, beta.ctypes, g.ctypes, order.ctypes)
        else:
            _dsyrk(uplo.ctypes, trans.ctypes, order.ctypes, inner.ctypes, alpha.ctypes,
                   x[ci].ctypes, lda.ctypes, beta.ctypes, g.ctypes, order.ctypes)
        # the column-major upper triangle is the C-order lower one: mirror it
        trace = 0.0
        squares = 0.0
        for i in range(m):
            for j in range(i):
                v = np.float64(g[i, j])
                out[ci, i, j] = v
                out[ci, j, i] = v
                squares += 2.0 * v * v
            v = np.float64(g[i, i])
            out[ci, i, i] = v
            trace += v
            squares += v * v
        spread[ci] = trace * trace / (squares * m) if squares > 0.0 else 1.0


def exact_top(g: np.ndarray, q: int, which: np.ndarray, vals: np.ndarray, vecs: np.ndarray,
              single: bool) -> np.ndarray:
    """Top ``q`` eigenpairs (descending) of the matrices ``g[which]``, by LAPACK's ``syevx``.

    Writes ``vals[i]`` (``(C, q)``) and ``vecs[i]`` (``(C, m, q)``) for each ``i`` in
    ``which``; returns LAPACK's ``info`` per listed matrix (0 = success). ``single``: solve
    in float32 (``ssyevx``), for Gram matrices that were computed in float32 (their values
    are exact in float32), else in float64 (``dsyevx``).
    """
    status = np.zeros(which.size, np.int32)
    parallel_ranges(_exact_range, which.size, g, np.int64(q), which, vals, vecs, bool(single),
                    status)
    return status


@njit(nogil=True, cache=True)
def _exact_range(lo, hi, g, q, which, vals, vecs, single, status):  # pragma: no cover
    m = g.shape[1]
    for t in range(lo, hi):
        ci = which[t]
        jobz = np.array([ord("V")], np.uint8)
        by_index = np.array([ord("I")], np.uint8)  # eigenvalues il..iu, ascending
        uplo = np.array([ord("L")], np.uint8)
        n = np.array([m], np.int32)
        il = np.array([m - q + 1], np.int32)
        iu = np.array([m], np.int32)
        found = np.zeros(1, np.int32)
        lwork = np.array([8 * m], np.int32)
        iwork = np.zeros(5 * m, np.int32)
        ifail = np.zeros(m, np.int32)
        info = np.zeros(1, np.int32)
        w = np.zeros(m)
        z = np.zeros((q, m))  # column-major m x q: row j is eigenvector j
        if single:
            a4 = g[ci].astype(np.float32)  # overwritten by LAPACK
            bounds4 = np.zeros(3, np.float32)  # vl, vu (unused), abstol (0: LAPACK's default)
            w4 = np.zeros(m, np.float32)
            z4 = np.zeros((q, m), np.float32)
            work4 = np.zeros(8 * m, np.float32)
            _ssyevx(jobz.ctypes, by_index.ctypes, uplo.ctypes, n.ctypes, a4.ctypes, n.ctypes,
                    bounds4[0:1].ctypes, bounds4[1:2].ctypes, il.ctypes, iu.ctypes,
                    bounds4[2:3].ctypes, found.ctypes, w4.ctypes, z4.ctypes, n.ctypes,
                    work4.ctypes, lwork.ctypes, iwork.ctypes, ifail.ctypes, info.ctypes)
            w[:] = w4
            z[:] = z4
        else:
            a8 = g[ci].copy()
            bounds8 = np.zeros(3)
            work8 = np.zeros(8 * m)
            _dsyevx(jobz.ctypes, by_index.ctypes, uplo.ctypes, n.ctypes, a8.ctypes, n.ctypes,
                    bounds8[0:1].ctypes, bounds8[1:2].ctypes, il.ctypes, iu.ctypes,
                    bounds8[2:3].ctypes, found.ctypes, w.ctypes, z.ctypes, n.ctypes,
                    work8.ctypes, lwork.ctypes, iwork.ctypes, ifail.ctypes, info.ctypes)
        status[t] = info[0]
        for j in range(q):
            vals[ci, j] = w[q - 1 - j]
            vecs[ci, :, j] = z[q - 1 - j]


@njit(cache=True)
def _ritz(g, basis, q):  # pragma: no cover - compiled
    """Rayleigh-Ritz on span(basis): descending Ritz values, vectors and rotation."""
    h = basis.T @ (g @ basis)
    h = 0.5 * (h + h.T)
    w, s = np.linalg.eigh(h)
    w = w[::-1].copy()
    s = s[:, ::-1].copy()
    return w, s


@njit(cache=True)
def _steps_to_converge(rate, error, target, most):  # pragma: no cover - compiled
    """Steps for an error shrinking by ``rate`` per step to reach ``target`` (1..most)."""
    if rate <= 0.0:
        return 1
    if rate >= 1.0:
        return most
    return min(most, max(1, int(np.ceil(np.log(target / error) / np.log(rate)))))


def top_eigenpairs_batch(g: np.ndarray, which: np.ndarray, start: np.ndarray, q: int,
                         tol: float, first: int, steps: int, max_rounds: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top ``q`` eigenpairs of the matrices ``g[which]`` (descending), and which converged.

    Returns ``vals`` ``(C, q)``, ``vecs`` ``(C, m, q)`` and ``done`` ``(C,)`` for all ``C``
    matrices; those not listed in ``which`` are left zero and not done. ``start`` is the
    ``(m, b)`` start block shared by all matrices; the first Rayleigh-Ritz check comes
    after ``first`` steps (short, to recognise flat spectra early, when they have not been
    sorted out before). After each check the iteration runs on ``G - sigma I`` with
    ``sigma`` half the block's last Ritz value (the middle of the unwanted part of the
    spectrum, as far as it is known: the error then shrinks by
    ``(w_b - sigma) / (w_q - sigma)`` per step instead of ``w_b / w_q``), and the next check
    comes when that rate predicts convergence, at most ``steps`` steps later. A matrix
    converges when every kept pair's residual ``||G v - w v||`` is at most ``tol * w_1``;
    a matrix whose predicted convergence is out of reach in the remaining rounds stops
    early, unconverged, for an exact solver.
    """
    c, m, _ = g.shape
    vals = np.zeros((c, q))
    vecs = np.zeros((c, m, q))
    done = np.zeros(c, np.bool_)
    parallel_ranges(_iterate_range, which.size, g, which, start, np.int64(q), float(tol),
                    np.int64(first), np.int64(steps), np.int64(max_rounds), vals, vecs, done)
    return vals, vecs, done


@njit(nogil=True, cache=True)
def _iterate_range(lo, hi, g, which, start, q, tol, first, steps, max_rounds, vals, vecs,
                   done):  # pragma: no cover - compiled
    m = g.shape[1]
    b = start.shape[1]
    tiny = np.finfo(np.float64).tiny
    for t in range(lo, hi):
        ci = which[t]
        a = g[ci]
        basis = np.ascontiguousarray(np.linalg.qr(a @ start)[0])
        shift = 0.0
        run = first
        for rnd in range(max_rounds):
            for _ in range(run):
                y = a @ basis
                if shift > 0.0:
                    y -= shift * basis
                basis = np.ascontiguousarray(np.linalg.qr(y)[0])
            w, s = _ritz(a, basis, q)
            v = basis @ np.ascontiguousarray(s[:, :q])
            av = a @ v
            top = max(abs(w[0]), tiny)
            worst = 0.0
            for j in range(q):
                r = 0.0
                for i in range(m):
                    d = av[i, j] - w[j] * v[i, j]
                    r += d * d
                worst = max(worst, np.sqrt(r))
            if worst <= tol * top:
                vals[ci] = w[:q]
                vecs[ci] = v
                done[ci] = True
                break
            shift = 0.5 * max(w[b - 1], 0.0)
            rate = shift / max(w[q - 1] - shift, tiny)
            left = steps * (max_rounds - rnd - 1)
            if rate ** left * worst / top > tol:
                break  # a flat spectrum: hand it to the exact solver now
            basis = np.ascontiguousarray(basis @ s)
            run = _steps_to_converge(rate, worst, tol * top, steps)


def packed_size(p: int) -> int:
    """Entries of the packed lower triangle of a ``P x P`` matrix, ``P (P + 1) / 2``."""
    return p * (p + 1) // 2


def accumulate_gram(x: np.ndarray, acc: np.ndarray, scratch: np.ndarray) -> None:
    """Add each channel's ``x[c].T @ x[c]`` into ``acc[c]``, its packed lower triangle.

    ``x``: C-contiguous ``(C, B, P)`` float32 or float64 (B images of P pixels); ``acc``:
    C-contiguous ``(C, P (P + 1) / 2)`` float64 running sums, row ``i`` of the lower
    triangle (``j <= i``) at offset ``i (i + 1) / 2``. BLAS
    ``ssyrk``/``dsyrk`` forms one batch's products in ``scratch`` (at least ``(C, P, P)``
    values of ``x``'s dtype), whose triangle is then added, so rounding accumulates in
    the data's precision over one batch only. Half the memory of full matrices.
    """
    c, _, p = x.shape
    if acc.shape != (c, packed_size(p)) or acc.dtype != np.float64:
        raise ValueError("accumulate_gram: acc must be (C, P (P + 1) / 2) float64")
    if scratch.dtype != x.dtype or scratch.size < c * p * p:
        raise ValueError("accumulate_gram: scratch must hold (C, P, P) values of x's dtype")
    parallel_ranges(_accumulate_range, c, x, acc, scratch)


@njit(nogil=True, cache=True)
def _accumulate_range(lo, hi, x, acc, scratch):  # pragma: no cover - compiled
    _, b, p = x.shape
    uplo = np.array([ord("U")], np.uint8)
    trans = np.array([ord("N")], np.uint8)  # column-major x[ci] is p x b: A A^T
    order = np.array([p], np.int32)
    inner = np.array([b], np.int32)
    lda = np.array([p], np.int32)
    for ci in range(lo, hi):
        alpha = np.ones_like(x[ci, 0, :1])
        beta = np.zeros_like(x[ci, 0, :1])
        g = scratch[ci * p * p:(ci + 1) * p * p].reshape((p, p))
        if x.itemsize == 8:
            _dsyrk(uplo.ctypes, trans.ctypes, order.ctypes, inner.ctypes, alpha.ctypes,
                   x[ci].ctypes, lda.ctypes, beta.ctypes, g.ctypes, order.ctypes)
        else:
            _ssyrk(uplo.ctypes, trans.ctypes, order.ctypes, inner.ctypes, alpha.ctypes,
                   x[ci].ctypes, lda.ctypes, beta.ctypes, g.ctypes, order.ctypes)
        a = acc[ci]
        k = 0
        for i in range(p):  # column-major upper triangle = C-order lower triangle
            for j in range(i + 1):
                a[k] += g[i, j]
                k += 1


def standardised_from_packed(packed: np.ndarray, d: np.ndarray, n: int, inv: np.ndarray,
                             out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Correlation-scale Gram matrices straight from shifted, packed cross products.

    Per channel ``c`` (rows of ``packed``, ``(C, P (P + 1) / 2)`` float64 sums of
    ``(x - s)(x - s)^T`` over ``n`` images, ``d = mean - s``, ``inv`` the inverse
    standard deviations, all ``(C, P)`` float64): writes the symmetric
    ``out[c] = diag(inv) (S - n d d^T) diag(inv)`` (``(C, P, P)`` float64) in one pass
    and returns its traces and squared Frobenius norms ``(C,)``. Replaces unpacking,
    centring, scaling and two reductions, each a pass over ``C P^2`` values.

    Examples
    --------
    >>> x = np.array([[1.0, 2.0], [3.0, 5.0], [2.0, 2.0]])
    >>> c = x - x.mean(0)
    >>> packed = np.array([[x[:, 0] @ x[:, 0], x[:, 1] @ x[:, 0], x[:, 1] @ x[:, 1]]])
    >>> out = np.empty((1, 2, 2))
    >>> tr, fro = standardised_from_packed(packed, x.mean(0)[None], 3, np.ones((1, 2)), out)
    >>> bool(np.allclose(out[0], c.T @ c)), float(tr[0]) == float(np.trace(out[0]))
    (True, True)
    """
    c, p = d.shape
    if packed.shape != (c, packed_size(p)) or out.shape[0] < c or out.shape[1:] != (p, p):
        raise ValueError("standardised_from_packed: shapes do not match")
    tr, fro = np.zeros(c), np.zeros(c)
    parallel_ranges(_standardised_range, c, packed, d, float(n), inv, out, tr, fro)
    return tr, fro


@njit(nogil=True, cache=True)
def _standardised_range(lo, hi, packed, d, n, inv, out, tr, fro):  # pragma: no cover
    p = d.shape[1]
    for c in range(lo, hi):
        src, dc, sc, g = packed[c], d[c], inv[c], out[c]
        k = 0
        t = 0.0
        f = 0.0
        for i in range(p):
            ndi, si = n * dc[i], sc[i]
            for j in range(i):
                v = (src[k] - ndi * dc[j]) * si * sc[j]
                g[i, j] = v
                g[j, i] = v
                f += 2.0 * v * v
                k += 1
            v = (src[k] - ndi * dc[i]) * si * si
            g[i, i] = v
            t += v
            f += v * v
            k += 1
        tr[c] = t
        fro[c] = f


def project_standardised(x: np.ndarray, mean: np.ndarray, inv: np.ndarray,
                         vectors: np.ndarray) -> np.ndarray:
    """Scores of standardised maps on per-channel axes, in float64, in one pass over ``x``.

    ``x``: C-contiguous ``(B, C, P)`` float32 or float64 maps as a layer produced them;
    ``mean``, ``inv``: ``(C, P)`` float64; ``vectors``: ``(C, P, W)`` float64. Returns
    ``out[b, c] = ((x[b, c] - mean[c]) * inv[c]) @ vectors[c]``, ``(B, C, W)`` float64,
    each product widened and summed in float64 (no transposed float64 copy of the batch).

    Examples
    --------
    >>> x = np.arange(12.0).reshape(2, 1, 6).astype(np.float32)
    >>> v = np.ones((1, 6, 1))
    >>> project_standardised(x, np.zeros((1, 6)), np.ones((1, 6)), v)[:, 0, 0].tolist()
    [15.0, 51.0]
    """
    b, c, p = x.shape
    w = vectors.shape[2]
    if mean.shape != (c, p) or inv.shape != (c, p) or vectors.shape[:2] != (c, p):
        raise ValueError("project_standardised: shapes do not match")
    out = np.zeros((b, c, w))
    parallel_ranges(_project_range, c, x, mean, inv, vectors, out)
    return out


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _project_range(lo, hi, x, mean, inv, vectors, out):  # pragma: no cover - compiled
    # sums reassociated (vectorised); NaN and inf still propagate (no nnan/ninf flags)
    b, _, p = x.shape
    w = vectors.shape[2]
    d = np.empty(p)
    for c in range(lo, hi):
        m, s = mean[c], inv[c]
        vt = np.ascontiguousarray(vectors[c].T)  # (W, P)
        for i in range(b):
            row = x[i, c]
            for j in range(p):
                d[j] = (np.float64(row[j]) - m[j]) * s[j]
            for k in range(w):
                axis = vt[k]
                acc = 0.0
                for j in range(p):
                    acc += d[j] * axis[j]
                out[i, c, k] = acc


def shift_and_summarise(x: np.ndarray, shift: np.ndarray, sums: np.ndarray, lo: np.ndarray,
                        hi: np.ndarray) -> bool:
    """Per channel of ``x`` ``(C, B, P)``: track each pixel's min and max, subtract ``shift``.

    ``x`` (float32 or float64, C-contiguous) is shifted in place by ``shift`` ``(C, P)``
    (its dtype); ``lo``/``hi`` ``(C, P)`` float64 take the running minimum and maximum of
    the unshifted values, ``sums`` ``(C, P)`` float64 the sums of the shifted ones (added
    in float64). One pass over memory. Returns False when a value is NaN or inf (nothing
    is then guaranteed about the outputs).
    """
    ok = np.ones(x.shape[0], np.bool_)
    parallel_ranges(_summarise_range, x.shape[0], x, shift, sums, lo, hi, ok)
    return bool(ok.all())


@njit(nogil=True, cache=True)
def _summarise_range(c0, c1, x, shift, sums, lo, hi, ok):  # pragma: no cover - compiled
    _, b, p = x.shape
    for c in range(c0, c1):
        s = sums[c]
        mn = lo[c]
        mx = hi[c]
        sh = shift[c]
        for i in range(b):
            row = x[c, i]
            for j in range(p):
                v = row[j]
                fv = np.float64(v)
                mn[j] = min(mn[j], fv)
                mx[j] = max(mx[j], fv)
                d = v - sh[j]
                row[j] = d
                s[j] += np.float64(d)
        for j in range(p):
            if not np.isfinite(s[j]):
                ok[c] = False


def standardise_columns(x: np.ndarray, mean: np.ndarray, std: np.ndarray, lo: np.ndarray,
                        hi: np.ndarray) -> None:
    """Per channel of ``x`` ``(C, m, P)``: each pixel's mean, spread and range over the ``m``
    rows; then the rows centred in place.

    ``x`` float32 or float64, C-contiguous. ``mean``, ``std`` (population), ``lo``, ``hi``
    ``(C, P)`` float64 are written (sums in float64; the spread from the centred values,
    so it does not cancel). The caller scales ``x`` once it has decided which pixels are
    constant. Three reads and one write of ``x``, the channels in parallel.

    Examples
    --------
    >>> x = np.array([[[1.0, 5.0], [3.0, 5.0]]])
    >>> mean, std, lo, hi = (np.empty((1, 2)) for _ in range(4))
    >>> standardise_columns(x, mean, std, lo, hi)
    >>> mean.tolist(), std.tolist(), x.tolist()
    ([[2.0, 5.0]], [[1.0, 0.0]], [[[-1.0, 0.0], [1.0, 0.0]]])
    """
    parallel_ranges(_columns_range, x.shape[0], x, mean, std, lo, hi)


@njit(nogil=True, cache=True)
def _columns_range(c0, c1, x, mean, std, lo, hi):  # pragma: no cover - compiled
    _, m, p = x.shape
    for c in range(c0, c1):
        s, mn, mx, sq = mean[c], lo[c], hi[c], std[c]
        for j in range(p):
            s[j] = 0.0
            sq[j] = 0.0
            mn[j] = np.inf
            mx[j] = -np.inf
        for i in range(m):
            row = x[c, i]
            for j in range(p):
                v = np.float64(row[j])
                s[j] += v
                mn[j] = min(mn[j], v)
                mx[j] = max(mx[j], v)
        for j in range(p):
            s[j] /= m
        for i in range(m):
            row = x[c, i]
            for j in range(p):
                d = np.float64(row[j]) - s[j]
                sq[j] += d * d
                row[j] = d
        for j in range(p):
            sq[j] = np.sqrt(sq[j] / m)
