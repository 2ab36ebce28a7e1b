"""The PCACE pipeline: capture -> reduce -> ACE -> tables
(a :class:`~pcace.results.result.PCACEResult`).

:func:`rank` runs a model once over the images, keeps the outputs of the
requested layers (within a memory budget), reduces each channel to its first
principal components, scores all channels of a layer in one batched ACE call,
and returns a :class:`PCACEResult` with one row per channel and one per layer.
"""

from __future__ import annotations

import contextvars
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..capture.capture import Capture, capture, non_finite_error
from ..core.interrupts import Interrupted
from ..core.plan import STREAMED, LayerRoute, MemoryPlan
from ..core.validation import components as check_components
from ..core.validation import device as resolve_device
from ..core.validation import fraction, integer, score_kind
from ..core.validation import scores as check_scores
from ..core.version import __version__
from ..engines.engine import Engine, EngineLost, Problems, resolve_engine
from ..inputs.data import as_batches
from ..inputs.layers import resolve_layers
from ..inputs.models import count_parameters, weights_hash
from ..inputs.targets import TargetSet, resolve_targets
from ..maxcorr.scoring import target_values
from ..reduce.pca import NonFiniteMaps, Reduction, reduce_block, reusing_buffers
from ..results.result import PCACEResult
from ..stats.bootstrap import bootstrap_summary, bootstrap_values, interval_scheme, layer_stability
from ..stats.null import null_summary, permutation_null


def layer_summary(channels: pd.DataFrame, shapes: dict[str, tuple[int, ...]],
                  top: int = 5) -> pd.DataFrame:
    """One row per layer (in the order of ``shapes``) summarising its channels' values.

    With a ``target`` (and ``label``) column, one row per (layer, label, target), in the
    order the channel table lists them.

    Examples
    --------
    >>> ch = pd.DataFrame({"layer": "c", "channel": [0, 1], "pcace": [0.2, 0.6],
    ...                    "rank": [2, 1], "dead": False, "n_components": 3})
    >>> layer_summary(ch, {"c": (2, 4, 4)})[["layer", "median", "top_channels"]].values.tolist()
    [['c', 0.4, '1 0']]
    """
    keys = [k for k in ("label", "target") if k in channels.columns]
    rows = []
    for order, (name, shape) in enumerate(shapes.items()):
        layer = channels[channels.layer == name]
        if layer.empty:
            continue
        groups = layer.groupby(keys, sort=False) if keys else [((), layer)]
        for key, sub in groups:
            values = sub.pcace.to_numpy()
            best = sub.sort_values("rank").channel.head(top).tolist()
            rows.append({
                "layer": name, **dict(zip(keys, key, strict=True)), "order": order,
                "channels": len(sub), "height": shape[1],
                "width": shape[2], "mean": values.mean(), "median": float(np.median(values)),
                "q90": float(np.quantile(values, 0.9)), "max": values.max(),
                "dead": int(sub.dead.sum()), "components": float(sub.n_components.mean()),
                "top_channels": " ".join(map(str, best)),
            })
    return pd.DataFrame(rows)


def _versions() -> dict[str, str]:
    import numba
    import scipy

    return {"pcace": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__, "pandas": pd.__version__,
            "numba": numba.__version__}


def rank(
    model: torch.nn.Module,
    images: Any,
    target: Any = None,
    layers: Sequence[str] | None = None,
    components: int | float = 3,
    *,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    memory_budget: int | str = "auto",
    device_memory_budget: int | str = "auto",
    pca_dtype: torch.dtype = torch.float32,
    score: str = "maximal",
    label: int | None = None,
    per_label: bool = False,
    categories: Sequence[str] | None = None,
    permutations: int = 100,
    split_half: int = 10,
    bootstrap: int = 0,
    level: float = 0.95,
    interval: str = "half-sample",
    seed: int = 0,
    progress: bool = True,
    spill_dir: str | Path | None = None,
    ace_options: dict | None = None,
    tune_malloc: bool | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[], None] | None = None,
    engine: str | Engine = "local",
    ray_address: str | None = None,
) -> PCACEResult:
    """Rank every channel of the chosen layers of ``model`` by PCACE.

    Parameters
    ----------
    model : torch.nn.Module
        The trained network. It runs in eval mode, without gradients, on ``device``;
        its training flags and device are restored afterwards
        (:func:`pcace.inputs.hooks.evaluating`).
    images : torch.Tensor, Dataset or DataLoader
        Preprocessed images (N, C, H, W), or a Dataset whose items are images or
        (image, label) pairs, or a DataLoader of those.
    target : int, str, callable, list of those, or "all"
        An int ``c``: the score of class ``c`` before the softmax (the paper's choice); a string
        (``"prob:3"``, ``"output:0"``, ``"output"`` or a class name resolved through
        ``categories``); or a callable mapping the model's output batch to an (N,) score, such as
        :class:`pcace.inputs.targets.RegressionOutput`. A list of targets, or ``"all"`` (every class
        output's logit), ranks against each of them from one forward pass and one PCA per
        channel: ``channels`` then holds one row per (channel, target), ranks and statistics
        are per target, and ``layers`` has one row per (layer, target). None: a regression
        network's single output; with ``per_label``, each label's own class logit.
    layers : sequence of str, optional
        Qualified module names (``"layer3.1.conv2"``); None ranks every ``nn.Conv2d``. Any module
        with a (N, C, H, W) output may be named.
    components : int or float
        k principal components per channel, or a fraction in (0, 1): the smallest k whose
        components explain that share of the channel's variance.
    batch_size : int
        Images per forward pass (when ``images`` is not already a DataLoader).
    device : str or torch.device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
    memory_budget : int or "auto"
        Bytes of RAM for activations and the work on them, shared by one
        :class:`pcace.core.plan.MemoryPlan`: three quarters hold captured activations,
        channel-major (layers beyond that are spilled to disk and read back in blocks),
        one quarter the reduce step's and the statistics' working memory. The forward
        pass's own memory comes on top. ``"auto"`` (default): 1 GiB
        (:data:`pcace.core.plan.PREFERRED_BUDGET`) when every layer runs in it, kept in memory
        or streamed in two passes (so memory stays flat in N), else a quarter of the
        machine's memory (:func:`pcace.core.plan.default_memory_budget`), rather than spill
        maps to disk or take extra forward passes; the bytes used and why are recorded in
        the manifest (``memory_budget``, ``memory_budget_reason``). A number is kept as
        given.
    device_memory_budget : int or "auto"
        On a GPU: bytes of activations kept in the GPU's memory, where their reduce step
        then runs without a transfer; the layers beyond it go to RAM under
        ``memory_budget``. ``"auto"`` (default): half of the GPU's free memory; 0 keeps
        them all in RAM. Ignored on the CPU.
    pca_dtype : torch.dtype
        Precision of the passes over the activations (standardisation, Gram matrices);
        the eigenproblems and ACE always run in float64. ``torch.float32`` (default) works
        on the captured activations in place; ``torch.float64`` copies each block first
        (slower, exact to ~1e-12). Their measured agreement is in ``benchmarks/README.md``
        ("Pipeline": float32 against float64).
    score : {"maximal", "first-component"}
        ``"maximal"``: the maximal correlation over all k components (PCACE). The other
        reproduces the published scripts' ``|corr(phi_1, theta)|``, for comparison only.
    label : int, optional
        Keep only the images of this label (the paper ranks over the images of one class).
    per_label : bool
        Rank each label's images separately, from one forward pass over labelled images of
        many classes: each label's rows of every channel get their own standardisation, PCA
        and ACE, exactly as if that label's images had been ranked alone. Without a
        ``target`` each label is scored on its own class logit (labels must be class
        indices); with targets, every label against every target. ``channels`` and
        ``layers`` gain a ``label`` column: an atlas of every class, layer and channel
        (:func:`pcace.viz.class_atlas`).
    categories : sequence of str, optional
        Class names, to resolve a class-name ``target``.
    permutations : int, default 100
        B > 0 re-scores every channel against B permutations of the score (the same for all
        channels; only ACE re-runs) and adds ``null_mean``, ``null_q95``, ``p_value`` (with the
        +1 correction), ``q_value`` (Benjamini-Hochberg within each layer), ``significant``
        (``q <= 0.05``) and ``pcace_adj`` (a null-corrected value comparable across layers and
        runs; see :mod:`pcace.stats`); the layer table gains the share of significant
        channels and the median ``pcace_adj``. 0 opts out. With B permutations a p-value is
        at least ``1 / (B + 1)``, so a layer of C channels shows significant channels only
        when about ``C / (20 (B + 1))`` of them beat the whole null; use 1000 for claims
        about single channels. The cost of the default is measured in
        ``benchmarks/README.md`` ("Evidence").
    split_half : int, default 10
        S > 0: how reproducible each layer's ranking is. The channels are scored on S random
        splits of the images into two halves and the halves' rankings compared (Spearman,
        projected to N images, with an interval, and the top-10 overlap;
        :func:`pcace.stats.evidence.split_half`). With the null it gives each layer an
        ``evidence`` verdict (``"strong"``, ``"weak"``, ``"none"``) and a sentence
        (:func:`pcace.stats.evidence.layer_evidence`). 0 opts out; skipped below 20 images.
    bootstrap : int
        B > 0 resamples the images B times (half-samples without replacement by default, see
        ``interval``), recomputes PCA and ACE per channel and adds ``ci_low``, ``ci_high`` (an
        interval for the channel's maximal correlation), ``rank_low``, ``rank_high``; the layer
        table gains the ranking's stability.
    level : float
        Confidence level of the bootstrap intervals.
    interval : {"half-sample", "basic", "percentile"}
        Bootstrap interval method; it also picks the resampling
        (:func:`pcace.stats.interval_scheme`).
        ``"half-sample"``: half-samples of the images without replacement and a bias-corrected
        interval (it can lie below the biased raw value). ``"basic"`` and ``"percentile"``:
        the classical with-replacement bootstrap, which under-covers because ACE overfits
        more on repeated images. Coverage measured in ``benchmarks/README.md``,
        "Statistics"; see :func:`pcace.stats.bootstrap_summary`.
    seed : int
        Seed of the permutations and resamples; recorded in the manifest.
    progress : bool
        Show progress bars on stderr.
    spill_dir : path, optional
        Where spilled activations go (a temporary directory by default).
    ace_options : dict, optional
        Extra keyword arguments for :func:`pcace.ace` (``delrsq``, ``max_iter``, ...).
    tune_malloc : bool, optional
        Keep freed memory in glibc's heap during the forward pass (faster on Linux, but a
        process-wide setting; see :mod:`pcace.core.malloc`). Off unless True or
        ``PCACE_TUNE_MALLOC=1``; the ``pcace`` command turns it on.
    checkpoint_dir : path, optional
        A run directory (see :func:`pcace.results.rundir.prepare_run_dir`): each finished layer
        (values, null, bootstrap, components) is saved there as the run goes, so that an
        interrupted run can be resumed.
    resume : bool
        With ``checkpoint_dir``: take the layers an earlier, interrupted run with the same
        settings finished from their checkpoints and score only the rest. The result equals
        an uninterrupted run's. Checkpoints of other settings are refused.
    on_step : callable, optional
        Called between batches of the forward pass and between blocks of channels; it may
        raise to stop the run (the ``pcace`` command passes
        :meth:`pcace.core.interrupts.deferred_signals.check`). A ``KeyboardInterrupt`` (or
        :class:`pcace.core.interrupts.Interrupted`) while channels are scored returns the layers
        finished so far, with ``result.complete`` False; during the forward pass it
        propagates (nothing is finished yet).
    engine : {"local", "ray"} or pcace.engines.engine.Engine
        Where the ACE problems (observed values, null, split-half, bootstrap) run:
        ``"local"`` (default) in this process; ``"ray"`` as tasks on a Ray cluster
        (``pip install "pcace[ray]"``; :mod:`pcace.engines.ray`). The same inputs and seed
        give the same results on either. A cluster that goes away ends the run like an
        interruption (finished layers kept, ``result.complete`` False). An engine object is
        used as given and left open.
    ray_address : str, optional
        With ``engine="ray"``: ``"auto"`` joins the cluster running on this machine,
        ``"HOST:PORT"`` (or ``"ray://HOST:PORT"``) another; None starts a local cluster
        for the run.

    Returns
    -------
    PCACEResult

    Examples
    --------
    >>> import torch, pcace
    >>> from pcace.zoo import mnist_cnn
    >>> model = mnist_cnn()
    >>> images = torch.rand(40, 1, 28, 28)
    >>> res = pcace.rank(model, images, target=3, progress=False)
    >>> sorted(res.channels.columns)[:3]
    ['channel', 'dead', 'explained_variance']
    """
    t_start = time.perf_counter()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    score_kind(score)
    check_components(components)
    plan = asked = MemoryPlan.from_budget(memory_budget)
    if pca_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"pca_dtype must be torch.float32 or torch.float64; got {pca_dtype!r}")
    options = Statistics(permutations=integer(permutations, "permutations", minimum=0),
                         bootstrap=integer(bootstrap, "bootstrap", minimum=0),
                         level=fraction(level, "level"), seed=integer(seed, "seed", None),
                         interval=interval)
    interval_scheme(interval)
    integer(split_half, "split_half", minimum=0)
    dev = resolve_device(device)
    targets = _target_set(target, categories, per_label, label)
    names = resolve_layers(model, layers)
    ace_kwargs = dict(ace_options or {})
    in_turn = _labels_in_turn(model, images, names, plan.widened(), dev) if per_label else None
    runner, owned = resolve_engine(engine, ray_address)
    if progress and runner.name != "local":
        print(f"pcace: {runner.summary()}", file=sys.stderr)
    if in_turn is not None:  # an atlas too big for one pass in memory: label by label
        from .perlabel import rank_in_turn

        # each label's run plans its own memory ("auto": streamed within the preferred
        # budget where its layers allow)
        each = dict(layers=names, components=components, batch_size=batch_size, device=dev,
                    memory_budget=memory_budget, device_memory_budget=device_memory_budget,
                    pca_dtype=pca_dtype, score=score, categories=categories,
                    permutations=permutations, split_half=split_half, bootstrap=bootstrap,
                    level=level, interval=interval, seed=seed, spill_dir=spill_dir,
                    ace_options=ace_options, tune_malloc=tune_malloc, resume=resume,
                    on_step=on_step, engine=runner)
        try:
            return rank_in_turn(rank, model, images, target, in_turn[0], each,
                                checkpoint_dir, progress, in_turn[1])
        finally:
            if owned:
                runner.close()
    token = _ENGINE.set(runner)
    try:
        weights = weights_hash(model)  # hashes every parameter: once per run
        run = _Checkpoints.open(checkpoint_dir, resume, {
            "weights_sha256": weights, "layers": names,
            "target": _targets_setting(target, targets, per_label), "components": components,
            "score": score, "statistics": asdict(options), "pca_dtype": str(pca_dtype),
            "ace": ace_kwargs, "device": dev.type, "memory_budget": plan.budget, "label": label,
            **({"per_label": True} if per_label else {})})
        todo = [n for n in names if n not in run.done]
        shapes = {n: tuple(run.done[n].extra["shape"]) for n in names if n in run.done}
        stored = {"forward_calls": 0, "seconds": 0.0, "spilled": [], "on_device": []}
        t_captured = time.perf_counter()
        if not todo:  # every layer finished before: the scores came with them
            scores, labels = run.scores(), run.labels()
            if targets.targets is None:
                targets.expand(scores.shape[1])
            groups = _groups(labels, targets, per_label, own_class=target is None)
            _check_score_matrix(scores, groups, targets.labels)
            scored = _score_layers(None, names, scores, groups, targets.labels, components,
                                   score, dev, plan, progress, ace_kwargs, options, pca_dtype,
                                   run, on_step)
        else:
            batches = as_batches(images, batch_size, label=label)
            plan, routes = _layer_routes(model, images, batches, todo, plan, dev, options,
                                         per_label, components, batch_size)
            kept = [n for n in todo if n not in routes or routes[n].route not in STREAMED]
            if progress and len(kept) < len(todo):
                print(f"pcace: {len(todo) - len(kept)} of {len(todo)} layers reduced in two "
                      "passes over the images (their maps do not fit the memory budget, "
                      f"{_bytes_text(plan.budget)}; a larger one keeps more in memory, which "
                      "is faster); manifest['routes'] says why", file=sys.stderr)
            on_workers = _workers_stream(runner, images, batch_size, label, routes)
            two = _two_pass(images, routes, components, pca_dtype,
                            beside_workers=on_workers is not None)
            remote = _Sharded.run(on_workers, model, routes, targets, components, pca_dtype,
                                  runner, progress) if on_workers else None
            if remote is not None and targets.targets is None:
                targets.expand(remote.scores.shape[1])
            passes = capture(model, batches if two is None else two.watch(batches), kept,
                             targets, device=dev,
                             memory_budget=plan.store_bytes - plan.streamed_bytes(routes),
                             check_finite=False, spill_dir=spill_dir, progress=progress,
                             device_memory_budget=device_memory_budget,
                             tune_malloc=tune_malloc, on_step=on_step,
                             observers=None if two is None else two.hooks()) \
                if remote is None or kept or two is not None else remote
            with passes as cap, reusing_buffers():
                scores = cap.scores
                if remote is not None:
                    remote.check_scores(scores)
                labels = _image_labels(batches, per_label)
                groups = _groups(labels, targets, per_label, own_class=target is None)
                _check_score_matrix(scores, groups, targets.labels)
                run.check_scores(scores, labels)
                streamed = {} if remote is None else dict(remote.streamed)
                shapes.update(cap.shapes)
                t_captured = time.perf_counter()
                # the layers held in memory first: their results are saved before the
                # further passes of the streamed ones (a Ctrl-C there keeps them)
                later = set() if two is None else set(two.shapes)
                scored = _score_layers(cap, [n for n in names if n not in streamed and
                                             n not in later], scores,
                                       groups, targets.labels, components, score, dev, plan,
                                       progress, ace_kwargs, options, pca_dtype, run, on_step)
                if two is not None and not scored.interrupted:
                    try:
                        streamed.update(two.second_pass(model, batches, device=dev,
                                                        progress=progress,
                                                        tune_malloc=tune_malloc,
                                                        on_step=on_step))
                    except (KeyboardInterrupt, Interrupted) as err:
                        _stopped(scored, err)
                shapes.update({n: layer.shape for n, layer in streamed.items()})
                stored = {"forward_calls": cap.forward_calls, "seconds": cap.seconds,
                          "spilled": [n for n, s in cap.spilled.items() if s],
                          "on_device": [n for n, s in cap.on_device.items() if s],
                          "projection_seconds": 0.0 if two is None else two.seconds,
                          "routes": _route_record(routes, cap.spilled, streamed,
                                                  {} if remote is None else
                                                  dict.fromkeys(remote.streamed,
                                                                f"{runner.name} workers"))}
                _score_streamed(scored, streamed, scores, groups, targets.labels, score, plan,
                                ace_kwargs, options, run, on_step, progress)
                order = {n: i for i, n in enumerate(names)}
                scored.tables.sort(key=lambda t: order.get(t.layer.iloc[0], -1) if len(t) else -1)
        t_end = time.perf_counter()

        channels = _channel_table(scored.tables, names)
        layer_table = layer_summary(channels, {n: shapes[n] for n in names if n in shapes})
        split_half = integer(split_half, "split_half", minimum=0)
        _add_layer_statistics(layer_table, channels, scored, scores, groups, targets.labels,
                              split_half, options.seed, ace_kwargs)
        plain = len(targets) == 1 and not per_label
        single = targets.targets[0] if len(targets) == 1 else None

        manifest = {
            "pcace_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": {"class": type(model).__name__, "parameters": count_parameters(model),
                      "weights_sha256": weights},
            "data": {"n_images": int(scores.shape[0]), "label": label,
                     "skipped_images": int(getattr(images, "skipped", 0) or 0)},
            "target": _describe_target(single) if single is not None else
            {"kind": "several", "labels": targets.labels},
            "target_description": "each label's own class logit, on that label's images"
            if per_label and target is None else targets.describe(),
            "targets": [_describe_target(t) for t in targets.targets or []],
            "target_labels": targets.labels,
            "per_label": bool(per_label),
            "score": score,
            "components": components,
            "layers": names,
            "shapes": {n: list(shapes[n]) for n in names if n in shapes},
            "device": str(dev),
            "seed": options.seed,
            "permutations": options.permutations,
            "split_half": split_half,
            "alpha": 0.05,
            "bootstrap": options.bootstrap,
            "level": options.level,
            "interval": interval,
            "memory_budget": plan.budget,
            "memory_budget_reason": _budget_reason(memory_budget, asked, plan,
                                                   "a bootstrap" if options.bootstrap else
                                                   "per-label groups" if per_label else None),
            "pca_dtype": str(pca_dtype).replace("torch.", ""),
            "spilled_layers": stored["spilled"],
            "device_layers": stored["on_device"],
            "forward_calls": stored["forward_calls"],
            "routes": stored.get("routes", {}),
            "ace": {"delrsq": 0.01, "max_iter": 20, "alpha": 5.0, **ace_kwargs},
            "timings": {"forward_and_capture": stored["seconds"],
                        "projection_pass": stored.get("projection_seconds", 0.0),
                        "reduce_and_ace": t_end - t_captured -
                        stored.get("projection_seconds", 0.0),
                        "total": t_end - t_start},
            "engine": runner.describe(),
            "interrupted": scored.interrupted,
            "interrupt_signal": scored.signal,
            "complete": not scored.interrupted,
            "layers_done": list(dict.fromkeys(t.layer.iloc[0] for t in scored.tables if len(t))),
            "resumed_layers": sorted(run.done),
            "stability": _stability_manifest(scored.stability, plain, per_label),
            "versions": _versions(),
        }
        if per_label:
            manifest["data"]["labels"] = {str(g.label): int(g.rows.size) for g in groups}
            manifest["data"]["own_class"] = target is None
        return PCACEResult(channels, layer_table, manifest, scored.components,
                           scores[:, 0] if plain else scores, labels if per_label else None)
    finally:
        _ENGINE.reset(token)
        if owned:
            runner.close()


def _budget_reason(given: Any, asked: MemoryPlan, used: MemoryPlan,
                   keeps_maps: str | None) -> str:
    """Why the run had the memory budget it had (for the manifest); ``keeps_maps`` names
    what made the run keep every map, if anything did."""
    if not (isinstance(given, str) and given == "auto"):
        return "memory_budget as given"
    if not asked.ceiling:
        return "auto: a quarter of this machine's memory"
    if used.budget == asked.budget:
        return (f"auto: every layer ran within {_bytes_text(asked.budget)} (kept in memory or "
                "streamed in two passes)")
    why = (f"{keeps_maps} keeps every map in memory" if keeps_maps else
           f"within {_bytes_text(asked.budget)} maps would have spilled to disk or taken "
           "extra forward passes")
    return (f"auto: widened from {_bytes_text(asked.budget)} to {_bytes_text(used.budget)} "
            f"(a quarter of this machine's memory): {why}")


# --- targets and image groups -------------------------------------------------------------------

def _labels_in_turn(model: torch.nn.Module, images: Any, names: list[str], plan: MemoryPlan,
                    dev: torch.device) -> tuple[np.ndarray, str] | None:
    """For ``per_label``: every image's label and why, when the labels should run in turn.

    They do when the maps of all images exceed the store and the labels can be read
    without decoding the images (:mod:`pcace.run.perlabel`); else one pass serves them all.
    """
    from .perlabel import labels_without_decoding, maps_bytes

    labels = labels_without_decoding(images)
    if labels is None or labels.size == 0:
        return None
    size = maps_bytes(model, images, names, labels.size, dev)
    if size is None or size <= plan.store_bytes:
        return None
    return labels, (f"the maps of all {labels.size} images ({_bytes_text(size)}) exceed the "
                    f"store ({_bytes_text(plan.store_bytes)}): each label's images are ranked "
                    "in turn, with every route of a one-label run")


def _bytes_text(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _target_set(target: Any, categories: Sequence[str] | None, per_label: bool,
                label: Any) -> TargetSet:
    """The run's targets; for ``per_label`` without a target, every class logit."""
    if per_label:
        if label is not None:
            raise ValueError("per_label=True ranks every label's images; do not also give "
                             "label= (that keeps one label's images)")
        if target is None:
            return TargetSet(all_classes=True, categories=categories)
    return resolve_targets(target, categories)


def _targets_setting(spec: Any, targets: TargetSet, per_label: bool) -> Any:
    """What the checkpoints' settings record of the targets."""
    if targets.all_classes:
        return "own class" if per_label and spec is None else "all"
    if len(targets) == 1:
        return _describe_target(targets.targets[0])
    return [_describe_target(t) for t in targets.targets or []]


@dataclass(frozen=True)
class _Group:
    """Images scored together against some targets: all images, or one label's."""

    label: Any
    rows: np.ndarray | None
    columns: tuple[int, ...]

    def scores(self, matrix: np.ndarray) -> np.ndarray:
        """This group's (N_g, T_g) block of the score matrix."""
        rows = matrix if self.rows is None else matrix[self.rows]
        return rows[:, list(self.columns)]


def _image_labels(batches: Any, per_label: bool) -> np.ndarray | None:
    if not per_label:
        return None
    labels = getattr(batches, "labels", None)
    if labels is None:
        raise ValueError("per_label=True needs labelled images: (images, labels), a Dataset of "
                         "(image, label) pairs or a DataLoader of them")
    return np.asarray(torch.as_tensor(labels).cpu()).reshape(-1)


def _groups(labels: np.ndarray | None, targets: TargetSet, per_label: bool,
            own_class: bool) -> list[_Group]:
    """One group of all images, or one per label (own class: scored on its own logit)."""
    every = tuple(range(len(targets)))
    if not per_label:
        return [_Group(None, None, every)]
    assert labels is not None
    groups = []
    for value in pd.unique(labels):
        rows = np.flatnonzero(labels == value)
        if own_class:
            index = int(value)
            if index != value or not 0 <= index < len(targets):
                raise ValueError(f"label {value!r} is not a class index of the model's "
                                 f"{len(targets)} outputs; per_label without a target scores "
                                 "each label's images on that class's logit")
            groups.append(_Group(value.item() if hasattr(value, "item") else value, rows,
                                 (index,)))
        else:
            groups.append(_Group(value.item() if hasattr(value, "item") else value, rows,
                                 every))
    return sorted(groups, key=lambda g: g.label)


def _check_score_matrix(scores: np.ndarray, groups: list[_Group], names: list[str]) -> None:
    """Every target's score on every group: enough images, finite, varying."""
    for g in groups:
        block = g.scores(scores)
        for j, column in enumerate(g.columns):
            try:
                check_scores(block[:, j])
            except ValueError as err:
                where = f"target {names[column]!r}" if len(names) > 1 else ""
                if g.label is not None:
                    where += f"{' on ' if where else ''}the images of label {g.label!r}"
                raise ValueError(f"{where}: {err}" if where else str(err)) from None


BASE_COLUMNS = ["layer", "layer_order", "channel", "target", "pcace", "rank", "n_components",
                "explained_variance", "dead"]


def _channel_table(tables: list[pd.DataFrame], names: list[str]) -> pd.DataFrame:
    if not tables:
        return pd.DataFrame(columns=BASE_COLUMNS)
    channels = pd.concat(tables, ignore_index=True)
    channels["layer_order"] = channels.layer.map({n: i for i, n in enumerate(names)})
    keys = ["layer", *[k for k in ("label", "target") if k in channels.columns]]
    channels["rank"] = (channels.groupby(keys, sort=False).pcace
                        .rank(ascending=False, method="first").astype(int))
    base = [c for c in BASE_COLUMNS if c in channels.columns]
    if "label" in channels.columns:
        base.insert(base.index("channel"), "label")
    extra = [c for c in channels.columns if c not in base]
    return channels[base + extra]


def _add_layer_statistics(layers: pd.DataFrame, channels: pd.DataFrame, scored: ScoredLayers,
                          scores: np.ndarray, groups: list[_Group], target_names: list[str],
                          split_half: int, seed: int, ace_kwargs: dict) -> None:
    """Evidence per (layer, label, target): null share, split-half, verdict; stability."""
    from ..stats.evidence import significant

    if layers.empty:
        return
    if "q_value" in channels.columns:
        channels["significant"] = significant(channels.q_value)
    keys = ["layer", *[k for k in ("label", "target") if k in channels.columns]]
    for g in groups:
        for j, column in enumerate(g.columns):
            _add_group_evidence(layers, channels, scored, g, target_names[column],
                                g.scores(scores)[:, j], keys, split_half, seed, ace_kwargs)
    stability = scored.stability
    if stability:
        found = [stability.get(row.layer, {}).get(
            (getattr(row, "label", None), getattr(row, "target", None)), {})
            for row in layers.itertuples()]
        layers["rank_spearman"] = [s.get("spearman_mean") for s in found]
        layers["top10_retention"] = [s.get("top_retention") for s in found]


def _add_group_evidence(layers: pd.DataFrame, channels: pd.DataFrame, scored: ScoredLayers,
                        group: _Group, target: str, scores: np.ndarray, keys: list[str],
                        split_half: int, seed: int, ace_kwargs: dict) -> None:
    """The evidence columns of one (label, target)'s rows of the layer table."""
    from ..stats.evidence import layer_evidence, split_half_table

    mine = channels.target.astype(str) == target
    rows = layers.target.astype(str) == target
    if group.label is not None:
        mine &= channels.label == group.label
        rows &= layers.label == group.label
    split = None
    if split_half and scores.size >= 20:
        if group.label is None:
            comps = dict(scored.components)
        else:
            comps = {key[0]: z for key, z in scored.components.items()
                     if key[1] == group.label}
        split = split_half_table(comps, scores, splits=split_half, seed=seed,
                                 ace_options=ace_kwargs, engine=_engine())
    if "q_value" not in channels.columns and split is None:
        return
    evidence = layer_evidence(channels[mine], split, n_images=int(scores.size))
    evidence = evidence.drop(columns=["channels"]).set_index("layer")
    for column in evidence.columns:
        if column not in layers.columns:
            layers[column] = pd.Series(dtype=evidence[column].dtype)
            if evidence[column].dtype == object:
                layers[column] = layers[column].astype(object)
        layers.loc[rows, column] = layers.loc[rows, "layer"].map(evidence[column])


def _stability_manifest(stability: dict[str, dict], plain: bool, per_label: bool) -> dict:
    """Per layer: its stability (one target), per target, or per label and target."""
    out: dict[str, Any] = {}
    for layer, entries in stability.items():
        for (label, target), stats in entries.items():
            if plain:
                out[layer] = stats
            elif per_label:
                out.setdefault(layer, {}).setdefault(str(label), {})[target] = stats
            else:
                out.setdefault(layer, {})[target] = stats
    return out


def _describe_target(score_fn: Any) -> Any:
    if hasattr(score_fn, "to_dict"):
        return score_fn.to_dict()
    return {"callable": getattr(score_fn, "__name__", type(score_fn).__name__)}


@dataclass(frozen=True)
class Statistics:
    """What a run computes beyond the raw values (see :func:`rank`)."""

    permutations: int = 0
    bootstrap: int = 0
    level: float = 0.95
    seed: int = 0
    interval: str = "half-sample"


@dataclass
class ScoredLayers:
    """What the scoring stage returns: per-layer tables, components and stability.

    ``stability`` maps a layer to ``{(label, target): summary}`` (label None without
    ``per_label``).
    """

    tables: list[pd.DataFrame] = field(default_factory=list)
    components: dict[Any, torch.Tensor] = field(default_factory=dict)
    stability: dict[str, dict] = field(default_factory=dict)
    interrupted: bool = False
    signal: int | None = None


@dataclass
class _Accumulated:
    """One group's blocks of a layer, gathered until the layer is done."""

    values: list[np.ndarray] = field(default_factory=list)
    n_components: list[np.ndarray] = field(default_factory=list)
    explained: list[np.ndarray] = field(default_factory=list)
    dead: list[np.ndarray] = field(default_factory=list)
    parts: list[torch.Tensor] = field(default_factory=list)
    boots: list[np.ndarray] = field(default_factory=list)

    def add(self, block: _BlockScores) -> None:
        self.values.append(block.values)
        self.n_components.append(block.n_components)
        self.explained.append(block.explained_variance)
        self.dead.append(block.dead)
        self.parts.append(block.components)
        if block.boot is not None:
            self.boots.append(block.boot)


def _score_layers(cap: Capture | None, names: list[str], scores: np.ndarray,
                  groups: list[_Group], target_names: list[str],
                  components: int | float, score: str, dev: torch.device, plan: MemoryPlan,
                  progress: bool, ace_kwargs: dict, options: Statistics,
                  pca_dtype: torch.dtype, run: _Checkpoints,
                  on_step: Callable[[], None] | None) -> ScoredLayers:
    """Score every layer not checkpointed, each image group against its targets.

    Each block of channels is read once; a group of images (one label's) takes a copy of
    its rows, so the store stays intact until every group is done.
    """
    from tqdm.auto import tqdm

    out = ScoredLayers()
    todo = [n for n in names if n not in run.done]
    total_channels = sum(cap.shapes[n][0] for n in todo) if cap is not None else 0
    grouped = groups[0].rows is not None
    bar = tqdm(total=total_channels, desc="scoring channels", unit="ch",
               disable=not progress or not total_channels)
    try:
        for name in names:
            if name in run.done:
                run.restore(name, groups, out)
                continue
            acc = [_Accumulated() for _ in groups]
            bar.set_postfix_str(name, refresh=False)
            per_block = plan.channels_per_block(cap.shapes[name], len(scores),
                                                cap.spilled[name] or grouped,
                                                pca_dtype == torch.float64)
            for chans, block in cap.blocks(name, per_block, destructive=True):
                for g, a in zip(groups, acc, strict=True):
                    part = block if g.rows is None else block[:, torch.as_tensor(g.rows)]
                    a.add(_score_block(name, chans, part, g.scores(scores), components, score,
                                       dev, ace_kwargs, options, pca_dtype, plan, g.rows))
                    del part
                bar.update(block.shape[0])
                if on_step is not None:
                    on_step()
            tables, stability, comps = [], {}, {}
            for g, a in zip(groups, acc, strict=True):
                table, stab, comps[g.label] = _group_result(
                    name, g, a, [target_names[c] for c in g.columns], g.scores(scores),
                    options, ace_kwargs, plan, score)
                tables.append(table)
                stability.update(stab)
            table = pd.concat(tables, ignore_index=True)
            for label, comp in comps.items():
                out.components[name if not grouped else (name, label)] = comp
            out.tables.append(table)
            if stability:
                out.stability[name] = stability
            run.save(name, table, stability or None, comps, scores, cap.shapes[name],
                     None if not grouped else _labels_of(groups, len(scores)))
    except (KeyboardInterrupt, Interrupted, EngineLost) as err:
        _stopped(out, err)
    finally:
        bar.close()
    return out


def _labels_of(groups: list[_Group], n: int) -> np.ndarray:
    labels = np.empty(n, dtype=np.asarray([g.label for g in groups]).dtype)
    for g in groups:
        labels[g.rows] = g.label
    return labels


def _group_result(name: str, group: _Group, acc: _Accumulated, targets: list[str],
                  scores: np.ndarray, options: Statistics, ace_kwargs: dict, plan: MemoryPlan,
                  score: str) -> tuple[pd.DataFrame, dict, torch.Tensor]:
    """A group's rows of a layer (per target, with statistics) and its components."""
    values = np.concatenate(acc.values)
    z = _pad_cat(acc.parts)
    boot = np.concatenate(acc.boots) if acc.boots else None
    dead = np.concatenate(acc.dead).astype(bool)
    tables, stability = [], {}
    for j, target in enumerate(targets):
        table = pd.DataFrame({
            "layer": name, "channel": np.arange(values.shape[0]), "target": target,
            "pcace": values[:, j],
            "n_components": np.concatenate(acc.n_components).astype(int),
            "explained_variance": np.concatenate(acc.explained),
            "dead": dead,
        })
        if group.label is not None:
            table.insert(1, "label", group.label)
        table, stab = _add_statistics(table, z, scores[:, j],
                                      None if boot is None else boot[:, j], options,
                                      ace_kwargs, plan, score)
        tables.append(table)
        if stab is not None:
            stability[(group.label, target)] = stab
    return pd.concat(tables, ignore_index=True), stability, z


def _stopped(out: ScoredLayers, err: BaseException) -> None:
    """Mark a scoring stage stopped by a signal or a lost cluster; keep what it finished."""
    out.interrupted = True
    out.signal = getattr(err, "signum", None)
    why = f"{err}; " if isinstance(err, EngineLost) else ""
    warnings.warn(f"interrupted: {why}returning the {len(out.tables)} layers scored so far",
                  stacklevel=4)


class _Checkpoints:
    """A run's per-layer checkpoints in its directory (none when it has no directory)."""

    def __init__(self, root: Path | None, settings: dict, done: dict):
        self.root, self.settings, self.done = root, settings, done

    @classmethod
    def open(cls, root: str | Path | None, resume: bool, settings: dict) -> _Checkpoints:
        if root is None:
            if resume:
                raise ValueError("resume=True needs checkpoint_dir= (the interrupted run's "
                                 "directory)")
            return cls(None, settings, {})
        from ..results.checkpoints import load_layer_checkpoints, start_checkpoints

        done = load_layer_checkpoints(root, settings) if resume else {}
        start_checkpoints(root, settings)
        return cls(Path(root), settings, done)

    def scores(self) -> np.ndarray:
        scores = next(iter(self.done.values())).arrays["scores"]
        return scores if scores.ndim == 2 else scores[:, None]

    def labels(self) -> np.ndarray | None:
        return next(iter(self.done.values())).arrays.get("labels")

    def check_scores(self, scores: np.ndarray, labels: np.ndarray | None = None) -> None:
        for name, ckpt in self.done.items():
            same = np.array_equal(ckpt.arrays["scores"], scores) and (
                labels is None or np.array_equal(ckpt.arrays.get("labels"), labels))
            if not same:
                from ..results.rundir import RunDirError

                raise RunDirError(f"the images (or their order) differ from those of the "
                                  f"interrupted run: its layer {name!r} was scored on other "
                                  "scores. Resume with the same --data and options, or start "
                                  "afresh with --force")

    def save(self, name: str, table: pd.DataFrame, stability: dict | None,
             components: dict[Any, torch.Tensor], scores: np.ndarray, shape: tuple[int, ...],
             labels: np.ndarray | None = None) -> None:
        """Save a finished layer: all its groups and targets in one file."""
        if self.root is None:
            return
        from ..results.checkpoints import save_layer_checkpoint

        arrays = {"scores": scores}
        if labels is None:
            arrays["components"] = next(iter(components.values())).numpy()
        else:
            arrays["labels"] = labels
            for i, comp in enumerate(components.values()):
                arrays[f"components_{i}"] = comp.numpy()
        save_layer_checkpoint(self.root, name, table, stability=stability, arrays=arrays,
                              extra={"shape": list(shape)})

    def restore(self, name: str, groups: list[_Group], out: ScoredLayers) -> None:
        """Put a checkpointed layer's table, components and stability into ``out``."""
        ckpt = self.done[name]
        out.tables.append(ckpt.table)
        if "components" in ckpt.arrays:
            out.components[name] = torch.from_numpy(ckpt.arrays["components"])
        else:
            for i, g in enumerate(groups):
                out.components[(name, g.label)] = torch.from_numpy(
                    ckpt.arrays[f"components_{i}"])
        if ckpt.stability is not None:
            out.stability[name] = ckpt.stability


@dataclass
class _BlockScores:
    """One block of channels scored against a group's targets."""

    values: np.ndarray           # (c, T)
    n_components: np.ndarray     # (c,)
    explained_variance: np.ndarray
    dead: np.ndarray
    components: torch.Tensor     # (c, N, k) on the CPU
    boot: np.ndarray | None      # (c, T, B)


#: The engine of the rank call in progress (None: this process, the local engine's way).
_ENGINE: contextvars.ContextVar[Engine | None] = contextvars.ContextVar("pcace_engine",
                                                                        default=None)


def _engine() -> Engine | None:
    """The engine of the rank call in progress, unless the cluster was lost (then local)."""
    engine = _ENGINE.get()
    return engine if engine is not None and engine.alive else None


def score_reduction(red: Reduction, scores: np.ndarray, score: str = "maximal",
                    ace_options: dict | None = None, plan: MemoryPlan | None = None
                    ) -> np.ndarray:
    """PCACE values ``(C, T)`` of a reduced block against an ``(N, T)`` score matrix.

    The one step from principal components to values that every route through the
    activations (in memory, spilled, streamed) shares: ACE per (channel, target), batched
    in calls sized by ``plan``; dead channels score 0.

    Examples
    --------
    >>> import torch
    >>> from pcace.reduce.pca import reduce_block
    >>> maps = torch.randn(4, 60, 9, dtype=torch.float64)
    >>> red = reduce_block(maps.clone(), 2)
    >>> s = np.stack([red.scores[0, :, 0].numpy() ** 2, np.random.rand(60)], axis=1)
    >>> score_reduction(red, s).shape
    (4, 2)
    """
    n, k = red.scores.shape[1], max(1, red.scores.shape[2])
    chunk = (plan or MemoryPlan.from_budget(2 * 2**30)).ace_problems(n, k)
    engine = _engine()
    if engine is None:  # called on its own, outside a rank call
        return target_values(red, scores, score, ace_options, chunk)
    values = np.zeros((red.scores.shape[0], scores.shape[1]))
    live = np.flatnonzero(~red.dead.cpu().numpy())
    if live.size:
        z = red.scores.to(torch.float64)
        ys = torch.as_tensor(np.ascontiguousarray(scores.T), dtype=torch.float64,
                             device=z.device)
        problems = Problems(z, ys, live, order="channel")
        values[live] = engine.values(problems, chunk=chunk, score=score,
                                     ace_options=ace_options or {},
                                     stage="observed").reshape(live.size, scores.shape[1])
    return values


def _score_block(name: str, chans: slice, block: torch.Tensor, scores: np.ndarray,
                 components: int | float, score: str, dev: torch.device,
                 ace_kwargs: dict, options: Statistics, pca_dtype: torch.dtype,
                 plan: MemoryPlan, rows: np.ndarray | None = None) -> _BlockScores:
    """One block of a layer's channels over one group of images, against its targets."""
    work = block.to(dev, pca_dtype)  # the store's own memory when it can be
    try:
        red = reduce_block(work, components)
    except NonFiniteMaps as err:
        raise _non_finite_error(name, chans, work, err.channels, rows) from None
    del work
    values = score_reduction(red, scores, score, ace_kwargs, plan)
    boot = None
    if options.bootstrap:  # the block may now hold standardised maps: each resample is
        # standardised again, which per-column affine changes do not affect
        maps = block.transpose(0, 1).cpu()
        boot = bootstrap_values(
            maps, scores, components, options.bootstrap, options.seed, score=score,
            engine=_engine(),
            ace_options=ace_kwargs, scheme=interval_scheme(options.interval),
            chunk=plan.replicates_per_call(maps.shape[0] // 2 if options.interval ==
                                           "half-sample" else maps.shape[0],
                                           maps.shape[1], maps[0, 0].numel()))
    dead = red.dead.cpu().numpy()
    return _BlockScores(np.where(dead[:, None], 0.0, values),
                        red.n_components.cpu().numpy().astype(int),
                        red.explained_variance.cpu().numpy(), dead.astype(bool),
                        red.scores.cpu(), boot)


def _non_finite_error(name: str, chans: slice, block: torch.Tensor,
                      channels: list[int], rows: np.ndarray | None = None) -> ValueError:
    """The error for NaN/inf in a layer, naming its channels and (first channel's) images."""
    start = chans.start or 0
    images = (~torch.isfinite(block[channels[0]])).any(dim=1).nonzero().flatten().tolist()
    if rows is not None:
        images = [int(rows[i]) for i in images]
    return non_finite_error(name, [start + c for c in channels], images, example=True)


def _add_statistics(table: pd.DataFrame, z: torch.Tensor, scores: np.ndarray,
                    boot: np.ndarray | None, options: Statistics, ace_kwargs: dict,
                    plan: MemoryPlan, score: str) -> tuple[pd.DataFrame, dict | None]:
    observed = table.pcace.to_numpy()
    stability = None
    if options.permutations:
        null = permutation_null(z, scores, options.permutations, options.seed, engine=_engine(),
                                chunk=plan.ace_problems(z.shape[1], z.shape[2]), score=score,
                                ace_options=ace_kwargs)
        summary = null_summary(observed, null)
        for col in summary.columns:
            if col not in table.columns and col != "channel":
                table[col] = summary[col].to_numpy()
    if boot is not None:
        summary = bootstrap_summary(observed, boot, options.level, method=options.interval)
        for col in summary.columns:
            if col not in table.columns and col != "channel":
                table[col] = summary[col].to_numpy()
        stability = layer_stability(observed, boot)
    return table, stability


def _pad_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1:  # a whole layer in one block: no copy
        return parts[0]
    k = max(p.shape[-1] for p in parts)
    padded = [torch.nn.functional.pad(p, (0, k - p.shape[-1])) for p in parts]
    return torch.cat(padded)


# --- layers reduced in two passes (pcace.reduce.twopass) ---------------------------------

def _layer_routes(model: torch.nn.Module, images: Any, batches: Any, todo: list[str],
                  plan: MemoryPlan, dev: torch.device, options: Statistics,
                  per_label: bool = False, components: int | float = 3,
                  batch_size: int = 256) -> tuple[MemoryPlan, dict[str, LayerRoute]]:
    """Each layer's route and the plan it runs in (:meth:`pcace.core.plan.MemoryPlan.plan_routes`).

    From one probe pass. A bootstrap resamples the maps themselves, and per-label groups
    standardise each label's rows on their own, so both keep every layer in memory, in the
    widest plan (so does a run whose layers the probe cannot see).
    """
    if options.bootstrap or per_label:
        return plan.widened(), {}
    n = getattr(batches, "n_images", None)
    if isinstance(images, torch.Tensor):
        input_shape = tuple(images.shape[1:])
    else:
        from ..reduce.twopass import _images_of

        first = next(iter(batches), None)
        if first is None:
            return plan.widened(), {}
        input_shape = tuple(_images_of(first).shape[1:])
    from ..inputs.layers import describe_layers

    table = describe_layers(model, input_shape, device=dev).set_index("name")
    shapes = {name: (int(table.out_channels[name]), int(table.height[name]),
                     int(table.width[name])) for name in todo if name in table.index}
    if len(shapes) < len(todo):  # a layer the probe did not see: let the capture explain
        return plan.widened(), {}
    return plan.plan_routes(shapes, n, components=components, batch_images=batch_size)


def _workers_stream(runner: Engine, images: Any, batch_size: int, label: Any,
                    routes: dict[str, LayerRoute]) -> tuple[Any, int] | None:
    """The dataset and batch size the engine's workers stream, or None (the driver does).

    On an engine with workers (Ray), the passes of the layers routed to ``"moments"`` run
    there (:func:`pcace.engines.shards.sharded_components`) when the images can be split into
    shards the workers read (:func:`pcace.engines.shards.shardable`).
    """
    if not hasattr(runner, "map_shards") or not any(_sharded_route(r) for r in routes.values()):
        return None
    from ..engines.shards import shardable

    return shardable(images, batch_size, label)


@dataclass
class _Sharded:
    """The streamed layers reduced on the engine's workers; stands in for the capture."""

    streamed: dict[str, Any]
    scores: np.ndarray
    seconds: float
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    spilled: dict[str, bool] = field(default_factory=dict)
    on_device: dict[str, bool] = field(default_factory=dict)
    forward_calls: int = 0

    @classmethod
    def run(cls, source: tuple[Any, int], model: torch.nn.Module,
            routes: dict[str, LayerRoute], targets: TargetSet, components: int | float,
            pca_dtype: torch.dtype, runner: Engine, progress: bool) -> _Sharded:
        from ..engines.shards import aligned_shard_size, sharded_components
        from ..reduce.twopass import StreamedLayer

        data, batch = source
        names = [n for n, r in routes.items() if _sharded_route(r)]
        size = aligned_shard_size(len(data), batch, getattr(runner, "slots", lambda: 1)())
        if progress:
            print(f"pcace: {len(names)} streamed layer(s) on the {runner.name} engine's "
                  f"workers, in shards of {size} images", file=sys.stderr)
        start = time.perf_counter()
        reds, scores = sharded_components(model, data, names, targets, components,
                                          shard_size=size, batch_size=batch, engine=runner,
                                          pca_dtype=pca_dtype, progress=progress)
        streamed = {n: StreamedLayer(reds[n], None, routes[n].stats_bytes, routes[n].shape)
                    for n in names}
        scores = scores[:, None] if scores.ndim == 1 else scores
        return cls(streamed, scores, time.perf_counter() - start)

    def check_scores(self, scores: np.ndarray) -> None:
        """The driver's pass and the workers' must have scored the same images alike."""
        if scores is self.scores:
            return
        if scores.shape != self.scores.shape or not np.allclose(scores, self.scores,
                                                                rtol=1e-6, atol=1e-6):
            raise ValueError("the engine's workers scored the images differently from this "
                             "process: the data must read the same on every node")

    def __enter__(self) -> _Sharded:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _sharded_route(route: LayerRoute) -> bool:
    """Whether an engine's workers can run the layer's passes: moments in one group."""
    return route.route == "moments" and route.groups == 1


def _two_pass(images: Any, routes: dict[str, LayerRoute], components: int | float,
              pca_dtype: torch.dtype, beside_workers: bool = False) -> Any:
    """The driver's passes for the streamed layers (those on the engine's workers left out:
    with ``beside_workers``, only subspace layers and moments in several channel groups)."""
    from ..reduce.twopass import TwoPass, check_repeatable

    streamed = {n: r for n, r in routes.items() if r.route in STREAMED and
                not (beside_workers and _sharded_route(r))}
    if not streamed:
        return None
    check_repeatable(images)
    return TwoPass({n: r.shape for n, r in streamed.items()}, components, pca_dtype=pca_dtype,
                   subspace=[n for n, r in streamed.items() if r.route == "subspace"],
                   groups={n: r.groups for n, r in streamed.items() if r.groups > 1})


def _route_record(routes: dict[str, LayerRoute], spilled: dict[str, bool],
                  streamed: dict[str, Any], passes_on: dict[str, str]) -> dict[str, dict]:
    """The manifest's per-layer route: route, reason, passes, bytes of statistics; for a
    streamed layer where its passes ran (``passes_on``, default this process), and for a
    subspace layer the passes it took, its channels that did not converge and the largest
    estimated principal angle of a kept subspace."""
    out = {}
    for name, r in routes.items():
        entry = {"route": r.route, "reason": r.reason, "passes": r.passes,
                 "stats_bytes": r.stats_bytes}
        if spilled.get(name):
            entry["route"] = "spilled"
        if r.groups > 1:
            entry["channel_groups"] = r.groups
        if name in streamed:
            entry["stats_bytes"] = int(streamed[name].stats_bytes)
            entry["passes_on"] = passes_on.get(name, "this process")
            basis = streamed[name].basis
            if basis is not None and basis.route == "subspace":
                entry["passes"] = int(basis.passes) + 1  # and the projection pass
                entry["unconverged_channels"] = int((~basis.converged).sum())
                entry["largest_angle"] = float(basis.angle.max()) if len(basis.angle) else 0.0
        out[name] = entry
    return out


def _score_streamed(out: ScoredLayers, streamed: dict[str, Any], scores: np.ndarray,
                    groups: list[_Group], target_names: list[str], score: str,
                    plan: MemoryPlan, ace_kwargs: dict, options: Statistics,
                    run: _Checkpoints, on_step: Callable[[], None] | None,
                    progress: bool = False) -> None:
    """Table rows of the layers reduced in two passes, as :func:`_score_layers` makes them.

    Takes the layers out of ``streamed`` as it scores them (their components then live
    in the result only, not twice).

    Streamed layers come only from runs of one image group (no ``per_label``).
    """
    if out.interrupted or not streamed:
        return
    from tqdm.auto import tqdm

    (group,) = groups
    bar = tqdm(total=sum(layer.shape[0] for layer in streamed.values()),
               desc="scoring streamed channels", unit="ch", disable=not progress)
    try:
        for name in list(streamed):
            bar.set_postfix_str(name)
            layer = streamed.pop(name)  # its reduction lives on in the result only
            red = layer.reduction
            acc = _Accumulated()
            dead = red.dead.cpu().numpy()
            values = score_reduction(red, group.scores(scores), score, ace_kwargs, plan)
            acc.add(_BlockScores(np.where(dead[:, None], 0.0, values),
                                 red.n_components.cpu().numpy().astype(int),
                                 red.explained_variance.cpu().numpy(), dead.astype(bool),
                                 red.scores.cpu(), None))
            table, stability, comp = _group_result(
                name, group, acc, [target_names[c] for c in group.columns],
                group.scores(scores), options, ace_kwargs, plan, score)
            out.components[name] = comp
            out.tables.append(table)
            if stability:
                out.stability[name] = stability
            run.save(name, table, stability or None, {None: comp}, scores, layer.shape)
            bar.update(layer.shape[0])
            if on_step is not None:
                on_step()
    except (KeyboardInterrupt, Interrupted, EngineLost) as err:
        _stopped(out, err)
    finally:
        bar.close()
