"""A layer's standardisation and principal axes, found over passes of the images.

:class:`PixelBasis` is what the projection pass needs: per channel the per-pixel mean and
inverse standard deviation, the kept principal axes, and what :func:`finish_basis`
decided about them (rank, ``k``, explained variance) by the rules of
:func:`~pcace.reduce.pca.reduce_block`. :meth:`PixelBasis.finish` turns the projected
scores of all images into the :class:`~pcace.reduce.pca.Reduction` the in-memory route
gives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .batches import as_cbp, image_chunks
from .pca import Reduction, components_kept, fix_signs, numerical_rank

__all__ = ["PixelBasis", "finish_basis"]


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
        for part in image_chunks(batch):  # bounded float64 copies of large maps
            x, _ = as_cbp(part, self.mean.device)
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
        >>> from pcace.reduce.moments import PixelMoments
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


def finish_basis(mean: torch.Tensor, inv: torch.Tensor, constant: torch.Tensor,
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
