"""The PCACE pipeline as a short sequence of stage calls.

:func:`run` is what :func:`pcace.rank` does once its options are checked
(:class:`~pcace.run.config.RankOptions`): open the run (device, targets, layers, engine,
memory plan), then, for all images at once or for each label in turn
(:mod:`pcace.run.perlabel`), :func:`run_once`:

1. checkpoints: what an interrupted run finished (:mod:`pcace.run.resume`);
2. routes: each layer's reduce route (:mod:`pcace.run.passes`);
3. the first forward pass, shared by every route, which also scores the images;
4. scoring of the layers whose routes are done (:mod:`pcace.run.scoring`), then the
   further passes of the others, then their scoring;
5. tables and evidence (:mod:`pcace.run.tables`), the manifest, the result.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.interrupts import Interrupted
from ..core.stopwatch import Stopwatch
from ..core.validation import device as resolve_device
from ..engines.engine import Engine
from ..engines.select import resolve_engine
from ..inputs.data import as_batches, indexable
from ..inputs.layers import resolve_layers
from ..inputs.models import count_parameters, weights_hash
from ..inputs.targets import TargetSet
from ..maxcorr.binning import resolve_bins
from ..reduce.plan import MemoryPlan
from ..reduce.sampled import sample_indices
from ..reduce.twopass import check_repeatable
from ..results.result import PCACEResult
from .config import RankOptions
from .groups import (
    check_folder_labels,
    check_score_matrix,
    describe_target,
    image_labels,
    make_groups,
    target_set,
    targets_setting,
)
from .manifest import budget_reason, created, route_record, versions
from .passes import Passes, announce_streaming, make_routes, plan_layer_routes, workers_source
from .perlabel import labels_in_turn, rank_in_turn
from .resume import Checkpoints
from .scoring import ScoredLayers, Scoring, score_layers
from .sharednull import add_shared_null
from .tables import add_layer_statistics, channel_table, layer_summary, stability_manifest

__all__ = ["RunContext", "run", "run_once"]


@dataclass
class RunContext:
    """What a run is about, settled before any image is read."""

    model: torch.nn.Module
    images: Any
    options: RankOptions
    device: torch.device
    targets: TargetSet
    names: list[str]
    asked: MemoryPlan
    engine: Engine
    owned: bool
    start: float = field(default_factory=time.perf_counter)
    watch: Stopwatch = field(default_factory=Stopwatch)

    @classmethod
    def open(cls, model: torch.nn.Module, images: Any, options: RankOptions,
             engine: Engine | None = None) -> RunContext:
        """Check the model, resolve device, targets, layers and the engine (started here
        for a name; the caller's own engine, or ``engine``, is used as given)."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        device = resolve_device(options.device)
        targets = target_set(options.target, options.categories, options.per_label)
        names = resolve_layers(model, options.layers)
        asked = MemoryPlan.from_budget(options.memory_budget)
        if engine is not None:  # a run inside a run (a label's): its engine, not owned
            return cls(model, images, options, device, targets, names, asked, engine, False)
        engine, owned = resolve_engine(options.engine, options.ray_address)
        if options.progress and engine.name != "local":
            print(f"pcace: {engine.summary()}", file=sys.stderr)
        return cls(model, images, options, device, targets, names, asked, engine, owned)

    @property
    def live_engine(self) -> Engine | None:
        """The engine, unless its cluster was lost (then this process does the work)."""
        return self.engine if self.engine.alive else None

    def close(self) -> None:
        if self.owned:
            self.engine.close()


def run(model: torch.nn.Module, images: Any, options: RankOptions) -> PCACEResult:
    """Rank every channel of the chosen layers (see :func:`pcace.rank`)."""
    if options.per_label and options.target is None:
        check_folder_labels(images, options.categories)
    ctx = RunContext.open(model, images, options)
    try:
        in_turn = labels_in_turn(model, images, ctx.names, ctx.asked.widened(), ctx.device) \
            if options.per_label else None
        if in_turn is not None:  # an atlas too big for one pass in memory: label by label
            return rank_in_turn(run_once, ctx, *in_turn)
        return run_once(ctx)
    finally:
        ctx.close()


@dataclass
class _Gathered:
    """What the passes and the scoring of one run leave for its tables and manifest."""

    scores: np.ndarray
    labels: np.ndarray | None
    scored: ScoredLayers
    plan: MemoryPlan
    layer_routes: dict = field(default_factory=dict)
    records: dict = field(default_factory=dict)
    passes: Passes | None = None
    spilled: list[str] = field(default_factory=list)
    on_device: list[str] = field(default_factory=list)
    scored_seconds: float = 0.0
    sample: dict[str, Any] | None = None


def run_once(ctx: RunContext) -> PCACEResult:
    """One run over the images (all of them, or one label's with ``options.label``)."""
    opts = ctx.options
    weights = weights_hash(ctx.model)  # hashes every parameter: once per run
    checkpoints = Checkpoints.open(opts.checkpoint_dir, opts.resume,
                                   _settings(ctx, weights))
    todo = [n for n in ctx.names if n not in checkpoints.done]
    if todo:
        gathered = _pass_and_score(ctx, checkpoints, todo)
    else:  # every layer finished before: the scores came with them
        gathered = _restored(ctx, checkpoints)
    return _result(ctx, gathered, checkpoints, weights)


def _settings(ctx: RunContext, weights: str) -> dict[str, Any]:
    """What the checkpoints record of the run: what determines its numbers."""
    opts = ctx.options
    return {"weights_sha256": weights, "layers": ctx.names,
            "target": targets_setting(opts.target, ctx.targets, opts.per_label),
            "components": opts.components, "score": opts.score,
            "statistics": opts.statistics, "pca_dtype": str(opts.pca_dtype),
            "ace": opts.ace_options, "device": ctx.device.type,
            "memory_budget": ctx.asked.budget, "label": opts.label,
            **({"per_label": True} if opts.per_label else {})}


def _scoring(ctx: RunContext, scores: np.ndarray, labels: np.ndarray | None,
             plan: MemoryPlan, checkpoints: Checkpoints) -> Scoring:
    if ctx.targets.targets is None:
        ctx.targets.expand(scores.shape[1])
    groups = make_groups(labels, ctx.targets, ctx.options.per_label,
                         own_class=ctx.options.target is None)
    check_score_matrix(scores, groups, ctx.targets.labels)
    return Scoring(scores, groups, ctx.targets.labels, ctx.options, plan, ctx.device,
                   ctx.engine, checkpoints, ctx.watch)


def _restored(ctx: RunContext, checkpoints: Checkpoints) -> _Gathered:
    scores, labels = checkpoints.scores(), checkpoints.labels()
    run = _scoring(ctx, scores, labels, ctx.asked, checkpoints)
    scored = ScoredLayers()
    _restore(run, checkpoints, scored)
    return _Gathered(scores, labels, scored, ctx.asked)


def _restore(run: Scoring, checkpoints: Checkpoints, scored: ScoredLayers) -> None:
    for name in checkpoints.done:
        table, comps, stability = checkpoints.restore(name, [g.label for g in run.groups])
        scored.tables.append(table)
        scored.components.update(comps)
        scored.shapes[name] = checkpoints.shapes()[name]
        if stability is not None:
            scored.stability[name] = stability
        if checkpoints.nulls(name):
            scored.nulls[name] = checkpoints.nulls(name)


def _pass_and_score(ctx: RunContext, checkpoints: Checkpoints, todo: list[str]) -> _Gathered:
    """Routes, the first pass, scoring of the finished routes, further passes, the rest."""
    opts = ctx.options
    batches = as_batches(ctx.images, opts.batch_size, label=opts.label)
    plan, layer_routes = plan_layer_routes(
        ctx.model, ctx.images, batches, todo, ctx.asked, ctx.device,
        keep_maps=bool(opts.bootstrap or opts.per_label), components=opts.components,
        batch_size=opts.batch_size, basis=opts.basis, sample_size=opts.sample_size)
    if opts.progress:
        announce_streaming(layer_routes, todo, plan)
    sample = None
    sizes = [r.sample_size for r in layer_routes.values() if r.route == "sample"]
    if sizes:
        batches, sample = _sample_first(ctx, batches, max(sizes))
    routes = make_routes(layer_routes, todo, plan, components=opts.components,
                         pca_dtype=opts.pca_dtype, spill_dir=opts.spill_dir,
                         device_memory_budget=opts.device_memory_budget,
                         n_images=getattr(batches, "n_images", None),
                         workers=workers_source(ctx.engine, ctx.images, opts.batch_size,
                                                opts.label, layer_routes),
                         model=ctx.model, target=ctx.targets, engine=ctx.engine,
                         progress=opts.progress, sample=sample)
    if any(r.needs_pass and r.name in ("moments", "subspace") for r in routes.values()):
        check_repeatable(ctx.images)
    passes = Passes(ctx.model, batches, routes, ctx.device, progress=opts.progress,
                    on_step=opts.on_step, tune_malloc=opts.tune_malloc, watch=ctx.watch)
    try:
        return _score_routes(ctx, checkpoints, todo, routes, passes, plan, layer_routes,
                             batches, sample)
    finally:
        passes.close()


def _sample_first(ctx: RunContext, batches: Any, m: int) -> tuple[Any, dict[str, Any]]:
    """The sampled route's sample of ``m`` images: a random one put first in the pass where
    the images can be read in any order, else the pass's first images."""
    opts = ctx.options
    n = indexable(ctx.images, opts.label)
    if n is None:
        return batches, {"n_images": batches.n_images, "sample_size": m,
                         "drawn": f"the first {m} images (the input cannot be read in "
                                  "another order)"}
    chosen = sample_indices(n, m, seed=opts.seed).numpy()
    order = np.concatenate([chosen, np.setdiff1d(np.arange(n), chosen)])
    return (as_batches(ctx.images, opts.batch_size, label=opts.label, order=order),
            {"n_images": n, "sample_size": m, "order": order,
             "drawn": f"a random sample of {m} of the {n} images (seed {opts.seed}), "
                      "passed first"})


def _score_routes(ctx: RunContext, checkpoints: Checkpoints, todo: list[str],
                  routes: dict, passes: Passes, plan: MemoryPlan, layer_routes: dict,
                  batches: Any, sample: dict[str, Any] | None) -> _Gathered:
    opts = ctx.options
    first = passes.first(ctx.targets)
    scores = first.scores if first.scores.ndim == 2 else first.scores[:, None]
    if sample is not None and sample.get("order") is not None:  # back in the images' order
        scores = scores[np.argsort(sample["order"])]
    labels = image_labels(batches, opts.per_label)
    run = _scoring(ctx, scores, labels, plan, checkpoints)
    checkpoints.check_scores(scores, labels)
    scored = ScoredLayers()
    _restore(run, checkpoints, scored)
    start = time.perf_counter()
    # the layers done after one pass first: they are saved before the further passes of
    # the others (a Ctrl-C there keeps them)
    ready = passes.ready(todo, routes)
    score_layers(run, routes, ready, scored, progress=opts.progress, on_step=opts.on_step)
    later = [n for n in todo if n not in ready]
    if later and not scored.interrupted:
        try:
            passes.more()
        except (KeyboardInterrupt, Interrupted) as err:
            scored.stop(err)
    score_layers(run, routes, later, scored, progress=opts.progress, on_step=opts.on_step,
                 desc="scoring streamed channels")
    records = {n: routes[n].record(n) for n in todo}
    return _Gathered(scores, labels, scored, plan, layer_routes, records, passes,
                     spilled=[n for n in todo if records[n]["route"] == "spilled"],
                     on_device=[n for n in todo if getattr(routes[n], "on_device", {})
                                .get(n)],
                     scored_seconds=time.perf_counter() - start,
                     sample=None if sample is None else
                     {"size": min(sample["sample_size"], len(scores)),
                      "drawn": sample["drawn"]})


def _result(ctx: RunContext, g: _Gathered, checkpoints: Checkpoints,
            weights: str) -> PCACEResult:
    """Tables, evidence and the manifest of a finished (or stopped) run."""
    opts, targets = ctx.options, ctx.targets
    order = {n: i for i, n in enumerate(ctx.names)}
    g.scored.tables.sort(key=lambda t: order.get(t.layer.iloc[0], -1) if len(t) else -1)
    groups = make_groups(g.labels, targets, opts.per_label, own_class=opts.target is None)
    if opts.permutations and opts.null == "shared":
        add_shared_null(g.scored, g.scores, groups, targets.labels, seed=opts.seed,
                        score=opts.score, ace_options=opts.ace_options,
                        engine=ctx.live_engine, watch=ctx.watch)
    channels = channel_table(g.scored.tables, ctx.names)
    shapes = {n: g.scored.shapes[n] for n in ctx.names if n in g.scored.shapes}
    layers = layer_summary(channels, shapes)
    add_layer_statistics(layers, channels, g.scored, g.scores, groups, targets.labels,
                         opts.split_half, opts.seed, opts.ace_options, ctx.live_engine,
                         ctx.watch)
    plain = len(targets) == 1 and not opts.per_label
    manifest = _manifest(ctx, g, checkpoints, weights, shapes, plain)
    return PCACEResult(channels, layers, manifest, g.scored.components,
                       g.scores[:, 0] if plain else g.scores,
                       g.labels if opts.per_label else None)


def _manifest(ctx: RunContext, g: _Gathered, checkpoints: Checkpoints, weights: str,
              shapes: dict[str, tuple[int, ...]], plain: bool) -> dict[str, Any]:
    opts, targets, scored = ctx.options, ctx.targets, g.scored
    single = targets.targets[0] if len(targets) == 1 else None
    first = 0.0 if g.passes is None else g.passes.first_seconds
    later = 0.0 if g.passes is None else g.passes.later_seconds
    total = time.perf_counter() - ctx.start
    manifest = {
        "pcace_version": versions()["pcace"], "created": created(),
        "model": {"class": type(ctx.model).__name__,
                  "parameters": count_parameters(ctx.model), "weights_sha256": weights},
        "data": {"n_images": int(g.scores.shape[0]), "label": opts.label,
                 "skipped_images": int(getattr(ctx.images, "skipped", 0) or 0),
                 "skipped_files": list(getattr(ctx.images, "skipped_files", None) or [])[:20]},
        "target": describe_target(single) if single is not None else
        {"kind": "several", "labels": targets.labels},
        "target_description": "each label's own class logit, on that label's images"
        if opts.per_label and opts.target is None else targets.describe(),
        "targets": [describe_target(t) for t in targets.targets or []],
        "target_labels": targets.labels, "per_label": bool(opts.per_label),
        "score": opts.score, "components": opts.components, "layers": ctx.names,
        "shapes": {n: list(s) for n, s in shapes.items()}, "device": str(ctx.device),
        "seed": opts.seed, "permutations": opts.permutations, "null": opts.null,
        "nulls": scored.nulls, "split_half": opts.split_half,
        "alpha": 0.05, "bootstrap": opts.bootstrap, "level": opts.level,
        "interval": opts.interval, "memory_budget": g.plan.budget,
        "memory_budget_reason": budget_reason(
            opts.memory_budget, ctx.asked, g.plan, "a bootstrap" if opts.bootstrap else
            "per-label groups" if opts.per_label else None),
        "pca_dtype": str(opts.pca_dtype).replace("torch.", ""),
        "spilled_layers": g.spilled, "device_layers": g.on_device,
        "forward_calls": 0 if g.passes is None else g.passes.forward_calls,
        "routes": route_record(g.layer_routes, g.records),
        "ace": {"delrsq": 0.01, "max_iter": 20, "alpha": 5.0, "bins": "auto",
                **opts.ace_options,
                "bins_used": resolve_bins(opts.ace_options.get("bins", "auto"),
                                          int(g.scores.shape[0]))},
        "timings": {"forward_and_capture": first, "projection_pass": later,
                    "reduce_and_ace": g.scored_seconds - later, "total": total,
                    "stages": {k: round(v, 3) for k, v in ctx.watch.seconds.items()}},
        "basis": {"basis": opts.basis, "sample_size": opts.sample_size,
                  **({"sample": g.sample} if g.sample else {})},
        "engine": ctx.engine.describe(), "interrupted": scored.interrupted,
        "interrupt_signal": scored.signal, "complete": not scored.interrupted,
        "layers_done": list(dict.fromkeys(t.layer.iloc[0] for t in scored.tables if len(t))),
        "resumed_layers": sorted(checkpoints.done),
        "stability": stability_manifest(scored.stability, plain, opts.per_label),
        "versions": versions(),
    }
    if opts.per_label:
        groups = make_groups(g.labels, targets, True, own_class=opts.target is None)
        manifest["data"]["labels"] = {str(x.label): int(x.rows.size) for x in groups}
        manifest["data"]["own_class"] = opts.target is None
    return manifest
