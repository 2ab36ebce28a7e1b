"""The activation store: captured maps, channel-major, in RAM under a budget, else on disk.

Each layer is kept as ``(C, N, H*W)`` float32, so the reduce step can take a run of
channels as one contiguous block without another copy. Space is reserved per layer when
its first batch comes (all N images at once when N is known). While the reservations stay
within the budget layers live in RAM, in their own anonymous mappings
(:func:`pcace.core.malloc.mapped_empty`); past it, the largest layers are spilled to raw
float32 files in the same layout, written at their offsets by a background thread as
batches come, and read back in channel blocks with plain reads (no memory maps, whose
pages would count against the process's resident memory). On a GPU, layers first stay in
the device's own memory while they fit a device budget, so their reduce step runs there
without a transfer; the rest go to RAM and disk as above.
"""

from __future__ import annotations

import shutil
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ..core.budget import BYTES_PER_VALUE
from ..core.files import safe_name
from ..core.malloc import mapped_empty
from ..core.validation import byte_count, integer
from .spill import make_spill_dir

ChannelIndex = int | slice | Sequence[int] | torch.Tensor | np.ndarray


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
        byte_count(memory_budget, "memory_budget")
        byte_count(device_budget, "device_budget")
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

    def blocks(self, name: str, channels: int, *, destructive: bool = False
               ) -> Iterator[tuple[slice, torch.Tensor]]:
        """Walk a layer in channel-major blocks ``(c, N, H*W)`` of at most ``channels``.

        ``destructive=False``: every block is the caller's own tensor. True: for a layer
        held in memory (RAM or a GPU's) the blocks are **views of the stored
        activations**, which the caller may overwrite (destroying what the store holds).
        A spilled layer's blocks are read from disk into fresh tensors either way, the
        next one on a background thread while the caller works on the current one (two
        blocks in memory at once).
        """
        step = integer(channels, "channels")
        if name not in self.shapes:
            raise KeyError(f"layer {name!r} was not captured; captured layers: "
                           f"{list(self.shapes)}")
        c = self.shapes[name][0]
        chunks = [slice(start, min(start + step, c)) for start in range(0, c, step)]
        spilled = self.spilled.get(name)
        if not spilled or len(chunks) == 1:
            for chunk in chunks:
                block = self.block(name, chunk.start, chunk.stop)
                yield chunk, block if destructive or spilled else block.clone()
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="pcace-read") as pool:
            ahead = pool.submit(self.block, name, chunks[0].start, chunks[0].stop)
            for i, chunk in enumerate(chunks):
                block = ahead.result()
                if i + 1 < len(chunks):  # file reads release the GIL: the disk works meanwhile
                    ahead = pool.submit(self.block, name, chunks[i + 1].start,
                                        chunks[i + 1].stop)
                yield chunk, block
                del block

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
        layer.path = directory / f"{index:03d}_{safe_name(name, each=True)}.f32"
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
            self._dir = make_spill_dir(parent)
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)
        return self._dir


def device_budget_bytes(device: torch.device, budget: int | str) -> int:
    """``"auto"``: half the free memory of a CUDA device (0 for a device that cannot say)."""
    if not (isinstance(budget, str) and budget == "auto"):
        return int(budget)
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return int(free // 2)


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
