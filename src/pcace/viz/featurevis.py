"""Feature visualisation: inputs synthesised to excite one channel as much as possible.

Plain gradient ascent on the pixels gives high-frequency noise that the eye reads as grey
mush, or, for a channel that responds to brightness, a flat colour. The standard remedies
(Olah, Mordvintsev & Schubert, "Feature Visualization", Distill 2017) are implemented here:

- **A decorrelated parametrisation.** The image is not optimised pixel by pixel but as a
  2-D Fourier spectrum per colour channel, each frequency scaled by ``1 / f`` (natural
  images have roughly that spectrum, so a step changes every frequency by a natural amount
  instead of favouring the many high ones), and the colour channels are mixed by the square
  root of the real images' colour correlation (a step moves along natural colour
  directions). A sigmoid maps the result into the real images' value range, starting from
  their mean colour.
- **Transformation robustness.** Every step scores randomly jittered, scaled and slightly
  turned copies, so the picture cannot exploit single-pixel effects; what remains are
  patterns the channel responds to wherever and however large they are.

The objective is the mean of the channel's positive part (what a following ReLU passes)
plus a small share of its plain mean; see :func:`objective`. A picture only says something
when it excites its channel clearly more than the real images do: :func:`why_not_shown`
decides (at least :data:`CLEAR_FACTOR` times the strongest image's response, above zero,
and not flat), and the report shows the picture or the two numbers instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..inputs.hooks import forward_hooks
from ..inputs.layers import resolve_layers


class _Reached(Exception):
    """Raised by the hook to skip the layers after the one being visualised."""


def objective(maps: torch.Tensor, linear_share: float = 0.1) -> torch.Tensor:
    """How strongly maps (..., H, W) excite their channel: one value per map.

    The mean of the positive part -- what a following ReLU passes -- rewards patterns (the
    plain mean of a first layer's output is linear in the input, so its maximum over a box
    is a flat image); ``linear_share`` of the plain mean is added so that a channel silent
    at the start still gets a gradient.
    """
    return torch.relu(maps).mean(dim=(-2, -1)) + linear_share * maps.mean(dim=(-2, -1))


@dataclass
class FeatureVisualisation:
    """Synthetic inputs for some channels of a layer, and how well they work.

    Attributes
    ----------
    inputs : torch.Tensor
        (K, C, H, W) in the model's input space, on the CPU.
    excitation : numpy.ndarray
        (K,) :func:`objective` of each channel on its synthetic input.
    best_image_excitation : numpy.ndarray
        (K,) the largest :func:`objective` of the channel over the reference images.
    variation : numpy.ndarray
        (K,) spatial variation of each synthetic input relative to the reference images':
        the mean over colour channels of the spatial standard deviation, divided by the
        median of the same over the reference images (0 = flat).
    """

    inputs: torch.Tensor
    excitation: np.ndarray
    best_image_excitation: np.ndarray
    variation: np.ndarray


#: A picture is shown when its channel's response is at least this many times the
#: strongest reference image's (and above zero).
CLEAR_FACTOR = 1.5
#: ... and when it varies in space at least this share of a typical reference image.
MIN_VARIATION = 0.25


def why_not_shown(excitation: float, best_image: float, variation: float | None = None
                  ) -> str | None:
    """Why a synthetic input is not worth showing, or None when it is.

    It is shown when it drives its channel above zero and to at least
    :data:`CLEAR_FACTOR` times the strongest response among the reference images, and
    varies in space (at least :data:`MIN_VARIATION` of a typical image's variation).
    Otherwise the picture says nothing the data do not, and the reason (a phrase that
    follows "the synthetic input") names both numbers.

    Parameters
    ----------
    excitation : float
        :func:`objective` of the channel on its synthetic input.
    best_image : float
        The largest :func:`objective` of the channel over the reference images.
    variation : float, optional
        :func:`spatial_variation` of the synthetic input (not checked when None).

    Returns
    -------
    str or None

    Examples
    --------
    >>> why_not_shown(3.0, 1.0) is None
    True
    >>> why_not_shown(1.2, 1.0)
    'excites it to 1.2, the strongest image to 1 (1.2x; shown from 1.5x)'
    >>> why_not_shown(-0.03, -0.07)
    'excites it to -0.03, the strongest image to -0.07: neither drives it above zero'
    """
    reached, best = float(excitation), float(best_image)
    numbers = f"excites it to {reached:.2g}, the strongest image to {best:.2g}"
    if reached <= 0:
        return numbers + (": neither drives it above zero" if best <= 0
                          else ": not above zero")
    if best > 0 and reached < CLEAR_FACTOR * best:
        return numbers + f" ({reached / best:.1f}x; shown from {CLEAR_FACTOR:g}x)"
    if variation is not None and float(variation) < MIN_VARIATION:
        return (f"is nearly flat (spatial variation {float(variation):.2f} of a typical "
                f"image's; shown from {MIN_VARIATION:g})")
    return None


# ---------------------------------------------------------------- parametrisation

def _frequency_scale(h: int, w: int, decay: float) -> torch.Tensor:
    """``1 / f**decay`` on the rfft2 grid of an h x w image, scaled to unit mean square.

    The lowest non-zero frequency bounds ``f`` from below (the constant term gets the same
    weight as the coarsest pattern). Natural images have about this amplitude spectrum, so
    a step of the same size on every coefficient changes the image as a natural image
    would change, instead of favouring the many high frequencies.
    """
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    f = torch.sqrt(fx * fx + fy * fy).clamp_min(1.0 / max(h, w))
    scale = f ** -decay
    return scale / scale.pow(2).mean().sqrt()


def _colour_root(reference: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of the colour correlation of the reference pixels, rows scaled
    so the longest has unit length: it turns independent values into correlated colours."""
    c = reference.shape[1]
    if c == 1:
        return torch.ones(1, 1)
    pixels = reference.transpose(0, 1).reshape(c, -1).double()
    pixels = pixels / pixels.std(dim=1, keepdim=True).clamp_min(1e-6)
    vals, vecs = torch.linalg.eigh(torch.cov(pixels))
    root = vecs @ torch.diag(vals.clamp_min(1e-4).sqrt()) @ vecs.T
    return (root / root.norm(dim=1).max()).float()


class _Image(nn.Module):
    """K images held as Fourier spectra: ``1/f``-scaled frequencies, decorrelated colours,
    squashed by a sigmoid into the reference images' value range per colour channel.

    With a zero spectrum each image is flat at the reference images' mean colour.
    """

    def __init__(self, k: int, reference: torch.Tensor, gen: torch.Generator,
                 decay: float, size: tuple[int, int], init_scale: float = 0.05):
        super().__init__()
        c, (h, w) = reference.shape[1], size
        dims = (0, 2, 3)
        dev = reference.device
        low = reference.amin(dims, keepdim=True)
        span = (reference.amax(dims, keepdim=True) - low).clamp_min(1e-6)
        share = ((reference.mean(dims, keepdim=True) - low) / span).clamp(0.02, 0.98)
        self.h, self.w = h, w
        self.register_buffer("scale", _frequency_scale(h, w, decay).to(dev))
        self.register_buffer("colour", _colour_root(reference).to(dev))
        self.register_buffer("low", low)
        self.register_buffer("span", span)
        self.register_buffer("offset", torch.log(share / (1 - share)))
        shape = (k, c, h, w // 2 + 1, 2)
        self.spectrum = nn.Parameter((init_scale * torch.randn(shape, generator=gen)).to(dev))

    def forward(self) -> torch.Tensor:
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        flat = torch.fft.irfft2(spectrum, s=(self.h, self.w), norm="ortho")
        mixed = torch.einsum("ij,kjhw->kihw", self.colour, flat)
        return self.low + self.span * torch.sigmoid(mixed + self.offset)


# ---------------------------------------------------------------- transformations

def _robust_copies(x: torch.Tensor, copies: int, jitter: int, gen: torch.Generator,
                   scale: float = 0.1, degrees: float = 5.0) -> torch.Tensor:
    """``copies`` randomly moved versions of each image: (copies * K, C, H, W).

    Each copy is padded by reflection, shifted by up to ``jitter`` pixels, scaled by a
    factor in ``[1 - scale, 1 + scale]``, turned by up to ``degrees``, shifted again by up
    to ``jitter`` whole pixels and cropped back to the original size.
    """
    k, c, h, w = x.shape
    pad = jitter + max(1, int(math.ceil(scale * max(h, w) / 2)))
    mode = "reflect" if min(h, w) > pad else "replicate"
    big = F.pad(x, (pad, pad, pad, pad), mode=mode).repeat(copies, 1, 1, 1)
    n, side = big.shape[0], big.shape[-1]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(degrees)
    zoom = 1.0 + (torch.rand(n, generator=gen) * 2 - 1) * scale
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 * jitter / side)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(big.shape), align_corners=False)
    moved = F.grid_sample(big, grid, mode="bilinear", padding_mode="reflection",
                          align_corners=False)
    dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist()
    return moved[..., pad + dy: pad + dy + h, pad + dx: pad + dx + w]


# ---------------------------------------------------------------- forward to the layer

def _stopping_hook(caught: dict) -> Callable[[nn.Module, Any, Any], None]:
    """A forward hook that keeps its module's output and stops the forward pass there."""
    def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
        caught["out"] = out
        raise _Reached
    return hook


def _layer_output(model: nn.Module, caught: dict, inp: torch.Tensor) -> torch.Tensor:
    try:
        model(inp)
    except _Reached:
        pass
    return caught.pop("out")


def _excitation_of_images(model: nn.Module, caught: dict, images: torch.Tensor,
                          channels: torch.Tensor, batch: int = 64) -> np.ndarray:
    """(K,) the largest :func:`objective` of each channel over ``images``."""
    best = torch.full((len(channels),), -torch.inf)
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out = _layer_output(model, caught, images[i:i + batch])
            values = objective(out[:, channels.to(out.device)]).float().cpu()
            best = torch.maximum(best, values.amax(0))
    return best.numpy()


def spatial_variation(x: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Spatial variation of each image in ``x`` relative to the reference images (0 = flat).

    The mean over colour channels of each image's spatial standard deviation, divided by
    the median of the same over ``reference``.

    Examples
    --------
    >>> import torch
    >>> ref = torch.rand(10, 3, 8, 8)
    >>> spatial_variation(torch.ones(2, 3, 8, 8), ref).tolist()
    [0.0, 0.0]
    """
    def spread(t: torch.Tensor) -> torch.Tensor:
        return t.float().flatten(2).std(dim=2).mean(dim=1)

    typical = float(spread(reference).median().clamp_min(1e-12))
    return (spread(x) / typical).cpu().numpy()


def visualise_channels(
    model: nn.Module,
    layer: str,
    channels: Sequence[int],
    reference: torch.Tensor,
    *,
    steps: int = 160,
    lr: float = 0.05,
    copies: int = 1,
    jitter: int | None = None,
    decay: float = 1.0,
    size: int | None = 128,
    seed: int = 0,
) -> FeatureVisualisation:
    """Inputs that excite each of ``channels`` of ``layer`` (see the module's description).

    Parameters
    ----------
    model : torch.nn.Module
        The network (eval mode); its parameters are not changed and get no gradients.
    layer : str
        Qualified module name whose (N, C, H, W) output holds the channels.
    channels : sequence of int
        Channel indices; one synthesised input per channel.
    reference : torch.Tensor
        Real preprocessed inputs (N, C, H, W) on the model's device: they fix the shape,
        the value range, the colour covariance, and the excitation to beat.
    steps : int
        Gradient-ascent steps (Adam on the spectrum).
    lr : float
        Adam's step size.
    copies : int
        Randomly transformed copies of each image scored per step (each step draws new
        transformations, so one already averages over many in the course of the ascent).
    jitter : int, optional
        Largest random shift in pixels (default: 1/16 of the image side, at least 1).
    decay : float
        Exponent of the ``1 / f**decay`` frequency scaling (larger: smoother pictures).
    size : int, optional
        Longest side of the synthetic inputs: larger reference images are synthesised at
        this size (the cost grows with the number of pixels; convolutions do not mind the
        size). None, or a model that takes no other size, keeps the images' size.
    seed : int
        Seeds the starting spectrum and the transformations.

    Returns
    -------
    FeatureVisualisation

    Examples
    --------
    >>> import torch
    >>> from pcace.zoo import mnist_cnn
    >>> fv = visualise_channels(mnist_cnn().eval(), "conv1", [0, 3], torch.rand(8, 1, 28, 28),
    ...                         steps=5)
    >>> tuple(fv.inputs.shape), fv.excitation.shape
    ((2, 1, 28, 28), (2,))
    """
    resolve_layers(model, [layer])  # an unknown name: the valid ones, closest first
    chans = torch.as_tensor(list(channels), dtype=torch.long)
    ref = reference.detach().float()
    k = len(chans)
    caught: dict[str, torch.Tensor] = {}
    h, w = _synthesis_size(model, layer, ref, size, caught)
    shift = jitter if jitter is not None else max(1, min(h, w) // 16)
    gen = torch.Generator().manual_seed(seed)
    image = _Image(k, ref, gen, decay, (h, w))
    with _frozen_parameters(model):
        _ascend(model, layer, image, chans, steps, lr, copies, shift, gen)
        with forward_hooks(model, {layer: _stopping_hook(caught)}):
            with torch.no_grad():
                final = image().detach()
                out = _layer_output(model, caught, final)
                reached = objective(out[torch.arange(k), chans.to(out.device)]).float()
                reached = reached.cpu().numpy()
            best = _excitation_of_images(model, caught, ref, chans)
    return FeatureVisualisation(final.cpu(), reached, best, spatial_variation(final, ref))


def _synthesis_size(model: nn.Module, layer: str, ref: torch.Tensor, size: int | None,
                    caught: dict) -> tuple[int, int]:
    """The reference images' size, scaled down to ``size`` on the longer side when the
    model's layer takes that size too."""
    h, w = ref.shape[-2], ref.shape[-1]
    if size is None or max(h, w) <= size:
        return h, w
    small = (max(1, round(h * size / max(h, w))), max(1, round(w * size / max(h, w))))
    try:
        with forward_hooks(model, {layer: _stopping_hook(caught)}), torch.no_grad():
            _layer_output(model, caught, torch.zeros(1, ref.shape[1], *small).to(ref))
    except (RuntimeError, ValueError):  # a fixed input size before the layer
        caught.clear()
        return h, w
    return small


@contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Stop gradients to the model's trainable parameters for the duration of the block."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _ascend(model: nn.Module, layer: str, image: _Image, chans: torch.Tensor, steps: int,
            lr: float, copies: int, shift: int, gen: torch.Generator) -> None:
    """``steps`` Adam steps on ``image``'s spectrum, raising the objective of its channels."""
    k = len(chans)
    opt = torch.optim.Adam(image.parameters(), lr=lr)
    caught: dict[str, torch.Tensor] = {}
    with forward_hooks(model, {layer: _stopping_hook(caught)}), torch.enable_grad():
        for _ in range(steps):
            x = _robust_copies(image(), copies, shift, gen)
            out = _layer_output(model, caught, x)
            picked = out.reshape(copies, k, *out.shape[1:])[:, torch.arange(k),
                                                             chans.to(out.device)]
            loss = -objective(picked).mean(0).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
