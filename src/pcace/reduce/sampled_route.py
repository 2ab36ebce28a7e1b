"""The sampled-basis route: one pass over the images, the axes from a sample of them.

A :class:`~pcace.reduce.routes.Route` around :class:`~pcace.reduce.sampled.SampleBasis`
and :class:`~pcace.reduce.sampled.SampledPass`. In the one forward pass the first
``sample_size`` images (the run puts a random sample of its images first where the input
can be indexed, :func:`pcace.inputs.data.as_batches` with ``order``) are kept per layer;
once they are in, each layer's standardisation and sample axes are taken from them, the
kept maps are projected, and every later image is projected as it comes. After the pass
each layer is rotated to its best ``k`` components over all images (Rayleigh-Ritz) and
put back in the images' own order. With no more images than the sample, the route is the
exact in-memory reduce of the maps it kept.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from pcace.capture.forward import forward_pass
>>> net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(48, 1))
>>> route = SampledRoute({"0": (3, 4, 4)}, 120, components=2, sample_size=40)
>>> done = forward_pass(net, torch.rand(120, 1, 6, 6).split(32), route.feeds(),
...                     progress=False)
>>> route.end_pass(done)
>>> red = next(route.reduce("0", [None])).reductions[0]
>>> tuple(red.scores.shape), route.record("0")["sample"]["size"]
((3, 120, 2), 40)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..capture.forward import Feed, PassResult
from ..core.voice import action, option
from .moments import naming_errors
from .pca import Reduction, reduce_block
from .routes import ReducedBlock, Route
from .sampled import EXTRA, SampleBasis, SampleCheck, SampledBasisWarning, SampledPass

__all__ = ["SampledRoute"]


class SampledRoute(Route):
    """Layers reduced in one pass on a sampled basis refined over all images.

    Parameters
    ----------
    shapes : dict
        ``{layer: (C, H, W)}``.
    n_images : int
        ``N``, the images of the pass (the projections are kept for all of them).
    components : int or float
        As for :func:`pcace.rank`.
    sample_size : int
        ``m``: the images (the first of the pass) the axes are taken from.
    extra : int
        Sample axes beyond ``k`` (:data:`pcace.reduce.sampled.EXTRA`).
    order : numpy.ndarray, optional
        ``order[i]``: the image the ``i``-th image of the pass is (a random sample first);
        the reductions are put back in the images' own order. None: the pass's order.
    drawn : str
        How the sample was drawn, for the manifest.
    """

    name = "sample"

    def __init__(self, shapes: dict[str, tuple[int, int, int]], n_images: int, *,
                 components: int | float = 3, sample_size: int = 1000, extra: int = EXTRA,
                 order: np.ndarray | None = None, drawn: str = "the first images"):
        super().__init__(list(shapes))
        self.shapes, self.n, self.components = dict(shapes), int(n_images), components
        self.sample_size, self.extra, self.drawn = int(sample_size), int(extra), drawn
        self.inverse = None if order is None else np.argsort(np.asarray(order))
        self._kept: dict[str, list[torch.Tensor]] = {n: [] for n in shapes}
        self._passes: dict[str, SampledPass] = {}
        self.reductions: dict[str, Reduction] = {}
        self.checks: dict[str, SampleCheck | None] = {}
        self.widths: dict[str, int] = {}
        self.solvers: dict[str, str] = {}
        self._done = False

    def feeds(self) -> dict[str, Feed]:
        return {name: self._feed(name) for name in self.layers}

    def _feed(self, name: str) -> Feed:
        def feed(maps: torch.Tensor, offset: int) -> None:
            with naming_errors(name):
                self._add(name, maps.cpu(), offset)
        return feed

    def _add(self, name: str, maps: torch.Tensor, offset: int) -> None:
        """A batch of a layer: kept for the sample until it is full, then projected."""
        run = self._passes.get(name)
        if run is not None:
            run.add(maps, offset)
            return
        kept = sum(b[0].shape[0] for b in self._kept[name])
        take = min(maps.shape[0], self.sample_size - kept)
        self._kept[name].append(_compact(maps[:take]))  # before an in-place op changes it
        if kept + take == self.sample_size:
            self._start(name)
            if take < maps.shape[0]:
                self._passes[name].add(maps[take:], offset + take)

    def _start(self, name: str) -> None:
        """The sample is in: the layer's basis, and the sample projected first."""
        block = _channel_major(self._kept.pop(name))
        basis = SampleBasis.from_block(block, self.components, extra=self.extra)
        self.widths[name] = basis.width
        self.solvers[name] = basis.solver
        self._passes[name] = basis.start_pass(self.n)
        self._passes[name].add_sample(block)  # standardised by from_block

    def end_pass(self, result: PassResult) -> None:
        if result.images != self.n:
            raise ValueError(f"the pass saw {result.images} images; the sampled route was "
                             f"planned for {self.n}")
        poor: dict[str, int] = {}
        for name in self.layers:
            if name in self._passes:
                with naming_errors(name):
                    red, check = self._passes.pop(name).finish(warn=False, layer=name)
                count = len(check.summary().get("poor_channels", []))
                if count:
                    poor[name] = count
            else:  # no more images than the sample: the exact reduce of all of them
                red = reduce_block(_channel_major(self._kept.pop(name)), self.components)
                check = None
            self.reductions[name] = self._in_image_order(red)
            self.checks[name] = check
        if poor:
            warnings.warn(_poor_message(poor, self.sample_size), SampledBasisWarning,
                          stacklevel=2)
        self._done = True

    def _in_image_order(self, red: Reduction) -> Reduction:
        if self.inverse is None:
            return red
        red.scores = red.scores[:, torch.as_tensor(self.inverse)].contiguous()
        return red

    @property
    def needs_pass(self) -> bool:
        return not self._done

    def shape(self, name: str) -> tuple[int, int, int]:
        return self.shapes[name]

    def reduce(self, name: str, groups: Sequence[np.ndarray | None], *,
               components: int | float = 3, plan: Any = None,
               pca_dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> Iterator[ReducedBlock]:
        """The layer's reduction, whole (one group of all images); handed over once."""
        if any(rows is not None for rows in groups):
            raise ValueError("a layer on the sampled route is reduced over all images")
        yield ReducedBlock(name, slice(0, self.shapes[name][0]),
                           [self.reductions.pop(name)], None)

    def record(self, name: str) -> dict[str, Any]:
        check = self.checks.get(name)
        sample = {"size": min(self.sample_size, self.n), "drawn": self.drawn,
                  "width": self.widths.get(name, 0)}
        if name in self.solvers:
            sample["axes"] = _AXES_WORDS[self.solvers[name]]
        return {"route": self.name if check is not None else "in-memory", "sample": sample,
                **({"check": check.summary()} if check is not None else {})}

    def close(self) -> None:
        self._kept.clear()
        self._passes.clear()


#: How the manifest names the way a layer's sample axes were found.
_AXES_WORDS = {
    "randomized": "randomized range finder (pcace.reduce.sampled.sample_axes)",
    "randomized-bfloat16": "randomized range finder, power iterations in bfloat16 "
                           "(pcace.reduce.sampled.sample_axes)",
    "exact": "exact eigenpairs of the sample's Gram matrix",
    "moments": "exact eigenpairs of the sample's pixel moments",
}


def _poor_message(poor: dict[str, int], sample_size: int) -> str:
    """One line for every layer whose sampled basis fell short of the self-check."""
    shown = ", ".join(f"{name} ({count})" for name, count in list(poor.items())[:6])
    more = f" and {len(poor) - 6} more layers" if len(poor) > 6 else ""
    return (f"the sampled basis (m = {sample_size}) captures less of some channels' variance "
            f"over all images than the sample promised, in {shown}{more} (channels per "
            f"layer); {action('basis_check')} names them. A larger "
            f"{option('sample_size', 'M', python='...')}, or "
            f"{option('basis', 'exact', python=repr('exact'))}, gives them their exact "
            "components")


def _compact(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of maps kept for the sample in half the memory: float16 of each image's
    channel divided by its largest magnitude (so any range fits), and those scales."""
    flat = maps.flatten(2).to(torch.float32)
    scale = flat.abs().amax(dim=2, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return (flat / scale).to(torch.float16), scale


def _channel_major(kept: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The kept sample as one ``(C, m, P)`` float32 block (channel-major), built in place."""
    c, p = kept[0][0].shape[1], kept[0][0].shape[2]
    block = torch.empty((c, sum(x.shape[0] for x, _ in kept), p), dtype=torch.float32)
    row = 0
    for x, scale in kept:
        rows = block[:, row:row + x.shape[0]]
        rows.copy_(x.transpose(0, 1))
        rows.mul_(scale.transpose(0, 1))
        row += x.shape[0]
    return block
