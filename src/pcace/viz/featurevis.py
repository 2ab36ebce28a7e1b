"""Feature visualisation: inputs synthesised to excite one channel as much as possible.

Gradient ascent on the input (in the model's own, normalised, input space) maximises a
channel's mean activation. Regularisers keep the picture readable: random jitter (a
shift of a few pixels per step), a periodic small blur, a decay towards the data's mean,
and clipping to the range of the real inputs. All channels of one layer are optimised
together in one batch, and the forward pass stops at the layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class _Reached(Exception):
    """Raised by the hook to skip the layers after the one being visualised."""


def _blur(x: torch.Tensor) -> torch.Tensor:
    """A 3x3 binomial blur of every image channel (reflect padding)."""
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (k1[:, None] * k1[None, :] / 16.0).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), kernel, groups=x.shape[1])


def objective(maps: torch.Tensor, linear_share: float = 0.1) -> torch.Tensor:
    """What the ascent maximises per channel: the mean of the map's positive part.

    The plain mean of a first layer's (pre-ReLU) output is linear in the input, so its
    maximum over a box is a flat image; the positive part -- what a following ReLU passes --
    rewards patterns. ``linear_share`` of the plain mean is added so that a channel that is
    silent at the start still gets a gradient.
    """
    return torch.relu(maps).mean(dim=(-2, -1)) + linear_share * maps.mean(dim=(-2, -1))


def visualise_channels(
    model: nn.Module,
    layer: str,
    channels: Sequence[int],
    reference: torch.Tensor,
    *,
    steps: int = 48,
    lr: float = 0.08,
    jitter: int | None = None,
    blur_every: int = 4,
    decay: float = 0.02,
    seed: int = 0,
) -> tuple[torch.Tensor, np.ndarray]:
    """Inputs that maximise the mean activation of each of ``channels`` of ``layer``.

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
        the starting point (their per-channel mean plus a little noise), the decay target
        and the clipping range.
    steps : int
        Gradient-ascent steps (Adam).
    lr : float
        Step size, in units of the inputs' per-channel standard deviation.
    jitter : int, optional
        Largest random shift in pixels per step (default: 1/16 of the image side, at least 1).
    blur_every : int
        Blur the inputs every this many steps (0: never).
    decay : float
        Pull towards the mean input per step (0: none).
    seed : int
        Seeds the starting noise and the jitter.

    Returns
    -------
    inputs : torch.Tensor
        Shape (len(channels), C, H, W), in the model's input space, on the CPU.
    activation : numpy.ndarray
        The mean activation each channel reaches on its input.

    Examples
    --------
    >>> import torch
    >>> from pcace.zoo import mnist_cnn
    >>> x, act = visualise_channels(mnist_cnn().eval(), "conv1", [0, 3], torch.rand(8, 1, 28, 28),
    ...                             steps=5)
    >>> tuple(x.shape), act.shape
    ((2, 1, 28, 28), (2,))
    """
    module = dict(model.named_modules()).get(layer)
    if module is None:
        raise ValueError(f"model has no module {layer!r}")
    chans = torch.as_tensor(list(channels), dtype=torch.long)
    ref = reference.detach().float()
    dims = (0, 2, 3)
    mean = ref.mean(dims, keepdim=True)
    std = ref.std(dims, keepdim=True).clamp_min(1e-6)
    low, high = ref.amin(dims, keepdim=True), ref.amax(dims, keepdim=True)
    k, (c, h, w) = len(chans), ref.shape[1:]
    shift = jitter if jitter is not None else max(1, min(h, w) // 16)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((k, c, h, w), generator=gen).to(ref.device)
    x = (mean + 0.1 * std * noise).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr * float(std.mean()))
    caught: dict[str, torch.Tensor] = {}

    def hook(_mod, _inp, out):
        caught["out"] = out
        raise _Reached

    def activation(inp: torch.Tensor) -> torch.Tensor:
        try:
            model(inp)
        except _Reached:
            pass
        out = caught.pop("out")
        return out[torch.arange(k), chans.to(out.device)]

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            for step in range(steps):
                dy, dx = (torch.randint(-shift, shift + 1, (2,), generator=gen)).tolist()
                maps = activation(torch.roll(x, shifts=(dy, dx), dims=(2, 3)))
                grad, = torch.autograd.grad(-objective(maps).sum(), x)
                x.grad = grad
                opt.step()
                with torch.no_grad():
                    if decay > 0:
                        x.sub_(decay * (x - mean))
                    if blur_every and (step + 1) % blur_every == 0:
                        x.copy_(_blur(x))
                    x.copy_(torch.maximum(torch.minimum(x, high), low))
        with torch.no_grad():
            reached = activation(x).mean(dim=(-2, -1)).float().cpu().numpy()
    finally:
        handle.remove()
    return x.detach().cpu(), reached
