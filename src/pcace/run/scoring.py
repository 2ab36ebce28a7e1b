"""The one scoring loop: reduced blocks of channels in, PCACE values and statistics out.

Every route (:mod:`pcace.reduce.routes`) yields a layer's channels as
:class:`~pcace.reduce.routes.ReducedBlock` items, one reduction per group of images;
:func:`score_layers` turns them into the layer's rows of the channel table: ACE per
(channel, target) (:func:`score_reduction`), the permutation null and the bootstrap per
group and target, and checkpoints each finished layer. A Ctrl-C, a SIGTERM or a lost
cluster stops it between blocks with the finished layers kept.

Examples
--------
>>> import torch
>>> from pcace.reduce.pca import reduce_block
>>> maps = torch.randn(4, 60, 9, dtype=torch.float64)
>>> red = reduce_block(maps.clone(), 2)
>>> s = np.stack([red.scores[0, :, 0].numpy() ** 2, np.random.rand(60)], axis=1)
>>> score_reduction(red, s).shape
(4, 2)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..core.interrupts import Interrupted
from ..core.progress import progress_bar
from ..core.stopwatch import Stopwatch
from ..engines.engine import Engine, EngineLost, Problems
from ..maxcorr.scoring import target_values
from ..reduce.pca import Reduction
from ..reduce.plan import MemoryPlan
from ..reduce.routes import ReducedBlock, Route
from ..stats.bootstrap import bootstrap_summary, bootstrap_values, interval_scheme, layer_stability
from ..stats.nulls import null_table
from .config import RankOptions
from .groups import ImageGroup, group_labels
from .resume import Checkpoints

__all__ = ["ScoredLayers", "Scoring", "null_key", "score_layers", "score_reduction"]


@dataclass
class ScoredLayers:
    """What the scoring stage returns: per-layer tables, components and stability.

    ``components`` maps a layer (or ``(layer, label)`` with groups) to its ``(C, N, k)``
    scores; ``stability`` maps a layer to ``{(label, target): summary}``.
    """

    tables: list[pd.DataFrame] = field(default_factory=list)
    components: dict[Any, torch.Tensor] = field(default_factory=dict)
    stability: dict[str, dict] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    nulls: dict[str, dict] = field(default_factory=dict)
    interrupted: bool = False
    signal: int | None = None

    def stop(self, err: BaseException) -> None:
        """Mark the stage stopped by a signal or a lost cluster; keep what it finished."""
        self.interrupted = True
        self.signal = getattr(err, "signum", None)
        why = f"{err}; " if isinstance(err, EngineLost) else ""
        warnings.warn(f"interrupted: {why}returning the {len(self.tables)} layers scored so "
                      "far", stacklevel=4)


@dataclass
class Scoring:
    """What scoring needs, fixed for a run (after the first pass)."""

    scores: np.ndarray
    groups: list[ImageGroup]
    target_names: list[str]
    options: RankOptions
    plan: MemoryPlan
    device: torch.device
    engine: Engine | None
    checkpoints: Checkpoints
    watch: Stopwatch = field(default_factory=Stopwatch)

    @property
    def grouped(self) -> bool:
        return self.groups[0].rows is not None


def score_reduction(red: Reduction, scores: np.ndarray, score: str = "maximal",
                    ace_options: dict | None = None, plan: MemoryPlan | None = None,
                    engine: Engine | None = None) -> np.ndarray:
    """PCACE values ``(C, T)`` of a reduced block against an ``(N, T)`` score matrix.

    The one step from principal components to values that every route shares: ACE per
    (channel, target), batched in calls sized by ``plan``, on ``engine`` (None: this
    process); dead channels score 0.
    """
    n, k = red.scores.shape[1], max(1, red.scores.shape[2])
    chunk = (plan or MemoryPlan.from_budget(2 * 2**30)).ace_problems(n, k)
    if engine is None:
        return target_values(red, scores, score, ace_options, chunk)
    values = np.zeros((red.scores.shape[0], scores.shape[1]))
    live = np.flatnonzero(~red.dead.cpu().numpy())
    if live.size:
        z = red.scores.to(torch.float64)
        ys = torch.as_tensor(np.ascontiguousarray(scores.T), dtype=torch.float64,
                             device=z.device)
        problems = Problems(z, ys, live, order="channel")
        values[live] = engine.values(problems, chunk=chunk, score=score,
                                     ace_options=ace_options or {},
                                     stage="observed").reshape(live.size, scores.shape[1])
    return values


@dataclass
class _Gathered:
    """One group's blocks of a layer, gathered until the layer is done."""

    values: list[np.ndarray] = field(default_factory=list)
    n_components: list[np.ndarray] = field(default_factory=list)
    explained: list[np.ndarray] = field(default_factory=list)
    dead: list[np.ndarray] = field(default_factory=list)
    parts: list[torch.Tensor] = field(default_factory=list)
    boots: list[np.ndarray] = field(default_factory=list)


def score_layers(run: Scoring, routes: dict[str, Route], names: Sequence[str],
                 out: ScoredLayers, *, progress: bool = False,
                 on_step: Callable[[], None] | None = None, desc: str = "scoring channels"
                 ) -> None:
    """Score ``names`` (each from its route, in order) into ``out``, checkpointing each
    finished layer; an interrupt or a lost cluster marks ``out`` stopped."""
    if out.interrupted or not names:
        return
    bar = progress_bar(total=sum(routes[n].shape(n)[0] for n in names), desc=desc,
                       unit="ch", disable=not progress)
    try:
        for name in names:
            bar.set_postfix_str(name, refresh=False)
            _score_layer(run, routes[name], name, out, bar, on_step)
    except (KeyboardInterrupt, Interrupted, EngineLost) as err:
        out.stop(err)
    finally:
        bar.close()


def _score_layer(run: Scoring, route: Route, name: str, out: ScoredLayers, bar: Any,
                 on_step: Callable[[], None] | None) -> None:
    opts = run.options
    gathered = [_Gathered() for _ in run.groups]
    blocks = route.reduce(name, [g.rows for g in run.groups], components=opts.components,
                          plan=run.plan, pca_dtype=opts.pca_dtype, device=run.device)
    while True:
        with run.watch("reduce"):
            block = next(blocks, None)
        if block is None:
            break
        for g, acc, red in zip(run.groups, gathered, block.reductions, strict=True):
            _add_block(run, g, acc, red, block)
        bar.update(block.channels.stop - block.channels.start)
        del block
        if on_step is not None:
            on_step()
    tables, stability, comps, nulls = [], {}, {}, {}
    for g, acc in zip(run.groups, gathered, strict=True):
        table, stab, comps[g.label], null = _group_result(run, name, g, acc)
        tables.append(table)
        stability.update(stab)
        nulls.update(null)
    table = pd.concat(tables, ignore_index=True)
    for label, comp in comps.items():
        out.components[name if not run.grouped else (name, label)] = comp
    out.tables.append(table)
    out.shapes[name] = route.shape(name)
    if stability:
        out.stability[name] = stability
    if nulls:
        out.nulls[name] = nulls
    run.checkpoints.save(name, table, stability or None, comps, run.scores, route.shape(name),
                         group_labels(run.groups, len(run.scores)) if run.grouped else None,
                         nulls=nulls or None)


def _add_block(run: Scoring, group: ImageGroup, acc: _Gathered, red: Reduction,
               block: ReducedBlock) -> None:
    """One block of channels over one group of images, against its targets."""
    opts = run.options
    scores = group.scores(run.scores)
    with run.watch("ace"):
        values = score_reduction(red, scores, opts.score, opts.ace_options, run.plan,
                                 run.engine)
    dead = red.dead.cpu().numpy()
    acc.values.append(np.where(dead[:, None], 0.0, values))
    acc.n_components.append(red.n_components.cpu().numpy().astype(int))
    acc.explained.append(red.explained_variance.cpu().numpy())
    acc.dead.append(dead.astype(bool))
    acc.parts.append(red.scores.cpu())
    if opts.bootstrap and block.maps is not None:
        part = block.maps if group.rows is None else block.maps[:, torch.as_tensor(group.rows)]
        maps = part.transpose(0, 1).cpu()
        n = maps.shape[0] // 2 if opts.interval == "half-sample" else maps.shape[0]
        with run.watch("bootstrap"):
            acc.boots.append(_bootstrap(run, maps, scores, n))


def _bootstrap(run: Scoring, maps: torch.Tensor, scores: np.ndarray, n: int) -> np.ndarray:
    """A block's values on the bootstrap's resamples of the images (``n`` per resample)."""
    opts = run.options
    return bootstrap_values(maps, scores, opts.components, opts.bootstrap, opts.seed,
                            score=opts.score, engine=run.engine, ace_options=opts.ace_options,
                            scheme=interval_scheme(opts.interval),
                            chunk=run.plan.replicates_per_call(n, maps.shape[1],
                                                               maps[0, 0].numel()))


def _group_result(run: Scoring, name: str, group: ImageGroup, acc: _Gathered
                  ) -> tuple[pd.DataFrame, dict, torch.Tensor, dict]:
    """A group's rows of a layer (per target, with statistics), its components and its
    null's records."""
    values = np.concatenate(acc.values)
    z = _pad_cat(acc.parts)
    boot = np.concatenate(acc.boots) if acc.boots else None
    dead = np.concatenate(acc.dead).astype(bool)
    scores = group.scores(run.scores)
    tables, stability, nulls = [], {}, {}
    for j, column in enumerate(group.columns):
        target = run.target_names[column]
        table = pd.DataFrame({
            "layer": name, "channel": np.arange(values.shape[0]), "target": target,
            "pcace": values[:, j],
            "n_components": np.concatenate(acc.n_components).astype(int),
            "explained_variance": np.concatenate(acc.explained),
            "dead": dead,
        })
        if group.label is not None:
            table.insert(1, "label", group.label)
        stab, null = _add_statistics(run, table, z, scores[:, j],
                               None if boot is None else boot[:, j])
        tables.append(table)
        if stab is not None:
            stability[(group.label, target)] = stab
        if null is not None:
            nulls[null_key(group.label, target)] = null
    return pd.concat(tables, ignore_index=True), stability, z, nulls


def _add_statistics(run: Scoring, table: pd.DataFrame, z: torch.Tensor, scores: np.ndarray,
                    boot: np.ndarray | None) -> tuple[dict | None, dict | None]:
    """The null's and the bootstrap's columns of one (group, target)'s rows; the
    stability summary and the null's record."""
    opts = run.options
    observed = table.pcace.to_numpy()
    record = None
    if opts.permutations and opts.null != "shared":  # "shared": once for all layers
        with run.watch("null"):
            summary, record = null_table(observed, z, scores, method=opts.null,
                                         permutations=opts.permutations, seed=opts.seed,
                                         chunk=run.plan.ace_problems(z.shape[1], z.shape[2]),
                                         score=opts.score, ace_options=opts.ace_options,
                                         engine=run.engine)
            _join(table, summary)
        record = {k: v for k, v in record.items() if k != "null"}  # not the values
    if boot is None:
        return None, record
    _join(table, bootstrap_summary(observed, boot, opts.level, method=opts.interval))
    return layer_stability(observed, boot), record


def null_key(label: Any, target: str) -> str:
    """A (label, target)'s key in the manifest's null records."""
    return target if label is None else f"{label}/{target}"


def _join(table: pd.DataFrame, summary: pd.DataFrame) -> None:
    for col in summary.columns:
        if col not in table.columns and col != "channel":
            table[col] = summary[col].to_numpy()


def _pad_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1:  # a whole layer in one block: no copy
        return parts[0]
    k = max(p.shape[-1] for p in parts)
    padded = [torch.nn.functional.pad(p, (0, k - p.shape[-1])) for p in parts]
    return torch.cat(padded)
