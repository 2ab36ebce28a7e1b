"""The reduce step over images streamed in batches: memory that does not grow with N.

:func:`pcace.reduce.pca.reduce_block` needs every ``N x P`` map of a layer at once. The
PCA of the standardised maps needs much less: per channel, the count, the per-pixel
sums and the ``P x P`` cross products over the images. This module accumulates those
batch by batch (or per shard, merged afterwards), solves each channel's eigenproblem
from them, and projects a second pass of the same images onto the basis. The results
are those of the in-memory path: the same constant-column rule, the same rank and
variance-fraction rules for ``k``, and the same sign rule over all ``N`` scores.

Two routes
----------
``"moments"`` (:class:`PixelMoments`)
    One pass accumulates ``(C, P, P)`` centred cross products in float64 (Chan's
    pairwise update per batch, so a large mean does not cancel; two accumulators merge
    exactly as one pass over all their images). The basis comes from each channel's
    correlation matrix; a second pass projects. Memory: ``8 C P^2`` bytes plus one
    chunk of correlation matrices, whatever ``N``.
``"subspace"`` (:func:`subspace_basis`)
    Where ``P x P`` per channel does not fit (``P = 12,544`` for a 112 x 112 map is
    1.2 GiB per channel), a block subspace iteration on the standardised maps,
    ``(C, P, q + oversample)`` float64 in memory. The first pass gathers per-pixel
    statistics and, on the same pass, applies the covariance to a random start block;
    every further pass applies the correlation matrix once more (``X Q`` per image,
    ``X^T (X Q)`` summed over the images), with a Rayleigh-Ritz step after it, until
    the estimated largest principal angle of each channel's top-``q`` subspace
    (Ritz residual over the spectral gap) is below ``tol``. The caller supplies a
    callable that iterates the batches again: a re-run forward pass or a spilled block.

:func:`choose_route` picks between them for a byte budget; :func:`streaming_reduce`
runs either end to end.

Numerics
--------
Everything is float64 (float32 batches are widened on arrival). The constant-column
rule and the rank threshold use the machine epsilon of the batches' dtype (the
coarsest seen), as :func:`~pcace.reduce.pca.reduce_block` does with its block's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Literal

import numpy as np
import torch

from ..core.validation import components as _check_components
from .pca import (
    CONSTANT_ULPS,
    FLAT_SPREAD,
    Reduction,
    components_kept,
    fix_signs,
    k_for_fraction,
    numerical_rank,
    top_eigenpairs,
)
from .standardise import NonFiniteMaps

__all__ = [
    "PixelBasis",
    "PixelMoments",
    "RouteChoice",
    "SubspaceIteration",
    "choose_route",
    "streaming_reduce",
    "subspace_basis",
]

Batches = Callable[[], Iterable[torch.Tensor]]

#: Bytes of correlation matrices formed at once when a basis is taken from moments.
BASIS_CHUNK_BYTES = 64 * 2**20


def _as_cbp(batch: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.dtype]:
    """A ``(B, C, H, W)`` or ``(B, C, P)`` batch as a ``(C, B, P)`` float64 tensor."""
    if not isinstance(batch, torch.Tensor):
        batch = torch.as_tensor(batch)
    if batch.ndim == 4:
        batch = batch.flatten(2)
    if batch.ndim != 3 or batch.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"a batch must be a (B, C, H, W) or (B, C, P) float32 or float64 "
                         f"tensor; got {tuple(batch.shape)} {batch.dtype}")
    out = torch.empty((batch.shape[1], batch.shape[0], batch.shape[2]), dtype=torch.float64,
                      device=device)
    out.copy_(batch.permute(1, 0, 2))
    return out, batch.dtype


class PixelMoments:
    """Running pixel-space moments of ``C`` channels of ``P`` pixels, over images.

    Per channel: the image count, the per-pixel mean, minimum and maximum, the centred
    sums of squares, and (``cross=True``) the ``P x P`` centred cross products, all
    float64. Each batch is centred on its own mean and merged by Chan's pairwise
    update, so large means do not cancel, and :meth:`merge` of two accumulators equals
    one accumulator over all their images (up to rounding). Memory: ``8 C P^2`` bytes
    with cross products, ``32 C P`` without, whatever the number of images.

    Parameters
    ----------
    channels, pixels : int
        ``C`` and ``P = H * W``.
    cross : bool, default True
        Keep the ``P x P`` cross products (needed by :meth:`basis`); without them only
        the per-pixel statistics (the first pass of :func:`subspace_basis`).
    device : torch.device or str, optional
        Where the moments live (default: the CPU). Batches are moved there.

    Attributes
    ----------
    count : int
        Images seen.
    mean, sq, lo, hi : torch.Tensor
        ``(C, P)`` float64: per-pixel mean, centred sum of squares, minimum, maximum.
    cross : torch.Tensor or None
        ``(C, P, P)`` float64 centred cross products, or None.
    eps : float
        Machine epsilon of the coarsest batch dtype seen (for the constant-column rule).

    Examples
    --------
    >>> import torch
    >>> acc = PixelMoments(channels=4, pixels=36)
    >>> for batch in torch.randn(250, 4, 6, 6, dtype=torch.float64).split(64):
    ...     _ = acc.update(batch)
    >>> basis = acc.basis(3)
    >>> basis.project(torch.randn(10, 4, 6, 6)).shape
    torch.Size([10, 4, 3])
    """

    def __init__(self, channels: int, pixels: int, *, cross: bool = True,
                 device: torch.device | str | None = None):
        if channels < 1 or pixels < 1:
            raise ValueError(f"channels and pixels must be >= 1; got {channels}, {pixels}")
        dev = torch.device("cpu" if device is None else device)
        self.channels, self.pixels = int(channels), int(pixels)
        self.count = 0
        self.eps = 0.0
        self.mean = torch.zeros((channels, pixels), dtype=torch.float64, device=dev)
        # centred sums of squares: the cross products' diagonal when they are kept
        self._sq = None if cross else torch.zeros_like(self.mean)
        self._packed: tuple[np.ndarray, np.ndarray] | None = None  # see from_packed
        self.lo = torch.full_like(self.mean, math.inf)
        self.hi = torch.full_like(self.mean, -math.inf)
        self.cross = (torch.zeros((channels, pixels, pixels), dtype=torch.float64, device=dev)
                      if cross else None)

    @classmethod
    def from_packed(cls, count: int, shift: torch.Tensor, packed: np.ndarray,
                    sums: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                    eps: float) -> PixelMoments:
        """Moments from a compiled accumulator's packed sums, without unpacking them.

        ``packed``: ``(C, P (P + 1) / 2)`` float64 lower triangles of the cross products
        of the maps shifted by ``shift`` ``(C, P)``; ``sums``: the shifted maps' sums
        ``(C, P)`` float64 (both taken over, not copied). :meth:`basis` then forms each
        chunk of correlation matrices in one compiled pass
        (:func:`pcace.reduce.kernels.standardised_from_packed`): the full ``C x P x P``
        cross products never exist. Such moments cannot be updated or merged.

        Examples
        --------
        >>> import numpy as np, torch
        >>> x = torch.randn(40, 1, 3, dtype=torch.float64)
        >>> i, j = np.tril_indices(3)
        >>> packed = torch.einsum("ni,nj->ij", x[:, 0], x[:, 0]).numpy()[i, j][None]
        >>> m = PixelMoments.from_packed(40, torch.zeros(1, 3, dtype=torch.float64), packed,
        ...                              x.sum(0), x.amin(0), x.amax(0), 2.0**-52)
        >>> c = x[:, 0] - x[:, 0].mean(0)
        >>> bool(torch.allclose(m.sq[0], (c * c).sum(0)))
        True
        """
        from .kernels import packed_size

        c, p = sums.shape
        if packed.shape != (c, packed_size(p)) or packed.dtype != np.float64:
            raise ValueError(f"packed must be ({c}, {packed_size(p)}) float64; got "
                             f"{packed.shape} {packed.dtype}")
        n = int(count)
        d = sums.to(torch.float64) / n  # mean - shift
        out = cls(c, p, cross=False)
        diagonal = torch.from_numpy(packed[:, (np.arange(p) + 1) * (np.arange(p) + 2) // 2 - 1])
        out._sq = diagonal - n * d.square()
        out.count, out.eps = n, float(eps)
        out.mean = shift.to(torch.float64) + d
        out.lo, out.hi = lo.to(torch.float64), hi.to(torch.float64)
        out._packed = (packed, d.contiguous().numpy())
        return out

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def sq(self) -> torch.Tensor:
        """``(C, P)`` float64 centred sums of squares per pixel."""
        if self.cross is not None:
            return self.cross.diagonal(dim1=1, dim2=2).clone()
        return self._sq

    @property
    def nbytes(self) -> int:
        """Bytes held by the moments (independent of the number of images)."""
        held = [self.mean, self.lo, self.hi]
        held.append(self._sq if self.cross is None else self.cross)
        extra = 0 if self._packed is None else self._packed[0].nbytes
        return extra + sum(t.numel() * t.element_size() for t in held)

    def update(self, batch: torch.Tensor) -> PixelMoments:
        """Add a batch of images, ``(B, C, H, W)`` or ``(B, C, P)``, float32 or float64.

        Returns ``self``. Raises :class:`~pcace.reduce.standardise.NonFiniteMaps` (naming the
        channels) if the batch holds NaN or inf; the moments are then left unchanged.
        """
        x, dtype = _as_cbp(batch, self.device)
        c, b, p = x.shape
        if (c, p) != (self.channels, self.pixels):
            raise ValueError(f"batch has {c} channels of {p} pixels; the moments are for "
                             f"{self.channels} channels of {self.pixels}")
        if b == 0:
            return self
        mean_b = x.mean(dim=1)
        bad = ~torch.isfinite(mean_b).all(dim=1)
        if bool(bad.any()):
            raise NonFiniteMaps(bad.nonzero().flatten().tolist())
        lo_b, hi_b = torch.aminmax(x, dim=1)
        x -= mean_b[:, None, :]
        sq_b = None if self.cross is not None else torch.linalg.vector_norm(x, dim=1).square_()
        other = _Part(b, mean_b, sq_b, lo_b, hi_b, x)
        self._absorb(other, torch.finfo(dtype).eps)
        return self

    def merge(self, other: PixelMoments) -> PixelMoments:
        """Add the moments of another accumulator (another shard of images) into this one.

        Returns ``self``; ``other`` is not modified. Both must have the same shape, and
        cross products if this one has them.
        """
        if (other.channels, other.pixels) != (self.channels, self.pixels):
            raise ValueError(f"cannot merge moments of {other.channels} x {other.pixels} "
                             f"into {self.channels} x {self.pixels}")
        if self.cross is not None and other.cross is None:
            raise ValueError("cannot merge moments without cross products into moments with")
        if other.count == 0:
            return self
        sq = None if self.cross is not None else other.sq.to(self.device)
        part = _Part(other.count, other.mean.to(self.device), sq,
                     other.lo.to(self.device), other.hi.to(self.device), None,
                     None if self.cross is None else other.cross.to(self.device))
        self._absorb(part, other.eps)
        return self

    def _absorb(self, part: _Part, eps: float) -> None:
        if self._packed is not None:
            raise ValueError("moments taken from packed sums (from_packed) cannot be updated "
                             "or merged")
        na, nb = self.count, part.count
        n = na + nb
        delta = part.mean - self.mean
        w = na * nb / n
        if self.cross is not None:
            if part.centred is not None:  # a batch: its centred products
                self.cross.baddbmm_(part.centred.transpose(1, 2), part.centred)
            else:
                self.cross += part.cross
            if na:
                self.cross.baddbmm_(delta[:, :, None], delta[:, None, :], alpha=w)
        if self._sq is not None:
            self._sq += part.sq + w * delta.square()
        self.mean += delta * (nb / n)
        torch.minimum(self.lo, part.lo, out=self.lo)
        torch.maximum(self.hi, part.hi, out=self.hi)
        self.count = n
        self.eps = max(self.eps, eps)

    def standardiser(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pixel mean, inverse standard deviation and constant mask, each ``(C, P)``.

        The standard deviation is the population one (ddof 0). A pixel column is constant,
        and its inverse scale 0, when its maximum equals its minimum or its standard
        deviation is below ``CONSTANT_ULPS * eps * max|column|`` (the rule of
        :func:`~pcace.reduce.pca.reduce_block`, with the batches' epsilon).
        """
        if self.count < 2:
            raise ValueError(f"standardising needs at least 2 images; got {self.count}")
        std = (self.sq.clamp(min=0) / self.count).sqrt_()
        scale = torch.maximum(self.hi.abs(), self.lo.abs())
        constant = (self.hi <= self.lo) | (std <= CONSTANT_ULPS * self.eps * scale)
        inv = torch.where(constant, 0.0, 1.0 / torch.where(constant, 1.0, std))
        return self.mean.clone(), inv, constant

    def basis(self, components: int | float = 3, *, max_components: int = 10,
              tol: float = 1e-12) -> PixelBasis:
        """Each channel's top principal axes of its standardised maps, from the moments.

        Parameters
        ----------
        components : int or float, default 3
            An int ``k >= 1`` or a variance fraction in ``(0, 1)``, as for
            :func:`~pcace.reduce.pca.principal_components`.
        max_components : int, default 10
            Cap on ``k`` when ``components`` is a fraction.
        tol : float, default 1e-12
            Residual of each kept eigenpair relative to the largest eigenvalue
            (:func:`~pcace.reduce.pca.top_eigenpairs`); the in-memory path uses ``1e-8`` for
            float32 data, whose Gram matrices carry no more.

        Returns
        -------
        PixelBasis
            With ``route="moments"`` and ``passes=1``.
        """
        if self.cross is None and self._packed is None:
            raise ValueError("these moments have no cross products (cross=False)")
        k_fixed, fraction = _check_components(components, max_components)
        mean, inv, constant = self.standardiser()
        q = min(k_fixed if fraction is None else max_components, self.pixels)
        c, p, n = self.channels, self.pixels, self.count
        vals = torch.empty((c, q), dtype=torch.float64)
        vecs = torch.empty((c, p, q), dtype=torch.float64)
        total = torch.empty(c, dtype=torch.float64)
        step = max(1, BASIS_CHUNK_BYTES // (8 * p * p))
        buffer = None if self._packed is None else np.empty((min(step, c), p, p))
        for lo in range(0, c, step):
            sl = slice(lo, min(c, lo + step))
            # the Gram matrix X^T X of the standardised maps: n times the correlation matrix
            if self._packed is not None:
                from .kernels import standardised_from_packed

                g = buffer[:sl.stop - sl.start]
                tr, fro = map(torch.from_numpy, standardised_from_packed(
                    self._packed[0][sl], self._packed[1][sl], n,
                    inv[sl].contiguous().numpy(), g))
                g = torch.from_numpy(g)
            else:
                d = inv[sl]
                g = self.cross[sl] * d[:, :, None]
                g *= d[:, None, :]
                g = 0.5 * (g + g.transpose(1, 2))
                tr = g.diagonal(dim1=1, dim2=2).sum(-1)
                fro = g.square().sum(dim=(1, 2))
            flat = (tr.square() / (fro * p).clamp(min=torch.finfo(torch.float64).tiny)
                    > FLAT_SPREAD)
            w, v = top_eigenpairs(g, q, tol=tol, flat=flat.cpu())
            vals[sl], vecs[sl], total[sl] = w.cpu(), v.cpu(), tr.cpu()
        return _finish_basis(mean, inv, constant, vals, vecs, total, n, self.eps, k_fixed,
                             fraction, max_components, route="moments", passes=1)


@dataclass
class _Part:
    """Moments of a batch or of another accumulator, ready to merge."""

    count: int
    mean: torch.Tensor
    sq: torch.Tensor | None
    lo: torch.Tensor
    hi: torch.Tensor
    centred: torch.Tensor | None
    cross: torch.Tensor | None = None


@dataclass
class PixelBasis:
    """Per-channel standardisation and principal axes: what the projection pass needs.

    Attributes
    ----------
    mean, inv_std : torch.Tensor
        ``(C, P)`` float64: per-pixel mean and inverse population standard deviation
        (0 for a constant column).
    constant : torch.Tensor
        ``(C, P)`` bool: constant pixel columns.
    vectors : torch.Tensor
        ``(C, P, width)`` float64: the kept principal axes (columns beyond a channel's
        ``n_components`` are 0). Their signs are arbitrary until :meth:`finish`.
    eigenvalues : torch.Tensor
        ``(C, q)`` float64: the top eigenvalues of each channel's correlation matrix
        (variances of the scores), descending.
    n_components, explained_variance, dead : torch.Tensor
        ``(C,)``, as in :class:`~pcace.reduce.pca.Reduction`.
    count : int
        Images the basis was computed from; :meth:`finish` checks the projection saw as
        many.
    route : {"moments", "subspace"}
        How the basis was found.
    passes : int
        Passes over the data it took (not counting the projection pass).
    converged : torch.Tensor
        ``(C,)`` bool: the subspace iteration met its tolerance (always True from
        moments).
    angle : torch.Tensor
        ``(C,)`` float64: the estimated largest principal angle (radians) between the
        kept subspace and the exact one (Ritz residual over the gap; 0 from moments,
        whose eigensolver works to ``1e-12`` of the largest eigenvalue).
    """

    mean: torch.Tensor
    inv_std: torch.Tensor
    constant: torch.Tensor
    vectors: torch.Tensor
    eigenvalues: torch.Tensor
    n_components: torch.Tensor
    explained_variance: torch.Tensor
    dead: torch.Tensor
    count: int
    route: Literal["moments", "subspace"]
    passes: int
    converged: torch.Tensor
    angle: torch.Tensor

    def project(self, batch: torch.Tensor) -> torch.Tensor:
        """Principal-component scores of a batch: ``(B, C, H, W)`` -> ``(B, C, width)`` float64.

        The signs are not yet fixed: collect the scores of all images and pass them to
        :meth:`finish`.
        """
        if self.mean.device.type == "cpu" and isinstance(batch, torch.Tensor) and \
                batch.device.type == "cpu" and batch.ndim in (3, 4) and \
                batch.dtype in (torch.float32, torch.float64) and \
                batch.shape[1] == self.mean.shape[0] and \
                math.prod(batch.shape[2:]) == self.mean.shape[1]:
            from .kernels import project_standardised

            x = batch.detach().reshape(batch.shape[0], batch.shape[1], -1).contiguous()
            return torch.from_numpy(project_standardised(
                x.numpy(), self.mean.numpy(), self.inv_std.numpy(),
                self.vectors.contiguous().numpy()))
        parts = []
        for part in _image_chunks(batch):  # bounded float64 copies of large maps
            x, _ = _as_cbp(part, self.mean.device)
            if x.shape[0] != self.mean.shape[0] or x.shape[2] != self.mean.shape[1]:
                raise ValueError(f"batch has {x.shape[0]} channels of {x.shape[2]} pixels; "
                                 f"the basis is for {self.mean.shape[0]} of "
                                 f"{self.mean.shape[1]}")
            x -= self.mean[:, None, :]
            x *= self.inv_std[:, None, :]
            parts.append(torch.bmm(x, self.vectors.to(x.device)).permute(1, 0, 2))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @classmethod
    def concat(cls, parts: Sequence[PixelBasis]) -> PixelBasis:
        """One basis from the bases of consecutive channel groups of a layer.

        Each group's axes are padded with zero columns to the widest group's width; the
        groups must come from the same images.

        Examples
        --------
        >>> import torch
        >>> maps = torch.randn(200, 4, 10, dtype=torch.float64)
        >>> whole = PixelMoments(4, 10).update(maps).basis(2)
        >>> halves = [PixelMoments(2, 10).update(m).basis(2) for m in maps.split(2, dim=1)]
        >>> bool(torch.allclose(PixelBasis.concat(halves).vectors.abs(), whole.vectors.abs()))
        True
        """
        if len({p.count for p in parts}) != 1:
            raise ValueError("channel groups of one layer must come from the same images")
        if len(parts) == 1:
            return parts[0]
        width = max(p.vectors.shape[2] for p in parts)
        vectors = torch.cat([torch.nn.functional.pad(p.vectors, (0, width - p.vectors.shape[2]))
                             for p in parts])

        def cat(field: str) -> torch.Tensor:
            return torch.cat([getattr(p, field) for p in parts])

        return cls(mean=cat("mean"), inv_std=cat("inv_std"), constant=cat("constant"),
                   vectors=vectors, eigenvalues=cat("eigenvalues"),
                   n_components=cat("n_components"),
                   explained_variance=cat("explained_variance"), dead=cat("dead"),
                   count=parts[0].count, route=parts[0].route,
                   passes=max(p.passes for p in parts), converged=cat("converged"),
                   angle=cat("angle"))

    def finish(self, scores: torch.Tensor | Sequence[torch.Tensor]) -> Reduction:
        """The :class:`~pcace.reduce.pca.Reduction` of all images from their projected scores.

        Parameters
        ----------
        scores : torch.Tensor or sequence of torch.Tensor
            ``(N, C, width)`` from :meth:`project`, or the list of its batches in order.

        Returns
        -------
        Reduction
            ``scores`` ``(C, N, width)`` with each column flipped so that its
            largest-magnitude entry is positive (the in-memory sign rule, over all ``N``);
            float32 when ``scores`` are float32 (as a float32 pass rounds them), else
            float64.
        """
        if not isinstance(scores, torch.Tensor):
            scores = torch.cat(list(scores), dim=0)
        if scores.shape[0] != self.count:
            raise ValueError(f"the projection saw {scores.shape[0]} images; the basis was "
                             f"computed from {self.count}: both passes must see the same "
                             "images")
        out = scores.permute(1, 0, 2)
        out = (out if out.dtype == torch.float32 else out.to(torch.float64)).contiguous()
        fix_signs(out)
        return Reduction(scores=out, n_components=self.n_components.clone(),
                         explained_variance=self.explained_variance.clone(),
                         dead=self.dead.clone())


def _finish_basis(mean: torch.Tensor, inv: torch.Tensor, constant: torch.Tensor,
                  vals: torch.Tensor, vecs: torch.Tensor, total: torch.Tensor, n: int,
                  eps: float, k_fixed: int, fraction: float | None, max_components: int, *,
                  route: Literal["moments", "subspace"], passes: int,
                  converged: torch.Tensor | None = None,
                  angle: torch.Tensor | None = None) -> PixelBasis:
    """Rank, ``k``, explained variance and kept axes, as :func:`reduce_block` decides them.

    ``vals`` are the top eigenvalues of ``X^T X`` (descending), ``total`` its trace.
    """
    c, p = mean.shape
    dead = constant.all(dim=1).cpu()
    total = total.clamp(min=0)
    dtype = torch.float32 if eps > torch.finfo(torch.float64).eps else torch.float64
    rank = numerical_rank(vals, max(n, p), dtype)
    n_comp, width = components_kept(vals, total, rank, dead, k_fixed, fraction, max_components)
    r = min(width, vals.shape[1])
    keep = torch.arange(width)[None, :] < n_comp[:, None]
    vectors = torch.zeros((c, p, width), dtype=torch.float64)
    vectors[:, :, :r] = vecs[:, :, :r] * keep[:, None, :r]
    kept = vals[:, :r].clamp(min=0) * keep[:, :r]
    explained = torch.where(total > 0, kept.sum(dim=1) / torch.where(total > 0, total, 1), 0)
    dev = mean.device
    return PixelBasis(
        mean=mean, inv_std=inv, constant=constant, vectors=vectors.to(dev),
        eigenvalues=vals / n, n_components=n_comp, explained_variance=explained, dead=dead,
        count=n, route=route, passes=passes,
        converged=torch.ones(c, dtype=torch.bool) if converged is None else converged,
        angle=torch.zeros(c, dtype=torch.float64) if angle is None else angle)


#: Block columns of the subspace iteration beyond the pairs kept. Measured on the shared
#: ResNet-20 (2,000 images, five layers, k = 3): with 10, two layers left channels
#: unconverged after 50 passes and the values differed from the exact ones by 3e-6; with
#: 20 the values agree to 2e-10 and most layers converge in 10 to 45 passes.
OVERSAMPLE = 20

#: Bytes of float64 copy a batch is widened into at once (larger batches go in chunks of
#: images: a batch of 64 maps of 64 x 112 x 112 would otherwise take 411 MiB).
CHUNK_BYTES = 64 * 2**20


def _image_chunks(batch: torch.Tensor) -> Iterator[torch.Tensor]:
    """``batch`` ``(B, C, ...)`` in runs of images whose float64 copy fits CHUNK_BYTES."""
    if not isinstance(batch, torch.Tensor):
        batch = torch.as_tensor(batch)
    per_image = 8 * max(1, math.prod(batch.shape[1:]))
    rows = max(1, CHUNK_BYTES // per_image)
    if batch.ndim == 0 or batch.shape[0] <= rows:
        yield batch
        return
    yield from batch.split(rows)


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
        self.k_fixed, self.fraction = _check_components(components, max_components)
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
        for part in _image_chunks(batch):
            if self.passes == 0:
                self._add_first(part)
            else:
                self._add_later(part)

    def _add_first(self, batch: torch.Tensor) -> None:
        # statistics, and the covariance applied to the random block (data shifted by the
        # first batch's mean, corrected for the shift when the mean is known)
        self._stats.update(batch)
        x, _ = _as_cbp(batch, self.device)
        if self._shift is None:
            self._shift = x.mean(dim=1)
        x -= self._shift[:, None, :]
        self._z.baddbmm_(x.transpose(1, 2), torch.bmm(x, self._omega))

    def _add_later(self, batch: torch.Tensor) -> None:
        x, _ = _as_cbp(batch, self.device)
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
        return _finish_basis(self.mean, self.inv, self.constant, n * self._vals[:, :self.q_all],
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


@dataclass(frozen=True)
class RouteChoice:
    """Which streaming route fits a memory budget, and why.

    Attributes
    ----------
    route : {"moments", "subspace"}
    reason : str
        One sentence for logs and manifests.
    moments_bytes, subspace_bytes : int
        Estimated peak bytes of each route.
    """

    route: Literal["moments", "subspace"]
    reason: str
    moments_bytes: int
    subspace_bytes: int


def choose_route(channels: int, pixels: int, components: int | float = 3, *,
                 budget_bytes: int, images: int | None = None, max_components: int = 10,
                 oversample: int = OVERSAMPLE, batch_size: int = 256) -> RouteChoice:
    """Pick the streaming route for a layer of ``channels`` maps of ``pixels`` under a budget.

    The rule: ``"moments"`` when its peak memory fits the budget (one pass over the data,
    then the projection pass; the cost of the pass grows as ``C N P^2``), else
    ``"subspace"`` when its memory fits (a statistics pass, then one pass per iteration,
    typically 3 to 10 on natural images, many more on flat spectra, then the projection
    pass; each pass costs about ``4 C N P (q + oversample)``). If neither fits, a
    ``ValueError`` says how much each needs.

    Peak bytes counted: moments, ``8 C P^2`` for the cross products plus one chunk of
    correlation matrices (:data:`BASIS_CHUNK_BYTES`, at least one ``P x P``), plus the
    per-pixel statistics and a float64 copy of a batch; subspace, four
    ``(C, P, q + oversample)`` float64 blocks plus the same statistics and batch copies.
    Neither depends on ``N``.

    Parameters
    ----------
    channels, pixels : int
        ``C`` and ``P = H * W`` of the layer.
    components, max_components
        As for :meth:`PixelMoments.basis`.
    budget_bytes : int
        Memory the reduce may hold for this layer.
    images : int, optional
        ``N`` if known: the reason then says whether the in-memory
        :func:`~pcace.reduce.pca.reduce_block` (``8 C N P`` bytes in float64, half in
        float32) would also fit.
    oversample : int, default 20
        As for :func:`subspace_basis`.
    batch_size : int, default 256
        Images per batch, for the float64 copy of a batch (``8 B C P`` bytes; for
        64 channels of 112 x 112 and ``B = 256`` that alone is 1.6 GiB).

    Returns
    -------
    RouteChoice

    Examples
    --------
    >>> choose_route(64, 12_544, budget_bytes=2 * 2**30, batch_size=64).route
    'subspace'
    >>> choose_route(64, 1024, budget_bytes=2 * 2**30).route
    'moments'
    """
    k_fixed, fraction = _check_components(components, max_components)
    c, p = int(channels), int(pixels)
    q = min(k_fixed if fraction is None else max_components, p)
    block = min(q + oversample, p)
    common = 8 * c * p * 5 + 8 * batch_size * c * p
    chunk = max(p * p * 8, min(c * p * p * 8, BASIS_CHUNK_BYTES))
    moments = 8 * c * p * p + chunk + common
    subspace = 3 * 8 * c * p * block + common
    mib = 2.0**20

    def fmt(b: int) -> str:
        return f"{b / mib:,.1f} MiB"

    note = ""
    if images is not None:
        in_memory = 4 * c * int(images) * p
        fits = "fit" if in_memory <= budget_bytes else "not fit"
        note = (f"; the maps themselves (N = {images}) would take {fmt(in_memory)} in "
                f"float32 and {fits} the budget")
    if moments <= budget_bytes:
        return RouteChoice("moments", f"P x P moments of {c} channels of {p} pixels need "
                           f"{fmt(moments)} <= budget {fmt(budget_bytes)}: one pass plus the "
                           f"projection pass{note}", moments, subspace)
    if subspace <= budget_bytes:
        return RouteChoice("subspace", f"P x P moments of {c} channels of {p} pixels need "
                           f"{fmt(moments)} > budget {fmt(budget_bytes)}; subspace iteration "
                           f"with {block} columns needs {fmt(subspace)}: several passes"
                           f"{note}", moments, subspace)
    raise ValueError(f"neither route fits {fmt(budget_bytes)} for {c} channels of {p} pixels: "
                     f"moments need {fmt(moments)}, subspace iteration {fmt(subspace)} "
                     f"(with batches of {batch_size}); reduce the layer's channels in groups")


def streaming_reduce(batches: Batches, components: int | float = 3, *,
                     max_components: int = 10, budget_bytes: int | None = None,
                     route: Literal["moments", "subspace"] | None = None,
                     device: torch.device | str | None = None,
                     **subspace_options: float) -> tuple[Reduction, PixelBasis]:
    """The reduce step of one layer over batches of images, in memory independent of N.

    Parameters
    ----------
    batches : callable
        ``batches()`` returns an iterable of ``(B, C, H, W)`` (or ``(B, C, P)``) tensors,
        the same images in the same order on each call. Called twice on the moments
        route (accumulate, project), ``passes + 1`` times on the subspace route.
    components, max_components
        As for :func:`~pcace.reduce.pca.principal_components`.
    budget_bytes : int, optional
        Memory budget for :func:`choose_route` (default 1 GiB) when ``route`` is None.
    route : {"moments", "subspace"}, optional
        Force a route.
    device : torch.device or str, optional
        Where the moments and the iteration live (default: the CPU).
    **subspace_options
        ``oversample``, ``tol``, ``max_passes``, ``seed`` for :func:`subspace_basis`.

    Returns
    -------
    (Reduction, PixelBasis)
        The reduction (as :func:`~pcace.reduce.pca.reduce_block` gives it for all the images
        at once) and the basis it came from (route, passes, convergence).

    Examples
    --------
    >>> import torch
    >>> maps = torch.randn(500, 8, 6, 6)
    >>> red, basis = streaming_reduce(lambda: maps.split(128), 3)
    >>> tuple(red.scores.shape), basis.route
    ((8, 500, 3), 'moments')
    """
    it = iter(batches())
    head = next(it, None)
    if head is None:
        raise ValueError("batches() yielded no batch")
    shape = head.shape
    c, p = int(shape[1]), int(math.prod(shape[2:]))
    if route is None:
        route = choose_route(c, p, components, max_components=max_components,
                             budget_bytes=2**30 if budget_bytes is None else budget_bytes,
                             batch_size=int(shape[0])).route
    first = chain([head], it)
    if route == "moments":
        acc = PixelMoments(c, p, device=device)
        for batch in first:
            acc.update(batch)
        basis = acc.basis(components, max_components=max_components)
    elif route == "subspace":
        basis = subspace_basis(batches, components, max_components=max_components,
                               device=device, first=first, **subspace_options)  # type: ignore[arg-type]
    else:
        raise ValueError(f"route must be 'moments' or 'subspace'; got {route!r}")
    return basis.finish([basis.project(b) for b in _iterate(batches)]), basis


def _iterate(batches: Batches) -> Iterator[torch.Tensor]:
    yield from batches()
