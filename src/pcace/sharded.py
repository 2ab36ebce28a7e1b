"""The forward pass and the reduce step over shards of the images, on one process or many.

The reduce step decomposes over images (:mod:`pcace.streaming`): per layer, the pixel
moments of a shard of images merge with those of the other shards into the moments of
all images. :func:`sharded_components` runs it in two passes, each over fixed shards of
the images (consecutive ranges of ``shard_size`` images, in image order):

1. every shard's forward pass accumulates each layer's :class:`~pcace.streaming.PixelMoments`
   and the score of each image; the driver merges the shards' moments in shard order and
   takes each layer's basis (:meth:`~pcace.streaming.PixelMoments.basis`);
2. every shard's forward pass again, projecting each layer's maps on its basis; the
   driver concatenates the ``(n, C, k)`` scores in image order and fixes their signs
   (:meth:`~pcace.streaming.PixelBasis.finish`).

The shards are fixed by ``shard_size``, not by the number of workers, and merged in shard
order, so the result is the same however many workers run them; against the one-process
:func:`~pcace.streaming.streaming_reduce` it differs only by rounding (the moments are
summed in another grouping). A :class:`ShardWorker` holds the model and the dataset; the
local engine runs one in this process, the Ray engine one per CPU slot (or GPU) as an
actor that rebuilds the model from its spec (:attr:`pcace.models.LoadedModel.spec`) and
opens the data from its spec (:func:`pcace.data.describe_data`): a path every node sees.
Only the moments (``8 C P^2`` bytes per layer and shard) and the ``n x k`` scores travel.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .engine import Engine
from .reduce import Reduction
from .streaming import PixelBasis, PixelMoments

__all__ = ["ShardWorker", "shard_bounds", "sharded_components"]


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
        The network, or a :attr:`pcace.models.LoadedModel.spec` to rebuild it from (on a
        worker: the model then never travels).
    data : Dataset, torch.Tensor or dict
        The images (``(N, C, H, W)`` tensor or a Dataset of images or (image, label)
        pairs), or a data spec (:func:`pcace.data.describe_data`) opened with
        :func:`pcace.data.open_dataset` and the model's own preprocessing.
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
    >>> moments["conv1"].count, scores.shape
    (30, (30,))
    """

    def __init__(self, model: nn.Module | Mapping[str, Any], data: Any, layers: Sequence[str],
                 target: Any, *, batch_size: int = 64, device: str = "cpu",
                 categories: Sequence[str] | None = None):
        from .targets import resolve_target

        transform = None
        if isinstance(model, Mapping):
            from .models import load_model

            loaded = load_model(dict(model))
            model, transform = loaded.model, loaded.transform
            categories = categories or loaded.categories
        if isinstance(data, Mapping):
            from .data import open_dataset

            data, _ = open_dataset(dict(data), transform)
        self.model, self.data = model, data
        self.layers = list(layers)
        self.score_fn = resolve_target(target, categories)
        self.batch_size, self.device = int(batch_size), torch.device(device)

    def __len__(self) -> int:
        return len(self.data)

    def _batches(self, lo: int, hi: int) -> Iterator[tuple[dict[str, torch.Tensor], np.ndarray]]:
        """Per batch of images ``lo .. hi - 1``: each layer's output and the scores."""
        from .data import as_batches
        from .hooks import evaluating, forward_hooks

        if isinstance(self.data, torch.Tensor):
            part: Any = self.data[lo:hi]
        else:
            part = torch.utils.data.Subset(self.data, range(lo, hi))
        seen: dict[str, torch.Tensor] = {}

        def keep(name: str) -> Any:
            def hook(module: nn.Module, inputs: Any, output: Any) -> None:
                seen[name] = output.detach()
            return hook

        with evaluating(self.model, self.device), torch.inference_mode(), \
                forward_hooks(self.model, {n: keep(n) for n in self.layers}):
            for images in as_batches(part, self.batch_size):
                seen.clear()
                out = self.model(images.to(self.device))
                scores = torch.as_tensor(self.score_fn(out)).detach().double().cpu().numpy()
                yield {n: seen[n].float() for n in self.layers}, scores.reshape(-1)

    def moments(self, lo: int, hi: int) -> tuple[dict[str, PixelMoments], np.ndarray]:
        """Pass 1 over images ``lo .. hi - 1``: each layer's pixel moments, and the scores."""
        acc: dict[str, PixelMoments] = {}
        scores = []
        for outputs, s in self._batches(lo, hi):
            for name, maps in outputs.items():
                if name not in acc:
                    acc[name] = PixelMoments(maps.shape[1], math.prod(maps.shape[2:]))
                acc[name].update(maps.cpu())
            scores.append(s)
        return acc, np.concatenate(scores) if scores else np.zeros(0)

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
                       batch_size: int = 64, max_components: int = 10,
                       engine: Engine | None = None, device: str = "cpu",
                       categories: Sequence[str] | None = None
                       ) -> tuple[dict[str, Reduction], np.ndarray]:
    """Each layer's principal-component scores from two sharded passes over the images.

    Parameters
    ----------
    model, data, target, categories
        As for :class:`ShardWorker`. With the Ray engine pass specs (dicts): every worker
        rebuilds the model and opens the data itself, so the data's path must be one every
        node sees (a shared file system, or the same copy on each node).
    layers : sequence of str
        Layers to reduce.
    components, max_components
        As for :meth:`pcace.streaming.PixelMoments.basis`.
    shard_size : int, default 1024
        Images per shard: the unit of work of a worker, and of a retry.
    batch_size : int, default 64
        Images per forward pass.
    engine : pcace.engine.Engine, optional
        None or a local engine: one worker in this process. A Ray engine: one actor per
        CPU slot (:meth:`pcace._ray_engine.RayEngine.map_shards`).
    device : str, default "cpu"
        Where each worker runs its forward passes.

    Returns
    -------
    (dict, numpy.ndarray)
        Layer name -> :class:`~pcace.reduce.Reduction` (scores ``(C, N, k)`` float64, in
        image order), and the ``(N,)`` scores.

    Examples
    --------
    >>> import torch
    >>> from pcace.zoo import mnist_cnn
    >>> reds, y = sharded_components(mnist_cnn(), torch.rand(50, 1, 28, 28), ["conv1"], 3,
    ...                              shard_size=20)
    >>> tuple(reds["conv1"].scores.shape), y.shape
    ((32, 50, 3), (50,))
    """
    names = list(layers)
    args = (model, data, names, target)
    kwargs = {"batch_size": batch_size, "device": device, "categories": categories}
    remote = engine is not None and hasattr(engine, "map_shards")
    if remote:
        if not isinstance(model, Mapping) or not isinstance(data, Mapping):
            raise TypeError("on a cluster the workers rebuild the model and open the data "
                            "themselves: pass the model's spec (LoadedModel.spec) and a data "
                            "spec (pcace.data.describe_data) as dicts")
        from .data import open_dataset

        n = len(open_dataset(dict(data))[0])
    else:
        local = ShardWorker(*args, **kwargs)
        n = len(local)
    bounds = shard_bounds(n, shard_size)

    def run(method: str, extra: tuple = ()) -> list[Any]:
        if remote:
            return engine.map_shards(ShardWorker, args, kwargs,  # type: ignore[union-attr]
                                     method, bounds, extra)
        return [getattr(local, method)(lo, hi, *extra) for lo, hi in bounds]

    start = time.perf_counter()
    parts = run("moments")
    merged: dict[str, PixelMoments] = {}
    for moments, _ in parts:  # shard order: the sums' grouping never depends on the workers
        for name, m in moments.items():
            if name not in merged:
                merged[name] = PixelMoments(m.channels, m.pixels)
            merged[name].merge(m)
    scores = np.concatenate([s for _, s in parts])
    bases = {n: merged[n].basis(components, max_components=max_components) for n in names}
    middle = time.perf_counter()
    projected = run("project", (bases,))
    out = {n: bases[n].finish([p[n] for p in projected]) for n in names}
    if engine is not None:
        engine.time_stage("forward_moments", middle - start)
        engine.time_stage("forward_project", time.perf_counter() - middle)
    return out, scores
