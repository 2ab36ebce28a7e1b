"""Run a compiled kernel over index ranges on a small pool of pcace's own threads.

The compiled kernels (ACE, Gram matrices, eigenproblems, standardisation) release the GIL
(``nogil=True``) and work on a range ``[lo, hi)`` of independent items (problems,
channels). :func:`parallel_ranges` splits the items into a few chunks per thread and runs
them on a thread pool that belongs to pcace, so no numba threading layer is involved:
importing or running pcace leaves numba's global configuration alone, and idle pool
threads sleep on a queue instead of spinning (numba's OpenMP layer spins after a
parallel region, which slowed the torch work that followed it 30-fold).

A Ctrl-C arrives in the main thread while it waits for the chunks, never inside compiled
code: the chunks not yet started are cancelled and ``KeyboardInterrupt`` propagates.

The pool has as many threads as the CPUs this process may run on, or ``NUMBA_NUM_THREADS``
when that is set (numba's own way to limit its threads).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_CHUNKS_PER_THREAD = 4


def thread_count() -> int:
    """Threads the compiled kernels use (``NUMBA_NUM_THREADS``, else the usable CPUs).

    Examples
    --------
    >>> thread_count() >= 1
    True
    """
    env = os.environ.get("NUMBA_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=thread_count(),
                                       thread_name_prefix="pcace-kernel")
        return _pool


def parallel_ranges(kernel: Callable[..., object], n: int, *args: object,
                    threads: int | None = None) -> None:
    """Call ``kernel(lo, hi, *args)`` over chunks that cover ``range(n)``, in parallel.

    ``kernel`` must write its results into arrays passed in ``args`` (each chunk its own
    items) and should release the GIL. With one thread, or one item, it runs inline.

    Examples
    --------
    >>> import numpy as np
    >>> out = np.zeros(10)
    >>> def square(lo, hi, src, dst):
    ...     dst[lo:hi] = src[lo:hi] ** 2
    >>> parallel_ranges(square, 10, np.arange(10.0), out)
    >>> out[:4].tolist()
    [0.0, 1.0, 4.0, 9.0]
    """
    if n <= 0:
        return
    threads = thread_count() if threads is None else max(1, threads)
    if threads == 1 or n == 1 or threading.current_thread().name.startswith("pcace-kernel"):
        kernel(0, n, *args)
        return
    chunks = min(n, threads * _CHUNKS_PER_THREAD)
    bounds = [n * i // chunks for i in range(chunks + 1)]
    pool = _executor()
    futures: list[Future] = [pool.submit(kernel, lo, hi, *args)
                             for lo, hi in zip(bounds[:-1], bounds[1:], strict=True) if hi > lo]
    try:
        for future in futures:
            future.result()
    except BaseException:
        for future in futures:
            future.cancel()
        for future in futures:  # the running ones write into the caller's arrays: wait
            if not future.cancelled():
                try:
                    future.result()
                except BaseException:  # noqa: BLE001, S110 - the first error is re-raised
                    pass
        raise
