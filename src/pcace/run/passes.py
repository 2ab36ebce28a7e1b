"""A run's routes and the forward passes that feed them.

:func:`plan_layer_routes` asks the memory plan for each layer's route (from one probe of
the layers' shapes); :func:`make_routes` builds the :class:`~pcace.reduce.routes.Route`
objects; :class:`Passes` drives them: the first pass, shared by every route, also scores
the images; the routes that need no more passes are then scored while the others take
their further passes (each stopped after the last layer it needs, and checked to see the
first pass's images).

Examples
--------
>>> import torch
>>> from torch import nn
>>> from pcace.reduce.plan import MemoryPlan
>>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 1))
>>> routes = make_routes({"0": None}, ["0"], MemoryPlan(2**26))
>>> passes = Passes(net, torch.rand(6, 1, 4, 4).split(3), routes, torch.device("cpu"))
>>> passes.first(lambda out: out[:, 0]).scores.shape
(6,)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..capture.forward import PassResult, batch_images, forward_pass
from ..core.stopwatch import Stopwatch
from ..engines.engine import Engine
from ..engines.shards import ShardedRoute, shardable
from ..inputs.hooks import evaluating
from ..inputs.layers import describe_layers
from ..reduce.plan import STREAMED, LayerRoute, MemoryPlan
from ..reduce.routes import InMemoryRoute, Route
from ..reduce.sampled_route import SampledRoute
from ..reduce.twopass import TwoPass, check_same_images

__all__ = ["Passes", "make_routes", "plan_layer_routes"]


def plan_layer_routes(model: nn.Module, images: Any, batches: Any, names: list[str],
                      plan: MemoryPlan, device: torch.device, *, keep_maps: bool,
                      components: int | float, batch_size: int, basis: str = "exact",
                      sample_size: int = 1000) -> tuple[MemoryPlan, dict[str, LayerRoute]]:
    """Each layer's route and the plan it runs in (:meth:`MemoryPlan.plan_routes`).

    From one probe of the layers' shapes. ``keep_maps`` (a bootstrap resamples the maps,
    per-label groups standardise each label's rows on their own) keeps every layer in
    memory, in the widest plan; so does a run whose layers the probe cannot see.
    """
    if keep_maps:
        return plan.widened(), {}
    n = getattr(batches, "n_images", None)
    if isinstance(images, torch.Tensor):
        input_shape = tuple(images.shape[1:])
    else:
        first = next(iter(batches), None)
        if first is None:
            return plan.widened(), {}
        input_shape = tuple(batch_images(first).shape[1:])
    table = describe_layers(model, input_shape, device=device).set_index("name")
    shapes = {name: (int(table.out_channels[name]), int(table.height[name]),
                     int(table.width[name])) for name in names if name in table.index}
    if len(shapes) < len(names):  # a layer the probe did not see: let the pass explain
        return plan.widened(), {}
    return plan.plan_routes(shapes, n, components=components, batch_images=batch_size,
                            basis=basis, sample_size=sample_size)


def make_routes(layer_routes: dict[str, LayerRoute | None], names: list[str],
                plan: MemoryPlan, *, components: int | float = 3,
                pca_dtype: torch.dtype = torch.float32, spill_dir: str | Path | None = None,
                device_memory_budget: int | str = "auto", n_images: int | None = None,
                workers: tuple[Any, int] | None = None, model: nn.Module | None = None,
                target: Any = None, engine: Engine | None = None, progress: bool = False,
                sample: dict[str, Any] | None = None) -> dict[str, Route]:
    """The route object of each layer (layers of one kind share one object).

    ``layer_routes`` as :func:`plan_layer_routes` gives them (a layer missing or None: in
    memory). With ``workers`` (the data and batch size an engine's workers read), the
    moments layers in one channel group run their passes there (:class:`ShardedRoute`).
    ``sample`` holds the sampled route's ``n_images``, ``sample_size``, ``order`` and
    ``drawn`` (:class:`SampledRoute`).
    """
    kinds: dict[str, list[str]] = {"in-memory": [], "streamed": [], "workers": [],
                                   "sample": []}
    for name in names:
        r = layer_routes.get(name)
        if r is None or r.route not in STREAMED:
            kinds["in-memory"].append(name)
        elif r.route == "sample":
            kinds["sample"].append(name)
        elif workers is not None and r.route == "moments" and r.groups == 1:
            kinds["workers"].append(name)
        else:
            kinds["streamed"].append(name)
    streamed = {n: layer_routes[n] for n in kinds["streamed"] + kinds["workers"] +
                kinds["sample"]}
    out: dict[str, Route] = {}
    if kinds["in-memory"]:
        budget = plan.store_bytes - plan.streamed_bytes(streamed)
        kept = InMemoryRoute(kinds["in-memory"], memory_budget=budget, spill_dir=spill_dir,
                             n_images=n_images, device_budget=device_memory_budget)
        out.update(dict.fromkeys(kept.layers, kept))
    if kinds["streamed"]:
        routes = {n: layer_routes[n] for n in kinds["streamed"]}
        two = TwoPass({n: r.shape for n, r in routes.items()}, components, pca_dtype=pca_dtype,
                      subspace=[n for n, r in routes.items() if r.route == "subspace"],
                      groups={n: r.groups for n, r in routes.items() if r.groups > 1})
        out.update(dict.fromkeys(two.layers, two))
    if kinds["workers"]:
        data, batch = workers
        sharded = ShardedRoute({n: layer_routes[n].shape for n in kinds["workers"]}, data,
                               batch, model, target, components, pca_dtype, engine, progress)
        out.update(dict.fromkeys(sharded.layers, sharded))
    if kinds["sample"]:
        sampled = SampledRoute({n: layer_routes[n].shape for n in kinds["sample"]},
                               components=components, **(sample or {}))
        out.update(dict.fromkeys(sampled.layers, sampled))
    return {name: out[name] for name in names}


def workers_source(engine: Engine, images: Any, batch_size: int, label: Any,
                   layer_routes: dict[str, LayerRoute]) -> tuple[Any, int] | None:
    """The dataset and batch size an engine's workers stream, or None (the driver does).

    On an engine with workers (Ray), the passes of the layers routed to ``"moments"`` in
    one channel group run there when the images can be split into shards the workers read
    (:func:`pcace.engines.shards.shardable`).
    """
    if not hasattr(engine, "map_shards") or not any(
            r.route == "moments" and r.groups == 1 for r in layer_routes.values()):
        return None
    return shardable(images, batch_size, label)


class Passes:
    """Drives a run's routes through the forward passes over the images.

    Parameters
    ----------
    model : torch.nn.Module
    batches : iterable
        The images, in batches; drawn once per pass.
    routes : dict
        ``{layer: Route}`` (:func:`make_routes`).
    device : torch.device
        Where the model runs.
    progress, on_step, tune_malloc
        As for :func:`pcace.capture.forward.forward_pass`.

    Attributes
    ----------
    first_seconds, later_seconds : float
        Wall time of the first pass (and the workers' passes), and of the further passes.
    forward_calls : int
        Calls of the model in the first pass.
    """

    def __init__(self, model: nn.Module, batches: Iterable[Any], routes: dict[str, Route],
                 device: torch.device, *, progress: bool = False,
                 on_step: Callable[[], None] | None = None, tune_malloc: bool | None = None,
                 watch: Stopwatch | None = None):
        self.model, self.batches, self.device = model, batches, device
        self.watch = watch or Stopwatch()
        self.routes = list(dict.fromkeys(routes.values()))  # each route object once
        self.progress, self.on_step, self.tune_malloc = progress, on_step, tune_malloc
        self.first_seconds = self.later_seconds = 0.0
        self.forward_calls = 0
        self._first: PassResult | None = None

    def first(self, score_fn: Callable[[Any], Any]) -> PassResult:
        """The pass every route shares, which also scores the images. Routes whose passes
        run elsewhere (an engine's workers) run them first; when no route needs the
        driver's pass, their scores stand in for it."""
        start = time.perf_counter()
        with evaluating(self.model, self.device):
            for route in self.routes:
                route.begin(self.device)
            active = [r for r in self.routes if r.needs_pass]
            elsewhere = [r.scores for r in self.routes if r.scores is not None]
            if active or not elsewhere:
                feeds = {name: feed for r in active for name, feed in r.feeds().items()}
                result = forward_pass(self.model, self.batches, feeds, device=self.device,
                                      score_fn=score_fn, progress=self.progress,
                                      on_step=self.on_step, tune_malloc=self.tune_malloc,
                                      checksums=any(isinstance(r, TwoPass) for r in active))
                if result.scores is None:
                    raise ValueError("the images are empty: pass at least one (B, C, H, W) "
                                     "batch")
                self.watch.add("forward_and_capture", result.seconds)
                with self.watch("reduce"):
                    for route in active:
                        route.end_pass(result)
            else:
                scores = elsewhere[0]
                result = PassResult(images=len(scores), forward_calls=0, seconds=0.0,
                                    scores=scores)
        for scores in elsewhere:
            _check_same_scores(result.scores, scores)
        self.forward_calls = result.forward_calls
        self.first_seconds = time.perf_counter() - start
        self._first = result
        return result

    def ready(self, names: list[str], routes: dict[str, Route]) -> list[str]:
        """Those of ``names`` whose routes need no further pass."""
        return [n for n in names if not routes[n].needs_pass]

    def more(self) -> None:
        """The further passes, while any route needs one; each stops after the last layer
        it feeds and must see the first pass's images."""
        start = time.perf_counter()
        first = self._first
        assert first is not None, "call first() before more()"
        while True:
            active = [r for r in self.routes if r.needs_pass]
            if not active:
                break
            feeds = {name: feed for r in active for name, feed in r.feeds().items()}
            desc = " + ".join(dict.fromkeys(r.pass_label() for r in active))
            result = forward_pass(self.model, self.batches, feeds, device=self.device,
                                  stop_early=True, checksums=True, desc=desc,
                                  progress=self.progress, on_step=self.on_step,
                                  tune_malloc=self.tune_malloc)
            check_same_images(first.checksums, first.images, result, desc)
            self.watch.add("further_passes", result.seconds)
            with self.watch("reduce"):
                for route in active:
                    route.end_pass(result)
        self.later_seconds += time.perf_counter() - start

    def close(self) -> None:
        for route in self.routes:
            route.close()


def _check_same_scores(mine: np.ndarray | None, theirs: np.ndarray) -> None:
    """The driver's pass and the workers' must have scored the images alike."""
    if mine is None or mine is theirs:
        return
    mine = mine[:, None] if mine.ndim == 1 else mine
    if mine.shape != theirs.shape or not np.allclose(mine, theirs, rtol=1e-6, atol=1e-6):
        raise ValueError("the engine's workers scored the images differently from this "
                         "process: the data must read the same on every node")


def announce_streaming(layer_routes: dict[str, LayerRoute], todo: list[str],
                       plan: MemoryPlan) -> None:
    """Say on stderr how many layers take extra passes, and that more memory is faster."""
    from ..core.budget import size_text

    streamed = [n for n in todo if n in layer_routes and
                layer_routes[n].route in ("moments", "subspace")]
    if streamed:
        print(f"pcace: {len(streamed)} of {len(todo)} layers reduced in two passes over the "
              f"images (their maps do not fit the memory budget, {size_text(plan.budget)}; "
              "a larger one keeps more in memory, which is faster); manifest['routes'] says "
              "why", file=sys.stderr)
