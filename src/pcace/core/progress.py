"""Progress bars on stderr, the same everywhere (tqdm).

Examples
--------
>>> bar = progress_bar(range(3), desc="demo", disable=True)
>>> sum(bar)
3
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(iterable: Iterable[Any] | None = None, *, total: float | None = None,
                 desc: str = "", unit: str = "it", disable: bool = False) -> Any:
    """A tqdm bar on stderr over ``iterable`` (or counting to ``total``).

    The length of ``iterable`` is used when it has one.
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr,
                disable=disable)
