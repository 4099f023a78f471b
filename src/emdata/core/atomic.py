"""Atomic small-file writes: a temporary sibling, then a rename, so readers never see half a file.

A temporary is named ``.<name>.<pid>.tmp`` beside its file. A run killed between the write and
the rename leaves it behind; the next run of the same dataset removes it under the dataset's
lock (:func:`stale_temporaries`). A failed write (full disk...) names the dataset and the file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from emdata.errors import OutputError


def temporary_path(path: Path) -> Path:
    """This process's temporary for ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def stale_temporaries(path: Path) -> list[Path]:
    """Temporaries of ``path`` left by other (killed) processes; this process's own is not one."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.tmp")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    found = []
    for name in names:
        match = pattern.fullmatch(name)
        if match and int(match.group(1)) != os.getpid():
            found.append(path.parent / name)
    return sorted(found)


def json_bytes(data: Any) -> bytes:
    """Sorted keys and a trailing newline: the same data always gives the same bytes."""
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8")


def write_new(path: Path, data: bytes, *, dataset: str | None = None, final: Path | None = None) -> None:
    """Write ``data`` to ``path`` (a temporary that is renamed later); a failure names ``final``.

    With ``dataset`` a failure is an OutputError naming the dataset; without, an OSError that
    carries the file's name (the CLI prints both on one line).
    """
    try:
        with open(path, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise write_error(exc, final or path, dataset) from exc


def write_error(exc: OSError, path: Path, dataset: str | None) -> Exception:
    """The error to raise when writing ``path`` failed with ``exc``."""
    if dataset is None:
        return OSError(exc.errno, exc.strerror or str(exc), str(path))
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return OutputError(dataset, str(path), f"cannot write it ({exc.strerror or exc})",
                       "free some disk space and run again" if full
                       else "check the folder and its permissions and run again")


def write_bytes_atomic(path: Path, data: bytes, *, dataset: str | None = None) -> None:
    tmp = temporary_path(path)
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, path, dataset) from exc
        write_new(tmp, data, dataset=dataset, final=path)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise write_error(exc, path, dataset) from exc
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any, *, dataset: str | None = None) -> None:
    write_bytes_atomic(path, json_bytes(data), dataset=dataset)


@contextmanager
def atomic_output(path: Path, *, dataset: str | None = None, fsync: bool = True) -> Iterator[Path]:
    """Yield this process's temporary for ``path``; on success flush it to disk and rename it over
    ``path``, on any error (or Ctrl-C) remove it. The one write-then-rename every writer uses for a
    file it fills itself (streams, HDF5, tiles); a failure names the dataset and the final file."""
    tmp = temporary_path(path)
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, path, dataset) from exc
        yield tmp
        try:
            if fsync:
                _fsync(tmp)
            os.replace(tmp, path)
        except OSError as exc:
            raise write_error(exc, path, dataset) from exc
    finally:
        with suppress(OSError):  # never hide the error that brought us here
            tmp.unlink(missing_ok=True)


def write_stream(path: Path, blocks: Iterable[bytes], *, dataset: str | None = None) -> tuple[int, str]:
    """Write ``blocks`` to ``path`` atomically while hashing them; return (size, sha256 hex)."""
    digest = hashlib.sha256()
    size = 0
    with atomic_output(path, dataset=dataset) as tmp:
        try:
            sink = open(tmp, "xb")
        except OSError as exc:
            raise write_error(exc, path, dataset) from exc
        with sink:
            for block in blocks:  # a reader's own error passes through as it is
                digest.update(block)
                try:
                    sink.write(block)
                except OSError as exc:
                    raise write_error(exc, path, dataset) from exc
                size += len(block)
    return size, digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
