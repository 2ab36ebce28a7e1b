"""Capture the activations of chosen layers in one forward pass, in bounded memory.

Layers are addressed by their qualified module names, as
``model.named_modules()`` gives them (``"layer3.1.conv2"``), the convention of
torchvision's feature extraction. :func:`conv_layer_names` and
:func:`describe_layers` list them; :func:`resolve_layers` checks a request.

:func:`capture` runs the model once per batch with forward hooks on the
requested modules; each hook writes its layer's output straight into an
:class:`ActivationStore` (float32), channel-major: a layer is kept as
``(C, N, H*W)``, so that the reduce step can take a run of channels as one
contiguous block, in place, without another copy.

Memory: the store reserves a layer's space when its first batch comes (all N
images at once when N is known). While the reservations stay within
``memory_budget`` (``"auto"``: a quarter of the machine's memory) layers live in
RAM; past it, the largest layers are spilled to raw float32 files in the same
channel-major layout, written at their offsets as batches come, and read back
in channel blocks with plain reads (no memory maps, whose pages would count
against the process's resident memory). On a GPU, layers first stay in the
device's own memory while they fit ``device_memory_budget`` (``"auto"``: half of
the device's free memory), so their reduce step runs there without a transfer;
the rest go to RAM and disk as above.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import torch
from torch import nn

from ._memory import kept_heap, mapped_empty

BYTES_PER_VALUE = 4  # activations are kept as float32
_MAX_LISTED = 15

ChannelIndex = int | slice | Sequence[int] | torch.Tensor | np.ndarray


# --------------------------------------------------------------------------- layer names


def conv_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Conv2d`` of ``model``, in module order.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    list of str
        Names as ``model.named_modules()`` gives them.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3))
    >>> conv_layer_names(net)
    ['0', '2']
    """
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def describe_layers(model: nn.Module, input_shape: Sequence[int],
                    device: str | torch.device = "cpu") -> pd.DataFrame:
    """Every module with a 4-D output, with its output shape, from one dummy forward pass.

    Parameters
    ----------
    model : torch.nn.Module
        Moved to ``device``; run in eval mode (its training flags are restored).
    input_shape : sequence of int
        ``(C, H, W)`` or ``(B, C, H, W)`` of one input; the pass uses zeros
        (batch 1 when no batch size is given).
    device : str or torch.device, default "cpu"

    Returns
    -------
    pandas.DataFrame
        One row per module whose output is a 4-D tensor, in the order the
        modules first ran: ``name``, ``type`` (class name), ``out_channels``,
        ``height``, ``width``, and ``calls`` (how often it ran in the pass; a
        module that runs more than once, such as a shared ReLU, cannot be
        captured).

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten())
    >>> describe_layers(net, (3, 8, 8))[["name", "type", "out_channels", "height"]]
      name    type  out_channels  height
    0    0  Conv2d             4       6
    1    1    ReLU             4       6
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) or (B, C, H, W) with positive sizes; "
                         f"got {tuple(input_shape)}")
    rows: dict[str, dict[str, Any]] = {}
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if name in rows:
                rows[name]["calls"] += 1
            elif isinstance(output, torch.Tensor) and output.ndim == 4:
                rows[name] = {"name": name, "type": type(module).__name__,
                              "out_channels": output.shape[1], "height": output.shape[2],
                              "width": output.shape[3], "calls": 1}
        return hook

    flags = _training_flags(model)
    try:
        model.to(device)
        model.eval()
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(make_hook(name)))
        with torch.no_grad():
            model(torch.zeros(shape, device=device))
    finally:
        for h in handles:
            h.remove()
        _restore_training(flags)
    columns = ["name", "type", "out_channels", "height", "width", "calls"]
    return pd.DataFrame(list(rows.values()), columns=columns)


def resolve_layers(model: nn.Module,
                   layers: str | nn.Module | Iterable[str | nn.Module] | None) -> list[str]:
    """Check layer names against ``model`` and put them in network order.

    Parameters
    ----------
    model : torch.nn.Module
    layers : None, str, module, or iterable of those
        ``None`` means every ``nn.Conv2d`` (:func:`conv_layer_names`). Names are
        qualified module names; a submodule of ``model`` stands for its name.

    Returns
    -------
    list of str
        The names in module order, duplicates removed.

    Raises
    ------
    ValueError
        For an unknown name, listing the valid names with the closest first.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3))
    >>> resolve_layers(net, ["2", "0", "2"])
    ['0', '2']
    """
    if layers is None:
        names = conv_layer_names(model)
        if not names:
            raise ValueError(f"{type(model).__name__} has no nn.Conv2d layers; pass layers=[...] "
                             "with module names (see describe_layers(model, input_shape))")
        return names
    if isinstance(layers, str | nn.Module):
        layers = [layers]
    order = {name: i for i, (name, _) in enumerate(model.named_modules()) if name}
    requested = [_layer_name(model, item) for item in layers]
    if not requested:
        raise ValueError("layers is empty; pass None for every conv layer or a list of names")
    unknown = [name for name in requested if name not in order]
    if unknown:
        raise ValueError(_unknown_message(unknown, list(order)))
    return sorted(set(requested), key=order.__getitem__)


def _layer_name(model: nn.Module, item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, nn.Module):
        for name, module in model.named_modules():
            if module is item and name:
                return name
        raise ValueError(f"the {type(item).__name__} passed in layers is not a submodule of "
                         f"the model; pass its qualified name instead")
    raise TypeError(f"layers must hold module names (str); got {type(item).__name__} {item!r}")


def _unknown_message(unknown: list[str], valid: list[str]) -> str:
    closest: list[str] = []
    for name in unknown:
        for match in difflib.get_close_matches(name, valid, n=5, cutoff=0.4):
            if match not in closest:
                closest.append(match)
    ordered = closest + [v for v in valid if v not in closest]
    shown = ", ".join(ordered[:_MAX_LISTED])
    more = f" and {len(ordered) - _MAX_LISTED} more" if len(ordered) > _MAX_LISTED else ""
    what = "unknown layer " if len(unknown) == 1 else "unknown layers "
    return (f"{what}{', '.join(repr(u) for u in unknown)}. Valid names, closest first: "
            f"{shown}{more}. List them with pcace.capture.describe_layers(model, input_shape) "
            "or conv_layer_names(model)")


# --------------------------------------------------------------------------- the store


@dataclass
class _Layer:
    shape: tuple[int, int, int] | None = None  # (C, H, W)
    n: int = 0  # images written
    capacity: int = 0  # images per segment
    segments: list[torch.Tensor] = field(default_factory=list)  # RAM: (C, capacity, H*W) each
    file_segments: int = 0  # segments in the spill file
    path: Path | None = None
    file: BinaryIO | None = None
    device: torch.device | None = None  # segments in a device's memory; None: RAM

    @property
    def spilled(self) -> bool:
        return self.path is not None

    @property
    def segment_bytes(self) -> int:
        c, h, w = self.shape
        return c * self.capacity * h * w * BYTES_PER_VALUE

    @property
    def nbytes(self) -> int:
        """Bytes held in RAM."""
        return len(self.segments) * self.segment_bytes if self.shape and not self.device \
            else 0

    @property
    def device_nbytes(self) -> int:
        """Bytes held in the device's memory."""
        return len(self.segments) * self.segment_bytes if self.shape and self.device else 0

    @property
    def total_segments(self) -> int:
        return self.file_segments if self.spilled else len(self.segments)


class ActivationStore:
    """Per-layer activations of one run, channel-major, in RAM under a budget, else on disk.

    Each layer is kept as ``(C, N, H*W)`` float32, so the reduce step can take a run of
    channels as one contiguous block without copying it. Batches are written straight
    into that layout as they come (:meth:`put`, called from the forward hooks).

    Parameters
    ----------
    layers : sequence of str
        The layer names it will receive.
    memory_budget : int
        Bytes of activations kept in RAM. Space is reserved per layer when its first
        batch comes (all ``n_images`` rows at once when that is known, else in segments of
        256 images); while a reservation would pass the budget, the largest layer still in
        RAM (possibly the new one) is spilled to a raw float32 file on disk, and later
        batches of it go there.
    spill_dir : str or Path, optional
        Parent of the temporary directory for spilled layers (the system's temporary
        directory when None). The directory is removed by :meth:`close` or when the store
        is garbage-collected.
    n_images : int, optional
        How many images will come, when known: one segment per layer then holds them all
        (fewer may come, e.g. when unreadable files are skipped; more go to further
        segments).
    device : str or torch.device, optional
        A device (a GPU) whose memory holds layers first, while they fit
        ``device_budget`` bytes; layers that do not fit go to RAM (and disk) as above. A
        layer whose further segments no longer fit moves to RAM whole.
    device_budget : int, default 0
        Bytes of activations kept on ``device``.

    Examples
    --------
    >>> import torch
    >>> store = ActivationStore(["conv"], memory_budget=0)
    >>> store.add({"conv": torch.ones(2, 3, 4, 4)})
    >>> store.finalize()
    >>> store.spilled["conv"], tuple(store.read("conv", slice(0, 2)).shape)
    (True, (2, 2, 4, 4))
    >>> store.close()
    """

    SEGMENT_IMAGES = 256

    def __init__(self, layers: Sequence[str], memory_budget: int,
                 spill_dir: str | Path | None = None, n_images: int | None = None,
                 device: str | torch.device | None = None, device_budget: int = 0):
        _check_budget(memory_budget)
        _check_budget(device_budget, "device_budget")
        if n_images is not None and (isinstance(n_images, bool) or not isinstance(
                n_images, int | np.integer) or n_images < 1):
            raise ValueError(f"n_images must be a positive int or None; got {n_images!r}")
        self.memory_budget = int(memory_budget)
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self.n_images = None if n_images is None else int(n_images)
        self.device = None if device is None else torch.device(device)
        self.device_budget = int(device_budget)
        self._layers = {name: _Layer() for name in layers}
        self._dir: Path | None = None
        self._cleanup: weakref.finalize | None = None
        self._writer: _SpillWriter | None = None
        self.finalized = False
        self.closed = False

    @property
    def in_memory_bytes(self) -> int:
        """Bytes of RAM reserved for activations."""
        return sum(layer.nbytes for layer in self._layers.values())

    @property
    def device_bytes(self) -> int:
        """Bytes of the device's memory reserved for activations."""
        return sum(layer.device_nbytes for layer in self._layers.values())

    @property
    def spilled(self) -> dict[str, bool]:
        return {name: layer.spilled for name, layer in self._layers.items()}

    @property
    def on_device(self) -> dict[str, bool]:
        """Whether each layer is held in the device's memory."""
        return {name: layer.device is not None for name, layer in self._layers.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, int, int]]:
        return {name: layer.shape for name, layer in self._layers.items() if layer.shape}

    @property
    def directory(self) -> Path | None:
        """Where spilled layers live (None until the first spill)."""
        return self._dir

    def put(self, name: str, acts: torch.Tensor) -> None:
        """Append one batch ``(B, C, H, W)`` (any device and float dtype) of one layer."""
        self._check_open(writing=True)
        if name not in self._layers:
            raise KeyError(f"layer {name!r} is not one of the store's layers {list(self._layers)}")
        layer = self._layers[name]
        b = acts.shape[0]
        shape = tuple(acts.shape[1:])
        if layer.shape is None:
            self._allocate(name, layer, shape, b)
        elif shape != layer.shape:
            raise ValueError(f"layer {name!r} gave maps of shape {shape} after "
                             f"{layer.shape} in earlier batches; all images must have one "
                             "size (resize or crop them alike)")
        c = shape[0]
        rows = acts.detach().transpose(0, 1).reshape(c, b, -1)  # (C, B, P) view or copy
        done = 0
        while done < b:
            seg, row = divmod(layer.n, layer.capacity)
            if seg == layer.total_segments:
                self._add_segment(name, layer)
            take = min(b - done, layer.capacity - row)
            part = rows[:, done:done + take]
            if layer.spilled:
                self._write(name, layer, seg, row, part)
            else:
                layer.segments[seg][:, row:row + take].copy_(part)
            layer.n += take
            done += take

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        """Append one batch, ``{layer: (B, C, H, W) tensor}``, for every layer."""
        self._check_open(writing=True)
        missing = set(self._layers) - set(batch)
        if missing:
            raise ValueError(f"batch lacks layers {sorted(missing)}")
        for name, acts in batch.items():
            self.put(name, acts)

    def finalize(self) -> None:
        """Close the spill files; no more batches after this."""
        self._check_open(writing=True)
        counts = {layer.n for layer in self._layers.values()}
        if len(counts) > 1:
            raise ValueError(f"layers hold different numbers of images: "
                             f"{ {n: lay.n for n, lay in self._layers.items()} }")
        if self._writer is not None:
            self._writer.close()  # waits for the queued writes; raises a write error
            self._writer = None
        for layer in self._layers.values():
            if layer.file is not None:
                layer.file.close()
                layer.file = None
        self.finalized = True

    def block(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Channels ``start:stop`` of one layer as a ``(c, N, H*W)`` float32 block.

        For a layer in memory whose single segment is full this is a **view** of the
        store (no copy): writing into it changes the stored activations, which the
        pipeline does on purpose (it standardises blocks in place). Otherwise a fresh
        tensor. A layer held on the device gives device tensors.
        """
        layer = self._get(name)
        c, h, w = layer.shape
        start, stop, _ = slice(start, stop).indices(c)
        width, n, p = max(stop - start, 0), layer.n, h * w
        if not layer.spilled:
            if len(layer.segments) == 1 and n == layer.capacity:
                return layer.segments[0][start:stop]
            parts = [seg[start:stop, :self._filled(layer, j)]
                     for j, seg in enumerate(layer.segments)]
            return torch.cat(parts, dim=1)
        out = np.empty((width, n, p), dtype=np.float32)
        with open(layer.path, "rb", buffering=0) as f:
            for j in range(layer.file_segments):
                filled = self._filled(layer, j)
                row0 = j * layer.capacity
                if filled == layer.capacity and layer.file_segments == 1:
                    f.seek(self._offset(layer, j, start, 0))
                    _read_exact(f, out, layer.path)  # one contiguous read
                    continue
                for i in range(width):
                    f.seek(self._offset(layer, j, start + i, 0))
                    _read_exact(f, out[i, row0:row0 + filled], layer.path)
        return torch.from_numpy(out)

    def read(self, name: str, channels: ChannelIndex = slice(None)) -> torch.Tensor:
        """Activations ``(N, c, H, W)`` of a channel subset of one layer (a fresh CPU tensor)."""
        layer = self._get(name)
        c, h, w = layer.shape
        index = _channel_index(channels, c)
        if isinstance(index, slice) and index.step in (None, 1):
            start, stop, _ = index.indices(c)
            blk = self.block(name, start, stop)
        elif isinstance(index, slice):
            blk = torch.cat([self.block(name, i, i + 1) for i in range(*index.indices(c))])
        else:
            blk = torch.cat([self.block(name, int(i), int(i) + 1) for i in index]) \
                if index.numel() else torch.empty((0, layer.n, h * w))
        return blk.transpose(0, 1).reshape(layer.n, -1, h, w).contiguous().cpu()

    def close(self) -> None:
        """Free the RAM copies and remove the spill directory."""
        if self._writer is not None:
            self._writer.close(discard=True)
            self._writer = None
        for layer in self._layers.values():
            if layer.file is not None:
                layer.file.close()
                layer.file = None
            layer.segments = []
        if self._cleanup is not None:
            self._cleanup()
        self.closed = True

    # -- helpers

    def _get(self, name: str) -> _Layer:
        self._check_open(writing=False)
        if name not in self._layers:
            raise KeyError(f"layer {name!r} was not captured; captured layers: "
                           f"{list(self._layers)}")
        return self._layers[name]

    def _check_open(self, writing: bool) -> None:
        if self.closed:
            raise RuntimeError("the activation store is closed; capture again")
        if writing and self.finalized:
            raise RuntimeError("the activation store is finalized; it takes no more batches")
        if not writing and not self.finalized:
            raise RuntimeError("finalize() the activation store before reading it")

    @staticmethod
    def _filled(layer: _Layer, segment: int) -> int:
        return max(0, min(layer.capacity, layer.n - segment * layer.capacity))

    @staticmethod
    def _offset(layer: _Layer, segment: int, channel: int, row: int) -> int:
        c, h, w = layer.shape
        rows_before = (segment * c + channel) * layer.capacity + row
        return rows_before * h * w * BYTES_PER_VALUE

    def _allocate(self, name: str, layer: _Layer, shape: tuple[int, ...], batch: int) -> None:
        if len(shape) != 3:
            raise ValueError(f"layer {name!r}: expected (B, C, H, W) maps; got (B, *{shape})")
        layer.shape = shape
        layer.capacity = self.n_images or max(self.SEGMENT_IMAGES, batch)

    def _add_segment(self, name: str, layer: _Layer) -> None:
        if self._fits_device(layer):
            self._new_segment(layer)
            return
        if layer.device is not None:  # the device is full: the whole layer moves to RAM
            layer.segments = [_in_ram(seg) for seg in layer.segments]
            layer.device = None
            self._reserve(name, 0)
        if not layer.spilled:
            self._reserve(name, layer.segment_bytes)
        if layer.spilled:
            if layer.file is None:
                self._open_spill(name, layer)
            layer.file_segments += 1
        else:
            self._new_segment(layer)

    @staticmethod
    def _new_segment(layer: _Layer) -> None:
        """Append an empty segment in the layer's memory (the device's, or RAM)."""
        c, h, w = layer.shape
        shape = (c, layer.capacity, h * w)
        with torch.inference_mode(False):  # a normal tensor: blocks may be edited later
            layer.segments.append(mapped_empty(shape) if layer.device is None else
                                  torch.empty(shape, dtype=torch.float32, device=layer.device))

    def _fits_device(self, layer: _Layer) -> bool:
        """Whether the layer's next segment goes to the device (and mark the layer so)."""
        if self.device is None or layer.spilled or (layer.segments and layer.device is None):
            return False
        if self.device_bytes + layer.segment_bytes > self.device_budget:
            return False
        layer.device = self.device
        return True

    def _reserve(self, name: str, nbytes: int) -> None:
        """Make room for ``nbytes`` more of layer ``name`` by spilling the largest layers."""
        while self.in_memory_bytes + nbytes > self.memory_budget:
            candidates = [(lay.nbytes + (nbytes if n == name else 0), n)
                          for n, lay in self._layers.items()
                          if not lay.spilled and (lay.nbytes or n == name)]
            _, largest = max(candidates)
            self._spill(largest, self._layers[largest])
            if largest == name:
                return

    def _spill(self, name: str, layer: _Layer) -> None:
        self._open_spill(name, layer)
        segments, layer.segments = layer.segments, []
        for j, seg in enumerate(segments):
            layer.file_segments += 1
            filled = self._filled(layer, j)
            if filled:
                self._write(name, layer, j, 0, seg[:, :filled], copy=False)

    def _open_spill(self, name: str, layer: _Layer) -> None:
        directory = self._directory()
        index = list(self._layers).index(name)
        layer.path = directory / f"{index:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.f32"
        try:
            layer.file = open(layer.path, "wb")  # noqa: SIM115 - closed in finalize/close
        except OSError as err:
            raise OSError(f"cannot create the spill file for layer {name!r} in {directory}: "
                          f"{err}") from err

    def _write(self, name: str, layer: _Layer, segment: int, row: int,
               part: torch.Tensor, copy: bool = True) -> None:
        """Queue ``part`` ``(C, b, P)`` for rows ``row:row+b`` of a file segment.

        A background thread writes it, so the forward pass goes on while the disk works.
        ``part`` is copied first (a hook's output may be changed in place later) unless
        ``copy=False`` (a RAM segment being moved to disk, which nothing else changes).
        """
        if self._writer is None:
            self._writer = _SpillWriter()
        c, b, p = part.shape
        per_channel = max(1, b * p * BYTES_PER_VALUE)
        group = max(1, self._writer.max_pending // 4 // per_channel)  # channels per write
        for c0 in range(0, c, group):
            piece = part[c0:c0 + group]
            if copy or piece.dtype != torch.float32 or piece.device.type != "cpu":
                data = torch.empty(piece.shape, dtype=torch.float32)
                data.copy_(piece)
            else:
                data = piece.contiguous()
            offsets = [self._offset(layer, segment, ch, row)
                       for ch in range(c0, c0 + data.shape[0])]
            self._writer.submit(name, layer.path, layer.file, offsets, data.numpy())

    def _directory(self) -> Path:
        if self._dir is None:
            parent = self.spill_dir
            if parent is not None:
                parent.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="pcace-spill-", dir=parent))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)
        return self._dir


def _in_ram(segment: torch.Tensor) -> torch.Tensor:
    """A copy of a device segment in the store's RAM (its own mapping, as new segments)."""
    with torch.inference_mode(False):
        return mapped_empty(tuple(segment.shape)).copy_(segment)


class _SpillWriter:
    """Writes spilled batches on a background thread, at most ``max_pending`` bytes queued.

    File writes release the GIL, so the disk works while the forward pass runs. A write
    error is raised on the next :meth:`submit` or at :meth:`close`.
    """

    def __init__(self, max_pending: int = 128 * 2**20):
        import queue
        import threading

        self.max_pending = max_pending
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._room = threading.Condition()
        self._error: BaseException | None = None
        self._discard = False
        self._thread = threading.Thread(target=self._run, name="pcace-spill", daemon=True)
        self._thread.start()

    def submit(self, name: str, path: Path, file: BinaryIO, offsets: list[int],
               data: np.ndarray) -> None:
        self._raise()
        with self._room:  # back-pressure: wait while too much is queued
            while self._pending and self._pending + data.nbytes > self.max_pending \
                    and self._error is None:
                self._room.wait()
            self._pending += data.nbytes
        self._queue.put((name, path, file, offsets, data))

    def close(self, discard: bool = False) -> None:
        """Wait for the queued writes (or drop them, ``discard``) and stop the thread."""
        self._discard = discard
        self._queue.put(None)
        self._thread.join()
        if not discard:
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            name, path, file, offsets, data = item
            if self._error is None and not self._discard:
                try:
                    for offset, rows in zip(offsets, data, strict=True):
                        file.seek(offset)
                        file.write(memoryview(rows).cast("B"))
                except OSError as err:
                    self._error = OSError(
                        f"could not spill layer {name!r} to {path}: {err}. Free disk space, "
                        "pass spill_dir= on a larger disk, or raise memory_budget")
            with self._room:
                self._pending -= data.nbytes
                self._room.notify_all()


def _read_exact(f: BinaryIO, out: np.ndarray, path: Path) -> None:
    """Fill ``out`` (C-contiguous) from the file's current position, with plain reads.

    Plain reads, unlike touching a memory map, do not leave the file's pages mapped into
    the process, so a walk over a spilled layer does not grow its resident memory.
    """
    view = memoryview(out).cast("B")
    got = f.readinto(view)
    if got != view.nbytes:
        raise OSError(f"spilled activations in {path} are truncated")


def default_memory_budget() -> int:
    """The memory budget ``"auto"`` stands for: a quarter of the machine's memory.

    The machine's memory is the smaller of its physical RAM and a cgroup (container) limit,
    when either is known; the budget is at least 1 GiB, and 2 GiB when nothing is known.

    Examples
    --------
    >>> default_memory_budget() >= 2**30
    True
    """
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            sizes.append(int(text))
    if not sizes:
        return 2 * 2**30
    return max(2**30, min(sizes) // 4)


def resolve_budget(memory_budget: Any) -> int:
    """``"auto"`` -> :func:`default_memory_budget`; a number of bytes is checked and kept."""
    if isinstance(memory_budget, str) and memory_budget == "auto":
        return default_memory_budget()
    _check_budget(memory_budget)
    return int(memory_budget)


def _check_budget(memory_budget: Any, what: str = "memory_budget") -> None:
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int | float) \
            or not memory_budget >= 0:
        raise ValueError(f"{what} must be a number of bytes >= 0 or 'auto'; got "
                         f"{memory_budget!r}")


def _channel_index(channels: ChannelIndex, n_channels: int) -> slice | torch.Tensor:
    """A slice, or a long tensor of channel indices, checked against ``n_channels``."""
    if isinstance(channels, slice):
        return channels
    if isinstance(channels, int | np.integer) and not isinstance(channels, bool):
        i = int(channels)
        if not -n_channels <= i < n_channels:
            raise IndexError(f"channel {i} is out of range for a layer of {n_channels} channels")
        i %= n_channels
        return slice(i, i + 1)
    index = torch.as_tensor(np.asarray(channels)).flatten()
    if index.dtype == torch.bool or index.is_floating_point():
        raise TypeError(f"channels must be an int, slice or integer indices; got {index.dtype}")
    index = index.to(torch.long)
    if index.numel() and not bool(((index >= -n_channels) & (index < n_channels)).all()):
        raise IndexError(f"channels {index.tolist()[:10]} out of range for a layer of "
                         f"{n_channels} channels")
    return index % n_channels


# --------------------------------------------------------------------------- capture


class Capture:
    """The result of :func:`capture`: activations of the requested layers and the scores.

    Use it as a context manager (or call :meth:`close`) to free the activations
    and remove spilled files; garbage collection does the same.

    Attributes
    ----------
    layers : list of str
        Captured layer names, in network order.
    scores : numpy.ndarray
        ``(N,)`` float64: ``score_fn`` of the model's outputs, per image.
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

    def channel_chunks(self, name: str, max_bytes: int
                       ) -> Iterator[tuple[slice, torch.Tensor]]:
        """Walk a layer in channel chunks of at most ``max_bytes``; see :func:`channel_chunks`."""
        return channel_chunks(self, name, max_bytes)

    def blocks(self, name: str, max_bytes: int) -> Iterator[tuple[slice, torch.Tensor]]:
        """Walk a layer in channel-major blocks ``(c, N, H*W)`` of at most ``max_bytes``.

        The fast path of the pipeline: for a layer held in memory (RAM or a GPU's) the
        blocks are views of the stored activations (no copy), which the caller may
        overwrite (the pipeline standardises them in place; read what you need first).
        For a spilled layer each block is read from disk into a fresh tensor, the next one
        on a background thread while the caller works on the current one (so two blocks
        are in memory at once). A channel larger than ``max_bytes`` still comes alone.

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 6, 3))
        >>> with capture(net, [torch.rand(4, 1, 6, 6)], None, lambda out: out.sum((1, 2, 3)),
        ...              progress=False) as cap:
        ...     [tuple(b.shape) for _, b in cap.blocks("0", 4 * 16 * 4 * 4)]
        [(4, 4, 16), (2, 4, 16)]
        """
        chunks = _chunk_slices(self, name, max_bytes)
        if not self.spilled.get(name) or len(chunks) == 1:
            for chunk in chunks:
                yield chunk, self._store.block(name, chunk.start, chunk.stop)
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


def channel_chunks(capture: Capture, layer: str, max_bytes: int
                   ) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(channel slice, activations (N, c, H, W))`` chunks of one layer.

    Parameters
    ----------
    capture : Capture
    layer : str
    max_bytes : int
        Upper bound on a chunk's float32 size. A single channel larger than
        that still comes as one chunk of one channel.

    Yields
    ------
    (slice, torch.Tensor)
        The channels ``slice(start, stop)`` and their activations.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 6, 3))
    >>> with capture(net, [torch.rand(4, 1, 6, 6)], None, lambda out: out.sum((1, 2, 3)),
    ...              progress=False) as cap:
    ...     [(s.start, s.stop) for s, _ in channel_chunks(cap, "0", 4 * 16 * 4 * 4)]
    [(0, 4), (4, 6)]
    """
    for chunk in _chunk_slices(capture, layer, max_bytes):
        yield chunk, capture.layer(layer, chunk)


def _chunk_slices(capture: Capture, layer: str, max_bytes: Any) -> list[slice]:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int | float) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive number of bytes; got {max_bytes!r}")
    if layer not in capture.shapes:
        raise KeyError(f"layer {layer!r} was not captured; captured layers: {capture.layers}")
    c, h, w = capture.shapes[layer]
    per_channel = capture.n_images * h * w * BYTES_PER_VALUE
    step = max(1, int(max_bytes // per_channel))
    return [slice(start, min(start + step, c)) for start in range(0, c, step)]


def capture(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    layers: str | Iterable[str] | None,
    score_fn: Callable[[Any], torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    memory_budget: int | str = "auto",
    spill_dir: str | Path | None = None,
    progress: bool = True,
    check_finite: bool = True,
    device_memory_budget: int | str = "auto",
) -> Capture:
    """Run the model once over the batches and keep the outputs of the chosen layers.

    Parameters
    ----------
    model : torch.nn.Module
        Moved to ``device`` (and left there) and run in eval mode; its training
        flags are restored afterwards.
    batches : iterable of torch.Tensor
        Preprocessed image batches ``(B, C, H, W)``; an item ``(images, ...)``
        (as a labelled DataLoader yields) uses its first element. Empty batches
        are skipped.
    layers : None, str or iterable of str
        Qualified module names (see :func:`resolve_layers`); None for every conv
        layer. Each must produce a 4-D tensor and run once per forward pass.
    score_fn : callable
        ``score_fn(outputs) -> (B,)`` tensor: the scalar score of each image.
    device : str or torch.device, default "cpu"
    memory_budget : int or "auto", default "auto"
        Bytes of activations held in RAM; layers past it are spilled to disk.
        ``"auto"``: :func:`default_memory_budget`.
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

    names = resolve_layers(model, layers)
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable (outputs -> (B,) scores); got "
                        f"{type(score_fn).__name__}")
    device = torch.device(device)
    _check_device_budget(device_memory_budget)
    store = ActivationStore(names, resolve_budget(memory_budget), spill_dir,
                            n_images=_known_count(batches))
    run = _Run(names, store, check_finite)
    modules = dict(model.named_modules())
    flags = _training_flags(model)
    handles = []
    scores: list[np.ndarray] = []
    bar = tqdm(batches, total=_length(batches), desc="forward pass", unit="batch",
               file=sys.stderr, disable=not progress)
    start = time.perf_counter()
    try:
        model.to(device)
        model.eval()
        if device.type != "cpu":
            store.device = device
            store.device_budget = _device_budget(device, device_memory_budget)
        for name in names:
            handles.append(modules[name].register_forward_hook(run.hook(name)))
        with torch.inference_mode(), kept_heap():
            for item in bar:
                images = _images(item, run.batches)
                run.batches += 1
                if images.shape[0] == 0:
                    continue
                run.begin(images.shape[0])
                outputs = model(images.to(device))
                run.forward_calls += 1
                run.check_complete()
                scores.append(_batch_scores(score_fn(outputs), images.shape[0], run.offset))
                run.end()
        if not scores:
            raise ValueError("batches yielded no images; pass at least one (B, C, H, W) batch")
        store.finalize()
    except BaseException:
        store.close()
        raise
    finally:
        for h in handles:
            h.remove()
        _restore_training(flags)
        bar.close()
    seconds = time.perf_counter() - start
    return Capture(store, names, np.concatenate(scores), run.forward_calls, seconds)


def _check_device_budget(budget: Any) -> None:
    if not (isinstance(budget, str) and budget == "auto"):
        _check_budget(budget, "device_memory_budget")


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


def _batch_scores(values: Any, batch_size: int, offset: int) -> np.ndarray:
    s = values.detach() if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    if tuple(s.shape) != (batch_size,):
        hint = " (for an (B, 1) output use out[:, 0])" if tuple(s.shape) == (batch_size, 1) \
            else ""
        raise ValueError(f"score_fn must return one score per image, shape ({batch_size},); "
                         f"got {tuple(s.shape)}{hint}")
    s = s.to("cpu", torch.float64).numpy().copy()
    bad = np.flatnonzero(~np.isfinite(s))
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


def _training_flags(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _restore_training(flags: list[tuple[nn.Module, bool]]) -> None:
    for module, training in flags:
        module.training = training
