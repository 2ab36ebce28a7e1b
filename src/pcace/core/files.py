"""Files written atomically: a temporary name beside the target, fsync, then rename.

Every file pcace writes into a run directory goes through :func:`atomic_write` or
:func:`atomic_path`, so a crash or a full disk mid-write leaves the old file or none,
never a half one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

__all__ = ["FileData", "atomic_path", "atomic_write", "file_sha256", "fsync_dir", "os_error_reason",
           "safe_name", "temp_name", "write_data"]

#: Bytes read at a time when a file is hashed.
CHUNK_BYTES = 1 << 20

#: What :func:`atomic_write` writes: bytes, text, or a DataFrame as CSV.
FileData = bytes | str | pd.DataFrame

#: Characters a file name of pcace's keeps as they are; any other is replaced.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9_.-]+")


def os_error_reason(err: OSError) -> str:
    """The short reason of an OS error (``No space left on device``), for a message."""
    return err.strerror or type(err).__name__


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex, read in chunks of 1 MiB."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def temp_name(target: Path) -> Path:
    """A hidden name beside ``target`` that no other process or call will pick."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename into it) to disk, where the system allows."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_data(path: Path, data: FileData) -> None:
    """Write bytes, text or a DataFrame (as CSV) to ``path`` and flush it to disk."""
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
    tmp = temp_name(target)
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
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
        write_data(tmp, data)
    return Path(path)


def safe_name(name: str, *, each: bool = False) -> str:
    """A file-name friendly form of a layer or label name (``layer3.1.conv2`` stays as is).

    Parameters
    ----------
    name : str
        A layer or label name.
    each : bool, default False
        Replace each unsafe character by ``_`` and keep the rest as is (the form of the
        checkpoint and spill file names, kept so that existing checkpoints still resume);
        by default a run of unsafe characters becomes one ``_``, ``_`` at either end is
        dropped, and an empty result reads ``layer``.

    Returns
    -------
    str

    Examples
    --------
    >>> safe_name("features/0 conv")
    'features_0_conv'
    >>> safe_name("/a  b", each=True)
    '_a__b'
    """
    if each:
        return _UNSAFE.sub("_", name)
    return _UNSAFE_RUN.sub("_", name).strip("_") or "layer"
