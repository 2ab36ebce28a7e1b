"""How a run gets its memory: the store in its own mappings, temporaries from a kept heap.

A forward pass allocates and frees hundreds of megabytes per batch (each layer's output).
glibc's ``malloc`` serves blocks above its mmap threshold (at most 32 MiB by default) with
fresh ``mmap`` calls and unmaps them on free, so every batch faults its working memory in
again, page by page, and a heap whose free top passes the trim threshold gives it back to
the system just as often. :func:`kept_heap` raises the thresholds for the forward pass,
so freed blocks stay in the heap and the next batch reuses them already mapped, then sets
them back and hands the free memory to the system (``malloc_trim``).

This changes process-wide settings, so a library must not do it behind its host's back:
it is **off by default**. It is turned on by ``tune_malloc=True`` (in :func:`pcace.rank`,
:func:`pcace.capture.capture.capture`, :func:`pcace.stats.ablate.ablate`, ...) or by the environment
variable ``PCACE_TUNE_MALLOC=1``; the ``pcace`` command, which owns its process, turns it on
unless ``PCACE_TUNE_MALLOC=0``. Once tuned, glibc offers no way to restore its automatic
threshold adjustment: the thresholds are left at the values that adjustment reaches in a
PyTorch process (32 MiB / 64 MiB), fixed. The gain is measured in ``benchmarks/README.md``
("The kept heap"). Only glibc on Linux is tuned; elsewhere (macOS, Windows, musl, or
jemalloc/tcmalloc preloaded, which glibc's ``mallopt`` does not reach) it does nothing
useful. glibc's own malloc settings (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``GLIBC_TUNABLES``) always win.

The activation store is the run's largest and longest-lived allocation, so it does not go
through ``malloc`` at all: :func:`mapped_empty` gives tensors backed by their own anonymous
mapping, returned to the system as soon as the tensor is freed, whatever the heap does.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# blocks up to 128 MiB come from the heap during a run: all of a ResNet-18 pass's at batch
# 32, most at 64. Larger thresholds were faster still on VGG-16 (411 MB layer outputs) but
# fragmented the heap: its pass's working memory grew from 1.16 to 1.91 GB at 1 GiB, to
# 1.25 GB at 128 MiB
_RUN_MMAP_THRESHOLD = 128 * 2**20
_RUN_TRIM_THRESHOLD = 2**31 - 1  # and the heap is not trimmed until the run ends
# afterwards: the values glibc's automatic thresholds rise to in a process that has freed
# a block of 32 MiB or more, as a PyTorch process soon has (setting them turns the
# automatic adjustment off, and glibc offers no way to read or restore it)
_AFTER_MMAP_THRESHOLD = 32 * 2**20
_AFTER_TRIM_THRESHOLD = 64 * 2**20
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "GLIBC_TUNABLES")

_lock = threading.Lock()
_depth = 0


_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def tuning_requested(tune_malloc: bool | None = None) -> bool:
    """Whether a run should keep its heap: ``tune_malloc``, else ``PCACE_TUNE_MALLOC`` (off).

    Examples
    --------
    >>> tuning_requested(False)
    False
    """
    if tune_malloc is not None:
        return bool(tune_malloc)
    return os.environ.get("PCACE_TUNE_MALLOC", "").strip().lower() in _ON


def _glibc() -> Any | None:
    """The process's C library when it is glibc and may be tuned, else None."""
    if not sys.platform.startswith("linux"):
        return None
    if os.environ.get("PCACE_TUNE_MALLOC", "").strip().lower() in _OFF:
        return None
    if any(key in os.environ for key in _USER_SETTINGS):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def kept_heap(enabled: bool = True) -> Iterator[bool]:
    """Keep freed memory in the heap while the block runs, then return it to the system.

    Yields whether ``malloc`` was tuned (``enabled``, glibc on Linux, not turned off by
    ``PCACE_TUNE_MALLOC=0`` or glibc's own settings). Nested and concurrent uses tune once:
    the outermost exit sets the thresholds back and trims the heap.

    Examples
    --------
    >>> import torch
    >>> with kept_heap():
    ...     for _ in range(3):
    ...         x = torch.ones(2**24)  # 64 MiB: mapped once, then reused
    >>> float(x.sum())
    16777216.0
    """
    global _depth
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            if not libc.mallopt(_M_MMAP_THRESHOLD, _RUN_MMAP_THRESHOLD):
                libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP_THRESHOLD)  # an older glibc's cap
            libc.mallopt(_M_TRIM_THRESHOLD, _RUN_TRIM_THRESHOLD)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP_THRESHOLD)
                libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM_THRESHOLD)
                libc.malloc_trim(0)


def mapped_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised CPU tensor in its own anonymous memory mapping.

    The mapping is unmapped when the tensor (and every view of it) is freed, so a large,
    long-lived buffer never stays behind in the ``malloc`` heap.

    Examples
    --------
    >>> t = mapped_empty((2, 3))
    >>> t.fill_(1.5).sum().item(), t.dtype, t.is_contiguous()
    (9.0, torch.float32, True)
    """
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    size = count * np_dtype.itemsize
    anonymous = getattr(mmap, "MAP_ANONYMOUS", getattr(mmap, "MAP_ANON", None))
    if hasattr(mmap, "MAP_PRIVATE") and anonymous is not None:
        # private: mmap's default, a shared mapping, would be shmem
        buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | anonymous)
    else:  # Windows: anonymous memory backed by the paging file
        buffer = mmap.mmap(-1, size)
    return torch.from_numpy(np.frombuffer(buffer, dtype=np_dtype).reshape(shape))
