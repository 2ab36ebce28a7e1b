"""Faithfulness: does ablating a ranking's top channels hurt the score more than chance?

A ranking of the channels of a layer (PCACE's, or a baseline's) is faithful to
the model if removing its top channels changes the output more than removing
random channels of the same number, and removing its bottom channels less.

- :func:`ablate` replaces the top-m, bottom-m and random m channels of one layer's
  output (by their mean over the images, or by 0) and measures the mean drop of
  the score, and of accuracy when labels are given.
- :func:`baseline_rankings` gives the usual alternatives on the same layer:
  mean absolute activation, the L1 norm of the conv filters, first-order Taylor
  importance and (with Captum installed) layer conductance.
- :func:`faithfulness_summary` condenses the curves into one number per ranking.

Notes
-----
Every ablation is a full forward pass over the images: :func:`ablate` costs about
``(2 * rankings + repeats) * len(sizes) + 1`` passes (identical channel sets are run once).
A module called more than once in a forward pass is ablated at every call.

``score_drop`` measures what the mean score loses; ``score_change`` how far each image's
score moves. Under mean ablation a channel whose effect on the score is linear leaves the
mean score where it was (its deviations average out) while moving every image's score, so
rankings of covariation such as PCACE are better judged by ``score_change``.

Mean ablation uses the mean over ``images`` unless ``reference`` is given. With images of
one class (PCACE's usual input) that mean carries the class: on the CIFAR ResNet-20 with 200
cat images, replacing all 64 channels of ``layer3.0.conv1`` by their cat mean raises the cat
logit and the accuracy (0.70 to 0.93), so the drop curves need not increase up to ``m = C``.
Pass images of all classes as ``reference`` for a class-neutral mean, or use
``mode="zero"``.

Examples
--------
>>> import torch
>>> from pcace.zoo import mnist_cnn
>>> model = mnist_cnn().eval()
>>> images = torch.rand(32, 1, 28, 28)
>>> orders = baseline_rankings(model, images, 3, "conv2",
...                            methods=["mean_abs_activation", "weight_l1", "taylor"])
>>> sorted(orders)
['mean_abs_activation', 'taylor', 'weight_l1']
>>> curves = ablate(model, images, 3, "conv2", orders["taylor"], sizes=(1, 4),
...                 repeats=3, baselines=orders)
>>> faithfulness_summary(curves).ranking.tolist()  # doctest: +SKIP
['pcace', 'taylor', 'mean_abs_activation', 'weight_l1']
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..core.malloc import kept_heap, tuning_requested
from ..core.validation import device as resolve_device
from ..core.validation import integer
from ..inputs.data import as_batches
from ..inputs.hooks import evaluating, forward_hooks
from ..inputs.layers import unknown_layers_message
from ..inputs.targets import resolve_target
from .faithfulness import faithfulness_summary

__all__ = [
    "BASELINES",
    "MODES",
    "ablate",
    "baseline_importance",
    "baseline_rankings",
    "faithfulness_summary",
]

MODES = ("mean", "zero")
BASELINES = ("mean_abs_activation", "weight_l1", "taylor", "layer_conductance")


# ------------------------------------------------------------------------- helpers

def _module(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    modules = dict(model.named_modules())
    if not isinstance(layer, str) or layer not in modules or layer == "":
        raise ValueError(unknown_layers_message([str(layer)], [n for n in modules if n]))
    return modules[layer]


def _batches(images: Any, batch_size: int) -> list[torch.Tensor]:
    return [b for b in as_batches(images, batch_size)]


def _labels(labels: Any, n: int) -> torch.Tensor | None:
    if labels is None:
        return None
    t = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels))
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},), one per image; got {tuple(t.shape)}")
    if t.is_floating_point() and not bool((t == t.round()).all()):
        raise ValueError("labels must be class indices (integers)")
    return t.long()


def _output_channels(out: Any, layer: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.ndim < 2:
        raise ValueError(f"the output of {layer!r} must be a tensor (N, C, ...) to ablate "
                         f"channels; got {type(out).__name__}"
                         + (f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor)
                            else ""))
    return out


def _forward(model: torch.nn.Module, batches: list[torch.Tensor], score_fn: Callable,
             dev: torch.device, want_pred: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    scores, preds = [], []
    with torch.no_grad():
        for x in batches:
            out = model(x.to(dev))
            scores.append(torch.as_tensor(score_fn(out)).detach().double().cpu().flatten())
            if want_pred:
                logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
                if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
                    raise ValueError("accuracy needs class outputs of shape (N, classes)")
                preds.append(logits.argmax(dim=1).cpu())
    return torch.cat(scores), (torch.cat(preds) if want_pred else None)


def _as_order(ranking: Any, n_channels: int, layer: str, name: str) -> np.ndarray:
    """A ranking as a full permutation of channel ids, best first."""
    if isinstance(ranking, pd.DataFrame):
        df = ranking
        if "channel" not in df.columns:
            raise ValueError(f"ranking {name!r}: a DataFrame needs a 'channel' column")
        if "layer" in df.columns and df["layer"].nunique() > 1:
            df = df[df["layer"] == layer]
            if df.empty:
                raise ValueError(f"ranking {name!r} has no rows for layer {layer!r}")
        if "rank" in df.columns:
            df = df.sort_values("rank", kind="stable")
        elif "pcace" in df.columns:
            df = df.sort_values("pcace", ascending=False, kind="stable")
        else:
            raise ValueError(f"ranking {name!r}: a DataFrame needs a 'rank' (or 'pcace') column")
        values = df["channel"].to_numpy()
    elif isinstance(ranking, torch.Tensor):
        values = ranking.detach().cpu().numpy()
    else:
        try:
            values = np.asarray(list(ranking))
        except TypeError:
            raise ValueError(f"ranking {name!r} must be a sequence of channel ids or a "
                             f"DataFrame; got {type(ranking).__name__}") from None
    if values.ndim != 1 or (values.size and not np.issubdtype(values.dtype, np.integer)):
        raise ValueError(f"ranking {name!r} must be a 1-D sequence of integer channel ids")
    order = values.astype(np.int64)
    if order.size != n_channels or set(order.tolist()) != set(range(n_channels)):
        missing = sorted(set(range(n_channels)) - set(order.tolist()))[:10]
        extra = sorted(set(order.tolist()) - set(range(n_channels)))[:10]
        raise ValueError(f"ranking {name!r} must order all {n_channels} channels of {layer!r} "
                         f"once each; got {order.size} ids (missing {missing}, out of range "
                         f"{extra})")
    return order


def _sizes(sizes: Any, n_channels: int) -> list[int]:
    try:
        values = list(sizes)
    except TypeError:
        raise ValueError(f"sizes must be a sequence of ints; got {sizes!r}") from None
    if not values or any(isinstance(m, bool) or not isinstance(m, Integral) or m < 1
                         for m in values):
        raise ValueError(f"sizes must be a non-empty sequence of ints >= 1; got {sizes!r}")
    values = sorted({int(m) for m in values})
    kept = [m for m in values if m <= n_channels]
    if len(kept) < len(values):
        warnings.warn(f"sizes {[m for m in values if m > n_channels]} exceed the layer's "
                      f"{n_channels} channels and are left out", stacklevel=3)
    if not kept:
        raise ValueError(f"no size is at most the layer's {n_channels} channels: {values}")
    if kept[-1] == n_channels:
        warnings.warn(f"size {n_channels} ablates every channel of the layer: top, bottom and "
                      "random sets are the same; its rows stay in the curves, but the "
                      "summary's gaps leave it out", stacklevel=3)
    return kept


class _Ablator:
    """Runs the model with a set of channels of one module replaced."""

    def __init__(self, model, layer, batches, score_fn, dev, labels, fill, base_scores):
        self.model, self.layer, self.batches = model, layer, batches
        self.score_fn, self.dev, self.labels, self.fill = score_fn, dev, labels, fill
        self.base_scores = base_scores
        self.cache: dict[frozenset, tuple[float, float | None, float]] = {}

    def run(self, channels: np.ndarray) -> tuple[float, float | None, float]:
        """Mean ablated score, accuracy (or None) and mean |score change| per image."""
        key = frozenset(int(c) for c in channels)
        if key not in self.cache:
            idx = torch.as_tensor(sorted(key), dtype=torch.long, device=self.dev)
            fill = None if self.fill is None else self.fill[idx]

            def hook(_mod, _inp, out):
                out = out.clone()
                if fill is None:
                    out[:, idx] = 0
                else:
                    out[:, idx] = fill.to(out.dtype)
                return out

            with forward_hooks(self.model, {self.layer: hook}):
                scores, preds = _forward(self.model, self.batches, self.score_fn, self.dev,
                                         self.labels is not None)
            acc = None if preds is None else float((preds == self.labels).double().mean())
            change = float((scores - self.base_scores).abs().mean())
            self.cache[key] = (float(scores.mean()), acc, change)
        return self.cache[key]


# -------------------------------------------------------------------------- ablate

def ablate(model: torch.nn.Module, images: Any, target: int | str | Callable[[Any], torch.Tensor],
           layer: str, ranking: Sequence[int] | np.ndarray | pd.DataFrame | Mapping[str, Any],
           sizes: Sequence[int] = (1, 2, 4, 8, 16), mode: str = "mean", repeats: int = 10,
           labels: Any = None, batch_size: int = 64, device: str | torch.device = "auto",
           seed: int = 0, baselines: Mapping[str, Any] | bool | None = None, *,
           reference: Any = None, tune_malloc: bool | None = None, progress: bool = False
           ) -> pd.DataFrame:
    """Score and accuracy drop when a ranking's top, bottom or random channels are ablated.

    A forward hook on module ``layer`` replaces the chosen channels of its output while the
    network runs over ``images``. Cost and choice of mean: see the module's Notes.

    Parameters
    ----------
    model : torch.nn.Module
        The network; run in eval mode on ``device``, its flags and device restored after.
    images : tensor, Dataset or DataLoader
        Preprocessed images, as for :func:`pcace.rank`; read once and kept in memory.
    target : int, str or callable
        The score (an int: that class's logit); see :func:`pcace.inputs.targets.resolve_target`.
    layer : str
        Qualified name of the module whose output channels are ablated.
    ranking : sequence of int, DataFrame, or mapping name -> either
        Channel ids of ``layer``, best first, each once; a DataFrame with ``channel`` and
        ``rank`` (or ``pcace``) columns such as ``PCACEResult.channels`` (its ``layer`` rows
        if it has that column); or several named rankings. A single one is named "pcace".
    sizes : sequence of int, default (1, 2, 4, 8, 16)
        Numbers ``m`` of channels ablated; those above the channel count are left out.
    mode : {"mean", "zero"}, default "mean"
        Replace each ablated channel by its mean map over the images (per position), or by 0.
    repeats : int, default 10
        Random sets of ``m`` channels per size.
    labels : array_like, optional
        Class index per image; adds the drop of top-1 accuracy.
    batch_size : int, default 64
        Images per forward pass.
    device : str or torch.device, default "auto"
        Where the model runs (``"auto"``: CUDA when available, else the CPU).
    seed : int, default 0
        Seed of the random channel sets (``np.random.default_rng(seed)``).
    baselines : mapping name -> ranking, or True, optional
        More rankings on the same images and random sets; ``True``: :func:`baseline_rankings`.
    reference : tensor, Dataset or DataLoader, optional
        Images whose mean maps fill the ablated channels in ``mode="mean"`` (default: images).
    tune_malloc : bool, optional
        Keep freed memory in glibc's heap (process-wide; :mod:`pcace.core.malloc`).
    progress : bool, default False
        Show a progress bar over the ablated forward passes on stderr.

    Returns
    -------
    pandas.DataFrame
        One row per (ranking, selection, m): ``ranking`` (``"random"`` for random rows),
        ``selection`` (``"top"``, ``"bottom"``, ``"random"``), ``m``, ``score`` (mean ablated
        score), ``score_drop`` (unablated minus ablated mean score), ``score_change`` (mean
        ``|ablated - unablated score|``), with labels ``accuracy_drop``; each with a ``*_sd``
        column (over the random sets; NaN for top and bottom); and ``n_sets``. ``attrs``:
        ``layer``, ``mode``, ``n_images``, ``n_channels``, ``base_score``, ``base_accuracy``,
        ``repeats``, ``seed``.

    Examples
    --------
    >>> import torch
    >>> from pcace.zoo import mnist_cnn
    >>> model = mnist_cnn().eval()
    >>> x = torch.rand(20, 1, 28, 28)
    >>> df = ablate(model, x, 3, "conv1", list(range(8)), sizes=(1, 8), repeats=2)
    >>> sorted(set(df.selection))
    ['bottom', 'random', 'top']
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    integer(repeats, "repeats")
    integer(seed, "seed", minimum=None)
    _module(model, layer)
    dev = resolve_device(device)
    score_fn = resolve_target(target)
    with evaluating(model, dev), kept_heap(tuning_requested(tune_malloc)):
        return _ablate(model, images, score_fn, layer, ranking, sizes, mode, repeats, labels,
                       batch_size, dev, seed, baselines, reference, progress)


def _ablate(model: torch.nn.Module, images: Any, score_fn: Callable, layer: str,
            ranking: Any, sizes: Sequence[int], mode: str, repeats: int, labels: Any,
            batch_size: int, dev: torch.device, seed: int, baselines: Any,
            reference: Any, progress: bool = False) -> pd.DataFrame:
    batches = _batches(images, batch_size)
    n_images = sum(len(b) for b in batches)
    label_t = _labels(labels, n_images)
    reference = reference if mode == "mean" else None
    base_scores, base_preds, mean_map, n_reference = _unablated_pass(
        model, batches, score_fn, layer, dev, label_t is not None, reference, batch_size)
    n_channels = mean_map.shape[0]
    base_score = float(base_scores.mean())
    base_acc = None if base_preds is None else float((base_preds == label_t).double().mean())

    rankings = _named_rankings(ranking, baselines, model, batches, score_fn, layer,
                               batch_size, dev)
    orders = {str(k): _as_order(v, n_channels, layer, str(k)) for k, v in rankings.items()}
    ms = _sizes(sizes, n_channels)
    fill = mean_map.to(dev) if mode == "mean" else None
    runner = _Ablator(model, layer, batches, score_fn, dev, label_t, fill, base_scores)
    rng = np.random.default_rng(int(seed))
    random_sets = {m: [rng.choice(n_channels, size=m, replace=False) for _ in range(repeats)]
                   for m in ms}
    runs = _run_ablations(runner, orders, random_sets, repeats, layer, progress)
    df = pd.DataFrame([_curve_row(*run, base_score, base_acc) for run in runs])
    df.attrs.update({"layer": layer, "mode": mode, "n_images": n_images,
                     "n_channels": int(n_channels), "base_score": base_score,
                     "base_accuracy": base_acc, "repeats": int(repeats), "seed": int(seed),
                     "n_reference": n_reference})
    return df


def _unablated_pass(model: torch.nn.Module, batches: list[torch.Tensor], score_fn: Callable,
                    layer: str, dev: torch.device, want_pred: bool, reference: Any,
                    batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None,
                                              torch.Tensor, int]:
    """Unablated scores and predictions, and each channel's mean map (over ``reference``
    when given, else over the images) with the number of images it averages."""
    total: list[torch.Tensor] = []

    def record(_mod, _inp, out):
        out = _output_channels(out, layer)
        s = out.detach().double().sum(dim=0)
        if total:
            total[0] += s
        else:
            total.append(s)

    with forward_hooks(model, {layer: record}):
        base_scores, base_preds = _forward(model, batches, score_fn, dev, want_pred)
        if reference is not None:
            total.clear()
            ref_batches = _batches(reference, batch_size)
            _forward(model, ref_batches, score_fn, dev, False)
            n_reference = sum(len(b) for b in ref_batches)
        else:
            n_reference = sum(len(b) for b in batches)
    if not total:
        raise ValueError(f"module {layer!r} was not called in the forward pass")
    return base_scores, base_preds, total[0] / n_reference, n_reference


def _named_rankings(ranking: Any, baselines: Any, model: torch.nn.Module,
                    batches: list[torch.Tensor], score_fn: Callable, layer: str,
                    batch_size: int, dev: torch.device) -> dict[str, Any]:
    """``ranking`` (named ``"pcace"`` unless a mapping) and the ``baselines``, checked for
    names used twice or the reserved ``"random"``."""
    rankings: dict[str, Any] = {}
    if isinstance(ranking, Mapping):
        rankings.update(ranking)
    else:
        rankings["pcace"] = ranking
    if baselines is True:
        baselines = baseline_rankings(model, torch.cat(batches), score_fn, layer,
                                      batch_size=batch_size, device=dev)
    if baselines:
        if not isinstance(baselines, Mapping):
            raise ValueError("baselines must be a mapping name -> ranking, True or None")
        for key, value in baselines.items():
            if key in rankings or key == "random":
                raise ValueError(f"ranking name {key!r} is used twice (or is 'random')")
            rankings[key] = value
    if "random" in rankings:
        raise ValueError("'random' is reserved for the random baseline; rename that ranking")
    return rankings


def _run_ablations(runner: _Ablator, orders: dict[str, np.ndarray],
                   random_sets: dict[int, list[np.ndarray]], repeats: int, layer: str,
                   progress: bool) -> list[tuple[str, str, int, list[tuple]]]:
    """``(ranking, selection, m, results)`` for each ranking's top and bottom ``m`` channels
    and for the random sets of each size ``m``, in that order."""
    from ..core.progress import progress_bar

    ms = list(random_sets)
    runs: list[tuple[str, str, int, list[tuple]]] = []
    with progress_bar(total=len(ms) * (2 * len(orders) + repeats), desc=f"ablating {layer}",
                      unit="set", disable=not progress) as bar:
        for name, order in orders.items():
            for m in ms:
                runs.append((name, "top", m, [runner.run(order[:m])]))
                runs.append((name, "bottom", m, [runner.run(order[-m:])]))
                bar.update(2)
        for m in ms:
            results = []
            for channel_set in random_sets[m]:
                results.append(runner.run(channel_set))
                bar.update(1)
            runs.append(("random", "random", m, results))
    return runs


def _curve_row(name: str, selection: str, m: int, results: list[tuple], base_score: float,
               base_acc: float | None) -> dict[str, Any]:
    """One row of :func:`ablate`'s table from the ``(score, accuracy, change)`` of its sets;
    ``base_acc`` is None when no labels were given."""
    entry: dict[str, Any] = {"ranking": name, "selection": selection, "m": m,
                             "score": float(np.mean([r[0] for r in results]))}
    columns = {"score_drop": [base_score - r[0] for r in results],
               "score_change": [r[2] for r in results]}
    if base_acc is not None:
        columns["accuracy_drop"] = [base_acc - r[1] for r in results]
    for column, values in columns.items():
        v = np.asarray(values, dtype=float)
        entry[column] = float(v.mean())
        if selection != "random":
            entry[f"{column}_sd"] = np.nan
        else:
            entry[f"{column}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    entry["n_sets"] = len(results)
    return entry


# ----------------------------------------------------------------------- baselines

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
