"""One forward pass over the images, keeping the outputs of chosen layers in bounded memory.

:func:`capture` runs the model once per batch with forward hooks on the requested modules
(:mod:`pcace.inputs.layers` names and checks them); each hook writes its layer's output straight
into an :class:`pcace.capture.store.ActivationStore`, channel-major, and the model's score per
image is kept. The returned :class:`Capture` gives the layers back as copies
(:meth:`Capture.layer`) or as channel blocks (:meth:`Capture.blocks`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.budget import resolve_budget
from ..core.validation import byte_count
from ..core.validation import device as resolve_device
from ..inputs.hooks import evaluating
from ..inputs.layers import conv_layer_names, describe_layers, resolve_layers
from .forward import Feed, PassResult, batch_images, forward_pass, short_list
from .store import ActivationStore, ChannelIndex, device_budget_bytes

__all__ = ["Capture", "capture", "conv_layer_names", "describe_layers", "resolve_layers",
           "non_finite_error"]


class Capture:
    """The result of :func:`capture`: activations of the requested layers and the scores.

    Use it as a context manager (or call :meth:`close`) to free the activations
    and remove spilled files; garbage collection does the same.

    Attributes
    ----------
    layers : list of str
        Captured layer names, in network order.
    scores : numpy.ndarray
        ``(N,)`` float64: ``score_fn`` of the model's outputs, per image (``(N, T)`` for a
        score function that returns several scores per image).
    n_images : int
    shapes : dict
        ``{layer: (C, H, W)}``.
    spilled : dict
        ``{layer: bool}``: whether the layer lives on disk.
    on_device : dict
        ``{layer: bool}``: whether the layer lives in the device's (GPU's) memory.
    forward_calls : int
        Forward passes of the model (one per non-empty batch).
    seconds : float
        Wall time of the pass.
    """

    def __init__(self, store: ActivationStore, layers: list[str], scores: np.ndarray,
                 forward_calls: int, seconds: float):
        self._store = store
        self.layers = layers
        self.scores = scores
        self.n_images = int(scores.shape[0])
        self.shapes = store.shapes
        self.spilled = store.spilled
        self.on_device = store.on_device
        self.forward_calls = forward_calls
        self.seconds = seconds

    def layer(self, name: str, channels: ChannelIndex = slice(None)) -> torch.Tensor:
        """Activations of a channel subset of one layer.

        Parameters
        ----------
        name : str
            A captured layer.
        channels : int, slice or sequence of int, default all
            Which channels; an int keeps the channel axis.

        Returns
        -------
        torch.Tensor
            ``(N, c, H, W)`` float32, a fresh copy (for a spilled layer, only
            those channels are read from disk).

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3))
        >>> with capture(net, [torch.rand(5, 1, 6, 6)], None, lambda out: out.sum((1, 2, 3)),
        ...              progress=False) as cap:
        ...     tuple(cap.layer("0", slice(1, 3)).shape)
        (5, 2, 4, 4)
        """
        return self._store.read(name, channels)

    def blocks(self, name: str, channels: int, *, destructive: bool = False
               ) -> Iterator[tuple[slice, torch.Tensor]]:
        """Walk a layer in channel-major blocks ``(c, N, H*W)`` of at most ``channels``.

        Parameters
        ----------
        name : str
            A captured layer.
        channels : int
            Channels per block (the last block may hold fewer).
        destructive : bool, default False
            False: every block is the caller's own tensor. True: for a layer held in
            memory (RAM or a GPU's) the blocks are **views of the stored activations**,
            with no copy, and the caller may overwrite them, which destroys what the store
            holds (the pipeline standardises them in place; read anything else you need
            from the layer first). For a spilled layer each block is read from disk into a
            fresh tensor either way, the next one on a background thread while the caller
            works on the current one (so two blocks are in memory at once).

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 6, 3))
        >>> with capture(net, [torch.rand(4, 1, 6, 6)], None, lambda out: out.sum((1, 2, 3)),
        ...              progress=False) as cap:
        ...     [tuple(b.shape) for _, b in cap.blocks("0", 4)]
        [(4, 4, 16), (2, 4, 16)]
        """
        return self._store.blocks(name, channels, destructive=destructive)

    @property
    def closed(self) -> bool:
        return self._store.closed

    def close(self) -> None:
        """Free the activations and remove any spilled files."""
        self._store.close()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        spilled = sum(self.spilled.values())
        return (f"Capture({len(self.layers)} layers, {self.n_images} images, "
                f"{spilled} spilled, {self.forward_calls} forward calls)")


def capture(model: nn.Module, batches: Iterable[torch.Tensor],
            layers: str | Iterable[str] | None, score_fn: Callable[[Any], torch.Tensor], *,
            device: str | torch.device = "auto", memory_budget: int | str = "auto",
            spill_dir: str | Path | None = None, progress: bool = True,
            check_finite: bool = True, device_memory_budget: int | str = "auto",
            tune_malloc: bool | None = None, on_step: Callable[[], None] | None = None,
            observers: Mapping[str, Callable] | None = None) -> Capture:
    """Run the model once over the batches and keep the outputs of the chosen layers.

    Parameters
    ----------
    model : torch.nn.Module
        Run in eval mode on ``device``; its training flags and device are restored after.
    batches : iterable of torch.Tensor
        Preprocessed ``(B, C, H, W)`` batches (or items ``(images, ...)``); empty ones skipped.
    layers : None, str or iterable of str
        Qualified module names (:func:`resolve_layers`); None: every conv layer. Each must
        give a 4-D tensor and run once per forward pass.
    score_fn : callable
        ``outputs -> (B,)`` scores; ``(B, T)`` with a true ``returns_matrix``
        (:class:`pcace.inputs.targets.TargetSet`), making ``Capture.scores`` ``(N, T)``.
    device : str or torch.device, default "auto"
        Where the model runs (``"auto"``: CUDA when available, else the CPU).
    memory_budget : int or "auto", default "auto"
        Bytes of activations held in RAM, the rest spilled to disk (``"auto"``:
        :func:`pcace.core.budget.default_memory_budget`; :func:`pcace.rank` passes its own).
    spill_dir : str or Path, optional
        Parent of the temporary spill directory, removed on close (default: the system's).
    progress : bool, default True
        Show a tqdm bar over the batches on stderr.
    check_finite : bool, default True
        Check each output for NaN and inf as it comes; off for a caller that checks later.
    device_memory_budget : int or "auto", default "auto"
        Off the CPU: bytes of activations kept on the device, the rest in RAM, then disk
        (``"auto"``: half the device's free memory with the model on it; 0: all in RAM).
    tune_malloc : bool, optional
        Keep freed memory in glibc's heap during the pass (process-wide, so off unless True
        or ``PCACE_TUNE_MALLOC=1``; :func:`pcace.core.malloc.kept_heap`).
    on_step : callable, optional
        Called after each batch; it may raise to stop the pass (the store is then closed).
    observers : mapping of str to callable, optional
        More feeds ``{layer: feed(maps, offset)}`` (:data:`pcace.capture.forward.Feed`) on
        the same pass, for layers not stored (``layers`` may be ``[]``).

    Returns
    -------
    Capture

    Raises
    ------
    ValueError
        A layer's output is not a 4-D tensor, holds NaN or inf, or the layer ran more than
        once or not at all in a pass; ``score_fn`` returned the wrong shape or non-finite
        values; no images came.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    >>> images = torch.rand(20, 1, 8, 8)
    >>> with capture(net, images.split(8), ["0"], lambda out: out[:, 1],
    ...              progress=False) as cap:
    ...     cap.n_images, cap.shapes["0"], cap.forward_calls
    (20, (4, 6, 6), 3)
    """
    observers = dict(observers or {})
    names = _stored_layers(model, layers, observers)
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable (outputs -> (B,) scores); got "
                        f"{type(score_fn).__name__}")
    device = resolve_device(device)
    if not (isinstance(device_memory_budget, str) and device_memory_budget == "auto"):
        byte_count(device_memory_budget, "device_memory_budget")
    store = ActivationStore(names, resolve_budget(memory_budget), spill_dir,
                            n_images=_known_count(batches))
    feeds = {name: _storing(store, name, check_finite) for name in names}
    done = _fill(store, model, batches, {**feeds, **observers}, device, device_memory_budget,
                 score_fn=score_fn, progress=progress, on_step=on_step, tune_malloc=tune_malloc)
    return Capture(store, names, done.scores, done.forward_calls, done.seconds)


def _fill(store: ActivationStore, model: nn.Module, batches: Iterable[torch.Tensor],
          feeds: dict[str, Feed], device: torch.device, device_memory_budget: int | str,
          **forward: Any) -> PassResult:
    """Run the forward pass that feeds the store and finalise it; close it on any failure.

    ``forward`` holds :func:`pcace.capture.forward.forward_pass`'s ``score_fn``, ``progress``,
    ``on_step`` and ``tune_malloc``; returns what that gives.
    """
    try:
        with evaluating(model, device):
            if device.type != "cpu":  # once the model is on the device: its free memory
                store.device = device
                store.device_budget = device_budget_bytes(device, device_memory_budget)
            done = forward_pass(model, batches, feeds, device=device, **forward)
        if done.scores is None:
            raise ValueError("batches yielded no images; pass at least one (B, C, H, W) batch")
        store.finalize()
    except BaseException:
        store.close()
        raise
    return done


def _stored_layers(model: nn.Module, layers: Any, observers: dict[str, Feed]) -> list[str]:
    """The layers to store: none when only observers are asked for (``layers`` empty)."""
    empty = observers and isinstance(layers, list | tuple) and not layers
    names = [] if empty else resolve_layers(model, layers)
    both = sorted(set(names) & set(observers))
    if both:
        raise ValueError(f"layer(s) {both} are both stored and observed")
    return names


def _storing(store: ActivationStore, name: str, check_finite: bool) -> Feed:
    """The feed that writes a layer's batch into the store (checked for NaN/inf first)."""
    def feed(maps: torch.Tensor, offset: int) -> None:
        if check_finite:
            _check_finite(name, maps, offset)
        # copied now, before a later in-place op (an inplace ReLU) can change it
        store.put(name, maps)
    return feed


def _check_finite(name: str, output: torch.Tensor, offset: int) -> None:
    # one fast reduction, no boolean copy: min and max propagate NaN and show an inf
    lo, hi = torch.aminmax(output)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return
    bad = ~torch.isfinite(output)
    if not bool(bad.any()):
        return
    channels = bad.any(dim=(0, 2, 3)).nonzero().flatten().tolist()
    images = (bad.any(dim=(1, 2, 3)).nonzero().flatten() + offset).tolist()
    raise non_finite_error(name, channels, images)


def non_finite_error(name: str, channels: list[int], images: list[int],
                     example: bool = False) -> ValueError:
    """The error for NaN/inf in a layer's output, naming its channels and images.

    ``example``: the images are those of the first listed channel only.
    """
    return ValueError(f"layer {name!r} produced NaN or inf in channel(s) {short_list(channels)}"
                      f"{', e.g.' if example else ''} for image(s) {short_list(images)} (positions "
                      "in the input order). Check those images, the weights, or overflow "
                      "(e.g. half precision)")


def _known_count(batches: Any) -> int | None:
    """The number of images the batches will yield, when it is known without iterating."""
    n = getattr(batches, "n_images", None)
    if isinstance(batches, list | tuple):
        try:
            n = sum(batch_images(item, i).shape[0] for i, item in enumerate(batches))
        except (TypeError, ValueError, AttributeError, IndexError):
            n = None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None
