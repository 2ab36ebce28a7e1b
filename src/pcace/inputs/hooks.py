"""How pcace touches a user's model: forward hooks on named layers, and an evaluation scope.

Every part of pcace that reads or edits a layer's output (capture, ablation, maps, CAM,
feature visualisation) registers its hooks through :func:`forward_hooks`, and every part
that runs the model does so inside :func:`evaluating`.

The model policy, everywhere: pcace runs the model in eval mode on the requested device
and **restores** it afterwards, as torchvision's feature extraction does: each module's
``training`` flag and the device the model's parameters were on come back as they were,
also after an error or a Ctrl-C.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

Hook = Callable[[nn.Module, Any, Any], Any]


def _model_device(model: nn.Module) -> torch.device | None:
    """The one device that holds all parameters and buffers, or None (none, or several)."""
    devices = {t.device for t in model.parameters()} | {t.device for t in model.buffers()}
    return devices.pop() if len(devices) == 1 else None


@contextlib.contextmanager
def evaluating(model: nn.Module, device: torch.device | str | None = None
               ) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode (on ``device``) in the block, then restore it.

    Parameters
    ----------
    model : torch.nn.Module
    device : torch.device or str, optional
        Where the block runs the model; None leaves it where it is. Afterwards the model
        goes back to the device it was on (when its parameters shared one device).

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout()).train()
    >>> with evaluating(net):
    ...     net[1].training
    False
    >>> net[1].training
    True
    """
    flags = [(m, m.training) for m in model.modules()]
    home = _model_device(model)
    try:
        if device is not None:
            model.to(device)
        model.eval()
        yield model
    finally:
        for module, training in flags:
            module.training = training
        if device is not None and home is not None and torch.device(device) != home:
            model.to(home)


def _check_hookable(model: nn.Module) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "TorchScript models do not support forward hooks, which pcace needs to read a "
            "layer's output. Export the model with torch.export instead (torch.export.save; "
            "pcace loads the .pt2 file), or pass the eager nn.Module")


@contextlib.contextmanager
def forward_hooks(model: nn.Module, hooks: Mapping[str, Hook]) -> Iterator[None]:
    """Register ``{layer name: hook}`` as forward hooks for the block; remove them after.

    A hook is called as ``hook(module, inputs, output)``; a value it returns replaces the
    module's output (PyTorch's convention).

    Parameters
    ----------
    model : torch.nn.Module
    hooks : mapping of str to callable
        Qualified module names (``"layer3.1.conv2"``, as ``model.named_modules()`` gives
        them; check them first with :func:`pcace.inputs.layers.resolve_layers`).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    >>> seen = []
    >>> with forward_hooks(net, {"0": lambda m, i, out: seen.append(tuple(out.shape))}):
    ...     _ = net(torch.rand(1, 1, 5, 5))
    >>> seen
    [(1, 2, 3, 3)]
    """
    _check_hookable(model)
    modules = dict(model.named_modules())
    unknown = [name for name in hooks if name not in modules]
    if unknown:
        raise ValueError(unknown_layers_message(unknown, [n for n in modules if n]))
    handles = []
    try:
        for name, hook in hooks.items():
            handles.append(modules[name].register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


#: Valid names listed at most in an unknown-layer message.
_MAX_LISTED = 15


def unknown_layers_message(unknown: list[str], valid: list[str]) -> str:
    """The error text for unknown layer names: the valid ones, closest first."""
    from ..core.voice import action

    closest: list[str] = []
    for name in unknown:
        for match in difflib.get_close_matches(name, valid, n=5, cutoff=0.4):
            if match not in closest:
                closest.append(match)
    ordered = closest + [v for v in valid if v not in closest]
    shown = ", ".join(ordered[:_MAX_LISTED])
    more = f" and {len(ordered) - _MAX_LISTED} more" if len(ordered) > _MAX_LISTED else ""
    what = "unknown layer " if len(unknown) == 1 else "unknown layers "
    return (f"{what}{', '.join(repr(u) for u in unknown)}. Valid names, closest first: "
            f"{shown}{more}. List them with {action('list_layers')}")
