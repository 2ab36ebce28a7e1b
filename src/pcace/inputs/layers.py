"""Layers of a network, addressed by their qualified module names.

Names are those ``model.named_modules()`` gives (``"layer3.1.conv2"``), the convention of
torchvision's feature extraction. :func:`conv_layer_names` and :func:`describe_layers`
list them; :func:`resolve_layers` checks a request and puts it in network order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from .hooks import evaluating, forward_hooks, unknown_layers_message


def conv_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Conv2d`` of ``model``, in module order.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    list of str
        Names as ``model.named_modules()`` gives them.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3))
    >>> conv_layer_names(net)
    ['0', '2']
    """
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def describe_layers(model: nn.Module, input_shape: Sequence[int],
                    device: str | torch.device = "cpu") -> pd.DataFrame:
    """Every module with a 4-D output, with its output shape, from one dummy forward pass.

    Parameters
    ----------
    model : torch.nn.Module
        Run in eval mode on ``device``; restored afterwards (:func:`pcace.inputs.hooks.evaluating`).
    input_shape : sequence of int
        ``(C, H, W)`` or ``(B, C, H, W)`` of one input; the pass uses zeros
        (batch 1 when no batch size is given).
    device : str or torch.device, default "cpu"

    Returns
    -------
    pandas.DataFrame
        One row per module whose output is a 4-D tensor, in the order the
        modules first ran: ``name``, ``type`` (class name), ``out_channels``,
        ``height``, ``width``, and ``calls`` (how often it ran in the pass; a
        module that runs more than once, such as a shared ReLU, cannot be
        captured).

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten())
    >>> describe_layers(net, (3, 8, 8))[["name", "type", "out_channels", "height"]]
      name    type  out_channels  height
    0    0  Conv2d             4       6
    1    1    ReLU             4       6
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) or (B, C, H, W) with positive sizes; "
                         f"got {tuple(input_shape)}")
    rows: dict[str, dict[str, Any]] = {}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if name in rows:
                rows[name]["calls"] += 1
            elif isinstance(output, torch.Tensor) and output.ndim == 4:
                rows[name] = {"name": name, "type": type(module).__name__,
                              "out_channels": output.shape[1], "height": output.shape[2],
                              "width": output.shape[3], "calls": 1}
        return hook

    hooks = {name: make_hook(name) for name, _ in model.named_modules() if name}
    with evaluating(model, device), forward_hooks(model, hooks), torch.no_grad():
        model(torch.zeros(shape, device=device))
    columns = ["name", "type", "out_channels", "height", "width", "calls"]
    return pd.DataFrame(list(rows.values()), columns=columns)


def resolve_layers(model: nn.Module,
                   layers: str | nn.Module | Iterable[str | nn.Module] | None) -> list[str]:
    """Check layer names against ``model`` and put them in network order.

    Parameters
    ----------
    model : torch.nn.Module
    layers : None, str, module, or iterable of those
        ``None`` means every ``nn.Conv2d`` (:func:`conv_layer_names`). Names are
        qualified module names; a submodule of ``model`` stands for its name.

    Returns
    -------
    list of str
        The names in module order, duplicates removed.

    Raises
    ------
    ValueError
        For an unknown name, listing the valid names with the closest first.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3))
    >>> resolve_layers(net, ["2", "0", "2"])
    ['0', '2']
    """
    if layers is None:
        names = conv_layer_names(model)
        if not names:
            from ..core.voice import action, option

            raise ValueError(f"{type(model).__name__} has no nn.Conv2d layers; give "
                             f"{option('layers', 'NAME ...', python='[...]')} with module names "
                             f"(list them with {action('list_layers')})")
        return names
    if isinstance(layers, str | nn.Module):
        layers = [layers]
    order = {name: i for i, (name, _) in enumerate(model.named_modules()) if name}
    requested = [_layer_name(model, item) for item in layers]
    if not requested:
        raise ValueError("layers is empty; pass None for every conv layer or a list of names")
    unknown = [name for name in requested if name not in order]
    if unknown:
        raise ValueError(unknown_layers_message(unknown, list(order)))
    return sorted(set(requested), key=order.__getitem__)


def _layer_name(model: nn.Module, item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, nn.Module):
        for name, module in model.named_modules():
            if module is item and name:
                return name
        raise ValueError(f"the {type(item).__name__} passed in layers is not a submodule of "
                         f"the model; pass its qualified name instead")
    raise TypeError(f"layers must hold module names (str); got {type(item).__name__} {item!r}")
