"""Alternating conditional expectations (Breiman & Friedman 1985), batched.

:func:`ace` estimates the maximal correlation between a response and a set of
predictors: it finds transformations ``theta(y)`` and ``phi_1(x_1) ... phi_k(x_k)``
that maximise ``corr(theta(y), sum_j phi_j(x_j))``. It runs many independent
problems at once (a leading batch axis), on CPU or CUDA, and follows the
iteration of R's ``acepack`` (Friedman's Fortran), whose answers it reproduces.

The engine knows nothing about neural networks; :mod:`pcace.rank` feeds it the
principal components of each channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.validation import MIN_OBSERVATIONS
from .binning import resolve_bins, split_bins
from .smoothers import KINDS, SortedAxis, smooth


@dataclass
class AceResult:
    """Result of :func:`ace`. Arrays gain a leading batch axis for batched calls.

    Attributes
    ----------
    rho : array
        ``corr(theta(y), sum_j phi_j(x_j))``, the maximal-correlation estimate.
    rsq : array
        ``1 - E[(theta - sum_j phi_j)^2]``, as acepack reports it.
    theta : array
        The response transformation, standardised, shape ``(n,)``.
    phi : array
        The predictor transformations, centred, shape ``(n, k)``.
    iterations : array
        Outer iterations used.
    converged : array
        Whether the change criterion was met before the iteration cap.
    """

    rho: Any
    rsq: Any
    theta: Any
    phi: Any
    iterations: Any
    converged: Any


def _as_tensor(a: Any, name: str) -> tuple[torch.Tensor, bool]:
    if isinstance(a, torch.Tensor):
        return a, True
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric array or tensor: {err}") from None
    return torch.from_numpy(arr), False


def _kinds(spec: str | Sequence[str], k: int, name: str) -> list[str]:
    kinds = [spec] * k if isinstance(spec, str) else list(spec)
    if len(kinds) != k:
        raise ValueError(f"{name} names {len(kinds)} kinds for {k} columns of x")
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"{name}: unknown kind {kind!r}; expected one of {KINDS}")
    return kinds


def _settings(x_kind: str | Sequence[str], k: int, y_kind: str, delrsq: float,
              max_iter: int) -> list[str]:
    """Check the iteration settings of :func:`ace`; return the kind of each of ``k`` columns."""
    x_kinds = _kinds(x_kind, k, "x_kind")
    if y_kind not in KINDS:
        raise ValueError(f"y_kind: unknown kind {y_kind!r}; expected one of {KINDS}")
    if not delrsq > 0:
        raise ValueError(f"delrsq must be > 0 (acepack's default is 0.01); got {delrsq}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1; got {max_iter}")
    return x_kinds


def _kind_codes(x_kinds: list[str]) -> np.ndarray:
    """The compiled engine's codes of the column kinds."""
    from . import kernels as nb

    return np.array([nb.KIND_CODES[kind] for kind in x_kinds], dtype=np.int64)


def _locations(mask: torch.Tensor, batched: bool) -> str:
    """Describe where ``mask`` is set: problem indices for a batch, else rows/columns."""
    hits = torch.nonzero(mask).cpu().tolist()
    if batched:
        problems = sorted({h[0] for h in hits})
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        return f"in problems {problems[:10]}{more}"
    if mask.ndim == 3:  # x: (1, n, k)
        cells = [(h[1], h[2]) for h in hits]
        more = f" (and {len(cells) - 5} more)" if len(cells) > 5 else ""
        return f"at (row, column) {', '.join(map(str, cells[:5]))}{more}"
    rows = [h[1] for h in hits]
    more = f" (and {len(rows) - 10} more)" if len(rows) > 10 else ""
    return f"at rows {rows[:10]}{more}"


def _valid_on_host(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether CPU data are finite with a varying response, checked in NumPy (torch's
    threaded reductions can take a hundred times longer on a loaded machine)."""
    if x.device.type != "cpu" or y.device.type != "cpu":
        return False
    xn, yn = x.detach().numpy(), y.detach().numpy()
    return bool(np.isfinite(xn).all() and np.isfinite(yn).all()
                and (yn.max(axis=1) > yn.min(axis=1)).all())


def _check(x: torch.Tensor, y: torch.Tensor, batched: bool) -> None:
    n = x.shape[1]
    if n < MIN_OBSERVATIONS:
        raise ValueError(f"ACE needs at least {MIN_OBSERVATIONS} observations; got {n}")
    if _valid_on_host(x, y):
        return
    for name, values in (("x", x), ("y", y)):
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            raise ValueError(f"{name} holds NaN or inf {_locations(bad, batched)}; "
                             "drop or impute those observations")
    constant = y.amax(dim=1) <= y.amin(dim=1)
    if bool(constant.any()):
        where = f" {_locations(constant[:, None], True)}" if batched else ""
        raise ValueError(f"y is constant{where}; ACE needs a response that varies")


def _standardise(v: torch.Tensor) -> torch.Tensor:
    v = v - v.mean(dim=-1, keepdim=True)
    sd = v.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return v / torch.where(sd > 0, sd, 1.0)


class _Problems:
    """The sorted data of a batch of ACE problems, shared by all iterations."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, x_kinds: list[str], y_kind: str):
        self.b, self.n, self.k = x.shape
        self.x_kinds, self.y_kind = x_kinds, y_kind
        self.x_order = []
        self.x_axes = []
        for j in range(self.k):
            xs, order = torch.sort(x[:, :, j], dim=1, stable=True)
            self.x_order.append(order)
            self.x_axes.append(SortedAxis(xs))
        ys, self.y_order = torch.sort(y, dim=1, stable=True)
        self.y_axis = SortedAxis(ys)


def _take_sorted(v: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return v.gather(1, order)


def _unsort(v_sorted: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(v_sorted)
    out.scatter_(1, order, v_sorted)
    return out


def _initial_phi(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """acepack's start: centred x, scaled by the least-squares fit of theta on them."""
    xc = x - x.mean(dim=1, keepdim=True)
    gram = xc.transpose(1, 2) @ xc
    coef = torch.linalg.pinv(gram) @ (xc.transpose(1, 2) @ theta[:, :, None])
    return xc * coef.transpose(1, 2)


def _run(p: _Problems, x: torch.Tensor, y: torch.Tensor, delrsq: float, max_iter: int,
         alpha: float, nterm: int = 3):
    b, _n, k = p.b, p.n, p.k
    dtype = x.dtype
    theta = _standardise(y)
    phi = _initial_phi(x, theta)
    rsq = torch.zeros(b, dtype=dtype, device=x.device)
    history = torch.full((b, nterm), 100.0, dtype=dtype, device=x.device)
    iterations = torch.zeros(b, dtype=torch.long, device=x.device)
    converged = torch.zeros(b, dtype=torch.bool, device=x.device)
    degenerate = torch.zeros(b, dtype=torch.bool, device=x.device)
    active = torch.ones(b, dtype=torch.bool, device=x.device)

    for it in range(1, max_iter + 1):
        iterations = torch.where(active, it, iterations)
        inner = active.clone()
        for nit in range(1, max_iter + 1):
            rsq_start = rsq.clone()
            resid = theta - phi.sum(dim=2)
            for j in range(k):
                order, axis = p.x_order[j], p.x_axes[j]
                target = resid + phi[:, :, j]
                target_s = _take_sorted(target, order)
                fit_s = smooth(p.x_kinds[j], axis, target_s, alpha)
                fit_s = fit_s - fit_s.mean(dim=1, keepdim=True)
                sv = 1.0 - (target_s - fit_s).pow(2).mean(dim=1)
                accept = inner & (sv > rsq)
                fit = _unsort(fit_s, order)
                rsq = torch.where(accept, sv, rsq)
                phi[:, :, j] = torch.where(accept[:, None], fit, phi[:, :, j])
                resid = torch.where(accept[:, None], target - fit, resid)
            done = (rsq - rsq_start <= delrsq) | (nit >= max_iter) | (k == 1)
            inner = inner & ~done
            if not bool(inner.any()):
                break

        total = phi.sum(dim=2)
        total_s = _take_sorted(total, p.y_order)
        fit_s = smooth(p.y_kind, p.y_axis, total_s, alpha)
        fit_s = fit_s - fit_s.mean(dim=1, keepdim=True)
        var = fit_s.pow(2).mean(dim=1)
        flat = active & (var <= 0)
        degenerate |= flat
        update = active & ~flat
        new_theta = _unsort(fit_s / torch.where(var > 0, var, 1.0).sqrt()[:, None], p.y_order)
        theta = torch.where(update[:, None], new_theta, theta)
        new_rsq = 1.0 - (theta - total).pow(2).mean(dim=1)
        rsq = torch.where(update, new_rsq, rsq)
        slot = (it - 1) % nterm
        history[:, slot] = torch.where(update, rsq, history[:, slot])
        spread = history.amax(dim=1) - history.amin(dim=1)
        now_converged = update & (spread <= delrsq)
        converged |= now_converged
        active = active & ~now_converged & ~flat
        if not bool(active.any()):
            break

    total = phi.sum(dim=2)
    tc = total - total.mean(dim=1, keepdim=True)
    hc = theta - theta.mean(dim=1, keepdim=True)
    denom = (tc.pow(2).sum(dim=1) * hc.pow(2).sum(dim=1)).sqrt()
    rho = torch.where(denom > 0, (tc * hc).sum(dim=1) / torch.where(denom > 0, denom, 1.0), 0.0)
    rho = torch.where(degenerate, torch.zeros_like(rho), rho)
    rsq = torch.where(degenerate, torch.zeros_like(rsq), rsq)
    converged |= degenerate
    return rho, rsq, theta, phi, iterations, converged


def _solve_numba(x: torch.Tensor, y: torch.Tensor, x_kinds: list[str], y_kind: str,
                 delrsq: float, max_iter: int, alpha: float,
                 bins: int | None = None) -> tuple[torch.Tensor, ...]:
    from . import binned
    from . import kernels as nb

    codes = _kind_codes(x_kinds)
    xn = np.ascontiguousarray(x.detach().cpu().numpy())
    yn = np.ascontiguousarray(y.detach().cpu().numpy())
    if bins is None:
        out = nb.ace_batch(xn, yn, codes, nb.KIND_CODES[y_kind], float(delrsq), int(max_iter),
                           float(alpha))
    else:
        out = binned.ace_batch(xn, yn, codes, nb.KIND_CODES[y_kind], *split_bins(bins),
                               float(delrsq), int(max_iter), float(alpha))
    return tuple(torch.from_numpy(o).to(x.device) for o in out)


def ace(
    x: Any,
    y: Any,
    *,
    x_kind: str | Sequence[str] = "ordered",
    y_kind: str = "ordered",
    delrsq: float = 0.01,
    max_iter: int = 20,
    alpha: float = 5.0,
    dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    bins: str | int | None = "auto",
) -> AceResult:
    """Estimate the maximal correlation of ``y`` with ``x`` by ACE.

    Parameters
    ----------
    x : array_like or torch.Tensor
        Predictors: ``(n,)`` or ``(n, k)`` for one problem, ``(b, n, k)`` for a batch.
    y : array_like or torch.Tensor
        Response: ``(n,)``, or ``(b, n)`` for a batch. A ``(n,)`` response with a batched
        ``x`` is shared by all problems (the PCACE case).
    x_kind : str or sequence of str
        How each predictor may be transformed: ``"ordered"`` (any smooth function, the
        default), ``"monotone"``, ``"linear"`` or ``"categorical"`` (one value per level).
        One kind for all columns, or one per column.
    y_kind : str
        The same choice for the response.
    delrsq : float
        Convergence tolerance: iterations stop once ``rsq`` has changed by less than this over
        three outer iterations (acepack's ``delrsq``, default 0.01).
    max_iter : int
        Cap on outer and inner iterations (acepack: 20).
    alpha : float
        The supersmoother's bass enhancement; acepack's ``ace`` runs it with 5.
    dtype : torch.dtype, optional
        Compute precision. Default float64. ``torch.float32`` is faster on GPUs; on the acepack
        fixtures it changes ``rho`` by at most about 1e-5 (measured on CPU).
    chunk_size : int, optional
        Solve a large batch this many problems at a time to bound memory (torch backend).
    backend : {"auto", "numba", "torch"}
        ``"numba"``: compiled loops, one problem per CPU thread (float64 only); the default
        for NumPy input. ``"torch"``: batched tensor operations on the input's device; the
        default for tensor input. Both implement the same algorithm and agree to 1e-8.
    bins : "auto", int or None
        Binned smoothing for large n (compiled engine): each variable is cut once into at
        most ``bins`` bins (half of equal counts, half of equal width; tied values share a
        bin) and every smoother runs on the bins, weighted by their counts
        (:mod:`pcace.maxcorr.binned`). ``"auto"`` (default): 1,000 bins from n = 2,500
        on, exact ACE below (unchanged). None: always exact. An int >= 20: at most that
        many bins (exact when it is at least n). On PCACE problems (ResNet-20 channels,
        N = 2,500, 5,000 and 50,000) the 99th percentile of ``|rho - rho_exact|`` is at
        most 4e-4, 3e-3 against permuted scores, at 1.8 to 4.5 times the speed
        (benchmarks/README.md, "Binned ACE"). The torch backend computes exact ACE; an
        explicit int with ``backend="torch"`` is an error.

    Returns
    -------
    AceResult
        NumPy arrays for NumPy input; torch tensors on the input's device for tensor input.

    Raises
    ------
    ValueError
        Fewer than 10 observations, NaN or inf anywhere, mismatched shapes, a constant
        response, or a bad ``bins``; the message names the problems or rows concerned. A
        constant predictor
        column is not an error: its transformation is 0, and a problem whose predictors are
        all constant has ``rho = 0``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.uniform(-1, 1, 200)
    >>> r = ace(x, x ** 2)
    >>> bool(r.rho > 0.95)
    True
    >>> rb = ace(rng.normal(size=(4, 100, 3)), rng.normal(size=100))
    >>> rb.rho.shape
    (4,)
    """
    xt, yt, batched, as_torch, compute = _shaped(x, y, dtype)
    _check(xt, yt, batched)
    x_kinds = _settings(x_kind, xt.shape[2], y_kind, delrsq, max_iter)
    if backend == "auto":
        backend = "torch" if as_torch else "numba"
    if backend not in ("numba", "torch"):
        raise ValueError(f"backend must be 'auto', 'numba' or 'torch'; got {backend!r}")
    nbins = resolve_bins(bins, xt.shape[1])
    if backend == "numba":
        if compute != torch.float64:
            raise ValueError("the numba backend computes in float64 only; use backend='torch' "
                             "for other precisions")
        rho, rsq, theta, phi, iterations, converged = _solve_numba(xt, yt, x_kinds, y_kind,
                                                                   delrsq, max_iter, alpha,
                                                                   nbins)
    else:
        if bins != "auto" and nbins is not None:
            raise ValueError(f"bins={bins!r} needs the compiled engine (backend='numba', "
                             "NumPy input); the torch backend computes exact ACE: use "
                             "bins=None or 'auto' with it")
        rho, rsq, theta, phi, iterations, converged = _solve_torch(
            xt, yt, x_kinds, y_kind, delrsq, max_iter, alpha, chunk_size)

    out = [rho, rsq, theta, phi, iterations, converged]
    if not batched:
        out = [t[0] for t in out]
    if not as_torch:
        out = [t.cpu().numpy() for t in out]
        if not batched:
            out = [o.item() if o.ndim == 0 else o for o in out]
    return AceResult(*out)


def _shaped(x: Any, y: Any, dtype: torch.dtype | None
            ) -> tuple[torch.Tensor, torch.Tensor, bool, bool, torch.dtype]:
    """``x`` as ``(b, n, k)`` and ``y`` as ``(b, n)`` tensors in the compute precision, on
    the input's device; whether the call was batched, whether it returns torch, the dtype."""
    xt, x_is_tensor = _as_tensor(x, "x")
    yt, y_is_tensor = _as_tensor(y, "y")
    as_torch = x_is_tensor or y_is_tensor
    device = xt.device if x_is_tensor else (yt.device if y_is_tensor else torch.device("cpu"))
    compute = dtype or torch.float64
    xt = xt.to(device=device, dtype=compute)
    yt = yt.to(device=device, dtype=compute)

    batched = xt.ndim == 3
    if xt.ndim == 1:
        xt = xt[:, None]
    if xt.ndim not in (2, 3):
        raise ValueError(f"x must have shape (n,), (n, k) or (b, n, k); got {tuple(xt.shape)}")
    if not batched:
        if yt.ndim != 1:
            raise ValueError(f"y must have shape (n,) for one problem; got {tuple(yt.shape)}")
        xt, yt = xt[None], yt[None]
    else:
        if yt.ndim == 1:
            yt = yt.expand(xt.shape[0], -1)
        elif yt.ndim != 2 or yt.shape[0] != xt.shape[0]:
            raise ValueError(f"y must have shape (n,) or (b, n) = ({xt.shape[0]}, n) for x of "
                             f"shape {tuple(xt.shape)}; got {tuple(yt.shape)}")
    if yt.shape[1] != xt.shape[1]:
        raise ValueError(f"x has {xt.shape[1]} observations but y has {yt.shape[1]}")
    if xt.shape[2] < 1:
        raise ValueError("x has no columns")
    return xt, yt, batched, as_torch, compute


def _solve_torch(xt: torch.Tensor, yt: torch.Tensor, x_kinds: list[str], y_kind: str,
                 delrsq: float, max_iter: int, alpha: float, chunk_size: int | None
                 ) -> tuple[torch.Tensor, ...]:
    """The batched torch engine, ``chunk_size`` problems at a time."""
    b = xt.shape[0]
    step = chunk_size or b
    parts = []
    with torch.no_grad():
        for s in range(0, b, step):
            xs, ys = xt[s:s + step].contiguous(), yt[s:s + step].contiguous()
            problems = _Problems(xs, ys, x_kinds, y_kind)
            parts.append(_run(problems, xs, ys, delrsq, max_iter, alpha))
    return tuple(torch.cat(t) for t in zip(*parts, strict=True))


def response_orders(ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable sort order of each response row, and labels that join equal sorted rows.

    Consecutive rows whose sorted values are equal (permutations of one score) get the
    same label: :func:`ace_shared` then sets up their smoother axis once.

    Examples
    --------
    >>> orders, groups = response_orders(np.array([[3.0, 1, 2], [1.0, 2, 3], [0.0, 5, 1]]))
    >>> orders[0].tolist(), groups.tolist()
    ([1, 2, 0], [0, 0, 1])
    """
    orders = np.argsort(ys, axis=1, kind="stable")
    groups = np.zeros(len(ys), dtype=np.int64)
    previous = None
    for r in range(len(ys)):
        current = ys[r][orders[r]]
        same = previous is not None and np.array_equal(current, previous)
        groups[r] = groups[r - 1] if same else (groups[r - 1] + 1 if r else 0)
        previous = current
    return orders, groups


def _checked_images(images: np.ndarray | None, ys: np.ndarray, n: int) -> np.ndarray | None:
    """``images`` as int64, checked: ``ys``'s shape, each row ascending indices below ``n``."""
    if images is None:
        return None
    images = np.ascontiguousarray(images, dtype=np.int64)
    if images.shape != ys.shape or (images.size and (
            images.min() < 0 or images.max() >= n or (np.diff(images, axis=1) <= 0).any())):
        raise ValueError("images must be (R, m) like ys, each row ascending indices into z's "
                         "images")
    return images


def _check_shared(z: np.ndarray, ys: np.ndarray, used_x: np.ndarray,
                  used_y: np.ndarray) -> None:
    """:func:`_check` for shared data, one channel and row at a time (no copies of ``z``)."""
    if ys.shape[1] < MIN_OBSERVATIONS:
        raise ValueError(f"ACE needs at least {MIN_OBSERVATIONS} observations; got "
                         f"{ys.shape[1]}")
    bad_x = [int(c) for c in used_x if not np.isfinite(z[c]).all()]
    bad_y = [int(r) for r in used_y if not np.isfinite(ys[r]).all()]
    for name, bad, what in (("x", bad_x, "channels"), ("y", bad_y, "score rows")):
        if bad:
            raise ValueError(f"{name} holds NaN or inf in {what} {bad[:10]}; drop or impute "
                             "those observations")
    constant = [int(r) for r in used_y if ys[r].max() <= ys[r].min()]
    if constant:
        raise ValueError(f"y is constant in score rows {constant[:10]}; ACE needs a response "
                         "that varies")


def ace_shared(
    z: np.ndarray,
    ys: np.ndarray,
    channels: np.ndarray,
    rows: np.ndarray,
    *,
    x_kind: str | Sequence[str] = "ordered",
    y_kind: str = "ordered",
    delrsq: float = 0.01,
    max_iter: int = 20,
    alpha: float = 5.0,
    orders: tuple[np.ndarray, np.ndarray] | None = None,
    bins: str | int | None = "auto",
    images: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """ACE over problems that share their data: ``x = z[channels[i]]``, ``y = ys[rows[i]]``.

    :func:`ace`'s answers (compiled CPU engine) without gathering the problems, each
    channel's and response's sorting and smoother set-up done once for consecutive
    problems sharing them (a permutation null, or many targets per channel).

    Parameters
    ----------
    z : numpy.ndarray
        ``(C, n, k)`` float64 predictors.
    ys : numpy.ndarray
        ``(R, n)`` float64 responses.
    channels, rows : numpy.ndarray
        ``(b,)`` indices of each problem's predictors and response. Problems of one
        channel should be consecutive (channel-major order) to share the set-up.
    x_kind, y_kind, delrsq, max_iter, alpha, bins
        As for :func:`ace` (binned problems give :func:`ace`'s binned answers).
    orders : tuple of numpy.ndarray, optional
        :func:`response_orders` of ``ys``, when the caller reuses them across calls.
    images : numpy.ndarray, optional
        ``(R, m)`` ascending indices: problem ``i`` sees ``z[channels[i], images[rows[i]]]``
        and ``ys`` is ``(R, m)`` (split halves; a channel sorted once, each subset's order
        filtered from it). The answers are :func:`ace`'s on the gathered problems.

    Returns
    -------
    rho : numpy.ndarray
        ``(b,)`` the maximal-correlation estimates (as :attr:`AceResult.rho`).
    first : numpy.ndarray
        ``(b,)`` ``|corr(phi_1, theta)|`` (the published scripts' score).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=(2, 100, 2))
    >>> ys = np.stack([z[0, :, 0] ** 2, rng.permutation(z[0, :, 0] ** 2)])
    >>> rho, _ = ace_shared(z, ys, np.array([0, 0]), np.array([0, 1]))
    >>> bool(rho[0] > 0.95), bool(rho[1] < 0.5)
    (True, True)
    """
    z, ys = (np.ascontiguousarray(a, dtype=np.float64) for a in (z, ys))
    channels, rows = (np.asarray(a, dtype=np.int64) for a in (channels, rows))
    images = _checked_images(images, ys, z.shape[1])
    if z.ndim != 3 or ys.ndim != 2 or ys.shape[1] != (z.shape[1] if images is None
                                                       else images.shape[1]):
        raise ValueError(f"z must be (C, n, k) and ys (R, n) with the same n; got "
                         f"{z.shape} and {ys.shape}")
    if channels.shape != rows.shape or channels.ndim != 1:
        raise ValueError("channels and rows must be 1-d arrays of one length")
    if channels.size == 0:
        return np.zeros(0), np.zeros(0)
    _check_shared(z, ys, np.unique(channels), np.unique(rows))
    x_kinds = _settings(x_kind, z.shape[2], y_kind, delrsq, max_iter)
    y_orders, y_groups = response_orders(ys) if orders is None else orders
    y_orders = np.ascontiguousarray(y_orders, dtype=np.int64)
    y_groups = np.asarray(y_groups, dtype=np.int64)
    return _indexed(z, ys, (y_orders, y_groups), channels, rows, _kind_codes(x_kinds), y_kind,
                    resolve_bins(bins, ys.shape[1]),
                    (float(delrsq), int(max_iter), float(alpha)), images)


def _indexed(z: np.ndarray, ys: np.ndarray, orders: tuple[np.ndarray, np.ndarray],
             channels: np.ndarray, rows: np.ndarray, codes: np.ndarray, y_kind: str,
             nbins: int | None, settings: tuple[float, int, float],
             images: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`ace_shared`'s problems on the exact or the binned compiled engine."""
    from . import binned
    from . import kernels as nb

    if nbins is None:
        rho, first, _, _ = nb.ace_indexed(z, ys, *orders, channels, rows, codes,
                                          nb.KIND_CODES[y_kind], *settings, images=images)
    else:
        rho, first, _, _ = binned.ace_indexed(z, ys, *orders, channels, rows, codes,
                                              nb.KIND_CODES[y_kind], *split_bins(nbins),
                                              *settings, images=images)
    return rho, first
