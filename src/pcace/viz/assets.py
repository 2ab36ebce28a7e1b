"""Everything the report needs from the model, computed once at rank time and saved.

:func:`collect_assets` runs the model on a few example images (highest, middle and lowest
score) and stores, per ranked layer, the maps of its top and bottom channels, a
PCACE-weighted map per image, the ACE transforms of its top channel and feature
visualisations of its top channels; once per run a CAM (or Grad-CAM) per image. They go
to ``run_dir/assets/`` (``index.json`` and ``arrays.npz``), so a report can be drawn
from the run directory alone, without the model or the data.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.files import atomic_path, atomic_write, safe_name
from ..core.validation import device as resolve_device
from ..inputs.hooks import evaluating, forward_hooks
from ..inputs.targets import output_tensor
from ._common import resize
from .cam import explain, resolve_cam_target
from .evidence import MAX_FEATUREVIS, full_layers, layer_order, report_groups, with_significance
from .featurevis import visualise_channels

ASSET_DIR = "assets"
INDEX_FILE = "index.json"
ARRAYS_FILE = "arrays.npz"
FORMAT = 1
#: Images used as the feature visualisation's reference (mean, spread and range).
REFERENCE_IMAGES = 256


@dataclass
class Assets:
    """The saved example maps, CAMs, ACE transforms and feature visualisations of a run.

    Attributes
    ----------
    index : dict
        What was saved: examples, per-layer channels and values, CAM method, notes.
    arrays : dict of numpy.ndarray
        The arrays named in ``index``.
    path : pathlib.Path, optional
        The folder they were read from or written to.
    """

    index: dict
    arrays: dict[str, np.ndarray] = field(repr=False)
    path: Path | None = None

    @property
    def layers(self) -> list[str]:
        """Layers with saved maps, in network order."""
        return [entry["name"] for entry in self.index["layers"]]

    @property
    def images(self) -> np.ndarray:
        """Example images for display, (E, H, W, C), values in [0, 1]."""
        return self.arrays["images"]

    @property
    def examples(self) -> list[dict]:
        """Per example image: ``index`` into the ranked images, ``score``, ``label``."""
        return self.index["examples"]

    def layer(self, name: str) -> dict:
        """The index entry of one layer (raises ValueError for an unknown layer)."""
        for entry in self.index["layers"]:
            if entry["name"] == name:
                return entry
        raise ValueError(f"no assets for layer {name!r}; layers with assets: {self.layers}")

    def array(self, layer: str, what: str) -> np.ndarray | None:
        """A layer's array: ``"maps"``, ``"weighted"``, ``"ace_theta"``, ``"ace_phi"``,
        ``"ace_z"`` or ``"featurevis"``; None when it was not saved."""
        return self.arrays.get(f"{self.layer(layer)['key']}_{what}")


def load_assets(run_dir: str | Path, part: str | None = None) -> Assets | None:
    """Read ``run_dir/assets`` (or one target's, ``assets/<part>``); None when absent.

    A run with several targets (or one image set per label) keeps each target's assets in
    ``assets/<part>``, ``part`` its page name cleaned for a file name
    (:func:`pcace.core.files.safe_name`).

    Examples
    --------
    >>> from pcace.viz import load_assets
    >>> assets = load_assets("runs/cat")  # doctest: +SKIP
    >>> assets.layers  # doctest: +SKIP
    ['layer1.0.conv1', 'layer3.2.conv2']
    """
    folder = Path(run_dir) / ASSET_DIR
    if part is not None:
        folder = folder / part
    if not (folder / INDEX_FILE).exists() or not (folder / ARRAYS_FILE).exists():
        return None
    index = json.loads((folder / INDEX_FILE).read_text())
    with np.load(folder / ARRAYS_FILE, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return Assets(index, arrays, folder)


def display_images(x: torch.Tensor, mean: Sequence[float] | float | None = None,
                   std: Sequence[float] | float | None = None,
                   value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Preprocessed images (N, C, H, W) back to displayable (N, H, W, C) values in [0, 1].

    With ``mean`` and ``std`` (the normalisation the images went through) each channel is
    mapped back by ``x * std + mean`` and clipped; without them each image is min-max scaled,
    or, given ``value_range`` (low, high), all images are scaled from that range and clipped.

    Examples
    --------
    >>> import torch
    >>> display_images(torch.zeros(1, 3, 2, 2), mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)).max()
    np.float32(0.5)
    """
    t = x.detach().float().cpu()
    if mean is not None and std is not None:
        m = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        out = (t * s + m).clamp(0.0, 1.0)
    elif mean is None and std is None and value_range is not None:
        lo, hi = float(value_range[0]), float(value_range[1])
        out = ((t - lo) / max(hi - lo, 1e-12)).clamp(0.0, 1.0)
    elif mean is None and std is None:
        lo = t.amin(dim=(1, 2, 3), keepdim=True)
        span = t.amax(dim=(1, 2, 3), keepdim=True) - lo
        out = torch.where(span > 0, (t - lo) / span.clamp_min(1e-12), torch.zeros_like(t))
    else:
        raise ValueError("give both mean and std (the input normalisation), or neither")
    return out.permute(0, 2, 3, 1).numpy().astype(np.float32)


def pick_examples(scores: np.ndarray, n: int) -> list[dict]:
    """``n`` images spread over the score's range: highest first, lowest last."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    n = max(1, min(int(n), len(order)))
    positions = np.unique(np.round(np.linspace(0, len(order) - 1, n)).astype(int))
    picked = []
    for p in positions:
        if p == 0:
            label = "highest score"
        elif p == len(order) - 1:
            label = "lowest score"
        elif n == 3 or p == (len(order) - 1) // 2:
            label = "middle score"
        else:
            label = f"score rank {p + 1}/{len(order)}"
        i = int(order[p])
        picked.append({"index": i, "score": float(scores[i]), "label": label})
    return picked


def _layer_channels(table: Any, top: int, bottom: int) -> tuple[list[int], list[int]]:
    """Top channels by PCACE, and the bottom ones among the rest (live before dead)."""
    ranked = table.sort_values(["pcace", "channel"], ascending=[False, True])
    best = ranked.channel.head(top).astype(int).tolist()
    rest = ranked[~ranked.channel.isin(best)]
    if "dead" in rest:
        rest = rest.sort_values(["dead", "pcace"], ascending=[False, False], kind="stable")
    worst = rest.channel.tail(bottom).astype(int).tolist()
    return best, worst


def _capture(model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> tuple[Any, dict]:
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"the model has no modules {missing}; was it the model that was ranked?")
    caught: dict[str, torch.Tensor] = {}
    hooks = {name: (lambda _m, _i, out, name=name: caught.setdefault(name, out.detach()))
             for name in layers}
    with forward_hooks(model, hooks), torch.no_grad():
        out = model(x)
    return out, caught


def _all_scores(model: nn.Module, images: torch.Tensor, score_fn: Any, device: torch.device,
                batch: int = 64) -> np.ndarray:
    parts = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            parts.append(score_fn(model(images[i:i + batch].to(device))).double().cpu())
    return torch.cat(parts).numpy()


def _ace_of(components: Any, channel: int, n_components: Any, scores: np.ndarray) -> dict | None:
    from ..maxcorr.ace import ace

    z = components[channel]
    z = z.detach().double().cpu().numpy() if isinstance(z, torch.Tensor) else np.asarray(z, float)
    if n_components is not None and np.isfinite(n_components):
        z = z[:, : max(1, int(n_components))]
    if z.ndim == 1:
        z = z[:, None]
    if z.shape[0] != len(scores) or not np.ptp(z, axis=0).any():
        return None
    # One small problem: the torch engine (same algorithm, agrees to 1e-8) avoids waking the
    # compiled engine's thread pool, whose spinning threads slow the torch work that follows.
    r = ace(z[None], scores, backend="torch")
    return {"theta": np.asarray(r.theta[0], dtype=np.float32),
            "phi": np.asarray(r.phi[0], dtype=np.float32).reshape(len(scores), -1),
            "z": z.astype(np.float32), "rho": float(r.rho[0])}


def collect_assets(run_dir: str | Path, model: nn.Module, images: torch.Tensor, result: Any, *,
                   mean: Sequence[float] | float | None = None,
                   std: Sequence[float] | float | None = None, n_examples: int = 3, top: int = 4,
                   bottom: int = 4, featurevis: bool = True, featurevis_channels: int = 4,
                   featurevis_steps: int = 96, featurevis_layers: Sequence[str] | None = None,
                   target: Any = None, device: str | torch.device = "auto", seed: int = 0,
                   progress: bool = True) -> Assets | dict[str, Assets]:
    """Compute and save the pictures' raw material to ``run_dir/assets/``.

    Parameters
    ----------
    run_dir : path
        The run directory (created if needed); assets go to its ``assets/`` folder.
    model : torch.nn.Module
        The ranked network; run in eval mode on ``device``, its training flag restored after.
    images : torch.Tensor
        The preprocessed images that were ranked, (N, C, H, W), in the order of ``result.scores``.
    result : PCACEResult
        The run. Its ``components`` (kept by :func:`pcace.rank`, not by :func:`pcace.load`)
        give the ACE transforms, skipped without them.
    mean, std : sequence of float, optional
        The input normalisation (``Normalize(mean, std)``), to show the images as they were;
        without them each image is min-max scaled for display.
    n_examples : int
        Example images, spread from the highest to the lowest score.
    top, bottom : int
        Channels per layer whose maps are kept: highest and lowest PCACE (dead channels
        among the bottom ones only when there are too few live ones).
    featurevis : bool
        Synthesise inputs that maximise the top channels (seconds per layer on a CPU).
    featurevis_channels : int
        Channels per layer to visualise (at most ``top``).
    featurevis_steps : int
        Gradient-ascent steps per layer.
    featurevis_layers : sequence of str, optional
        Layers to visualise; default the three strongest that the report draws in full
        (:func:`pcace.viz.evidence.full_layers`).
    target : Target or callable, optional
        The score, for CAM/Grad-CAM and the consistency check; default: rebuilt from
        ``result.manifest["target"]``.
    device : str or torch.device
        Where the model runs.
    seed : int
        Seeds the feature visualisation.
    progress : bool
        Show a progress bar over the layers on stderr.

    Returns
    -------
    Assets, or dict of str to Assets
        For a run with several targets (or one image set per label), each target's assets,
        by its report page's name: made from that target's own images and score, as a run
        of it alone would get them, and saved in ``assets/<name>``.

    Examples
    --------
    >>> import pcace
    >>> from pcace.viz import collect_assets, write_report
    >>> res = pcace.rank(model, images, target=3)  # doctest: +SKIP
    >>> res.save("runs/three")  # doctest: +SKIP
    >>> collect_assets("runs/three", model, images, res,
    ...                mean=(0.1307,), std=(0.3081,))  # doctest: +SKIP
    >>> write_report("runs/three")  # doctest: +SKIP
    """
    images = _image_tensor(images)
    if len(result.targets) > 1 or "label" in result.channels.columns:
        return _collect_each_target(run_dir, model, images, result, device=device,
                                    mean=mean, std=std, n_examples=n_examples, top=top,
                                    bottom=bottom, featurevis=featurevis,
                                    featurevis_channels=featurevis_channels,
                                    featurevis_steps=featurevis_steps,
                                    featurevis_layers=featurevis_layers, seed=seed,
                                    progress=progress)
    return _collect_one(Path(run_dir) / ASSET_DIR, model, images, result, target=target,
                        device=device, mean=mean, std=std, n_examples=n_examples, top=top,
                        bottom=bottom, featurevis=featurevis,
                        featurevis_channels=featurevis_channels,
                        featurevis_steps=featurevis_steps, featurevis_layers=featurevis_layers,
                        seed=seed, progress=progress)


def _collect_each_target(run_dir: str | Path, model: nn.Module, images: torch.Tensor,
                         result: Any, **options: Any) -> dict[str, Assets]:
    """Each target's assets, from its own images and score, as a run of it alone gets."""
    if result.scores is None:
        raise ValueError("a run with several targets needs its scores to pick each target's "
                         "examples; collect assets from the result pcace.rank returned or a "
                         "saved run (its scores.csv)")
    if len(images) != len(result.scores):
        raise ValueError(f"{len(images)} images given but the run scored {len(result.scores)}; "
                         "pass the same preprocessed images that were ranked, in the same order")
    out = {}
    for target, label, name in report_groups(result):
        sub = result.subset(target=target, label=label)
        rows = slice(None) if label is None or result.labels is None else \
            torch.as_tensor(np.flatnonzero(np.asarray(result.labels) == label))
        out[name] = _collect_one(Path(run_dir) / ASSET_DIR / safe_name(name), model,
                                 images[rows], sub, target=None, **options)
    return out


def _collect_one(folder: Path, model: nn.Module, images: torch.Tensor, result: Any, *,
                 target: Any, device: Any, **options: Any) -> Assets:
    t0 = time.perf_counter()
    dev = resolve_device(device)
    notes: list[str] = []
    spec = target if target is not None else result.manifest.get("target")
    score_fn = resolve_cam_target(spec)
    with evaluating(model, dev):
        arrays, index = _collect(model, images, result, score_fn, spec, notes, dev, **options)
    index.update({"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "seconds": time.perf_counter() - t0, "notes": notes})
    return _save_assets(folder, index, arrays)


def _image_tensor(images: Any) -> torch.Tensor:
    """``images`` as a float tensor (N, C, H, W); raise for any other shape."""
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(np.asarray(images))
    if images.dim() != 4:
        raise ValueError(f"images must be a tensor (N, C, H, W); got shape {tuple(images.shape)}")
    return images.float()


def _save_assets(folder: Path, index: dict, arrays: dict[str, np.ndarray]) -> Assets:
    """Write ``arrays`` and ``index`` to ``folder`` (created if needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    # both files atomically (the old file or the new one, never half of one); a file
    # object, as numpy would add ".npz" to the temporary name
    with atomic_path(folder / ARRAYS_FILE) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    atomic_write(folder / INDEX_FILE, json.dumps(index, indent=2))
    return Assets(index, arrays, folder)


def _collect(model, images, result, score_fn, spec, notes, dev, *, mean, std, n_examples, top,
             bottom, featurevis, featurevis_channels, featurevis_steps, featurevis_layers, seed,
             progress):
    from ..core.progress import progress_bar

    scores, examples = _scores_and_examples(model, images, result.scores, score_fn, dev,
                                            n_examples, notes)
    picked = torch.tensor([e["index"] for e in examples])
    x = images[picked].to(dev)
    channels = with_significance(result.channels)
    layer_names = layer_order(result)
    fv_layers = set(full_layers(result, strongest_first=True)[:MAX_FEATUREVIS]
                    if featurevis_layers is None else featurevis_layers)
    out, maps = _capture(model, x, layer_names)
    if score_fn is not None and not np.isnan(examples[0]["score"]):
        _check_scores(score_fn, out, examples, notes)  # its stacklevel=4 assumes this depth

    arrays: dict[str, np.ndarray] = {"images": display_images(x, mean, std),
                                     "scores": scores.astype(np.float64)}
    size = tuple(images.shape[-2:])
    entries = []
    for i, name in enumerate(progress_bar(layer_names, desc="report assets", unit="layer",
                                          disable=not progress)):
        key = f"L{i}"
        table = channels[channels.layer == name]
        best, worst = _layer_channels(table, top, bottom)
        entry = _add_layer_maps(arrays, key, name, table, maps[name].float(), best, worst, size)
        _add_ace(entry, arrays, key, result, name, table, best, scores, notes)
        if featurevis and best and name in fv_layers and featurevis_channels > 0:
            entry["featurevis"] = _add_featurevis(
                arrays, key, model, name, best[:featurevis_channels], images, dev,
                table.set_index("channel").pcace, mean, std, featurevis_steps, seed)
        entries.append(entry)

    cam = _add_cam(arrays, model, x, score_fn, spec, size, notes)
    index = {"examples": examples, "layers": entries, "cam": cam,
             "image_size": list(size), "image_channels": int(images.shape[1]),
             "display": "x * std + mean, clipped to [0, 1]" if mean is not None
             else "each image min-max scaled to [0, 1]",
             "mean": _jsonable(mean), "std": _jsonable(std),
             "target": spec if isinstance(spec, dict) else None,
             "featurevis_layers": [n for n in layer_names if n in fv_layers]
             if featurevis and featurevis_channels > 0 else None}
    return arrays, index


def _scores_and_examples(model: nn.Module, images: torch.Tensor, scores: Any, score_fn: Any,
                         dev: torch.device, n_examples: int, notes: list[str]
                         ) -> tuple[np.ndarray, list[dict]]:
    """The run's scores (recomputed when not saved, zeros when unknown) and the examples."""
    if scores is None and score_fn is not None:
        scores = _all_scores(model, images, score_fn, dev)
        notes.append("the run has no saved scores; they were recomputed from the model")
    if scores is not None and len(scores) != len(images):
        raise ValueError(f"{len(images)} images given but the run scored {len(scores)}; pass the "
                         "same preprocessed images that were ranked, in the same order")
    if scores is None:
        notes.append("no scores: the examples are the first images, not spread over the score")
        return np.zeros(len(images)), [{"index": i, "score": float("nan"), "label": f"image {i}"}
                                       for i in range(min(n_examples, len(images)))]
    scores = np.asarray(scores, dtype=np.float64)
    return scores, pick_examples(scores, n_examples)


def _add_layer_maps(arrays: dict, key: str, name: str, table: Any, act: torch.Tensor,
                    best: list[int], worst: list[int], size: tuple[int, ...]) -> dict:
    """Store a layer's chosen channel maps and its PCACE-weighted map per example image;
    return the layer's index entry."""
    values = table.set_index("channel").pcace
    chosen = best + worst
    arrays[f"{key}_maps"] = act[:, chosen].cpu().numpy().astype(np.float32)
    weights = torch.zeros(act.shape[1], dtype=act.dtype)
    weights[torch.tensor(values.index.to_numpy(dtype=np.int64))] = \
        torch.tensor(values.to_numpy(dtype=np.float32))
    weights = weights.to(act.device)
    weighted = torch.einsum("c,nchw->nhw", weights, act) / weights.sum().clamp_min(1e-12)
    arrays[f"{key}_weighted"] = resize(weighted.cpu().numpy(), size)
    by_channel = table.set_index("channel")
    return {"name": name, "key": key, "channels": chosen,
            "groups": ["top"] * len(best) + ["bottom"] * len(worst),
            "pcace": [float(values[c]) for c in chosen],
            "ranks": [int(by_channel["rank"][c]) for c in chosen] if "rank" in table else None,
            "dead": [bool(by_channel.dead[c]) for c in chosen] if "dead" in table else None,
            "significant": [bool(by_channel.significant[c]) for c in chosen]
            if "significant" in table else None,
            "n_significant": int(table.significant.sum()) if "significant" in table else None,
            "n_channels": int(act.shape[1]), "map_size": list(act.shape[-2:]),
            "ace": None, "featurevis": None}


def _add_cam(arrays: dict, model: nn.Module, x: torch.Tensor, score_fn: Any, spec: Any,
             size: tuple[int, ...], notes: list[str]) -> dict | None:
    """Store the example images' CAM (or Grad-CAM); return its index entry, None without."""
    explanation = explain(model, x, score_fn) if score_fn is not None else None
    if explanation is None:
        notes.append("no CAM/Grad-CAM: the run's target "
                     f"{json.dumps(spec, default=str)} cannot be rebuilt; pass target=")
        return None
    arrays["cam"] = resize(explanation.maps, size)
    return {"method": explanation.method, "layer": explanation.layer,
            "what": explanation.what, "map_size": list(explanation.maps.shape[-2:])}


def _add_featurevis(arrays: dict, key: str, model: nn.Module, layer: str, channels: list[int],
                    images: torch.Tensor, dev: torch.device, values: Any, mean: Any, std: Any,
                    steps: int, seed: int) -> dict:
    """Synthesise inputs for a layer's top channels; store them, return their index entry."""
    ref = images[:REFERENCE_IMAGES].to(dev)
    fv = visualise_channels(model, layer, channels, ref, steps=steps, seed=seed)
    # without a known normalisation, show them on the real images' value range
    arrays[f"{key}_featurevis"] = display_images(
        fv.inputs, mean, std, value_range=(float(ref.min()), float(ref.max())))
    return {"channels": channels, "pcace": [float(values[c]) for c in channels],
            "excitation": [float(a) for a in fv.excitation],
            "best_image_excitation": [float(a) for a in fv.best_image_excitation],
            "variation": [float(v) for v in fv.variation],
            "reference_images": int(len(ref)), "steps": steps, "seed": seed}


def _jsonable(v: Any) -> Any:
    if v is None:
        return None
    return np.asarray(v, dtype=float).reshape(-1).tolist()


def _check_scores(score_fn: Any, out: Any, examples: list[dict], notes: list[str]) -> None:
    try:
        got = score_fn(output_tensor(out)).double().cpu().numpy()
    except ValueError:
        return
    want = np.array([e["score"] for e in examples])
    if not np.allclose(got, want, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(want).max()))):
        msg = (f"the model's scores on the example images ({np.round(got, 4).tolist()}) differ "
               f"from the run's ({np.round(want, 4).tolist()}): are these the images that were "
               "ranked, in the same order and preprocessing?")
        warnings.warn(msg, stacklevel=4)
        notes.append(msg)


def _add_ace(entry: dict, arrays: dict, key: str, result: Any, name: str, table: Any,
             best: list[int], scores: np.ndarray, notes: list[str]) -> None:
    comps = (result.components or {}).get(name)
    if comps is None or not best or result.scores is None:
        if not notes or "ACE transforms" not in notes[-1]:
            notes.append("ACE transforms not saved: the result holds no principal components "
                         "(collect assets from the result pcace.rank returned, not a loaded one)")
        return
    channel = best[0]
    n_comp = table.set_index("channel").n_components.get(channel) \
        if "n_components" in table else None
    fit = _ace_of(comps, channel, n_comp, scores)
    if fit is None:
        return
    arrays[f"{key}_ace_theta"] = fit["theta"]
    arrays[f"{key}_ace_phi"] = fit["phi"]
    arrays[f"{key}_ace_z"] = fit["z"]
    entry["ace"] = {"channel": channel, "rho": fit["rho"],
                    "pcace": float(table.set_index("channel").pcace[channel])}
