"""Bytes of memory: the machine's share a run may take, and the numbers that size it.

The run's plan (:class:`pcace.reduce.plan.MemoryPlan`) splits a budget between stages;
this module only turns ``memory_budget`` arguments into bytes and bytes into words.

Examples
--------
>>> size_text(3 * 2**29)
'1.50 GiB'
"""

from __future__ import annotations

from typing import Any

from .validation import byte_count

__all__ = ["BYTES_PER_VALUE", "PREFERRED_BUDGET", "default_memory_budget", "resolve_budget",
           "size_text"]

#: Activations are kept as float32.
BYTES_PER_VALUE = 4


#: The budget ``memory_budget="auto"`` plans in first (or a quarter of the machine's memory,
#: if smaller). A run that would spill maps to disk, split moments into channel groups or
#: iterate a subspace in it takes the quarter of the machine instead
#: (:meth:`pcace.reduce.plan.MemoryPlan.plan_routes`): memory stays flat in N where the
#: layers can be streamed, and grows only where the alternative is disk or extra passes.
PREFERRED_BUDGET = 2**30


def size_text(nbytes: int) -> str:
    """Bytes in words: MiB below a GiB, GiB above."""
    return f"{nbytes / 2**20:.1f} MiB" if nbytes < 2**30 else f"{nbytes / 2**30:.2f} GiB"


def default_memory_budget() -> int:
    """A quarter of the machine's memory: :func:`pcace.capture.capture`'s ``"auto"`` budget,
    and the ceiling ``pcace.rank``'s ``"auto"`` plan widens to
    (:meth:`pcace.reduce.plan.MemoryPlan.from_budget`).

    The machine's memory is the smaller of its physical RAM and a cgroup (container) limit,
    when either is known; the budget is at least 1 GiB, and 2 GiB when nothing is known.

    Examples
    --------
    >>> default_memory_budget() >= 2**30
    True
    """
    import os
    from pathlib import Path

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
    """``"auto"`` -> :func:`default_memory_budget`; a number of bytes is checked and kept.

    Examples
    --------
    >>> resolve_budget(2**30)
    1073741824
    """
    if isinstance(memory_budget, str) and memory_budget == "auto":
        return default_memory_budget()
    return byte_count(memory_budget, "memory_budget")
