"""Per-layer checkpoints of a run: one file per finished layer, so an interrupted run resumes.

:func:`start_checkpoints`, :func:`save_layer_checkpoint`, :func:`load_layer_checkpoints`
and :func:`remove_checkpoints` keep them in the run directory's ``checkpoints/``; a
checkpoint of other settings (another fingerprint) is never taken.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core.files import atomic_write, os_error_reason, safe_name
from ..core.voice import action
from .common import CHECKPOINT_FORMAT, CHECKPOINTS, RunDirError, brief, read_json
from .lock import hold_run_dir, holds_run_dir, release_run_dir

# state files this process wrote (to tell "removed under our feet" from "never started")
_STARTED: set[Path] = set()

__all__ = ["LayerCheckpoint", "load_layer_checkpoints", "remove_checkpoints", "run_fingerprint",
           "save_layer_checkpoint", "start_checkpoints"]


@dataclass
class LayerCheckpoint:
    """What a finished layer left behind: its channel rows and what resuming needs.

    Attributes
    ----------
    layer : str
        The layer's module name.
    table : pandas.DataFrame
        Its channel rows as scored, with every column (null, bootstrap) and dtypes intact.
    stability : dict or None
        Its ranking-stability summary (bootstrap runs).
    arrays : dict
        Extra arrays saved with it (e.g. ``"components"``: the (C, N, k) PC scores).
    extra : dict
        Extra JSON-serialisable values saved with it.
    """

    layer: str
    table: pd.DataFrame
    stability: dict[str, Any] | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def run_fingerprint(settings: Mapping[str, Any]) -> str:
    """A short hash of everything that determines a run's numbers.

    Include the weights hash, the layers, the target, k, the score, seed, permutations,
    bootstrap, level, interval, precision, ACE options, device type and a hash of the
    score vector (it identifies the images and their order).

    Examples
    --------
    >>> run_fingerprint({"seed": 0, "k": 3}) == run_fingerprint({"k": 3, "seed": 0})
    True
    """
    text = json.dumps(_encode(dict(settings)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def start_checkpoints(path: str | Path, settings: Mapping[str, Any]) -> str:
    """Begin (or, on resume, re-open) a run's checkpoints; return its fingerprint.

    Writes ``checkpoints/state.json`` the first time. When it exists with other
    settings, the run there is a different computation and resuming it is refused.
    Takes the directory's lock (:mod:`pcace.results.lock`) unless this process holds it
    already, and keeps it until the run is saved there
    (:func:`pcace.results.rundir.save_run`), its checkpoints are removed, or the process
    ends: a second run on the directory is refused meanwhile.

    Examples
    --------
    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> fp = start_checkpoints(root, {"seed": 0})
    >>> start_checkpoints(root, {"seed": 0}) == fp
    True
    """
    root = Path(path)
    took = not holds_run_dir(root)
    hold_run_dir(root)
    try:
        return _start(root, settings)
    except BaseException:
        if took:
            release_run_dir(root)
        raise


def _start(root: Path, settings: Mapping[str, Any]) -> str:
    state_path = root / CHECKPOINTS / "state.json"
    fingerprint = run_fingerprint(settings)
    state = read_json(state_path)
    _STARTED.add(state_path.resolve())
    if state is not None:
        if state.get("fingerprint") != fingerprint:
            before = state.get("settings") or {}
            now = _encode(dict(settings))
            keys = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise RunDirError(f"the interrupted run in {root} used other settings "
                              f"({brief(keys)} differ); resume with the same options, or "
                              f"{action('start_afresh')}")
        return fingerprint
    try:
        state_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(state_path, json.dumps({"format": CHECKPOINT_FORMAT,
                                             "fingerprint": fingerprint,
                                             "settings": _encode(dict(settings))}, indent=2))
    except OSError as err:
        raise RunDirError(f"cannot start the run's checkpoints in {root} "
                          f"({os_error_reason(err)}); free space there or choose another "
                          "directory") from None
    return fingerprint


def _checkpoint_file(root: Path, layer: str) -> Path:
    safe = safe_name(layer, each=True)[:80]
    tag = hashlib.sha256(layer.encode()).hexdigest()[:8]
    return root / CHECKPOINTS / f"layer-{safe}-{tag}.npz"


def save_layer_checkpoint(path: str | Path, layer: str, table: pd.DataFrame, *,
                          stability: Mapping[str, Any] | None = None,
                          arrays: Mapping[str, np.ndarray] | None = None,
                          extra: Mapping[str, Any] | None = None) -> Path:
    """Save a finished layer's rows (and what resuming needs) as one file, atomically.

    Call :func:`start_checkpoints` first. The table keeps its columns and dtypes exactly.

    Parameters
    ----------
    path : str or Path
        The run directory.
    layer : str
        The layer's module name.
    table : pandas.DataFrame
        Its channel rows with every column, as they will enter ``channels.csv``.
    stability : dict, optional
        Its stability summary (``_Extras.stability[layer]`` in rank.py).
    arrays : dict of numpy.ndarray, optional
        More numeric arrays to keep (e.g. the layer's PC scores).
    extra : dict, optional
        More JSON-serialisable values.

    Returns
    -------
    Path
        The checkpoint file.

    Examples
    --------
    >>> import tempfile, pandas as pd
    >>> root = tempfile.mkdtemp(); _ = start_checkpoints(root, {"seed": 0})
    >>> t = pd.DataFrame({"layer": ["conv1"] * 2, "channel": [0, 1], "pcace": [0.4, 0.9]})
    >>> _ = save_layer_checkpoint(root, "conv1", t, stability={"top": [1]})
    >>> load_layer_checkpoints(root, {"seed": 0})["conv1"].table.equals(t)
    True
    """
    root = Path(path)
    state_path = root / CHECKPOINTS / "state.json"
    state = read_json(state_path)
    if not state or state.get("format") != CHECKPOINT_FORMAT:
        raise RunDirError(_no_state_message(root, state_path))
    payload: dict[str, np.ndarray] = {}
    columns = []
    for i, name in enumerate(table.columns):
        kind, values = _encode_column(table[name])
        payload[f"col{i}"] = values
        columns.append({"name": str(name), "kind": kind, "dtype": str(table[name].dtype)})
    for key, value in (arrays or {}).items():
        payload[f"array_{key}"] = np.asarray(value)
    meta = {"format": CHECKPOINT_FORMAT, "fingerprint": state["fingerprint"], "layer": layer,
            "columns": columns, "stability": _encode(stability),
            "extra": _encode(dict(extra or {})), "arrays": sorted(arrays or {})}
    payload["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    target = _checkpoint_file(root, layer)
    buffer = io.BytesIO()
    np.savez(buffer, **payload)
    try:
        atomic_write(target, buffer.getvalue())
    except OSError as err:  # a full disk: the layers checkpointed before stay
        raise RunDirError(f"could not checkpoint layer {layer!r} in {root} "
                          f"({os_error_reason(err)}); the layers finished before are kept: "
                          f"free space there and {action('resume')}") from None
    return target


def _no_state_message(root: Path, state_path: Path) -> str:
    if state_path.resolve() in _STARTED:  # this process started it: something removed it
        return (f"the checkpoints of this run in {root} were removed while it ran "
                f"({state_path.name} is gone: another program emptied or replaced the "
                "directory); the run cannot keep its layers there: start it again in a "
                "directory nothing else writes to")
    return (f"no checkpoints started in {root}: call start_checkpoints(path, settings) "
            "before save_layer_checkpoint")


def load_layer_checkpoints(path: str | Path, settings: Mapping[str, Any]
                           ) -> dict[str, LayerCheckpoint]:
    """The finished layers of an interrupted run, for a resume with the same ``settings``.

    Returns an empty dict when there are none. A checkpoint file that cannot be read
    is skipped with a warning (its layer is scored again).

    Raises
    ------
    RunDirError
        The checkpoints were made with other settings.

    Examples
    --------
    >>> done = load_layer_checkpoints("runs/cat", settings)  # doctest: +SKIP
    >>> todo = [n for n in layers if n not in done]  # doctest: +SKIP
    """
    root = Path(path)
    if not (root / CHECKPOINTS / "state.json").is_file():
        return {}
    fingerprint = start_checkpoints(root, settings)  # refuses other settings
    found: dict[str, LayerCheckpoint] = {}
    for file in sorted((root / CHECKPOINTS).glob("layer-*.npz")):
        try:
            ckpt = _read_checkpoint(file, fingerprint)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            warnings.warn(f"skipping unreadable checkpoint {file.name} ({err}); its layer is "
                          "scored again", stacklevel=2)
            continue
        if ckpt is not None:
            found[ckpt.layer] = ckpt
    return found


def _read_checkpoint(file: Path, fingerprint: str) -> LayerCheckpoint | None:
    with np.load(file, allow_pickle=False) as data:
        meta = json.loads(bytes(data["__meta__"]).decode())
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("fingerprint") != fingerprint:
            return None
        table = pd.DataFrame({c["name"]: _decode_column(c, data[f"col{i}"])
                              for i, c in enumerate(meta["columns"])})
        arrays = {key: np.array(data[f"array_{key}"]) for key in meta.get("arrays", [])}
    return LayerCheckpoint(meta["layer"], table, _decode(meta.get("stability")), arrays,
                           _decode(meta.get("extra")) or {})


def remove_checkpoints(path: str | Path) -> list[str]:
    """Remove a run's checkpoint files (pcace's own only) once its results are saved.

    Returns the names removed, relative to the run directory.

    Examples
    --------
    >>> import tempfile
    >>> remove_checkpoints(tempfile.mkdtemp())
    []
    """
    root = Path(path)
    ckdir = root / CHECKPOINTS
    if not ckdir.is_dir() or ckdir.is_symlink():
        return []
    removed = []
    for sub in sorted(ckdir.glob("label-*")):  # a per-label run's labels, one run each
        if sub.is_dir() and not sub.is_symlink():
            removed += [f"{CHECKPOINTS}/{sub.name}/{name}" for name in remove_checkpoints(sub)]
            with contextlib.suppress(OSError):
                sub.rmdir()
    for file in sorted(ckdir.iterdir()):
        ours = file.name == "state.json" or re.fullmatch(r"layer-.*\.npz", file.name) or \
            file.name.startswith(".layer-")
        if ours and file.is_file():
            file.unlink()
            removed.append(f"{CHECKPOINTS}/{file.name}")
    with contextlib.suppress(OSError):
        ckdir.rmdir()
    _STARTED.discard((ckdir / "state.json").resolve())
    release_run_dir(root)  # the run is over: a hold taken by start_checkpoints goes
    return removed


def _encode_column(series: pd.Series) -> tuple[str, np.ndarray]:
    if getattr(series.dtype, "kind", "O") in "biufcmM" and series.dtype != object:
        return "native", series.to_numpy()
    values = series.tolist()
    if values and all(isinstance(v, str) for v in values):
        return "str", np.array(values, dtype=str)
    text = json.dumps(_encode(values))
    return "json", np.frombuffer(text.encode(), dtype=np.uint8)


def _decode_column(column: Mapping[str, Any], values: np.ndarray) -> pd.Series:
    if column["kind"] == "str":
        return pd.Series(values.tolist(), dtype=column["dtype"])
    if column["kind"] == "json":
        series = pd.Series(_decode(json.loads(bytes(values).decode())), dtype=object)
        return series if column["dtype"] == "object" else series.astype(column["dtype"])
    return pd.Series(values, dtype=column["dtype"])


def _encode(obj: Any) -> Any:
    """JSON-safe form that keeps non-string dict keys and numpy values (see :func:`_decode`)."""
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v) for k, v in obj.items()}
        return {"__items__": [[_encode(k), _encode(v)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [_encode(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return {"__array__": _encode(obj.tolist()), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__items__"}:
            return {_hashable(_decode(k)): _decode(v) for k, v in obj["__items__"]}
        if set(obj) == {"__array__", "dtype"}:
            return np.array(obj["__array__"], dtype=obj["dtype"])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key
