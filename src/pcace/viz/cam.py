"""Where in the image the network looks: CAM, or Grad-CAM when CAM does not apply.

CAM (Zhou et al. 2016) needs a network that ends in global average pooling and one
linear layer: the map of class ``c`` is the last convolutional block's channels weighted
by the linear layer's weights for ``c``. Any other network (or a regression score) gets
Grad-CAM (Selvaraju et al. 2017): the last 4-D output's channels weighted by the mean
gradient of the score, then a ReLU. These maps sit beside PCACE's weighted maps in the
report, as the paper compares them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..inputs.hooks import forward_hooks
from ..inputs.targets import (
    ClassLogit,
    ClassProbability,
    RegressionOutput,
    Target,
    output_tensor,
    target_from_dict,
)


@dataclass
class Explanation:
    """A CAM or Grad-CAM map per image.

    Attributes
    ----------
    maps : numpy.ndarray
        Shape (E, h, w), at the resolution of ``layer``'s output.
    method : str
        ``"CAM"`` or ``"Grad-CAM"``.
    layer : str
        The module whose output the maps weight.
    what : str
        What the map explains (``"logit of class 3"``).
    """

    maps: np.ndarray
    method: str
    layer: str
    what: str


def _recorded_forward(model: nn.Module, x: torch.Tensor) -> tuple[Any, list, dict]:
    """Run ``model`` with every submodule's tensor output recorded in completion order."""
    outputs: list[tuple[str, torch.Tensor]] = []
    linear_io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str, module: nn.Module):
        def fn(_mod, inputs, out):
            if isinstance(out, torch.Tensor):
                outputs.append((name, out))
                if isinstance(module, nn.Linear) and inputs and isinstance(inputs[0], torch.Tensor):
                    linear_io[name] = (inputs[0], out)
        return fn

    modules = {name: module for name, module in model.named_modules() if name}
    with forward_hooks(model, {name: hook(name, m) for name, m in modules.items()}):
        out = model(x)
    return out, outputs, linear_io


def _last_maps(outputs: list) -> tuple[str, torch.Tensor] | None:
    for name, t in reversed(outputs):
        if t.dim() == 4 and t.shape[-1] * t.shape[-2] > 1:
            return name, t
    return None


def find_cam_layer(model: nn.Module, x: torch.Tensor) -> tuple[str, str] | None:
    """The (last conv block, final linear) names when ``model`` ends in GAP + linear, else None.

    Checked numerically on ``x``: the output must be the last ``nn.Linear``'s output, and
    that layer's input must equal the spatial mean of some earlier 4-D output.

    Examples
    --------
    >>> import torch
    >>> from pcace.zoo import cifar_resnet20
    >>> find_cam_layer(cifar_resnet20().eval(), torch.rand(2, 3, 32, 32))
    ('layer3', 'linear')
    """
    with torch.no_grad():
        out, outputs, linear_io = _recorded_forward(model, x)
    if not linear_io:
        return None
    final = output_tensor(out)
    name, (lin_in, lin_out) = list(linear_io.items())[-1]
    if lin_out.shape != final.shape or not torch.allclose(lin_out, final):
        return None
    flat = lin_in.reshape(lin_in.shape[0], -1)
    for cand, t in reversed(outputs):
        if t.dim() != 4 or t.shape[-1] * t.shape[-2] <= 1 or t.shape[1] != flat.shape[1]:
            continue
        if torch.allclose(t.mean(dim=(-2, -1)), flat, rtol=1e-4, atol=1e-5):
            return cand, name
    return None


def resolve_cam_target(
    spec: Mapping[str, Any] | Target | Callable | None,
) -> Target | Callable | None:
    """A score function from a run manifest's ``target`` entry (or a callable as is).

    Unknown or unrebuildable descriptions give None (no CAM is drawn then). A regression
    target without an index scores a single-output network.

    Examples
    --------
    >>> resolve_cam_target({"kind": "class_logit", "index": 3}).describe()
    'logit of class 3'
    >>> resolve_cam_target({"kind": "regression_output"}).describe()
    'regression output'
    """
    if spec is None or callable(spec):
        return spec
    if not isinstance(spec, Mapping):
        return None
    try:
        return target_from_dict(spec)
    except (ValueError, KeyError, TypeError):
        pass
    kind = str(spec.get("kind", "")).lower()
    index = spec.get("index")
    if isinstance(index, int | np.integer) and not isinstance(index, bool):
        if "prob" in kind:
            return ClassProbability(int(index), spec.get("name"))
        if "logit" in kind or "class" in kind:
            return ClassLogit(int(index), spec.get("name"))
    if "regress" in kind or "output" in kind:
        return RegressionOutput(index if isinstance(index, int) else None)
    return None


def _describe(target: Any) -> str:
    if hasattr(target, "describe"):
        return str(target.describe())
    return getattr(target, "__name__", type(target).__name__)


def explain(model: nn.Module, images: torch.Tensor, target: Any) -> Explanation | None:
    """CAM of the target class when the network allows it, else Grad-CAM of the score.

    Parameters
    ----------
    model : torch.nn.Module
        The network, in eval mode.
    images : torch.Tensor
        Preprocessed images (E, C, H, W) on the model's device.
    target : Target, callable, dict or None
        The run's score (see :func:`resolve_cam_target`). None gives None.

    Returns
    -------
    Explanation or None

    Examples
    --------
    >>> import torch
    >>> from pcace.zoo import mnist_cnn
    >>> e = explain(mnist_cnn().eval(), torch.rand(2, 1, 28, 28),
    ...             {"kind": "class_logit", "index": 1})
    >>> e.method, e.layer, e.maps.shape
    ('Grad-CAM', 'pool2', (2, 7, 7))
    """
    score_fn = resolve_cam_target(target)
    if score_fn is None:
        return None
    index = getattr(score_fn, "index", None)
    is_class = isinstance(score_fn, ClassLogit | ClassProbability)
    if is_class:
        found = find_cam_layer(model, images)
        if found is not None:
            layer, linear = found
            with torch.no_grad():
                _, outputs, _ = _recorded_forward(model, images)
            maps = dict(outputs)[layer]
            weight = dict(model.named_modules())[linear].weight[index].detach()
            cam = torch.einsum("c,nchw->nhw", weight.to(maps), maps.detach())
            return Explanation(cam.float().cpu().numpy(), "CAM", layer,
                               f"class {index}" + (f" ({score_fn.name})" if score_fn.name else ""))
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out, outputs, _ = _recorded_forward(model, x)
        last = _last_maps(outputs)
        if last is None:
            return None
        layer, maps = last
        try:
            score = score_fn(out)
        except ValueError:
            return None
        grads, = torch.autograd.grad(score.sum(), maps, allow_unused=True)
    if grads is None:
        return None
    alpha = grads.mean(dim=(-2, -1), keepdim=True)
    cam = torch.relu((alpha * maps).sum(1)).detach()
    return Explanation(cam.float().cpu().numpy(), "Grad-CAM", layer, _describe(score_fn))
