"""Per-channel standardisation and PCA, batched over channels.

:func:`principal_components` turns the activation maps of a stack of channels
into the first principal-component scores of each channel, the input that
:func:`pcace.ace` correlates with the score. It is pure tensors in, tensors
out, and knows nothing about models.

For channel ``c`` the maps form an ``N x P`` matrix ``M`` (images x pixel
positions). Each column is standardised across the images (mean 0, population
variance 1, as sklearn's ``StandardScaler``); a constant column carries nothing
and is set to 0. The PCA is exact: the top eigenpairs of the Gram matrix on the
smaller side (``N x N`` when ``P >= N``, else the ``P x P`` covariance).

How it is computed
------------------
:func:`reduce_block` works on a channel-major ``(C, N, P)`` block, in place: the
pipeline's activation store hands it the captured activations themselves, so a
layer held in RAM is never copied. On the CPU a compiled kernel standardises the
block in two memory passes (column statistics accumulated in float64), BLAS
``syrk`` forms the Gram matrices in the block's precision, and the eigenproblems
are solved in float64: block subspace iteration with Rayleigh-Ritz checks, one
matrix per thread (:mod:`pcace.reduce.kernels`), until every kept pair's residual
is below ``1e-12`` (float64 data) or ``1e-8`` (float32 data) of the largest
eigenvalue; matrices whose spectrum is too flat for that (noise) go to LAPACK's
subset solver, in the precision the Gram matrix was computed in.
:func:`principal_components` is the same on an ``(N, C, ...)`` tensor it first
copies (float64 by default).

Precision: a float32 block (the pipeline's default) gives values within float32's own
accuracy of an all-float64 computation; ACE's discrete choices (spans, when to stop) can
occasionally move a value more. The measured agreement is in ``benchmarks/README.md``
("Pipeline": float32 against float64).

Cost: ``C * N * min(N, P) * (P + min(N, P))`` for the Gram matrices, plus the
eigenproblems (cheap when the spectrum falls off, as on natural images; dearer when it
is flat). Memory beyond the block: the Gram matrices, ``(C, m, m)`` in the block's
precision and in float64. Timings: ``benchmarks/README.md``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.validation import components as check_components
from ..core.validation import maps as check_maps
from .standardise import NonFiniteMaps

__all__ = ["NonFiniteMaps", "Reduction", "principal_components", "reduce_block",
           "reusing_buffers", "top_eigenpairs"]

#: A column is constant when its spread is below this many ulps of its magnitude.
CONSTANT_ULPS = 8.0

#: Participation ratio over the order, ``trace(G)^2 / (||G||_F^2 m)``, above which a Gram
#: matrix goes straight to the exact solver: subspace iteration cannot converge on so flat
#: a spectrum. Measured on ResNet-18's layers (random weights, 300 images): every matrix
#: the iteration solved had at most 0.24 (natural images), every one it gave up on at
#: least 0.57 (noise images). A wrong call costs time, not correctness (the exact solver
#: is as accurate as the precision the Gram matrix was computed in).
FLAT_SPREAD = 0.4


@dataclass
class Reduction:
    """Principal-component scores of a stack of channels.

    Attributes
    ----------
    scores : torch.Tensor
        ``(C, N, k_max)``: the first principal-component scores of each channel
        (what ``PCA(n_components=k).fit_transform`` returns on the standardised
        maps, with a deterministic sign). Columns beyond a channel's
        ``n_components`` are 0.
    n_components : torch.Tensor
        ``(C,)`` long: components kept per channel (0 for a dead channel).
    explained_variance : torch.Tensor
        ``(C,)`` float: fraction of the channel's total standardised variance
        that the kept components explain (0 for a dead channel).
    dead : torch.Tensor
        ``(C,)`` bool: the channel is constant over all images (every pixel
        column constant); its scores are all 0.
    """

    scores: torch.Tensor
    n_components: torch.Tensor
    explained_variance: torch.Tensor
    dead: torch.Tensor


def principal_components(
    maps: torch.Tensor,
    components: int | float = 3,
    *,
    max_components: int = 10,
    dtype: torch.dtype = torch.float64,
) -> Reduction:
    """Standardise each channel's pixel columns and keep its first principal components.

    Parameters
    ----------
    maps : torch.Tensor
        Activations of ``C`` channels over ``N`` images, shape ``(N, C, H, W)``
        or ``(N, C, P)``. Not modified. A NumPy array is accepted too.
    components : int or float, default 3
        An int ``k >= 1``: keep ``k`` components per channel (a channel with
        fewer usable components, rank below ``k``, gets zero columns). A float
        in ``(0, 1)``: per channel, the smallest ``k`` whose cumulative
        explained-variance ratio reaches it (``>=``; sklearn's ``PCA`` asks for
        ``>``, which differs only on exact ties), capped at ``max_components``.
    max_components : int, default 10
        Cap on ``k`` when ``components`` is a fraction.
    dtype : torch.dtype, default torch.float64
        Working precision, ``torch.float64`` or ``torch.float32`` (about twice as
        fast and half the memory; see the module notes for the difference).

    Returns
    -------
    Reduction
        ``scores`` ``(C, N, k_max)`` in ``dtype``, with ``k_max = components``
        for an int, or the largest per-channel ``k`` for a fraction;
        ``n_components``, ``explained_variance`` and ``dead``, each ``(C,)``.

    Notes
    -----
    Standardisation uses the population variance (ddof = 0). A column is
    constant when its maximum equals its minimum, or its standard deviation is
    below ``8 * eps(dtype) * max|column|``; it is set to 0. Components whose
    eigenvalue is below ``max(N, P) * eps(dtype) * largest eigenvalue`` count
    as unusable (rank deficiency). Sign rule: each component is flipped so that
    its score vector is positive at its largest-magnitude entry (the first such
    entry on ties).

    Examples
    --------
    >>> import torch
    >>> maps = torch.randn(50, 4, 6, 6)
    >>> red = principal_components(maps, components=3)
    >>> tuple(red.scores.shape), red.n_components.tolist()
    ((4, 50, 3), [3, 3, 3, 3])
    """
    x_in = check_maps(maps)
    check_components(components, max_components)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
    n, c, p = x_in.shape
    block = torch.empty((c, n, p), dtype=dtype, device=x_in.device)
    block.copy_(x_in.permute(1, 0, 2))
    return reduce_block(block, components, max_components=max_components)


def reduce_block(block: torch.Tensor, components: int | float = 3, *,
                 max_components: int = 10) -> Reduction:
    """:func:`principal_components` of a ``(C, N, P)`` block, standardised in place.

    The pipeline keeps activations channel-major, so a layer's channels arrive as one
    contiguous ``(C, N, P)`` block; this works on it directly instead of copying it.

    Parameters
    ----------
    block : torch.Tensor
        ``(C, N, P)`` (channels x images x pixel positions), float32 or float64, on any
        device. **Overwritten** with the standardised values. Its dtype is the precision
        of the standardisation and of the Gram matrices; the eigenproblems are solved in
        float64 either way.
    components, max_components
        As for :func:`principal_components`.

    Returns
    -------
    Reduction
        As :func:`principal_components`; ``scores`` are float64.

    Examples
    --------
    >>> import torch
    >>> block = torch.randn(4, 50, 36)
    >>> reduce_block(block, 2).scores.shape
    torch.Size([4, 50, 2])
    """
    k_fixed, fraction = check_components(components, max_components)
    if block.ndim != 3 or block.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"block must be a (C, N, P) float32 or float64 tensor; got "
                         f"{tuple(block.shape)} {block.dtype}")
    c, n_img, n_pix = block.shape
    if n_img < 2:
        raise ValueError(f"the block needs at least 2 images (second axis); got {n_img}")
    x = block if block.is_contiguous() else block.contiguous()
    constant = _standardise_(x)
    dead = constant.all(dim=1)
    wanted_q = k_fixed if fraction is None else max_components
    eigvals, vectors, total, gram_side = _eigen(x, wanted_q)  # top eigvals (C, q) descending
    total = total.clamp(min=0)
    rank = numerical_rank(eigvals, max(n_img, n_pix), x.dtype)
    n_comp, width = components_kept(eigvals, total, rank, dead, k_fixed, fraction,
                                    max_components)

    scores = _scores(x, eigvals, vectors, gram_side, width)
    keep = torch.arange(width, device=scores.device)[None, :] < n_comp[:, None]  # (C, width)
    scores *= keep[:, None, :].to(scores.dtype)
    fix_signs(scores)

    r = eigvals.shape[1]
    kept = eigvals[:, : min(width, r)].clamp(min=0) * keep[:, : min(width, r)]
    explained = torch.where(total > 0, kept.sum(dim=1) / torch.where(total > 0, total, 1), 0)
    return Reduction(scores=scores, n_components=n_comp, explained_variance=explained, dead=dead)


def _standardise_(x: torch.Tensor) -> torch.Tensor:
    """Standardise the columns of a contiguous ``(C, N, P)`` block in place.

    Returns the ``(C, P)`` mask of constant columns (set to 0).
    """
    if x.device.type == "cpu":
        from .standardise import standardise_

        return standardise_(x, CONSTANT_ULPS)
    return _standardise_torch(x)


def _standardise_torch(x: torch.Tensor) -> torch.Tensor:
    """The device-generic torch version of :func:`_standardise_` (used on GPUs)."""
    n = x.shape[1]
    lo, hi = torch.aminmax(x, dim=1)  # (C, P)
    mean = x.mean(dim=1, dtype=torch.float64)
    if not bool(torch.isfinite(mean).all()):
        raise NonFiniteMaps((~torch.isfinite(mean)).any(dim=1).nonzero().flatten().tolist())
    x.sub_(mean[:, None, :].to(x.dtype))
    std = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).div_(n ** 0.5)
    scale = torch.maximum(hi.abs(), lo.abs()).to(torch.float64)
    constant = (hi <= lo) | (std <= CONSTANT_ULPS * torch.finfo(x.dtype).eps * scale)
    inv = torch.where(constant, 0.0, 1.0 / torch.where(constant, 1.0, std))
    x.mul_(inv[:, None, :].to(x.dtype))
    return constant


def _eigen(x: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Top ``q`` eigenpairs of the smaller Gram side (descending) and each Gram's trace."""
    n, p = x.shape[1], x.shape[2]
    gram_side = p >= n
    if x.device.type == "cpu":
        from .kernels import gram

        m = min(n, p)
        with one_blas_thread():
            g, spread = gram(x.numpy(), not gram_side, _buffer((x.shape[0], m, m)))
        g, flat = torch.from_numpy(g), torch.from_numpy(spread > FLAT_SPREAD)
    else:
        if gram_side:
            g = torch.bmm(x, x.transpose(1, 2)).to(torch.float64)  # (C, N, N)
        else:
            g = torch.bmm(x.transpose(1, 2), x).to(torch.float64)  # (C, P, P)
        flat = None
    # the eigenproblem in float64 whatever the data's precision; no point iterating far
    # below the precision the Gram matrices carry
    tol = 1e-12 if x.dtype == torch.float64 else 1e-8
    total = g.diagonal(dim1=1, dim2=2).sum(-1)
    vals, vecs = top_eigenpairs(g, q, tol=tol, exact_dtype=x.dtype, flat=flat)
    return vals, vecs, total, gram_side


_STEPS = 6  # subspace-iteration steps between Rayleigh-Ritz checks
_FIRST = 2  # steps before the first check: a flat spectrum is given up on early
_EXTRA = 6  # block size beyond the q pairs wanted (measured: 6 beats 4, 8 and 12)


def top_eigenpairs(g: torch.Tensor, q: int, *, tol: float = 1e-12, max_rounds: int = 10,
                   exact_dtype: torch.dtype = torch.float64, flat: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``q`` largest eigenpairs of a batch of symmetric PSD matrices, descending.

    A dense ``eigh`` of every ``m x m`` Gram matrix costs most of the reduce step when
    ``m`` is in the hundreds, yet only a few components are kept. This runs block subspace
    iteration (block ``q + 6``, shifted after the first Rayleigh-Ritz check, the next check
    where the predicted error reaches ``tol``, at most 6 steps on) until each kept pair's
    residual ``||G v - lambda v||`` is below ``tol * lambda_1``; matrices that cannot get
    there within ``max_rounds`` checks (a flat spectrum, judged from the Ritz values) go to
    an exact solver (LAPACK's subset ``evx`` on the CPU). Small matrices (``m <= 96``) go
    straight to the exact solver (a full ``eigh`` on a GPU). On the CPU each matrix runs
    on one thread (compiled); on a GPU the same iteration runs batched in torch. Results
    are float64 on the CPU.
    ``exact_dtype=torch.float32`` lets the exact solver for flat spectra work in float32
    on the CPU (about 1.5x faster), for Gram matrices whose values came from float32.
    ``flat``, a ``(C,)`` bool mask, sends the marked matrices to the exact solver without
    trying the iteration (the CPU path; see :data:`FLAT_SPREAD`).
    Deterministic: the start block is drawn from a fixed seed.

    Examples
    --------
    >>> import torch
    >>> a = torch.randn(4, 300, 500, dtype=torch.float64)
    >>> g = a @ a.transpose(1, 2)
    >>> vals, vecs = top_eigenpairs(g, 3)
    >>> exact = torch.linalg.eigvalsh(g).flip(-1)[:, :3]
    >>> bool(torch.allclose(vals, exact, rtol=1e-10))
    True
    """
    c, m, _ = g.shape
    q = min(q, m)
    small = m <= 96 or 4 * (q + _EXTRA) >= m
    if g.device.type == "cpu":
        return _top_cpu(g, q, small, tol, max_rounds, exact_dtype == torch.float32, flat)
    return _top_torch(g, q, small, tol, max_rounds)


def _top_torch(g: torch.Tensor, q: int, small: bool, tol: float,
               max_rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The device-generic path of :func:`top_eigenpairs`: batched torch (used on GPUs)."""
    c, m, _ = g.shape
    if small:
        return _exact_top_torch(g, q)
    block = q + _EXTRA
    start = _start_block(m, block).to(g)
    basis = torch.linalg.qr(torch.bmm(g, start.expand(c, m, block)))[0]
    vals = torch.empty((c, q), dtype=g.dtype, device=g.device)
    vecs = torch.empty((c, m, q), dtype=g.dtype, device=g.device)
    todo = torch.arange(c, device=g.device)
    finished = torch.zeros(c, dtype=torch.bool, device=g.device)
    sub = g
    shift = torch.zeros((c, 1, 1), dtype=g.dtype, device=g.device)
    run = _STEPS
    for round_ in range(max_rounds):
        for _ in range(run):  # on G - shift I, as the compiled iteration
            basis = torch.linalg.qr(torch.bmm(sub, basis) - shift * basis)[0]
        w, s = torch.linalg.eigh(torch.bmm(basis.transpose(1, 2), torch.bmm(sub, basis)))
        w, s = w.flip(-1), s.flip(-1)
        v = torch.bmm(basis, s[:, :, :q])
        resid = (torch.bmm(sub, v) - v * w[:, None, :q]).norm(dim=1)
        top = w[:, :1].abs().clamp(min=torch.finfo(g.dtype).tiny)
        done = (resid <= tol * top).all(dim=1)
        vals[todo[done]], vecs[todo[done]] = w[done, :q], v[done]
        finished[todo[done]] = True
        # the error shrinks by about (w_block - shift) / (w_q - shift) per step: hand flat
        # spectra to the exact solver at once instead of iterating in vain
        half = 0.5 * w[:, -1].clamp(min=0)
        rate = half / (w[:, q - 1] - half).clamp(min=torch.finfo(g.dtype).tiny)
        left = _STEPS * (max_rounds - round_ - 1)
        error = resid.amax(dim=1)
        keep = ~done & (rate.pow(left) * error / top[:, 0] <= tol)
        todo, basis, shift = todo[keep], torch.bmm(basis, s)[keep], half[keep, None, None]
        if todo.numel() == 0:
            break
        sub = g[todo]
        need = torch.log(tol * top[keep, 0] / error[keep]) / torch.log(rate[keep])
        need = torch.where(rate[keep] > 0, need, 1.0)
        run = int(need.nan_to_num(_STEPS).clamp(1, _STEPS).ceil().max())
    missing = (~finished).nonzero().flatten()
    if missing.numel():
        vals[missing], vecs[missing] = _exact_top_torch(g[missing], q)
    return vals, vecs


def _start_block(m: int, block: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(m, block, generator=gen, dtype=torch.float64)


def _top_cpu(g: torch.Tensor, q: int, small: bool, tol: float, max_rounds: int,
             single: bool = False, flat: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU path of :func:`top_eigenpairs`: compiled, one matrix per thread."""
    from .kernels import top_eigenpairs_batch

    mats = g.to(torch.float64).contiguous().numpy()
    with one_blas_thread():
        if small:  # LAPACK's subset solver: 2x faster than a full eigh at m = 49
            vals, vecs = np.zeros((len(mats), q)), np.zeros((len(mats), g.shape[1], q))
            _exact_into(mats, q, np.arange(len(mats)), vals, vecs)
            return torch.from_numpy(vals), torch.from_numpy(vecs)
        start = _start_block(g.shape[1], q + _EXTRA).numpy()
        iterate = np.arange(len(mats)) if flat is None else np.flatnonzero(~np.asarray(flat))
        vals, vecs, done = top_eigenpairs_batch(mats, iterate, start, q, tol, _FIRST, _STEPS,
                                                max_rounds)
        missing = np.flatnonzero(~done)
        if missing.size:
            _exact_into(mats, q, missing, vals, vecs, single)
    return torch.from_numpy(vals), torch.from_numpy(vecs)


def _exact_into(mats: np.ndarray, q: int, which: np.ndarray, vals: np.ndarray,
                vecs: np.ndarray, single: bool = False) -> None:
    """Exact top-``q`` eigenpairs of ``mats[which]`` into ``vals``/``vecs`` (LAPACK evx)."""
    from .kernels import exact_top

    status = exact_top(mats, q, which, vals, vecs, single)
    for i in which[status != 0]:  # LAPACK did not converge (never seen): full solver
        w, v = np.linalg.eigh(mats[i])
        vals[i], vecs[i] = w[::-1][:q], v[:, ::-1][:, :q]


def _exact_top_torch(g: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``q`` eigenpairs, descending, by a full ``eigh`` (the GPU path)."""
    vals, vecs = torch.linalg.eigh(g)
    return vals.flip(-1)[:, :q], vecs.flip(-1)[:, :, :q]


_REUSE = threading.local()


@contextmanager
def reusing_buffers() -> Iterator[None]:
    """Reuse one float64 buffer for the Gram matrices of successive blocks (this thread).

    Fresh memory costs a page fault per 4 KiB on first touch, which adds up over the
    thousands of Gram matrices of a network (measured: 0.35 s of system time on
    ResNet-18). The buffer is freed when the context exits; results do not depend on it.
    """
    outer = getattr(_REUSE, "buffer", None)
    _REUSE.buffer = np.empty(0)
    try:
        yield
    finally:
        _REUSE.buffer = outer


def _buffer(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised float64 array; inside :func:`reusing_buffers`, the reused buffer."""
    held = getattr(_REUSE, "buffer", None)
    size = int(np.prod(shape))
    if held is None:
        return np.empty(shape)
    if held.size < size:
        held = _REUSE.buffer = np.empty(size)
    return held[:size].reshape(shape)


_BLAS_CONTROLLER: Any = None


def one_blas_thread() -> Any:
    """A context with one BLAS thread for the compiled solvers (each thread runs one matrix).

    Threaded BLAS inside them would oversubscribe the cores, and is 100x slower while
    torch's OpenMP threads spin after a torch call (measured on 2 cores). The controller
    is built once: finding the loaded BLAS libraries costs tens of milliseconds.
    """
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


def numerical_rank(eigvals: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    top = eigvals[:, :1].clamp(min=0)
    tol = size * torch.finfo(dtype).eps * top
    return ((eigvals > tol) & (eigvals > 0)).sum(dim=1)


def components_kept(eigvals: torch.Tensor, total: torch.Tensor, rank: torch.Tensor,
                    dead: torch.Tensor, k_fixed: int, fraction: float | None,
                    max_components: int) -> tuple[torch.Tensor, int]:
    """Components kept per channel (``(C,)``) and the width of the score tensor.

    ``k_fixed`` components (or, with ``fraction``, the fewest that explain that share of
    the variance, at most ``max_components``), never more than the numerical rank; none
    for a dead channel. The width is ``k_fixed``, or the largest count kept.
    """
    if fraction is None:
        wanted = torch.full_like(rank, k_fixed)
    else:
        wanted = k_for_fraction(eigvals, total, fraction, max_components)
    n_comp = torch.minimum(wanted, rank)
    n_comp[dead] = 0
    width = k_fixed if fraction is None else max(int(n_comp.max()), 1)
    return n_comp, width


def k_for_fraction(eigvals: torch.Tensor, total: torch.Tensor, fraction: float,
                    max_components: int) -> torch.Tensor:
    ratio = eigvals.clamp(min=0) / torch.where(total > 0, total, 1)[:, None]
    reached = torch.cumsum(ratio, dim=1) >= fraction
    # the first index where the cumulative ratio reaches the fraction, + 1
    k = torch.where(reached.any(dim=1), reached.to(torch.int8).argmax(dim=1) + 1,
                    eigvals.shape[1])
    return k.clamp(max=max_components).to(torch.long)


def _scores(x: torch.Tensor, eigvals: torch.Tensor, vectors: torch.Tensor, gram_side: bool,
            width: int) -> torch.Tensor:
    c, n = x.shape[0], x.shape[1]
    r = min(width, eigvals.shape[1])
    out = torch.zeros((c, n, width), dtype=torch.float64, device=x.device)
    if gram_side:  # X = U S V^T, scores = U S
        out[:, :, :r] = vectors[:, :, :r] * eigvals[:, None, :r].clamp(min=0).sqrt()
    else:  # scores = X V
        out[:, :, :r] = torch.bmm(x, vectors[:, :, :r].to(x.dtype).contiguous())
    return out


def fix_signs(scores: torch.Tensor) -> None:
    """Flip each column so its largest-magnitude entry is positive (in place)."""
    idx = scores.abs().argmax(dim=1, keepdim=True)  # (C, 1, k)
    pick = scores.gather(1, idx)
    scores *= torch.where(pick < 0, -1.0, 1.0).to(scores.dtype)
