"""The one atomic write: a temporary sibling, flushed to disk, then renamed; removed on any error.

A temporary is named ``.<name>.<pid>.tmp`` beside its file (:func:`temporary_path`). A run killed
between the write and the rename leaves it behind; the next run of the same dataset removes it
under the dataset's lock (:func:`stale_temporaries`, :func:`stale_temporaries_in`). A failed write
(full disk...) names the dataset and the final file, never the temporary.

- :func:`atomic_output`: the context manager every writer that fills a file itself uses (HDF5,
  streams, extracted members); :func:`write_bytes_atomic`, :func:`write_json_atomic` and
  :func:`write_stream` are it for bytes already in memory, JSON and a stream of blocks.
- :func:`commit` (flush, rename, name the failure) and :func:`discard` (remove, never raise) are
  its two halves, for a writer that must rename several files in one order (normalize's publish)
  or keeps a resumable partial file under a name without a pid (a download's ``.part``).
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

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_TEMPORARY = re.compile(r"\..+\.(\d+)\.tmp")  # any file's temporary: .<name>.<pid>.tmp


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
    return sorted(path.parent / name for name in names if _of_another_process(pattern.fullmatch(name)))


def stale_temporaries_in(folder: Path) -> list[Path]:
    """Temporaries of any file under ``folder`` (its whole tree) left by other (killed) processes."""
    found = []
    for dirpath, _, names in os.walk(folder):
        found += [Path(dirpath) / name for name in names if _of_another_process(_TEMPORARY.fullmatch(name))]
    return sorted(found)


def _of_another_process(match: re.Match[str] | None) -> bool:
    return match is not None and int(match.group(1)) != os.getpid()


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
        discard(path)
        raise write_error(exc, final or path, dataset) from exc


def write_error(exc: OSError, path: Path, dataset: str | None) -> Exception:
    """The error to raise when writing ``path`` failed with ``exc``."""
    if dataset is None:
        return OSError(exc.errno, exc.strerror or str(exc), str(path))
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return OutputError(dataset, str(path), f"cannot write it ({exc.strerror or exc})",
                       "free some disk space and run again" if full
                       else "check the folder and its permissions and run again")


def write_bytes_atomic(path: Path, data: bytes, *, dataset: str | None = None, fsync: bool = True) -> None:
    with atomic_output(path, dataset=dataset, fsync=fsync) as tmp:
        write_new(tmp, data, dataset=dataset, final=path)


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
            tmp.unlink(missing_ok=True)  # a killed process with the same pid, or a planted link
        except OSError as exc:
            raise write_error(exc, path, dataset) from exc
        yield tmp
        commit(tmp, path, dataset=dataset, fsync=fsync)
    finally:
        discard(tmp)


def commit(tmp: Path, path: Path, *, dataset: str | None = None, fsync: bool = True) -> None:
    """Flush ``tmp`` to disk and rename it over ``path``; a failure names the dataset and ``path``.

    Flushed first so that a power cut never leaves ``path`` renamed but its bytes unwritten.
    """
    try:
        if fsync:
            sync_file(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(exc, path, dataset) from exc


def sync_file(path: Path) -> None:
    """Flush a file's bytes to disk (opened without following a symbolic link)."""
    fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(path: Path) -> None:
    """Remove a temporary if it is there; never raises, so the error that brought us here stays the one raised."""
    with suppress(OSError):
        path.unlink(missing_ok=True)


def write_stream(path: Path, blocks: Iterable[bytes], *, dataset: str | None = None) -> tuple[int, str]:
    """Write ``blocks`` to ``path`` atomically while hashing them; return (size, sha256 hex)."""
    digest = hashlib.sha256()
    size = 0
    with atomic_output(path, dataset=dataset) as tmp:
        try:  # a new file, never through a link planted at the temporary's name
            sink = os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o644), "wb")
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
