"""What the run-directory modules share: the error, the reserved names, small readers."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.files import os_error_reason

__all__ = ["CHECKPOINTS", "CHECKPOINT_FORMAT", "MANIFEST", "RunDirError", "brief", "read_json",
           "usable_dir"]

MANIFEST = "run.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_FORMAT = "pcace-checkpoint-1"


class RunDirError(ValueError):
    """A run directory cannot be used or trusted; the message names the problem and the fix."""


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or not an object."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def brief(names: Sequence[str], n: int = 4) -> str:
    """Up to ``n`` names, comma-separated, then how many more."""
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def usable_dir(path: str | Path, *, probe: bool = True) -> Path:
    """Create ``path`` if needed; with ``probe``, check that files can be written in it.

    Raises :class:`RunDirError` naming the fix when it is a file or cannot be created
    or written.

    Examples
    --------
    >>> import tempfile
    >>> usable_dir(tempfile.mkdtemp() + "/a/b").is_dir()
    True
    """
    root = Path(path).expanduser()
    if root.exists() and not root.is_dir():
        raise RunDirError(f"output {root} is a file, not a directory; name a directory "
                          "(it is created if needed)")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"cannot create the output directory {root} ({os_error_reason(err)}); "
                          "choose a writable location") from None
    if probe:
        try:
            fd, name = tempfile.mkstemp(prefix=".pcace-probe-", dir=root)
            os.close(fd)
            os.unlink(name)
        except OSError as err:
            raise RunDirError(f"cannot write in the output directory {root} "
                              f"({os_error_reason(err)}); choose a writable location") from None
    return root
