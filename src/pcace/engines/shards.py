"""The forward pass and the reduce step over shards of the images, on one process or many.

The reduce step decomposes over images (:mod:`pcace.reduce.moments`): per layer, the pixel
moments of a shard of images merge with those of the other shards into the moments of
all images. :func:`sharded_components` runs it in two passes, each over fixed shards of
the images (consecutive ranges of ``shard_size`` images, in image order):

1. every shard's forward pass accumulates each layer's moments
   (:class:`~pcace.reduce.moments.MomentAccumulator`) and the score of each image; the
   driver merges the shards' moments in shard order and takes each layer's basis
   (:meth:`~pcace.reduce.moments.PixelMoments.basis`);
2. every shard's forward pass again, projecting each layer's maps on its basis; the
   driver concatenates the ``(n, C, k)`` scores in image order and fixes their signs
   (:meth:`~pcace.reduce.basis.PixelBasis.finish`).

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
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..capture.forward import Feed, PassResult, forward_pass
from ..core.progress import progress_bar
from ..inputs.raydata import RayImages, is_ray_dataset
from ..reduce.basis import PixelBasis
from ..reduce.moments import (
    RUN_IMAGES,
    MomentAccumulator,
    basis_of,
    first_run_shift,
    naming_errors,
    scratch_for,
)
from ..reduce.pca import Reduction
from ..reduce.routes import ReducedBlock, Route
from .engine import Engine

__all__ = ["ShardWorker", "ShardedRoute", "aligned_shard_size", "merged_bases", "shard_bounds",
           "shardable", "sharded_components"]


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

    def _pass(self, lo: int, hi: int, feeds: Mapping[str, Feed], scores: bool = False
              ) -> np.ndarray | None:
        """One forward pass over images ``lo .. hi - 1`` with ``feeds`` on the layers."""
        from ..inputs.data import as_batches

        if isinstance(self.data, RayImages):
            batches: Any = self.data.batches(lo, hi, self.batch_size)
        else:
            part = self.data[lo:hi] if isinstance(self.data, torch.Tensor) else \
                torch.utils.data.Subset(self.data, range(lo, hi))
            batches = as_batches(part, self.batch_size)
        done = forward_pass(self.model, batches, feeds, device=self.device,
                            score_fn=self.score_fn if scores else None, progress=False)
        return done.scores

    def shifts(self, lo: int, hi: int, dtype: str = "float64",
               run: int = RUN_IMAGES) -> dict[str, torch.Tensor]:
        """Each layer's reference for the first pass: the mean of images ``lo .. hi - 1``.

        Called on the first ``run`` images (:func:`pcace.reduce.moments.first_run_shift`),
        so every shard's sums are shifted as a one-pass accumulator shifts them.
        """
        outputs: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}

        def keep(name: str) -> Feed:
            return lambda maps, offset: outputs[name].append(maps.float().cpu())

        self._pass(lo, hi, {n: keep(n) for n in self.layers})
        out = {}
        for name, outs in outputs.items():
            c, p = outs[0].shape[1], outs[0][0, 0].numel()
            with naming_errors(name):
                out[name] = first_run_shift(outs, c, p, getattr(torch, dtype), run)
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
        acc: dict[str, MomentAccumulator] = {}
        scratch: dict[str, np.ndarray] = {}

        def gather(name: str) -> Feed:
            def feed(maps: torch.Tensor, offset: int) -> None:
                maps = maps.float().cpu()
                if name not in acc:
                    c, p = maps.shape[1], maps[0, 0].numel()
                    acc[name] = MomentAccumulator(
                        c, p, dtype=compute, run=run,
                        shift=None if shifts is None else shifts[name])
                    scratch[name] = scratch_for(c, p, compute)
                with naming_errors(name):
                    acc[name].add(maps, scratch[name])
            return feed

        scores = self._pass(lo, hi, {n: gather(n) for n in self.layers}, scores=True)
        out = {}
        for name, a in acc.items():
            with naming_errors(name):
                out[name] = a.partial(scratch[name])
        return out, scores if scores is not None else np.zeros(0)

    def project(self, lo: int, hi: int, bases: Mapping[str, PixelBasis]
                ) -> dict[str, torch.Tensor]:
        """Pass 2 over images ``lo .. hi - 1``: each layer's ``(n, C, width)`` scores."""
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}

        def put(name: str) -> Feed:
            return lambda maps, offset: parts[name].append(
                bases[name].project(maps.float().cpu()))

        self._pass(lo, hi, {n: put(n) for n in self.layers})
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
        As for :meth:`pcace.reduce.moments.PixelMoments.basis`.
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
    local = None if remote else ShardWorker(*args, **kwargs)
    n = len(_open_data(data)) if local is None else len(local)
    if n < 2:
        raise ValueError(f"a sharded pass needs at least 2 images; got {n}")
    bounds = shard_bounds(n, shard_size)
    run = _ShardRunner(local, engine, args, kwargs, bounds, progress)
    try:
        return _two_passes(run, bounds, names, components, max_components, pca_dtype,
                           run_images, n, engine)
    finally:
        if remote and hasattr(engine, "forget_shards"):
            engine.forget_shards()  # the next call may bring another model


class _ShardRunner:
    """Runs a :class:`ShardWorker` method over shards, on ``local`` (a worker in this
    process) or, when that is None, on the engine's workers; ``run(method, extra, where)``
    returns the results in shard order (``where``: default every shard)."""

    #: Progress bar label of each pass; the other methods run without a bar.
    LABELS = {"moments": "first pass (moments)", "project": "projection pass"}

    def __init__(self, local: ShardWorker | None, engine: Engine | None, args: tuple,
                 kwargs: dict[str, Any], bounds: list[tuple[int, int]], progress: bool):
        self.local, self.engine, self.args, self.kwargs = local, engine, args, kwargs
        self.bounds, self.progress = bounds, progress

    def __call__(self, method: str, extra: tuple = (),
                 where: list[tuple[int, int]] | None = None) -> list[Any]:
        where = self.bounds if where is None else where
        with progress_bar(total=sum(hi - lo for lo, hi in where),
                          desc=self.LABELS.get(method, method), unit="img",
                          disable=not self.progress or method not in self.LABELS) as bar:
            def done(lo: int, hi: int) -> None:
                bar.update(hi - lo)

            if self.local is None:
                return self.engine.map_shards(  # type: ignore[union-attr]
                    ShardWorker, self.args, self.kwargs, method, where, extra, on_shard=done)
            out = []
            for lo, hi in where:
                out.append(getattr(self.local, method)(lo, hi, *extra))
                done(lo, hi)
            return out


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
    merged: dict[str, MomentAccumulator] = {}
    for sums in parts:  # shard order: the sums' grouping never depends on the workers
        for name, part in sums.items():
            if name not in merged:
                c, p = part["sums"].shape
                merged[name] = MomentAccumulator(int(c), int(p), dtype=pca_dtype, run=1,
                                                 shift=shifts[name])
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


class ShardedRoute(Route):
    """The moments route with both of its passes on an engine's workers, over shards.

    A :class:`~pcace.reduce.routes.Route` whose passes run in :meth:`begin`
    (:func:`sharded_components`); it takes no part in the driver's passes and scores the
    images itself (:attr:`scores`), so a run whose layers all go to the workers runs no
    pass in the driver. The sums equal the one-process pass's (shards aligned on batches
    and ``syrk`` runs, added in shard order).

    Parameters
    ----------
    shapes : dict
        ``{layer: (C, H, W)}``.
    data : Dataset, torch.Tensor or RayImages
        What the workers read (:func:`shardable`).
    batch_size : int
        Images per forward pass on a worker.
    model, target, components, pca_dtype
        As for :func:`sharded_components`.
    engine : Engine
        An engine with workers (:meth:`pcace.engines.ray.RayEngine.map_shards`).
    progress : bool
        Progress bars of the workers' passes.
    """

    name = "moments"

    def __init__(self, shapes: dict[str, tuple[int, int, int]], data: Any, batch_size: int,
                 model: nn.Module, target: Any, components: int | float,
                 pca_dtype: torch.dtype, engine: Engine, progress: bool = False):
        super().__init__(list(shapes))
        self.shapes = dict(shapes)
        self._args = (data, batch_size, model, target, components, pca_dtype)
        self.engine, self.progress = engine, progress
        self._reductions: dict[str, Reduction] | None = None
        self._scores: np.ndarray | None = None
        self.seconds = 0.0

    def begin(self, device: torch.device) -> None:
        if self._reductions is not None:
            return
        data, batch, model, target, components, pca_dtype = self._args
        size = aligned_shard_size(len(data), batch, getattr(self.engine, "slots", lambda: 1)())
        if self.progress:
            print(f"pcace: {len(self.layers)} streamed layer(s) on the {self.engine.name} "
                  f"engine's workers, in shards of {size} images", file=sys.stderr)
        start = time.perf_counter()
        reds, scores = sharded_components(model, data, self.layers, target, components,
                                          shard_size=size, batch_size=batch,
                                          engine=self.engine, pca_dtype=pca_dtype,
                                          progress=self.progress)
        self._reductions = reds
        self._scores = scores[:, None] if scores.ndim == 1 else scores
        self.seconds = time.perf_counter() - start

    def feeds(self) -> dict[str, Feed]:
        return {}

    def end_pass(self, result: PassResult) -> None:
        return None

    @property
    def needs_pass(self) -> bool:
        return False

    @property
    def scores(self) -> np.ndarray | None:
        return self._scores

    def shape(self, name: str) -> tuple[int, int, int]:
        return self.shapes[name]

    def reduce(self, name: str, groups: Sequence[np.ndarray | None], *,
               components: int | float = 3, plan: Any = None,
               pca_dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> Iterator[ReducedBlock]:
        assert self._reductions is not None, "begin() runs the workers' passes first"
        red = self._reductions.pop(name)
        yield ReducedBlock(name, slice(0, self.shapes[name][0]), [red], None)

    def record(self, name: str) -> dict[str, Any]:
        return {"route": "moments", "passes_on": f"{self.engine.name} workers"}
