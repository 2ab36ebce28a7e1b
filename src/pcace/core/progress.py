"""Progress bars that suit where they are shown: a terminal, a notebook, or a job's log.

:func:`progress_bar` takes tqdm's arguments and gives tqdm's usual bar on a terminal
and in a notebook. When stderr is a file or a pipe (a batch job's log, ``2> log``) a
redrawn bar turns into a string of carriage returns and the final state written twice
(once by the last update, once on closing); there it gives a :class:`LogBar` instead:
one plain line per report, at most one every ``LOG_INTERVAL`` seconds (30; tqdm's
``TQDM_MININTERVAL`` sets another), and the final state exactly once.

Examples
--------
>>> import io
>>> from pcace.core.progress import progress_bar
>>> log = io.StringIO()                      # not a terminal: one line per report
>>> with progress_bar(total=3, desc="work", file=log, mininterval=0) as bar:
...     for _ in range(3):
...         _ = bar.update(1)
>>> lines = log.getvalue().splitlines()
>>> [line.split("|")[0] for line in lines]
['work:   0%', 'work:  33%', 'work:  67%', 'work: 100%']
>>> "\\r" in log.getvalue()
False
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.std import tqdm as std_tqdm

__all__ = ["LOG_INTERVAL", "LogBar", "progress_bar"]

#: Seconds between two lines of a bar written to a log (not a terminal).
LOG_INTERVAL = 30.0


class LogBar(std_tqdm):
    """A tqdm bar for a log file: whole lines, none repeated, the final state once.

    A line is written when the count moved since the last line (at most every
    ``mininterval`` seconds, as tqdm decides); the count's end is written only when the
    bar closes, with the overall rate. A bar closed with ``leave=False`` writes no final
    line.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        interval = float(os.environ.get("TQDM_MININTERVAL", LOG_INTERVAL))
        kwargs.setdefault("mininterval", interval)
        kwargs.setdefault("maxinterval", max(interval, kwargs["mininterval"]))
        self._logged_n: float | None = None
        self._closing = False
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None:  # tqdm clearing or overwriting its line: not in a log
            return True
        at_end = self.total is not None and self.n >= self.total
        if (at_end and not self._closing) or self.n == self._logged_n:
            return True  # the close writes the end; a line at the same count says nothing new
        self.fp.write(self.__str__() + "\n")
        getattr(self.fp, "flush", lambda: None)()
        self._logged_n = self.n
        return True

    def close(self) -> None:
        if getattr(self, "disable", True):
            return
        leave = (abs(getattr(self, "pos", 0)) == 0) if self.leave is None else self.leave
        if leave and hasattr(self, "last_print_t"):
            self._closing = True
            self._ema_dt = lambda: None  # the overall rate, as tqdm's own final line
            try:
                with self._lock:
                    self.display()
            except ValueError:  # the log was closed first
                pass
        self.disable = True
        self._decr_instances(self)


def _in_notebook() -> bool:
    try:
        from tqdm.autonotebook import tqdm as auto_tqdm
    except ImportError:  # pragma: no cover - tqdm always has it
        return False
    return auto_tqdm is not std_tqdm


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> std_tqdm:
    """A progress bar with tqdm's arguments (``total``, ``desc``, ``unit``, ``disable``...).

    tqdm's bar on a terminal or in a notebook; a :class:`LogBar` when the bar's file
    (``file``, default stderr) is not a terminal.

    Parameters
    ----------
    iterable : iterable, optional
        What to iterate over, as for ``tqdm(iterable)``.
    **kwargs
        tqdm's keyword arguments.

    Returns
    -------
    tqdm
        The bar (use it as tqdm's).

    Examples
    --------
    >>> import io
    >>> log = io.StringIO()
    >>> sum(progress_bar(range(4), desc="sum", file=log))
    6
    >>> log.getvalue().count("4/4")
    1
    """
    stream = kwargs.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    try:
        terminal = bool(isatty and isatty())
    except ValueError:  # a closed stream
        terminal = False
    if terminal or _in_notebook():
        from tqdm.auto import tqdm

        return tqdm(iterable, **kwargs)
    return LogBar(iterable, **kwargs)
