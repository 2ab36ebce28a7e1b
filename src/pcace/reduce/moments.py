"""Pixel moments of a layer's maps over images: the one accumulator of every streamed route.

PCA of the standardised maps needs, per channel, the image count, per-pixel sums and the
``P x P`` cross products over the images. :class:`MomentAccumulator` gathers them in runs
of images, each shifted by a fixed per-pixel reference (the first run's mean, so a large
mean does not cancel later): per run, BLAS ``syrk`` forms the run's products in the data's
precision and adds their lower triangle into float64 sums
(:func:`pcace.reduce.kernels.accumulate_gram`; on a GPU, ``baddbmm`` into full float64
matrices). Shards of images merge by adding their sums (:meth:`MomentAccumulator.absorb`,
which moves another shard's sums to this reference when the two differ). Without cross
products (``cross=False``) it keeps the per-pixel sums of squares only: the statistics
pass of the subspace iteration.

:class:`PixelMoments` is the finished moments: standardisation and principal axes
(:meth:`PixelMoments.basis`), the input of :class:`~pcace.reduce.basis.PixelBasis`. Its
constructor is also a small accumulator of its own (:meth:`PixelMoments.update`,
:meth:`PixelMoments.merge`) for callers outside a forward pass, on the same
:class:`MomentAccumulator`.

Examples
--------
>>> import torch
>>> acc = MomentAccumulator(2, 9, dtype=torch.float64)
>>> acc.add(torch.randn(300, 2, 3, 3, dtype=torch.float64))
>>> moments = acc.moments()
>>> moments.count, tuple(moments.sq.shape)
(300, (2, 9))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from ..core.validation import components as check_components
from .basis import PixelBasis, finish_basis
from .batches import as_cbp, image_chunks
from .kernels import packed_size
from .pca import CONSTANT_ULPS, FLAT_SPREAD, one_blas_thread, top_eigenpairs
from .standardise import NonFiniteMaps

__all__ = ["BASIS_CHUNK_BYTES", "RUN_IMAGES", "MomentAccumulator", "PixelMoments", "basis_of",
           "first_run_shift", "naming_errors", "scratch_for"]

#: Images per ``syrk`` update of a layer's cross products.
RUN_IMAGES = 256

#: Bytes of correlation matrices formed at once when a basis is taken from moments.
BASIS_CHUNK_BYTES = 64 * 2**20


def scratch_for(channels: int, pixels: int, dtype: torch.dtype) -> np.ndarray:
    """The ``(C, P, P)`` scratch :func:`pcace.reduce.kernels.accumulate_gram` needs."""
    return np.empty(channels * pixels * pixels,
                    np.float32 if dtype == torch.float32 else np.float64)


@contextmanager
def naming_errors(layer: str, first_channel: int = 0) -> Iterator[None]:
    """Turn a channel group's NaN/inf error into one that names the layer and its channels.

    Examples
    --------
    >>> with naming_errors("conv1", 4):
    ...     raise NonFiniteMaps([1])
    Traceback (most recent call last):
    ...
    ValueError: layer 'conv1' produced NaN or inf in channel(s) [5]. Check the images, the \
weights, or overflow (e.g. half precision)
    """
    try:
        yield
    except NonFiniteMaps as err:
        channels = [first_channel + c for c in err.channels]
        raise ValueError(f"layer {layer!r} produced NaN or inf in channel(s) {channels[:10]}"
                         f"{' and more' if len(channels) > 10 else ''}. Check the images, the "
                         "weights, or overflow (e.g. half precision)") from None


class MomentAccumulator:
    """Shifted pixel sums of ``C`` channels of ``P`` pixels, gathered in runs of images.

    Parameters
    ----------
    channels, pixels : int
        ``C`` and ``P = H * W``.
    dtype : torch.dtype, default torch.float32
        Precision of each run's products (summed across runs in float64).
    cross : bool, default True
        Keep the ``P x P`` cross products; without them, per-pixel sums of squares.
    run : int, default :data:`RUN_IMAGES`
        Images per ``syrk`` update (cross products only); 0: no run buffer, each
        :meth:`add` updates with its own batch at once.
    shift : torch.Tensor, optional
        ``(C, P)`` reference every run is shifted by (default: the first run's mean; shards
        of one pass share the first run's, so their sums add up as one pass's would).
    device : torch.device or str, optional
        Where the sums live (default: the CPU, with the compiled kernels).

    Attributes
    ----------
    count : int
        Images flushed into the sums.
    eps : float
        Machine epsilon of ``dtype`` (for the constant-column rule), or larger when set.
    """

    def __init__(self, channels: int, pixels: int, *, dtype: torch.dtype = torch.float32,
                 cross: bool = True, run: int = RUN_IMAGES, shift: torch.Tensor | None = None,
                 device: torch.device | str | None = None):
        if channels < 1 or pixels < 1:
            raise ValueError(f"channels and pixels must be >= 1; got {channels}, {pixels}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
        self.channels, self.pixels, self.dtype = int(channels), int(pixels), dtype
        self.device = torch.device("cpu" if device is None else device)
        self.compiled = self.device.type == "cpu"
        self.count, self.eps, self.fill = 0, 0.0, 0
        c, p = self.channels, self.pixels
        with torch.inference_mode(False):  # normal tensors, also when made inside a pass
            f64 = {"dtype": torch.float64, "device": self.device}
            self.sums = torch.zeros((c, p), **f64)
            self.lo = torch.full((c, p), math.inf, **f64)
            self.hi = torch.full((c, p), -math.inf, **f64)
            self.squares = None if cross else torch.zeros((c, p), **f64)
            self.run = torch.empty((c, max(0, run) if cross else 0, p), dtype=dtype,
                                   device=self.device)
            self.shift = None if shift is None else shift.to(self.device, dtype).clone()
        self.cross: Any = None
        if cross:
            self.cross = np.zeros((c, packed_size(p))) if self.compiled else \
                torch.zeros((c, p, p), **f64)

    @property
    def nbytes(self) -> int:
        """Bytes held: the cross products (or squares) and the run of images."""
        held = self.cross.nbytes if isinstance(self.cross, np.ndarray) else \
            0 if self.cross is None else self.cross.numel() * 8
        return held + self.run.numel() * self.run.element_size() + 3 * 8 * self.sums.numel()

    def add(self, batch: torch.Tensor, scratch: np.ndarray | None = None) -> None:
        """Add a batch ``(B, C, H, W)`` or ``(B, C, P)`` of maps.

        With cross products the images are copied into the current run, which is flushed
        (its products added) when full; ``scratch`` is the buffer :func:`scratch_for`
        gives (made when needed). Raises :class:`~pcace.reduce.standardise.NonFiniteMaps`
        naming the channels of a NaN or inf, when the run holding it is flushed.
        """
        x = _as_bcp(batch, self.channels, self.pixels)
        # the constant-column rule at the precision the products are formed in (as the
        # in-memory route's, whose block is in that precision)
        self.eps = max(self.eps, torch.finfo(self.dtype).eps)
        if self.cross is None:
            for part in image_chunks(x):
                self._flush_squares(part)
            return
        xt = x.permute(1, 0, 2)  # (C, B, P) view
        if self.run.shape[1] == 0:  # no buffer: a copy of this batch is the run
            run = torch.empty(xt.shape, dtype=self.dtype, device=self.device)
            run.copy_(xt)
            self._flush_products(run, scratch)
            return
        start, width = 0, self.run.shape[1]
        while start < xt.shape[1]:
            take = min(xt.shape[1] - start, width - self.fill)
            self.run[:, self.fill:self.fill + take].copy_(xt[:, start:start + take])
            self.fill += take
            start += take
            if self.fill == width:
                self.flush(scratch)

    def flush(self, scratch: np.ndarray | None = None) -> None:
        """Add the products of the images waiting in the current run."""
        if self.fill == 0 or self.cross is None:
            return
        x = self.run if self.fill == self.run.shape[1] else \
            self.run[:, :self.fill].contiguous()
        self._flush_products(x, scratch)
        self.fill = 0

    def _flush_products(self, x: torch.Tensor, scratch: np.ndarray | None) -> None:
        """Shift a run ``x`` ``(C, B, P)`` (in place), add its sums and its products."""
        self._shift_and_summarise(x)
        if self.compiled:
            from .kernels import accumulate_gram

            if scratch is None or scratch.size < x.shape[0] * self.pixels ** 2 or \
                    scratch.dtype != x.numpy().dtype:
                scratch = scratch_for(self.channels, self.pixels, self.dtype)
            with one_blas_thread():
                accumulate_gram(x.numpy(), self.cross, scratch)
        else:
            xd = x.to(torch.float64)
            self.cross.baddbmm_(xd.transpose(1, 2), xd)
        self.count += x.shape[1]

    def _flush_squares(self, batch: torch.Tensor) -> None:
        """Without cross products: a batch's shifted sums and sums of squares, in float64."""
        x, _ = as_cbp(batch, self.device)
        if self.shift is None:
            self.shift = x.mean(dim=1).to(self.dtype)
        self._shift_and_summarise(x)
        self.squares += x.square().sum(dim=1)
        self.count += x.shape[1]

    def _shift_and_summarise(self, x: torch.Tensor) -> None:
        """Shift ``x`` ``(C, B, P)`` in place; add its sums; track each pixel's range."""
        if self.shift is None:  # a reference close to the mean: little cancellation later
            self.shift = x.mean(dim=1, dtype=torch.float64).to(x.dtype)
        shift = self.shift.to(x.dtype)
        if self.compiled and x.is_contiguous():
            from .kernels import shift_and_summarise

            before = self.sums.clone()
            if not shift_and_summarise(x.numpy(), shift.numpy(), self.sums.numpy(),
                                       self.lo.numpy(), self.hi.numpy()):
                bad = ~torch.isfinite(self.sums - before)
                raise NonFiniteMaps(bad.any(dim=1).nonzero().flatten().tolist())
            return
        lo, hi = torch.aminmax(x, dim=1)
        x -= shift[:, None, :]
        part = x.sum(dim=1, dtype=torch.float64)
        bad = ~torch.isfinite(part).all(dim=1)
        if bool(bad.any()):
            raise NonFiniteMaps(bad.nonzero().flatten().tolist())
        self.sums += part
        torch.minimum(self.lo, lo.to(torch.float64), out=self.lo)
        torch.maximum(self.hi, hi.to(torch.float64), out=self.hi)

    def partial(self, scratch: np.ndarray | None = None) -> dict[str, Any]:
        """The sums gathered so far (the run flushed first), for another accumulator's
        :meth:`absorb`."""
        self.flush(scratch)
        return {"count": self.count, "sums": self.sums, "cross": self.cross,
                "squares": self.squares, "lo": self.lo, "hi": self.hi, "shift": self.shift,
                "eps": self.eps}

    def absorb(self, part: dict[str, Any]) -> None:
        """Add another accumulator's :meth:`partial` sums (another shard of images).

        Sums shifted by another reference are moved to this one first (exact algebra:
        ``sum (x - a)(x - a)^T = sum (y + d)(y + d)^T`` with ``y = x - b``, ``d = b - a``).
        """
        n = int(part["count"])
        if n == 0:
            return
        if self.shift is None:
            self.shift = part["shift"].to(self.device, self.dtype).clone()
        sums = part["sums"].to(self.device, torch.float64)
        d = (part["shift"].to(self.device, torch.float64) -
             self.shift.to(torch.float64))
        moved = bool(d.any())
        if self.cross is not None:
            cross = part["cross"]
            if moved:
                cross = _reshifted(cross, sums, d, n)
            self.cross += cross if isinstance(self.cross, np.ndarray) else \
                torch.as_tensor(cross, device=self.device)
        else:
            squares = part["squares"].to(self.device, torch.float64)
            self.squares += squares + 2 * d * sums + n * d.square() if moved else squares
        self.sums += sums + n * d if moved else sums
        self.count += n
        self.eps = max(self.eps, float(part.get("eps", 0.0)))
        torch.minimum(self.lo, part["lo"].to(self.device, torch.float64), out=self.lo)
        torch.maximum(self.hi, part["hi"].to(self.device, torch.float64), out=self.hi)

    def moments(self, scratch: np.ndarray | None = None) -> PixelMoments:
        """The moments (the run flushed first; the accumulator's arrays are handed over)."""
        self.flush(scratch)
        if self.shift is None:
            raise ValueError("no images: the moments need at least one")
        eps = self.eps or torch.finfo(self.dtype).eps
        d = self.sums / self.count  # mean - shift
        mean = self.shift.to(torch.float64) + d
        if self.cross is None:
            sq = self.squares - self.count * d.square()
            out = PixelMoments._finished(self.count, mean, sq, self.lo, self.hi, eps)
        elif isinstance(self.cross, np.ndarray):
            packed, self.cross = self.cross, np.zeros((0, 0))
            out = PixelMoments.from_packed(self.count, self.shift, packed, self.sums,
                                           self.lo, self.hi, eps)
        else:
            cross = self.cross - self.count * d[:, :, None] * d[:, None, :]
            sq = cross.diagonal(dim1=1, dim2=2).clone()
            out = PixelMoments._finished(self.count, mean, sq, self.lo, self.hi, eps, cross)
        return out


def _as_bcp(batch: torch.Tensor, channels: int, pixels: int) -> torch.Tensor:
    """A batch as ``(B, C, P)`` (a view where possible), checked against the moments."""
    if not isinstance(batch, torch.Tensor):
        batch = torch.as_tensor(batch)
    if batch.ndim == 4:
        batch = batch.flatten(2)
    if batch.ndim != 3 or batch.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"a batch must be a (B, C, H, W) or (B, C, P) float32 or float64 "
                         f"tensor; got {tuple(batch.shape)} {batch.dtype}")
    if (batch.shape[1], batch.shape[2]) != (channels, pixels):
        raise ValueError(f"batch has {batch.shape[1]} channels of {batch.shape[2]} pixels; the "
                         f"moments are for {channels} channels of {pixels}")
    return batch.detach()


def _reshifted(cross: Any, sums: torch.Tensor, d: torch.Tensor, n: int) -> Any:
    """Cross products of maps shifted by ``b``, as if shifted by ``a`` (``d = b - a``):
    ``C + S d^T + d S^T + n d d^T`` (packed lower triangles or full matrices)."""
    extra = sums[:, :, None] * d[:, None, :]
    extra = extra + extra.transpose(1, 2) + n * d[:, :, None] * d[:, None, :]
    if isinstance(cross, np.ndarray):
        i, j = np.tril_indices(d.shape[1])
        return cross + extra.cpu().numpy()[:, i, j]
    return cross + extra.to(cross.device)


def first_run_shift(outputs: Iterable[torch.Tensor], channels: int, pixels: int,
                    dtype: torch.dtype, run: int = RUN_IMAGES) -> torch.Tensor:
    """The reference a layer's runs are shifted by: the mean of its first ``run`` images.

    ``outputs`` are the layer's batches of maps from the first image on; the value is the
    one a one-pass accumulator takes, so shards shifted by it add up to that pass.
    """
    acc = MomentAccumulator(channels, pixels, dtype=dtype, run=run)
    for out in outputs:
        acc.add(out)
        if acc.shift is not None:
            break
    acc.flush()
    if acc.shift is None:
        raise ValueError("no images: a streamed layer needs at least one")
    return acc.shift


def basis_of(acc: MomentAccumulator, components: int | float, dtype: torch.dtype,
             max_components: int | None = None) -> PixelBasis:
    """A layer's basis from its accumulated moments (the one rule of every moments pass)."""
    acc.flush()
    if acc.count < 2:
        raise ValueError(f"a streamed layer saw {acc.count} image(s); PCA needs 2")
    extra = {} if max_components is None else {"max_components": max_components}
    return acc.moments().basis(components, tol=1e-8 if dtype == torch.float32 else 1e-12,
                               **extra)


class PixelMoments:
    """Pixel-space moments of ``C`` channels of ``P`` pixels over images, all float64.

    Per channel: the image count, the per-pixel mean, minimum and maximum, the centred
    sums of squares, and (``cross=True``) the ``P x P`` centred cross products. Made by a
    :class:`MomentAccumulator` (:meth:`MomentAccumulator.moments`), or accumulated here
    with :meth:`update` and :meth:`merge` (each batch in float64, on the same accumulator;
    merging two equals one accumulator over all their images, up to rounding). Memory:
    ``8 C P^2`` bytes with cross products, ``32 C P`` without, whatever the number of
    images.

    Parameters
    ----------
    channels, pixels : int
        ``C`` and ``P = H * W``.
    cross : bool, default True
        Keep the ``P x P`` cross products (needed by :meth:`basis`).
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
        self.channels, self.pixels = int(channels), int(pixels)
        self._acc: MomentAccumulator | None = MomentAccumulator(
            channels, pixels, dtype=torch.float64, cross=cross, run=0, device=device)
        self._state: dict[str, Any] | None = None
        self._packed: tuple[np.ndarray, np.ndarray] | None = None  # see from_packed

    @classmethod
    def _finished(cls, count: int, mean: torch.Tensor, sq: torch.Tensor, lo: torch.Tensor,
                  hi: torch.Tensor, eps: float, cross: torch.Tensor | None = None
                  ) -> PixelMoments:
        out = cls.__new__(cls)
        out.channels, out.pixels = int(mean.shape[0]), int(mean.shape[1])
        out._acc, out._packed = None, None
        out._state = {"count": int(count), "mean": mean, "sq": sq, "lo": lo, "hi": hi,
                      "eps": float(eps), "cross": cross}
        return out

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
        c, p = sums.shape
        if packed.shape != (c, packed_size(p)) or packed.dtype != np.float64:
            raise ValueError(f"packed must be ({c}, {packed_size(p)}) float64; got "
                             f"{packed.shape} {packed.dtype}")
        n = int(count)
        d = sums.to(torch.float64) / n  # mean - shift
        diagonal = torch.from_numpy(packed[:, (np.arange(p) + 1) * (np.arange(p) + 2) // 2 - 1])
        out = cls._finished(n, shift.to(torch.float64) + d, diagonal - n * d.square(),
                            lo.to(torch.float64), hi.to(torch.float64), eps)
        out._packed = (packed, d.contiguous().numpy())
        return out

    # --- accumulating ------------------------------------------------------------------------

    def update(self, batch: torch.Tensor) -> PixelMoments:
        """Add a batch of images, ``(B, C, H, W)`` or ``(B, C, P)``, float32 or float64.

        Returns ``self``. Raises :class:`~pcace.reduce.standardise.NonFiniteMaps` (naming
        the channels) if the batch holds NaN or inf; the count is then left unchanged.
        """
        acc = self._accumulating()
        if not isinstance(batch, torch.Tensor):
            batch = torch.as_tensor(batch)
        if batch.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"a batch must be a (B, C, H, W) or (B, C, P) float32 or float64 "
                             f"tensor; got {tuple(batch.shape)} {batch.dtype}")
        eps = torch.finfo(batch.dtype).eps
        for part in image_chunks(batch):  # bounded float64 copies of large maps
            acc.add(part.to(torch.float64))
        acc.eps = max(acc.eps, eps)
        return self

    def merge(self, other: PixelMoments) -> PixelMoments:
        """Add the moments of another accumulator (another shard of images) into this one.

        Returns ``self``; ``other`` is not modified. Both must have the same shape, and
        cross products if this one has them.
        """
        acc = self._accumulating()
        if (other.channels, other.pixels) != (self.channels, self.pixels):
            raise ValueError(f"cannot merge moments of {other.channels} x {other.pixels} "
                             f"into {self.channels} x {self.pixels}")
        theirs = other._acc
        if theirs is None:
            raise ValueError("cannot merge finished moments (made by an accumulator); merge "
                             "the accumulators' partial sums instead")
        if acc.cross is not None and theirs.cross is None:
            raise ValueError("cannot merge moments without cross products into moments with")
        part = dict(theirs.partial())
        part["cross"] = None if part["cross"] is None else (
            part["cross"].copy() if isinstance(part["cross"], np.ndarray) else
            part["cross"].clone())
        if acc.cross is None and part["squares"] is None:  # reduce theirs to the squares
            raise ValueError("cannot merge moments with cross products into moments without")
        acc.absorb(part)
        return self

    def _accumulating(self) -> MomentAccumulator:
        if self._acc is None:
            raise ValueError("moments taken from an accumulator (or packed sums) cannot be "
                             "updated or merged")
        self._state = None
        return self._acc

    def _get(self, name: str) -> Any:
        if self._state is None:
            acc = self._acc
            assert acc is not None
            if acc.count == 0:
                z = torch.zeros((self.channels, self.pixels), dtype=torch.float64,
                                device=acc.device)
                self._state = {"count": 0, "mean": z, "sq": z.clone(), "lo": acc.lo,
                               "hi": acc.hi, "eps": acc.eps, "cross": None}
            else:
                d = acc.sums / acc.count
                mean = acc.shift.to(torch.float64) + d
                if acc.cross is None:
                    cross, sq = None, acc.squares - acc.count * d.square()
                else:
                    full = _unpacked(acc.cross) if isinstance(acc.cross, np.ndarray) \
                        else acc.cross
                    cross = full - acc.count * d[:, :, None] * d[:, None, :]
                    sq = cross.diagonal(dim1=1, dim2=2).clone()
                self._state = {"count": acc.count, "mean": mean, "sq": sq, "lo": acc.lo,
                               "hi": acc.hi, "eps": acc.eps, "cross": cross}
        return self._state[name]

    count = property(lambda self: self._get("count"))
    mean = property(lambda self: self._get("mean"))
    sq = property(lambda self: self._get("sq"))
    lo = property(lambda self: self._get("lo"))
    hi = property(lambda self: self._get("hi"))
    eps = property(lambda self: self._get("eps"))
    cross = property(lambda self: self._get("cross"))

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the moments (independent of the number of images)."""
        if self._acc is not None:
            return self._acc.nbytes
        extra = 0 if self._packed is None else self._packed[0].nbytes
        return extra + 4 * 8 * self.channels * self.pixels

    # --- using them ---------------------------------------------------------------------------

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
        k_fixed, fraction = check_components(components, max_components)
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
            g, tr, fro = self._gram(sl, inv, buffer)
            flat = (tr.square() / (fro * p).clamp(min=torch.finfo(torch.float64).tiny)
                    > FLAT_SPREAD)
            w, v = top_eigenpairs(g, q, tol=tol, flat=flat.cpu())
            vals[sl], vecs[sl], total[sl] = w.cpu(), v.cpu(), tr.cpu()
        return finish_basis(mean, inv, constant, vals, vecs, total, n, self.eps, k_fixed,
                            fraction, max_components, route="moments", passes=1)

    def _gram(self, sl: slice, inv: torch.Tensor, buffer: np.ndarray | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The Gram matrices ``X^T X`` of a chunk of channels' standardised maps (``n``
        times their correlation matrices), their traces and squared Frobenius norms."""
        if self._packed is not None:
            from .kernels import standardised_from_packed

            g = buffer[:sl.stop - sl.start]
            tr, fro = map(torch.from_numpy, standardised_from_packed(
                self._packed[0][sl], self._packed[1][sl], self.count,
                inv[sl].contiguous().numpy(), g))
            return torch.from_numpy(g), tr, fro
        d = inv[sl]
        g = self.cross[sl] * d[:, :, None]
        g *= d[:, None, :]
        g = 0.5 * (g + g.transpose(1, 2))
        return g, g.diagonal(dim1=1, dim2=2).sum(-1), g.square().sum(dim=(1, 2))


def _unpacked(packed: np.ndarray) -> torch.Tensor:
    """Full symmetric ``(C, P, P)`` matrices from packed lower triangles."""
    c, size = packed.shape
    p = int((math.isqrt(8 * size + 1) - 1) // 2)
    i, j = np.tril_indices(p)
    full = np.zeros((c, p, p))
    full[:, i, j] = packed
    full[:, j, i] = packed
    return torch.from_numpy(full)
