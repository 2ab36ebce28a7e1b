"""Run directories as data: checked before a run, saved atomically, verified on load.

A pcace run directory holds ``channels.csv``, ``layers.csv``, ``scores.csv`` and
``run.json`` (later also ``assets/``, ``figures/``, ``report.html`` and ablation
tables). This module makes it trustworthy:

- :func:`prepare_run_dir` checks an output directory before any computation: it
  can be created and written, is not a file, and is empty -- unless ``force``
  (which removes exactly the files an earlier pcace run listed in its ``run.json``,
  and only while they still hold what pcace wrote) or ``resume``.
- :func:`save_run` writes every file under a temporary name and renames it into
  place, then writes ``run.json`` last, listing each file with its size and SHA-256
  and whether the run is ``complete``. :func:`add_files` records files written
  later (figures, report, ablations); :func:`atomic_write` and :func:`atomic_path`
  write them atomically.
- :func:`read_run` refuses a directory whose files do not match ``run.json``, with
  one line naming the file; an interrupted run (``complete: false``) loads but says so.
- :func:`start_checkpoints`, :func:`save_layer_checkpoint`, :func:`load_layer_checkpoints`
  and :func:`remove_checkpoints` keep one file per finished layer as a run goes, so an
  interrupted run can resume and skip the finished layers.
- :func:`make_spill_dir` names spill directories after the owning process
  (``pcace-spill-<pid>-<random>``) and :func:`clean_stale_spills` removes those of
  processes that no longer exist.

Examples
--------
>>> import tempfile, pandas as pd
>>> from pcace.results.rundir import prepare_run_dir, read_run, save_run
>>> out = prepare_run_dir(tempfile.mkdtemp() + "/run")
>>> table = pd.DataFrame({"layer": ["conv1"], "channel": [0], "pcace": [0.5]})
>>> written = save_run(out, {"channels.csv": table, "layers.csv": "layer\\nconv1\\n"},
...                    {"pcace_version": "0"})
>>> run = read_run(out)
>>> run.complete, sorted(run.manifest["files"])
(True, ['channels.csv', 'layers.csv'])
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "CHECKPOINTS",
    "MANIFEST",
    "LayerCheckpoint",
    "RunDirError",
    "RunManifest",
    "add_files",
    "atomic_path",
    "atomic_write",
    "clean_stale_spills",
    "load_layer_checkpoints",
    "make_spill_dir",
    "prepare_run_dir",
    "read_run",
    "remove_checkpoints",
    "run_fingerprint",
    "save_layer_checkpoint",
    "save_run",
    "spill_owner",
    "start_checkpoints",
]

MANIFEST = "run.json"
CHECKPOINTS = "checkpoints"
FORMAT = "pcace-run-1"
CHECKPOINT_FORMAT = "pcace-checkpoint-1"
SPILL_PREFIX = "pcace-spill-"
# names a run writes now or later: never overwritten unless a pcace run listed them
RESERVED = ("channels.csv", "layers.csv", "scores.csv", MANIFEST, "report.html", "assets",
            "figures", CHECKPOINTS)
_RESERVED_PATTERN = re.compile(r"^(ablation|faithfulness)_.*\.csv$")
_CHUNK = 1 << 20

FileData = bytes | str | pd.DataFrame


class RunDirError(ValueError):
    """A run directory cannot be used or trusted; the message names the problem and the fix."""


# --- small helpers ----------------------------------------------------------------------------

def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _matches(path: Path, entry: Mapping[str, Any]) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    return path.stat().st_size == entry.get("size") and _sha256(path) == entry.get("sha256")


def _safe_name(root: Path, name: str) -> Path:
    """``root / name`` for a relative POSIX name that stays inside ``root``."""
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name:
        raise RunDirError(f"run file name {name!r} is not a plain relative path inside the "
                          "run directory; run.json may have been edited")
    path = root.joinpath(*pure.parts)
    if root.resolve() not in path.resolve().parents:
        raise RunDirError(f"run file {name!r} resolves outside {root} (through a link); "
                          "remove the link")
    return path


def _temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_data(path: Path, data: FileData) -> None:
    if isinstance(data, pd.DataFrame):
        data.to_csv(path, index=False)
    elif isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    elif isinstance(data, bytes | bytearray | memoryview):
        path.write_bytes(bytes(data))
    else:
        raise TypeError(f"cannot write {type(data).__name__} to {path.name}; give bytes, str "
                        "or a pandas DataFrame")
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that becomes ``path`` only if the block succeeds.

    For writers that take a file name (``DataFrame.to_csv``, ``Figure.savefig``,
    ``numpy.savez``): nothing is left half-written at ``path`` when they fail.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text()
    'done'
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target)
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write(path: str | Path, data: FileData) -> Path:
    """Write ``data`` (bytes, text or a DataFrame as CSV) to ``path`` atomically.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = atomic_write(pathlib.Path(tempfile.mkdtemp()) / "a.txt", "hello")
    >>> p.read_text()
    'hello'
    """
    with atomic_path(path) as tmp:
        _write_data(tmp, data)
    return Path(path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _is_pcace_manifest(obj: Mapping[str, Any] | None) -> bool:
    return bool(obj) and (obj.get("format") == FORMAT or "pcace_version" in obj)


def _listed(obj: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    files = (obj or {}).get("files")
    return dict(files) if isinstance(files, Mapping) else {}


def _is_reserved(name: str) -> bool:
    return name in RESERVED or bool(_RESERVED_PATTERN.match(name))


# --- (a) preflight ----------------------------------------------------------------------------

def _usable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and check that files can be written in it."""
    root = Path(path).expanduser()
    if root.exists() and not root.is_dir():
        raise RunDirError(f"output {root} is a file, not a directory; name a directory "
                          "(it is created if needed)")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"cannot create the output directory {root} ({_reason(err)}); "
                          "choose a writable location") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".pcace-probe-", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RunDirError(f"cannot write in the output directory {root} ({_reason(err)}); "
                          "choose a writable location") from None
    return root


def prepare_run_dir(path: str | Path, *, force: bool = False, resume: bool = False) -> Path:
    """Check an output directory before any computation; create it if needed.

    Parameters
    ----------
    path : str or Path
        The run directory (``--out``).
    force : bool
        Replace an earlier pcace run there: remove exactly the files its ``run.json``
        lists (and its checkpoints), only while they still hold what pcace wrote; other
        files stay. Refused when the directory holds no pcace run, or when a listed file
        was changed since.
    resume : bool
        Continue an interrupted run there (see :func:`load_layer_checkpoints`).

    Returns
    -------
    Path
        The directory, existing and writable.

    Raises
    ------
    RunDirError
        The path is a file, cannot be created or written, or is not empty (without
        ``force``/``resume``); one line naming the fix.

    Examples
    --------
    >>> import tempfile
    >>> prepare_run_dir(tempfile.mkdtemp() + "/new").is_dir()
    True
    """
    if force and resume:
        raise RunDirError("give either force (replace the earlier run) or resume (continue "
                          "it), not both")
    root = _usable_dir(path)
    entries = sorted(p.name for p in root.iterdir() if not p.name.startswith(".pcace-probe-"))
    if not entries:
        return root
    manifest = _read_json(root / MANIFEST)
    state = _read_json(root / CHECKPOINTS / "state.json")
    has_run = _is_pcace_manifest(manifest) or bool(state and state.get("format")
                                                    == CHECKPOINT_FORMAT)
    if resume:
        if not has_run:
            raise RunDirError(f"nothing to resume in {root}: it holds no pcace run; drop "
                              "--resume or choose the directory of the interrupted run")
        return root
    if force:
        if not has_run:
            raise RunDirError(f"{root} holds files but no pcace run ({_brief(entries)}); "
                              "--force only replaces a pcace run: choose another --out")
        removed_ok = _remove_previous_run(root, manifest)
        leftover = [p.name for p in root.iterdir() if _is_reserved(p.name)]
        if leftover:
            raise RunDirError(f"{root} still holds {_brief(leftover)}, which the earlier run's "
                              "run.json does not list; move them away or choose another --out")
        del removed_ok
        return root
    hint = ("pass --force to replace the pcace run there, --resume to continue it, or "
            "choose another --out") if has_run else "choose an empty or new directory"
    raise RunDirError(f"output directory {root} is not empty ({_brief(entries)}); {hint}")


def _brief(names: Sequence[str], n: int = 4) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _remove_previous_run(root: Path, manifest: Mapping[str, Any] | None) -> list[str]:
    """Remove the files an earlier run listed (unchanged ones only) and its checkpoints."""
    listed = _listed(manifest)
    if manifest is not None and _is_pcace_manifest(manifest) and not listed:
        raise RunDirError(f"the run in {root} was written by an older pcace whose run.json "
                          "lists no files; remove its files yourself or choose another --out")
    paths = {name: _safe_name(root, name) for name in listed}
    changed = [n for n, p in paths.items() if p.exists() and not _matches(p, listed[n])]
    if changed:
        raise RunDirError(f"{_brief(changed)} in {root} changed since pcace wrote it; "
                          "--force removes only unchanged run files: move it away first")
    removed = []
    for name, p in paths.items():
        if p.exists():
            p.unlink()
            removed.append(name)
    if (root / MANIFEST).exists() and manifest is not None:
        (root / MANIFEST).unlink()
        removed.append(MANIFEST)
    removed += remove_checkpoints(root)
    for sub in sorted({p.parent for p in paths.values()}, key=lambda q: -len(q.parts)):
        if sub != root:
            with contextlib.suppress(OSError):
                sub.rmdir()  # only when emptied
    return removed


# --- (b) atomic, verifiable saves -------------------------------------------------------------

def save_run(path: str | Path, files: Mapping[str, FileData], manifest: Mapping[str, Any],
             *, complete: bool = True) -> dict[str, Any]:
    """Write a run's files atomically, then ``run.json`` listing them (size, SHA-256).

    Every file goes to a temporary name first and is renamed into place only when all
    were written, so a full disk leaves the earlier state untouched. A file at one of
    the names that no pcace run listed is never overwritten. Files the directory's
    previous run listed and this save does not rewrite are kept when the run is the same
    (same ``run_id``) and removed otherwise, so nothing of an older run stays mixed in.

    Parameters
    ----------
    path : str or Path
        The run directory.
    files : mapping
        Relative name (``"channels.csv"``, ``"assets/x.npz"``) -> bytes, text, or a
        DataFrame (written as CSV without its index).
    manifest : mapping
        The run's description; ``run.json`` is it plus ``format``, ``run_id`` (a new one
        unless given), ``complete`` and ``files``.
    complete : bool
        False for an interrupted run: :func:`read_run` loads it but labels it.

    Returns
    -------
    dict
        The manifest as written to ``run.json``.

    Raises
    ------
    RunDirError
        The directory cannot be written, a name would overwrite a file no pcace run
        wrote, or writing failed (e.g. disk full: nothing was replaced).

    Examples
    --------
    >>> import tempfile
    >>> m = save_run(tempfile.mkdtemp(), {"layers.csv": "layer\\n"}, {}, complete=False)
    >>> m["complete"], m["files"]["layers.csv"]["size"]
    (False, 6)
    """
    root = _usable_dir(path)
    old = _read_json(root / MANIFEST)
    if (root / MANIFEST).exists() and not _is_pcace_manifest(old):
        raise RunDirError(f"{root / MANIFEST} is not a pcace run.json; move it away or choose "
                          "another directory")
    old_listed = _listed(old) if old else {}
    targets = {name: _safe_name(root, name) for name in files}
    foreign = [n for n, p in targets.items() if p.exists() and n not in old_listed]
    if foreign:
        raise RunDirError(f"saving would overwrite {_brief(foreign)} in {root}, which no pcace "
                          "run wrote; move it away or choose another directory")
    written = dict(manifest)
    written.pop("files", None)
    written["format"] = FORMAT
    written["run_id"] = str(manifest.get("run_id") or uuid.uuid4().hex)
    written["complete"] = bool(complete)
    entries = _write_all(root, files, targets)
    same_run = bool(old) and old.get("run_id") == written["run_id"]
    for name, entry in old_listed.items():
        if name in entries or name == MANIFEST:
            continue
        p = _safe_name(root, name)
        if same_run and p.exists():
            entries[name] = entry
        elif p.exists() and _matches(p, entry):
            p.unlink()
    written["files"] = dict(sorted(entries.items()))
    _write_manifest(root, written)
    return written


def _write_all(root: Path, files: Mapping[str, FileData],
               targets: Mapping[str, Path]) -> dict[str, dict[str, Any]]:
    temps: dict[str, Path] = {}
    try:
        for name, data in files.items():
            target = targets[name]
            target.parent.mkdir(parents=True, exist_ok=True)
            temps[name] = _temp_name(target)
            _write_data(temps[name], data)
        entries = {name: _entry(tmp) for name, tmp in temps.items()}
        for name, tmp in temps.items():
            os.replace(tmp, targets[name])
    except OSError as err:
        hint = "free disk space and save again" if err.errno in (errno.ENOSPC, errno.EDQUOT) \
            else "check the directory's permissions"
        raise RunDirError(f"could not save the run to {root} ({_reason(err)}); nothing was "
                          f"replaced; {hint}") from None
    finally:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    _fsync_dir(root)
    return entries


def _write_manifest(root: Path, manifest: Mapping[str, Any]) -> None:
    text = json.dumps(manifest, indent=2, default=_json_default)
    try:
        atomic_write(root / MANIFEST, text)
    except OSError as err:
        raise RunDirError(f"could not write {root / MANIFEST} ({_reason(err)}); the run's "
                          "files are there but unlisted: free space and save again") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def add_files(path: str | Path, names: Iterable[str | Path]) -> dict[str, Any]:
    """Record files written into a run directory after :func:`save_run` in its ``run.json``.

    For ``assets/``, ``figures/``, ``report.html``, ablation tables: a directory name
    records every file under it. Write the files themselves with :func:`atomic_write`
    or :func:`atomic_path`.

    Parameters
    ----------
    path : str or Path
        The run directory.
    names : iterable of str or Path
        Files or directories, relative to the run directory (or absolute inside it).

    Returns
    -------
    dict
        The updated manifest.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> _ = save_run(root, {"layers.csv": "layer\\n"}, {})
    >>> _ = atomic_write(root / "report.html", "<html></html>")
    >>> sorted(add_files(root, ["report.html"])["files"])
    ['layers.csv', 'report.html']
    """
    root = Path(path)
    manifest = _read_json(root / MANIFEST)
    if not _is_pcace_manifest(manifest) or "files" not in manifest:
        raise RunDirError(f"{root} holds no run.json written by this pcace; save the run "
                          "first")
    files = _listed(manifest)
    for name in names:
        rel = _relative(root, name)
        p = _safe_name(root, rel)
        if p.is_dir():
            for sub in sorted(q for q in p.rglob("*") if q.is_file()):
                files[sub.relative_to(root).as_posix()] = _entry(sub)
        elif p.is_file():
            files[rel] = _entry(p)
        else:
            raise RunDirError(f"cannot record {rel} in {root / MANIFEST}: no such file")
    manifest["files"] = dict(sorted(files.items()))
    _write_manifest(root, manifest)
    return manifest


def _relative(root: Path, name: str | Path) -> str:
    p = Path(name)
    if p.is_absolute():
        try:
            return p.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            raise RunDirError(f"{p} is not inside the run directory {root}") from None
    return p.as_posix()


# --- (c) verification on load -----------------------------------------------------------------

@dataclass
class RunManifest:
    """A run directory's ``run.json``, checked against its files.

    Attributes
    ----------
    path : Path
        The run directory.
    manifest : dict
        The parsed ``run.json``.
    complete : bool
        False for an interrupted run (``complete: false``, or an older run.json's
        ``interrupted: true``).
    verified : bool
        True when every listed file matched its size and SHA-256; False for a run.json
        of an older pcace that lists no files.
    """

    path: Path
    manifest: dict[str, Any]
    complete: bool = True
    verified: bool = True
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """One line for humans: complete, interrupted (how far), or unverified."""
        if not self.complete:
            layers = self.manifest.get("layers") or []
            done = self.manifest.get("layers_done")
            far = f": {len(done)} of {len(layers)} layers scored" if isinstance(
                done, list) and layers else ""
            text = f"interrupted run{far}; resume it with --resume"
        else:
            text = "complete run"
        if not self.verified:
            text += " (older run.json without a file list: contents not verified)"
        return text


def read_run(path: str | Path, *, verify: bool = True,
             required: Sequence[str] = ("channels.csv", "layers.csv")) -> RunManifest:
    """Read ``run.json`` and check every file it lists (size and SHA-256).

    Parameters
    ----------
    path : str or Path
        A run directory.
    verify : bool
        Check the listed files' sizes and SHA-256 (default). False only checks presence.
    required : sequence of str
        Files the caller needs; a missing one is an error.

    Returns
    -------
    RunManifest
        With ``complete`` False for an interrupted run (check it, or print ``label``).

    Raises
    ------
    RunDirError
        Not a run directory, an unreadable run.json, a missing file, or a file that does
        not match run.json (one line naming it).

    Examples
    --------
    >>> run = read_run("runs/cat")  # doctest: +SKIP
    >>> run.complete, run.label  # doctest: +SKIP
    (True, 'complete run')
    """
    root = Path(path)
    if not root.is_dir():
        raise RunDirError(f"run directory {root} does not exist or is not a directory")
    mpath = root / MANIFEST
    if not mpath.is_file():
        hint = (" (it holds checkpoints of an unfinished run: resume it with --resume)"
                if (root / CHECKPOINTS / "state.json").is_file() else "")
        raise RunDirError(f"{root} holds no run.json: not a pcace run directory (or an "
                          f"unfinished one){hint}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RunDirError(f"{mpath} cannot be read as JSON ({first}); the save may have been "
                          "interrupted: run again with --force") from None
    if not isinstance(manifest, dict):
        raise RunDirError(f"{mpath} is not a pcace run.json (not a JSON object)")
    listed = manifest.get("files")
    verified = isinstance(listed, Mapping)
    if verified:
        for name, entry in listed.items():
            _check_file(root, name, entry, verify)
    missing = [n for n in required if not (root / n).is_file()]
    if missing:
        raise RunDirError(f"{root} is not a complete pcace run directory: missing "
                          f"{_brief(missing)}")
    if verified and (unlisted := [n for n in required if n not in listed]):
        raise RunDirError(f"{_brief(unlisted)} in {root} is not listed in run.json; it is not "
                          "part of the recorded run: run again with --force")
    complete = bool(manifest.get("complete", not manifest.get("interrupted", False)))
    return RunManifest(root, manifest, complete=complete, verified=verified,
                       files=dict(listed) if verified else {})


def _check_file(root: Path, name: str, entry: Any, verify: bool) -> None:
    p = _safe_name(root, name)
    fix = "the save did not finish or the file was changed; run again with --force"
    if not p.is_file():
        raise RunDirError(f"{name} listed in {root / MANIFEST} is missing; {fix}")
    if not verify:
        return
    if not isinstance(entry, Mapping):
        raise RunDirError(f"{root / MANIFEST} has a malformed entry for {name}")
    size = p.stat().st_size
    if size != entry.get("size"):
        raise RunDirError(f"{name} in {root} does not match run.json ({size} bytes, run.json "
                          f"says {entry.get('size')}); {fix}")
    if _sha256(p) != entry.get("sha256"):
        raise RunDirError(f"{name} in {root} does not match run.json (SHA-256 differs); {fix}")


# --- (d) per-layer checkpoints ----------------------------------------------------------------

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

    Examples
    --------
    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> fp = start_checkpoints(root, {"seed": 0})
    >>> start_checkpoints(root, {"seed": 0}) == fp
    True
    """
    root = Path(path)
    state_path = root / CHECKPOINTS / "state.json"
    fingerprint = run_fingerprint(settings)
    state = _read_json(state_path)
    if state is not None:
        if state.get("fingerprint") != fingerprint:
            before = state.get("settings") or {}
            now = _encode(dict(settings))
            keys = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise RunDirError(f"the interrupted run in {root} used other settings "
                              f"({_brief(keys)} differ); resume with the same options, or "
                              "use --force to start afresh")
        return fingerprint
    state_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(state_path, json.dumps({"format": CHECKPOINT_FORMAT,
                                         "fingerprint": fingerprint,
                                         "settings": _encode(dict(settings))}, indent=2))
    return fingerprint


def _checkpoint_file(root: Path, layer: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", layer)[:80]
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
    state = _read_json(root / CHECKPOINTS / "state.json")
    if not state or state.get("format") != CHECKPOINT_FORMAT:
        raise RunDirError(f"no checkpoints started in {root}; call start_checkpoints first")
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
    atomic_write(target, buffer.getvalue())
    return target


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


# --- (e) spill directories --------------------------------------------------------------------

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
