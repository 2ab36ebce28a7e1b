"""The reduce step in two passes over the images: memory that does not grow with N.

For a layer whose maps do not fit the memory plan, :class:`TwoPass` keeps no maps at
all. During the first forward pass (shared with the other routes, :mod:`pcace.reduce.routes`)
its feeds gather each channel's pixel moments: per-pixel minimum,
maximum and sum, and the ``P x P`` cross products, by BLAS ``syrk`` over runs of a few
hundred images shifted by a fixed per-pixel reference (the first run's mean), each run's
products added into float64 (:func:`pcace.reduce.kernels.accumulate_gram`). The moments
give each channel's standardisation and principal axes
(:meth:`pcace.reduce.moments.PixelMoments.basis`); a second forward pass, stopped after the
last streamed layer has run, projects each image onto them
(:meth:`pcace.reduce.basis.PixelBasis.project`). The result per layer is the
:class:`~pcace.reduce.pca.Reduction` that :func:`~pcace.reduce.pca.reduce_block` gives on all
maps at once.

Layers named in ``subspace`` (whose exact reduce would not fit, see
:meth:`pcace.reduce.plan.MemoryPlan.routes`) gather per-pixel statistics and a sketch in the
first pass instead (:class:`~pcace.reduce.subspace.SubspaceIteration`); before the projection
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

import time
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..capture.forward import Feed, PassResult, batch_images, forward_pass, image_sums
from ..core.voice import option
from .basis import PixelBasis
from .moments import RUN_IMAGES, MomentAccumulator, basis_of, naming_errors
from .pca import Reduction
from .routes import ReducedBlock, Route
from .subspace import SubspaceIteration

__all__ = ["StreamedLayer", "TwoPass", "check_repeatable", "check_same_images"]


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


class TwoPass(Route):
    """The streamed reduce of some layers: moments or subspace iteration, then a projection.

    A :class:`~pcace.reduce.routes.Route`: its feeds gather each layer's moments in the
    first pass (the first channel group's, for a layer in ``groups``) or its subspace
    iteration's statistics; further passes gather the next channel groups and iterate the
    subspace layers together (no pass runs for one alone while the other needs one); the
    last pass projects every image onto the bases.

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
    subspace : collection of str
        Layers reduced by subspace iteration instead of moments.
    groups : dict, optional
        ``{layer: g}``: moments gathered in ``g`` channel groups, a pass each.

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

    name = "moments"

    def __init__(self, shapes: dict[str, tuple[int, int, int]], components: int | float = 3,
                 *, pca_dtype: torch.dtype = torch.float32, run_images: int = RUN_IMAGES,
                 subspace: Collection[str] = (), groups: dict[str, int] | None = None):
        super().__init__(list(shapes))
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
        self.stats_bytes = {n: a.nbytes for n, a in self._acc.items()}
        self.stats_bytes.update({n: s.nbytes for n, s in self._sub.items()})
        self.seconds = 0.0
        self.passes = 0
        self.count: int | None = None
        self._bases: dict[str, PixelBasis] = {}
        self._scores: dict[str, torch.Tensor] | None = None  # the projection's, once begun
        self.streamed: dict[str, StreamedLayer] = {}
        self._watch: _Checksums | None = None

    # --- the Route interface -----------------------------------------------------------------

    def feeds(self) -> dict[str, Feed]:
        """The next pass's feeds: moments and statistics, further groups and iterations, or
        the projection."""
        if self._scores is not None:
            return {name: self._projector(name) for name in self._bases}
        out = {name: self._feed(name, acc, len(self._parts[name]))
               for name, acc in self._acc.items()}
        out.update({name: self._subspace_feed(name) for name, sub in self._sub.items()
                    if sub.needs_pass})
        return out

    def end_pass(self, result: PassResult) -> None:
        """After a pass: solve the bases it completed; after the projection, the reductions."""
        self.passes += 1
        if self.count is None:
            self.count = result.images
        if self._scores is not None:
            self._finish_projection()
            return
        active = [sub for sub in self._sub.values() if sub.needs_pass]
        self._bases.update(self.bases())
        for sub in active:
            sub.end_pass()
        for name, parts in self._parts.items():
            self._acc[name] = self._group_accumulator(name, len(parts))
        if not self._acc and not any(s.needs_pass for s in self._sub.values()):
            self._bases.update(self._subspace_bases())
            self._begin_projection()

    @property
    def needs_pass(self) -> bool:
        return not self.streamed and bool(self.shapes)

    def pass_label(self) -> str:
        if self._scores is not None:
            return "projection pass"
        active = sum(s.needs_pass for s in self._sub.values())
        what = [f"next channel group of {len(self._acc)} layer(s)" if self._acc else "",
                f"subspace iteration of {active} layer(s)" if active else ""]
        return f"pass {self.passes + 1}: {' + '.join(w for w in what if w)}"

    def shape(self, name: str) -> tuple[int, int, int]:
        return self.shapes[name]

    def reduce(self, name: str, groups: Sequence[np.ndarray | None], *,
               components: int | float = 3, plan: Any = None,
               pca_dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> Iterator[ReducedBlock]:
        """The layer's reduction, whole (one group of all images); handed over once."""
        if any(rows is not None for rows in groups):
            raise ValueError("a streamed layer is reduced over all images (no groups)")
        layer = self.streamed.pop(name)  # its reduction lives on in the caller only
        yield ReducedBlock(name, slice(0, layer.shape[0]), [layer.reduction], None)

    def record(self, name: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"route": "subspace" if name in self._sub else "moments",
                                 "stats_bytes": int(self.stats_bytes[name])}
        groups = len(self._slices.get(name, [0]))
        if groups > 1:
            entry["channel_groups"] = groups
        basis = self._bases.get(name)
        if basis is not None and basis.route == "subspace":
            entry["passes"] = int(basis.passes) + 1  # and the projection pass
            entry["unconverged_channels"] = int((~basis.converged).sum())
            entry["largest_angle"] = float(basis.angle.max()) if len(basis.angle) else 0.0
        return entry

    # --- on its own: the passes driven here ----------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes the first pass's statistics hold (independent of N)."""
        return sum(self.stats_bytes.values()) + self._scratch.nbytes

    def watch(self, batches: Iterable[Any]) -> Iterable[Any]:
        """Wrap the first pass's batches so that later passes can be checked against it."""
        self._watch = _Checksums(batches)
        return self._watch

    def hooks(self) -> dict[str, Feed]:
        """The first pass's feeds, for a pass run elsewhere (``capture(observers=...)``);
        :meth:`second_pass` then takes over from there."""
        return self.feeds()

    def second_pass(self, model: nn.Module, batches: Iterable[Any], *,
                    device: str | torch.device = "cpu", progress: bool = True,
                    tune_malloc: bool | None = None,
                    on_step: Callable[[], None] | None = None) -> dict[str, StreamedLayer]:
        """After a first pass run elsewhere (its feeds from :meth:`hooks`): the further
        passes and the projection, each stopped after the last layer it needs.

        ``batches`` must yield the images of the first pass, in the same order; they are
        drawn once per further pass.
        """
        start = time.perf_counter()
        first = None if self._watch is None else self._watch.values()
        self.end_pass(PassResult(images=len(first) if first is not None else
                                 _first_count(self), forward_calls=0, seconds=0.0))
        while self.needs_pass:
            desc = self.pass_label()
            result = forward_pass(model, batches, self.feeds(), device=device,
                                  stop_early=True, checksums=True, desc=desc,
                                  progress=progress, on_step=on_step, tune_malloc=tune_malloc)
            check_same_images(first, self.count, result, desc)
            self.end_pass(result)
        self.seconds += time.perf_counter() - start
        return dict(self.streamed)

    # --- inside ------------------------------------------------------------------------------

    def _group_accumulator(self, name: str, group: int) -> MomentAccumulator:
        sl = self._slices[name][group]
        _, h, w = self.shapes[name]
        return MomentAccumulator(sl.stop - sl.start, h * w, dtype=self.dtype,
                                 run=self.run_images)

    def _feed(self, name: str, acc: MomentAccumulator, group: int) -> Feed:
        """Adds a batch's maps of the layer's channel group to ``acc``."""
        sl = self._slices[name][group]
        whole = sl.stop - sl.start == self.shapes[name][0]
        shape = self.shapes[name]

        def feed(maps: torch.Tensor, offset: int) -> None:
            _check_shape(name, maps, shape)
            maps = maps.cpu()
            with naming_errors(name, sl.start):
                acc.add(maps if whole else maps[:, sl], self._scratch)
        return feed

    def _subspace_feed(self, name: str) -> Feed:
        """Adds a batch's maps to the layer's subspace iteration."""
        sub, shape = self._sub[name], self.shapes[name]

        def feed(maps: torch.Tensor, offset: int) -> None:
            _check_shape(name, maps, shape)
            with naming_errors(name):
                sub.add(maps.cpu())
        return feed

    def bases(self) -> dict[str, PixelBasis]:
        """Finish a pass: the bases of the channel groups it gathered (their moments are
        freed); returns those of the layers whose every group is done."""
        for name, acc in self._acc.items():
            with naming_errors(name, self._slices[name][len(self._parts[name])].start):
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

    def _subspace_bases(self) -> dict[str, PixelBasis]:
        out = {name: sub.basis() for name, sub in self._sub.items()}
        for name, basis in out.items():
            stuck = int((~basis.converged).sum())
            if stuck:
                warnings.warn(
                    f"layer {name!r}: {stuck} of {len(basis.converged)} channels did not "
                    f"converge in {basis.passes} subspace-iteration passes (largest estimated "
                    f"principal angle {float(basis.angle.max()):.1e} rad); their components are "
                    f"approximate. A {option('memory_budget', 'BYTES', python='...')} that "
                    "fits the layer's P x P moments gives the exact basis in two passes.",
                    stacklevel=3)
        return out

    def _begin_projection(self) -> None:
        n = next(iter(self._bases.values())).count
        # scores in pca_dtype: with float32 they are rounded to float32 here, as the
        # in-memory route's X V products are (half the memory for N x k per channel)
        self._scores = {name: torch.zeros((self.shapes[name][0], n, b.vectors.shape[2]),
                                          dtype=self.dtype) for name, b in self._bases.items()}

    def _projector(self, name: str) -> Feed:
        basis, out = self._bases[name], self._scores[name]
        n, shape = out.shape[1], self.shapes[name]

        def put(maps: torch.Tensor, lo: int) -> None:
            _check_shape(name, maps, shape)
            if lo + maps.shape[0] > n:
                raise ValueError(mismatch(f"more than {n} images"))
            out[:, lo:lo + maps.shape[0]].copy_(basis.project(maps.cpu()).permute(1, 0, 2))
        return put

    def _finish_projection(self) -> None:
        for name, basis in self._bases.items():
            red = basis.finish(self._scores.pop(name).permute(1, 0, 2))
            self.streamed[name] = StreamedLayer(red, basis, self.stats_bytes[name],
                                                self.shapes[name])


def _first_count(tp: TwoPass) -> int:
    """The images of a first pass run without :meth:`TwoPass.watch`."""
    for acc in tp._acc.values():
        return acc.count + acc.fill
    for sub in tp._sub.values():
        return sub._stats.count
    return 0


class _Checksums:
    """Wraps batches: records each image's pixel sum and the count as they are drawn."""

    def __init__(self, batches: Iterable[Any]):
        self.batches = batches
        self.sums: list[torch.Tensor] = []
        self.n_images = getattr(batches, "n_images", None)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        for i, item in enumerate(self.batches):
            self.sums.append(image_sums(batch_images(item, i)))
            yield item

    def values(self) -> torch.Tensor:
        return torch.cat(self.sums) if self.sums else torch.zeros(0, dtype=torch.float64)


def check_same_images(first: torch.Tensor | None, n: int | None, result: PassResult,
                      what: str) -> None:
    """A later pass must see the first pass's images in its order (count and pixel sums)."""
    if n is not None and result.images != n:
        raise ValueError(mismatch(f"{result.images} images in the {what}, the first {n}"))
    again = result.checksums
    if first is not None and again is not None and first.shape == again.shape and \
            not torch.equal(first, again):
        bad = (first != again).nonzero().flatten()[:5].tolist()
        raise ValueError(mismatch(f"other pixels at image(s) {bad} in the {what}"))


def _channel_slices(channels: int, groups: int) -> list[slice]:
    """``groups`` consecutive, near-equal slices covering ``range(channels)``."""
    size = -(-channels // max(1, groups))
    return [slice(lo, min(channels, lo + size)) for lo in range(0, channels, size)]


def mismatch(what: str) -> str:
    """The message for a later pass that saw other images than the first."""
    return (f"the second pass over the images saw {what}: layers too large to keep in "
            "memory are reduced in two passes, which must see the same images in the same "
            "order (no shuffling, no random transforms); fix the input or pass a "
            "memory_budget large enough to keep every layer in memory")


def _check_shape(name: str, output: Any, shape: Sequence[int]) -> None:
    if tuple(output.shape[1:]) != tuple(shape):
        want = ", ".join(map(str, shape))
        raise ValueError(f"layer {name!r} produced {tuple(output.shape)}; expected (B, {want})")
