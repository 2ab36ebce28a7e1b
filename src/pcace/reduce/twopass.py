"""The reduce step in two passes over the images: memory that does not grow with N.

For a layer whose maps do not fit the memory plan, :class:`TwoPass` keeps no maps at
all. During the first forward pass (the one :func:`pcace.capture.capture.capture` runs for the
layers kept in memory) its hooks gather each channel's pixel moments: per-pixel minimum,
maximum and sum, and the ``P x P`` cross products, by BLAS ``syrk`` over runs of a few
hundred images shifted by a fixed per-pixel reference (the first run's mean), each run's
products added into float64 (:func:`pcace.reduce.kernels.accumulate_gram`). The moments
give each channel's standardisation and principal axes
(:meth:`pcace.reduce.streaming.PixelMoments.basis`); a second forward pass, stopped after the
last streamed layer has run, projects each image onto them
(:meth:`pcace.reduce.streaming.PixelBasis.project`). The result per layer is the
:class:`~pcace.reduce.pca.Reduction` that :func:`~pcace.reduce.pca.reduce_block` gives on all
maps at once.

Layers named in ``subspace`` (whose exact reduce would not fit, see
:meth:`pcace.core.plan.MemoryPlan.routes`) gather per-pixel statistics and a sketch in the
first pass instead (:class:`~pcace.reduce.streaming.SubspaceIteration`); before the projection
pass, further forward passes, each stopped after the last layer still iterating, refine
their bases until every channel meets the tolerance (or the pass limit, with a warning).

Precision follows ``pca_dtype`` as in the in-memory path: with float32 the products of
one run of images are formed in float32 and summed across runs in float64 (so rounding
accumulates over a few hundred images, not over N); with float64 everything is float64.

Both passes must see the same images in the same order. The image count and a checksum
per image (the float64 sum of its pixels) are compared; a mismatch (a shuffling loader,
random augmentation) is an error. A ``DataLoader`` with a random sampler is refused
before the first pass (:func:`check_repeatable`).

Memory: per streamed layer ``4 C P (P + 1)`` bytes of moments (packed lower triangles in
float64) and a run of ``C M P`` values, plus one shared ``C P^2`` scratch, whatever ``N``;
then the ``(C, N, k)`` scores.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.malloc import kept_heap, tuning_requested
from ..inputs.hooks import evaluating, forward_hooks
from .kernels import packed_size
from .pca import Reduction, _one_blas_thread
from .standardise import NonFiniteMaps
from .streaming import PixelBasis, PixelMoments, SubspaceIteration

__all__ = ["StreamedLayer", "TwoPass", "check_repeatable"]

#: Images per ``syrk`` update of a layer's cross products (fewer when memory is short).
RUN_IMAGES = 256


class _Stop(Exception):
    """Raised by the second pass's last hook: the rest of the network is not needed."""


def check_repeatable(images: Any) -> None:
    """Refuse an input whose second pass would yield other images or another order.

    A ``DataLoader`` whose sampler draws at random (``shuffle=True``) gives each pass a
    new order; the two passes of the streamed reduce need the same one.

    Examples
    --------
    >>> import torch
    >>> from torch.utils.data import DataLoader
    >>> check_repeatable(DataLoader(torch.rand(4, 1, 2, 2), batch_size=2))
    >>> check_repeatable(DataLoader(torch.rand(4, 1, 2, 2), shuffle=True))
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the DataLoader shuffles (RandomSampler), but layers too large to keep ...
    """
    from torch.utils.data import DataLoader, RandomSampler

    if isinstance(images, DataLoader):
        sampler = images.batch_sampler.sampler if images.batch_sampler is not None \
            else images.sampler
        if isinstance(sampler, RandomSampler) or isinstance(images.sampler, RandomSampler):
            raise ValueError(
                "the DataLoader shuffles (RandomSampler), but layers too large to keep in "
                "memory are reduced in two passes over the images, which must come in the "
                "same order: pass shuffle=False, or a larger memory_budget")


@dataclass
class StreamedLayer:
    """One layer reduced in two passes.

    Attributes
    ----------
    reduction : Reduction
        As :func:`~pcace.reduce.pca.reduce_block` returns it for all the images.
    basis : PixelBasis
        The standardisation and axes it came from (without the moments).
    stats_bytes : int
        Bytes the layer's statistics held during the first pass (moments and its run
        of images).
    shape : tuple of int
        ``(C, H, W)``.
    """

    reduction: Reduction
    basis: PixelBasis
    stats_bytes: int
    shape: tuple[int, int, int]


class _Accumulator:
    """One layer's pixel moments, gathered in runs of images with a compiled ``syrk``."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, run: int,
                 shift: torch.Tensor | None = None):
        c, h, w = shape
        p = h * w
        self.shape, self.dtype, self.pixels = shape, dtype, p
        with torch.inference_mode(False):  # normal tensors, also when made inside a pass
            self._allocate(c, p, run, shift)

    def _allocate(self, c: int, p: int, run: int, shift: torch.Tensor | None) -> None:
        dtype = self.dtype
        self.run = torch.empty((c, run, p), dtype=dtype)
        self.fill = 0
        self.count = 0
        self.cross = np.zeros((c, packed_size(p)))  # packed lower triangles, float64
        self.sums = torch.zeros((c, p), dtype=torch.float64)
        self.lo = torch.full((c, p), np.inf, dtype=torch.float64)
        self.hi = torch.full((c, p), -np.inf, dtype=torch.float64)
        # the reference every run is shifted by: the first run's mean, or one given (the
        # shards of a sharded pass all use the first run's, so their sums add up exactly
        # as one pass's would)
        self.shift = None if shift is None else shift.to(dtype).clone()

    @property
    def nbytes(self) -> int:
        return self.cross.nbytes + self.run.numel() * self.run.element_size()

    def add(self, output: torch.Tensor, scratch: np.ndarray) -> None:
        x = output.detach().flatten(2).permute(1, 0, 2)  # (C, B, P) view
        start = 0
        while start < x.shape[1]:
            take = min(x.shape[1] - start, self.run.shape[1] - self.fill)
            self.run[:, self.fill:self.fill + take].copy_(x[:, start:start + take])
            self.fill += take
            start += take
            if self.fill == self.run.shape[1]:
                self.flush(scratch)

    def flush(self, scratch: np.ndarray) -> None:
        if self.fill == 0:
            return
        x = self.run if self.fill == self.run.shape[1] else \
            self.run[:, :self.fill].contiguous()
        if self.shift is None:  # a reference close to the mean: little cancellation later
            self.shift = x.mean(dim=1, dtype=torch.float64).to(x.dtype)
        from .kernels import accumulate_gram, shift_and_summarise

        before = self.sums.clone()
        if not shift_and_summarise(x.numpy(), self.shift.numpy(), self.sums.numpy(),
                                   self.lo.numpy(), self.hi.numpy()):
            from .standardise import NonFiniteMaps

            bad = ~torch.isfinite(self.sums - before)
            raise NonFiniteMaps(bad.any(dim=1).nonzero().flatten().tolist())

        with _one_blas_thread():
            accumulate_gram(x.numpy(), self.cross, scratch)
        self.count += self.fill
        self.fill = 0

    def partial(self, scratch: np.ndarray | None = None) -> dict[str, Any]:
        """The shifted sums gathered so far (flushed first), to add into another accumulator.

        ``scratch``: the one :meth:`add` used (a new one is made when not given).
        """
        self.flush(_scratch_for(self.shape, self.dtype) if scratch is None else scratch)
        return {"count": self.count, "sums": self.sums, "cross": self.cross, "lo": self.lo,
                "hi": self.hi, "shift": self.shift}

    def absorb(self, part: dict[str, Any]) -> None:
        """Add the :meth:`partial` sums of another shard shifted by the same reference."""
        if part["count"] == 0:
            return
        if self.shift is None:
            self.shift = part["shift"]
        elif part["shift"] is None or not torch.equal(part["shift"], self.shift):
            raise ValueError("shards shifted by different references cannot be added")
        self.count += int(part["count"])
        self.sums += part["sums"]
        self.cross += part["cross"]
        torch.minimum(self.lo, part["lo"], out=self.lo)
        torch.maximum(self.hi, part["hi"], out=self.hi)

    def moments(self) -> PixelMoments:
        """The moments, still packed (the accumulator's arrays are handed over)."""
        packed, self.cross = self.cross, np.zeros((0, 0))
        return PixelMoments.from_packed(self.count, self.shift, packed, self.sums, self.lo,
                                        self.hi, torch.finfo(self.dtype).eps)


def _scratch_for(shape: tuple[int, int, int], dtype: torch.dtype) -> np.ndarray:
    """The float32 scratch :func:`pcace.reduce.kernels.accumulate_gram` needs for a layer."""
    c, h, w = shape
    return np.empty(c * (h * w) ** 2, np.float32 if dtype == torch.float32 else np.float64)


def basis_of(acc: _Accumulator, components: int | float, dtype: torch.dtype,
             max_components: int | None = None) -> PixelBasis:
    """A layer's basis from its accumulated moments (the one rule of both routes' passes)."""
    if acc.count < 2:
        raise ValueError(f"a streamed layer saw {acc.count} image(s); PCA needs 2")
    extra = {} if max_components is None else {"max_components": max_components}
    return acc.moments().basis(components, tol=1e-8 if dtype == torch.float32 else 1e-12,
                               **extra)


def first_run_shift(outputs: Iterable[torch.Tensor], shape: tuple[int, int, int],
                    dtype: torch.dtype, run: int = RUN_IMAGES) -> torch.Tensor:
    """The reference a layer's runs are shifted by: the mean of its first ``run`` images.

    ``outputs`` are the layer's batches of maps from the first image on; the value is the
    one a one-pass :class:`TwoPass` takes, so shards shifted by it add up to that pass.
    """
    acc = _Accumulator(shape, dtype, run)
    scratch = _scratch_for(shape, dtype)
    for out in outputs:
        acc.add(out, scratch)
        if acc.shift is not None:
            break
    if acc.shift is None:
        acc.flush(scratch)
    if acc.shift is None:
        raise ValueError("no images: a streamed layer needs at least one")
    return acc.shift


class _Checksums:
    """Wraps batches: records each image's pixel sum and the count as they are drawn."""

    def __init__(self, batches: Iterable[Any]):
        self.batches = batches
        self.sums: list[torch.Tensor] = []
        self.n_images = getattr(batches, "n_images", None)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        for item in self.batches:
            self.sums.append(_image_sums(item))
            yield item

    def values(self) -> torch.Tensor:
        return torch.cat(self.sums) if self.sums else torch.zeros(0, dtype=torch.float64)


def _images_of(item: Any) -> torch.Tensor:
    if isinstance(item, tuple | list) and item:
        item = item[0]
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(item)
    return item


def _image_sums(item: Any) -> torch.Tensor:
    images = _images_of(item)
    if not isinstance(images, torch.Tensor) or images.ndim < 2:
        return torch.zeros(0, dtype=torch.float64)
    return images.detach().flatten(1).sum(1, dtype=torch.float64).cpu()


class TwoPass:
    """The streamed reduce of some layers: hooks for the first pass, then a second pass.

    Parameters
    ----------
    shapes : dict
        ``{layer: (C, H, W)}`` of the streamed layers.
    components : int or float
        As for :func:`pcace.rank`.
    pca_dtype : torch.dtype
        Precision of the products (see the module notes).
    run_images : int
        Images per ``syrk`` update.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from pcace.capture.capture import capture
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 2))
    >>> images = torch.rand(30, 1, 8, 8)
    >>> tp = TwoPass({"0": (4, 6, 6)}, 2)
    >>> batches = tp.watch(images.split(8))
    >>> with capture(net, batches, [], lambda out: out[:, 0], progress=False,
    ...              observers=tp.hooks()) as cap:
    ...     done = tp.second_pass(net, images.split(8), progress=False)
    >>> tuple(done["0"].reduction.scores.shape)
    (4, 30, 2)
    """

    def __init__(self, shapes: dict[str, tuple[int, int, int]], components: int | float = 3,
                 *, pca_dtype: torch.dtype = torch.float32, run_images: int = RUN_IMAGES,
                 subspace: Collection[str] = (), groups: dict[str, int] | None = None):
        self.shapes = dict(shapes)
        self.components = components
        self.dtype = pca_dtype
        self.run_images = max(1, run_images)
        unknown = sorted((set(subspace) | set(groups or {})) - set(shapes))
        if unknown:
            raise ValueError(f"layer(s) {unknown} are not among the shapes")
        self._sub = {n: SubspaceIteration(s[0], s[1] * s[2], components)
                     for n, s in shapes.items() if n in set(subspace)}
        # each moments layer's channel groups, one pass each (one group: all channels)
        self._slices = {n: _channel_slices(s[0], (groups or {}).get(n, 1))
                        for n, s in shapes.items() if n not in self._sub}
        self._parts: dict[str, list[PixelBasis]] = {n: [] for n in self._slices}
        self._acc = {n: self._group_accumulator(n, 0) for n in self._slices}
        widest = max((sl.stop - sl.start) * (h * w) ** 2 for n, (_, h, w) in shapes.items()
                     if n in self._slices for sl in self._slices[n]) if self._slices else 0
        self._scratch = np.empty(widest, np.float32 if pca_dtype == torch.float32 else
                                 np.float64)
        self._order: list[str] = []  # the order the layers ran in, from the first batch
        self._seen: set[str] = set()
        self._watch: _Checksums | None = None
        self.stats_bytes = {n: a.nbytes for n, a in self._acc.items()}
        self.stats_bytes.update({n: s.nbytes for n, s in self._sub.items()})
        self.seconds = 0.0

    def _group_accumulator(self, name: str, group: int) -> _Accumulator:
        sl = self._slices[name][group]
        _, h, w = self.shapes[name]
        return _Accumulator((sl.stop - sl.start, h, w), self.dtype, self.run_images)

    def _feed(self, name: str, acc: _Accumulator, group: int) -> Callable[[torch.Tensor], None]:
        """Adds a batch's maps of the layer's channel group to ``acc``."""
        sl = self._slices[name][group]
        whole = sl.stop - sl.start == self.shapes[name][0]

        def feed(maps: torch.Tensor) -> None:
            with _naming(name, sl.start):
                acc.add(maps if whole else maps[:, sl], self._scratch)
        return feed

    def _subspace_feed(self, name: str) -> Callable[[torch.Tensor], None]:
        """Adds a batch's maps to the layer's subspace iteration."""
        sub = self._sub[name]

        def feed(maps: torch.Tensor) -> None:
            with _naming(name):
                sub.add(maps)
        return feed

    @property
    def nbytes(self) -> int:
        """Bytes the first pass's statistics hold (independent of N)."""
        return sum(self.stats_bytes.values()) + self._scratch.nbytes

    def watch(self, batches: Iterable[Any]) -> Iterable[Any]:
        """Wrap the first pass's batches so that the second pass can be checked against it."""
        self._watch = _Checksums(batches)
        return self._watch

    def hooks(self) -> dict[str, Callable]:
        """Forward hooks for the first pass (pass them to ``capture(observers=...)``)."""
        def make(name: str) -> Callable:
            feed = self._subspace_feed(name) if name in self._sub else \
                self._feed(name, self._acc[name], 0)

            def hook(module: nn.Module, inputs: Any, output: Any) -> None:
                if name not in self._seen:
                    self._seen.add(name)
                    self._order.append(name)
                _check_shape(name, output, self.shapes[name])
                feed(output.detach().cpu())
            return hook
        return {name: make(name) for name in self.shapes}

    def bases(self) -> dict[str, PixelBasis]:
        """Finish a pass: the bases of the channel groups it gathered (their moments are
        freed); returns those of the layers whose every group is done.

        Subspace layers and further channel groups need more passes (:meth:`second_pass`
        runs them).
        """
        for name, acc in self._acc.items():
            with _naming(name, self._slices[name][len(self._parts[name])].start):
                acc.flush(self._scratch)
            acc.run = torch.empty(0, dtype=acc.dtype)  # the runs go before the bases are solved
            if acc.count < 2:
                raise ValueError(f"layer {name!r} saw {acc.count} image(s); PCA needs 2")
        if all(len(p) + 1 >= len(self._slices[n]) for n, p in self._parts.items()):
            self._scratch = np.empty(0, np.float32)  # no group left to gather
        out = {}
        for name in list(self._acc):  # each group's moments go as soon as its basis is there
            self._parts[name].append(basis_of(self._acc.pop(name), self.components,
                                              self.dtype))
            if len(self._parts[name]) == len(self._slices[name]):
                out[name] = PixelBasis.concat(self._parts.pop(name))
        return out

    def second_pass(self, model: nn.Module, batches: Iterable[Any], *,
                    device: str | torch.device = "cpu", progress: bool = True,
                    tune_malloc: bool | None = None,
                    on_step: Callable[[], None] | None = None) -> dict[str, StreamedLayer]:
        """Project every image onto the bases; the forward pass stops after the last layer.

        ``batches`` must yield the images of the first pass, in the same order; they are
        drawn once more per subspace-iteration pass when some layers take that route
        (each such pass stops after the last layer still iterating).
        """
        start = time.perf_counter()
        run = {"model": model, "batches": batches, "device": torch.device(device),
               "progress": progress, "tune_malloc": tune_malloc, "on_step": on_step}
        bases = self.bases()
        bases.update(self._more_passes(run))
        n = next(iter(bases.values())).count
        width = {name: b.vectors.shape[2] for name, b in bases.items()}
        # scores in pca_dtype: with float32 they are rounded to float32 here, as the
        # in-memory route's X V products are (half the memory for N x k per channel)
        scores = {name: torch.zeros((self.shapes[name][0], n, width[name]), dtype=self.dtype)
                  for name in bases}

        def projector(name: str) -> Callable[[torch.Tensor, int], None]:
            basis, out = bases[name], scores[name]

            def put(maps: torch.Tensor, lo: int) -> None:
                if lo + maps.shape[0] > n:
                    raise ValueError(_mismatch(f"more than {n} images"))
                out[:, lo:lo + maps.shape[0]].copy_(basis.project(maps).permute(1, 0, 2))
            return put

        self._pass(run, {name: projector(name) for name in bases}, "projection pass", n)
        out = {}
        for name, basis in bases.items():
            red = basis.finish(scores.pop(name).permute(1, 0, 2))
            out[name] = StreamedLayer(red, basis, self.stats_bytes[name], self.shapes[name])
        self.seconds += time.perf_counter() - start
        return out

    def _more_passes(self, run: dict[str, Any]) -> dict[str, PixelBasis]:
        """The passes after the first, before the projection: the moments layers' further
        channel groups and the subspace layers' iterations, both in the same passes, until
        every group is gathered and every subspace layer has converged (or its limit)."""
        for sub in self._sub.values():
            sub.end_pass()
        n = self._watch.values().numel() if self._watch is not None else None
        out: dict[str, PixelBasis] = {}
        number = 1
        while True:
            feed: dict[str, Callable[[torch.Tensor, int], None]] = {}
            for name, parts in self._parts.items():
                acc = self._acc[name] = self._group_accumulator(name, len(parts))
                add = self._feed(name, acc, len(parts))
                feed[name] = lambda maps, lo, add=add: add(maps)
            active = {name: sub for name, sub in self._sub.items() if sub.needs_pass}
            for name in active:
                add = self._subspace_feed(name)
                feed[name] = lambda maps, lo, add=add: add(maps)
            if not feed:
                break
            number += 1
            if n is None:
                n = next(iter(active.values())).count if active else \
                    self._parts[next(iter(self._parts))][0].count
            what = [f"next channel group of {len(self._parts)} layer(s)" if self._parts else "",
                    f"subspace iteration of {len(active)} layer(s)" if active else ""]
            self._pass(run, feed, f"pass {number}: {' + '.join(w for w in what if w)}", n)
            out.update(self.bases())
            for sub in active.values():
                sub.end_pass()
        subspace = {name: sub.basis() for name, sub in self._sub.items()}
        for name, basis in subspace.items():
            stuck = int((~basis.converged).sum())
            if stuck:
                warnings.warn(
                    f"layer {name!r}: {stuck} of {len(basis.converged)} channels did not "
                    f"converge in {basis.passes} subspace-iteration passes (largest estimated "
                    f"principal angle {float(basis.angle.max()):.1e} rad); their components are "
                    "approximate. A memory_budget that fits the layer's P x P moments gives "
                    "the exact basis in two passes.", stacklevel=2)
        return {**out, **subspace}

    def _pass(self, run: dict[str, Any], work: dict[str, Callable[[torch.Tensor, int], None]],
              desc: str, n: int) -> None:
        """One more forward pass over the images: each layer in ``work`` gets its maps and
        the index of the batch's first image; the pass stops once they all ran. The images
        are checked against the first pass's (count and per-image sums)."""
        from tqdm.auto import tqdm

        batches, dev, on_step = run["batches"], run["device"], run["on_step"]
        state: dict[str, Any] = {"offset": 0, "seen": set()}
        hooked = [name for name in self._order if name in work]
        last = hooked[-1] if hooked else None

        def make(name: str) -> Callable:
            feed = work[name]

            def hook(module: nn.Module, inputs: Any, output: Any) -> None:
                feed(output.detach().cpu(), state["offset"])
                state["seen"].add(name)
                if name == last and len(state["seen"]) == len(work):
                    raise _Stop
            return hook

        sums = []
        bar = tqdm(batches, total=_length(batches), desc=desc, unit="batch", file=sys.stderr,
                   disable=not run["progress"])
        model = run["model"]
        try:
            with evaluating(model, dev), forward_hooks(model, {k: make(k) for k in work}), \
                    torch.inference_mode(), kept_heap(tuning_requested(run["tune_malloc"])):
                for item in bar:
                    images = _images_of(item)
                    if images.shape[0] == 0:
                        continue
                    sums.append(_image_sums(item))
                    state["seen"] = set()
                    try:
                        model(images.to(dev))
                    except _Stop:
                        pass
                    if len(state["seen"]) != len(work):
                        missing = sorted(set(work) - state["seen"])
                        raise ValueError(f"layer(s) {missing} did not run in the {desc}")
                    state["offset"] += images.shape[0]
                    if on_step is not None:
                        on_step()
        finally:
            bar.close()
        if state["offset"] != n:
            raise ValueError(_mismatch(f"{state['offset']} images, the first {n}"))
        if self._watch is not None:
            first = self._watch.values()
            again = torch.cat(sums) if sums else torch.zeros(0, dtype=torch.float64)
            if first.shape == again.shape and not torch.equal(first, again):
                bad = (first != again).nonzero().flatten()[:5].tolist()
                raise ValueError(_mismatch(f"other pixels at image(s) {bad}"))


@contextmanager
def _naming(layer: str, first_channel: int = 0) -> Iterator[None]:
    """Turn a channel group's NaN/inf error into one that names the layer and its channels."""
    try:
        yield
    except NonFiniteMaps as err:
        channels = [first_channel + c for c in err.channels]
        raise ValueError(f"layer {layer!r} produced NaN or inf in channel(s) {channels[:10]}"
                         f"{' and more' if len(channels) > 10 else ''}. Check the images, the "
                         "weights, or overflow (e.g. half precision)") from None


def _channel_slices(channels: int, groups: int) -> list[slice]:
    """``groups`` consecutive, near-equal slices covering ``range(channels)``."""
    size = -(-channels // max(1, groups))
    return [slice(lo, min(channels, lo + size)) for lo in range(0, channels, size)]


def _mismatch(what: str) -> str:
    return (f"the second pass over the images saw {what}: layers too large to keep in "
            "memory are reduced in two passes, which must see the same images in the same "
            "order (no shuffling, no random transforms); fix the input or pass a "
            "memory_budget large enough to keep every layer in memory")


def _check_shape(name: str, output: Any, shape: Sequence[int]) -> None:
    if not isinstance(output, torch.Tensor) or output.ndim != 4 or \
            tuple(output.shape[1:]) != tuple(shape):
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        want = ", ".join(map(str, shape))
        raise ValueError(f"layer {name!r} produced {got}; expected (B, {want})")


def _length(batches: Any) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None
