"""One memory plan for a run: who may hold how many bytes, in channels and problems.

A run's RAM budget (``memory_budget``) is split once, here, and every stage sizes its work
from the plan in the units it works in:

- the activation store holds captured maps in three quarters of the budget
  (:attr:`MemoryPlan.store_bytes`); layers past it spill to disk;
- the reduce step's working memory (Gram matrices, eigen work, spilled blocks read back
  and the next one read ahead, float64 copies) and the statistics' batched ACE calls and
  resampled maps share the last quarter (:attr:`MemoryPlan.work_bytes`), one stage at a time.

Stages take counts (channels per block, problems per ACE call, replicates per PCA call),
never bytes: the plan is the only place that converts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..core.budget import (
    BYTES_PER_VALUE,
    PREFERRED_BUDGET,
    default_memory_budget,
    resolve_budget,
    size_text,
)
from ..core.validation import components as check_components
from .batches import CHUNK_BYTES
from .moments import BASIS_CHUNK_BYTES
from .sampled import EXTRA
from .sampled import sample_size as recommended_sample_size
from .subspace import OVERSAMPLE

#: Routes whose layers keep no maps: their statistics come from passes over the images.
STREAMED = ("moments", "subspace", "sample")

#: What ``basis`` may ask for: a sampled basis refined over all images where the images
#: outnumber the sample (``"sample"``), or the exact PCA on every route (``"exact"``).
BASES = ("sample", "exact")

#: ``sample_size`` by default: :func:`resolve_sample_size` picks it per run.
SAMPLE_SIZE = "auto"

#: Channel groups (one forward pass each) a layer's moments may be split into when they do
#: not fit the work share at once; past it the layer's maps are stored (spilled) instead.
MAX_GROUPS = 8


__all__ = ["MAX_GROUPS", "STREAMED", "LayerRoute", "MemoryPlan", "RouteChoice", "choose_route",
           "moments_bytes", "subspace_bytes"]


def moments_bytes(channels: int, pixels: int, *, run_images: int = 256,
                  packed: bool = True) -> int:
    """Bytes a layer's moments hold during a pass (:class:`~pcace.reduce.moments.
    MomentAccumulator`): the cross products (packed float64 triangles, or full float64
    matrices) and a run of ``run_images`` float32 images.

    Examples
    --------
    >>> moments_bytes(16, 1024) / 2**20  # 16 maps of 32 x 32
    80.0625
    """
    c, p = int(channels), int(pixels)
    cross = 4 * c * p * (p + 1) if packed else 8 * c * p * p
    return cross + BYTES_PER_VALUE * c * p * run_images


def subspace_bytes(channels: int, pixels: int, components: int | float = 3,
                   oversample: int = OVERSAMPLE, max_components: int = 10,
                   batch_images: int = 256) -> int:
    """Bytes a layer's block subspace iteration holds
    (:class:`~pcace.reduce.subspace.SubspaceIteration`).

    Four ``(C, P, q + oversample)`` float64 blocks and five per-pixel statistics, plus
    one float64 copy of a batch's maps (``batch_images`` images, in chunks of at most
    :data:`pcace.reduce.batches.CHUNK_BYTES`; 0 for the bytes held between passes).

    Examples
    --------
    >>> round(subspace_bytes(64, 112 * 112) / 2**20)  # MiB for 64 maps of 112 x 112
    658
    """
    q = int(components) if isinstance(components, int) else max_components
    block = min(q + oversample, pixels)
    return 8 * channels * pixels * (4 * block + 5) + min(CHUNK_BYTES,
                                                         8 * channels * pixels * batch_images)


@dataclass(frozen=True)
class MemoryPlan:
    """How a run's RAM budget is shared between the store and the work on it.

    Parameters
    ----------
    budget : int
        Bytes of RAM for activations and the work on them (the forward pass's own memory
        and the model come on top).
    ceiling : int
        Bytes the run may widen ``budget`` to where ``budget`` would spill or take extra
        passes (``memory_budget="auto"``; 0: ``budget`` is fixed).

    Examples
    --------
    >>> plan = MemoryPlan(2**30)
    >>> plan.store_bytes + plan.work_bytes == 2**30
    True
    >>> plan.channels_per_block((64, 8, 8), 300, spilled=False)
    64
    """

    budget: int
    ceiling: int = 0

    @classmethod
    def from_budget(cls, memory_budget: Any) -> MemoryPlan:
        """A plan for ``memory_budget``: bytes (fixed), or ``"auto"``.

        ``"auto"`` plans in :data:`PREFERRED_BUDGET` and may widen to
        :func:`default_memory_budget` (a quarter of the machine) where that would spill.

        Examples
        --------
        >>> MemoryPlan.from_budget(2**31)
        MemoryPlan(budget=2147483648, ceiling=0)
        >>> MemoryPlan.from_budget("auto").budget <= PREFERRED_BUDGET
        True
        """
        if isinstance(memory_budget, str) and memory_budget == "auto":
            machine = default_memory_budget()
            if machine > PREFERRED_BUDGET:
                return cls(PREFERRED_BUDGET, ceiling=machine)
            return cls(machine)
        return cls(resolve_budget(memory_budget))

    def widened(self) -> MemoryPlan:
        """The plan at its ceiling (itself when it has none).

        Examples
        --------
        >>> MemoryPlan(2**30, ceiling=2**32).widened()
        MemoryPlan(budget=4294967296, ceiling=0)
        """
        return MemoryPlan(self.ceiling) if self.ceiling > self.budget else self

    def plan_routes(self, shapes: dict[str, tuple[int, ...]], n: int | None,
                    **kwargs: Any) -> tuple[MemoryPlan, dict[str, LayerRoute]]:
        """The routes of :meth:`routes`, and the plan they run in.

        A plan with a ceiling (``memory_budget="auto"``) keeps its budget when every layer
        runs in it at its cheapest: kept in the store, or streamed in one group of
        channels. If a layer would spill to disk, split its moments into channel groups or
        take the subspace route, the plan widens to its ceiling (and routes again there).
        ``kwargs`` go to :meth:`routes`.

        Examples
        --------
        A 16 x 32 x 32 layer over 50,000 images streams within 1 GiB; a ResNet-18 conv1
        over 300 images would spill there, so the plan widens:

        >>> plan = MemoryPlan(2**30, ceiling=8 * 2**30)
        >>> used, routes = plan.plan_routes({"a": (16, 32, 32)}, 50_000)
        >>> used.budget == 2**30, routes["a"].route
        (True, 'moments')
        >>> used, routes = plan.plan_routes({"conv1": (64, 112, 112)}, 300)
        >>> used.budget == 8 * 2**30, routes["conv1"].route
        (True, 'in-memory')
        """
        routes = self.routes(shapes, n, **kwargs)
        if self.ceiling > self.budget and not self.fits(routes):
            wide = self.widened()
            return wide, wide.routes(shapes, n, **kwargs)
        return self, routes

    def fits(self, routes: dict[str, LayerRoute]) -> bool:
        """Whether ``routes`` run in this plan at their cheapest.

        Nothing spilled (the kept layers' maps fit the store beside the streamed layers'
        statistics), no moments in channel groups and no subspace iteration.

        Examples
        --------
        >>> plan = MemoryPlan(2**30)
        >>> plan.fits(plan.routes({"a": (16, 32, 32)}, 50_000))
        True
        >>> plan.fits(plan.routes({"a": (64, 112, 112)}, 300))
        False
        """
        kept = sum(r.stats_bytes for r in routes.values() if r.route not in STREAMED)
        return (kept + self.streamed_bytes(routes) <= self.store_bytes
                and all(r.route != "subspace" and r.groups == 1 for r in routes.values()))

    @property
    def store_bytes(self) -> int:
        """Bytes of captured activations held in RAM."""
        return self.budget - self.work_bytes

    @property
    def work_bytes(self) -> int:
        """Bytes for one stage's working memory: the reduce step, or a batch of statistics."""
        return self.budget // 4

    def channels_per_block(self, shape: tuple[int, ...], n: int, spilled: bool,
                           float64: bool = False) -> int:
        """Channels of a ``(C, H, W)`` layer over ``n`` images that one reduce step takes.

        Per channel the reduce step holds the Gram matrix in the data's precision and in
        float64 plus the eigensolver's work (about 28 m^2 bytes, m = min(N, P)); for a
        spilled layer the block read from disk and the next one, read ahead
        (2 x 4 N P bytes); and a float64 working copy (8 N P) when ``float64``. A layer
        held in RAM is reduced in place, in the store's own memory. At least one channel.
        """
        p = int(np.prod(shape[1:]))
        m = min(n, p)
        per_channel = 28 * m * m + (2 * BYTES_PER_VALUE * n * p if spilled else 0) + \
            (8 * n * p if float64 else 0)
        return int(min(shape[0], max(1, self.work_bytes // per_channel)))

    def ace_problems(self, n: int, k: int) -> int:
        """ACE problems of ``n`` observations and ``k`` predictors per batched call.

        Each holds its inputs and outputs in float64 (x, y, theta, phi: ``(2k + 2) n``
        values) and the engine's sorted copies and smoother work (as much again).
        """
        per_problem = 2 * (2 * k + 2) * n * 8
        return max(1, self.work_bytes // per_problem)

    def replicates_per_call(self, n: int, channels: int, pixels: int) -> int:
        """Bootstrap replicates of ``channels`` maps of ``n`` images stacked in one PCA call.

        A replicate's resampled maps in float64 plus the reduce step's Gram work.
        """
        m = min(n, pixels)
        per_replicate = channels * (8 * n * pixels + 28 * m * m)
        return max(1, self.work_bytes // max(1, per_replicate))

    def routes(self, shapes: dict[str, tuple[int, ...]], n: int | None,
               run_images: int = 256, components: int | float = 3,
               batch_images: int = 256, basis: str = "exact",
               sample_size: int | str = SAMPLE_SIZE) -> dict[str, LayerRoute]:
        """How each layer's reduce step runs: the one place the route is decided.

        ``"in-memory"`` (today's capture and :func:`~pcace.reduce.pca.reduce_block`) for
        every layer when all their maps (``4 C N P`` bytes each) fit
        :attr:`store_bytes`: one pass, nothing recomputed. Otherwise a layer is reduced
        in two passes over the images (``"moments"``, :mod:`pcace.reduce.twopass`) when its
        moments are smaller than its maps (``2 P <= N``), its ``8 C P^2`` bytes fit
        :attr:`work_bytes` (its basis is solved there), and the moments of all layers so
        routed (packed triangles, ``4 C P (P + 1)`` bytes each), with their runs of
        ``run_images`` images, fit :attr:`store_bytes` together (they are held at once
        during the first pass, in place of the maps). Moments whose full matrices do not
        fit :attr:`work_bytes` at once are split into up to :data:`MAX_GROUPS` groups of
        channels, one forward pass each (stopped after the last layer with a group left).
        A layer that cannot take moments and whose maps cannot be reduced in the store
        either (one channel's ``min(N, P)^2`` Gram work exceeds the work share) takes
        ``"subspace"``:
        block subspace iteration (:class:`~pcace.reduce.subspace.SubspaceIteration`), one more
        forward pass (stopped after the layer) per iteration, to a stated tolerance. The
        rest stay ``"in-memory"`` in what remains of the store, which spills them to disk
        past it. ``n`` None (unknown) counts as large; ``batch_images``, the images per
        forward pass, sizes the subspace route's float64 copy of a batch.

        With ``basis="sample"`` and more images than ``sample_size`` (a known number),
        every layer takes ``"sample"`` instead: axes from a sample of
        ``sample_size`` images, refined over all images in the one pass
        (:class:`~pcace.reduce.sampled_route.SampledRoute`); its bytes are the ``(C, N, l)``
        projections and the sample's maps.

        Examples
        --------
        >>> plan = MemoryPlan(2**30)
        >>> plan.routes({"a": (16, 32, 32)}, 1000)["a"].route
        'in-memory'
        >>> plan.routes({"a": (16, 32, 32)}, 50_000)["a"].route
        'moments'
        >>> MemoryPlan(4 * 2**30).routes({"a": (64, 112, 112)}, 50_000)["a"].route
        'subspace'
        """
        sizes = {name: (int(s[0]), int(np.prod(s[1:]))) for name, s in shapes.items()}
        if basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}; got {basis!r}")
        m = None if n is None else resolve_sample_size(
            sample_size, n, sum(2 * c * p for c, p in sizes.values()), self.store_bytes)
        if basis == "sample" and n is not None and n > m:
            return {name: _sampled_route(c, p, n, m, components, tuple(shapes[name]))
                    for name, (c, p) in sizes.items()}
        maps = {name: BYTES_PER_VALUE * c * (n or 0) * p for name, (c, p) in sizes.items()}
        if n is not None and sum(maps.values()) <= self.store_bytes:
            return {name: LayerRoute("in-memory", f"all maps ({size_text(sum(maps.values()))})"
                                     f" fit the store ({size_text(self.store_bytes)})",
                                     maps[name], shape=tuple(shapes[name]))
                    for name in shapes}
        out: dict[str, LayerRoute] = {}
        held = 0
        for name, (c, p) in sizes.items():
            out[name] = self._streamed_route(c, p, n, self.store_bytes - held, run_images,
                                             components, batch_images, maps[name],
                                             tuple(shapes[name]))
            held += out[name].stats_bytes if out[name].route in STREAMED else 0
        return out

    def _streamed_route(self, c: int, p: int, n: int | None, free: int, run_images: int,
                        components: int | float, batch_images: int, maps: int,
                        shape: tuple[int, ...]) -> LayerRoute:
        """One layer's route when not every map fits: moments, subspace, or kept (spilled)
        in the store; ``free`` is what the store has left beside the other layers'
        statistics."""
        moments = 8 * c * p * p  # as the basis is solved: full float64 matrices
        # channels whose bases fit the work share at once; more go in groups, a pass each
        fit = self.work_bytes // (8 * p * p)
        groups = -(-c // fit) if fit else MAX_GROUPS + 1
        size = -(-c // groups)
        stats = moments_bytes(size, p, run_images=min(run_images, n or run_images))
        if n is not None and 2 * p > n:
            why = f"P = {p} > N / 2: its maps are smaller than its P x P moments"
        elif groups > MAX_GROUPS:
            why = (f"its P x P moments ({size_text(moments)}) exceed the work share "
                   f"({size_text(self.work_bytes)}) {MAX_GROUPS} times over")
        elif stats > free:
            why = "the store is taken by other layers' moments"
        else:
            split = "" if groups == 1 else (
                f"; its P x P moments ({size_text(moments)}) exceed the work share "
                f"({size_text(self.work_bytes)}), so {groups} groups of {size} channels, a "
                "forward pass each")
            return LayerRoute("moments", "the maps of all layers do not fit the store; its "
                              f"moments take {size_text(stats)}" + split, stats,
                              passes=groups + 1, shape=shape, groups=groups)
        m = p if n is None else min(n, p)
        # one channel's reduce of the stored (or spilled) maps: its min(N, P)^2 Gram work
        too_big = 28 * m * m > self.work_bytes
        iterating = subspace_bytes(c, p, components, batch_images=batch_images)
        blocks = subspace_bytes(c, p, components, batch_images=0)  # held between passes
        if too_big and iterating <= self.work_bytes and blocks <= free:
            return LayerRoute("subspace", why + f", and one channel's reduce of its maps "
                              f"({size_text(28 * m * m)}) too; block subspace iteration takes "
                              f"{size_text(iterating)} (one forward pass per iteration)",
                              blocks, passes=3, shape=shape)
        return LayerRoute("in-memory", why + "; kept in the store (spilled to disk past it)",
                          maps, shape=shape)

    def streamed_bytes(self, routes: dict[str, LayerRoute]) -> int:
        """Bytes the streamed layers' statistics take from the store."""
        return sum(r.stats_bytes for r in routes.values() if r.route in STREAMED)


def sampled_bytes(channels: int, pixels: int, n: int, width: int, sample_size: int) -> int:
    """Bytes a layer's sampled basis holds: the ``(C, N, l)`` float16 projections, the
    sample's maps in float16 (until the basis is taken) and per-pixel statistics.

    Examples
    --------
    >>> round(sampled_bytes(64, 64, 50_000, 13, 2000) / 2**20)  # 64 maps of 8 x 8
    95
    """
    c, p = int(channels), int(pixels)
    return 2 * c * n * width + 2 * c * sample_size * p + (24 + 8 * width) * c * p


def resolve_sample_size(sample_size: int | str, n: int, image_bytes: int,
                        store_bytes: int) -> int:
    """``m``: a number as given (at most ``N``), or ``"auto"``: the recommended
    :func:`pcace.reduce.sampled.sample_size` (``min(N, max(2000, N // 10))``), at most as
    many images as the store holds of the sampled layers' maps (``image_bytes`` per image,
    in float16), and at least 500.

    Examples
    --------
    >>> resolve_sample_size("auto", 50_000, 2 * 188_000, 768 * 2**20)
    2141
    >>> resolve_sample_size(300, 50_000, 1, 1)
    300
    """
    if not (isinstance(sample_size, str) and sample_size == "auto"):
        return min(int(sample_size), n)
    room = store_bytes // max(1, image_bytes)
    return min(recommended_sample_size(n), max(500, room))


def sample_width(pixels: int, components: int | float, max_components: int = 10) -> int:
    """``l``: the sample axes each image is projected on (``k`` plus a margin, at most
    ``P``; see :data:`pcace.reduce.sampled.EXTRA`)."""
    k_fixed, fraction = check_components(components, max_components)
    return min(int(pixels), (k_fixed if fraction is None else max_components) + EXTRA)


def _sampled_route(c: int, p: int, n: int | None, sample_size: int, components: int | float,
                   shape: tuple[int, ...]) -> LayerRoute:
    width = sample_width(p, components)
    count = f"{n} images" if n is not None else "an unknown number of images"
    return LayerRoute("sample", f"{count} > the sample of {sample_size}: axes from the "
                      f"sample, {width} of them refined over all images in the one pass "
                      "(basis='exact' for the exact PCA)",
                      sampled_bytes(c, p, n or sample_size, width, sample_size), passes=1,
                      shape=shape, sample_size=sample_size)


@dataclass(frozen=True)
class LayerRoute:
    """How one layer is reduced (see :meth:`MemoryPlan.routes`).

    Attributes
    ----------
    route : {"in-memory", "moments", "subspace", "sample"}
    reason : str
    stats_bytes : int
        Bytes held for the layer during the first pass: its maps, or its moments.
    passes : int
        Forward passes that see the layer.
    shape : tuple of int
        ``(C, H, W)``.
    groups : int
        Channel groups of a ``"moments"`` layer, each accumulated in its own pass.
    sample_size : int
        ``m``, the images a ``"sample"`` layer's axes come from.
    """

    route: str
    reason: str
    stats_bytes: int
    passes: int = 1
    shape: tuple[int, ...] = ()
    groups: int = 1
    sample_size: int = 0


@dataclass(frozen=True)
class RouteChoice:
    """Which streaming route fits a memory budget, and why.

    Attributes
    ----------
    route : {"moments", "subspace"}
    reason : str
        One sentence for logs and manifests.
    moments_bytes, subspace_bytes : int
        Estimated peak bytes of each route.
    """

    route: Literal["moments", "subspace"]
    reason: str
    moments_bytes: int
    subspace_bytes: int


def choose_route(channels: int, pixels: int, components: int | float = 3, *,
                 budget_bytes: int, images: int | None = None, max_components: int = 10,
                 oversample: int = OVERSAMPLE, batch_size: int = 256) -> RouteChoice:
    """Pick the streaming route for a layer of ``channels`` maps of ``pixels`` under a budget.

    The rule: ``"moments"`` when its peak memory fits the budget (one pass over the data,
    then the projection pass; the cost of the pass grows as ``C N P^2``), else
    ``"subspace"`` when its memory fits (a statistics pass, then one pass per iteration,
    typically 3 to 10 on natural images, many more on flat spectra, then the projection
    pass; each pass costs about ``4 C N P (q + oversample)``). If neither fits, a
    ``ValueError`` says how much each needs.

    Peak bytes (neither depends on ``N``): moments, ``8 C P^2`` for the cross products, a
    chunk of correlation matrices, the per-pixel statistics and a float64 batch; subspace,
    :func:`subspace_bytes` (the count the run's plan uses).

    Parameters
    ----------
    channels, pixels : int
        ``C`` and ``P = H * W`` of the layer.
    components, max_components
        As for :meth:`PixelMoments.basis`.
    budget_bytes : int
        Memory the reduce may hold for this layer.
    images : int, optional
        ``N`` if known: the reason then says whether the maps themselves would fit.
    oversample : int, default 20
        As for :func:`subspace_basis`.
    batch_size : int, default 256
        Images per batch, for the float64 copy of a batch (``8 B C P`` bytes; for
        64 channels of 112 x 112 and ``B = 256`` that alone is 1.6 GiB).

    Returns
    -------
    RouteChoice

    Examples
    --------
    >>> choose_route(64, 12_544, budget_bytes=2 * 2**30, batch_size=64).route
    'subspace'
    >>> choose_route(64, 1024, budget_bytes=2 * 2**30).route
    'moments'
    """
    k_fixed, fraction = check_components(components, max_components)
    c, p = int(channels), int(pixels)
    q = min(k_fixed if fraction is None else max_components, p)
    block = min(q + oversample, p)
    # the standalone routes (pcace.reduce.streaming) widen each batch to float64 and keep
    # full float64 matrices; the cost model is the one the run's plan uses
    batch = 8 * batch_size * c * p
    chunk = max(p * p * 8, min(c * p * p * 8, BASIS_CHUNK_BYTES))
    moments = moments_bytes(c, p, run_images=0, packed=False) + chunk + 8 * c * p * 5 + batch
    subspace = subspace_bytes(c, p, components, oversample, max_components,
                              batch_images=batch_size)
    mib = 2.0**20

    def fmt(b: int) -> str:
        return f"{b / mib:,.1f} MiB"

    note = ""
    if images is not None:
        in_memory = 4 * c * int(images) * p
        fits = "fit" if in_memory <= budget_bytes else "not fit"
        note = (f"; the maps themselves (N = {images}) would take {fmt(in_memory)} in "
                f"float32 and {fits} the budget")
    if moments <= budget_bytes:
        return RouteChoice("moments", f"P x P moments of {c} channels of {p} pixels need "
                           f"{fmt(moments)} <= budget {fmt(budget_bytes)}: one pass plus the "
                           f"projection pass{note}", moments, subspace)
    if subspace <= budget_bytes:
        return RouteChoice("subspace", f"P x P moments of {c} channels of {p} pixels need "
                           f"{fmt(moments)} > budget {fmt(budget_bytes)}; subspace iteration "
                           f"with {block} columns needs {fmt(subspace)}: several passes"
                           f"{note}", moments, subspace)
    raise ValueError(f"neither route fits {fmt(budget_bytes)} for {c} channels of {p} pixels: "
                     f"moments need {fmt(moments)}, subspace iteration {fmt(subspace)} "
                     f"(with batches of {batch_size}); reduce the layer's channels in groups")
