"""The PCACE pipeline: capture -> reduce -> ACE -> tables, and the run directory.

:func:`rank` runs a model once over the images, keeps the outputs of the
requested layers (within a memory budget), reduces each channel to its first
principal components, scores all channels of a layer in one batched ACE call,
and returns a :class:`PCACEResult` with one row per channel and one per layer.
"""

from __future__ import annotations

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

from . import __version__
from .capture import Capture, capture, non_finite_error
from .data import as_batches
from .engine import Engine, EngineLost, Problems, resolve_engine
from .layers import resolve_layers
from .models import count_parameters, weights_hash
from .plan import MemoryPlan
from .reduce import NonFiniteMaps, reduce_block, reusing_buffers
from .scoring import channel_values
from .stats import (
    bootstrap_summary,
    bootstrap_values,
    interval_scheme,
    layer_stability,
    null_summary,
    permutation_null,
)
from .targets import resolve_target
from .validation import components as check_components
from .validation import device as resolve_device
from .validation import fraction, integer, score_kind
from .validation import scores as check_scores


@dataclass
class PCACEResult:
    """Channel and layer tables of a PCACE run, with the run's manifest.

    Attributes
    ----------
    channels : pandas.DataFrame
        One row per channel: ``layer``, ``channel``, ``pcace``, ``rank`` (1 = highest within
        its layer), ``n_components``, ``explained_variance``, ``dead``; more columns when the
        run computed a null or a bootstrap.
    layers : pandas.DataFrame
        One row per layer in network order: channel count, map size and the distribution of
        its channels' values (mean, median, 90th percentile, max) with the top channels.
    manifest : dict
        What produced the numbers: pcace version, model, weights hash, N, target, k, device,
        seed, timings and library versions (written as ``run.json``).
    components : dict
        Per layer, the principal-component scores (C, N, k) the values were computed from
        (kept in memory for follow-up statistics; not saved).
    """

    channels: pd.DataFrame
    layers: pd.DataFrame
    manifest: dict
    components: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    scores: np.ndarray | None = field(default=None, repr=False)

    @property
    def complete(self) -> bool:
        """False when the run was interrupted before every layer was scored."""
        return bool(self.manifest.get("complete", not self.manifest.get("interrupted", False)))

    def top(self, layer: str | None = None, n: int = 10) -> pd.DataFrame:
        """The ``n`` highest-ranked channels of ``layer`` (or of each layer when None)."""
        if layer is None:
            best = self.channels[self.channels["rank"] <= n]
            return best.sort_values(["layer_order", "rank"])
        table = self.channels[self.channels.layer == layer]
        if table.empty:
            raise ValueError(f"no layer {layer!r} in this run; layers: {list(self.layers.layer)}")
        return table.sort_values("rank").head(n)

    def save(self, path: str | Path) -> Path:
        """Write the run to ``path``: channels, layers and scores CSVs, and ``run.json``.

        Each file is written under a temporary name and renamed into place, ``run.json``
        last; it lists every file with its size and SHA-256 and says whether the run is
        complete (:func:`pcace.rundir.save_run`). Files an earlier pcace run wrote to
        ``path`` and this one does not (an old report) are removed; files pcace did not
        write are never overwritten.
        """
        from .rundir import save_run

        files: dict[str, Any] = {"channels.csv": self.channels, "layers.csv": self.layers}
        if self.scores is not None:
            files["scores.csv"] = pd.DataFrame({"score": self.scores})
        self.manifest = save_run(path, files, self.manifest, complete=self.complete)
        return Path(path)

    def _repr_html_(self) -> str:
        from .viz import result_html

        return result_html(self)


def load(path: str | Path) -> PCACEResult:
    """Read a run directory written by :meth:`PCACEResult.save`, checking its files.

    Every file ``run.json`` lists must match its recorded size and SHA-256; a directory
    that does not (a truncated or edited file) is refused with
    :class:`pcace.rundir.RunDirError`. An interrupted run loads with ``complete`` False
    and a warning.

    Examples
    --------
    >>> import pcace  # doctest: +SKIP
    >>> res = pcace.load("runs/cat")  # doctest: +SKIP
    >>> res.layers[["layer", "median"]]  # doctest: +SKIP
    """
    from .rundir import read_run

    root = Path(path)
    run = read_run(root)
    if not run.complete:
        warnings.warn(f"{root}: {run.label}", stacklevel=2)
    scores = None
    if (root / "scores.csv").exists():
        scores = pd.read_csv(root / "scores.csv")["score"].to_numpy()
    return PCACEResult(
        channels=pd.read_csv(root / "channels.csv"),
        layers=pd.read_csv(root / "layers.csv"),
        manifest=dict(run.manifest),
        scores=scores,
    )


def layer_summary(channels: pd.DataFrame, shapes: dict[str, tuple[int, ...]],
                  top: int = 5) -> pd.DataFrame:
    """One row per layer (in the order of ``shapes``) summarising its channels' values."""
    rows = []
    for order, (name, shape) in enumerate(shapes.items()):
        sub = channels[channels.layer == name]
        if sub.empty:
            continue
        values = sub.pcace.to_numpy()
        best = sub.sort_values("rank").channel.head(top).tolist()
        rows.append({
            "layer": name, "order": order, "channels": len(sub), "height": shape[1],
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
    target: int | str | Callable[[torch.Tensor], torch.Tensor],
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
        (:func:`pcace.hooks.evaluating`).
    images : torch.Tensor, Dataset or DataLoader
        Preprocessed images (N, C, H, W), or a Dataset whose items are images or
        (image, label) pairs, or a DataLoader of those.
    target : int, str or callable
        An int ``c``: the score of class ``c`` before the softmax (the paper's choice); a string
        (``"prob:3"``, ``"output:0"``, ``"output"`` or a class name resolved through
        ``categories``); or a callable mapping the model's output batch to an (N,) score, such as
        :class:`pcace.targets.RegressionOutput`.
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
        :class:`pcace.plan.MemoryPlan`: three quarters hold captured activations,
        channel-major (layers beyond that are spilled to disk and read back in blocks),
        one quarter the reduce step's and the statistics' working memory. The forward
        pass's own memory comes on top. ``"auto"`` (default): a quarter of the machine's
        memory (:func:`pcace.plan.default_memory_budget`); the bytes used are recorded in
        the manifest.
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
        :func:`pcace.evidence.split_half`). With the null it gives each layer an
        ``evidence`` verdict (``"strong"``, ``"weak"``, ``"none"``) and a sentence
        (:func:`pcace.evidence.layer_evidence`). 0 opts out; skipped below 20 images.
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
        process-wide setting; see :mod:`pcace._memory`). Off unless True or
        ``PCACE_TUNE_MALLOC=1``; the ``pcace`` command turns it on.
    checkpoint_dir : path, optional
        A run directory (see :func:`pcace.rundir.prepare_run_dir`): each finished layer
        (values, null, bootstrap, components) is saved there as the run goes, so that an
        interrupted run can be resumed.
    resume : bool
        With ``checkpoint_dir``: take the layers an earlier, interrupted run with the same
        settings finished from their checkpoints and score only the rest. The result equals
        an uninterrupted run's. Checkpoints of other settings are refused.
    on_step : callable, optional
        Called between batches of the forward pass and between blocks of channels; it may
        raise to stop the run (the ``pcace`` command passes
        :meth:`pcace.interrupts.deferred_signals.check`). A ``KeyboardInterrupt`` (or
        :class:`pcace.interrupts.Interrupted`) while channels are scored returns the layers
        finished so far, with ``result.complete`` False; during the forward pass it
        propagates (nothing is finished yet).
    engine : {"local", "ray"} or pcace.engine.Engine
        Where the ACE problems (observed values, null, split-half, bootstrap) run:
        ``"local"`` (default) in this process; ``"ray"`` as tasks on a Ray cluster
        (``pip install "pcace[ray]"``; :mod:`pcace._ray_engine`). The same inputs and seed
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
    plan = MemoryPlan.from_budget(memory_budget)
    if pca_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"pca_dtype must be torch.float32 or torch.float64; got {pca_dtype!r}")
    options = Statistics(permutations=integer(permutations, "permutations", minimum=0),
                         bootstrap=integer(bootstrap, "bootstrap", minimum=0),
                         level=fraction(level, "level"), seed=integer(seed, "seed", None),
                         interval=interval)
    interval_scheme(interval)
    integer(split_half, "split_half", minimum=0)
    dev = resolve_device(device)
    score_fn = resolve_target(target, categories)
    names = resolve_layers(model, layers)
    ace_kwargs = dict(ace_options or {})
    runner, owned = resolve_engine(engine, ray_address)
    if progress and runner.name != "local":
        print(f"pcace: {runner.summary()}", file=sys.stderr)
    try:
        return _rank(model, images, target, names, components, batch_size=batch_size, dev=dev,
                     device_memory_budget=device_memory_budget, plan=plan, pca_dtype=pca_dtype,
                     score=score, label=label, score_fn=score_fn, options=options,
                     split_half=split_half, interval=interval, progress=progress,
                     spill_dir=spill_dir, ace_kwargs=ace_kwargs, tune_malloc=tune_malloc,
                     checkpoint_dir=checkpoint_dir, resume=resume, on_step=on_step,
                     engine=runner, t_start=t_start)
    finally:
        if owned:
            runner.close()


def _rank(model: torch.nn.Module, images: Any, target: Any, names: list[str],
          components: int | float, *, batch_size: int, dev: torch.device,
          device_memory_budget: int | str, plan: MemoryPlan, pca_dtype: torch.dtype,
          score: str, label: int | None, score_fn: Any, options: Statistics, split_half: int,
          interval: str, progress: bool, spill_dir: str | Path | None, ace_kwargs: dict,
          tune_malloc: bool | None, checkpoint_dir: str | Path | None, resume: bool,
          on_step: Callable[[], None] | None, engine: Engine, t_start: float) -> PCACEResult:
    """:func:`rank` once its arguments are checked and its engine is open."""
    run = _Checkpoints.open(checkpoint_dir, resume, {
        "weights_sha256": weights_hash(model), "layers": names,
        "target": _describe_target(score_fn), "components": components, "score": score,
        "statistics": asdict(options), "pca_dtype": str(pca_dtype), "ace": ace_kwargs,
        "device": dev.type, "memory_budget": plan.budget, "label": label})
    todo = [n for n in names if n not in run.done]
    shapes = {n: tuple(run.done[n].extra["shape"]) for n in names if n in run.done}
    stored = {"forward_calls": 0, "seconds": 0.0, "spilled": [], "on_device": []}
    t_captured = time.perf_counter()
    if not todo:  # every layer finished before: the scores came with them
        scores = check_scores(run.scores())
        scored = _score_layers(None, names, scores, components, score, dev, plan, progress,
                               ace_kwargs, options, pca_dtype, run, on_step, engine)
    else:
        batches = as_batches(images, batch_size, label=label)
        with capture(model, batches, todo, score_fn, device=dev,
                     memory_budget=plan.store_bytes, check_finite=False, spill_dir=spill_dir,
                     progress=progress, device_memory_budget=device_memory_budget,
                     tune_malloc=tune_malloc, on_step=on_step) as cap, reusing_buffers():
            scores = check_scores(cap.scores)
            run.check_scores(scores)
            shapes.update(cap.shapes)
            stored = {"forward_calls": cap.forward_calls, "seconds": cap.seconds,
                      "spilled": [n for n, s in cap.spilled.items() if s],
                      "on_device": [n for n, s in cap.on_device.items() if s]}
            t_captured = time.perf_counter()
            scored = _score_layers(cap, names, scores, components, score, dev, plan, progress,
                                   ace_kwargs, options, pca_dtype, run, on_step, engine)
    t_end = time.perf_counter()

    channels = _channel_table(scored.tables, names)
    layer_table = layer_summary(channels, {n: shapes[n] for n in names if n in shapes})
    split_half = integer(split_half, "split_half", minimum=0)
    _add_layer_statistics(layer_table, channels, scored, scores, split_half, options.seed,
                          ace_kwargs, engine if engine.alive else None)  # a lost cluster:
    # the finished layers' split-half check runs here

    manifest = {
        "pcace_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"class": type(model).__name__, "parameters": count_parameters(model),
                  "weights_sha256": weights_hash(model)},
        "data": {"n_images": int(scores.size), "label": label,
                 "skipped_images": int(getattr(images, "skipped", 0) or 0)},
        "target": _describe_target(score_fn),
        "target_description": score_fn.describe() if hasattr(score_fn, "describe") else None,
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
        "pca_dtype": str(pca_dtype).replace("torch.", ""),
        "spilled_layers": stored["spilled"],
        "device_layers": stored["on_device"],
        "forward_calls": stored["forward_calls"],
        "ace": {"delrsq": 0.01, "max_iter": 20, "alpha": 5.0, **ace_kwargs},
        "timings": {"forward_and_capture": stored["seconds"],
                    "reduce_and_ace": t_end - t_captured,
                    "total": t_end - t_start},
        "engine": engine.describe(),
        "interrupted": scored.interrupted,
        "interrupt_signal": scored.signal,
        "complete": not scored.interrupted,
        "layers_done": [t.layer.iloc[0] for t in scored.tables if len(t)],
        "resumed_layers": sorted(run.done),
        "stability": scored.stability,
        "versions": _versions(),
    }
    return PCACEResult(channels, layer_table, manifest, scored.components, scores)


BASE_COLUMNS = ["layer", "layer_order", "channel", "pcace", "rank", "n_components",
                "explained_variance", "dead"]


def _channel_table(tables: list[pd.DataFrame], names: list[str]) -> pd.DataFrame:
    if not tables:
        return pd.DataFrame(columns=BASE_COLUMNS)
    channels = pd.concat(tables, ignore_index=True)
    channels["layer_order"] = channels.layer.map({n: i for i, n in enumerate(names)})
    channels["rank"] = (channels.groupby("layer").pcace.rank(ascending=False, method="first")
                        .astype(int))
    extra = [c for c in channels.columns if c not in BASE_COLUMNS]
    return channels[BASE_COLUMNS + extra]


def _add_layer_statistics(layers: pd.DataFrame, channels: pd.DataFrame, scored: ScoredLayers,
                          scores: np.ndarray, split_half: int, seed: int,
                          ace_kwargs: dict, engine: Engine | None = None) -> None:
    """Evidence per layer (null share, split-half reproducibility, verdict), stability."""
    from .evidence import layer_evidence, significant, split_half_table

    if layers.empty:
        return
    if "q_value" in channels.columns:
        channels["significant"] = significant(channels.q_value)
    split = None
    if split_half and scores.size >= 20:
        split = split_half_table(scored.components, scores, splits=split_half, seed=seed,
                                 ace_options=ace_kwargs, engine=engine)
    if "q_value" in channels.columns or split is not None:
        evidence = layer_evidence(channels, split, n_images=int(scores.size))
        evidence = evidence.drop(columns=["channels"]).set_index("layer")
        for column in evidence.columns:
            layers[column] = layers.layer.map(evidence[column])
    stability = scored.stability
    if stability:
        layers["rank_spearman"] = layers.layer.map(
            {n: s.get("spearman_mean") for n, s in stability.items()})
        layers["top10_retention"] = layers.layer.map(
            {n: s.get("top_retention") for n, s in stability.items()})


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
    """What the scoring stage returns: per-layer tables, components and stability."""

    tables: list[pd.DataFrame] = field(default_factory=list)
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    stability: dict[str, dict] = field(default_factory=dict)
    interrupted: bool = False
    signal: int | None = None


def _score_layers(cap: Capture | None, names: list[str], scores: np.ndarray,
                  components: int | float, score: str, dev: torch.device, plan: MemoryPlan,
                  progress: bool, ace_kwargs: dict, options: Statistics,
                  pca_dtype: torch.dtype, run: _Checkpoints,
                  on_step: Callable[[], None] | None,
                  engine: Engine | None = None) -> ScoredLayers:
    from tqdm.auto import tqdm

    from .interrupts import Interrupted

    out = ScoredLayers()
    todo = [n for n in names if n not in run.done]
    total_channels = sum(cap.shapes[n][0] for n in todo) if cap is not None else 0
    y = torch.as_tensor(scores, dtype=torch.float64)
    bar = tqdm(total=total_channels, desc="scoring channels", unit="ch", disable=not progress)
    try:
        for name in names:
            if name in run.done:
                ckpt = run.done[name]
                out.tables.append(ckpt.table)
                out.components[name] = torch.from_numpy(ckpt.arrays["components"])
                if ckpt.stability is not None:
                    out.stability[name] = ckpt.stability
                continue
            parts, boots, rows = [], [], []
            per_block = plan.channels_per_block(cap.shapes[name], len(scores),
                                                cap.spilled[name], pca_dtype == torch.float64)
            for chans, block in cap.blocks(name, per_block, destructive=True):
                row, red_scores, boot = _score_block(name, chans, block, y, scores,
                                                     components, score, dev, ace_kwargs,
                                                     options, pca_dtype, plan, engine)
                rows.append(row)
                parts.append(red_scores)
                if boot is not None:
                    boots.append(boot)
                bar.update(block.shape[0])
                if on_step is not None:
                    on_step()
            table = pd.concat(rows, ignore_index=True)
            out.components[name] = _pad_cat(parts)
            table, stability = _add_statistics(
                table, out.components[name], scores, np.concatenate(boots) if boots else None,
                options, ace_kwargs, plan, score, engine)
            out.tables.append(table)
            if stability is not None:
                out.stability[name] = stability
            run.save(name, table, stability, out.components[name], scores, cap.shapes[name])
    except (KeyboardInterrupt, Interrupted, EngineLost) as err:
        out.interrupted = True
        out.signal = getattr(err, "signum", None)
        why = f"{err}; " if isinstance(err, EngineLost) else ""
        warnings.warn(f"interrupted: {why}returning the {len(out.tables)} layers scored so far",
                      stacklevel=3)
    finally:
        bar.close()
    return out


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
        from .rundir import load_layer_checkpoints, start_checkpoints

        done = load_layer_checkpoints(root, settings) if resume else {}
        start_checkpoints(root, settings)
        return cls(Path(root), settings, done)

    def scores(self) -> np.ndarray:
        return next(iter(self.done.values())).arrays["scores"]

    def check_scores(self, scores: np.ndarray) -> None:
        for name, ckpt in self.done.items():
            if not np.array_equal(ckpt.arrays["scores"], scores):
                from .rundir import RunDirError

                raise RunDirError(f"the images (or their order) differ from those of the "
                                  f"interrupted run: its layer {name!r} was scored on other "
                                  "scores. Resume with the same --data and options, or start "
                                  "afresh with --force")

    def save(self, name: str, table: pd.DataFrame, stability: dict | None,
             components: torch.Tensor, scores: np.ndarray, shape: tuple[int, ...]) -> None:
        if self.root is None:
            return
        from .rundir import save_layer_checkpoint

        save_layer_checkpoint(self.root, name, table, stability=stability,
                              arrays={"components": components.numpy(), "scores": scores},
                              extra={"shape": list(shape)})


def _score_block(name: str, chans: slice, block: torch.Tensor, y: torch.Tensor,
                 scores: np.ndarray, components: int | float, score: str, dev: torch.device,
                 ace_kwargs: dict, options: Statistics, pca_dtype: torch.dtype,
                 plan: MemoryPlan, engine: Engine | None = None
                 ) -> tuple[pd.DataFrame, torch.Tensor, np.ndarray | None]:
    """One block of a layer's channels: its table rows, component scores and bootstrap."""
    work = block.to(dev, pca_dtype)  # the store's own memory when it can be
    try:
        red = reduce_block(work, components)
    except NonFiniteMaps as err:
        raise _non_finite_error(name, chans, work, err.channels) from None
    del work
    values = _observed_values(red.scores, y, score, ace_kwargs, plan, engine)
    start = chans.start or 0
    dead = red.dead.cpu().numpy()
    row = pd.DataFrame({
        "layer": name, "channel": np.arange(start, start + block.shape[0]),
        "pcace": np.where(dead, 0.0, values),
        "n_components": red.n_components.cpu().numpy().astype(int),
        "explained_variance": red.explained_variance.cpu().numpy(),
        "dead": dead.astype(bool),
    })
    boot = None
    if options.bootstrap:  # the block may now hold standardised maps: each resample is
        # standardised again, which per-column affine changes do not affect
        maps = block.transpose(0, 1).cpu()
        boot = bootstrap_values(
            maps, scores, components, options.bootstrap, options.seed, score=score,
            ace_options=ace_kwargs, scheme=interval_scheme(options.interval), engine=engine,
            chunk=plan.replicates_per_call(maps.shape[0] // 2 if options.interval ==
                                           "half-sample" else maps.shape[0],
                                           maps.shape[1], maps[0, 0].numel()))
    return row, red.scores.cpu(), boot


def _observed_values(z: torch.Tensor, y: torch.Tensor, score: str, ace_kwargs: dict,
                     plan: MemoryPlan, engine: Engine | None) -> np.ndarray:
    """The block's values: one problem per channel against the score, on the engine."""
    if engine is None:
        return channel_values(z, y, score, ace_kwargs)
    problems = Problems(z, y.to(z.device)[None], np.arange(z.shape[0]), order="channel")
    return engine.values(problems, chunk=plan.ace_problems(z.shape[1], z.shape[2]),
                         score=score, ace_options=ace_kwargs, stage="observed")


def _non_finite_error(name: str, chans: slice, block: torch.Tensor,
                      channels: list[int]) -> ValueError:
    """The error for NaN/inf in a layer, naming its channels and (first channel's) images."""
    start = chans.start or 0
    images = (~torch.isfinite(block[channels[0]])).any(dim=1).nonzero().flatten().tolist()
    return non_finite_error(name, [start + c for c in channels], images, example=True)


def _add_statistics(table: pd.DataFrame, z: torch.Tensor, scores: np.ndarray,
                    boot: np.ndarray | None, options: Statistics, ace_kwargs: dict,
                    plan: MemoryPlan, score: str,
                    engine: Engine | None = None) -> tuple[pd.DataFrame, dict | None]:
    observed = table.pcace.to_numpy()
    stability = None
    if options.permutations:
        null = permutation_null(z, scores, options.permutations, options.seed,
                                chunk=plan.ace_problems(z.shape[1], z.shape[2]), score=score,
                                ace_options=ace_kwargs, engine=engine)
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
    k = max(p.shape[-1] for p in parts)
    padded = [torch.nn.functional.pad(p, (0, k - p.shape[-1])) for p in parts]
    return torch.cat(padded)
