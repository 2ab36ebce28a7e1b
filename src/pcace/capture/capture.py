"""One forward pass over the images, keeping the outputs of chosen layers in bounded memory.

:func:`capture` runs the model once per batch with forward hooks on the requested modules
(:mod:`pcace.inputs.layers` names and checks them); each hook writes its layer's output straight
into an :class:`pcace.capture.store.ActivationStore`, channel-major, and the model's score per
image is kept. The returned :class:`Capture` gives the layers back as copies
(:meth:`Capture.layer`) or as channel blocks (:meth:`Capture.blocks`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.malloc import kept_heap, tuning_requested
from ..core.plan import resolve_budget
from ..core.validation import byte_count, integer
from ..core.validation import device as resolve_device
from ..inputs.hooks import evaluating, forward_hooks
from ..inputs.layers import conv_layer_names, describe_layers, resolve_layers
from .store import ActivationStore, ChannelIndex

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
        chunks = self._channel_slices(name, channels)
        if not self.spilled.get(name) or len(chunks) == 1:
            for chunk in chunks:
                block = self._store.block(name, chunk.start, chunk.stop)
                if not destructive and not self.spilled.get(name):
                    block = block.clone()
                yield chunk, block
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="pcace-read") as pool:
            ahead = pool.submit(self._store.block, name, chunks[0].start, chunks[0].stop)
            for i, chunk in enumerate(chunks):
                block = ahead.result()
                if i + 1 < len(chunks):  # file reads release the GIL: the disk works meanwhile
                    ahead = pool.submit(self._store.block, name, chunks[i + 1].start,
                                        chunks[i + 1].stop)
                yield chunk, block
                del block

    def _channel_slices(self, name: str, channels: int) -> list[slice]:
        step = integer(channels, "channels")
        if name not in self.shapes:
            raise KeyError(f"layer {name!r} was not captured; captured layers: {self.layers}")
        c = self.shapes[name][0]
        return [slice(start, min(start + step, c)) for start in range(0, c, step)]

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


def capture(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    layers: str | Iterable[str] | None,
    score_fn: Callable[[Any], torch.Tensor],
    *,
    device: str | torch.device = "auto",
    memory_budget: int | str = "auto",
    spill_dir: str | Path | None = None,
    progress: bool = True,
    check_finite: bool = True,
    device_memory_budget: int | str = "auto",
    tune_malloc: bool | None = None,
    on_step: Callable[[], None] | None = None,
    observers: Mapping[str, Callable] | None = None,
) -> Capture:
    """Run the model once over the batches and keep the outputs of the chosen layers.

    Parameters
    ----------
    model : torch.nn.Module
        Run in eval mode on ``device``; its training flags and device are restored
        afterwards (:func:`pcace.inputs.hooks.evaluating`).
    batches : iterable of torch.Tensor
        Preprocessed image batches ``(B, C, H, W)``; an item ``(images, ...)``
        (as a labelled DataLoader yields) uses its first element. Empty batches
        are skipped.
    layers : None, str or iterable of str
        Qualified module names (see :func:`resolve_layers`); None for every conv
        layer. Each must produce a 4-D tensor and run once per forward pass.
    score_fn : callable
        ``score_fn(outputs) -> (B,)`` tensor: the scalar score of each image. One with a
        true ``returns_matrix`` attribute (:class:`pcace.inputs.targets.TargetSet`) returns
        ``(B, T)``, several scores per image; ``Capture.scores`` is then ``(N, T)``.
    device : str or torch.device, default "auto"
        Where the model runs: ``"auto"`` is CUDA when available, else the CPU.
    memory_budget : int or "auto", default "auto"
        Bytes of activations held in RAM; layers past it are spilled to disk.
        ``"auto"``: :func:`pcace.core.plan.default_memory_budget`. (:func:`pcace.rank` passes
        the store's share of its :class:`pcace.core.plan.MemoryPlan`.)
    spill_dir : str or Path, optional
        Where spilled layers go (inside a temporary subdirectory, removed when
        the capture is closed). The system's temporary directory when None.
    progress : bool, default True
        Show a tqdm bar over the batches on stderr.
    check_finite : bool, default True
        Check every output for NaN and inf as it comes (one extra read of it). A caller
        that checks later, as :func:`pcace.rank` does while standardising, turns it off.
    device_memory_budget : int or "auto", default "auto"
        When ``device`` is not the CPU: bytes of activations kept in the device's memory
        (layers beyond it go to RAM, then disk). ``"auto"``: half of the device's free
        memory once the model is on it; 0 keeps everything in RAM.
    tune_malloc : bool, optional
        Keep freed memory in glibc's heap during the pass (:func:`pcace.core.malloc.kept_heap`;
        process-wide, so off unless True or ``PCACE_TUNE_MALLOC=1``).
    on_step : callable, optional
        Called after each batch; it may raise to stop the pass (the store is then closed
        and spilled files removed).
    observers : mapping of str to callable, optional
        More forward hooks ``{layer: hook(module, inputs, output)}`` run on every batch of
        the same pass, for layers that are not stored (``layers`` may then be ``[]``):
        :class:`pcace.reduce.twopass.TwoPass` gathers its statistics this way.

    Returns
    -------
    Capture

    Raises
    ------
    ValueError
        A layer's output is not a 4-D tensor, holds NaN or inf, or the layer
        ran more than once or not at all in a pass; ``score_fn`` returned the
        wrong shape or non-finite values; no images came.

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
    from tqdm.auto import tqdm

    observers = dict(observers or {})
    empty = observers and isinstance(layers, list | tuple) and not layers
    names = [] if empty else resolve_layers(model, layers)
    both = sorted(set(names) & set(observers))
    if both:
        raise ValueError(f"layer(s) {both} are both stored and observed")
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable (outputs -> (B,) scores); got "
                        f"{type(score_fn).__name__}")
    device = resolve_device(device)
    if not (isinstance(device_memory_budget, str) and device_memory_budget == "auto"):
        byte_count(device_memory_budget, "device_memory_budget")
    store = ActivationStore(names, resolve_budget(memory_budget), spill_dir,
                            n_images=_known_count(batches))
    run = _Run(names, store, check_finite)
    scores: list[np.ndarray] = []
    bar = tqdm(batches, total=_length(batches), desc="forward pass", unit="batch",
               file=sys.stderr, disable=not progress)
    start = time.perf_counter()
    try:
        with evaluating(model, device), \
                forward_hooks(model, {**{name: run.hook(name) for name in names},
                                      **observers}), \
                torch.inference_mode(), kept_heap(tuning_requested(tune_malloc)):
            if device.type != "cpu":
                store.device = device
                store.device_budget = _device_budget(device, device_memory_budget)
            for item in bar:
                images = _images(item, run.batches)
                run.batches += 1
                if images.shape[0] == 0:
                    continue
                run.begin(images.shape[0])
                outputs = model(images.to(device))
                run.forward_calls += 1
                run.check_complete()
                scores.append(_batch_scores(score_fn(outputs), images.shape[0], run.offset,
                                            getattr(score_fn, "returns_matrix", False)))
                run.end()
                if on_step is not None:
                    on_step()
        if not scores:
            raise ValueError("batches yielded no images; pass at least one (B, C, H, W) batch")
        store.finalize()
    except BaseException:
        store.close()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    return Capture(store, names, np.concatenate(scores), run.forward_calls, seconds)


def _device_budget(device: torch.device, budget: int | str) -> int:
    """``"auto"``: half the free memory of a CUDA device (0 for a device that cannot say)."""
    if not (isinstance(budget, str) and budget == "auto"):
        return int(budget)
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return int(free // 2)


class _Run:
    """State the hooks share during one capture."""

    def __init__(self, names: list[str], store: ActivationStore, check_finite: bool = True):
        self.names = names
        self.store = store
        self.check_finite = check_finite
        self.seen: set[str] = set()
        self.offset = 0  # images before the current batch
        self.size = 0
        self.batches = 0
        self.forward_calls = 0

    def begin(self, size: int) -> None:
        self.seen = set()
        self.size = size

    def end(self) -> None:
        self.offset += self.size
        self.seen = set()

    def hook(self, name: str) -> Callable:
        def store_output(module: nn.Module, inputs: Any, output: Any) -> None:
            if name in self.seen:
                raise ValueError(f"layer {name!r} ({type(module).__name__}) ran more than once "
                                 "in one forward pass (a module reused in the network, such as "
                                 "a shared ReLU), so its output is ambiguous; capture a module "
                                 "that runs once, e.g. the one before it")
            _check_output(name, output, self.size)
            if self.check_finite:
                _check_finite(name, output, self.offset)
            # copied now, before a later in-place op (an inplace ReLU) can change it
            self.store.put(name, output)
            self.seen.add(name)
        return store_output

    def check_complete(self) -> None:
        missing = [n for n in self.names if n not in self.seen]
        if missing:
            raise ValueError(f"layer(s) {missing} did not run in the forward pass, so they have "
                             "no output to capture; pick modules the model calls in forward()")


def _check_output(name: str, output: Any, batch_size: int) -> None:
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"layer {name!r} returned a {type(output).__name__}, not a tensor; "
                         "capture a module whose output is a (B, C, H, W) tensor")
    if output.ndim != 4 or output.shape[0] != batch_size:
        raise ValueError(f"layer {name!r} produced shape {tuple(output.shape)}; expected "
                         f"(B={batch_size}, C, H, W). PCACE needs convolutional feature maps: "
                         "pick a layer from describe_layers(model, input_shape)")


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
    return ValueError(f"layer {name!r} produced NaN or inf in channel(s) {_short(channels)}"
                      f"{', e.g.' if example else ''} for image(s) {_short(images)} (positions "
                      "in the input order). Check those images, the weights, or overflow "
                      "(e.g. half precision)")


def _short(values: list[int], limit: int = 10) -> str:
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return f"{values[:limit]}{more}"


def _batch_scores(values: Any, batch_size: int, offset: int, matrix: bool = False) -> np.ndarray:
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
                         f"{_short((bad + offset).tolist())}; check the target and the images")
    return s


def _images(item: Any, index: int) -> torch.Tensor:
    if isinstance(item, tuple | list) and item:
        item = item[0]
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(item)
    if not isinstance(item, torch.Tensor) or item.ndim != 4:
        got = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
        raise ValueError(f"batch {index} must be an image tensor (B, C, H, W); got {got}")
    return item


def _known_count(batches: Any) -> int | None:
    """The number of images the batches will yield, when it is known without iterating."""
    n = getattr(batches, "n_images", None)
    if isinstance(batches, list | tuple):
        try:
            n = sum(_images(item, i).shape[0] for i, item in enumerate(batches))
        except (TypeError, ValueError, AttributeError, IndexError):
            n = None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _length(batches: Any) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None
