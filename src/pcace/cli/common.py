"""What the ``pcace`` commands share: a run directory's lock, the check that a run directory
exists, and tables printed at a few significant digits.

Examples
--------
>>> import pandas as pd
>>> print(rounded_table(pd.DataFrame({"x": [1.23456]})))
     x
1.2346
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

__all__ = ["existing_run", "locked", "rounded_table"]


def locked(path: str | Path) -> Any:
    """The run directory's lock (refused, naming the holder, while another run has it)."""
    from ..results.lock import lock_run_dir

    return lock_run_dir(path, note=lambda text: print(f"pcace: note: {text}", file=sys.stderr))


def existing_run(path: str) -> None:
    """Refuse (before locking, which would create it) a path that is no directory."""
    from ..results.result import load

    if not Path(path).is_dir():
        load(path)  # raises the clear error


def rounded_table(frame: Any, digits: int = 4) -> str:
    """A table printed at ``digits`` significant digits, rounding noise shown as 0.

    A value below ``1e-9`` of its column's largest magnitude (e.g. ``8.7e-19`` next to
    ``0.3``) is the floating-point residue of an exact 0 and printed as 0.

    Examples
    --------
    >>> import pandas as pd
    >>> print(rounded_table(pd.DataFrame({"gap": [0.31234567, 8.673617e-19]})))
         gap
    0.3123
    0.0000
    """
    import numpy as np

    shown = frame.copy()
    for column in shown.columns:
        values = shown[column]
        if values.dtype.kind != "f":
            continue
        scale = float(np.nanmax(np.abs(values.to_numpy()))) if values.notna().any() else 0.0
        shown[column] = values.where(values.abs() > 1e-9 * scale, 0.0) if scale else values
    return shown.to_string(index=False, float_format=lambda v: f"{v:.{digits}g}"
                           if abs(v) >= 10 ** digits or (v and abs(v) < 10 ** -digits)
                           else f"{v:.{digits}f}")
