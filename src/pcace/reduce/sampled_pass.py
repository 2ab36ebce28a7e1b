"""The pass over all images of the sampled-basis reduce, and its Rayleigh-Ritz finish.

:class:`SampledPass` is what :meth:`pcace.reduce.sampled.SampleBasis.start_pass` returns;
the method and its guarantees are described in :mod:`pcace.reduce.sampled`.

Per batch (``B`` images of ``C`` channels of ``P`` pixels) the pass reads the maps once:
``(x - shift) @ W`` into the kept ``(C, N, l)`` projections (float16, scaled per column,
by default), and each pixel's
sum and sum of squares of ``x - shift`` (float64) and its minimum and maximum. On the
CPU one compiled kernel does all of it (parallel over channels, no copy of the batch);
elsewhere (CUDA) the same in torch with one float32 temporary of the batch's size.
Statistics taken about the sample mean (``shift``) keep the sums of squares free of
cancellation. The ``l x l`` moments of the projections are formed when the pass
finishes, from the kept projections, in float64 with the mean removed first.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from numba import njit

from ..core.threads import parallel_ranges
from .pca import CONSTANT_ULPS, Reduction, components_kept, fix_signs, numerical_rank
from .sampled_check import CHECK_THRESHOLD, SampleCheck, SampledBasisWarning
from .standardise import NonFiniteMaps

__all__ = ["SampledPass", "rayleigh_ritz"]

#: Eigenvalues of ``U^T U`` below this share of its largest are directions the subspace
#: does not have (axes past the sample's rank, or resting on pixels constant over ``N``).
RITZ_RTOL = 1e-10

#: Rows of projections rotated (widened to float64) at once, per channel.
ROWS = 8192


def rayleigh_ritz(cov: torch.Tensor, gram: torch.Tensor, *, rtol: float = RITZ_RTOL
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The best components within a subspace spanned by non-orthonormal axes (batched).

    For data ``z`` projected on axes ``U`` (``y = z U``), ``cov`` is the covariance of
    ``y`` (``U^T S U``, ``S`` the covariance of ``z``) and ``gram`` is ``U^T U``. The Ritz
    pairs of ``S`` in ``span(U)`` solve ``cov a = theta gram a``: the rotation ``R``
    returned makes ``y R`` the components of ``z`` in that subspace with the largest
    variances ``theta`` (descending), ``R^T gram R = I`` on the directions the subspace
    has, and ``R^T cov R = diag(theta)``. Directions whose ``gram`` eigenvalue is below
    ``rtol`` of the largest are dropped (zero columns of ``R``, ``theta`` 0).

    Parameters
    ----------
    cov, gram : torch.Tensor
        ``(C, l, l)`` symmetric, float64 advised.
    rtol : float
        See above.

    Returns
    -------
    theta : torch.Tensor
        ``(C, l)``, descending, clamped at 0.
    rotation : torch.Tensor
        ``(C, l, l)``.

    Examples
    --------
    >>> import torch
    >>> s = torch.diag(torch.tensor([9.0, 4.0, 1.0], dtype=torch.float64))
    >>> u = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    >>> theta, rot = rayleigh_ritz((u.T @ s @ u)[None], (u.T @ u)[None])
    >>> [round(v, 9) for v in theta[0].tolist()]
    [9.0, 4.0]
    """
    if cov.shape != gram.shape or cov.ndim != 3 or cov.shape[1] != cov.shape[2]:
        raise ValueError(f"cov and gram must both be (C, l, l); got {tuple(cov.shape)} and "
                         f"{tuple(gram.shape)}")
    mu, q = torch.linalg.eigh(0.5 * (gram + gram.transpose(1, 2)))
    top = mu[:, -1:].clamp(min=0)
    keep = (mu > rtol * top) & (top > 0)
    tiny = torch.finfo(mu.dtype).tiny
    t = q * torch.where(keep, mu.clamp(min=tiny).rsqrt(), 0.0)[:, None, :]
    inner = t.transpose(1, 2) @ cov @ t
    theta, s = torch.linalg.eigh(0.5 * (inner + inner.transpose(1, 2)))
    return theta.flip(-1).clamp(min=0), t @ s.flip(-1)


class SampledPass:
    """The one pass of the sampled-basis reduce over ``N`` images, for one layer.

    Add every image once with :meth:`add` (batches in any order, each at its image
    offset), then :meth:`finish`.

    Parameters
    ----------
    basis : SampleBasis
        The sample's standardisation and axes.
    n_images : int
        ``N``.
    store : torch.device or str, optional
        Where the ``(C, N, l)`` projections (and the scores) live; default the basis's
        device.
    residuals : bool, default False
        Also accumulate ``S U`` (``(C, l, P)`` float64, and about a third more work per
        batch), so that the check's ``angle`` (residual over gap) can be computed; it
        is None otherwise. The warning does not use it.
    store_dtype : torch.dtype, default torch.float16
        How the projections are kept: float16, each column divided by the sample's
        standard deviation of that component (at least 1e-3 of the first's;
        :attr:`scale`), half the memory of float32 (measured on ResNet-20's 688
        channels: PCACE values within 8e-4 of float32's, a layer's 99th percentile of
        the difference from the exact route within 1e-4; ``benchmarks/README.md``), or
        float32 as computed. A projection that would overflow float16 (65,504 scales
        out) raises.

    Examples
    --------
    >>> import torch
    >>> from pcace.reduce.sampled import SampleBasis
    >>> maps = torch.randn(100, 3, 5, 5)
    >>> run = SampleBasis.from_maps(maps[::4], 2).start_pass(100)
    >>> run.add(maps[50:], 50); run.add(maps[:50], 0)
    >>> red, check = run.finish(warn=False)
    >>> tuple(red.scores.shape), check.width
    ((3, 100, 2), 12)
    """

    def __init__(self, basis: Any, n_images: int, *,  # a SampleBasis (pcace.reduce.sampled)
                 store: torch.device | str | None = None,
                 store_dtype: torch.dtype = torch.float16, residuals: bool = False):
        if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 2:
            raise ValueError(f"n_images must be an int >= 2; got {n_images!r}")
        if store_dtype not in (torch.float16, torch.float32):
            raise ValueError(f"store_dtype must be torch.float16 or torch.float32; got "
                             f"{store_dtype}")
        self.basis = basis
        self.n_images = n_images
        dev = basis.mean.device
        self.store = dev if store is None else torch.device(store)
        c, p, width = basis.channels, basis.pixels, basis.width
        self.projections: torch.Tensor | None = torch.empty(
            (c, n_images, width), dtype=store_dtype, device=self.store)
        #: ``(C, l)`` float32: a kept projection times its column's scale is the projection
        self.scale = torch.ones((c, width), dtype=torch.float32, device=dev)
        if store_dtype == torch.float16:
            # each column's sample standard deviation, at least 1e-3 of the first's: a
            # direction quiet in the sample may be loud over all N, and float16 ends at
            # 65,504 (its relative precision does not depend on the scale)
            root = basis.eigenvalues.sqrt().to(torch.float32)
            root = torch.maximum(root, 1e-3 * root[:, :1])
            self.scale = torch.where(root > 0, root, 1.0)
        self._inv_scale = (1.0 / self.scale).cpu().numpy()
        self._sums = torch.zeros((c, p), dtype=torch.float64, device=dev)
        self._squares = torch.zeros_like(self._sums)
        # sum over images of y (x - shift)^T: gives the covariance applied to the axes
        self._cross = torch.zeros((c, width, p) if residuals else (c, 0, 0),
                                  dtype=torch.float64, device=dev)
        self.residuals = bool(residuals)
        self._lo = torch.full((c, p), math.inf, dtype=torch.float32, device=dev)
        self._hi = torch.full((c, p), -math.inf, dtype=torch.float32, device=dev)
        self._seen = torch.zeros(n_images, dtype=torch.bool)

    @staticmethod
    def bytes_needed(channels: int, pixels: int, n_images: int, width: int,
                     itemsize: int = 2, residuals: bool = False) -> int:
        """Bytes a pass holds: projections (``itemsize`` bytes each) and statistics.

        Not counted: the basis, and the float32 scores :meth:`finish` returns.

        Examples
        --------
        >>> round(SampledPass.bytes_needed(688, 64, 50_000, 13) / 2**30, 2)
        0.83
        """
        return (itemsize * channels * n_images * width
                + (24 + 8 * width * residuals) * channels * pixels + n_images)

    @property
    def nbytes(self) -> int:
        """Bytes held by the pass (projections and statistics)."""
        held = 0 if self.projections is None else \
            self.projections.numel() * self.projections.element_size()
        return held + 24 * self._sums.numel() + 8 * self._cross.numel() + self._seen.numel()

    def add(self, maps: torch.Tensor, offset: int) -> None:
        """Project a batch ``(B, C, H, W)`` or ``(B, C, P)``: the images ``offset .. offset+B-1``.

        float64 maps are rounded to float32 (the pass works in float32). Each image must
        be added exactly once.
        """
        x = self.basis._check(maps)
        b = x.shape[0]
        rows = self._rows(offset, b)
        if b == 0:
            return
        x = x.to(torch.float32)
        on_cpu = x.device.type == "cpu" and self.store.type == "cpu" and \
            self._sums.device.type == "cpu"
        if on_cpu:
            x = x.contiguous()
            direct = self.projections.dtype == torch.float32
            out = self.projections if direct else torch.empty(
                (x.shape[1], b, self.basis.width), dtype=torch.float32)
            parallel_ranges(_pass_range, x.shape[1], x.numpy(), self.basis.shift.numpy(),
                            self.basis.weights_t.numpy(), out.numpy(),
                            offset if direct else 0, self._inv_scale, self._sums.numpy(),
                            self._squares.numpy(), self._lo.numpy(), self._hi.numpy(),
                            self._cross.numpy(), self.residuals)
            if not direct:
                self._keep_numpy(out.numpy(), rows)
        else:
            self._add_torch(x.to(self._sums.device), rows)
        self._seen[rows] = True

    def add_sample(self, standardised: torch.Tensor, offset: int = 0) -> None:
        """Add the basis's own sample, as images ``offset .. offset+m-1``, from its
        standardised block: what :meth:`SampleBasis.from_block` left in the block it was
        given (``(C, m, P)``, contiguous).

        The same as :meth:`add` on the sample's maps, up to rounding, without reading them
        again: their projections are the block times the axes, their pixel statistics
        those the basis took (:attr:`SampleBasis.std`, ``low``, ``high``).

        Examples
        --------
        >>> import torch
        >>> from pcace.reduce.sampled import SampleBasis
        >>> maps = torch.randn(100, 3, 25)
        >>> block = maps[:40].transpose(0, 1).contiguous()
        >>> basis = SampleBasis.from_block(block, 2)
        >>> run = basis.start_pass(100)
        >>> run.add_sample(block); run.add(maps[40:], 40)
        >>> tuple(run.finish(warn=False)[0].scores.shape)
        (3, 100, 2)
        """
        basis = self.basis
        if basis.std is None:
            raise ValueError("add_sample needs a basis built from the sample's maps "
                             "(SampleBasis.from_block or from_maps); add the maps instead")
        m = basis.count
        if tuple(standardised.shape) != (basis.channels, m, basis.pixels) \
                or not standardised.is_contiguous():
            raise ValueError(f"standardised must be the basis's contiguous (C, m, P) = "
                             f"{(basis.channels, m, basis.pixels)} block; got "
                             f"{tuple(standardised.shape)}")
        rows = self._rows(offset, m)
        shift = basis.shift.to(torch.float64)
        delta = basis.mean - shift  # the sample mean's rounding in the shift
        dev = standardised.device
        lift = ((delta * basis.inv_std)[:, None, :] @ basis.axes).to(dev, standardised.dtype)
        y = torch.bmm(standardised, basis.axes.to(standardised.dtype)).add_(lift)
        self._keep(y.to(torch.float32), rows)
        if self.residuals:
            d = standardised * basis.std.to(standardised.dtype)[:, None, :] \
                + delta.to(standardised.dtype)[:, None, :]
            self._cross += torch.bmm(y.transpose(1, 2), d).to(torch.float64)
        self._sums += m * delta
        self._squares += m * (basis.std.square() + delta.square())
        torch.minimum(self._lo, basis.low.to(torch.float32), out=self._lo)
        torch.maximum(self._hi, basis.high.to(torch.float32), out=self._hi)
        self._seen[rows] = True

    def _rows(self, offset: int, b: int) -> slice:
        """The rows of ``b`` images at ``offset``, checked: inside the pass, not added."""
        if self.projections is None:
            raise ValueError("this pass has finished; start a new one")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 \
                or offset + b > self.n_images:
            raise ValueError(f"images {offset} .. {offset}+{b} fall outside the pass's "
                             f"{self.n_images} images")
        rows = slice(offset, offset + b)
        if bool(self._seen[rows].any()):
            first = offset + int(self._seen[rows].to(torch.int8).argmax())
            raise ValueError(f"image {first} was added to this pass before")
        return rows

    def _add_torch(self, x: torch.Tensor, rows: slice) -> None:
        d = x - self.basis.shift
        y = torch.matmul(d.transpose(0, 1), self.basis.weights)
        self._keep(y, rows)
        if self.residuals:
            self._cross += torch.matmul(y.transpose(1, 2), d.transpose(0, 1)).to(torch.float64)
        self._sums += d.sum(dim=0).to(torch.float64)
        self._squares += d.square_().sum(dim=0).to(torch.float64)
        lo, hi = torch.aminmax(x, dim=0)
        torch.minimum(self._lo, lo, out=self._lo)
        torch.maximum(self._hi, hi, out=self._hi)

    def _keep_numpy(self, scaled: np.ndarray, rows: slice) -> None:
        """Store float32 projections already divided by :attr:`scale`, as float16.

        In NumPy: torch's threads, woken right after the compiled kernel's, made these
        small operations 10 to 30 times slower.
        """
        kept = self.projections.numpy()[:, rows]
        with np.errstate(over="ignore", invalid="ignore"):
            np.copyto(kept, scaled, casting="unsafe")
        if np.isinf(kept).any():
            raise ValueError("a projection overflows float16 (more than 65,504 times its "
                             "column's scale), or the maps hold inf; use "
                             "store_dtype=torch.float32")

    def _keep(self, y: torch.Tensor, rows: slice) -> None:
        """Store a batch's float32 projections ``(C, B, l)`` in the kept dtype."""
        if self.projections.dtype == torch.float32:
            self.projections[:, rows] = y.to(self.store)
            return
        v = y / self.scale[:, None, :]
        if not bool(torch.isfinite(v).all()) or bool((v.abs() > 65504.0).any()):
            if bool(torch.isfinite(y).all()):
                raise ValueError("a projection overflows float16 (more than 65,504 times its "
                                 "column's scale); use store_dtype=torch.float32")
        self.projections[:, rows] = v.to(self.store, torch.float16)

    def finish(self, *, threshold: float = CHECK_THRESHOLD, warn: bool = True,
               layer: str | None = None) -> tuple[Reduction, SampleCheck]:
        """Rayleigh-Ritz over all images: the :class:`~pcace.reduce.pca.Reduction` and the check.

        Parameters
        ----------
        threshold : float, default :data:`CHECK_THRESHOLD`
            The self-check's threshold on ``ratio``.
        warn : bool, default True
            Warn (:class:`SampledBasisWarning`, one line) when some channel is poor.
        layer : str, optional
            The layer's name, for the warning.

        Returns
        -------
        Reduction
            ``scores`` ``(C, N, width)`` float32 on the store device (sign rule over all
            ``N``); ``n_components``, ``explained_variance`` (over all ``N``), ``dead``.
        SampleCheck
            The self-check.

        The projections are released: a pass finishes once.
        """
        if self.projections is None:
            raise ValueError("this pass has finished already")
        if not bool(self._seen.all()):
            missing = (~self._seen).nonzero().flatten()
            raise ValueError(f"{missing.numel()} of the pass's {self.n_images} images were "
                             f"never added (the first: image {int(missing[0])})")
        bad = ~torch.isfinite(self._sums).all(dim=1) | ~torch.isfinite(self._squares).all(dim=1)
        if bool(bad.any()):
            raise NonFiniteMaps(bad.nonzero().flatten().tolist())
        basis, n = self.basis, self.n_images
        constant, ratio, inv_n = self._standardiser()
        dead = constant.all(dim=1)
        varying = (~constant).sum(dim=1).to(torch.float64)
        scale = self.scale.to(self.store, torch.float64)
        mean, cov = _moments(self.projections, scale)
        theta, rot = rayleigh_ritz(cov.to(ratio.device), _axes_gram(basis.axes, ratio))
        theta, rot = theta.cpu(), rot.cpu()
        rank = numerical_rank(theta * n, max(n, basis.pixels), torch.float32)
        n_comp, width = components_kept(theta * n, varying.cpu() * n, rank, dead.cpu(),
                                        basis.k_fixed, basis.fraction, basis.max_components)
        r = min(width, theta.shape[1])
        keep = (torch.arange(width)[None, :] < n_comp[:, None])
        turn = torch.zeros((basis.channels, theta.shape[1], width), dtype=torch.float64)
        turn[:, :, :r] = rot[:, :, :r] * keep[:, None, :r]
        scores = _rotate(self.projections, scale, mean, turn)
        self.projections = None
        fix_signs(scores)
        held = (theta[:, :r] * keep[:, :r]).sum(dim=1)
        share = torch.where(varying.cpu() > 0, held / varying.cpu().clamp(min=1), 0.0)
        angle = self._angles(mean, ratio, inv_n, theta, turn, n_comp) if self.residuals \
            else None
        check = self._check(share, theta, n_comp, constant.cpu(), dead.cpu(), threshold, r,
                            angle)
        message = check.message(layer)
        if warn and message:
            warnings.warn(message, SampledBasisWarning, stacklevel=2)
        return Reduction(scores=scores, n_components=n_comp, explained_variance=share,
                         dead=dead.cpu()), check

    def _standardiser(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pixels constant over all ``N``, each pixel's ``std_N / std_sample``, ``1 / std_N``.

        The ratio is 0 where the pixel is constant over either, ``1 / std_N`` where it is
        constant over all ``N``.
        """
        n = self.n_images
        d = self._sums / n
        std = (self._squares / n - d.square()).clamp(min=0).sqrt()
        scale = torch.maximum(self._lo.abs(), self._hi.abs()).to(torch.float64)
        eps = max(self.basis.eps, torch.finfo(torch.float32).eps)
        constant = (self._hi <= self._lo) | (std <= CONSTANT_ULPS * eps * scale)
        ratio = torch.where(constant | self.basis.constant, 0.0, std * self.basis.inv_std)
        inv = torch.where(constant, 0.0, 1.0 / torch.where(constant, 1.0, std))
        return constant, ratio, inv

    def _angles(self, mean: torch.Tensor, ratio: torch.Tensor, inv: torch.Tensor,
                theta: torch.Tensor, turn: torch.Tensor, n_comp: torch.Tensor
                ) -> torch.Tensor:
        """Per channel, the kept components' estimated angle to the exact ones.

        In the metric of the maps standardised over all ``N`` (covariance ``S``), the kept
        Ritz vectors are ``u_j = U a_j`` (``a_j`` the columns of ``turn``); ``S U`` comes
        from the pass's ``y d^T`` sums. Each residual ``||S u_j - theta_j u_j||`` over
        the gap ``theta_j - theta_{k+1}`` (``theta_{l+1} = 0``) estimates ``u_j``'s
        angle to the exact top-``k`` subspace; the estimate is their root sum of squares.
        """
        basis, n = self.basis, self.n_images
        dev = self._cross.device
        shifted = self._sums / n  # mean of x - shift
        c, width, p = self._cross.shape
        turn_d, theta_d = turn.to(dev), theta.to(dev)
        resid = torch.empty((c, turn.shape[2]), dtype=torch.float64, device=dev)
        step = max(1, (64 * 2**20) // (8 * p * width))
        for lo in range(0, c, step):
            sl = slice(lo, min(c, lo + step))
            su_t = (self._cross[sl] / n - mean[sl, :, None].to(dev) * shifted[sl, None, :])
            su_t *= inv[sl, None, :]  # (S U)^T
            u_t = (basis.axes[sl] * ratio[sl, :, None]).transpose(1, 2)  # U^T
            a_t = turn_d[sl].transpose(1, 2)
            r = a_t @ su_t - theta_d[sl, :a_t.shape[1], None] * (a_t @ u_t)
            resid[sl] = torch.linalg.vector_norm(r, dim=2)
        resid = resid.cpu()
        # each kept pair's residual over its distance to the next value past the kept ones
        padded = torch.nn.functional.pad(theta, (0, resid.shape[1] + 1))
        after = padded.gather(1, n_comp[:, None])  # theta_{k+1}
        gap = padded[:, :resid.shape[1]] - after
        kept = torch.arange(resid.shape[1])[None, :] < n_comp[:, None]
        ratio_j = torch.where(gap > 0, resid / gap.clamp(min=1e-300), math.inf)
        ratio_j = torch.where(kept & (resid > 0), ratio_j, 0.0)
        return torch.linalg.vector_norm(ratio_j, dim=1)

    def _check(self, share: torch.Tensor, theta: torch.Tensor, n_comp: torch.Tensor,
               constant: torch.Tensor, dead: torch.Tensor, threshold: float,
               r: int, angle: torch.Tensor) -> SampleCheck:
        basis = self.basis
        vals = basis.eigenvalues.cpu()[:, :r]
        kept = torch.arange(r)[None, :] < n_comp[:, None]
        total = basis.total.cpu()
        claimed = torch.where(total > 0, (vals * kept).sum(dim=1) / total.clamp(
            min=torch.finfo(torch.float64).tiny), 0.0)
        ratio_all = torch.where(claimed > 0, share / claimed.clamp(min=1e-300),
                                torch.where(share > 0, 0.0, 1.0))
        n, m = self.n_images, min(basis.count, self.n_images / 2)
        ratio = (n * ratio_all - m) / (n - m)
        varying = (~constant).sum(dim=1).to(torch.float64)
        subspace = torch.where(varying > 0, theta.sum(dim=1) / varying.clamp(min=1), 0.0)
        sample_dead = basis.constant.cpu().all(dim=1)
        poor = ~dead & ((ratio < threshold) | sample_dead)
        unseen = (basis.constant.cpu() & ~constant).sum(dim=1)
        return SampleCheck(sample_size=basis.count, width=basis.width, threshold=threshold,
                           explained=share, sample_explained=claimed, ratio=ratio,
                           subspace_explained=subspace, unseen=unseen, poor=poor,
                           angle=angle, ratio_all=ratio_all)


def _axes_gram(axes: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """``U^T U`` with ``U = diag(ratio) axes`` per channel, ``(C, l, l)`` float64."""
    c, p, width = axes.shape
    out = torch.empty((c, width, width), dtype=torch.float64, device=axes.device)
    step = max(1, (64 * 2**20) // (8 * p * width))
    for lo in range(0, c, step):
        u = axes[lo:lo + step] * ratio[lo:lo + step, :, None]
        out[lo:lo + step] = u.transpose(1, 2) @ u
    return out


def _moments(y: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the mean ``(C, l)`` and covariance ``(C, l, l)`` of ``(C, N, l)`` rows.

    The rows are ``y * scale``. One pass in float64 chunks of rows (widened through
    float32: twice as fast as float16 to float64 directly), the cross products taken
    about the first chunk's mean, so that they do not cancel; the scales applied to the
    ``l x l`` results.
    """
    c, n, width = y.shape
    total = torch.zeros((c, width), dtype=torch.float64, device=y.device)
    cross = torch.zeros((c, width, width), dtype=torch.float64, device=y.device)
    centre = None
    for lo in range(0, n, ROWS):
        part = y[:, lo:lo + ROWS].to(torch.float32).to(torch.float64)
        if centre is None:
            centre = part.mean(dim=1, keepdim=True)
        part -= centre
        total += part.sum(dim=1)
        cross.baddbmm_(part.transpose(1, 2), part)
    shift = total / n  # the mean less the centre
    cov = cross / n - shift[:, :, None] * shift[:, None, :]
    s = scale.to(y.device, torch.float64)
    mean = (shift + centre[:, 0]) * s
    return mean.cpu(), (cov * s[:, :, None] * s[:, None, :]).cpu()


def _rotate(y: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, turn: torch.Tensor
            ) -> torch.Tensor:
    """``(y * scale - mean) @ turn`` per channel, float32 ``(C, N, width)``.

    As ``y @ (diag(scale) turn) - mean @ turn``, in float32 chunks of rows (``y`` holds
    11 bits, the result is float32).
    """
    c, n, _ = y.shape
    out = torch.empty((c, n, turn.shape[2]), dtype=torch.float32, device=y.device)
    turn = turn.to(y.device, torch.float64)
    weights = (turn * scale.to(y.device, torch.float64)[:, :, None]).to(torch.float32)
    offset = (mean.to(y.device, torch.float64)[:, None, :] @ turn).to(torch.float32)
    for lo in range(0, n, ROWS):
        rows = slice(lo, lo + ROWS)
        out[:, rows] = torch.baddbmm(offset, y[:, rows].to(torch.float32), weights, beta=-1)
    return out


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _dots(d, rows, wt, y):  # pragma: no cover - compiled
    """``y[r, k] = d[r] . wt[k]`` for ``r < rows`` (1 or 2), four axes at a time.

    Two rows against four axes keep eight sums in registers: each load of a weight serves
    two rows and each load of a row four axes (2.1x the speed of one dot product at a
    time on ResNet-20's 32 x 32 layers).
    """
    width, p = wt.shape
    d0 = d[0]
    d1 = d[1] if rows == 2 else d[0]
    k = 0
    while k + 4 <= width:
        w0, w1, w2, w3 = wt[k], wt[k + 1], wt[k + 2], wt[k + 3]
        s00 = s01 = s02 = s03 = np.float32(0.0)
        s10 = s11 = s12 = s13 = np.float32(0.0)
        for j in range(p):
            u, v = d0[j], d1[j]
            s00 += u * w0[j]
            s01 += u * w1[j]
            s02 += u * w2[j]
            s03 += u * w3[j]
            s10 += v * w0[j]
            s11 += v * w1[j]
            s12 += v * w2[j]
            s13 += v * w3[j]
        y[0, k], y[0, k + 1], y[0, k + 2], y[0, k + 3] = s00, s01, s02, s03
        y[1, k], y[1, k + 1], y[1, k + 2], y[1, k + 3] = s10, s11, s12, s13
        k += 4
    while k < width:
        wk = wt[k]
        s0 = s1 = np.float32(0.0)
        for j in range(p):
            s0 += d0[j] * wk[j]
            s1 += d1[j] * wk[j]
        y[0, k], y[1, k] = s0, s1
        k += 1


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _pass_range(c0, c1, x, shift, wt, out, offset, inv_scale, sums, squares, lo, hi, cross,
                residuals):  # pragma: no cover - compiled
    # one read of each map: d = x - shift, its projections y (written divided by the
    # column scales), the pixel statistics and (residuals) y d^T; sums over the batch in
    # float32 (of centred values), then added to the float64 totals. Two images at a time
    # (_dots).
    b, _, p = x.shape
    width = wt.shape[1]
    d = np.empty((2, p), dtype=np.float32)
    y = np.empty((2, width), dtype=np.float32)
    a1 = np.empty(p, dtype=np.float32)
    a2 = np.empty(p, dtype=np.float32)
    part = np.empty((width if residuals else 0, p), dtype=np.float32)
    for c in range(c0, c1):
        sh, w, mn, mx, inv = shift[c], wt[c], lo[c], hi[c], inv_scale[c]
        a1[:] = 0.0
        a2[:] = 0.0
        part[:] = 0.0
        for i0 in range(0, b, 2):
            rows = min(2, b - i0)
            for r in range(rows):
                row, dr = x[i0 + r, c], d[r]
                for j in range(p):
                    v = row[j]
                    dv = v - sh[j]
                    dr[j] = dv
                    a1[j] += dv
                    a2[j] += dv * dv
                    mn[j] = min(mn[j], v)
                    mx[j] = max(mx[j], v)
            _dots(d, rows, w, y)
            for r in range(rows):
                for k in range(width):
                    out[c, offset + i0 + r, k] = y[r, k] * inv[k]
                if residuals:
                    dr = d[r]
                    for k in range(width):
                        yk = y[r, k]
                        pk = part[k]
                        for j in range(p):
                            pk[j] += dr[j] * yk
        s1, s2 = sums[c], squares[c]
        for j in range(p):
            s1[j] += a1[j]
            s2[j] += a2[j]
        if residuals:
            acc_c = cross[c]
            for k in range(width):
                for j in range(p):
                    acc_c[k, j] += part[k, j]
