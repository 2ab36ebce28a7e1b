"""Baseline channel rankings that :func:`pcace.stats.ablate.ablate` compares PCACE with.

Mean absolute activation, the L1 norm of the conv filters, first-order Taylor importance and
(with Captum installed) layer conductance, each as values per channel
(:func:`baseline_importance`) or as an order, most important first
(:func:`baseline_rankings`).

Examples
--------
>>> import torch
>>> from pcace.zoo import mnist_cnn
>>> orders = baseline_rankings(mnist_cnn().eval(), torch.rand(8, 1, 28, 28), 0, "conv1",
...                            methods=["weight_l1"])
>>> len(orders["weight_l1"])
8
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..core.malloc import kept_heap, tuning_requested
from ..core.validation import device as resolve_device
from ..core.validation import integer
from ..inputs.hooks import evaluating, forward_hooks
from ..inputs.targets import resolve_target
from .ablators import _batches, _module, _output_channels

__all__ = ["BASELINES", "baseline_importance", "baseline_rankings"]

BASELINES = ("mean_abs_activation", "weight_l1", "taylor", "layer_conductance")


def _conv_weight(module: torch.nn.Module) -> torch.Tensor | None:
    weight = getattr(module, "weight", None)
    if isinstance(module, torch.nn.modules.conv._ConvNd) and isinstance(weight, torch.Tensor):
        if isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
            return weight.transpose(0, 1)  # (out, in/groups, ...)
        return weight
    return None


def baseline_rankings(
    model: torch.nn.Module,
    images: Any,
    target: int | str | Callable[[Any], torch.Tensor],
    layer: str,
    *,
    methods: Sequence[str] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    conductance_steps: int = 20,
    tune_malloc: bool | None = None,
) -> dict[str, np.ndarray]:
    """Channel orders (best first) of ``layer`` by common importance measures.

    Parameters
    ----------
    model : torch.nn.Module
        The network. It runs in eval mode on ``device``, and is restored afterwards.
    images : tensor, Dataset or DataLoader
        Preprocessed images.
    target : int, str or callable
        The score, as for :func:`ablate`.
    layer : str
        Qualified name of the module whose output channels are ranked.
    methods : sequence of str, optional
        Any of :data:`BASELINES`; default all that apply:

        - ``"mean_abs_activation"``: mean over images and positions of
          ``|activation|``;
        - ``"weight_l1"``: L1 norm of each output filter of the layer's
          convolution weight (Li et al. 2017). Skipped with a warning when the
          module has no conv weight;
        - ``"taylor"``: first-order Taylor importance (Molchanov et al. 2017),
          the mean over images of ``|sum over positions of activation *
          d score / d activation|``;
        - ``"layer_conductance"``: Captum's ``LayerConductance`` (zero input
          baseline, ``conductance_steps`` steps), the mean over images of
          ``|sum over positions of the conductance|``. Needs ``captum`` (the
          ``pcace[captum]`` extra); left out silently by default when Captum is
          missing, with a warning when asked for.
    batch_size : int, default 64
        Images per pass.
    device : str or torch.device, default "auto"
        Where the model runs (CUDA when available, else the CPU).
    conductance_steps : int, default 20
        Integration steps of layer conductance (each one a forward and
        backward pass).
    tune_malloc : bool, optional
        As for :func:`ablate`.

    Returns
    -------
    dict
        ``name -> numpy.ndarray`` of channel ids, most important first (ties
        keep channel order). :func:`baseline_importance` returns the values.

    Examples
    --------
    >>> import torch
    >>> from pcace.zoo import mnist_cnn
    >>> orders = baseline_rankings(mnist_cnn().eval(), torch.rand(8, 1, 28, 28), 0, "conv1",
    ...                            methods=["weight_l1", "taylor"])
    >>> sorted(orders), len(orders["taylor"])
    (['taylor', 'weight_l1'], 8)
    """
    values = baseline_importance(model, images, target, layer, methods=methods,
                                 batch_size=batch_size, device=device,
                                 conductance_steps=conductance_steps, tune_malloc=tune_malloc)
    return {name: np.argsort(-v, kind="stable") for name, v in values.items()}


def baseline_importance(
    model: torch.nn.Module,
    images: Any,
    target: int | str | Callable[[Any], torch.Tensor],
    layer: str,
    *,
    methods: Sequence[str] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    conductance_steps: int = 20,
    tune_malloc: bool | None = None,
) -> dict[str, np.ndarray]:
    """The importance values behind :func:`baseline_rankings` (same arguments).

    Returns
    -------
    dict
        ``name -> numpy.ndarray (C,)`` float64, larger = more important.

    Examples
    --------
    >>> import torch
    >>> from pcace.zoo import mnist_cnn
    >>> v = baseline_importance(mnist_cnn().eval(), torch.rand(8, 1, 28, 28), 0, "conv1",
    ...                         methods=["mean_abs_activation"])
    >>> v["mean_abs_activation"].shape
    (8,)
    """
    explicit = methods is not None
    wanted = list(BASELINES if methods is None else methods)
    for m in wanted:
        if m not in BASELINES:
            raise ValueError(f"unknown baseline {m!r}; expected some of {BASELINES}")
    integer(conductance_steps, "conductance_steps")
    module = _module(model, layer)
    dev = resolve_device(device)
    score_fn = resolve_target(target)
    with evaluating(model, dev), kept_heap(tuning_requested(tune_malloc)):
        return _baseline_importance(model, module, images, score_fn, layer, wanted, explicit,
                                    batch_size, dev, conductance_steps)


def _baseline_importance(model: torch.nn.Module, module: torch.nn.Module, images: Any,
                         score_fn: Callable, layer: str, wanted: list[str], explicit: bool,
                         batch_size: int, dev: torch.device, conductance_steps: int
                         ) -> dict[str, np.ndarray]:
    batches = _batches(images, batch_size)
    out: dict[str, np.ndarray] = {}

    if "mean_abs_activation" in wanted or "taylor" in wanted:
        abs_sum, taylor_sum, n = _activation_pass(model, batches, score_fn, dev, layer,
                                                  "taylor" in wanted)
        if "mean_abs_activation" in wanted:
            out["mean_abs_activation"] = abs_sum / n
        if "taylor" in wanted:
            out["taylor"] = taylor_sum / n
        n_channels = abs_sum.shape[0]
    else:
        n_channels = None

    if "weight_l1" in wanted:
        weight = _conv_weight(module)
        if weight is None:
            warnings.warn(f"weight_l1 skipped: {layer!r} ({type(module).__name__}) has no "
                          "convolution weight", stacklevel=2)
        else:
            l1 = weight.detach().abs().flatten(1).sum(dim=1).double().cpu().numpy()
            if n_channels is not None and l1.shape[0] != n_channels:
                warnings.warn(f"weight_l1 skipped: {layer!r} has {l1.shape[0]} filters but "
                              f"{n_channels} output channels", stacklevel=2)
            else:
                out["weight_l1"] = l1

    if "layer_conductance" in wanted:
        try:
            from captum.attr import LayerConductance
        except ImportError:
            if explicit:
                warnings.warn("layer_conductance skipped: captum is not installed "
                              "(pip install 'pcace[captum]')", stacklevel=2)
        else:
            out["layer_conductance"] = _conductance(LayerConductance, model, module, batches,
                                                    score_fn, dev, conductance_steps)
    return {m: out[m] for m in BASELINES if m in out}


def _activation_pass(model, batches, score_fn, dev, layer, with_grad):
    """Sums over images of mean |activation| and of the Taylor term, per channel."""
    held: list[torch.Tensor] = []

    def hook(_mod, _inp, output):
        output = _output_channels(output, layer)
        if with_grad:
            output = output.detach().requires_grad_(True)
        held.append(output)
        return output

    abs_sum = taylor_sum = None
    n = 0
    with forward_hooks(model, {layer: hook}):
        for x in batches:
            held.clear()
            with torch.set_grad_enabled(with_grad):
                out = model(x.to(dev))
                if not held:
                    raise ValueError(f"module {layer!r} was not called in the forward pass")
                act = held[0]
                a_abs = act.detach().abs().flatten(2).mean(dim=2).double().sum(dim=0)
                abs_sum = a_abs if abs_sum is None else abs_sum + a_abs
                if with_grad:
                    s = torch.as_tensor(score_fn(out))
                    (grad,) = torch.autograd.grad(s.sum(), act)
                    term = (act.detach() * grad).flatten(2).sum(dim=2).abs().double().sum(dim=0)
                    taylor_sum = term if taylor_sum is None else taylor_sum + term
            n += x.shape[0]
    taylor = None if taylor_sum is None else taylor_sum.cpu().numpy()
    return abs_sum.cpu().numpy(), taylor, n


def _conductance(cls, model, module, batches, score_fn, dev, steps):
    def forward(x):
        return torch.as_tensor(score_fn(model(x)))

    lc = cls(forward, module)
    total = None
    n = 0
    for x in batches:
        attr = lc.attribute(x.to(dev), n_steps=steps)
        if isinstance(attr, tuple):
            attr = attr[0]
        per = attr.detach().flatten(2).sum(dim=2).abs().double().sum(dim=0)
        total = per if total is None else total + per
        n += x.shape[0]
    return total.cpu().numpy() / n
