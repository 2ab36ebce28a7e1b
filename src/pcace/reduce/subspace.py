"""Block subspace iteration: principal axes of layers whose ``P x P`` moments do not fit.

Where ``P x P`` per channel does not fit (``P = 12,544`` for a 112 x 112 map is 1.2 GiB per
channel), :class:`SubspaceIteration` runs a block subspace iteration on the standardised
maps, ``(C, P, q + oversample)`` float64 in memory. The first pass gathers per-pixel
statistics and, on the same pass, applies the covariance to a random start block; every
further pass applies the correlation matrix once more (``X Q`` per image, ``X^T (X Q)``
summed over the images), with a Rayleigh-Ritz step after it, accelerated by a Chebyshev
filter, until the estimated largest principal angle of each channel's top-``q`` subspace
(Ritz residual over the spectral gap) is below ``tol``. :func:`subspace_basis` runs it over
a callable that iterates the batches again: a re-run forward pass or a spilled block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain

import torch

from ..core.validation import components as check_components
from .basis import PixelBasis, finish_basis
from .batches import as_cbp, image_chunks
from .moments import PixelMoments
from .pca import k_for_fraction

__all__ = ["CHEBYSHEV_RESTART", "OVERSAMPLE", "SubspaceIteration", "subspace_basis"]

Batches = Callable[[], Iterable[torch.Tensor]]

#: 20 the values agree to 2e-10 and most layers converge in 10 to 45 passes.
OVERSAMPLE = 20

#: Passes after which the subspace iteration's Chebyshev filter restarts on the interval the
#: Ritz values of then give (:meth:`SubspaceIteration._next_block`).
CHEBYSHEV_RESTART = 4


class SubspaceIteration:
    """The block subspace iteration of :func:`subspace_basis`, one pass at a time.

    For a caller that drives the passes itself (several layers of one forward pass,
    :class:`pcace.reduce.twopass.TwoPass`): feed every batch of a pass to :meth:`add`, then call
    :meth:`end_pass`; repeat while :attr:`needs_pass`; then :meth:`basis`. The first pass
    gathers the per-pixel statistics and applies the covariance to a random start block;
    each later pass applies the correlation matrix of the channels not yet converged.

    Parameters
    ----------
    channels, pixels : int
        ``C`` and ``P = H * W``.
    components, max_components, oversample, tol, max_passes, seed, device
        As for :func:`subspace_basis`.

    Examples
    --------
    >>> import torch
    >>> maps = torch.randn(200, 2, 3, dtype=torch.float64) @ torch.randn(3, 50,
    ...                                                       dtype=torch.float64)
    >>> it = SubspaceIteration(2, 50, 2)
    >>> while it.needs_pass:
    ...     for batch in maps.split(64):
    ...         it.add(batch)
    ...     it.end_pass()
    >>> it.basis().vectors.shape
    torch.Size([2, 50, 2])
    """

    def __init__(self, channels: int, pixels: int, components: int | float = 3, *,
                 max_components: int = 10, oversample: int = OVERSAMPLE, tol: float = 1e-9,
                 max_passes: int = 50, seed: int = 0,
                 device: torch.device | str | None = None):
        self.k_fixed, self.fraction = check_components(components, max_components)
        if max_passes < 2:
            raise ValueError(f"max_passes must be >= 2 (statistics + one iteration); got "
                             f"{max_passes}")
        self.max_components, self.tol, self.max_passes = max_components, tol, max_passes
        self.device = torch.device("cpu" if device is None else device)
        c, p = int(channels), int(pixels)
        self.channels, self.pixels = c, p
        self.q_all = min(self.k_fixed if self.fraction is None else max_components, p)
        self.block = min(self.q_all + max(oversample, 1), p)
        gen = torch.Generator().manual_seed(seed)
        self._omega: torch.Tensor | None = torch.randn((c, p, self.block), generator=gen,
                                                       dtype=torch.float64).to(self.device)
        self._stats = PixelMoments(c, p, cross=False, device=self.device)
        self._shift: torch.Tensor | None = None
        self._z = torch.zeros((c, p, self.block), dtype=torch.float64, device=self.device)
        self._seen = 0
        self.passes = 0
        self._active = torch.arange(c, device=self.device)
        self._prev: torch.Tensor | None = None  # the Chebyshev filter's previous block

    @property
    def nbytes(self) -> int:
        """Bytes held between passes: four ``(C, P, block)`` float64 blocks (the block, its
        image under the correlation matrix, the filter's previous block, and room for the
        Ritz step's work) and statistics."""
        return 8 * self.channels * self.pixels * (4 * self.block + 5)

    @property
    def needs_pass(self) -> bool:
        """Whether another pass over the data is wanted."""
        return self.passes == 0 or (self._active.numel() > 0 and self.passes < self.max_passes)

    def add(self, batch: torch.Tensor) -> None:
        """Feed one batch of the current pass: ``(B, C, H, W)`` or ``(B, C, P)`` maps."""
        for part in image_chunks(batch):
            if self.passes == 0:
                self._add_first(part)
            else:
                self._add_later(part)

    def _add_first(self, batch: torch.Tensor) -> None:
        # statistics, and the covariance applied to the random block (data shifted by the
        # first batch's mean, corrected for the shift when the mean is known)
        self._stats.update(batch)
        x, _ = as_cbp(batch, self.device)
        if self._shift is None:
            self._shift = x.mean(dim=1)
        x -= self._shift[:, None, :]
        self._z.baddbmm_(x.transpose(1, 2), torch.bmm(x, self._omega))

    def _add_later(self, batch: torch.Tensor) -> None:
        x, _ = as_cbp(batch, self.device)
        self._seen += x.shape[1]
        if len(self._active) < self.channels:
            x = x[self._active]
        x -= self._mean_act[:, None, :]
        x *= self._inv_act[:, None, :]
        self._z.baddbmm_(x.transpose(1, 2), torch.bmm(x, self._basis_act))

    def end_pass(self) -> None:
        """Close the pass: the first sets up the iteration, later ones take a Ritz step."""
        if self.passes == 0:
            self._end_first()
        else:
            self._end_later()
        if self.needs_pass:
            self._mean_act = self.mean[self._active]
            self._inv_act = self.inv[self._active]
            self._basis_act = self._basis[self._active]
            self._z = torch.zeros_like(self._basis_act)
            self._seen = 0

    def _end_first(self) -> None:
        if self._shift is None:
            raise ValueError("the first pass saw no batch")
        self.mean, self.inv, self.constant = self._stats.standardiser()
        n = self.count = self._stats.count
        c = self.channels
        delta = self.mean - self._shift
        sketch = self._z
        sketch -= n * delta[:, :, None] * torch.bmm(delta[:, None, :], self._omega)
        self._basis = torch.linalg.qr(sketch * self.inv[:, :, None])[0]  # R on a random block
        self._omega = self._z = None  # type: ignore[assignment]
        self.passes = 1
        dead = self.constant.all(dim=1)
        self._vals = torch.zeros((c, self.block), dtype=torch.float64)
        self._vecs = torch.zeros((c, self.pixels, self.q_all), dtype=torch.float64)
        self._angle = torch.zeros(c, dtype=torch.float64)
        self._converged = dead.clone().cpu()
        self._active = (~dead).nonzero().flatten()
        self._size_tol = max(n, self.pixels) * self._stats.eps

    def _end_later(self) -> None:
        n, p, q_all, block = self.count, self.pixels, self.q_all, self.block
        self.passes += 1
        if self._seen != n:
            raise ValueError("batches() yielded a different number of images on a later pass")
        active, q_act = self._active, self._basis_act
        rq = self._z / n  # R Q
        t = torch.bmm(q_act.transpose(1, 2), rq)
        w, s = torch.linalg.eigh(0.5 * (t + t.transpose(1, 2)))
        w, s = w.flip(-1), s.flip(-1)
        v, rv = torch.bmm(q_act, s), torch.bmm(rq, s)
        resid = rv - v * w[:, None, :]
        top = w[:, :1].clamp(min=torch.finfo(torch.float64).tiny)
        usable = ((w > self._size_tol * top) & (w > 0)).sum(dim=1)  # rank as reduce_block
        need = usable.clamp(max=q_all)
        if self.fraction is not None:  # only the pairs the fraction keeps need converge
            ritz = n * w[:, :q_all].clamp(min=0)
            live = n * (~self.constant[active]).sum(dim=1).to(torch.float64)
            need = torch.minimum(need, k_for_fraction(ritz, live, self.fraction,
                                                      self.max_components))
        done = torch.zeros(len(active), dtype=torch.bool, device=self.device)
        est = torch.zeros(len(active), dtype=torch.float64, device=self.device)
        for j in range(len(active)):
            qj = int(need[j])
            if qj == 0 or qj >= p:
                done[j] = True
                continue
            r = resid[j, :, :qj].norm()
            gap = w[j, qj - 1] - (w[j, qj] if qj < block else 0.0)
            est[j] = r / gap if gap > 0 else math.inf
            done[j] = bool(est[j] <= self.tol) or bool(r <= 1e-13 * top[j, 0])
        take = done | (self.passes >= self.max_passes)
        idx = active[take].cpu()
        self._vals[idx] = w[take].cpu()
        self._vecs[idx] = v[take][:, :, :q_all].cpu()
        self._angle[idx] = est[take].cpu()
        self._converged[idx] = done[take].cpu()
        self._next_block(q_act, rq, w, ~take)
        self._active = active[~take]
        self._z = None  # type: ignore[assignment]

    def _next_block(self, q_act: torch.Tensor, rq: torch.Tensor, w: torch.Tensor,
                    going: torch.Tensor) -> None:
        """The next block of the channels still iterating: a step of a Chebyshev filter.

        The filter damps ``[0, b]``, ``b`` the block's last Ritz value, and its degree grows
        by one per pass, restarted every :data:`CHEBYSHEV_RESTART` passes with the Ritz
        values of then (early ones underestimate ``b``, and a filter on too short an
        interval amplifies what it should damp). Against the wanted ``w_q`` the rest of
        the spectrum shrinks by about ``exp(-acosh(2 w_q / b - 1))`` per pass; the shifted
        power step it extends (its degree 1, ``R - b / 2``) gives
        ``(b / 2) / (w_q - b / 2)``: 0.37 against 0.66 for ``b = 0.79 w_q``, seen on
        ResNet-20's ``layer1.2.conv1``. The three-term recurrence (Saad's scaled form) runs
        on orthonormalised blocks: the block and its predecessor are carried by the same
        triangular factor, so the recurrence still holds for their span.
        """
        active = self._active
        # (re)start: the interval and the scale, per channel, from the Ritz values; the
        # first step follows the second pass (the first Ritz check)
        if (self.passes - 2) % CHEBYSHEV_RESTART == 0:
            top = w[:, :1].clamp(min=torch.finfo(torch.float64).tiny)
            half = (0.5 * w[:, -1:].clamp(min=0)).clamp(min=1e-12 * top)  # (b - 0) / 2
            if self._prev is None:
                self._half = torch.zeros((self.channels, 1, 1), dtype=torch.float64,
                                         device=self.device)
                self._sigma1 = torch.ones_like(self._half)
                self._sigma = torch.ones_like(self._half)
                self._prev = torch.zeros_like(self._basis)
            self._half[active] = half[:, :, None]
            self._sigma1[active] = (half / (top - half).clamp(min=1e-300))[:, :, None]
            self._sigma[active] = self._sigma1[active]
            e = self._half[active]
            step = (self._sigma1[active] / e) * (rq - e * q_act)
        else:
            e, s1, s0 = self._half[active], self._sigma1[active], self._sigma[active]
            s2 = 1.0 / (2.0 / s1 - s0)
            step = (2.0 * s2 / e) * (rq - e * q_act) - (s0 * s2) * self._prev[active]
            self._sigma[active] = s2
        q, r = torch.linalg.qr(step[going])
        idx = active[going]
        # the predecessor in the new block's coordinates: Y_prev R^-1
        self._prev[idx] = torch.linalg.solve_triangular(r, q_act[going], upper=True,
                                                        left=False)
        self._basis = self._basis.clone()
        self._basis[idx] = q

    def basis(self) -> PixelBasis:
        """The converged basis (after the last pass)."""
        if self.needs_pass:
            raise ValueError(f"the subspace iteration wants another pass (after "
                             f"{self.passes})")
        n = self.count
        # eigenvalues on the scale of X^T X, as the in-memory path has them
        total = n * (~self.constant).sum(dim=1).to(torch.float64).cpu()
        return finish_basis(self.mean, self.inv, self.constant, n * self._vals[:, :self.q_all],
                             self._vecs, total, n, self._stats.eps, self.k_fixed,
                             self.fraction, self.max_components, route="subspace",
                             passes=self.passes, converged=self._converged, angle=self._angle)


def subspace_basis(batches: Batches, components: int | float = 3, *, max_components: int = 10,
                   oversample: int = OVERSAMPLE, tol: float = 1e-9, max_passes: int = 50,
                   seed: int = 0, device: torch.device | str | None = None,
                   first: Iterable[torch.Tensor] | None = None) -> PixelBasis:
    """Each channel's top principal axes by block subspace iteration over passes of the data.

    For maps whose ``P x P`` moments do not fit. Memory: about
    ``8 C P (q + oversample) * 4`` bytes plus one batch, whatever ``N``.

    Parameters
    ----------
    batches : callable
        ``batches()`` returns an iterable of ``(B, C, H, W)`` (or ``(B, C, P)``) float32 or
        float64 tensors: all the images, the same ones in the same order on every call
        (a re-run forward pass, or a spilled block read back). Called once per pass.
    components, max_components
        As for :meth:`PixelMoments.basis`. ``q`` pairs are converged: ``k`` for an int,
        ``max_components`` for a fraction.
    oversample : int, default 20
        Block columns beyond ``q``; more columns converge in fewer passes at a higher
        cost per pass. Each pass after the first is shifted by half the block's last Ritz
        value ``w_b``, so the error shrinks by about
        ``(lambda_{b+1} - w_b / 2) / (lambda_q - w_b / 2)`` per pass.
    tol : float, default 1e-9
        Stop a channel when its estimated largest principal angle (radians) between the
        top-``q`` Ritz subspace and the exact one, ``||R V - V W||_F / (w_q - w_{q+1})``
        (Davis-Kahan, ``R`` the correlation matrix), is below ``tol``, or when the Ritz
        residual is at rounding level (``1e-13`` of the largest eigenvalue). Pairs
        below the rank threshold need not converge (their scores are dropped).
    max_passes : int, default 50
        Passes over the data at most (the statistics pass included). Channels not
        converged by then keep their last Ritz vectors, with ``converged`` False and
        their ``angle`` estimate recorded: flat (noise-like) spectra converge slowly.
    seed : int, default 0
        Seed of the random start block (results are deterministic).
    device : torch.device or str, optional
        Where the iteration runs (default: the CPU).
    first : iterable, optional
        The batches of the first pass, if already started (used by
        :func:`streaming_reduce`); later passes call ``batches()``.

    Returns
    -------
    PixelBasis
        With ``route="subspace"``, ``passes`` (data passes used), ``converged``, ``angle``.

    Examples
    --------
    >>> import torch
    >>> low = torch.randn(300, 2, 4, dtype=torch.float64) @ torch.randn(4, 400,
    ...                                                        dtype=torch.float64)
    >>> maps = low + 0.1 * torch.randn(300, 2, 400, dtype=torch.float64)
    >>> basis = subspace_basis(lambda: maps.split(64), 3)
    >>> bool(basis.converged.all()), basis.passes < 10
    (True, True)
    """
    it = iter(batches() if first is None else first)
    head = next(it, None)
    if head is None:
        raise ValueError("batches() yielded no batch")
    shape = head.shape
    sub = SubspaceIteration(int(shape[1]), int(math.prod(shape[2:])), components,
                            max_components=max_components, oversample=oversample, tol=tol,
                            max_passes=max_passes, seed=seed, device=device)
    for batch in chain([head], it):
        sub.add(batch)
    sub.end_pass()
    while sub.needs_pass:
        for batch in batches():
            sub.add(batch)
        sub.end_pass()
    return sub.basis()
