"""A one-pass reduce: principal axes from a sample of images, Rayleigh-Ritz over all of them.

The exact PCA of a channel's ``N x P`` standardised maps needs every map at once, or
``P x P`` moments and a second forward pass, or a subspace iteration over many passes.
This route needs one pass:

1. :class:`SampleBasis` takes each channel's standardisation (per-pixel mean and
   population standard deviation, constant pixels dropped) and its top ``l = k + extra``
   principal axes from a sample of ``m`` images, and folds them into projection weights
   ``W`` ``(C, P, l)`` and a shift ``s`` ``(C, P)``: a map ``x`` projects to
   ``y = (x - s) @ W``.
2. :class:`SampledPass` projects every one of the ``N`` images in the one pass, keeps the
   ``(C, N, l)`` projections (float16 scaled per column by default, or float32), and
   gathers each pixel's sum, sum of squares,
   minimum and maximum over all ``N`` (``P`` numbers per channel each). On the CPU a
   compiled kernel does all of it in one read of the batch.
3. :meth:`SampledPass.finish` standardises by the statistics of all ``N`` images, as the
   exact route does, and rotates within the ``l``-dimensional subspace to the best ``k``
   components for all ``N`` images (Rayleigh-Ritz): the subspace's axes, measured in the
   metric of the maps standardised over all ``N``, are ``U = diag(std_N / std_m) V``
   (``V`` the sample's axes); the Ritz pairs are the eigenpairs of the ``l x l``
   covariance of the projections relative to ``U^T U``. The ``k`` components are
   therefore the best that the subspace holds for the maps standardised over all
   ``N``, and their explained variance is measured over all ``N`` (the exact route's
   ``explained_variance``, never more than it).

Where the sample is all the images (``m >= N``, in any order) the result is that of
:func:`~pcace.reduce.pca.reduce_block` on all maps, up to the rounding of the kept
projections (``tests/test_sampled.py``: within ``1e-5`` of each component's scale with
float32 storage, ``2e-3`` with float16). The same rules apply: population standard
deviation, the constant-column rule (:data:`~pcace.reduce.pca.CONSTANT_ULPS`, with
float32's epsilon: the pass works in float32), ``k`` fixed or from a variance fraction
(capped at ``max_components``), the numerical-rank rule, dead channels (scores 0), the
sign rule over all ``N`` scores.

Pixels the sample and the whole set disagree on: a pixel constant in the sample but not
over all ``N`` (a rarely active unit) has weight 0, so no component can use it; its
variance still counts in the total over all ``N``, so the explained variance and the
self-check show what it costs (:attr:`SampleCheck.unseen` counts such pixels). A channel
constant over the whole sample but not over all ``N`` gets no components and is marked
poor. (The converse, constant over all ``N`` but not over the sample, can only happen to
a pixel at the constant-column threshold; its rounding-level variation then stays in the
projections, though it is left out of the metric.)

The self-check (:class:`SampleCheck`), per channel: ``ratio``, the share of the variance
that the ``k`` components capture over the images outside the sample (estimated from the
share over all ``N``), against the share the sample claimed for its own top ``k``, marks
the channel poor below :data:`CHECK_THRESHOLD`, and :meth:`SampledPass.finish` then warns
(:class:`SampledBasisWarning`) with one line naming the layer's poor channels. On
request (``residuals=True``) the pass also accumulates ``S U`` (``S`` the covariance of
the maps standardised over all ``N``), so each kept Ritz pair's residual is known:
``angle``, residual over gap, estimates how far the components are from the exact ones
(conservative: 2 to 8 times the true largest principal angle in the tests). How both
predict the difference from the exact route:
``benchmarks/README.md`` ("Sampled basis: accuracy").

Memory per layer: the projections, ``2 C N l`` bytes (float16) or ``4 C N l`` (float32),
plus ``24 C P`` of pixel statistics (and ``8 C l P`` with ``residuals``);
:meth:`SampledPass.finish` returns
``4 C N k`` of scores and releases the projections. Speed: on the CPU one compiled pass
over each batch (projection and pixel statistics together). The sample's axes
(:func:`sample_axes`) come from a randomized range finder with power iterations where
that costs fewer multiply-adds than the ``min(m, P)``-sided Gram matrix (ResNet-20's
32 x 32 layers: 0.24 s against 0.48 s per layer at m = 2,000), else from the Gram's top
eigenpairs; they are only a subspace for the Rayleigh-Ritz step over all ``N``, whose
accuracy against the exact route is measured in ``benchmarks/README.md`` ("The sample's
axes").
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..core.validation import components as check_components
from .moments import PixelMoments
from .pca import CONSTANT_ULPS, _eigen, numerical_rank
from .sampled_check import CHECK_THRESHOLD, SampleCheck, SampledBasisWarning
from .sampled_pass import SampledPass, rayleigh_ritz
from .standardise import NonFiniteMaps

__all__ = ["CHECK_THRESHOLD", "EXTRA", "MIN_SAMPLE", "SampleBasis", "SampleCheck",
           "SampledBasisWarning", "SampledPass", "range_precision", "rayleigh_ritz",
           "resolve_solver", "sample_axes", "sample_indices", "sample_size"]

#: Sample axes beyond the components kept: ``l = k + EXTRA`` (``max_components + EXTRA``
#: for a variance fraction). Measured on ResNet-20 at N = 5,000, m = 2,000: with 2, 5 and
#: 10, 13, 18 and 18 of 19 layers meet the issue's bar (Spearman >= 0.99, 99th
#: percentile of |difference| <= 0.01), the channels the self-check passes within 0.026,
#: 0.0099 and 0.0066 (``benchmarks/README.md``, "Sampled basis: accuracy").
EXTRA = 10

#: The sample size below which the route is not worth it, and the least it uses.
MIN_SAMPLE = 2000

#: Columns of the randomized range finder beyond ``l``, and its power iterations
#: (:func:`sample_axes`). Measured against the exact solver on ResNet-20 at N = 5,000
#: (``benchmarks/README.md``, "The sample's axes"): with 3 power steps on every layer 15
#: of 19 layers met the issue's bar, with 5 steps where the range finder is cheaper (the
#: 32 x 32 layers) and the exact solver elsewhere 18 of 19, as many as the exact solver.
OVERSAMPLE = 8
POWER_STEPS = 5
#: How :class:`SampleBasis` finds the sample's axes unless told (:func:`sample_axes`).
SOLVER = "auto"
#: The precision of the range finder's power iterations unless told
#: (:func:`range_precision`): ``"auto"``, ``"bfloat16"`` or ``"float32"``.
RANGE_PRECISION = "auto"

#: Bytes of float64 work arrays formed at once (sample standardisation, rotation).
CHUNK_BYTES = 64 * 2**20

def sample_size(n_images: int) -> int:
    """The recommended ``m`` for ``N`` images: ``min(N, max(2000, N // 10))``.

    Measured (``benchmarks/README.md``): on ResNet-20, m = 2,000 brings 18 of 19 layers
    to the issue's bar at N = 5,000 (the 19th once its marked channels are reduced
    exactly); at N = 50,000 the channels the self-check passes are within 0.0096 of the
    exact route with m = 2,000 and within 0.0042 with m = 5,000.

    Examples
    --------
    >>> sample_size(5000), sample_size(50_000), sample_size(1500)
    (2000, 5000, 1500)
    """
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be an int >= 1; got {n_images!r}")
    return min(n_images, max(MIN_SAMPLE, n_images // 10))


def sample_indices(n_images: int, size: int, *, seed: int = 0) -> torch.Tensor:
    """``size`` distinct image indices out of ``n_images``, drawn at random, ascending.

    All of them (``arange``) when ``size >= n_images``. Deterministic for a seed.

    Examples
    --------
    >>> sample_indices(10, 4, seed=1).tolist()
    [1, 2, 5, 6]
    >>> sample_indices(3, 5).tolist()
    [0, 1, 2]
    """
    if n_images < 1 or size < 1:
        raise ValueError(f"n_images and size must be >= 1; got {n_images}, {size}")
    if size >= n_images:
        return torch.arange(n_images)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_images, generator=gen)[:size].sort().values


def _flat(maps: torch.Tensor, what: str) -> torch.Tensor:
    """A ``(B, C, H, W)`` or ``(B, C, P)`` float tensor as ``(B, C, P)``."""
    if not isinstance(maps, torch.Tensor):
        maps = torch.as_tensor(maps)
    if maps.ndim == 4:
        maps = maps.flatten(2)
    if maps.ndim != 3 or maps.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{what} must be a (B, C, H, W) or (B, C, P) float32 or float64 "
                         f"tensor; got {tuple(maps.shape)} {maps.dtype}")
    return maps.detach()


@dataclass
class SampleBasis:
    """Each channel's standardisation and top ``l`` axes, from a sample of ``m`` images.

    Build it with :meth:`from_maps` or :meth:`from_block` (the sample's maps), or
    :meth:`from_moments` (the sample's ``P x P`` moments, streamed); then
    :meth:`start_pass`.

    Attributes
    ----------
    mean, inv_std : torch.Tensor
        ``(C, P)`` float64: per-pixel mean and inverse population standard deviation over
        the sample (0 for a constant pixel).
    constant : torch.Tensor
        ``(C, P)`` bool: pixels constant over the sample.
    axes : torch.Tensor
        ``(C, P, l)`` float64: the sample's top ``l`` principal axes of its standardised
        maps, descending (zero columns past the sample's numerical rank).
    eigenvalues : torch.Tensor
        ``(C, l)`` float64: the sample's component variances (per image), descending.
    total : torch.Tensor
        ``(C,)`` float64: the sample's total standardised variance per image (the number
        of its non-constant pixels).
    shift : torch.Tensor
        ``(C, P)`` float32: the sample mean, rounded; a map ``x`` projects to
        ``(x - shift) @ weights``.
    weights_t : torch.Tensor
        ``(C, l, P)`` float32: the projection weights ``inv_std * axes``, transposed
        (:attr:`weights` is the ``(C, P, l)`` view).
    count : int
        ``m``, the images in the sample.
    k_fixed, fraction, max_components
        The components asked for (as :func:`pcace.core.validation.components` returns).
    eps : float
        Machine epsilon of the sample's dtype (the constant-column rule's unit).
    std, low, high : torch.Tensor or None
        ``(C, P)`` float64: each pixel's population standard deviation, minimum and
        maximum over the sample (:meth:`from_block` and :meth:`from_maps`; None from
        :meth:`from_moments`), so that :meth:`SampledPass.add_sample` can add the sample
        to a pass without reading its maps again.
    solver : str
        How the axes were found: ``"randomized"``, ``"randomized-bfloat16"`` (its power
        iterations in bfloat16, :func:`range_precision`) or ``"exact"``
        (:func:`sample_axes`), ``"moments"`` (:meth:`from_moments`).

    Examples
    --------
    >>> import torch
    >>> maps = torch.randn(200, 4, 6, 6)
    >>> basis = SampleBasis.from_maps(maps[:50], components=3, extra=2)
    >>> tuple(basis.weights.shape), basis.width
    ((4, 36, 5), 5)
    >>> run = basis.start_pass(200)
    >>> for i in range(0, 200, 64):
    ...     run.add(maps[i:i + 64], i)
    >>> red, check = run.finish(warn=False)
    >>> tuple(red.scores.shape), red.n_components.tolist()
    ((4, 200, 3), [3, 3, 3, 3])
    """

    mean: torch.Tensor
    inv_std: torch.Tensor
    constant: torch.Tensor
    axes: torch.Tensor
    eigenvalues: torch.Tensor
    total: torch.Tensor
    shift: torch.Tensor
    weights_t: torch.Tensor
    count: int
    k_fixed: int
    fraction: float | None
    max_components: int
    eps: float
    solver: str = "exact"
    std: torch.Tensor | None = None
    low: torch.Tensor | None = None
    high: torch.Tensor | None = None

    @property
    def channels(self) -> int:
        return self.mean.shape[0]

    @property
    def pixels(self) -> int:
        return self.mean.shape[1]

    @property
    def width(self) -> int:
        """``l``: the sample axes each image is projected on."""
        return self.weights_t.shape[1]

    @property
    def weights(self) -> torch.Tensor:
        """``(C, P, l)`` float32 projection weights (a view of :attr:`weights_t`)."""
        return self.weights_t.transpose(1, 2)

    @property
    def nbytes(self) -> int:
        """Bytes the basis holds."""
        held = (self.mean, self.inv_std, self.constant, self.axes, self.eigenvalues,
                self.shift, self.weights_t, self.std, self.low, self.high)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    @classmethod
    def from_maps(cls, maps: torch.Tensor, components: int | float = 3, *,
                  max_components: int = 10, extra: int = EXTRA,
                  solver: str | None = None) -> SampleBasis:
        """The basis of a sample ``(m, C, H, W)`` or ``(m, C, P)`` (not modified).

        Parameters
        ----------
        maps : torch.Tensor
            The sample's maps, float32 or float64, on any device (the basis lives there).
        components : int or float, default 3
            ``k``, or a variance fraction in ``(0, 1)``, as for
            :func:`~pcace.reduce.pca.principal_components`.
        max_components : int, default 10
            Cap on ``k`` for a fraction.
        extra : int, default :data:`EXTRA`
            Axes beyond ``k`` (beyond ``max_components`` for a fraction); ``l`` is at most
            ``P``.
        solver : {"auto", "randomized", "exact"}, optional
            How the sample's axes are found (:func:`sample_axes`); None:
            :data:`SOLVER`.
        """
        x = _flat(maps, "maps")
        block = torch.empty((x.shape[1], x.shape[0], x.shape[2]), dtype=x.dtype,
                            device=x.device)
        block.copy_(x.permute(1, 0, 2))
        return cls.from_block(block, components, max_components=max_components, extra=extra,
                              solver=solver)

    @classmethod
    def from_block(cls, block: torch.Tensor, components: int | float = 3, *,
                   max_components: int = 10, extra: int = EXTRA,
                   solver: str | None = None) -> SampleBasis:
        """The basis of a channel-major sample ``(C, m, P)``, **overwritten** (standardised).

        As :meth:`from_maps` otherwise.
        """
        k_fixed, fraction = check_components(components, max_components)
        _check_extra(extra)
        if block.ndim != 3 or block.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"block must be a (C, m, P) float32 or float64 tensor; got "
                             f"{tuple(block.shape)} {block.dtype}")
        c, m, p = block.shape
        if m < 2:
            raise ValueError(f"the sample needs at least 2 images; got {m}")
        x = block if block.is_contiguous() else block.contiguous()
        mean, inv, constant, (std, low, high) = _standardise_sample_(x)
        width = min(p, (k_fixed if fraction is None else max_components) + extra)
        power = range_precision(RANGE_PRECISION, x)
        solver = resolve_solver(SOLVER if solver is None else solver, m, p, width,
                                precision=power)
        vals, axes = sample_axes(x, width, solver=solver)
        if solver == "randomized" and power == torch.bfloat16:
            solver = "randomized-bfloat16"
        trace = (~constant).sum(dim=1).to(torch.float64) * m
        rank = numerical_rank(vals, max(m, p), x.dtype)
        usable = torch.arange(vals.shape[1], device=x.device)[None, :] < rank[:, None]
        axes *= usable[:, None, :]
        vals = vals * usable
        pad = width - axes.shape[2]  # the sample has fewer images than axes asked for
        axes = torch.nn.functional.pad(axes, (0, pad))
        vals = torch.nn.functional.pad(vals, (0, pad))
        weights_t = (axes * inv[:, :, None]).transpose(1, 2).to(torch.float32).contiguous()
        return cls(mean=mean, inv_std=inv, constant=constant, axes=axes, eigenvalues=vals / m,
                   total=trace.clamp(min=0) / m, shift=mean.to(torch.float32),
                   weights_t=weights_t, count=m, k_fixed=k_fixed, fraction=fraction,
                   max_components=max_components, eps=torch.finfo(x.dtype).eps,
                   solver=solver, std=std, low=low, high=high)

    @classmethod
    def from_moments(cls, moments: PixelMoments, components: int | float = 3, *,
                     max_components: int = 10, extra: int = EXTRA) -> SampleBasis:
        """The basis from a sample's streamed moments (a ``PixelMoments`` with cross products).

        For layers whose sample would not be held as maps: ``8 C P^2`` bytes of moments
        instead of ``4 C m P`` of maps (less where ``P < m / 2``). The axes are those of
        :meth:`from_maps` on the same images, as exact as the moments route is.

        Examples
        --------
        >>> import torch
        >>> from pcace.reduce.streaming import PixelMoments
        >>> sample = torch.randn(300, 2, 16)
        >>> basis = SampleBasis.from_moments(PixelMoments(2, 16).update(sample), 2, extra=1)
        >>> other = SampleBasis.from_maps(sample, 2, extra=1, solver="exact")
        >>> bool(torch.allclose(basis.axes.abs(), other.axes.abs(), atol=1e-4))
        True
        """
        k_fixed, fraction = check_components(components, max_components)
        _check_extra(extra)
        if moments.count < 2:
            raise ValueError(f"the sample needs at least 2 images; got {moments.count}")
        width = min(moments.pixels, (k_fixed if fraction is None else max_components) + extra)
        basis = moments.basis(width)
        vals = basis.eigenvalues * (basis.vectors.abs().sum(dim=1) > 0)
        axes = basis.vectors.to(torch.float64)
        pad = width - axes.shape[2]
        axes = torch.nn.functional.pad(axes, (0, pad))
        vals = torch.nn.functional.pad(vals, (0, max(0, width - vals.shape[1])))[:, :width]
        inv = basis.inv_std.to(torch.float64)
        weights_t = (axes * inv[:, :, None]).transpose(1, 2).to(torch.float32).contiguous()
        return cls(mean=basis.mean, inv_std=inv, constant=basis.constant, axes=axes,
                   eigenvalues=vals, total=(~basis.constant).sum(dim=1).to(torch.float64),
                   shift=basis.mean.to(torch.float32), weights_t=weights_t,
                   count=moments.count, k_fixed=k_fixed, fraction=fraction,
                   max_components=max_components, eps=moments.eps, solver="moments")

    def project(self, maps: torch.Tensor) -> torch.Tensor:
        """The ``l`` sample-axis projections of a batch: ``(B, C, ...)`` -> ``(C, B, l)`` float32.

        Not centred over all images (:class:`SampledPass` does that when it finishes).
        """
        x = self._check(maps)
        d = x.to(torch.float32) - self.shift
        return torch.matmul(d.transpose(0, 1), self.weights)

    def start_pass(self, n_images: int, *, store: torch.device | str | None = None,
                   store_dtype: torch.dtype = torch.float16,
                   residuals: bool = False) -> SampledPass:
        """A :class:`SampledPass` over ``n_images`` images (see its parameters)."""
        return SampledPass(self, n_images, store=store, store_dtype=store_dtype,
                           residuals=residuals)

    def _check(self, maps: torch.Tensor) -> torch.Tensor:
        x = _flat(maps, "a batch")
        if x.shape[1:] != (self.channels, self.pixels):
            raise ValueError(f"a batch has {x.shape[1]} channels of {x.shape[2]} pixels; the "
                             f"basis is for {self.channels} of {self.pixels}")
        return x


def _check_extra(extra: int) -> None:
    if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
        raise ValueError(f"extra must be an int >= 0; got {extra!r}")


def _standardise_sample_(x: torch.Tensor, compiled: bool | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                    tuple[torch.Tensor, ...]]:
    """Standardise a contiguous ``(C, m, P)`` block in place.

    Returns the float64 ``(C, P)`` mean and inverse standard deviation, the constant
    mask, and the standard deviation, minimum and maximum (float64 ``(C, P)``), by the
    rule of :func:`~pcace.reduce.pca.reduce_block` (statistics in float64). On the CPU
    one compiled pass per statistic (:func:`pcace.reduce.kernels.standardise_columns`);
    elsewhere torch, a few channels at a time (``compiled=False`` takes that way on the
    CPU too, for the tests).
    """
    c, m, p = x.shape
    eps = torch.finfo(x.dtype).eps
    if x.device.type == "cpu" if compiled is None else compiled:
        from .kernels import standardise_columns

        mean, std, low, high = (torch.empty((c, p), dtype=torch.float64) for _ in range(4))
        standardise_columns(x.numpy(), mean.numpy(), std.numpy(), low.numpy(), high.numpy())
        _finite(mean)
    else:
        mean, std, low, high = (torch.empty((c, p), dtype=torch.float64, device=x.device)
                                for _ in range(4))
        step = max(1, CHUNK_BYTES // (8 * m * p))
        for lo in range(0, c, step):
            sl = slice(lo, min(c, lo + step))
            part = x[sl].to(torch.float64)
            low[sl], high[sl] = torch.aminmax(part, dim=1)
            mean[sl] = part.mean(dim=1)
            _finite(mean[sl], lo)
            part -= mean[sl, None, :]
            std[sl] = torch.linalg.vector_norm(part, dim=1) / math.sqrt(m)
            x[sl] = part
    constant = (high <= low) | (std <= CONSTANT_ULPS * eps * torch.maximum(
        high.abs(), low.abs()))
    inv = torch.where(constant, 0.0, 1.0 / torch.where(constant, 1.0, std))
    x.mul_(inv.to(x.dtype)[:, None, :])
    return mean, inv, constant, (std, low, high)


def _finite(mean: torch.Tensor, first: int = 0) -> None:
    """Raise :class:`NonFiniteMaps` naming the channels whose mean is NaN or inf."""
    if not bool(torch.isfinite(mean).all()):
        bad = (~torch.isfinite(mean)).any(dim=1).nonzero().flatten() + first
        raise NonFiniteMaps(bad.tolist())


def resolve_solver(solver: str, m: int, p: int, width: int, *,
                   precision: torch.dtype = torch.float32) -> str:
    """``"auto"`` made ``"randomized"`` or ``"exact"`` for an ``m``-image sample of ``P``
    pixels: whichever costs fewer multiply-adds, the Gram matrix with a margin (its
    eigenproblem, and the range finder's lower throughput at small sizes): 4 for a range
    finder in float32, 1 in bfloat16 (``precision``, :func:`range_precision`: its products
    run about 4 times as fast).

    Examples
    --------
    >>> resolve_solver("auto", 2000, 1024, 13), resolve_solver("auto", 2000, 256, 13)
    ('randomized', 'exact')
    >>> resolve_solver("auto", 2000, 256, 13, precision=torch.bfloat16)
    'randomized'
    """
    if solver not in ("auto", "randomized", "exact"):
        raise ValueError(f"solver must be 'auto', 'randomized' or 'exact'; got {solver!r}")
    if solver != "auto":
        return solver
    cols = min(width + OVERSAMPLE, m, p)
    margin = 1 if precision == torch.bfloat16 else 4
    return "exact" if min(m, p) <= margin * (POWER_STEPS + 1) * cols else "randomized"


def range_precision(precision: str, x: torch.Tensor) -> torch.dtype:
    """The dtype of the range finder's power iterations on ``x``.

    ``"auto"``: bfloat16 where ``x`` is float32 on a CPU with AMX bfloat16 units
    (``torch.cpu.get_capabilities()``), whose matrix products then run about 4 times as
    fast as float32's (ResNet-20's 32 x 32 layers at m = 2,000: 9 ms against 38 ms a
    step); else ``x``'s own dtype. The power iterations only find the subspace: the
    axes and their values come from ``x`` itself in its own precision (:func:`sample_axes`),
    and bfloat16's rounding (``2^-9``, against the sample's noise) moves the PCACE values by
    far less than the sample does (``benchmarks/README.md``, "bfloat16 axes, a leaner
    pass and finish, a cheaper null at large n").

    Examples
    --------
    >>> import torch
    >>> range_precision("float32", torch.zeros(1, 2, 3))
    torch.float32
    """
    if precision not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"precision must be 'auto', 'bfloat16' or 'float32'; got "
                         f"{precision!r}")
    if precision == "bfloat16":
        return torch.bfloat16
    if precision == "auto" and x.dtype == torch.float32 and x.device.type == "cpu" \
            and _amx_bfloat16():
        return torch.bfloat16
    return x.dtype


@functools.cache
def _amx_bfloat16() -> bool:
    """Whether this CPU has AMX bfloat16 units (False where torch cannot tell); asked once."""
    try:
        return bool(torch.cpu.get_capabilities().get("amx_bf16", False))
    except Exception:  # noqa: BLE001 - an older torch, or an unknown CPU: no
        return False


def sample_axes(x: torch.Tensor, width: int, *, solver: str = "randomized", seed: int = 0,
                precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``width`` principal axes of standardised ``(C, m, P)`` maps.

    Parameters
    ----------
    x : torch.Tensor
        The sample's standardised maps, channel-major (not modified).
    width : int
        ``l``, the axes wanted (at most ``P``).
    solver : {"randomized", "exact", "auto"}
        ``"auto"``: :func:`resolve_solver`. ``"randomized"`` (the default): a randomized
        range finder (Halko, Martinsson & Tropp 2011, algorithm 4.4) of ``l +``
        :data:`OVERSAMPLE` columns with
        :data:`POWER_STEPS` power iterations, then the exact SVD of ``X`` projected on
        that range: about ``2 (POWER_STEPS + 1) m P (l + OVERSAMPLE)`` multiply-adds per
        channel in batched BLAS, against ``m P min(m, P)`` for the Gram matrix the exact
        solver forms. ``"exact"``: the top eigenpairs of the smaller Gram matrix
        (:func:`pcace.reduce.pca.top_eigenpairs`). Deterministic for a ``seed``.
    precision : {"auto", "bfloat16", "float32"}, optional
        The dtype of the range finder's power iterations (:func:`range_precision`); the
        final projection of ``x`` on the range found, and so the axes and values, are in
        ``x``'s own dtype. None: :data:`RANGE_PRECISION`.

    Returns
    -------
    vals : torch.Tensor
        ``(C, l')`` float64 sums of squares along each axis (eigenvalues of ``X^T X``),
        descending; ``l' <= width`` where ``min(m, P)`` is smaller.
    axes : torch.Tensor
        ``(C, P, l')`` float64 unit axes (columns past a channel's rank are arbitrary;
        the caller zeroes them by :func:`~pcace.reduce.pca.numerical_rank`).

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(2, 300, 40, generator=g) * torch.logspace(0, -2, 40)
    >>> vals, axes = sample_axes(x, 3)
    >>> exact = torch.linalg.eigvalsh((x.transpose(1, 2) @ x).double()).flip(-1)[:, :3]
    >>> bool(torch.allclose(vals, exact, rtol=1e-4))
    True
    """
    c, m, p = x.shape
    cols = min(width + OVERSAMPLE, m, p)
    low = range_precision(RANGE_PRECISION if precision is None else precision, x)
    solver = resolve_solver(solver, m, p, width, precision=low)
    if solver == "exact":
        vals, vecs, _, gram_side = _eigen(x, width)
        vals, vecs = vals.to(x.device), vecs.to(x.device)
        if not gram_side:
            return vals, vecs.to(torch.float64)
        # vecs are the m-side eigenvectors u: the axes are X^T u / sqrt(lambda)
        root = torch.where(vals > 0, vals.clamp(min=0).sqrt(), 1.0)
        axes = torch.bmm(x.transpose(1, 2), vecs.to(x.dtype)).to(torch.float64)
        return vals, axes / root[:, None, :]
    work = x if low == x.dtype else x.to(low)

    def orthonormal(y: torch.Tensor) -> torch.Tensor:  # QR in x's dtype, used in `low`
        return torch.linalg.qr(y.to(x.dtype)).Q.to(low)

    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    start = torch.randn((c, p, cols), generator=gen, dtype=x.dtype, device=x.device)
    found = orthonormal(torch.bmm(work, start.to(low)))  # (C, m, cols)
    for _ in range(POWER_STEPS):
        back = orthonormal(torch.bmm(work.transpose(1, 2), found))  # (C, P, cols)
        found = orthonormal(torch.bmm(work, back))
    del work
    found = torch.linalg.qr(found.to(x.dtype)).Q  # exactly orthonormal in x's dtype
    small = torch.bmm(found.transpose(1, 2), x).to(torch.float64)  # (C, cols, P)
    _, sv, vh = torch.linalg.svd(small, full_matrices=False)
    keep = min(width, cols)
    return sv[:, :keep].square(), vh[:, :keep].transpose(1, 2).contiguous()
