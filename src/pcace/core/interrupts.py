"""Stop a long computation cleanly on Ctrl-C or SIGTERM.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be when
SIGINT arrives. Inside compiled code (numba, a C extension) that surfaces as
``SystemError: ... returned a result with an exception set`` and can leave
half-written state behind; SIGTERM, by default, kills the process with no
cleanup at all. :class:`deferred_signals` replaces both handlers, while a
computation runs, by ones that only record the signal; the computation calls
:meth:`deferred_signals.check` between units of work (e.g. after each layer)
and stops there with an :class:`Interrupted` exception that carries the signal
and the conventional exit code (130 for SIGINT, 143 for SIGTERM). A second
signal while the first is pending ends the process at once, as the signal
would have without a handler.

Examples
--------
>>> from pcace.core.interrupts import Interrupted, deferred_signals
>>> with deferred_signals() as guard:
...     for step in range(3):
...         pass            # one unit of work: no exception can land in here
...         guard.check()   # raises Interrupted after a Ctrl-C
>>> guard.received is None
True
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

__all__ = ["Interrupted", "deferred_signals", "exit_code_for"]

_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


def exit_code_for(signum: int) -> int:
    """The shell's exit status for a process stopped by signal ``signum`` (128 + signum).

    Examples
    --------
    >>> import signal
    >>> exit_code_for(signal.SIGINT), exit_code_for(signal.SIGTERM)
    (130, 143)
    """
    return 128 + int(signum)


class Interrupted(Exception):
    """The computation stopped between two units of work because a signal arrived.

    Attributes
    ----------
    signum : int
        The signal (``signal.SIGINT`` or ``signal.SIGTERM``).
    exit_code : int
        What the process should exit with: 130 for SIGINT, 143 for SIGTERM.

    Examples
    --------
    >>> import signal
    >>> err = Interrupted(signal.SIGTERM)
    >>> err.exit_code, str(err)
    (143, 'interrupted by SIGTERM')
    """

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.exit_code = exit_code_for(signum)
        super().__init__(f"interrupted by {_NAMES.get(signum, f'signal {signum}')}")


class deferred_signals:  # noqa: N801 - used as a context manager, like contextlib's
    """Record SIGINT and SIGTERM instead of acting on them, until :meth:`check` is called.

    Only in the main thread (where Python runs signal handlers); elsewhere it does
    nothing and :meth:`check` never raises. Previous handlers come back on exit.

    Parameters
    ----------
    signals : tuple of int
        The signals to defer (default SIGINT and SIGTERM).
    message : bool
        On the first signal, print one line to stderr saying the run stops after the
        current unit of work and that a second signal aborts at once.

    Attributes
    ----------
    received : int or None
        The first signal recorded, None while none came.
    active : bool
        Whether the handlers were installed (False outside the main thread).

    Examples
    --------
    >>> with deferred_signals(message=False) as guard:
    ...     installed = guard.active
    ...     guard.check()
    >>> installed, guard.active
    (True, False)
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
                 message: bool = True):
        self.signals = tuple(signals)
        self.message = message
        self.received: int | None = None
        self.active = False
        self._previous: dict[int, Any] = {}

    @property
    def exit_code(self) -> int | None:
        """130/143 once a signal was recorded, else None."""
        return None if self.received is None else exit_code_for(self.received)

    def __enter__(self) -> deferred_signals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def check(self) -> None:
        """Raise :class:`Interrupted` if a signal was recorded; call it between units of work."""
        if self.received is not None:
            raise Interrupted(self.received)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        self.active = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            if self.message:
                name = _NAMES.get(signum, f"signal {signum}")
                print(f"pcace: {name} received; stopping after the current step "
                      "(send it again to abort at once)", file=sys.stderr, flush=True)
            return
        # a second signal: end now, the way the signal ends a process without a handler
        self._restore()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
