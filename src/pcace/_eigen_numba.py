"""Top eigenpairs of many small symmetric matrices, one matrix per thread (compiled).

Torch's batched ``eigh`` and ``qr`` on stacks of small matrices pay a parallel region per
matrix on the CPU, which costs far more than the arithmetic (and collapses when another
process holds a core). Here each thread runs block subspace iteration with Rayleigh-Ritz
checks on one Gram matrix, with single-threaded BLAS/LAPACK calls.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import _ace_numba  # noqa: F401 - sets numba's threading layer before first use


@njit(cache=True)
def _ritz(g, basis, q):  # pragma: no cover - compiled
    """Rayleigh-Ritz on span(basis): descending Ritz values, vectors and rotation."""
    h = basis.T @ (g @ basis)
    h = 0.5 * (h + h.T)
    w, s = np.linalg.eigh(h)
    w = w[::-1].copy()
    s = s[:, ::-1].copy()
    return w, s


@njit(parallel=True, cache=True)
def top_eigenpairs_batch(g, start, q, tol, steps, max_rounds):  # pragma: no cover - compiled
    """Top ``q`` eigenpairs of each ``g[c]`` (descending) and whether each converged.

    ``start`` is the ``(m, b)`` start block shared by all matrices. A matrix converges
    when every kept pair's residual ``||G v - w v||`` is at most ``tol * w_1``; a matrix
    whose predicted convergence (from the ratio of the last Ritz value to the ``q``-th)
    is out of reach in the remaining steps stops early, unconverged, for an exact solver.
    """
    c, m, _ = g.shape
    b = start.shape[1]
    vals = np.zeros((c, q))
    vecs = np.zeros((c, m, q))
    done = np.zeros(c, np.bool_)
    tiny = np.finfo(np.float64).tiny
    for ci in prange(c):
        a = g[ci]
        basis, _ = np.linalg.qr(a @ start)
        for rnd in range(max_rounds):
            for _ in range(steps):
                basis, _ = np.linalg.qr(a @ basis)
            w, s = _ritz(a, basis, q)
            v = basis @ s[:, :q]
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
            rate = max(w[b - 1], 0.0) / max(w[q - 1], tiny)
            left = steps * (max_rounds - rnd - 1)
            if rate ** left * worst / top > tol:
                break  # a flat spectrum: hand it to the exact solver now
            basis = basis @ s
    return vals, vecs, done


@njit(parallel=True, cache=True)
def full_top(g, q):  # pragma: no cover - compiled
    """Top ``q`` eigenpairs of each (small) ``g[c]`` from a full eigendecomposition."""
    c, m, _ = g.shape
    vals = np.zeros((c, q))
    vecs = np.zeros((c, m, q))
    for ci in prange(c):
        w, v = np.linalg.eigh(g[ci])
        for j in range(q):
            vals[ci, j] = w[m - 1 - j]
            vecs[ci, :, j] = v[:, m - 1 - j]
    return vals, vecs
