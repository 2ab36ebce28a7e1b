"""A per-label atlas whose maps do not fit in memory: one label's images at a time.

``pcace.rank(..., per_label=True)`` ranks each label's images on their own (their own
standardisation, PCA and ACE). When the maps of all images fit the memory plan it does so
from one forward pass over the mixed images. When they do not, and the labels can be read
without decoding the images (a Dataset with labels, an ``(images, labels)`` pair, or a
DataLoader reading such a Dataset in order), :func:`rank_in_turn` ranks the labels in
turn, each over its own images only (``label=``), with every route of an ordinary run
(two passes whose memory does not grow with N, the Ray engine's workers): every image
still goes through the network once per pass, and the memory is that of the largest
label's run, not of all images. The result has the one-pass atlas's form (``label`` and
``target`` columns, components keyed ``(layer, label)``); its score matrix holds, for each
image, the scores of the targets its label was ranked against (NaN elsewhere: the other
outputs were not kept).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from ..core.budget import size_text
from ..core.files import safe_name
from ..results.common import CHECKPOINTS

__all__ = ["labels_in_turn", "labels_without_decoding", "maps_bytes", "rank_in_turn"]


def labels_without_decoding(images: Any) -> np.ndarray | None:
    """Every image's label, when it can be read without decoding images; else None.

    Examples
    --------
    >>> x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 0, 1, 2, 2])
    >>> labels_without_decoding((x, y)).tolist()
    [0, 1, 0, 1, 2, 2]
    """
    from torch.utils.data import Dataset, SequentialSampler

    from ..inputs.data import ImageFiles, dataset_labels

    if isinstance(images, tuple) and len(images) == 2 and \
            all(isinstance(t, torch.Tensor | np.ndarray) for t in images):
        return np.asarray(images[1]).reshape(-1)
    if isinstance(images, DataLoader):
        if not isinstance(images.sampler, SequentialSampler):
            return None
        images = images.dataset
    if not isinstance(images, Dataset):
        return None
    cheap = isinstance(images, torch.utils.data.TensorDataset | torch.utils.data.Subset |
                       ImageFiles) or getattr(images, "targets", None) is not None
    if not cheap:
        return None
    labels = dataset_labels(images)
    return None if labels is None else np.asarray(labels).reshape(-1)


def maps_bytes(model: torch.nn.Module, images: Any, layers: list[str], n: int,
               device: torch.device) -> int | None:
    """Bytes of the float32 maps of ``layers`` over ``n`` images (None if unknown)."""
    from ..capture.forward import batch_images
    from ..inputs.data import as_batches
    from ..inputs.layers import describe_layers

    first = next(iter(as_batches(images, 1)), None)
    if first is None:
        return None
    table = describe_layers(model, tuple(batch_images(first).shape[1:]),
                            device=device).set_index("name")
    if not set(layers) <= set(table.index):
        return None
    return int(sum(4 * int(table.out_channels[x]) * int(table.height[x]) *
                   int(table.width[x]) * n for x in layers))


def labels_in_turn(model: torch.nn.Module, images: Any, names: list[str], plan: Any,
                   device: torch.device) -> tuple[np.ndarray, str] | None:
    """For ``per_label``: every image's label and why, when the labels should run in turn.

    They do when the maps of all images exceed the store and the labels can be read
    without decoding the images; else one pass serves them all.
    """
    labels = labels_without_decoding(images)
    if labels is None or labels.size == 0:
        return None
    size = maps_bytes(model, images, names, labels.size, device)
    if size is None or size <= plan.store_bytes:
        return None
    return labels, (f"the maps of all {labels.size} images ({size_text(size)}) exceed the "
                    f"store ({size_text(plan.store_bytes)}): each label's images are ranked "
                    "in turn, with every route of a one-label run")


def rank_in_turn(run_once: Callable[[Any], Any], ctx: Any, labels: np.ndarray,
                 reason: str) -> Any:
    """Rank each label's images in turn and join the runs into one per-label atlas.

    Parameters
    ----------
    run_once : callable
        :func:`pcace.run.pipeline.run_once`: one run over a context's images.
    ctx : pcace.run.pipeline.RunContext
        The per-label run (its options, engine and images); each label's run gets a copy
        with ``label=`` that label, its own class logit as the target (without a target),
        and its checkpoints in ``checkpoint_dir/checkpoints/label-<label>`` (removed with
        the run's own by :func:`pcace.results.checkpoints.remove_checkpoints`); with
        ``resume`` the labels finished before are restored and the interrupted one
        continues.
    labels : numpy.ndarray
        Every image's label (:func:`labels_without_decoding`).
    reason : str
        Why the labels run in turn (recorded in the manifest).
    """
    from ..core.interrupts import Interrupted
    from ..results.checkpoints import start_checkpoints
    from ..results.result import PCACEResult

    start = time.perf_counter()
    opts, images = ctx.options, ctx.images
    if isinstance(images, DataLoader):  # read each label's items only, not every batch
        images, opts = images.dataset, opts.replace(batch_size=images.batch_size or
                                                    opts.batch_size)
    order = list(pd.unique(labels))
    root = opts.checkpoint_dir
    if root is not None:  # marks the directory as a run that --resume continues
        start_checkpoints(root, {"per_label": "in turn", "labels": len(order)})
    runs: list[tuple[Any, Any]] = []
    stopped: BaseException | None = None
    for i, value in enumerate(order):
        if opts.progress:
            count = int(np.sum(labels == value))
            print(f"pcace: label {value} ({i + 1} of {len(order)}, {count} images)",
                  file=sys.stderr)
        where = None if root is None else _label_checkpoints(root, value)
        resume = opts.resume and where is not None and \
            (where / CHECKPOINTS / "state.json").is_file()  # labels not reached start afresh
        mine = opts.replace(target=_own_target(value) if opts.target is None else opts.target,
                            label=value, per_label=False, checkpoint_dir=where, resume=resume)
        sub_ctx = type(ctx).open(ctx.model, images, mine, engine=ctx.engine)
        try:
            sub = run_once(sub_ctx)
        except (KeyboardInterrupt, Interrupted) as err:  # in this label's forward pass
            stopped = err
            break
        runs.append((value, sub))
        if not sub.complete:
            break
    if not runs:  # stopped before any label had a result: nothing to join
        assert stopped is not None
        raise stopped
    out = _joined(PCACEResult, runs, labels, opts.target is None, reason,
                  time.perf_counter() - start)
    if stopped is not None:
        out.manifest.update(complete=False, interrupted=True,
                            interrupt_signal=getattr(stopped, "signum", 2))
    return out


def _label_checkpoints(checkpoint_dir: str | Path, value: Any) -> Path:
    """Where label ``value``'s run checkpoints: inside the run's own checkpoint folder."""
    return Path(checkpoint_dir) / CHECKPOINTS / f"label-{safe_name(str(value))}"


def _own_target(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"per_label without a target scores each label on its own class "
                         f"logit, so labels must be class indices; got {value!r}") from None


def _joined(result_type: Any, runs: list[tuple[Any, Any]], labels: np.ndarray,
            own_class: bool, reason: str, seconds: float) -> Any:
    target_names: list[str] = []
    for _, sub in runs:
        for name in sub.targets:
            if name not in target_names:
                target_names.append(name)
    channels, layers, components = [], [], {}
    scores = np.full((labels.size, len(target_names)), np.nan)
    for value, sub in runs:
        if sub.channels.empty:  # interrupted before its first layer was done
            continue
        ch = sub.channels.copy()
        ly = sub.layers.copy()
        name = sub.targets[0] if sub.targets else ""
        if "target" not in ch.columns:
            ch.insert(min(3, len(ch.columns)), "target", name)
            ly.insert(1, "target", name)
        ch.insert(2, "label", value)
        ly.insert(1, "label", value)
        channels.append(ch)
        layers.append(ly)
        components.update({(layer, value): z for layer, z in sub.components.items()})
        rows = np.flatnonzero(labels == value)
        s = np.asarray(sub.scores, dtype=float).reshape(rows.size, -1)
        for j, t in enumerate(sub.targets or [name]):
            scores[rows, target_names.index(t)] = s[:, j]
    first = runs[0][1].manifest
    manifest = dict(first)
    done = [v for v, sub in runs if sub.complete]
    manifest.update(
        per_label=True, target_labels=target_names,
        target={"kind": "several", "labels": target_names},
        targets=[t for _, sub in runs for t in sub.manifest.get("targets", [])
                 if t is not None][:len(target_names)],
        target_description="each label's own class logit, on that label's images"
        if own_class else first.get("target_description"),
        complete=len(done) == len(runs) and all(sub.complete for _, sub in runs),
        interrupted=not all(sub.complete for _, sub in runs),
        per_label_runs={str(v): {"n_images": int(sub.manifest["data"]["n_images"]),
                                 "routes": sub.manifest.get("routes", {}),
                                 "timings": sub.manifest.get("timings", {}),
                                 "complete": sub.complete} for v, sub in runs},
        per_label_passes={"mode": "in turn", "reason": reason},
    )
    manifest["data"] = {**first.get("data", {}), "label": None,
                        "n_images": int(sum(sub.manifest["data"]["n_images"]
                                            for _, sub in runs)),
                        "labels": {str(v): int(np.sum(labels == v))
                                   for v in pd.unique(labels)},  # every label, also unreached
                        "own_class": own_class}
    manifest["timings"] = {"total": seconds}
    keep = np.isin(labels, [v for v, _ in runs])
    return result_type(pd.concat(channels, ignore_index=True),
                       pd.concat(layers, ignore_index=True), manifest, components,
                       scores[keep], labels[keep])
