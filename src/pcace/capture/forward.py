"""The one forward loop: the model over batches of images, with hooks on chosen layers.

Every pass pcace makes over the images goes through :func:`forward_pass`: the first pass
that captures maps and scores, the further passes of the streamed routes (stopped as soon
as the last hooked layer has run), and the passes over shards that an engine's workers
run. Each hook is a *feed*: ``feed(maps, offset)`` gets a layer's output for one batch,
``(B, C, H, W)``, and the position of the batch's first image; it may keep a view of the
maps only for the duration of the call (an in-place op later in the network may change
them). The loop runs the model in eval mode, without gradients, on the device, restores
the model afterwards, and checks that every hooked layer ran exactly once per batch and
produced a 4-D map per image.

Examples
--------
>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 1))
>>> seen = []
>>> done = forward_pass(net, torch.rand(10, 1, 4, 4).split(4),
...                     {"0": lambda maps, lo: seen.append((lo, maps.shape[0]))},
...                     score_fn=lambda out: out[:, 0], progress=False)
>>> seen, done.images, done.scores.shape
([(0, 4), (4, 4), (8, 2)], 10, (10,))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.malloc import kept_heap, tuning_requested
from ..core.progress import progress_bar
from ..inputs.hooks import evaluating, forward_hooks

__all__ = ["Feed", "PassResult", "batch_images", "forward_pass", "image_sums", "short_list"]

#: A layer's hook in a pass: ``feed(maps (B, C, H, W), offset of the batch's first image)``.
Feed = Callable[[torch.Tensor, int], None]


class _Stop(Exception):
    """Raised by the last hooked layer of a pass that needs nothing after it."""


@dataclass
class PassResult:
    """What a :func:`forward_pass` saw.

    Attributes
    ----------
    images : int
        Images passed.
    forward_calls : int
        Calls of the model (one per non-empty batch).
    seconds : float
        Wall time of the pass.
    scores : numpy.ndarray or None
        ``(N,)`` (or ``(N, T)``) float64 scores, when a ``score_fn`` was given.
    checksums : torch.Tensor or None
        ``(N,)`` float64 sum of each image's pixels, when asked for: two passes that must
        see the same images compare them.
    """

    images: int
    forward_calls: int
    seconds: float
    scores: np.ndarray | None = None
    checksums: torch.Tensor | None = None


def batch_images(item: Any, index: int = 0) -> torch.Tensor:
    """The images of a batch as a ``(B, C, H, W)`` tensor: the batch itself, or the first
    element of an ``(images, labels, ...)`` item, NumPy arrays converted.

    Examples
    --------
    >>> batch_images((torch.zeros(2, 1, 3, 3), torch.tensor([0, 1]))).shape
    torch.Size([2, 1, 3, 3])
    """
    if isinstance(item, tuple | list) and item:
        item = item[0]
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(item)
    if not isinstance(item, torch.Tensor) or item.ndim != 4:
        got = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
        raise ValueError(f"batch {index} must be an image tensor (B, C, H, W); got {got}")
    return item


def image_sums(images: torch.Tensor) -> torch.Tensor:
    """Each image's pixel sum in float64 (on the CPU): a cheap fingerprint of a batch."""
    return images.detach().flatten(1).sum(1, dtype=torch.float64).cpu()


def short_list(values: list[int], limit: int = 10) -> str:
    """The first ``limit`` values, then how many more."""
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return f"{values[:limit]}{more}"


def forward_pass(model: nn.Module, batches: Iterable[Any], hooks: Mapping[str, Feed], *,
                 device: torch.device | str = "cpu",
                 score_fn: Callable[[Any], Any] | None = None,
                 stop_early: bool = False, checksums: bool = False,
                 desc: str = "forward pass", progress: bool = True,
                 on_step: Callable[[], None] | None = None,
                 tune_malloc: bool | None = None) -> PassResult:
    """Run ``model`` over ``batches`` once, feeding each hooked layer's output to its feed.

    Parameters
    ----------
    model : torch.nn.Module
        Run in eval mode, without gradients, on ``device``; its training flags and device
        are restored afterwards (:func:`pcace.inputs.hooks.evaluating`).
    batches : iterable
        Image batches ``(B, C, H, W)``, or items whose first element is one
        (:func:`batch_images`). Empty batches are skipped.
    hooks : mapping of str to Feed
        ``{layer: feed(maps, offset)}``; every layer must run exactly once per batch.
    device : torch.device or str
        Where the model runs.
    score_fn : callable, optional
        ``score_fn(outputs) -> (B,)`` (or ``(B, T)`` with a true ``returns_matrix``): the
        score of each image, collected in :attr:`PassResult.scores`.
    stop_early : bool
        Stop each batch's forward pass once every hooked layer has run (the rest of the
        network is not needed). Not with ``score_fn``.
    checksums : bool
        Record each image's pixel sum (:attr:`PassResult.checksums`).
    desc, progress
        The progress bar's label; whether to show it.
    on_step : callable, optional
        Called after each batch; it may raise to stop the pass.
    tune_malloc : bool, optional
        Keep freed memory in glibc's heap during the pass (process-wide, so off unless
        True or ``PCACE_TUNE_MALLOC=1``; :func:`pcace.core.malloc.kept_heap`).

    Returns
    -------
    PassResult
    """
    if stop_early and score_fn is not None:
        raise ValueError("a pass that scores the images runs the whole network: no stop_early")
    state = _PassState(set(hooks), stop_early)
    scores: list[np.ndarray] = []
    sums: list[torch.Tensor] = []
    bar = progress_bar(batches, desc=desc, unit="batch", disable=not progress)
    device = torch.device(device)
    start = time.perf_counter()
    try:
        with evaluating(model, device), \
                forward_hooks(model, {name: state.hook(name, feed)
                                      for name, feed in hooks.items()}), \
                torch.inference_mode(), kept_heap(tuning_requested(tune_malloc)):
            for index, item in enumerate(bar):
                images = batch_images(item, index)
                if images.shape[0] == 0:
                    continue
                if checksums:
                    sums.append(image_sums(images))
                state.begin(images.shape[0])
                try:
                    outputs = model(images.to(device))
                except _Stop:
                    outputs = None
                state.end()
                if score_fn is not None:
                    scores.append(_batch_scores(score_fn(outputs), images.shape[0],
                                                state.offset - images.shape[0],
                                                getattr(score_fn, "returns_matrix", False)))
                if on_step is not None:
                    on_step()
    finally:
        bar.close()
    return PassResult(
        images=state.offset, forward_calls=state.calls, seconds=time.perf_counter() - start,
        scores=np.concatenate(scores) if scores else None,
        checksums=torch.cat(sums) if checksums and sums else
        (torch.zeros(0, dtype=torch.float64) if checksums else None))


class _PassState:
    """What the hooks of one pass share: which layers ran in the current batch, where it
    starts."""

    def __init__(self, names: set[str], stop_early: bool):
        self.names, self.stop_early = names, stop_early
        self.seen: set[str] = set()
        self.offset = self.size = self.calls = 0

    def begin(self, size: int) -> None:
        self.seen, self.size = set(), size

    def end(self) -> None:
        missing = sorted(self.names - self.seen)
        if missing:
            raise ValueError(f"layer(s) {missing} did not run in the forward pass, so they "
                             "have no output to capture; pick modules the model calls in "
                             "forward()")
        self.offset += self.size
        self.calls += 1

    def hook(self, name: str, feed: Feed) -> Callable:
        def run(module: nn.Module, inputs: Any, output: Any) -> None:
            if name in self.seen:
                raise ValueError(f"layer {name!r} ({type(module).__name__}) ran more than "
                                 "once in one forward pass (a module reused in the network, "
                                 "such as a shared ReLU), so its output is ambiguous; capture "
                                 "a module that runs once, e.g. the one before it")
            check_output(name, output, self.size)
            feed(output.detach(), self.offset)
            self.seen.add(name)
            if self.stop_early and len(self.seen) == len(self.names):
                raise _Stop
        return run


def check_output(name: str, output: Any, batch_size: int) -> None:
    """A hooked layer's output must be a ``(B, C, H, W)`` tensor for the batch's images."""
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"layer {name!r} returned a {type(output).__name__}, not a tensor; "
                         "capture a module whose output is a (B, C, H, W) tensor")
    if output.ndim != 4 or output.shape[0] != batch_size:
        raise ValueError(f"layer {name!r} produced shape {tuple(output.shape)}; expected "
                         f"(B={batch_size}, C, H, W). PCACE needs convolutional feature maps: "
                         "pick a layer from describe_layers(model, input_shape)")


def _batch_scores(values: Any, batch_size: int, offset: int, matrix: bool = False
                  ) -> np.ndarray:
    s = values.detach() if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    if matrix and s.ndim == 2 and s.shape[0] == batch_size and s.shape[1] >= 1:
        pass  # several targets: (B, T)
    elif tuple(s.shape) != (batch_size,):
        hint = " (for an (B, 1) output use out[:, 0])" if tuple(s.shape) == (batch_size, 1) \
            else ""
        raise ValueError(f"score_fn must return one score per image, shape ({batch_size},); "
                         f"got {tuple(s.shape)}{hint}")
    s = s.to("cpu", torch.float64).numpy().copy()
    bad = np.flatnonzero(~np.isfinite(s).reshape(batch_size, -1).all(axis=1))
    if bad.size:
        raise ValueError(f"score_fn returned NaN or inf for image(s) "
                         f"{short_list((bad + offset).tolist())}; check the target and the "
                         "images")
    return s


def score_batch(score_fn: Callable[[Any], Any], outputs: Any, batch_size: int,
                offset: int) -> np.ndarray:
    """One batch's scores from the model's outputs, checked (shape, finite)."""
    return _batch_scores(score_fn(outputs), batch_size, offset,
                         getattr(score_fn, "returns_matrix", False))
