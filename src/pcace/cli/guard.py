"""A word from the command even when its process is killed outright.

A process killed by SIGKILL (the out-of-memory killer, a job scheduler's hard limit) or
ended by Ray on the spot (Ray ends a driver at once, with ``_exit``, when the Ray
processes on its machine die) says nothing: no handler runs. ``pcace rank`` therefore
forks a small watcher before it starts. The watcher ignores Ctrl-C and SIGTERM (the
run itself handles them), waits on a pipe the run holds open, and leaves quietly when
the run ends in any ordinary way (the run writes one byte on its way out, from
:mod:`atexit`). When the run's end closes the pipe without that byte, the watcher prints
one line on stderr: the run ended abruptly, how many of its layers are checkpointed in
``--out``, and that ``--resume`` continues from them.

The watcher is forked before the run takes its directory's lock, starts no thread and
touches nothing of the run's; it writes with :func:`os.write` and ends with
:func:`os._exit`.

Examples
--------
>>> from pcace.cli.guard import checkpointed_layers
>>> import tempfile
>>> checkpointed_layers(tempfile.mkdtemp())
(0, None)
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
from pathlib import Path

__all__ = ["abrupt_end_message", "checkpointed_layers", "checkpointed_names", "start_watcher"]

#: Set to 0 (or false, no, off) to run without the watcher.
ENV = "PCACE_WATCHER"
_DONE = b"d"


def checkpointed_layers(out: str | Path) -> tuple[int, int | None]:
    """(layers checkpointed, layers of the run) of the run in ``out``; None when unknown.

    A per-label run counts its labels' layers.

    Examples
    --------
    >>> checkpointed_layers("/nonexistent")
    (0, None)
    """
    ckdir = Path(out) / "checkpoints"
    done = len(list(ckdir.glob("layer-*.npz"))) + len(list(ckdir.glob("label-*/checkpoints/"
                                                                     "layer-*.npz")))
    total = None
    try:
        state = json.loads((ckdir / "state.json").read_text(encoding="utf-8"))
        layers = state.get("settings", {}).get("layers")
        total = len(layers) if isinstance(layers, list) else None
    except (OSError, ValueError, AttributeError):
        pass
    return done, total


def checkpointed_names(out: str | Path) -> list[str]:
    """The layers checkpointed in ``out``, in the run's order where it is recorded.

    Examples
    --------
    >>> checkpointed_names("/nonexistent")
    []
    """
    import zipfile

    import numpy as np

    ckdir = Path(out) / "checkpoints"
    names = []
    for file in sorted(ckdir.glob("layer-*.npz")):
        try:
            with np.load(file, allow_pickle=False) as data:
                names.append(str(json.loads(bytes(data["__meta__"]).decode())["layer"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            continue  # a torn checkpoint: the run scores that layer again
    try:
        state = json.loads((ckdir / "state.json").read_text(encoding="utf-8"))
        order = list(state.get("settings", {}).get("layers") or [])
    except (OSError, ValueError, AttributeError, TypeError):
        order = []
    position = {str(name): i for i, name in enumerate(order)}
    return sorted(names, key=lambda n: position.get(n, len(position)))


def abrupt_end_message(pid: int, out: str | Path) -> str:
    """The line the watcher prints when the run ``pid`` ended without a word.

    Examples
    --------
    >>> "ended abruptly" in abrupt_end_message(123, "/nonexistent")
    True
    """
    done, total = checkpointed_layers(out)
    of = f" of {total}" if total is not None and done <= total else ""
    if done:
        saved = (f"{done}{of} layers {'was' if done == 1 else 'were'} finished and "
                 f"checkpointed in {out}: run the same command with --resume to continue "
                 "from them")
    elif (Path(out) / "checkpoints" / "state.json").is_file():
        saved = "No layer had finished: run the same command with --resume to start again"
    else:
        saved = "It had not started its work: run the same command again"
    return (f"pcace: the run (pid {pid}) ended abruptly, without a word of its own: it was "
            "killed (SIGKILL: the out-of-memory killer, a job's time or memory limit; or a "
            "second Ctrl-C) or ended by Ray (when the Ray processes on this machine die). "
            f"{saved}\n")


def start_watcher(out: str | Path) -> bool:
    """Fork the watcher of this run (see the module's notes); False when it is switched off.

    Call it once, before the run takes its directory's lock or starts any thread.
    """
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not hasattr(os, "fork"):  # pragma: no cover - not POSIX
        return False
    parent = os.getpid()
    try:
        read_end, write_end = os.pipe()
        pid = os.fork()
    except OSError:  # no process to spare: run without the watcher
        return False
    if pid == 0:  # the watcher
        try:
            os.close(write_end)
            _watch(read_end, parent, out)
        finally:
            os._exit(0)
    os.close(read_end)

    def done() -> None:
        try:
            os.write(write_end, _DONE)
        except OSError:
            pass

    atexit.register(done)
    return True


def _watch(read_end: int, parent: int, out: str | Path) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the run decides what a signal does
    while True:
        ready, _, _ = select.select([read_end], [], [], 1.0)
        if ready:
            data = os.read(read_end, 1)
            if data == _DONE:
                return  # the run ended in an ordinary way and said so itself
            break  # the pipe closed: the run's process is gone
        if os.getppid() != parent:  # gone, though a child it left holds the pipe
            break
    try:
        os.write(2, abrupt_end_message(parent, out).encode())
    except OSError:
        pass
