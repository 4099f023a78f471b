"""A verified, resumable download of one file: ``<dest>.part``, resumed by ``Range``, renamed when right.

A download streams to ``<dest>.part``. When the connection drops, the next attempt asks for the
rest with a ``Range`` request, so bytes already on disk are never fetched twice (also across
runs: a later ``emdata fetch`` resumes the same ``.part``). A resume never splices two versions
of a file: the validator of the response that began ``.part`` (its strong ``ETag``, else its
``Last-Modified``) is kept beside it in ``<dest>.part.validator`` (written atomically before the
first byte) and sent as ``If-Range``, so a server whose file changed answers ``200`` with the
whole new file, which replaces the part; a ``206`` that starts elsewhere than asked or carries
another validator is refused and the download starts over. A ``.part`` without a validator (the
server sent none, or an older emdata wrote it) is never resumed: it starts over from byte 0.
The finished file is checked against the size the server announced and the size and sha256
pinned in params.yaml, then flushed to disk and renamed into place.

``.part`` is not a temporary of :mod:`emdata.core.atomic` (``.<name>.<pid>.tmp``, removed on any
error): it is a resumable partial download, kept when a download fails so that a later run,
another process, continues it, so its name has no pid. Only its flush is core.atomic's
(:func:`~emdata.core.atomic.sync_file`); a fetch that completes without it drops it.

Safety: nothing is written past the pinned size (or, unpinned, the announced one): a
``Content-Length`` or ``Content-Range`` that disagrees with it fails before the body is read, and
an endless body stops at the limit. ``.part`` is opened without following symbolic links, and a
``.part`` or destination that is a symbolic link is refused.

Speed: a plain length-delimited body is received straight from the socket into the sink's
buffers (no per-block objects, no decoding layer); :mod:`emdata.transport.sink` writes and hashes
them while the next one fills.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import io
import json
import os
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import requests

from emdata.core.atomic import sync_file, write_bytes_atomic
from emdata.core.progress import Progress
from emdata.errors import FetchError, IntegrityError
from emdata.transport.failures import network_problem
from emdata.transport.headers import content_length, content_range, version_of
from emdata.transport.retry import RateGuard, Retry, RetryPolicy
from emdata.transport.sink import O_BINARY, O_CLOEXEC, O_NOFOLLOW, Sink, symlink_error

# <dest>.part.validator: which version of the remote file <dest>.part holds (plan_files in
# sources/fetch/files.py checks for it by name, without importing this module)
VALIDATOR_SUFFIX = ".validator"
FILL_SECONDS = 1.0  # a slow link still reaches the disk (and the progress bar) every second
HASH_BLOCK = 4 << 20  # read size when a finished .part must be hashed from disk


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    sha256: str
    requests: int


class Transfer(Protocol):
    """What a download needs from the HTTP client (:class:`emdata.transport.client.HttpClient`)."""

    dataset: str
    policy: RetryPolicy

    def send(self, method: str, url: str, **kwargs: Any) -> requests.Response: ...

    def retrying(self, url: str, attempt_once: Callable[[], Any], *, resumable: bool = False) -> Any: ...

    def thread_requests(self) -> int: ...


def validator_path(part: Path) -> Path:
    return part.with_name(part.name + VALIDATOR_SUFFIX)


def write_validator(part: Path, url: str, validator: str | None) -> None:
    """Note (atomically) beside ``part`` which version of ``url`` its bytes are; None removes the note."""
    path = validator_path(part)
    if validator is None:
        path.unlink(missing_ok=True)
    else:
        write_bytes_atomic(path, (json.dumps({"url": url, "validator": validator}) + "\n").encode())


def stored_validator(part: Path, url: str) -> str | None:
    """The validator kept beside ``part`` for ``url``; None when absent, unreadable or another URL's."""
    path = validator_path(part)
    try:
        if path.is_symlink():
            return None
        note = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(note, dict) or note.get("url") != url or not isinstance(note.get("validator"), str):
        return None
    return note["validator"] or None


def _disk_problem(exc: OSError) -> str:
    return "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))


class ResumableDownload:
    """One file: the attempts of a download share its ``.part``, its sink and what the server announced."""

    def __init__(self, client: Transfer, url: str, dest: Path, *, size: int | None = None,
                 label: str | None = None) -> None:
        self.client, self.dataset, self.url = client, client.dataset, url
        self.dest = Path(dest)
        self.part = self.dest.with_name(self.dest.name + ".part")
        self.pinned = self.announced = size
        self.label = label or self.dest.name

    def run(self, sha256: str | None = None) -> Downloaded:
        """Fetch into ``dest`` (resuming ``dest.part``), verify it, rename it into place."""
        url, part = self.url, self.part
        for path in (self.dest, part):
            if path.is_symlink():
                raise symlink_error(self.dataset, url, path)
        start_requests = self.client.thread_requests()
        self.sink = Sink(self.dataset, url, part)
        self.progress = Progress(self.pinned, self.label)
        try:
            self.client.retrying(url, self._attempt, resumable=True)
            got = self._part_size()
            if self.announced is not None and got != self.announced:
                raise IntegrityError(self.dataset, url, f"received {got} bytes, expected {self.announced}",
                                     "the server sent a different size; check params.yaml or try later")
            digest = self.sink.digest(got) or self._hash_part()
            if sha256 is not None and digest != sha256:
                raise IntegrityError(self.dataset, url, f"sha256 {digest} does not match params.yaml ({sha256})",
                                     "the remote file changed or is corrupt; check the pinned sha256")
        except IntegrityError:
            self.sink.close()
            with contextlib.suppress(OSError):  # bad bytes must not be resumed from
                if not part.is_symlink():
                    part.unlink(missing_ok=True)
                validator_path(part).unlink(missing_ok=True)
            raise
        finally:
            self.progress.close()
            self.sink.shutdown()
        self._sync_and_rename()
        return Downloaded(self.dest, got, digest, self.client.thread_requests() - start_requests)

    # -- .part on disk ---------------------------------------------------------------------------

    def _discard(self) -> None:
        """Remove ``.part`` and its validator (the validator first: bytes never outlive their version)."""
        for path in (validator_path(self.part), self.part):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise FetchError(self.dataset, self.url, f"cannot remove {path}: {exc.strerror or exc}",
                                 "check the data folder, then run the same command again") from exc

    def _keep_validator(self, validator: str | None) -> None:
        """Write (atomically) which version of the file ``.part`` holds; None: remove the old note."""
        try:
            write_validator(self.part, self.url, validator)
        except OSError as exc:
            raise FetchError(self.dataset, self.url, f"cannot write {validator_path(self.part)}: {_disk_problem(exc)}",
                             "check the data folder, then run the same command again") from exc

    def _part_size(self) -> int:
        """Bytes in ``.part`` (0 if absent); a link or a folder there is refused, never followed."""
        try:
            info = os.lstat(self.part)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise FetchError(self.dataset, self.url, f"cannot read {self.part}: {exc.strerror}") from exc
        if stat.S_ISLNK(info.st_mode):
            raise symlink_error(self.dataset, self.url, self.part)
        if not stat.S_ISREG(info.st_mode):
            raise FetchError(self.dataset, self.url, f"{self.part} is not a regular file",
                             "remove it, then run the same command again")
        return info.st_size

    def _hash_part(self) -> str:
        digest = hashlib.sha256()
        try:
            fd = os.open(self.part, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_BINARY)
            with open(fd, "rb", buffering=0) as fh:
                while chunk := fh.read(HASH_BLOCK):
                    digest.update(chunk)
        except OSError as exc:
            raise FetchError(self.dataset, self.url, f"cannot read {self.part}: {exc.strerror or exc}") from exc
        return digest.hexdigest()

    def _sync_and_rename(self) -> None:
        part, dest = self.part, self.dest
        try:
            sync_file(part)
            if dest.is_symlink():
                raise symlink_error(self.dataset, self.url, dest)
            # Before the rename: a stray validator would travel into data/raw with the folder.
            validator_path(part).unlink(missing_ok=True)
            os.replace(part, dest)
        except OSError as exc:
            raise FetchError(self.dataset, self.url, f"cannot store {dest}: {_disk_problem(exc)}",
                             "check the data folder, then run the same command again") from exc

    def _too_big(self, what: str, size: int) -> IntegrityError:
        if self.pinned is not None:
            problem = f"the server announces {what} {size} bytes, params.yaml pins {self.pinned}"
            hint = "the remote file changed or the pinned size is wrong; check params.yaml"
        else:
            problem = f"the server announces {what} {size} bytes, earlier {self.announced}"
            hint = "the remote file changed during the download; run the same command again"
        return IntegrityError(self.dataset, self.url, problem, hint)

    # -- one attempt -----------------------------------------------------------------------------

    def _attempt(self) -> None:
        url, part = self.url, self.part
        have = self._part_size()
        stored = stored_validator(part, url) if have else None
        # Without a validator nothing tells whether these bytes are of the file served now: start over.
        if have and (stored is None or (self.announced is not None and have > self.announced)):
            self._discard()
            have = 0
        headers = {"Accept-Encoding": "identity"}
        if have and stored is not None:
            headers["Range"] = f"bytes={have}-"
            headers["If-Range"] = stored  # the file changed since: the server sends all of it (200)
        with self.client.send("GET", url, headers=headers, stream=True) as r:
            if r.status_code == 416:
                # Nothing left to send: the part is complete if its size is what the server holds.
                total = (content_range(r.headers.get("Content-Range")) or (0, None))[1]
                if have and total == have:
                    if self.announced is None:
                        self.announced = total
                    return
                self._discard()
                raise Retry("HTTP 416 for a resume; restarting from zero")
            length = content_length(r, of_body=True)  # decoded bytes, which is what we store
            if r.status_code == 206:
                start, total = content_range(r.headers.get("Content-Range")) or (-1, None)
                if start != have:
                    self._discard()
                    raise Retry(f"server answered a range from {start}, asked {have}; restarting")
                if total is not None and self.announced is not None and total != self.announced:
                    raise self._too_big("a total of", total)
                served = version_of(r)
                if have and served != stored:  # a server that ignored If-Range, or cannot say which version
                    self._discard()
                    raise Retry("the file changed on the server since the partial download began; restarting"
                                if served is not None else
                                "the server's partial answer names no version (no ETag or Last-Modified) to "
                                "match the partial download's; restarting")
                restart = False
            else:  # 200: the whole body, from byte 0 (the server may ignore Range)
                total = length
                if length is not None and self.announced is not None and length != self.announced:
                    raise self._too_big("a body of", length)
                have, restart = 0, True
            if self.announced is None:
                self.announced = total
            if length is not None and self.announced is not None and have + length > self.announced:
                raise self._too_big("a body of", length)
            self.progress.update(have - self.progress.done)  # resumed bytes count as done; a restart rewinds
            if have:
                self.sink.open(restart, have)
            else:  # a body from byte 0: its validator lands beside .part before any of its bytes
                self._keep_validator(None)  # first: old bytes never get the new validator
                self.sink.open(restart, 0)
                self._keep_validator(version_of(r))
            try:
                self._receive(r, have, length)
            finally:
                self.sink.close()
                self.sink.check()  # a failed write outranks whatever the network did

    def _receive(self, r: requests.Response, have: int, length: int | None) -> None:
        """Append the body to ``.part``, never past the announced/pinned size."""
        readinto1 = body_reader(r)
        sink, limit = self.sink, self.announced
        end = None if length is None else have + length  # where this body ends
        pos = have
        guard = RateGuard(self.client.policy)
        while True:
            # Ask for no more than this body holds; with an unknown length, for one byte past the
            # limit, so that a body running on past it is caught without writing that byte.
            if end is not None:
                want = end - pos
            elif limit is not None:
                want = limit + 1 - pos
            else:
                want = sys.maxsize  # as much as a buffer holds
            if want <= 0:
                break
            view = sink.buffer()[:want]
            n, eof, failure = 0, False, None
            until = min(time.monotonic() + FILL_SECONDS, guard.deadline)
            try:
                while n < len(view):
                    got = readinto1(view[n:])
                    if not got:
                        eof = True
                        break
                    n += got
                    if time.monotonic() >= until:
                        break
            except BaseException as exc:  # keep what arrived before the connection failed
                failure = exc
            if limit is not None and pos + n > limit:
                raise IntegrityError(self.dataset, self.url, f"the server sent more than {limit} bytes",
                                     "the remote file changed or the pinned size is wrong; check params.yaml")
            if n:
                sink.append(view[:n])
                pos += n
                self.progress.update(n)
            if failure is not None:
                if isinstance(failure, OSError) and not isinstance(failure, requests.RequestException):
                    raise Retry(network_problem(failure, self.url, self.client.policy)) from failure
                raise failure
            if eof:
                break
            guard.update(n)
        if end is not None and pos < end:
            raise Retry(f"the connection closed after {pos - have} of {length} bytes")


def body_reader(response: requests.Response) -> Callable[[memoryview], int]:
    """``readinto1`` for the body: one receive per call, so a dropped connection loses no byte.

    A plain length-delimited body is read straight from the socket's buffered reader into our
    buffer (no copies, no per-block objects); anything else (chunked, or a Content-Encoding the
    server applied although we asked for identity) goes through urllib3's decoding ``read1``.
    """
    raw = response.raw
    inner = getattr(raw, "_fp", None)  # urllib3 keeps the http.client response here
    stream: Any = getattr(inner, "fp", None)
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if (isinstance(inner, http.client.HTTPResponse) and not inner.chunked and inner.length is not None
            and encoding in ("", "identity") and hasattr(stream, "readinto1")
            and getattr(raw, "_fp_bytes_read", None) == 0):
        first = [True]

        def readinto1(view: memoryview) -> int:
            if first:  # bytes read along with the headers: hand them over without a receive
                first.clear()
                return stream.readinto1(view[:io.DEFAULT_BUFFER_SIZE])
            return stream.readinto1(view)

        return readinto1

    def read1(view: memoryview) -> int:
        data = raw.read1(len(view), decode_content=True)
        view[:len(data)] = data
        return len(data)

    return read1
