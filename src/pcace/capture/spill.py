"""Spill directories: where layers that do not fit in memory go, named after their process.

:func:`make_spill_dir` names them ``pcace-spill-<pid>-<random>``; :func:`clean_stale_spills`
removes those of processes that no longer exist (a killed run's).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

__all__ = ["SPILL_PREFIX", "clean_stale_spills", "make_spill_dir", "spill_owner"]

SPILL_PREFIX = "pcace-spill-"
_SPILL = re.compile(rf"^{re.escape(SPILL_PREFIX)}(\d+)-[A-Za-z0-9_]+$")


def make_spill_dir(parent: str | Path | None = None) -> Path:
    """A new spill directory named after this process: ``pcace-spill-<pid>-<random>``.

    Parameters
    ----------
    parent : str or Path, optional
        Where to create it (created if needed); the system's temporary directory by
        default.

    Examples
    --------
    >>> import os, tempfile
    >>> d = make_spill_dir(tempfile.mkdtemp())
    >>> spill_owner(d) == os.getpid()
    True
    """
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-",
                                 dir=None if parent is None else str(parent)))


def spill_owner(path: str | Path) -> int | None:
    """The process id a spill directory's name records, or None for another name.

    Examples
    --------
    >>> spill_owner("/tmp/pcace-spill-4242-ab12cd"), spill_owner("/tmp/pcace-spill-ab12cd")
    (4242, None)
    """
    m = _SPILL.match(Path(path).name)
    return int(m.group(1)) if m else None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # never treat an odd id as dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return True
    return True


def clean_stale_spills(parent: str | Path | None = None) -> list[Path]:
    """Remove the spill directories in ``parent`` whose owning process no longer exists.

    Only directories named ``pcace-spill-<pid>-<random>`` (see :func:`make_spill_dir`)
    whose process is gone; those of running processes, other users' and older unnamed
    ones stay.

    Parameters
    ----------
    parent : str or Path, optional
        Where to look; the system's temporary directory by default.

    Returns
    -------
    list of Path
        The directories removed (report them to the user).

    Examples
    --------
    >>> for d in clean_stale_spills():  # doctest: +SKIP
    ...     print(f"removed {d}, left by a killed pcace run")
    """
    base = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    if not base.is_dir():
        return []
    removed = []
    for entry in sorted(base.iterdir()):
        pid = spill_owner(entry)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
    return removed
