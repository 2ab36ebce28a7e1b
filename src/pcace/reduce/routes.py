"""The reduce-route interface: how some layers' maps become principal components.

A run reduces each layer by one *route*, chosen per layer by the memory plan
(:meth:`pcace.reduce.plan.MemoryPlan.plan_routes`). Every route does its work through
forward passes over the images, which the run drives (:mod:`pcace.run.passes`):

1. :meth:`Route.begin` once the model is on its device;
2. before each pass, :meth:`Route.feeds`: a feed per layer, ``feed(maps, offset)``, run
   inside :func:`pcace.capture.forward.forward_pass` (the first pass is shared by every
   route and also scores the images; a further pass is stopped after the last layer that
   needs it);
3. after each pass, :meth:`Route.end_pass`; :attr:`Route.needs_pass` says whether the
   route wants another;
4. then :meth:`Route.reduce` yields each layer's :class:`ReducedBlock` items, one
   :class:`~pcace.reduce.pca.Reduction` per group of images, and :meth:`Route.record`
   what the manifest keeps about the layer.

The routes: :class:`InMemoryRoute` (maps kept in the activation store, reduced there:
one pass, exact, any groups of images, resamplable), :class:`pcace.reduce.twopass.TwoPass`
(pixel moments or subspace iteration over passes, then a projection pass: memory that
does not grow with N, exact), :class:`pcace.reduce.sampled_route.SampledRoute` (a sampled
basis refined over all images in one pass: approximate, with a self-check) and, on an
engine with workers, :class:`pcace.engines.shards.ShardedRoute` (the moments passes run
on the workers). A new route subclasses :class:`Route` and is added to
:func:`pcace.run.passes.make_routes` and the chooser.

Examples
--------
>>> import torch
>>> from pcace.capture.forward import forward_pass
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(48, 1))
>>> route = InMemoryRoute(["0"], memory_budget=2**26)
>>> done = forward_pass(net, torch.rand(30, 1, 6, 6).split(8), route.feeds(), progress=False)
>>> route.end_pass(done)
>>> [tuple(b.reductions[0].scores.shape) for b in route.reduce("0", [None], components=2)]
[(3, 30, 2)]
>>> route.close()
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..capture.capture import non_finite_error
from ..capture.forward import Feed, PassResult
from ..capture.store import ActivationStore, device_budget_bytes
from .pca import Reduction, reduce_block
from .plan import MemoryPlan
from .standardise import NonFiniteMaps

__all__ = ["InMemoryRoute", "ReducedBlock", "Route"]


@dataclass
class ReducedBlock:
    """A block of a layer's channels, reduced for each group of images.

    Attributes
    ----------
    layer : str
    channels : slice
        Which of the layer's channels.
    reductions : list of Reduction
        One per group of images, in the order the groups were given.
    maps : torch.Tensor or None
        The block's maps ``(c, N, P)`` for statistics that resample images (a bootstrap);
        possibly standardised in place (resamples are standardised again, which a
        per-column affine change does not affect). None where the route keeps no maps.
    """

    layer: str
    channels: slice
    reductions: list[Reduction]
    maps: torch.Tensor | None = None


class Route:
    """How some layers are reduced to principal components (see the module notes).

    Attributes
    ----------
    name : str
        The route's name in the manifest (``"in-memory"``, ``"moments"``, ...).
    layers : list of str
        Its layers, in network order.
    """

    name: ClassVar[str] = "route"

    def __init__(self, layers: Sequence[str]):
        self.layers = list(layers)

    def begin(self, device: torch.device) -> None:
        """Called once, with the model on ``device``, before the first pass."""

    def feeds(self) -> dict[str, Feed]:
        """The feeds of the next pass (the first, or a further one)."""
        raise NotImplementedError

    def end_pass(self, result: PassResult) -> None:
        """Called after each pass this route took part in."""
        raise NotImplementedError

    @property
    def needs_pass(self) -> bool:
        """Whether the route wants another pass over the images before :meth:`reduce`."""
        raise NotImplementedError

    def pass_label(self) -> str:
        """What the next (further) pass does, for its progress bar."""
        return f"{self.name} pass"

    @property
    def scores(self) -> np.ndarray | None:
        """The images' scores, when the route's passes ran elsewhere and scored them."""
        return None

    def reduce(self, name: str, groups: Sequence[np.ndarray | None], *,
               components: int | float = 3, plan: MemoryPlan | None = None,
               pca_dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> Iterator[ReducedBlock]:
        """The layer's reductions, in blocks of channels; ``groups`` are the rows of each
        group of images (None: all)."""
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, int, int]:
        """A layer's ``(C, H, W)``."""
        raise NotImplementedError

    def record(self, name: str) -> dict[str, Any]:
        """What the manifest keeps about the layer's reduction (beyond the plan's reason)."""
        return {"route": self.name}

    def close(self) -> None:
        """Free what the route holds (maps, moments, spilled files)."""


class InMemoryRoute(Route):
    """Every map kept in an :class:`~pcace.capture.store.ActivationStore` (RAM, a GPU's
    memory, or spilled to disk past the budget) and reduced there by
    :func:`~pcace.reduce.pca.reduce_block`, block by block: one pass, exact, any groups of
    images.

    Parameters
    ----------
    layers : sequence of str
        Its layers.
    memory_budget : int
        Bytes of maps held in RAM; past it layers spill to disk.
    spill_dir : path, optional
        Where spilled layers go.
    n_images : int, optional
        The number of images, when known (space is reserved at once).
    device_budget : int or "auto"
        On a GPU: bytes of maps kept in its memory (``"auto"``: half its free memory).
    """

    name = "in-memory"

    def __init__(self, layers: Sequence[str], *, memory_budget: int,
                 spill_dir: str | Path | None = None, n_images: int | None = None,
                 device_budget: int | str = "auto"):
        super().__init__(layers)
        self.store = ActivationStore(self.layers, memory_budget, spill_dir, n_images=n_images)
        self.device_budget = device_budget
        self._passed, self.images = False, 0

    def begin(self, device: torch.device) -> None:
        if device.type != "cpu":
            self.store.device = device
            self.store.device_budget = device_budget_bytes(device, self.device_budget)

    def feeds(self) -> dict[str, Feed]:
        store = self.store

        def storing(name: str) -> Feed:
            # copied now, before a later in-place op (an inplace ReLU) can change it; NaN
            # and inf are found while standardising (named there)
            return lambda maps, offset: store.put(name, maps)
        return {name: storing(name) for name in self.layers}

    def end_pass(self, result: PassResult) -> None:
        self.store.finalize()
        self._passed, self.images = True, result.images

    @property
    def needs_pass(self) -> bool:
        return not self._passed

    def shape(self, name: str) -> tuple[int, int, int]:
        return self.store.shapes[name]

    def reduce(self, name: str, groups: Sequence[np.ndarray | None], *,
               components: int | float = 3, plan: MemoryPlan | None = None,
               pca_dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> Iterator[ReducedBlock]:
        """Blocks of channels sized by ``plan``, each reduced per group (a group takes a
        copy of its rows, so the block stays intact until every group is done); the
        store's own memory is standardised in place (its maps are gone afterwards)."""
        plan = plan or MemoryPlan.from_budget(2 * 2**30)
        shape = self.store.shapes[name]
        n = self.images
        grouped = any(rows is not None for rows in groups)
        per_block = plan.channels_per_block(shape, n, self.store.spilled[name] or grouped,
                                            pca_dtype == torch.float64)
        dev = torch.device(device)
        for chans, block in self.store.blocks(name, per_block, destructive=True):
            reductions = []
            for rows in groups:
                part = block if rows is None else block[:, torch.as_tensor(rows)]
                work = part.to(dev, pca_dtype)  # the store's own memory when it can be
                try:
                    reductions.append(reduce_block(work, components))
                except NonFiniteMaps as err:
                    raise _non_finite(name, chans, work, err.channels, rows) from None
                del work, part
            yield ReducedBlock(name, chans, reductions, block)

    def record(self, name: str) -> dict[str, Any]:
        return {"route": "spilled" if self.store.spilled.get(name) else self.name}

    @property
    def spilled(self) -> dict[str, bool]:
        return self.store.spilled

    @property
    def on_device(self) -> dict[str, bool]:
        return self.store.on_device

    def close(self) -> None:
        self.store.close()


def _non_finite(name: str, chans: slice, block: torch.Tensor, channels: list[int],
                rows: np.ndarray | None = None) -> ValueError:
    """The error for NaN/inf in a layer, naming its channels and (first channel's) images."""
    start = chans.start or 0
    images = (~torch.isfinite(block[channels[0]])).any(dim=1).nonzero().flatten().tolist()
    if rows is not None:
        images = [int(rows[i]) for i in images]
    return non_finite_error(name, [start + c for c in channels], images, example=True)
