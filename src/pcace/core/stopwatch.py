"""Where a run's time went, stage by stage.

Examples
--------
>>> watch = Stopwatch()
>>> with watch("ace"):
...     pass
>>> sorted(watch.seconds)
['ace']
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Stopwatch"]


class Stopwatch:
    """Wall time per named stage, added up over every time the stage ran.

    Attributes
    ----------
    seconds : dict
        ``{stage: seconds}``, in the order the stages first ran.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._frames: list[list] = []  # [stage, seconds spent in stages inside it]

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        """Time a stage; a stage inside another counts to itself only (the outer one's
        time excludes it)."""
        start = time.perf_counter()
        self._frames.append([stage, 0.0])
        try:
            yield
        finally:
            _, inner = self._frames.pop()
            spent = time.perf_counter() - start
            self.seconds[stage] = self.seconds.get(stage, 0.0) + spent - inner
            if self._frames:
                self._frames[-1][1] += spent

    def add(self, stage: str, seconds: float) -> None:
        """Count ``seconds`` to ``stage`` (time measured elsewhere)."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
