"""Faithfulness: does ablating a ranking's top channels hurt the score more than chance?

A ranking of the channels of a layer (PCACE's, or a baseline's) is faithful to
the model if removing its top channels changes the output more than removing
random channels of the same number, and removing its bottom channels less.

- :func:`ablate` replaces the top-m, bottom-m and random m channels of one layer's
  output (by their mean over the images, by 0, or by the same channels of other images)
  and measures the drop of the mean score, how far each image's score moves, the share of
  the score's variance that runs through the channels, and the drop of accuracy when
  labels are given.
- :func:`baseline_rankings` gives the usual alternatives on the same layer:
  mean absolute activation, the L1 norm of the conv filters, first-order Taylor
  importance and (with Captum installed) layer conductance.
- :func:`faithfulness_summary` condenses the curves into one number per ranking.

Notes
-----
Three modes ask three questions:

- ``mean`` (each ablated channel frozen at its mean map) asks what the score loses when the
  channels stop varying; ``zero`` what it loses without them at all (it also removes their
  mean level).
- ``resample`` (the channels of each image taken from another image of the set) asks how
  much of the score's variation across images runs through them: PCACE's question.

Resample mode: donors are ``resamples`` random derangements of all the images (no image is
its own donor; donors are not limited to a batch), drawn from
``numpy.random.default_rng([seed, 1])``, the same for every set; a set's numbers are
their average, and ``*_perm_sd`` their spread. Cost: per distinct set one pass stopped at
``layer`` that records the set's maps of every image, then ``resamples`` full passes.
Memory: that of mean mode plus the set's maps of every image (``N x m`` maps).

``variance_share`` is the share of the score's variance across the images that runs
through the set ``S``. In resample mode it is Jansen's estimator of the total Sobol index
of ``S``: ``mean[(f(x) - f(x with S from x'))^2] / (2 Var f)`` (0: the score ignores
``S``; 1: all its variation runs through ``S``). In mean and zero modes ``x'`` is a
constant map, which has no variance of its own: the factor 2 (the variance ``x'`` brings)
becomes 1, and the shift of the mean (``score_drop``) is taken out:
``Var[f(x) - f(x with S filled)] / Var f``. On a score linear in channels that vary
independently every mode gives the same number, the set's part of the variance. In
general the filled value is an upper bound of the total index (no function of the other
channels predicts ``f`` better than ``E[f | the others]``), reached when ``S`` does not
interact with the rest; resample mode measures the index itself where ``S`` varies
independently of the other channels, and otherwise scores images whose channels never
occur together.

Every ablation is a full forward pass over the images: in mean and zero modes :func:`ablate`
costs about ``(2 * rankings + repeats) * len(sizes) + 1`` passes (identical channel sets
are run once); resample mode ``resamples`` passes per set, plus one pass per set stopped
at the layer. A module called more than once in a forward pass is ablated at every call.

``score_drop`` measures what the mean score loses; ``score_change`` how far each image's
score moves; ``variance_share`` what share of the score's variance runs through the set.
Under mean ablation a channel whose effect on the score is linear leaves the mean score
where it was (its deviations average out) while moving every image's score, so rankings of
covariation such as PCACE are better judged by ``score_change`` or ``variance_share``.

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
from ..core.voice import is_cli, option
from ..inputs.hooks import evaluating, forward_hooks
from ..inputs.targets import resolve_target
from .ablators import (
    FillAblator,
    ResampleAblator,
    SetResult,
    _batches,
    _forward,
    _module,
    _output_channels,
    derangements,
)
from .baselines import BASELINES, baseline_importance, baseline_rankings
from .faithfulness import faithfulness_summary

__all__ = [
    "BASELINES",
    "MODES",
    "ablate",
    "baseline_importance",
    "baseline_rankings",
    "faithfulness_summary",
]

MODES = ("mean", "zero", "resample")


def _labels(labels: Any, n: int) -> torch.Tensor | None:
    if labels is None:
        return None
    t = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels))
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},), one per image; got {tuple(t.shape)}")
    if t.is_floating_point() and not bool((t == t.round()).all()):
        raise ValueError("labels must be class indices (integers)")
    return t.long()


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


def _sizes(sizes: Any, n_channels: int, layer: str) -> list[int]:
    try:
        values = list(sizes)
    except TypeError:
        raise ValueError(f"{option('sizes', repr(sizes))}: the sizes must be a sequence of "
                         "ints") from None
    if not values or any(isinstance(m, bool) or not isinstance(m, Integral) or m < 1
                         for m in values):
        raise ValueError(f"{option('sizes', repr(sizes))}: the sizes must be a non-empty "
                         "sequence of ints >= 1")
    values = sorted({int(m) for m in values})
    kept = [m for m in values if m <= n_channels]
    if not kept:
        raise ValueError(f"{option('sizes', _listed(values))}: no size is at most the "
                         f"{n_channels} channels of {layer!r}, so no set can be ablated; give "
                         f"sizes from 1 to {n_channels}")
    if len(kept) < len(values):
        warnings.warn(f"sizes {[m for m in values if m > n_channels]} exceed the layer's "
                      f"{n_channels} channels and are left out", stacklevel=3)
    if kept[-1] == n_channels:
        warnings.warn(f"size {n_channels} ablates every channel of the layer: top, bottom and "
                      "random sets are the same; its rows stay in the curves, but the "
                      "summary's gaps leave it out", stacklevel=3)
    return kept


def _listed(values: list[int]) -> str:
    """Sizes as the caller writes them: ``1 2 4`` on the command line, ``(1, 2, 4)`` else."""
    return " ".join(map(str, values)) if is_cli() else repr(tuple(values))


# -------------------------------------------------------------------------- ablate

def ablate(model: torch.nn.Module, images: Any, target: int | str | Callable[[Any], torch.Tensor],
           layer: str, ranking: Sequence[int] | np.ndarray | pd.DataFrame | Mapping[str, Any],
           sizes: Sequence[int] = (1, 2, 4, 8, 16), mode: str = "mean", repeats: int = 10,
           labels: Any = None, batch_size: int = 64, device: str | torch.device = "auto",
           seed: int = 0, baselines: Mapping[str, Any] | bool | None = None, *,
           reference: Any = None, resamples: int = 5, tune_malloc: bool | None = None,
           progress: bool = False) -> pd.DataFrame:
    """Score and accuracy drop when a ranking's top, bottom or random channels are ablated.

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
    mode : {"mean", "zero", "resample"}, default "mean"
        Replace each ablated channel by its mean map over the images (per position), by 0,
        or (``"resample"``) the whole set jointly by the same channels of a donor: another
        image of ``images``, from ``resamples`` random derangements of all of them. Costs
        per set a pass stopped at ``layer`` plus ``resamples`` passes (else one pass); Notes.
    repeats : int, default 10
        Random sets of ``m`` channels per size.
    labels : array_like, optional
        Class index per image; adds the drop of top-1 accuracy.
    batch_size : int, default 64
        Images per forward pass.
    device : str or torch.device, default "auto"
        Where the model runs (``"auto"``: CUDA when available, else the CPU).
    seed : int, default 0
        Seed of the random channel sets (``np.random.default_rng(seed)``) and of the donors.
    baselines : mapping name -> ranking, or True, optional
        More rankings on the same images and random sets; ``True``: :func:`baseline_rankings`.
    reference : tensor, Dataset or DataLoader, optional
        Images whose mean maps fill the ablated channels in ``mode="mean"`` (default: images).
    resamples : int, default 5
        Donor derangements averaged in ``mode="resample"``; their spread is reported.
    tune_malloc : bool, optional
        Keep freed memory in glibc's heap (process-wide; :mod:`pcace.core.malloc`).
    progress : bool, default False
        Show a progress bar (with the time left) over the ablated forward passes on stderr.

    Returns
    -------
    pandas.DataFrame
        A row per (ranking, selection, m): ``ranking`` (``"random"`` for random rows),
        ``selection`` (``"top"``, ``"bottom"``, ``"random"``), ``m``, ``score`` (mean ablated
        score), ``score_drop`` (unablated minus ablated mean score), ``score_change`` (mean
        ``|ablated - unablated score|``), with labels ``accuracy_drop``, ``variance_share``;
        each with ``*_sd`` (over random sets; NaN for top and bottom) and in resample mode
        ``*_perm_sd`` (over derangements; random rows: root mean square over sets); ``n_sets``.
        ``attrs``: ``layer``, ``mode``, ``n_images``, ``n_channels``, ``base_score``,
        ``base_accuracy``, ``base_variance``, ``repeats``, ``resamples``, ``seed``, ...

    Examples
    --------
    >>> import torch
    >>> from pcace.zoo import mnist_cnn
    >>> model, x = mnist_cnn().eval(), torch.rand(20, 1, 28, 28)
    >>> df = ablate(model, x, 3, "conv1", list(range(8)), sizes=(1, 8), repeats=2)
    >>> sorted(set(df.selection))
    ['bottom', 'random', 'top']
    >>> df = ablate(model, x, 3, "conv1", list(range(8)), sizes=(2,), mode="resample")
    >>> bool((df.variance_share > 0).all())
    True
    """
    dev, score_fn = _checked(model, target, layer, mode, repeats, resamples, seed, device)
    with evaluating(model, dev), kept_heap(tuning_requested(tune_malloc)):
        return _ablate(model, images, score_fn, layer, ranking, sizes, mode, repeats, labels,
                       batch_size, dev, seed, baselines, reference, progress, resamples)


def _checked(model: torch.nn.Module, target: Any, layer: str, mode: str, repeats: int,
             resamples: int, seed: int, device: Any) -> tuple[torch.device, Callable]:
    """The arguments of :func:`ablate` checked: the device and the score function."""
    if mode not in MODES:
        raise ValueError(f"{option('mode', repr(mode))}: the mode must be one of {MODES}")
    integer(repeats, "repeats")
    if isinstance(resamples, bool) or not isinstance(resamples, Integral) or resamples < 1:
        raise ValueError(f"{option('resamples', repr(resamples))}: the number of donor "
                         "derangements must be an int >= 1")
    integer(seed, "seed", minimum=None)
    _module(model, layer)
    return resolve_device(device), resolve_target(target)


def _ablate(model: torch.nn.Module, images: Any, score_fn: Callable, layer: str,
            ranking: Any, sizes: Sequence[int], mode: str, repeats: int, labels: Any,
            batch_size: int, dev: torch.device, seed: int, baselines: Any,
            reference: Any, progress: bool = False, resamples: int = 5) -> pd.DataFrame:
    batches = _batches(images, batch_size)
    n_images = sum(len(b) for b in batches)
    if mode == "resample" and n_images < 2:
        raise ValueError(f"{option('mode', 'resample')} takes each image's channels from "
                         f"another image, so it needs at least two images; got {n_images}")
    label_t = _labels(labels, n_images)
    reference = reference if mode == "mean" else None
    base_scores, base_preds, mean_map, n_reference = _unablated_pass(
        model, batches, score_fn, layer, dev, label_t is not None, reference, batch_size)
    n_channels = mean_map.shape[0]
    base_score = float(base_scores.mean())
    base_acc = None if base_preds is None else float((base_preds == label_t).double().mean())
    base_var = float(base_scores.var()) if n_images > 1 else 0.0
    _check_variation(base_var, n_images, mode)

    rankings = _named_rankings(ranking, baselines, model, batches, score_fn, layer,
                               batch_size, dev)
    orders = {str(k): _as_order(v, n_channels, layer, str(k)) for k, v in rankings.items()}
    ms = _sizes(sizes, n_channels, layer)
    common = (model, layer, batches, score_fn, dev, label_t, base_scores)
    if mode == "resample":
        runner: FillAblator | ResampleAblator = ResampleAblator(
            *common, donors=derangements(n_images, resamples, np.random.default_rng([seed, 1])))
    else:
        runner = FillAblator(*common, fill=mean_map.to(dev) if mode == "mean" else None)
    rng = np.random.default_rng(int(seed))
    random_sets = {m: [rng.choice(n_channels, size=m, replace=False) for _ in range(repeats)]
                   for m in ms}
    runs = _run_ablations(runner, orders, random_sets, repeats, layer, progress)
    df = pd.DataFrame([_curve_row(*run, base_score, base_acc) for run in runs])
    df.attrs.update({"layer": layer, "mode": mode, "n_images": n_images,
                     "n_channels": int(n_channels), "base_score": base_score,
                     "base_accuracy": base_acc, "base_variance": base_var,
                     "repeats": int(repeats), "seed": int(seed),
                     "resamples": int(resamples) if mode == "resample" else None,
                     "n_reference": n_reference})
    return df


def _check_variation(base_var: float, n_images: int, mode: str) -> None:
    """Refuse resample mode, and warn in the others, where the unablated score does not
    vary over the images (its variance share is then undefined)."""
    if base_var > 0:
        return
    what = "one image" if n_images < 2 else f"all {n_images} images"
    if mode == "resample":
        raise ValueError(f"the score is the same for {what} (its variance is 0), so no share "
                         f"of its variance runs through any channel and "
                         f"{option('mode', 'resample')} has nothing to measure; choose a "
                         f"target that varies over the images, or "
                         f"{option('mode', 'mean')} for the drop of the mean score")
    warnings.warn(f"the score is the same for {what}: variance_share is NaN", stacklevel=4)


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


def _run_ablations(runner: FillAblator | ResampleAblator, orders: dict[str, np.ndarray],
                   random_sets: dict[int, list[np.ndarray]], repeats: int, layer: str,
                   progress: bool) -> list[tuple[str, str, int, list[SetResult]]]:
    """``(ranking, selection, m, results)`` for each ranking's top and bottom ``m`` channels
    and for the random sets of each size ``m``, in that order."""
    from ..core.progress import progress_bar

    ms = list(random_sets)
    runs: list[tuple[str, str, int, list[SetResult]]] = []
    step = runner.passes
    with progress_bar(total=len(ms) * (2 * len(orders) + repeats) * step,
                      desc=f"ablating {layer}", unit="pass", disable=not progress) as bar:
        for name, order in orders.items():
            for m in ms:
                runs.append((name, "top", m, [runner.run(order[:m])]))
                bar.update(step)
                runs.append((name, "bottom", m, [runner.run(order[-m:])]))
                bar.update(step)
        for m in ms:
            results = []
            for channel_set in random_sets[m]:
                results.append(runner.run(channel_set))
                bar.update(step)
            runs.append(("random", "random", m, results))
    return runs


def _curve_row(name: str, selection: str, m: int, results: list[SetResult], base_score: float,
               base_acc: float | None) -> dict[str, Any]:
    """One row of :func:`ablate`'s table from the results of its sets; ``base_acc`` is None
    when no labels were given."""
    entry: dict[str, Any] = {"ranking": name, "selection": selection, "m": m,
                             "score": float(np.mean([r.score for r in results]))}
    columns = {"score_drop": [base_score - r.score for r in results],
               "score_change": [r.change for r in results]}
    if base_acc is not None:
        columns["accuracy_drop"] = [base_acc - r.accuracy for r in results]
    columns["variance_share"] = [r.share for r in results]
    for column, values in columns.items():
        v = np.asarray(values, dtype=float)
        entry[column] = float(v.mean())
        if selection != "random":
            entry[f"{column}_sd"] = np.nan
        else:
            entry[f"{column}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    entry["n_sets"] = len(results)
    spread_of = {"score_drop": "score", "score_change": "change", "accuracy_drop": "accuracy",
                 "variance_share": "share"}
    if results[0].spread:
        for column in columns:
            sd = np.asarray([r.spread[spread_of[column]] for r in results], dtype=float)
            entry[f"{column}_perm_sd"] = float(np.sqrt(np.mean(sd ** 2)))
    return entry
