"""One run at a time in a run directory: a lock file naming the run that holds it.

A run that writes into a directory (``pcace rank --out``, ``report``, ``ablate``, or
:func:`pcace.rank` with ``checkpoint_dir``) first takes ``DIR/.pcace-lock``. A second
run on the same directory -- with or without ``--force`` or ``--resume`` -- is refused
with :class:`RunDirBusy`, whose message names the first (host, process id, start time,
command). How it works:

- The lock is the kernel's (``flock``) on that file, taken without waiting: atomic, and
  let go by the kernel when the process ends however it ends (SIGKILL, the OOM killer).
  The file's content -- host, pid, the process's start time, the command -- is only the
  description for the message.
- A lock file left by a process that died (SIGKILL, a crash) is taken over, with a note
  naming it: on this host the process is known to be gone (its kernel lock was released
  and its pid no longer runs, or runs another program). A lock file written on another
  host is never taken over: pcace cannot see that process from here, and the message
  says to remove the file once that run is known to be over.
- Within one process the lock is reentrant: ``pcace rank`` holds it for the whole
  command, and the library calls inside it (:func:`pcace.results.rundir.save_run`,
  :func:`pcace.results.checkpoints.start_checkpoints`) find it held and go on.
- On a file system without ``flock`` (some network mounts) the description alone
  decides: a live pid on this host refuses, a dead one is taken over.

Examples
--------
>>> import tempfile
>>> from pcace.results.lock import lock_run_dir, read_lock
>>> root = tempfile.mkdtemp()
>>> with lock_run_dir(root) as lock:
...     read_lock(root).pid == lock.info.pid
True
>>> read_lock(root) is None   # released: the file is gone
True
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..core.files import os_error_reason
from ..core.voice import action
from .common import RunDirError, usable_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the description alone decides
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "LockInfo", "RunDirBusy", "RunLock", "hold_run_dir", "holds_run_dir",
           "lock_run_dir", "read_lock", "release_run_dir"]

#: The lock file's name inside a run directory.
LOCK_NAME = ".pcace-lock"
#: Seconds a lock whose process is gone may stay held by a child it left (a data loader).
ORPHAN_WAIT = 5.0

_GUARD = threading.RLock()
_HELD: dict[Path, RunLock] = {}
_HOLDS: set[Path] = set()  # directories held by hold_run_dir (released by release_run_dir)


class RunDirBusy(RunDirError):
    """The run directory is in use by another pcace run; the message names it.

    Attributes
    ----------
    holder : LockInfo or None
        The run that holds the directory, as its lock file describes it.
    """

    def __init__(self, message: str, holder: LockInfo | None = None):
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class LockInfo:
    """What a lock file says of the run that took it.

    Attributes
    ----------
    host : str
        The machine's host name.
    pid : int
        The process id there.
    started : str
        When the lock was taken (local time, ISO 8601).
    proc_start : int or None
        The process's start time in clock ticks since boot (Linux), which tells a reused
        pid from the original process.
    boot_id : str or None
        The machine's boot id (Linux): after a reboot no process of before runs.
    command : str
        The command line, shortened.
    """

    host: str
    pid: int
    started: str
    proc_start: int | None = None
    boot_id: str | None = None
    command: str = ""

    @classmethod
    def this_process(cls) -> LockInfo:
        """The description of the calling process."""
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""
        return cls(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S"),
                   _proc_start(os.getpid()), _boot_id(), command[:300])

    @classmethod
    def parse(cls, text: str) -> LockInfo | None:
        """A lock file's content, or None when it is empty or not a lock description."""
        try:
            obj = json.loads(text)
            return cls(str(obj["host"]), int(obj["pid"]), str(obj.get("started", "?")),
                       obj.get("proc_start"), obj.get("boot_id"), str(obj.get("command", "")))
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def here(self) -> bool:
        """Whether it was written on this machine."""
        return self.host == socket.gethostname()

    def running(self) -> bool | None:
        """Whether its process still runs: None when it is on another host (unknown).

        Examples
        --------
        >>> LockInfo.this_process().running()
        True
        """
        if not self.here:
            return None
        if self.boot_id and _boot_id() and self.boot_id != _boot_id():
            return False  # the machine rebooted since
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's process: it exists
        now = _proc_start(self.pid)
        return not (self.proc_start is not None and now is not None and now != self.proc_start)

    def describe(self) -> str:
        """``pid 123 on host h, started 2026-01-01 10:00:00: pcace rank ...``."""
        text = f"pid {self.pid} on host {self.host}, started {self.started}"
        return text + (f": {self.command}" if self.command else "")


def _proc_start(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


class RunLock:
    """A run directory's lock, held by this process (see :func:`lock_run_dir`).

    Use it as a context manager, or call :meth:`release`; each :func:`lock_run_dir` of the
    same directory in this process adds one to its count and each release takes one.

    Attributes
    ----------
    root : Path
        The run directory.
    info : LockInfo
        What its lock file says (this process).
    """

    def __init__(self, root: Path, fd: int, info: LockInfo):
        self.root, self.info = root, info
        self._fd: int | None = fd
        self._count = 1

    @property
    def held(self) -> bool:
        """Whether this lock is still held."""
        return self._fd is not None

    def release(self) -> None:
        """Let the lock go once; the last release removes the lock file."""
        with _GUARD:
            if self._fd is None:
                return
            self._count -= 1
            if self._count > 0:
                return
            fd, self._fd = self._fd, None
            _HELD.pop(self.root, None)
            _HOLDS.discard(self.root)
            try:
                if _same_file(fd, self.root / LOCK_NAME):
                    os.unlink(self.root / LOCK_NAME)
            except OSError:
                pass  # the directory went away: nothing to remove
            finally:
                os.close(fd)  # the kernel lock goes with the last descriptor

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_lock(path: str | Path) -> LockInfo | None:
    """The description in a run directory's lock file, or None when there is none.

    Examples
    --------
    >>> import tempfile
    >>> read_lock(tempfile.mkdtemp()) is None
    True
    """
    try:
        return LockInfo.parse((Path(path) / LOCK_NAME).read_text(encoding="utf-8"))
    except OSError:
        return None


def lock_run_dir(path: str | Path, *, note: Callable[[str], Any] | None = None) -> RunLock:
    """Take a run directory's lock (creating the directory), or say who holds it.

    Parameters
    ----------
    path : str or Path
        The run directory; created if needed.
    note : callable, optional
        Called with one line when a lock left by a dead process is taken over (default:
        a :class:`UserWarning`).

    Returns
    -------
    RunLock
        Held until released (a context manager); taken again in this process, the same
        lock with one more count.

    Raises
    ------
    RunDirBusy
        Another live run holds it, or a run on another host left it (the message names
        that run and what to do).
    RunDirError
        The directory cannot be created or written.

    Examples
    --------
    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> with lock_run_dir(root) as outer, lock_run_dir(root) as inner:
    ...     outer is inner
    True
    """
    root = usable_dir(path, probe=False)
    key = root.resolve()
    with _GUARD:
        held = _HELD.get(key)
        if held is not None and held.held and held.info.pid == os.getpid():
            held._count += 1
            return held
        fd, info = _acquire(key, note)
        lock = RunLock(key, fd, info)
        _HELD[key] = lock
        return lock


def holds_run_dir(path: str | Path) -> bool:
    """Whether this process holds the lock of ``path`` or of a directory above it.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with lock_run_dir(root):
    ...     holds_run_dir(root / "checkpoints" / "label-a")
    True
    """
    key = Path(path).expanduser().resolve()
    with _GUARD:
        return any(lock.held and lock.info.pid == os.getpid() and (k == key or k in key.parents)
                   for k, lock in _HELD.items())


def hold_run_dir(path: str | Path) -> None:
    """Hold ``path``'s lock until :func:`release_run_dir` (or the process ends).

    For the library's own use (:func:`pcace.results.checkpoints.start_checkpoints`):
    nothing happens when this process holds it already (or a directory above it).

    Examples
    --------
    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> hold_run_dir(root); holds_run_dir(root)
    True
    >>> release_run_dir(root); holds_run_dir(root)
    False
    """
    if holds_run_dir(path):
        return
    lock = lock_run_dir(path)
    with _GUARD:
        _HOLDS.add(lock.root)


def release_run_dir(path: str | Path) -> None:
    """Let go of a lock taken by :func:`hold_run_dir` (no-op when there is none).

    Examples
    --------
    >>> import tempfile
    >>> release_run_dir(tempfile.mkdtemp())
    """
    key = Path(path).expanduser().resolve()
    with _GUARD:
        if key not in _HOLDS:
            return
        _HOLDS.discard(key)
        lock = _HELD.get(key)
    if lock is not None:
        lock.release()


# --- taking the lock --------------------------------------------------------------------------

def _acquire(root: Path, note: Callable[[str], Any] | None) -> tuple[int, LockInfo]:
    path = root / LOCK_NAME
    deadline = time.monotonic() + ORPHAN_WAIT
    while True:
        fd = _open(path, root)
        try:
            kernel = _try_flock(fd)
        except BlockingIOError:
            holder = _read_info(fd, wait=True)
            os.close(fd)
            if holder is not None and holder.running() is False and time.monotonic() < deadline:
                time.sleep(0.1)  # its process is gone; a child it left still holds the file
                continue
            raise RunDirBusy(_busy_message(root, holder), holder) from None
        if not _same_file(fd, path):  # released and removed meanwhile: take the new file
            os.close(fd)
            continue
        try:
            previous = _read_info(fd, wait=False)
            mine = LockInfo.this_process()
            if previous is not None and (previous.pid, previous.host) != (mine.pid, mine.host):
                _note(note, _takeover(root, previous, kernel))
            try:
                _write_info(fd, mine)
            except OSError as err:  # a full disk
                raise RunDirError(f"cannot write in the output directory {root} "
                                  f"({os_error_reason(err)}); free space there or choose "
                                  "another location") from None
        except BaseException:
            os.close(fd)
            raise
        return fd, mine


def _open(path: Path, root: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as err:
        raise RunDirError(f"cannot write in the output directory {root} ({os_error_reason(err)}); "
                          "choose a writable location") from None


def _try_flock(fd: int) -> bool:
    """Lock ``fd`` without waiting: True when locked, False where the system has no locks."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise BlockingIOError(err.errno, err.strerror) from None
        return False  # ENOLCK, EOPNOTSUPP, ENOSYS: a file system without locks
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_info(fd: int, wait: bool) -> LockInfo | None:
    """The description in an open lock file; with ``wait``, give its writer a moment."""
    for _ in range(10 if wait else 1):
        with contextlib.suppress(OSError):
            size = os.fstat(fd).st_size
            info = LockInfo.parse(os.pread(fd, max(size, 1), 0).decode("utf-8", "replace"))
            if info is not None:
                return info
        if wait:
            time.sleep(0.05)
    return None


def _write_info(fd: int, info: LockInfo) -> None:
    data = json.dumps(asdict(info), indent=2).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    with contextlib.suppress(OSError):
        os.fsync(fd)


def _takeover(root: Path, previous: LockInfo, kernel: bool) -> str:
    """The note for taking over a lock file left behind; refuse one whose run may still go."""
    running = previous.running()
    if running is False:
        return (f"took over the lock of {root} left by a run that no longer runs "
                f"({previous.describe()})")
    if running is None or not kernel:  # another host, or no kernel locks: its word stands
        raise RunDirBusy(_busy_message(root, previous), previous)
    # this host, the process runs, yet it holds no kernel lock on the file: the file was
    # copied or its lock lost (a copied run directory); the kernel's word stands
    return (f"took over the lock of {root}: it names {previous.describe()}, which runs but "
            "does not hold it (a copied run directory?)")


def _busy_message(root: Path, holder: LockInfo | None) -> str:
    lockfile = root / LOCK_NAME
    if holder is None:
        return (f"{root} is in use by another pcace run (its lock {lockfile} names none yet); "
                f"wait for it to end, or {action('other_out')}")
    if not holder.here:
        return (f"{root} is in use by a pcace run on another host ({holder.describe()}); "
                f"wait for it to end or {action('other_out')}. If that run is no longer "
                f"running, remove {lockfile} and run again")
    return (f"{root} is in use by another pcace run ({holder.describe()}); wait for it to "
            f"end (or stop it: `kill {holder.pid}` saves its finished layers), or "
            f"{action('other_out')}")


def _note(note: Callable[[str], Any] | None, text: str) -> None:
    if note is not None:
        note(text)
    else:
        warnings.warn(text, UserWarning, stacklevel=4)
