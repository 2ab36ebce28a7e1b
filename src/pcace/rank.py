"""The PCACE pipeline: capture -> reduce -> ACE -> tables, and the run directory.

:func:`rank` runs a model once over the images, keeps the outputs of the
requested layers (within a memory budget), reduces each channel to its first
principal components, scores all channels of a layer in one batched ACE call,
and returns a :class:`PCACEResult` with one row per channel and one per layer.
"""

from __future__ import annotations

import json
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import __version__
from ._standardise import NonFiniteMaps
from .ace import MIN_OBSERVATIONS, ace
from .capture import capture, non_finite_error, resolve_budget, resolve_layers
from .data import as_batches
from .models import count_parameters, weights_hash
from .reduce import reduce_block, reusing_buffers
from .stats import (
    bootstrap_summary,
    bootstrap_values,
    interval_scheme,
    layer_stability,
    null_summary,
    permutation_null,
    share_significant,
)
from .targets import resolve_target

SCORES = ("maximal", "first-component")


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
        return not self.manifest.get("interrupted", False)

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
        """Write ``channels.csv``, ``layers.csv``, ``scores.csv`` and ``run.json`` to ``path``."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.channels.to_csv(out / "channels.csv", index=False)
        self.layers.to_csv(out / "layers.csv", index=False)
        if self.scores is not None:
            pd.DataFrame({"score": self.scores}).to_csv(out / "scores.csv", index=False)
        (out / "run.json").write_text(json.dumps(self.manifest, indent=2, default=str))
        return out


def load(path: str | Path) -> PCACEResult:
    """Read a run directory written by :meth:`PCACEResult.save`.

    Examples
    --------
    >>> import pcace  # doctest: +SKIP
    >>> res = pcace.load("runs/cat")  # doctest: +SKIP
    >>> res.layers[["layer", "median"]]  # doctest: +SKIP
    """
    root = Path(path)
    missing = [f for f in ("channels.csv", "layers.csv", "run.json") if not (root / f).exists()]
    if missing:
        raise FileNotFoundError(f"{root} is not a pcace run directory: missing {missing}")
    scores = None
    if (root / "scores.csv").exists():
        scores = pd.read_csv(root / "scores.csv")["score"].to_numpy()
    return PCACEResult(
        channels=pd.read_csv(root / "channels.csv"),
        layers=pd.read_csv(root / "layers.csv"),
        manifest=json.loads((root / "run.json").read_text()),
        scores=scores,
    )


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` picks CUDA when available, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
    return dev


def _numpy(a: Any) -> np.ndarray:
    return a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _abs_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|Pearson correlation| of matching rows; 0 where either row is constant."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return np.abs(np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1.0), 0.0))


def score_components(z: torch.Tensor, scores: torch.Tensor, score: str = "maximal",
                     **ace_kwargs: Any) -> np.ndarray:
    """PCACE value of each channel from its principal-component scores.

    On the CPU the compiled ACE engine runs (NumPy in, NumPy out); on a GPU the batched
    torch engine runs on the device of ``z``.

    Parameters
    ----------
    z : torch.Tensor
        Principal-component scores, shape (C, N, k).
    scores : torch.Tensor
        The network's score per image, shape (N,).
    score : {"maximal", "first-component"}
        The maximal correlation over all k components (default), or the published scripts'
        ``|corr(phi_1, theta)|``.
    **ace_kwargs
        Passed to :func:`pcace.ace`.

    Returns
    -------
    numpy.ndarray
        Shape (C,), values in [0, 1].

    Examples
    --------
    >>> import torch
    >>> z = torch.randn(4, 100, 3, dtype=torch.float64)
    >>> float(score_components(z, z[0, :, 0] ** 2)[0].round(2))
    1.0
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}; got {score!r}")
    if z.shape[0] == 0:
        return np.zeros(0)
    if z.device.type == "cpu":
        r = ace(z.double().numpy(), scores.double().cpu().numpy(), **ace_kwargs)
    else:
        r = ace(z, scores.to(z), **ace_kwargs)
    if score == "maximal":
        return np.clip(_numpy(r.rho), 0.0, 1.0)
    return _abs_corr(_numpy(r.phi)[..., 0], _numpy(r.theta))


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
    permutations: int = 0,
    bootstrap: int = 0,
    level: float = 0.95,
    interval: str = "half-sample",
    seed: int = 0,
    progress: bool = True,
    spill_dir: str | Path | None = None,
    ace_options: dict | None = None,
    model_spec: dict | None = None,
    data_spec: dict | None = None,
) -> PCACEResult:
    """Rank every channel of the chosen layers of ``model`` by PCACE.

    Parameters
    ----------
    model : torch.nn.Module
        The trained network; put in eval mode, gradients off.
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
        Bytes of RAM for activations and the reduce step's work: three quarters hold
        captured activations, channel-major; layers beyond that are spilled to disk and read
        back in blocks. The forward pass's own memory comes on top. ``"auto"`` (default):
        a quarter of the machine's memory (:func:`pcace.capture.default_memory_budget`);
        the bytes used are recorded in the manifest.
    device_memory_budget : int or "auto"
        On a GPU: bytes of activations kept in the GPU's memory, where their reduce step
        then runs without a transfer; the layers beyond it go to RAM under
        ``memory_budget``. ``"auto"`` (default): half of the GPU's free memory; 0 keeps
        them all in RAM. Ignored on the CPU.
    pca_dtype : torch.dtype
        Precision of the passes over the activations (standardisation, Gram matrices);
        the eigenproblems and ACE always run in float64. ``torch.float32`` (default) works
        on the captured activations in place; on the shared CIFAR ResNet-20 (200 images)
        its values differ from an all-float64 run by a median of 2e-8 (99th percentile
        5e-7) over 688 channels, with no rank changed; one or two channels differed by
        1e-4 to 1e-3 (two image selections), where ACE's smoother made a different
        discrete choice on inputs that differ at the 1e-7 level. ``torch.float64`` copies
        each block first: slower, exact to ~1e-12.
    score : {"maximal", "first-component"}
        ``"maximal"``: the maximal correlation over all k components (PCACE). The other
        reproduces the published scripts' ``|corr(phi_1, theta)|``, for comparison only.
    label : int, optional
        Keep only the images of this label (the paper ranks over the images of one class).
    categories : sequence of str, optional
        Class names, to resolve a class-name ``target``.
    permutations : int
        B > 0 re-scores every channel against B permutations of the score (the same for all
        channels; only ACE re-runs) and adds ``null_mean``, ``null_q95``, ``p_value`` (with the
        +1 correction), ``q_value`` (Benjamini-Hochberg within each layer) and ``pcace_adj`` (a
        null-corrected value comparable across layers and runs; see :mod:`pcace.stats`).
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
        interval (91-100% coverage of 95% intervals in our simulations; it can lie below the
        biased raw value). ``"basic"`` and ``"percentile"``: the classical with-replacement
        bootstrap; ACE overfits more on repeated images, so these under-cover (54-94% and 0-96%).
        See :func:`pcace.stats.bootstrap_summary` and ``benchmarks/README.md``, "Statistics".
    seed : int
        Seed of the permutations and resamples; recorded in the manifest.
    progress : bool
        Show progress bars on stderr.
    spill_dir : path, optional
        Where spilled activations go (a temporary directory by default).
    ace_options : dict, optional
        Extra keyword arguments for :func:`pcace.ace` (``delrsq``, ``max_iter``, ...).
    model_spec, data_spec : dict, optional
        JSON descriptions of how model and data were loaded (recorded in the manifest so that
        the CLI can reload them).

    Returns
    -------
    PCACEResult

    Notes
    -----
    On Linux with glibc, the forward pass keeps freed memory (blocks up to 128 MiB) in the
    ``malloc`` heap so that each batch reuses the previous one's, and hands it back when
    the pass ends (see :mod:`pcace._memory`; ``PCACE_TUNE_MALLOC=0`` turns this off).
    Results do not depend on it.

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
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}; got {score!r}")
    _check_components(components)
    memory_budget = resolve_budget(memory_budget)
    if pca_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"pca_dtype must be torch.float32 or torch.float64; got {pca_dtype!r}")
    interval_scheme(interval)
    dev = resolve_device(device)
    score_fn = resolve_target(target, categories)
    names = resolve_layers(model, layers)
    model.eval()
    model.to(dev)
    ace_kwargs = dict(ace_options or {})

    batches = as_batches(images, batch_size, label=label)
    with capture(model, batches, names, score_fn, device=dev,
                 memory_budget=memory_budget - memory_budget // 4, check_finite=False,
                 spill_dir=spill_dir, progress=progress,
                 device_memory_budget=device_memory_budget) as cap, \
            reusing_buffers():
        scores = np.asarray(cap.scores, dtype=np.float64)
        _check_scores(scores)
        t_captured = time.perf_counter()
        extras = _Extras(int(permutations), int(bootstrap), float(level), int(seed), interval)
        tables, components_kept, interrupted = _score_layers(
            cap, names, scores, components, score, dev, memory_budget, progress, ace_kwargs,
            extras, pca_dtype)
        shapes = dict(cap.shapes)
        spilled = dict(cap.spilled)
        on_device = dict(cap.on_device)
        forward_calls = cap.forward_calls
        capture_seconds = cap.seconds
    t_end = time.perf_counter()

    channels = _channel_table(tables, names)
    layer_table = layer_summary(channels, {n: shapes[n] for n in names if n in shapes})
    _add_layer_statistics(layer_table, channels, extras)

    manifest = {
        "pcace_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"class": type(model).__name__, "parameters": count_parameters(model),
                  "weights_sha256": weights_hash(model), "spec": model_spec},
        "data": {"n_images": int(scores.size), "label": label, "spec": data_spec,
                 "skipped_images": int(getattr(images, "skipped", 0) or 0)},
        "target": _describe_target(score_fn),
        "target_description": score_fn.describe() if hasattr(score_fn, "describe") else None,
        "score": score,
        "components": components,
        "layers": names,
        "shapes": {n: list(s) for n, s in shapes.items()},
        "device": str(dev),
        "seed": seed,
        "permutations": int(permutations),
        "bootstrap": int(bootstrap),
        "level": level,
        "interval": interval,
        "memory_budget": memory_budget,
        "pca_dtype": str(pca_dtype).replace("torch.", ""),
        "spilled_layers": [n for n, s in spilled.items() if s],
        "device_layers": [n for n, s in on_device.items() if s],
        "forward_calls": forward_calls,
        "ace": {"delrsq": 0.01, "max_iter": 20, "alpha": 5.0, **ace_kwargs},
        "timings": {"forward_and_capture": capture_seconds,
                    "reduce_and_ace": t_end - t_captured,
                    "total": t_end - t_start},
        "interrupted": interrupted,
        "stability": extras.stability,
        "versions": _versions(),
    }
    return PCACEResult(channels, layer_table, manifest, components_kept, scores)


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


def _add_layer_statistics(layers: pd.DataFrame, channels: pd.DataFrame, extras: _Extras) -> None:
    if layers.empty:
        return
    if "q_value" in channels.columns:
        share = channels.groupby("layer").q_value.apply(share_significant)
        layers["significant_share"] = layers.layer.map(share)
        layers["median_adj"] = layers.layer.map(channels.groupby("layer").pcace_adj.median())
    if extras.stability:
        layers["rank_spearman"] = layers.layer.map(
            {n: s.get("spearman_mean") for n, s in extras.stability.items()})
        layers["top10_retention"] = layers.layer.map(
            {n: s.get("top_retention") for n, s in extras.stability.items()})


def _describe_target(score_fn: Any) -> Any:
    if hasattr(score_fn, "to_dict"):
        return score_fn.to_dict()
    return {"callable": getattr(score_fn, "__name__", type(score_fn).__name__)}


def _check_components(components: int | float) -> None:
    if isinstance(components, bool):
        raise ValueError("components must be an int >= 1 or a fraction in (0, 1)")
    if isinstance(components, (int, np.integer)):
        if components < 1:
            raise ValueError(f"components must be >= 1; got {components}")
    elif isinstance(components, float):
        if not 0.0 < components < 1.0:
            raise ValueError(f"a fractional components must lie in (0, 1); got {components}")
    else:
        raise ValueError(f"components must be an int >= 1 or a fraction in (0, 1); "
                         f"got {components!r}")


def _check_scores(scores: np.ndarray) -> None:
    n = scores.size
    if n < MIN_OBSERVATIONS:
        raise ValueError(f"PCACE needs at least {MIN_OBSERVATIONS} images; got {n}. "
                         "Pass more images (a few hundred is typical)")
    if not np.all(np.isfinite(scores)):
        bad = np.flatnonzero(~np.isfinite(scores))[:10].tolist()
        raise ValueError(f"the score is NaN or inf for images {bad}")
    if np.ptp(scores) <= 1e-12 * max(1.0, float(np.abs(scores).max())):
        raise ValueError(f"the score does not vary across the {n} images (all {scores[0]:.6g}); "
                         "choose another target or images on which the output changes")


@dataclass
class _Extras:
    """What to compute beyond the raw values, and the per-layer results it produced."""

    permutations: int = 0
    bootstrap: int = 0
    level: float = 0.95
    seed: int = 0
    interval: str = "half-sample"
    stability: dict[str, dict] = field(default_factory=dict)


def _score_layers(cap: Any, names: list[str], scores: np.ndarray, components: int | float,
                  score: str, dev: torch.device, memory_budget: int, progress: bool,
                  ace_kwargs: dict, extras: _Extras, pca_dtype: torch.dtype = torch.float32
                  ) -> tuple[list[pd.DataFrame], dict, bool]:
    from tqdm.auto import tqdm

    tables: list[pd.DataFrame] = []
    kept: dict[str, torch.Tensor] = {}
    total_channels = sum(cap.shapes[n][0] for n in names)
    y = torch.as_tensor(scores, dtype=torch.float64)
    bar = tqdm(total=total_channels, desc="scoring channels", unit="ch", disable=not progress)
    interrupted = False
    try:
        for name in names:
            parts, boots, rows = [], [], []
            chunk = _chunk_bytes(cap.shapes[name], len(scores), memory_budget,
                                 cap.spilled[name], pca_dtype)
            for chans, block in cap.blocks(name, chunk):
                row, red_scores, boot = _score_block(name, chans, block, y, scores,
                                                     components, score, dev, ace_kwargs,
                                                     extras, pca_dtype)
                rows.append(row)
                parts.append(red_scores)
                if boot is not None:
                    boots.append(boot)
                bar.update(block.shape[0])
            table = pd.concat(rows, ignore_index=True)
            kept[name] = _pad_cat(parts)
            tables.append(_add_statistics(table, kept[name], scores, np.concatenate(boots)
                                          if boots else None, extras, ace_kwargs, name))
    except KeyboardInterrupt:
        interrupted = True
        warnings.warn(f"interrupted: returning the {len(tables)} layers scored so far",
                      stacklevel=3)
    finally:
        bar.close()
    return tables, kept, interrupted


def _score_block(name: str, chans: slice, block: torch.Tensor, y: torch.Tensor,
                 scores: np.ndarray, components: int | float, score: str, dev: torch.device,
                 ace_kwargs: dict, extras: _Extras, pca_dtype: torch.dtype
                 ) -> tuple[pd.DataFrame, torch.Tensor, np.ndarray | None]:
    """One block of a layer's channels: its table rows, component scores and bootstrap."""
    work = block.to(dev, pca_dtype)  # the store's own memory when it can be
    try:
        red = reduce_block(work, components)
    except NonFiniteMaps as err:
        raise _non_finite_error(name, chans, work, err.channels) from None
    del work
    values = score_components(red.scores, y, score, **ace_kwargs)
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
    if extras.bootstrap:  # the block may now hold standardised maps: each resample is
        # standardised again, which per-column affine changes do not affect
        boot = bootstrap_values(block.transpose(0, 1).cpu(), scores, components,
                                extras.bootstrap, extras.seed, ace_options=ace_kwargs,
                                scheme=interval_scheme(extras.interval))
    return row, red.scores.cpu(), boot


def _non_finite_error(name: str, chans: slice, block: torch.Tensor,
                      channels: list[int]) -> ValueError:
    """The error for NaN/inf in a layer, naming its channels and (first channel's) images."""
    start = chans.start or 0
    images = (~torch.isfinite(block[channels[0]])).any(dim=1).nonzero().flatten().tolist()
    return non_finite_error(name, [start + c for c in channels], images, example=True)


def _chunk_bytes(shape: tuple[int, ...], n: int, memory_budget: int, spilled: bool,
                 dtype: torch.dtype) -> int:
    """Bytes of stored maps per reduce step, so its working memory stays within a quarter budget.

    Per channel the reduce step holds the Gram matrix in the data's precision and in float64
    plus the eigensolver's work (about 28 m^2 bytes, m = min(N, P)); for a spilled layer the
    block read from disk and the next one, read ahead (2 x 4 N P); and a float64 working copy
    (8 N P) when ``dtype`` is float64.
    A layer kept in RAM is reduced in place, in the store's own memory.
    """
    p = int(np.prod(shape[1:]))
    m = min(n, p)
    per_channel = 28 * m * m + (8 * n * p if spilled else 0) + \
        (8 * n * p if dtype == torch.float64 else 0)
    channels = max(1, (memory_budget // 4) // per_channel)
    return channels * 4 * n * p


def _add_statistics(table: pd.DataFrame, z: torch.Tensor, scores: np.ndarray,
                    boot: np.ndarray | None, extras: _Extras, ace_kwargs: dict,
                    name: str) -> pd.DataFrame:
    observed = table.pcace.to_numpy()
    if extras.permutations:
        null = permutation_null(z, scores, extras.permutations, extras.seed,
                                ace_options=ace_kwargs)
        summary = null_summary(observed, null)
        for col in summary.columns:
            if col not in table.columns and col != "channel":
                table[col] = summary[col].to_numpy()
    if boot is not None:
        summary = bootstrap_summary(observed, boot, extras.level, method=extras.interval)
        for col in summary.columns:
            if col not in table.columns and col != "channel":
                table[col] = summary[col].to_numpy()
        extras.stability[name] = layer_stability(observed, boot)
    return table


def _pad_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    k = max(p.shape[-1] for p in parts)
    padded = [torch.nn.functional.pad(p, (0, k - p.shape[-1])) for p in parts]
    return torch.cat(padded)
