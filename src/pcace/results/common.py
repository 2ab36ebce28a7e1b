"""What the run-directory modules share: the error, the reserved names, small readers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["CHECKPOINTS", "CHECKPOINT_FORMAT", "MANIFEST", "RunDirError", "brief", "read_json"]

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
