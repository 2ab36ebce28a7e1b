"""The forward pass and the reduce step over shards of the images, on one process or many.

The reduce step decomposes over images (:mod:`pcace.reduce.streaming`): per layer, the pixel
moments of a shard of images merge with those of the other shards into the moments of
all images. :func:`sharded_components` runs it in two passes, each over fixed shards of
the images (consecutive ranges of ``shard_size`` images, in image order):

1. every shard's forward pass accumulates each layer's :class:`~pcace.reduce.streaming.PixelMoments`
   and the score of each image; the driver merges the shards' moments in shard order and
   takes each layer's basis (:meth:`~pcace.reduce.streaming.PixelMoments.basis`);
2. every shard's forward pass again, projecting each layer's maps on its basis; the
   driver concatenates the ``(n, C, k)`` scores in image order and fixes their signs
   (:meth:`~pcace.reduce.streaming.PixelBasis.finish`).

The shards are fixed by ``shard_size``, not by the number of workers, and merged in shard
order, so the result is the same however many workers run them; against the one-process
:func:`~pcace.reduce.streaming.streaming_reduce` it differs only by rounding (the moments are
summed in another grouping). A :class:`ShardWorker` holds the model and the dataset; the
local engine runs one in this process, the Ray engine one per CPU slot (or GPU) as an
actor that rebuilds the model from its spec (:attr:`pcace.inputs.models.LoadedModel.spec`) and
opens the data from its spec (:func:`pcace.inputs.data.describe_data`): a path every node sees.
Only the moments (``4 C P (P + 1)`` bytes per layer and shard) and the ``n x k`` scores
travel.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..capture.capture import _batch_scores
from ..inputs.raydata import RayImages, is_ray_dataset
from ..reduce.pca import Reduction
from ..reduce.streaming import PixelBasis
from ..reduce.twopass import (
    RUN_IMAGES,
    _Accumulator,
    _naming,
    _scratch_for,
    basis_of,
    first_run_shift,
)
from .engine import Engine

__all__ = ["ShardWorker", "merged_bases", "shard_bounds", "sharded_components"]


def shard_bounds(n: int, shard_size: int) -> list[tuple[int, int]]:
    """Consecutive ``[lo, hi)`` ranges of at most ``shard_size`` images covering ``n``.

    Examples
    --------
    >>> shard_bounds(10, 4)
    [(0, 4), (4, 8), (8, 10)]
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1; got {shard_size}")
    return [(lo, min(n, lo + shard_size)) for lo in range(0, n, shard_size)]


class ShardWorker:
    """A model and a dataset, ready to run the passes of :func:`sharded_components` on shards.

    Parameters
    ----------
    model : torch.nn.Module or dict
        The network, or a :attr:`pcace.inputs.models.LoadedModel.spec` to rebuild it from (on a
        worker: the model then never travels).
    data : Dataset, torch.Tensor or dict
        The images (``(N, C, H, W)`` tensor or a Dataset of images or (image, label)
        pairs), or a data spec (:func:`pcace.inputs.data.describe_data`) opened with
        :func:`pcace.inputs.data.open_dataset` and the model's own preprocessing.
    layers : sequence of str
        Layers whose outputs are reduced.
    target : int, str or callable
        As for :func:`pcace.rank` (resolved on the worker).
    batch_size : int, default 64
        Images per forward pass.
    device : str, default "cpu"
        Where the forward pass runs.
    categories : sequence of str, optional
        Class names, for a class-name ``target``.

    Examples
    --------
    >>> import torch
    >>> from pcace.zoo import mnist_cnn
    >>> worker = ShardWorker(mnist_cnn(), torch.rand(30, 1, 28, 28), ["conv1"], 3)
    >>> moments, scores = worker.moments(0, 30)
    >>> moments["conv1"]["count"], scores.shape
    (30, (30,))
    """

    def __init__(self, model: nn.Module | Mapping[str, Any], data: Any, layers: Sequence[str],
                 target: Any, *, batch_size: int = 64, device: str = "cpu",
                 categories: Sequence[str] | None = None):
        from ..inputs.targets import TargetSet, resolve_target

        transform = None
        if isinstance(model, Mapping):
            from ..inputs.models import load_model

            loaded = load_model(dict(model))
            model, transform = loaded.model, loaded.transform
            categories = categories or loaded.categories
        if isinstance(data, Mapping):
            from ..inputs.data import open_dataset

            data, _ = open_dataset(dict(data), transform)
        self.model, self.data = model, data
        self.layers = list(layers)
        self.score_fn = target if isinstance(target, TargetSet) else \
            resolve_target(target, categories)
        self.batch_size, self.device = int(batch_size), torch.device(device)

    def __len__(self) -> int:
        return len(self.data)

    def _batches(self, lo: int, hi: int) -> Iterator[tuple[dict[str, torch.Tensor], np.ndarray]]:
        """Per batch of images ``lo .. hi - 1``: each layer's output and the scores."""
        from ..inputs.data import as_batches
        from ..inputs.hooks import evaluating, forward_hooks

        if isinstance(self.data, RayImages):
            part: Any = self.data.batches(lo, hi, self.batch_size)
        elif isinstance(self.data, torch.Tensor):
            part = self.data[lo:hi]
        else:
            part = torch.utils.data.Subset(self.data, range(lo, hi))
        seen: dict[str, torch.Tensor] = {}

        def keep(name: str) -> Any:
            def hook(module: nn.Module, inputs: Any, output: Any) -> None:
                seen[name] = output.detach()
            return hook

        with evaluating(self.model, self.device), torch.inference_mode(), \
                forward_hooks(self.model, {n: keep(n) for n in self.layers}):
            batches = part if isinstance(self.data, RayImages) else \
                as_batches(part, self.batch_size)
            for images in batches:
                if isinstance(images, tuple | list):  # (images, labels) from a Ray Dataset
                    images = images[0]
                seen.clear()
                out = self.model(images.to(self.device))
                scores = _batch_scores(self.score_fn(out), images.shape[0], lo,
                                       getattr(self.score_fn, "returns_matrix", False))
                yield {n: seen[n].float() for n in self.layers}, scores

    def shifts(self, lo: int, hi: int, dtype: str = "float64",
               run: int = RUN_IMAGES) -> dict[str, torch.Tensor]:
        """Each layer's reference for the first pass: the mean of images ``lo .. hi - 1``.

        Called on the first ``run`` images (:func:`pcace.reduce.twopass.first_run_shift`), so every
        shard's sums are shifted as a one-pass :class:`~pcace.reduce.twopass.TwoPass` shifts them.
        """
        outputs: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        for maps, _ in self._batches(lo, hi):
            for name, m in maps.items():
                outputs[name].append(m.cpu())
        out = {}
        for name, outs in outputs.items():
            with _naming(name):
                out[name] = first_run_shift(outs, tuple(outs[0].shape[1:]),
                                            getattr(torch, dtype), run)
        return out

    def moments(self, lo: int, hi: int, shifts: Mapping[str, torch.Tensor] | None = None,
                dtype: str = "float64", run: int = RUN_IMAGES
                ) -> tuple[dict[str, dict[str, Any]], np.ndarray]:
        """Pass 1 over images ``lo .. hi - 1``: each layer's shifted sums, and the scores.

        The sums are gathered in runs of ``run`` images shifted by ``shifts`` (see
        :meth:`shifts`; None: the shard's own first run) in precision ``dtype``;
        :func:`sharded_components` adds the shards'.
        """
        compute = getattr(torch, dtype)
        acc: dict[str, _Accumulator] = {}
        scratch = np.empty(0, np.float32)
        scores = []
        for outputs, s in self._batches(lo, hi):
            for name, maps in outputs.items():
                if name not in acc:
                    shape = tuple(maps.shape[1:])
                    acc[name] = _Accumulator(shape, compute, run,
                                             shift=None if shifts is None else shifts[name])
                    need = _scratch_for(shape, compute)
                    scratch = need if need.size > scratch.size else scratch
                with _naming(name):
                    acc[name].add(maps.cpu(), scratch)
            scores.append(s)
        out = {name: a.partial(scratch) for name, a in acc.items()}
        return out, np.concatenate(scores) if scores else np.zeros(0)

    def project(self, lo: int, hi: int, bases: Mapping[str, PixelBasis]
                ) -> dict[str, torch.Tensor]:
        """Pass 2 over images ``lo .. hi - 1``: each layer's ``(n, C, width)`` scores."""
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        for outputs, _ in self._batches(lo, hi):
            for name, maps in outputs.items():
                parts[name].append(bases[name].project(maps.cpu()))
        return {n: torch.cat(p) for n, p in parts.items()}


def sharded_components(model: nn.Module | Mapping[str, Any], data: Any, layers: Sequence[str],
                       target: Any, components: int | float = 3, *, shard_size: int = 1024,
                       batch_size: int = 64, max_components: int | None = None,
                       engine: Engine | None = None, device: str = "cpu",
                       categories: Sequence[str] | None = None,
                       pca_dtype: torch.dtype = torch.float64, run_images: int = RUN_IMAGES,
                       progress: bool = False) -> tuple[dict[str, Reduction], np.ndarray]:
    """Each layer's principal-component scores from two sharded passes over the images.

    Parameters
    ----------
    model, data, target, categories
        As for :class:`ShardWorker`. On a Ray engine the model and the data travel to
        the workers once, through Ray's object store; pass specs (dicts) instead to have
        every worker rebuild the model and open the data itself (then the data's path
        must be one every node sees: a shared file system, or the same copy on each node).
    layers : sequence of str
        Layers to reduce.
    components, max_components
        As for :meth:`pcace.reduce.streaming.PixelMoments.basis`.
    shard_size : int, default 1024
        Images per shard: the unit of work of a worker, and of a retry. A multiple of
        ``run_images`` and ``batch_size`` gives the one-process pass's sums exactly
        (:class:`pcace.reduce.twopass.TwoPass`, up to the order of float64 additions).
    batch_size : int, default 64
        Images per forward pass.
    engine : pcace.engines.engine.Engine, optional
        None or a local engine: one worker in this process. A Ray engine: one actor per
        CPU slot (:meth:`pcace.engines.ray.RayEngine.map_shards`).
    device : str, default "cpu"
        Where each worker runs its forward passes.
    pca_dtype : torch.dtype, default torch.float64
        Precision of the products, as in :class:`pcace.reduce.twopass.TwoPass`.
    run_images : int
        Images per ``syrk`` update.
    progress : bool
        Show a progress bar per pass on stderr (images per second, ETA).

    Returns
    -------
    (dict, numpy.ndarray)
        Layer name -> :class:`~pcace.reduce.pca.Reduction` (scores ``(C, N, k)`` in
        ``pca_dtype``, in image order), and the scores, ``(N,)`` (or ``(N, T)`` for
        several targets).

    Examples
    --------
    >>> import torch
    >>> from pcace.zoo import mnist_cnn
    >>> reds, y = sharded_components(mnist_cnn(), torch.rand(50, 1, 28, 28), ["conv1"], 3,
    ...                              shard_size=20)
    >>> tuple(reds["conv1"].scores.shape), y.shape
    ((8, 50, 3), (50,))
    """
    names = list(layers)
    args = (model, data, names, target)
    kwargs = {"batch_size": batch_size, "device": device, "categories": categories}
    remote = engine is not None and hasattr(engine, "map_shards")
    if remote:
        n = len(_open_data(data))
    else:
        local = ShardWorker(*args, **kwargs)
        n = len(local)
    if n < 2:
        raise ValueError(f"a sharded pass needs at least 2 images; got {n}")
    bounds = shard_bounds(n, shard_size)

    def run(method: str, extra: tuple = (), where: list[tuple[int, int]] = bounds) -> list[Any]:
        from tqdm.auto import tqdm

        label = {"moments": "first pass (moments)", "project": "projection pass"}
        with tqdm(total=sum(hi - lo for lo, hi in where), desc=label.get(method, method),
                  unit="img", disable=not progress or method not in label) as bar:
            def done(lo: int, hi: int) -> None:
                bar.update(hi - lo)

            if remote:
                return engine.map_shards(ShardWorker, args, kwargs,  # type: ignore[union-attr]
                                         method, where, extra, on_shard=done)
            out = []
            for lo, hi in where:
                out.append(getattr(local, method)(lo, hi, *extra))
                done(lo, hi)
            return out

    try:
        return _two_passes(run, bounds, names, components, max_components, pca_dtype,
                           run_images, n, engine)
    finally:
        if remote and hasattr(engine, "forget_shards"):
            engine.forget_shards()  # the next call may bring another model


def _two_passes(run: Callable[..., list[Any]], bounds: list[tuple[int, int]],
                names: list[str], components: int | float, max_components: int | None,
                pca_dtype: torch.dtype, run_images: int, n: int, engine: Engine | None
                ) -> tuple[dict[str, Reduction], np.ndarray]:
    dtype = str(pca_dtype).replace("torch.", "")
    start = time.perf_counter()
    (shifts,) = run("shifts", (dtype, run_images), [(0, min(n, run_images))])
    parts = run("moments", (shifts, dtype, run_images))
    bases = merged_bases([sums for sums, _ in parts], shifts, components, pca_dtype,
                         max_components)
    scores = np.concatenate([s for _, s in parts])
    middle = time.perf_counter()
    projected = run("project", (bases,))
    # rounded to pca_dtype as the one-process pass stores them
    out = {n: bases[n].finish([p[n].to(pca_dtype) for p in projected]) for n in names}
    if engine is not None:
        engine.time_stage("forward_moments", middle - start)
        engine.time_stage("forward_project", time.perf_counter() - middle)
    return out, scores


def merged_bases(parts: Sequence[Mapping[str, dict[str, Any]]],
                 shifts: Mapping[str, torch.Tensor], components: int | float = 3,
                 pca_dtype: torch.dtype = torch.float64, max_components: int | None = None
                 ) -> dict[str, PixelBasis]:
    """Each layer's basis from the shards' sums (:meth:`ShardWorker.moments`), in order.

    Examples
    --------
    >>> import torch
    >>> from pcace.zoo import mnist_cnn
    >>> worker = ShardWorker(mnist_cnn(), torch.rand(30, 1, 28, 28), ["conv1"], 3)
    >>> shifts = worker.shifts(0, 30)
    >>> parts = [worker.moments(lo, hi, shifts)[0] for lo, hi in [(0, 15), (15, 30)]]
    >>> merged_bases(parts, shifts)["conv1"].count
    30
    """
    merged: dict[str, _Accumulator] = {}
    for sums in parts:  # shard order: the sums' grouping never depends on the workers
        for name, part in sums.items():
            if name not in merged:
                shape = (part["sums"].shape[0], int(part["sums"].shape[1]), 1)
                merged[name] = _Accumulator(shape, pca_dtype, 1, shift=shifts[name])
            merged[name].absorb(part)
    return {n: basis_of(merged.pop(n), components, pca_dtype, max_components)
            for n in list(merged)}


def _open_data(data: Any) -> Any:
    """The dataset a worker will see (a spec is opened here only to count its images)."""
    if isinstance(data, Mapping):
        from ..inputs.data import open_dataset

        return open_dataset(dict(data))[0]
    return data


def shardable(images: Any, batch_size: int, label: Any = None) -> tuple[Any, int] | None:
    """The dataset workers can index, and the images per batch, or None.

    A ``(N, C, H, W)`` tensor, a map-style Dataset, a Ray Dataset (each worker reads its
    own rows), or a DataLoader that reads its dataset in order (sequential sampler,
    default batching and collation) can be split into shards that workers read
    themselves; iterables, shuffling loaders and label filters cannot (their passes run
    on the driver).

    Examples
    --------
    >>> import torch
    >>> shardable(torch.rand(8, 1, 4, 4), 4)[1]
    4
    >>> shardable(iter([torch.rand(2, 1, 4, 4)]), 4) is None
    True
    """
    from torch.utils.data import DataLoader, Dataset, SequentialSampler
    from torch.utils.data.dataloader import default_collate

    if label is not None:
        return None
    if is_ray_dataset(images):
        images = RayImages.of(images)
    if isinstance(images, RayImages):
        return images, int(batch_size)
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return images, int(batch_size)
    if isinstance(images, DataLoader):
        plain = (isinstance(images.sampler, SequentialSampler) and images.batch_size
                 and images.collate_fn is default_collate and not images.drop_last)
        if not plain or not isinstance(images.dataset, Dataset):
            return None
        images, batch_size = images.dataset, int(images.batch_size)
    if isinstance(images, Dataset) and hasattr(images, "__len__"):
        return images, int(batch_size)
    return None


def aligned_shard_size(n: int, batch_size: int, slots: int, run: int = RUN_IMAGES) -> int:
    """Images per shard: whole batches and whole ``syrk`` runs, about 4 shards per slot.

    Shards that start on a batch and a run boundary see the same batches and runs as one
    pass over all images, so their sums add up to that pass's.

    Examples
    --------
    >>> aligned_shard_size(50_000, 256, 2)
    6400
    >>> aligned_shard_size(300, 64, 2)
    1024
    """
    unit = math.lcm(int(batch_size), int(run))
    want = max(1024, math.ceil(n / (4 * max(1, slots))))
    return unit * max(1, math.ceil(want / unit))
