"""The ablated forward passes behind :func:`pcace.stats.ablate.ablate`.

Two ways to take a set ``S`` of channels of one module's output out of the network:

- :class:`FillAblator` (``mode="mean"`` and ``"zero"``): every image's channels ``S``
  take one constant map (their mean over a reference, or 0); one forward pass per set.
- :class:`ResampleAblator` (``mode="resample"``): every image's channels ``S`` take,
  jointly, the maps of the same channels of a donor image from the evaluation set. The
  donors are random derangements of the whole set (:func:`derangements`: no image is its
  own donor, and donors are not limited to one batch), the same ones for every set, so
  that sets are compared on the same donors. Each set costs one pass up to the module
  (stopped there) that records the maps of ``S`` for every image, then one full pass per
  derangement. Memory: the images, as in the other modes, plus ``(N, |S|, ...)`` maps.

Both return, per set, a :class:`SetResult`: the mean ablated score, accuracy, mean
``|change|`` of each image's score and the share of the score's variance that runs
through ``S`` (``variance_share``; see :func:`pcace.stats.ablate.ablate`).

Examples
--------
>>> derangements(4, 2, seed=0).shape
(2, 4)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..inputs.data import as_batches
from ..inputs.hooks import forward_hooks
from ..inputs.layers import unknown_layers_message

__all__ = ["FillAblator", "ResampleAblator", "SetResult", "derangements"]


# ------------------------------------------------------------------------- helpers

def _module(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    modules = dict(model.named_modules())
    if not isinstance(layer, str) or layer not in modules or layer == "":
        raise ValueError(unknown_layers_message([str(layer)], [n for n in modules if n]))
    return modules[layer]


def _batches(images: Any, batch_size: int) -> list[torch.Tensor]:
    return [b for b in as_batches(images, batch_size)]


def _output_channels(out: Any, layer: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.ndim < 2:
        raise ValueError(f"the output of {layer!r} must be a tensor (N, C, ...) to ablate "
                         f"channels; got {type(out).__name__}"
                         + (f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor)
                            else ""))
    return out


def _forward(model: torch.nn.Module, batches: list[torch.Tensor], score_fn: Callable,
             dev: torch.device, want_pred: bool,
             before: Callable[[int, int], None] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores (and predicted classes) of every image; ``before(start, stop)`` is called
    with the positions of each batch's images before it runs."""
    scores, preds = [], []
    start = 0
    with torch.no_grad():
        for x in batches:
            if before is not None:
                before(start, start + len(x))
            start += len(x)
            out = model(x.to(dev))
            scores.append(torch.as_tensor(score_fn(out)).detach().double().cpu().flatten())
            if want_pred:
                logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
                if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
                    raise ValueError("accuracy needs class outputs of shape (N, classes)")
                preds.append(logits.argmax(dim=1).cpu())
    return torch.cat(scores), (torch.cat(preds) if want_pred else None)


def derangements(n: int, count: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """``count`` random derangements of ``range(n)``: permutations without a fixed point.

    Each is drawn uniformly from all derangements of ``n`` (a random permutation, drawn
    again while it has a fixed point: about e = 2.7 draws on average).

    Parameters
    ----------
    n : int
        Number of images, at least 2.
    count : int
        Number of derangements.
    seed : int or numpy.random.Generator, default 0
        Seed of ``numpy.random.default_rng``, or a generator.

    Returns
    -------
    numpy.ndarray
        ``(count, n)`` int64; row ``r`` gives each image's donor: ``out[r, i] != i``.

    Examples
    --------
    >>> d = derangements(5, 3, seed=1)
    >>> bool((d != range(5)).all()), sorted(d[0].tolist())
    (True, [0, 1, 2, 3, 4])
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 elements; got {n}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    out = np.empty((int(count), int(n)), dtype=np.int64)
    identity = np.arange(n)
    for r in range(int(count)):
        perm = rng.permutation(n)
        while (perm == identity).any():
            perm = rng.permutation(n)
        out[r] = perm
    return out


# ---------------------------------------------------------------------- the passes

@dataclass
class SetResult:
    """What ablating one set of channels did.

    Attributes
    ----------
    score : float
        Mean ablated score.
    accuracy : float or None
        Top-1 accuracy of the ablated network (None without labels).
    change : float
        Mean over images of ``|ablated - unablated score|``.
    share : float
        ``variance_share`` of the set (NaN where the unablated score does not vary).
    spread : dict of str to float
        Standard deviation over the donor derangements of ``score``, ``accuracy``,
        ``change`` and ``share`` (resample mode only; empty otherwise).
    """

    score: float
    accuracy: float | None
    change: float
    share: float
    spread: dict[str, float] = field(default_factory=dict)


class _Runner:
    """What both ablators share: the unablated scores, labels, a cache by channel set."""

    #: Forward passes per set (for a progress bar).
    passes: int = 1

    def __init__(self, model: torch.nn.Module, layer: str, batches: list[torch.Tensor],
                 score_fn: Callable, dev: torch.device, labels: torch.Tensor | None,
                 base_scores: torch.Tensor):
        self.model, self.layer, self.batches = model, layer, batches
        self.score_fn, self.dev, self.labels = score_fn, dev, labels
        self.base_scores = base_scores
        var = float(base_scores.var()) if len(base_scores) > 1 else 0.0
        self.base_var = var if var > 0 else float("nan")
        self.cache: dict[frozenset, SetResult] = {}

    def run(self, channels: np.ndarray) -> SetResult:
        """The result of ablating ``channels`` (computed once per distinct set)."""
        key = frozenset(int(c) for c in channels)
        if key not in self.cache:
            idx = torch.as_tensor(sorted(key), dtype=torch.long, device=self.dev)
            self.cache[key] = self._run(idx)
        return self.cache[key]

    def _run(self, idx: torch.Tensor) -> SetResult:
        raise NotImplementedError

    def _pass(self, hook: Callable, before: Callable[[int, int], None] | None = None
              ) -> tuple[torch.Tensor, float | None]:
        with forward_hooks(self.model, {self.layer: hook}):
            scores, preds = _forward(self.model, self.batches, self.score_fn, self.dev,
                                     self.labels is not None, before)
        acc = None if preds is None else float((preds == self.labels).double().mean())
        return scores, acc


class FillAblator(_Runner):
    """Channels replaced by one constant map per channel (``fill[c]``), or by 0 (``fill``
    None). ``share`` is ``Var(f(x) - f(x with S filled)) / Var f`` (see
    :func:`pcace.stats.ablate.ablate`)."""

    def __init__(self, *args: Any, fill: torch.Tensor | None = None):
        super().__init__(*args)
        self.fill = fill

    def _run(self, idx: torch.Tensor) -> SetResult:
        fill = None if self.fill is None else self.fill[idx]

        def hook(_mod, _inp, out):
            out = out.clone()
            if fill is None:
                out[:, idx] = 0
            else:
                out[:, idx] = fill.to(out.dtype)
            return out

        scores, acc = self._pass(hook)
        diff = scores - self.base_scores
        share = float(diff.var()) / self.base_var if len(diff) > 1 else float("nan")
        return SetResult(float(scores.mean()), acc, float(diff.abs().mean()), share)


class _Recorded(Exception):
    """Stops a recording pass once the ablated module has run."""


class ResampleAblator(_Runner):
    """Channels taken from donor images: ``donors[r, i]`` gives image ``i``'s donor in
    derangement ``r``. ``share`` is Jansen's ``mean (f(x) - f(x with S from x'))^2 /
    (2 Var f)``, averaged over the derangements."""

    def __init__(self, *args: Any, donors: np.ndarray):
        super().__init__(*args)
        self.donors = torch.as_tensor(np.asarray(donors), dtype=torch.long, device=self.dev)
        self.passes = len(self.donors) + 1

    def _record(self, idx: torch.Tensor) -> torch.Tensor:
        """The maps of channels ``idx`` of every image, ``(N, len(idx), ...)``, from a pass
        stopped at the module (written in place: no second copy while they are gathered)."""
        n = sum(len(x) for x in self.batches)
        held: dict[str, Any] = {"maps": None, "start": 0}

        def hook(_mod, _inp, out):
            part = _output_channels(out, self.layer).detach()[:, idx]
            if held["maps"] is None:
                held["maps"] = part.new_empty((n, *part.shape[1:]))
            start = held["start"]
            held["maps"][start:start + len(part)] = part
            raise _Recorded

        with torch.no_grad(), forward_hooks(self.model, {self.layer: hook}):
            for x in self.batches:
                try:
                    self.model(x.to(self.dev))
                except _Recorded:
                    held["start"] += len(x)
                    continue
                raise ValueError(f"module {self.layer!r} was not called in the forward pass")
        return held["maps"]

    def _run(self, idx: torch.Tensor) -> SetResult:
        maps = self._record(idx)
        rows: dict[str, torch.Tensor] = {}

        def hook(_mod, _inp, out):
            out = out.clone()
            out[:, idx] = maps[rows["donors"]].to(out.dtype)
            return out

        values: dict[str, list[float]] = {"score": [], "accuracy": [], "change": [], "share": []}
        for perm in self.donors:
            def before(start: int, stop: int, perm: torch.Tensor = perm) -> None:
                rows["donors"] = perm[start:stop]

            scores, acc = self._pass(hook, before)
            diff = scores - self.base_scores
            values["score"].append(float(scores.mean()))
            values["accuracy"].append(np.nan if acc is None else acc)
            values["change"].append(float(diff.abs().mean()))
            values["share"].append(float((diff ** 2).mean()) / (2 * self.base_var))
        mean = {k: float(np.mean(v)) for k, v in values.items()}
        spread = {k: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
                  for k, v in values.items()}
        if self.labels is None:
            spread.pop("accuracy")
        return SetResult(mean["score"], None if self.labels is None else mean["accuracy"],
                         mean["change"], mean["share"], spread)
