"""One journalled, resumable, bounded-window copy of many small objects into the partial folder.

Every array source copies objects this way: zarr chunks from S3 (``ome_zarr_s3``), the decoded
blocks of a precomputed crop, IDR's rendered tiles. A source names its objects (where each goes
in the raw folder, where it comes from) and how to start reading one; the copy does the rest:

- **Bounded window.** At most ``window`` objects are in flight: started on the calling thread
  (so a source with asynchronous reads, such as tensorstore's, keeps several requests going) and
  waited for, written and hashed on the fetch context's ``workers`` threads. After the first
  failure no object starts; those already started finish (a resumed fetch need not repeat them),
  the ``cancel`` event is set so that reads which check it stop before their next attempt, and the
  first failure in object order is raised (never the :class:`~emdata.errors.Cancelled` of one it
  stopped).
- **Atomic.** Each object is written under a temporary name and renamed
  (:func:`emdata.core.atomic.write_bytes_atomic`), so a file with its final name is complete. It
  is not flushed to disk one by one (thousands of small objects): a resume re-hashes every
  journalled file and writes the others again, so one a power cut left short is never kept.
- **Journal.** After the rename, one JSON line (path, size, sha256) is appended to the journal in
  the partial folder, whose first line says what is being copied (the fetch spec and the source's
  ``identity``, e.g. which crop). A resumed copy of the same identity keeps an object only if its
  file still has the journalled size and sha256; any other (damaged, unjournalled, of another
  identity) is fetched again. A line cut by a kill is ignored. The journal is removed when the
  copy is complete, so it is never published with the files. The journals of earlier emdata
  versions (:data:`LEGACY_JOURNALS`) go when a copy starts, for the same reason.
"""

from __future__ import annotations

import hashlib
import json
import stat
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, TypeVar

from emdata.core.atomic import write_bytes_atomic
from emdata.core.digest import sha256_file
from emdata.errors import Cancelled
from emdata.sources.fetch.context import FetchContext
from emdata.sources.fetch.record import FetchedFile, plain_spec

JOURNAL = ".emdata-objects.jsonl"  # in the partial folder while a copy is under way
# Resume notes of earlier versions (ome_zarr_s3's chunk journal, precomputed's crop note): this
# copy never reads them, and one left in a partial folder would be published into data/raw unlisted.
LEGACY_JOURNALS = (".emdata-chunks.jsonl", ".crop.json")


class Wanted(Protocol):
    """An object to copy: its path in the raw folder and the URL the fetch record names."""

    @property
    def relpath(self) -> str: ...

    @property
    def url(self) -> str: ...


W = TypeVar("W", bound=Wanted)
Read = Callable[[], bytes]  # waits for one object's bytes (called on a worker thread)


def _header(ctx: FetchContext, identity: Any) -> dict[str, Any]:
    return {"spec": plain_spec(ctx.spec), "identity": json.loads(json.dumps(identity, default=str))}


def _read_journal(path: Path, header: dict[str, Any]) -> dict[str, tuple[int, str]] | None:
    """relpath -> (size, sha256) journalled under ``header``; None without a journal of that header."""
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return None
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    try:
        if not lines or json.loads(lines[0]) != header:
            return None
    except ValueError:
        return None
    entries = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
            entries[str(entry["relpath"])] = (int(entry["size"]), str(entry["sha256"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by the interruption
    return entries


def journalled(ctx: FetchContext, identity: Any = None, name: str = JOURNAL) -> dict[str, int]:
    """For ``plan``: relpath -> size of the objects a resumed copy would keep (stat only, no hashing)."""
    entries = _read_journal(ctx.dest / name, _header(ctx, identity)) or {}
    return {rel: size for rel, (size, _) in entries.items() if _size(ctx.dest / rel) == size}


def _size(path: Path) -> int | None:
    """The size of a regular file (never through a link planted in the partial folder), else None."""
    try:
        info = path.lstat()
    except OSError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


class _Journal:
    """The append-only journal: a header line, then one line per object written (under a lock)."""

    def __init__(self, path: Path, header: dict[str, Any], dataset: str) -> None:
        entries = _read_journal(path, header)
        if entries is None:  # none, or of another copy: start a new one (its header written atomically)
            write_bytes_atomic(path, (json.dumps(header) + "\n").encode(), dataset=dataset)
        self.entries = entries or {}
        self._lock = threading.Lock()
        self._fh = open(path, "a", encoding="utf-8")

    def add(self, relpath: str, size: int, sha256: str) -> None:
        line = json.dumps({"relpath": relpath, "size": size, "sha256": sha256}) + "\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def copy_objects(ctx: FetchContext, objects: Sequence[W], start: Callable[[W], Read], *, desc: str,
                 unit: str = "object", identity: Any = None, window: int | None = None,
                 cancel: threading.Event | None = None, name: str = JOURNAL) -> dict[str, FetchedFile]:
    """Copy ``objects`` into the partial folder (resuming a journalled copy); relpath -> what was stored.

    ``start(obj)`` begins reading one object and returns the call that waits for its bytes (and
    checks them: a source raises there for an answer it must not keep). ``window`` bounds the
    objects in flight (default: the context's workers).
    """
    path = ctx.dest / name
    for legacy in LEGACY_JOURNALS:
        (ctx.dest / legacy).unlink(missing_ok=True)
    journal = _Journal(path, _header(ctx, identity), ctx.dataset)
    try:
        with ctx.progress(len(objects), desc, unit=unit) as progress:
            kept = _kept(ctx, journal.entries, objects)
            progress.update(len(kept))
            todo = [obj for obj in objects if obj.relpath not in kept]

            def store(obj: W, read: Read) -> FetchedFile:
                stored = store_object(ctx, obj.relpath, obj.url, read())
                journal.add(obj.relpath, stored.size, stored.sha256 or "")
                return stored

            copied = _in_window(ctx, todo, start, store, window or max(1, ctx.workers), cancel or threading.Event(),
                                progress.update)
    finally:
        journal.close()
    path.unlink()  # complete: the raw folder holds the record, not the journal
    return {obj.relpath: kept.get(obj.relpath) or copied[obj.relpath] for obj in objects}


def store_object(ctx: FetchContext, relpath: str, url: str, data: bytes) -> FetchedFile:
    """Write one object that is already in memory into the partial folder (atomically); what the record keeps."""
    write_bytes_atomic(ctx.path(relpath), data, dataset=ctx.dataset, fsync=False)  # see "Atomic" above
    return FetchedFile(url, len(data), hashlib.sha256(data).hexdigest())


def _kept(ctx: FetchContext, entries: dict[str, tuple[int, str]], objects: Sequence[W]) -> dict[str, FetchedFile]:
    """The objects an interrupted copy finished whose files are still as it wrote them (size, sha256)."""
    journalled = [obj for obj in objects if obj.relpath in entries]

    def check(obj: W) -> FetchedFile | None:
        path, (size, digest) = ctx.dest / obj.relpath, entries[obj.relpath]
        if _size(path) != size or sha256_file(path) != digest:
            return None
        return FetchedFile(obj.url, size, digest)

    return {obj.relpath: f for obj, f in zip(journalled, ctx.map(check, journalled)) if f is not None}


def _in_window(ctx: FetchContext, todo: list[W], start: Callable[[W], Read], store: Callable[[W, Read], FetchedFile],
               window: int, cancel: threading.Event, done: Callable[[int], None]) -> dict[str, FetchedFile]:
    """``store(obj, start(obj))`` for each object, at most ``window`` in flight, on the context's workers."""

    def run(obj: W, read: Read) -> FetchedFile:
        try:
            return store(obj, read)
        except BaseException:
            cancel.set()  # before this worker takes the next object
            raise

    copied: dict[str, FetchedFile] = {}
    failed: dict[int, BaseException] = {}
    running: dict[Future[FetchedFile], int] = {}
    pending = iter(enumerate(todo))
    with ThreadPoolExecutor(max(1, ctx.workers), thread_name_prefix="emdata-copy") as pool:
        try:
            while True:
                while not failed and len(running) < window and (item := next(pending, None)) is not None:
                    index, obj = item
                    try:
                        running[pool.submit(run, obj, start(obj))] = index
                    except Exception as exc:  # noqa: BLE001 - raised below, after the started ones finish
                        failed[index] = exc
                        cancel.set()
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    index = running.pop(future)
                    error = future.exception()
                    if error is not None:
                        failed[index] = error
                    else:
                        copied[todo[index].relpath] = future.result()
                        done(1)
        except BaseException:  # interrupted: start nothing more, stop what checks cancel
            cancel.set()
            for future in running:
                future.cancel()
            raise
    if failed:
        ordered = [failed[i] for i in sorted(failed)]
        raise next((e for e in ordered if not isinstance(e, Cancelled)), ordered[0])
    return copied
