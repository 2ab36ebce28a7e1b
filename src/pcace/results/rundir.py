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
  later (figures, report, ablations), which :func:`pcace.core.files.atomic_write` and
  :func:`pcace.core.files.atomic_path` write atomically.
- :func:`read_run` refuses a directory whose files do not match ``run.json``, with
  one line naming the file; an interrupted run (``complete: false``) loads but says so.
- :mod:`pcace.results.checkpoints` keeps one file per finished layer as a run goes, so an
  interrupted (or killed) run can resume and skip the finished layers.
- :mod:`pcace.results.lock` keeps a second run out of a directory in use: each of these
  functions takes the directory's lock (a no-op when this process holds it already) and
  is refused while another run holds it. A writer killed mid-write leaves a temporary
  file only; :func:`prepare_run_dir` removes those, and a save killed before
  ``run.json`` is taken up by the next ``resume`` (or replaced by ``force``).

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
import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..core import files as fileio
from ..core.errors import first_line
from ..core.files import FileData, atomic_write, file_sha256, os_error_reason
from ..core.voice import action, option
from .checkpoints import remove_checkpoints
from .common import (
    CHECKPOINT_FORMAT,
    CHECKPOINTS,
    MANIFEST,
    RunDirError,
    brief,
    read_json,
    usable_dir,
)
from .lock import LOCK_NAME, lock_run_dir, release_run_dir

__all__ = [
    "CHECKPOINTS",
    "MANIFEST",
    "RunDirError",
    "RunManifest",
    "add_files",
    "prepare_run_dir",
    "read_run",
    "save_run",
]

FORMAT = "pcace-run-1"
# names a run writes now or later: never overwritten unless a pcace run listed them
RESERVED = ("channels.csv", "layers.csv", "scores.csv", MANIFEST, "report.html", "assets",
            "figures", CHECKPOINTS)
_RESERVED_PATTERN = re.compile(r"^(ablation|faithfulness)_.*\.csv$")
# what pcace.core.files.temp_name leaves behind when its writer is killed mid-write
_TEMP_PATTERN = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$")


# --- small helpers ----------------------------------------------------------------------------

def _entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def _matches(path: Path, entry: Mapping[str, Any]) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    return path.stat().st_size == entry.get("size") and file_sha256(path) == entry.get("sha256")


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


def _is_pcace_manifest(obj: Mapping[str, Any] | None) -> bool:
    return bool(obj) and (obj.get("format") == FORMAT or "pcace_version" in obj)


def _listed(obj: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    files = (obj or {}).get("files")
    return dict(files) if isinstance(files, Mapping) else {}


def _is_reserved(name: str) -> bool:
    return name in RESERVED or bool(_RESERVED_PATTERN.match(name))


# --- (a) preflight ----------------------------------------------------------------------------

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
    pcace.results.lock.RunDirBusy
        Another run holds the directory (its lock names it); nothing was touched.

    Examples
    --------
    >>> import tempfile
    >>> prepare_run_dir(tempfile.mkdtemp() + "/new").is_dir()
    True
    """
    if force and resume:
        raise RunDirError(f"give either {option('force')} (replace the earlier run) or "
                          f"{option('resume')} (continue it), not both")
    with lock_run_dir(path) as lock:  # held all along by `pcace rank`: then a no-op
        root = usable_dir(path)
        _remove_temp_leftovers(lock.root)
        return _prepare(root, force, resume)


def _prepare(root: Path, force: bool, resume: bool) -> Path:
    entries = sorted(p.name for p in root.iterdir() if not _is_ours_transient(p.name))
    if not entries:
        return root
    manifest = read_json(root / MANIFEST)
    state = read_json(root / CHECKPOINTS / "state.json")
    has_run = _is_pcace_manifest(manifest) or _is_checkpoint_state(state)
    if resume:
        if not has_run:
            raise RunDirError(f"nothing to resume in {root}: it holds no pcace run; drop "
                              f"{option('resume')} or choose the directory of the "
                              "interrupted run")
        return root
    if force:
        if not has_run:
            raise RunDirError(f"{root} holds files but no pcace run ({brief(entries)}); "
                              f"{option('force')} only replaces a pcace run: "
                              f"{action('other_out')}")
        killed_save = _killed_save(manifest, state)
        _remove_previous_run(root, manifest)
        leftover = [p for p in root.iterdir() if _is_reserved(p.name)]
        if killed_save:  # a save killed before run.json: its files are the run's own
            for p in leftover:
                if p.is_file() and not p.is_symlink():
                    p.unlink()
            leftover = [p for p in leftover if p.exists()]
        if leftover:
            raise RunDirError(f"{root} still holds {brief([p.name for p in leftover])}, which "
                              "the earlier run's run.json does not list; move them away or "
                              f"{action('other_out')}")
        return root
    hint = (f"pass {option('force')} to replace the pcace run there, {option('resume')} to "
            f"continue it, or {action('other_out')}") if has_run else \
        "choose an empty or new directory"
    raise RunDirError(f"output directory {root} is not empty ({brief(entries)}); {hint}")


def _is_ours_transient(name: str) -> bool:
    """The lock file and write probes: not part of any run."""
    return name == LOCK_NAME or name.startswith(".pcace-probe-")


def _is_checkpoint_state(state: Mapping[str, Any] | None) -> bool:
    return bool(state) and state.get("format") == CHECKPOINT_FORMAT


def _killed_save(manifest: Mapping[str, Any] | None, state: Mapping[str, Any] | None) -> bool:
    """Checkpoints but no run.json: a run (or its save) was killed before run.json."""
    return manifest is None and _is_checkpoint_state(state)


def _remove_temp_leftovers(root: Path) -> list[str]:
    """Remove the temporary files of writers killed mid-write (the caller holds the lock).

    Only pcace's own temporary names (:func:`pcace.core.files.temp_name`), in the run
    directory and its checkpoint folders: no other pcace run writes here meanwhile.
    """
    removed = []
    folders = [root, root / CHECKPOINTS, *sorted((root / CHECKPOINTS).glob("label-*"))]
    for folder in folders:
        if not folder.is_dir() or folder.is_symlink():
            continue
        for p in folder.iterdir():
            if _TEMP_PATTERN.match(p.name) and p.is_file() and not p.is_symlink():
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(str(p.relative_to(root)))
    return removed


def _remove_previous_run(root: Path, manifest: Mapping[str, Any] | None) -> list[str]:
    """Remove the files an earlier run listed (unchanged ones only) and its checkpoints."""
    listed = _listed(manifest)
    if manifest is not None and _is_pcace_manifest(manifest) and not listed:
        raise RunDirError(f"the run in {root} was written by an older pcace whose run.json "
                          f"lists no files; remove its files yourself or {action('other_out')}")
    paths = {name: _safe_name(root, name) for name in listed}
    changed = [n for n, p in paths.items() if p.exists() and not _matches(p, listed[n])]
    if changed:
        raise RunDirError(f"{brief(changed)} in {root} changed since pcace wrote it; "
                          f"{option('force')} removes only unchanged run files: move it away "
                          "first")
    removed = []
    for name, p in paths.items():
        if p.exists():
            p.unlink()
            removed.append(name)
    if (root / MANIFEST).exists() and manifest is not None:
        (root / MANIFEST).unlink()
        removed.append(MANIFEST)
    removed += remove_checkpoints(root)
    _remove_emptied_folders(root, list(paths.values()))
    return removed


def _remove_emptied_folders(root: Path, removed: list[Path]) -> None:
    """The folders (below ``root``) of removed files that are now empty, deepest first: a
    report's ``figures/<target>/`` and then ``figures/``."""
    folders = {parent for p in removed for parent in p.parents
               if parent != root and root in parent.parents}
    for sub in sorted(folders, key=lambda q: -len(q.parts)):
        with contextlib.suppress(OSError):
            sub.rmdir()  # only when emptied


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
        wrote, or writing failed (e.g. disk full: nothing was replaced). Another run
        holding the directory raises :class:`pcace.results.lock.RunDirBusy`.

    Examples
    --------
    >>> import tempfile
    >>> m = save_run(tempfile.mkdtemp(), {"layers.csv": "layer\\n"}, {}, complete=False)
    >>> m["complete"], m["files"]["layers.csv"]["size"]
    (False, 6)
    """
    with lock_run_dir(path):  # refused while another run writes there
        written = _save(usable_dir(path), files, manifest, complete)
    release_run_dir(path)  # the run this process checkpointed there has saved
    return written


def _save(root: Path, files: Mapping[str, FileData], manifest: Mapping[str, Any],
          complete: bool) -> dict[str, Any]:
    old = read_json(root / MANIFEST)
    if (root / MANIFEST).exists() and not _is_pcace_manifest(old):
        raise RunDirError(f"{root / MANIFEST} is not a pcace run.json; move it away or choose "
                          "another directory")
    old_listed = _listed(old) if old else {}
    killed_save = _killed_save(old, read_json(root / CHECKPOINTS / "state.json"))
    targets = {name: _safe_name(root, name) for name in files}
    foreign = [n for n, p in targets.items() if p.exists() and n not in old_listed
               and not (killed_save and _is_reserved(n))]
    if foreign:
        raise RunDirError(f"saving would overwrite {brief(foreign)} in {root}, which no pcace "
                          "run wrote; move it away or choose another directory")
    written = dict(manifest)
    written.pop("files", None)
    written["format"] = FORMAT
    written["run_id"] = str(manifest.get("run_id") or uuid.uuid4().hex)
    written["complete"] = bool(complete)
    entries = _write_all(root, files, targets)
    same_run = bool(old) and old.get("run_id") == written["run_id"]
    gone = []
    for name, entry in old_listed.items():
        if name in entries or name == MANIFEST:
            continue
        p = _safe_name(root, name)
        if same_run and p.exists():
            entries[name] = entry
        elif p.exists() and _matches(p, entry):
            p.unlink()
            gone.append(p)
    _remove_emptied_folders(root, gone)
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
            temps[name] = fileio.temp_name(target)
            fileio.write_data(temps[name], data)
        entries = {name: _entry(tmp) for name, tmp in temps.items()}
        for name, tmp in temps.items():
            os.replace(tmp, targets[name])
    except OSError as err:
        hint = "free disk space and save again" if err.errno in (errno.ENOSPC, errno.EDQUOT) \
            else "check the directory's permissions"
        raise RunDirError(f"could not save the run to {root} ({os_error_reason(err)}); nothing was "
                          f"replaced; {hint}") from None
    finally:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    fileio.fsync_dir(root)
    return entries


def _write_manifest(root: Path, manifest: Mapping[str, Any]) -> None:
    text = json.dumps(manifest, indent=2, default=_json_default)
    try:
        atomic_write(root / MANIFEST, text)
    except OSError as err:
        raise RunDirError(f"could not write {root / MANIFEST} ({os_error_reason(err)}); the run's "
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
    if not (root / MANIFEST).is_file():
        raise RunDirError(f"{root} holds no run.json; save the run first")
    with lock_run_dir(root):  # refused while another run writes there
        return _add_files(root, names)


def _add_files(root: Path, names: Iterable[str | Path]) -> dict[str, Any]:
    manifest = read_json(root / MANIFEST)
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
            text = f"interrupted run{far}; to resume it, {action('resume')}"
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
        hint = (f" (it holds checkpoints of an unfinished run: to resume it, {action('resume')})"
                if (root / CHECKPOINTS / "state.json").is_file() else "")
        raise RunDirError(f"{root} holds no run.json: not a pcace run directory (or an "
                          f"unfinished one){hint}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        first = first_line(err)
        raise RunDirError(f"{mpath} cannot be read as JSON ({first}); the save may have been "
                          f"interrupted: {action('save_again')}") from None
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
                          f"{brief(missing)}")
    if verified and (unlisted := [n for n in required if n not in listed]):
        raise RunDirError(f"{brief(unlisted)} in {root} is not listed in run.json; it is not "
                          f"part of the recorded run: {action('save_again')}")
    complete = bool(manifest.get("complete", not manifest.get("interrupted", False)))
    return RunManifest(root, manifest, complete=complete, verified=verified,
                       files=dict(listed) if verified else {})


def _check_file(root: Path, name: str, entry: Any, verify: bool) -> None:
    p = _safe_name(root, name)
    fix = f"the save did not finish or the file was changed; {action('save_again')}"
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
    if file_sha256(p) != entry.get("sha256"):
        raise RunDirError(f"{name} in {root} does not match run.json (SHA-256 differs); {fix}")

