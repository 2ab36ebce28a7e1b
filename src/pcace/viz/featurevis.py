"""Feature visualisation: inputs synthesised to excite one channel as much as possible.

Plain gradient ascent on the pixels gives high-frequency noise that the eye reads as grey
mush, or, for a channel that responds to brightness, a flat colour. Two choices make the
pictures legible:

- **A decorrelated parametrisation.** The image is not optimised pixel by pixel but as a
  2-D Fourier spectrum per colour channel, each frequency scaled by ``1 / f`` (natural
  images have roughly that spectrum, so a unit step changes every frequency by a natural
  amount instead of favouring the highest), and the colour channels are mixed by the square
  root of the real images' colour covariance (a step moves along natural colour directions).
  A sigmoid maps the result into the range of the real inputs.
- **Transformation robustness.** Every step scores a batch of randomly jittered, scaled and
  rotated copies, so the picture cannot exploit single-pixel effects; what remains are
  patterns the channel responds to wherever and however large they are.

The objective is the mean of the channel's positive part (what a following ReLU passes)
plus a small share of its plain mean; see :func:`objective`. Each visualisation is checked:
it must excite its channel more than every reference image does, and it must not be flat.
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


# ---------------------------------------------------------------- parametrisation

def _frequency_scale(h: int, w: int, decay: float = 1.0) -> torch.Tensor:
    """``1 / f**decay`` for the rfft2 frequencies of an h x w image (the DC term gets 1)."""
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    f = torch.sqrt(fx * fx + fy * fy).clamp_min(1.0 / max(h, w))
    return (1.0 / f ** decay) / math.sqrt(h * w)


def _colour_root(reference: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of the colour covariance of the (normalised) reference pixels."""
    c = reference.shape[1]
    pixels = reference.transpose(0, 1).reshape(c, -1).double()
    std = pixels.std(dim=1, keepdim=True).clamp_min(1e-6)
    cov = torch.cov(pixels / std) if c > 1 else torch.ones(1, 1, dtype=torch.float64)
    vals, vecs = torch.linalg.eigh(cov)
    root = vecs @ torch.diag(vals.clamp_min(1e-4).sqrt()) @ vecs.T
    return (root / root.norm(dim=1).max()).float()


class _Image(nn.Module):
    """An image batch as a 1/f-scaled spectrum with decorrelated colours, squashed to a box."""

    def __init__(self, k: int, reference: torch.Tensor, gen: torch.Generator,
                 init_scale: float = 0.01, reach: float = 2.5):
        super().__init__()
        _, c, h, w = reference.shape
        dims = (0, 2, 3)
        self.h, self.w = h, w
        self.register_buffer("scale", _frequency_scale(h, w).to(reference.device))
        self.register_buffer("colour", _colour_root(reference).to(reference.device))
        self.register_buffer("low", reference.amin(dims, keepdim=True))
        self.register_buffer("high", reference.amax(dims, keepdim=True))
        self.register_buffer("mean", reference.mean(dims, keepdim=True))
        self.register_buffer("std", reference.std(dims, keepdim=True).clamp_min(1e-6))
        self.reach = reach
        shape = (k, c, h, w // 2 + 1, 2)
        self.spectrum = nn.Parameter(init_scale * torch.randn(shape, generator=gen)
                                     .to(reference.device))

    def forward(self) -> torch.Tensor:
        spec = torch.view_as_complex(self.spectrum) * self.scale
        flat = torch.fft.irfft2(spec, s=(self.h, self.w), norm="ortho") * math.sqrt(self.h * self.w)
        mixed = torch.einsum("ij,kjhw->kihw", self.colour, flat)
        x = self.mean + self.reach * self.std * torch.tanh(mixed)
        return torch.maximum(torch.minimum(x, self.high), self.low)


# ---------------------------------------------------------------- transformations

def _robust_copies(x: torch.Tensor, copies: int, jitter: int, gen: torch.Generator,
                   scale: float = 0.1, degrees: float = 10.0) -> torch.Tensor:
    """``copies`` randomly transformed versions of each image: (copies * K, C, H, W).

    Each copy is padded (reflect), jittered by up to ``jitter`` pixels, scaled by a factor
    in ``[1 - scale, 1 + scale]``, rotated by up to ``degrees``, jittered again and cropped
    back to the original size.
    """
    k, c, h, w = x.shape
    pad = jitter + max(1, int(round(scale * max(h, w) / 2)))
    big = F.pad(x, (pad, pad, pad, pad), mode="reflect") if min(h, w) > pad else \
        F.pad(x, (pad, pad, pad, pad), mode="replicate")
    big = big.repeat(copies, 1, 1, 1)
    n = big.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(degrees)
    zoom = 1.0 + (torch.rand(n, generator=gen) * 2 - 1) * scale
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 * jitter / big.shape[-1])
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(big.shape), align_corners=False)
    moved = F.grid_sample(big, grid, mode="bilinear", padding_mode="reflection",
                          align_corners=False)
    dy, dx = (torch.randint(-jitter, jitter + 1, (2,), generator=gen)).tolist()
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
    copies: int = 2,
    jitter: int | None = None,
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
        Randomly transformed copies of each image scored per step.
    jitter : int, optional
        Largest random shift in pixels (default: 1/16 of the image side, at least 1).
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
    k, h, w = len(chans), ref.shape[-2], ref.shape[-1]
    shift = jitter if jitter is not None else max(1, min(h, w) // 16)
    gen = torch.Generator().manual_seed(seed)
    image = _Image(k, ref, gen)
    caught: dict[str, torch.Tensor] = {}
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
