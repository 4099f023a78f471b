"""Verified, resumable HTTP downloads shared by every HTTP source.

A download streams to ``<dest>.part``. When the connection drops, the next attempt asks for the
rest with a ``Range`` request, so bytes already on disk are never fetched twice (also across
runs: a later ``emdata fetch`` resumes the same ``.part``). A resume never splices two versions
of a file: the validator of the response that began ``.part`` (its strong ``ETag``, else its
``Last-Modified``) is kept beside it in ``<dest>.part.validator`` (written atomically before the
first byte) and sent as ``If-Range``, so a server whose file changed answers ``200`` with the
whole new file, which replaces the part; a ``206`` that starts elsewhere than asked or carries
another validator is refused and the download starts over. A ``.part`` without a validator (the
server sent none, or an older emdata wrote it) is never resumed: it starts over from byte 0.
Connection errors, 429 and 5xx are retried a bounded number of times with exponential backoff
and jitter, honouring ``Retry-After``; a host name that does not resolve fails at once. A body
that arrives slower than a minimum rate (below) counts as a failed attempt, and the next one
resumes it: a server trickling a byte a second fails a download within the retry budget
(6 attempts of 10 s plus the waits between them: under 90 s with the defaults). The finished
file is checked against the size the server announced and the size and sha256 pinned in
params.yaml, then flushed to disk and renamed into place. Every failure is a one-line FetchError
or IntegrityError naming the dataset and the URL (and, for an HTTP answer, its ``status``).

Safety: nothing is written past the pinned size (or, unpinned, the announced one): a
``Content-Length`` or ``Content-Range`` that disagrees with it fails before the body is read, and
an endless body stops at the limit. ``.part`` is opened without following symbolic links, and a
``.part`` or destination that is a symbolic link is refused. Redirects are followed to http and
https URLs only.

Speed: the body is received into a few reusable, page-aligned buffers (straight from the socket
when the response is plain, length-delimited HTTP: no per-block objects, no decoding layer).
While the next buffer fills, one worker thread appends the last one to ``.part`` and another
computes its sha256 (both release the GIL), so the file is never read back, except to hash the
prefix that an earlier run left in ``.part``. The aligned bulk is written with ``O_DIRECT`` where
the file system allows it: no page-cache copy and nothing left for the final fsync (the file is
then not in the page cache afterwards). Elsewhere writes go through the page cache and a third
worker starts the write-back as the file grows.

Environment:

``EMDATA_READ_TIMEOUT``
    Seconds to wait for the next bytes of a response before the attempt counts as failed
    (default 60).
``EMDATA_MIN_RATE`` and ``EMDATA_RATE_WINDOW``
    A response body must bring at least ``EMDATA_MIN_RATE`` bytes per second on average over
    each ``EMDATA_RATE_WINDOW`` seconds (defaults 1024 and 10), else the attempt counts as
    stalled and the next one resumes; ``EMDATA_MIN_RATE=0`` turns the check off.

They are used when no explicit ``RetryPolicy`` is given; a value that is not a number in ASCII
digits in range (a positive one; the minimum rate may be 0) is refused when the client is created.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import hashlib
import http.client
import io
import json
import logging
import math
import mmap
import os
import random
import re
import socket
import stat
import threading
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import requests
import urllib3

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no O_DIRECT either
    fcntl = None  # type: ignore[assignment]

from emdata.errors import Cancelled, ConfigError, FetchError, IntegrityError
from emdata.core.numbers import ascii_decimal, ascii_int
from emdata.core.progress import Progress
from emdata.core.atomic import write_bytes_atomic
from emdata.core.digest import sha256_file  # noqa: F401  (re-exported: emdata.transport.http.sha256_file)

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
BLOCK = 1 << 20
RECV_BUFFER = 4 << 20  # one receive buffer; they rotate between receiving, writing and hashing
RECV_BUFFERS = 6
ALIGN = 4096  # O_DIRECT alignment of memory, file offsets and lengths
DIRECT_IO = True  # write the aligned bulk of a download with O_DIRECT where the file system allows
FLUSH_EVERY = 64 << 20  # without O_DIRECT: start the write-back after this many new bytes
FILL_SECONDS = 1.0  # a slow link still reaches the disk (and the progress bar) every second
USER_AGENT = "emdata (+https://github.com/emdata; research data pipeline)"
READ_TIMEOUT_ENV = "EMDATA_READ_TIMEOUT"
MIN_RATE_ENV = "EMDATA_MIN_RATE"
RATE_WINDOW_ENV = "EMDATA_RATE_WINDOW"
# <dest>.part.validator: which version of the remote file <dest>.part holds (plan_files in
# sources/base.py checks for it by name, without importing this module)
VALIDATOR_SUFFIX = ".validator"
API_MAX_BYTES = 64 << 20  # cap on a whole-response read (API answers, listings, tiles)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)
_O_DIRECT = getattr(os, "O_DIRECT", 0)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds for one request: how often, how long to wait, how long to wait for bytes."""

    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 120.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    # A body must average min_rate bytes/s over every rate_window seconds (0: no minimum). A
    # trickle then costs an attempt of rate_window seconds, not hours: 6 x 10 s + waits < 90 s.
    min_rate: float = 1024.0
    rate_window: float = 10.0
    # A host that has not answered once in this client (refused, no route, no connection) is given
    # up when the next try could end later than this after the first began: unreachable hosts
    # fail in seconds, not after every try with its connect timeout (6 x 10 s + waits).
    unreachable_after: float = 25.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Exponential backoff with equal jitter: half fixed, half random."""
        delay = min(self.max_delay, self.base_delay * (2 ** attempt))
        return delay / 2 + rng.uniform(0, delay / 2)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **fields: Any) -> RetryPolicy:
        """The default policy, with ``read_timeout``, ``min_rate`` and ``rate_window`` from the
        environment (``EMDATA_READ_TIMEOUT``, ``EMDATA_MIN_RATE``, ``EMDATA_RATE_WINDOW``) when set."""
        environ = os.environ if environ is None else environ
        for name, key, what, zero in ((READ_TIMEOUT_ENV, "read_timeout", "a positive number of seconds "
                                       "(such as 60 or 2.5)", False),
                                      (MIN_RATE_ENV, "min_rate", "a number of bytes per second "
                                       "(such as 1024; 0 turns the check off)", True),
                                      (RATE_WINDOW_ENV, "rate_window", "a positive number of seconds "
                                       "(such as 10)", False)):
            value = environ.get(name, "")
            if value.strip() and key not in fields:
                number = ascii_decimal(value)
                if number is None or not math.isfinite(number) or (number <= 0 and not (zero and number == 0)):
                    raise ConfigError(f"{name}={value!r}: expected {what}; unset it for the default "
                                      f"{getattr(cls, key):g}")
                fields[key] = number
        return cls(**fields)


@dataclass(frozen=True)
class RemoteInfo:
    url: str
    size: int | None
    accepts_ranges: bool


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    sha256: str
    requests: int


def _short_url(url: str, limit: int = 90) -> str:
    """``scheme://host/…/name`` when a URL is long: the host and the file still say which it is."""
    if len(url) <= limit:
        return url
    parts = urllib.parse.urlsplit(url)
    name = parts.path.rstrip("/").rsplit("/", 1)[-1]
    return _clip(f"{parts.scheme}://{parts.netloc}/…/{name}", limit)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    seconds = ascii_int(value)
    if seconds is not None:
        return float(seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _content_range(value: str | None) -> tuple[int | None, int | None] | None:
    """(start, total) from ``bytes start-end/total`` or a 416's ``bytes */total`` (start None)."""
    match = re.fullmatch(r"bytes (?:([0-9]{1,30})-[0-9]{1,30}|\*)/([0-9]{1,30}|\*)", (value or "").strip())
    if not match:
        return None
    start = None if match.group(1) is None else int(match.group(1))
    total = None if match.group(2) == "*" else int(match.group(2))
    return start, total


def _content_length(response: requests.Response, *, of_body: bool = False) -> int | None:
    """The Content-Length; ``of_body``: None when a Content-Encoding makes it the encoded size."""
    value = response.headers.get("Content-Length", "").strip()
    if of_body and response.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
        return None
    return ascii_int(value)


def _validator(response: requests.Response) -> str | None:
    """What identifies the version of the file a response carries, for ``If-Range``: its ETag
    unless weak (``W/``, which If-Range must not carry), else its Last-Modified date, else None."""
    etag = response.headers.get("ETag", "").strip()
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified", "").strip() or None


def _validator_path(part: Path) -> Path:
    return part.with_name(part.name + VALIDATOR_SUFFIX)


def write_validator(part: Path, url: str, validator: str | None) -> None:
    """Note (atomically) beside ``part`` which version of ``url`` its bytes are; None removes the note."""
    path = _validator_path(part)
    if validator is None:
        path.unlink(missing_ok=True)
    else:
        write_bytes_atomic(path, (json.dumps({"url": url, "validator": validator}) + "\n").encode())


def _stored_validator(part: Path, url: str) -> str | None:
    """The validator kept beside ``part`` for ``url``; None when absent, unreadable or another URL's."""
    path = _validator_path(part)
    try:
        if path.is_symlink():
            return None
        note = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(note, dict) or note.get("url") != url or not isinstance(note.get("validator"), str):
        return None
    return note["validator"] or None


def _netloc(url: str) -> str:
    try:
        return urllib.parse.urlsplit(url).netloc
    except ValueError:  # a malformed URL: requests says what is wrong with it
        return url


def _clip(text: str, limit: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps (requests -> urllib3 -> socket), breadth first, each once."""
    todo, seen = [exc], set()
    while todo and len(seen) < 32:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = (getattr(current, "reason", None), current.__cause__, current.__context__, *current.args)
        todo.extend(x for x in linked if isinstance(x, BaseException))


def _unresolved_host(exc: BaseException) -> bool:
    return any(isinstance(e, (urllib3.exceptions.NameResolutionError, socket.gaierror)) for e in _causes(exc))


def _network_problem(exc: BaseException, url: str, policy: RetryPolicy) -> str:
    """A short reason for a transport failure (urllib3's own messages run to 300 characters)."""
    host = urllib.parse.urlsplit(url).netloc or url
    for e in _causes(exc):
        if isinstance(e, ConnectionRefusedError):
            return f"connection refused by {host}"
        if isinstance(e, (requests.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError)) and not isinstance(
                e, urllib3.exceptions.NewConnectionError):
            return f"no connection to {host} within {policy.connect_timeout:g} s"
        if isinstance(e, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError, TimeoutError)):
            return f"no data for {policy.read_timeout:g} s (read timeout; {READ_TIMEOUT_ENV} sets it)"
        if isinstance(e, ConnectionResetError):
            return "the connection was reset"
        if isinstance(e, (http.client.IncompleteRead, urllib3.exceptions.IncompleteRead,
                          urllib3.exceptions.ProtocolError, requests.exceptions.ChunkedEncodingError)):
            return "the connection was cut mid-response"
        if isinstance(e, (requests.exceptions.SSLError, urllib3.exceptions.SSLError)):
            return f"TLS error ({_clip(e, 80)})"
    for e in _causes(exc):
        if isinstance(e, OSError) and e.strerror:
            return f"{host}: {_clip(e.strerror, 80)}"
    return f"{type(exc).__name__}: {_clip(exc, 80)}"


class _Retry(Exception):
    """Internal: this attempt failed in a way worth another try (``status``: the HTTP status, if any)."""

    def __init__(self, reason: str, wait: float | None = None, status: int | None = None) -> None:
        super().__init__(reason)
        self.wait = wait
        self.status = status


class _RateGuard:
    """Fails an attempt whose body averages less than ``policy.min_rate`` bytes/s over a window.

    A read timeout alone never fires on a server that sends a byte every second; this does, after
    ``rate_window`` seconds, and the retry resumes from what arrived.
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self.rate, self.window = policy.min_rate, policy.rate_window
        self.start, self.got = time.monotonic(), 0

    @property
    def deadline(self) -> float:
        """When the current window ends (a reader stops filling its buffer then, to check)."""
        return self.start + self.window if self.rate > 0 else math.inf

    def update(self, nbytes: int) -> None:
        self.got += nbytes
        now = time.monotonic()
        if self.rate <= 0 or now < self.deadline:
            return
        if self.got < self.rate * (now - self.start):
            raise _Retry(f"the transfer stalled ({self.got} bytes in {now - self.start:.1f} s, under the minimum "
                         f"of {self.rate:g} bytes/s over {self.window:g} s; {MIN_RATE_ENV} sets it)")
        self.start, self.got = now, 0


# Requests failures that no retry can cure: a bad URL or scheme, a redirect loop, a body that
# cannot be decoded. Checked before the retried ones (every requests exception is an OSError).
_FATAL = (requests.TooManyRedirects, requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL,
          requests.exceptions.MissingSchema, requests.exceptions.InvalidHeader,
          requests.exceptions.ContentDecodingError, requests.exceptions.StreamConsumedError,
          requests.exceptions.RetryError, requests.exceptions.InvalidJSONError, urllib3.exceptions.DecodeError)
_TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
              urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)


class _Sink:
    """The ``.part`` of one download: receive buffers go to disk and to sha256 on two workers.

    Buffers are page-aligned and placed so that a buffer's bytes sit at the same offset modulo
    ``ALIGN`` in memory as in the file; the aligned bulk of each is written with ``O_DIRECT``
    where the file system allows it (no page-cache copy, nothing left to write back), the
    unaligned head and tail through the page cache. Without ``O_DIRECT`` every write goes through
    the page cache and a third worker starts the write-back as the file grows.

    ``hashed`` counts the bytes of ``.part`` fed, in order, to the sha256 worker; the digest is
    used only when that equals the final size, else the file is hashed from disk. When an attempt
    resumes a ``.part`` whose bytes were not hashed here (an earlier run's), its prefix is read
    once, on the worker, ahead of the new bytes.
    """

    def __init__(self, client: HttpClient, url: str, part: Path) -> None:
        self.client, self.url, self.part = client, url, part
        self.fd: int | None = None
        self.size = 0  # bytes in .part; the writer updates it
        self.queued = 0  # bytes in .part once the queued writes are done
        self.sha = hashlib.sha256()
        self.hashed = -1  # -1: unknown, rehash from disk on the next open
        self.direct = False  # O_DIRECT is set on fd
        self._direct_ok = DIRECT_IO and _O_DIRECT != 0 and fcntl is not None
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="emdata-sha256")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="emdata-write")
        self._flusher = ThreadPoolExecutor(1, thread_name_prefix="emdata-flush")
        self._buffers: dict[int, memoryview] = {}  # slot -> buffer, made on first use
        self._pending: list[list[Future]] = [[] for _ in range(RECV_BUFFERS)]
        self._slot = 0
        self._prefix: Future | None = None
        self._flush: Future | None = None
        self._flushed_at = 0
        self._failure: OSError | None = None  # the first failed write; later ones are skipped
        self._bad_tail = False  # that write left bytes that could not be cut off again

    # -- one attempt ------------------------------------------------------------------------

    def open(self, restart: bool, expect: int) -> None:
        """Open ``.part`` to append (``restart``: emptied first); it must hold ``expect`` bytes."""
        flags = os.O_WRONLY | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY | (os.O_TRUNC if restart else 0)
        try:
            fd = os.open(self.part, flags, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP or self.part.is_symlink():
                raise self.client._symlink_error(self.url, self.part) from exc
            raise self._disk_error(exc, "open") from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise FetchError(self.client.dataset, self.url, f"{self.part} is not a regular file",
                                 "remove it, then run the same command again")
            os.lseek(fd, 0, os.SEEK_END)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.direct = fd, False
        self.size = self.queued = self._flushed_at = info.st_size
        self._failure, self._bad_tail = None, False
        if info.st_size != expect:
            self.close()
            raise _Retry(f"{self.part} changed during the request; starting again")
        if restart or self.hashed != self.size:
            self.sha, self.hashed = hashlib.sha256(), self.size
            if self.size:
                self._prefix = self._hasher.submit(self._hash_prefix, self.sha, self.size)

    def _hash_prefix(self, sha: Any, size: int) -> None:
        fd = os.open(self.part, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY)
        try:
            done = 0
            while done < size:
                chunk = os.pread(fd, min(RECV_BUFFER, size - done), done)
                if not chunk:
                    raise OSError(errno.EIO, f"{self.part} is shorter than {size} bytes")
                sha.update(chunk)
                done += len(chunk)
        finally:
            os.close(fd)

    def buffer(self) -> memoryview:
        """The next free receive buffer, to hold the bytes from file offset ``queued`` on."""
        self._wait(self._slot)
        self.check()
        if self._slot not in self._buffers:  # a small file never needs more than one
            self._buffers[self._slot] = memoryview(mmap.mmap(-1, RECV_BUFFER + ALIGN))
        start = self.queued % ALIGN
        return self._buffers[self._slot][start:start + RECV_BUFFER]

    def append(self, view: memoryview) -> None:
        """Queue ``view`` (the start of the buffer last handed out) for writing and hashing."""
        assert self.fd is not None
        jobs = self._pending[self._slot]
        jobs.append(self._writer.submit(self._write, view, self.queued))
        if self.hashed >= 0:
            jobs.append(self._hasher.submit(self.sha.update, view))
            self.hashed += len(view)
        self.queued += len(view)
        self._slot = (self._slot + 1) % RECV_BUFFERS
        if not self._direct_ok and self.queued - self._flushed_at >= FLUSH_EVERY and (
                self._flush is None or self._flush.done()):
            if self._flush is not None and self._flush.exception() is not None:
                self._failure = self._failure or self._flush.exception()
            self._flush = self._flusher.submit(os.fdatasync if hasattr(os, "fdatasync") else os.fsync, self.fd)
            self._flushed_at = self.queued

    def _write(self, view: memoryview, offset: int) -> None:
        """Writer thread: append ``view`` at ``offset``, the aligned middle with O_DIRECT."""
        if self._failure is not None:
            return  # after a failed write nothing else may land in the file
        head = min(len(view), -offset % ALIGN)
        bulk = (len(view) - head) // ALIGN * ALIGN if self._direct_ok else 0
        try:
            for piece, direct in ((view[:head], False), (view[head:head + bulk], True),
                                  (view[head + bulk:], False)):
                while piece:
                    if direct != self.direct and not self._set_direct(direct):
                        direct = False
                    try:
                        n = os.write(self.fd, piece)
                    except OSError as exc:
                        if not (direct and exc.errno in (errno.EINVAL, errno.EOPNOTSUPP)):
                            raise
                        self._direct_ok = direct = False  # this file system refuses it: page cache from now on
                        continue
                    self.size += n
                    piece = piece[n:]
                    if piece and direct:  # a short direct write leaves an unaligned rest
                        direct = False
        except OSError as exc:
            self._failure = exc
            try:
                if os.fstat(self.fd).st_size != self.size:
                    os.ftruncate(self.fd, self.size)
            except OSError:
                self._bad_tail = True

    def _set_direct(self, on: bool) -> bool:
        try:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | _O_DIRECT if on else flags & ~_O_DIRECT)
        except OSError:
            if on:
                self._direct_ok = False
                return False
            raise
        self.direct = on
        return True

    def _wait(self, slot: int) -> None:
        jobs, self._pending[slot] = self._pending[slot], []
        for job in jobs:
            job.result()

    def close(self) -> None:
        """End the attempt: wait for the workers, close the file (``size``, ``hashed`` settle)."""
        if self._prefix is not None:
            if self._prefix.exception() is not None:
                self.hashed = -1  # the earlier prefix could not be read: hash the file at the end
            self._prefix = None
        for slot in range(RECV_BUFFERS):
            self._wait(slot)
        if self._flush is not None:
            if self._flush.exception() is not None:
                self._failure = self._failure or self._flush.exception()
            self._flush = None
        if self._failure is not None:
            self.hashed = -1
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)
            if self._bad_tail:
                self.part.unlink(missing_ok=True)  # not a clean prefix: nothing to resume from

    def check(self) -> None:
        """Raise the failed write, if any, as a one-line FetchError."""
        if self._failure is not None:
            raise self._disk_error(self._failure) from self._failure

    def _disk_error(self, exc: OSError, action: str = "write") -> FetchError:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        what = "disk full" if full else (exc.strerror or str(exc))
        hint = "free some space, then run the same command again to resume" if full else \
            "check the data folder, then run the same command again"
        return FetchError(self.client.dataset, self.url, f"cannot {action} {self.part}: {what}", hint)

    # -- the whole download -----------------------------------------------------------------

    def digest(self, size: int) -> str | None:
        return self.sha.hexdigest() if self.hashed == size else None

    def shutdown(self) -> None:
        self.close()
        self._hasher.shutdown()
        self._writer.shutdown()
        self._flusher.shutdown()
        self._buffers = {}


def _body_reader(response: requests.Response) -> Callable[[memoryview], int]:
    """``readinto1`` for the body: one receive per call, so a dropped connection loses no byte.

    A plain length-delimited body is read straight from the socket's buffered reader into our
    buffer (no copies, no per-block objects); anything else (chunked, or a Content-Encoding the
    server applied although we asked for identity) goes through urllib3's decoding ``read1``.
    """
    raw = response.raw
    inner = getattr(raw, "_fp", None)  # urllib3 keeps the http.client response here
    stream = getattr(inner, "fp", None)
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


@dataclass
class _Job:
    """What the attempts of one download share."""

    url: str
    part: Path
    pinned: int | None
    announced: int | None
    sink: _Sink
    progress: Progress


class HttpClient:
    """One dataset's HTTP transfers, with one session and one retry policy.

    With no ``policy``, ``RetryPolicy.from_env()`` is used (``EMDATA_READ_TIMEOUT``).
    """

    def __init__(
        self,
        dataset: str,
        *,
        policy: RetryPolicy | None = None,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.policy = policy if policy is not None else RetryPolicy.from_env()
        if session is None:
            from emdata.transport.header_deadline import HeaderDeadlineAdapter

            # requests bounds each read, not the headers as a whole (a server can trickle them forever)
            session = requests.Session()
            adapter = HeaderDeadlineAdapter(self.policy.read_timeout)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        self.session = session
        self.session.headers["User-Agent"] = USER_AGENT  # requests sets its own default: replace it
        self.sleep = sleep
        self.rng = random.Random(seed)
        self._requests = 0
        self._count_lock = threading.Lock()
        self._local = threading.local()
        self._answered: set[str] = set()  # hosts that sent at least one HTTP response

    # -- the retry loop shared by every verb --------------------------------------------------

    def _with_retries(self, url: str, attempt_once: Callable[[], Any], *, resumable: bool = False,
                      cancel: threading.Event | None = None) -> Any:
        last, status = "", None
        spent = 0.0  # seconds in tries and waits (waits as planned: tests replace ``sleep``)
        host = _netloc(url)
        for attempt in range(self.policy.attempts):
            if cancel is not None and cancel.is_set():  # another transfer of this fetch failed for good
                raise Cancelled(self.dataset, url, "stopped: another transfer of this fetch failed")
            began = time.monotonic()
            try:
                return attempt_once()
            except _Retry as exc:
                retry = exc
            except _FATAL as exc:
                raise self._fatal(url, exc) from exc
            except _TRANSIENT as exc:
                if _unresolved_host(exc):
                    host = urllib.parse.urlsplit(url).hostname or url
                    raise FetchError(self.dataset, _short_url(url), f"cannot resolve host {_clip(host, 80)}",
                                     "check the URL in params.yaml or the network") from exc
                retry = _Retry(_network_problem(exc, url, self.policy))
            last, status = str(retry), retry.status
            spent += time.monotonic() - began
            if attempt + 1 == self.policy.attempts:
                break
            wait = retry.wait if retry.wait is not None else self.policy.backoff(attempt, self.rng)
            if host not in self._answered and spent + wait + self.policy.connect_timeout > self.policy.unreachable_after:
                tries = attempt + 1
                raise FetchError(self.dataset, url, f"no answer from the host after {tries} attempt"
                                 f"{'s' if tries > 1 else ''} in {spent:.0f} s ({last})",
                                 "check the URL in params.yaml, the network or the server, then run the same "
                                 "command again" + (" to resume" if resumable else ""))
            spent += wait
            log.warning("%s: %s (%s); retry %d/%d in %.1fs", self.dataset, url, last,
                        attempt + 1, self.policy.attempts - 1, wait)
            self.sleep(wait)
        hint = "check the network or the server, then run the same command again"
        raise FetchError(self.dataset, url, f"failed after {self.policy.attempts} attempts ({last})",
                         hint + " to resume" if resumable else hint, status=status)

    def _fatal(self, url: str, exc: BaseException) -> FetchError:
        if isinstance(exc, requests.TooManyRedirects):
            problem = f"more than {self.session.max_redirects} redirects (a redirect loop?)"
        elif isinstance(exc, requests.exceptions.InvalidSchema):
            problem = f"unsupported URL scheme ({_clip(exc, 80)})"
        elif isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema)):
            problem = f"invalid URL ({_clip(exc, 80)})"
        elif isinstance(exc, (requests.exceptions.ContentDecodingError, urllib3.exceptions.DecodeError)):
            problem = "the response body could not be decoded"
        else:
            problem = f"{type(exc).__name__}: {_clip(exc, 80)}"
        return FetchError(self.dataset, url, problem, self._check_source())

    def _check_source(self) -> str:
        return f"check the URL in params.yaml (datasets.{self.dataset}.source)"

    def _check_redirect(self, url: str) -> Callable[..., requests.Response]:
        """A response hook refusing, before it is followed, a redirect to anything but http(s)."""

        def hook(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
            if response.is_redirect:
                location = response.headers["Location"]
                try:
                    target = urllib.parse.urljoin(response.url, location)
                    scheme = urllib.parse.urlsplit(target).scheme.lower()
                except ValueError as exc:  # "Invalid IPv6 URL" and the like
                    response.close()
                    raise FetchError(self.dataset, url, f"redirected to an invalid URL ({_clip(location, 80)}: "
                                     f"{_clip(exc, 60)})", self._check_source(),
                                     status=response.status_code) from exc
                if scheme not in ("http", "https"):
                    response.close()
                    raise FetchError(self.dataset, url, f"redirected to a {scheme or 'non-http'} URL "
                                     f"({_clip(target, 80)}); only http and https are followed",
                                     self._check_source(), status=response.status_code)
            return response

        return hook

    @property
    def requests(self) -> int:
        """Requests sent so far by every thread using this client (redirects followed included)."""
        with self._count_lock:
            return self._requests

    def _count(self, n: int) -> None:
        with self._count_lock:  # worker threads share one client: += alone can lose counts
            self._requests += n
        self._local.requests = getattr(self._local, "requests", 0) + n

    def _thread_requests(self) -> int:
        """Requests sent so far by the calling thread (what one download cost, with others running)."""
        return getattr(self._local, "requests", 0)

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        self._count(1)
        timeout = (self.policy.connect_timeout, self.policy.read_timeout)
        try:
            response = self.session.request(method, url, timeout=timeout,
                                            hooks={"response": [self._check_redirect(url)]}, **kwargs)
        except UnicodeError as exc:  # requests decodes a redirect's Location as UTF-8
            raise FetchError(self.dataset, _short_url(url), "redirected to a location that is not valid UTF-8 "
                             f"({_clip(str(exc), 80)})", self._check_source()) from exc
        with self._count_lock:
            self._answered.add(_netloc(url))
        self._count(len(response.history))  # each redirect followed was a request too
        status = response.status_code
        if status in RETRY_STATUS:
            wait = parse_retry_after(response.headers.get("Retry-After"))
            if wait is not None:
                wait = min(wait, self.policy.max_retry_after)
            response.close()
            raise _Retry(f"HTTP {status} {_clip(response.reason, 60)}", wait, status)
        if status >= 400 and status != 416:
            response.close()
            raise FetchError(self.dataset, url, f"HTTP {status} {_clip(response.reason, 60)}",
                             self._check_source(), status=status)
        return response

    # -- verbs --------------------------------------------------------------------------------

    def head(self, url: str) -> RemoteInfo:
        def once() -> RemoteInfo:
            with self._send("HEAD", url, allow_redirects=True) as r:
                return RemoteInfo(url, _content_length(r), r.headers.get("Accept-Ranges", "").lower() == "bytes")

        return self._with_retries(url, once)

    def probe(self, url: str) -> RemoteInfo | None:
        """``head`` that answers None for 404/410 instead of failing (does this file exist?)."""
        def once() -> RemoteInfo | None:
            try:
                with self._send("HEAD", url, allow_redirects=True) as r:
                    return RemoteInfo(url, _content_length(r), r.headers.get("Accept-Ranges", "").lower() == "bytes")
            except FetchError as exc:
                if exc.status in (404, 410):
                    return None
                raise

        return self._with_retries(url, once)

    def get_bytes(self, url: str, *, max_bytes: int = API_MAX_BYTES, accept: str | None = None,
                  cancel: threading.Event | None = None) -> bytes:
        """A small whole response (API answer, listing, image tile), at most ``max_bytes``, with retries.

        ``cancel``: checked before each attempt; once set, the next attempt raises Cancelled instead.
        """
        def once() -> bytes:
            headers = {"Accept": accept} if accept else {}
            with self._send("GET", url, headers=headers, stream=True) as r:
                announced = _content_length(r, of_body=True)
                if announced is not None and announced > max_bytes:
                    raise FetchError(self.dataset, url, f"the response announces {announced} bytes, more than "
                                     f"the {max_bytes} expected here", "check the URL in params.yaml")
                body, guard = bytearray(), _RateGuard(self.policy)
                # read1: whatever has arrived (iter_content waits for whole blocks, so a trickle
                # of one byte a second would never reach the rate check)
                while block := r.raw.read1(1 << 16, decode_content=True):
                    body += block
                    if len(body) > max_bytes:
                        raise FetchError(self.dataset, url, f"the response is longer than the {max_bytes} bytes "
                                         "expected here", "check the URL in params.yaml")
                    guard.update(len(block))
                if announced is not None and len(body) != announced:
                    raise _Retry(f"received {len(body)} of {announced} bytes")
                return bytes(body)

        return self._with_retries(url, once, cancel=cancel)

    def get_text(self, url: str, *, max_bytes: int = API_MAX_BYTES, accept: str | None = None) -> str:
        data = self.get_bytes(url, max_bytes=max_bytes, accept=accept)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FetchError(self.dataset, url, f"the response is not UTF-8 text ({exc.reason} at byte {exc.start})",
                             "check the URL in params.yaml") from exc

    def get_json(self, url: str, *, max_bytes: int = API_MAX_BYTES) -> Any:
        """A JSON answer; an HTML page or other non-JSON body is one FetchError naming the URL."""
        text = self.get_text(url, max_bytes=max_bytes, accept="application/json")
        try:
            return json.loads(text)
        except ValueError as exc:
            start = " ".join(text[:60].split())
            raise FetchError(self.dataset, url, f"the response is not JSON (it starts with {start!r})",
                             "check the API URL in params.yaml; the service may be down or have moved") from exc

    def download(self, url: str, dest: Path, *, size: int | None = None,
                 sha256: str | None = None, label: str | None = None) -> Downloaded:
        """Fetch ``url`` into ``dest`` (resuming ``dest.part``), verify it, rename it into place."""
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")
        for path in (dest, part):
            if path.is_symlink():
                raise self._symlink_error(url, path)
        start_requests = self._thread_requests()
        job = _Job(url, part, size, size, _Sink(self, url, part), Progress(size, label or dest.name))
        try:
            self._with_retries(url, lambda: self._download_once(job), resumable=True)
            got = self._part_size(url, part)
            announced = job.announced
            if announced is not None and got != announced:
                raise IntegrityError(self.dataset, url, f"received {got} bytes, expected {announced}",
                                     "the server sent a different size; check params.yaml or try later")
            digest = job.sink.digest(got) or self._hash_part(url, part)
            if sha256 is not None and digest != sha256:
                raise IntegrityError(self.dataset, url, f"sha256 {digest} does not match params.yaml ({sha256})",
                                     "the remote file changed or is corrupt; check the pinned sha256")
        except IntegrityError:
            job.sink.close()
            with contextlib.suppress(OSError):  # bad bytes must not be resumed from
                if not part.is_symlink():
                    part.unlink(missing_ok=True)
                _validator_path(part).unlink(missing_ok=True)
            raise
        finally:
            job.progress.close()
            job.sink.shutdown()
        self._sync_and_rename(url, part, dest)
        return Downloaded(dest, got, digest, self._thread_requests() - start_requests)

    # -- the pieces of a download -------------------------------------------------------------

    def _symlink_error(self, url: str, path: Path) -> FetchError:
        return FetchError(self.dataset, url, f"{path} is a symbolic link; refusing to write through it",
                          "remove it, then run the same command again")

    def _discard(self, url: str, part: Path) -> None:
        """Remove ``.part`` and its validator (the validator first: bytes never outlive their version)."""
        for path in (_validator_path(part), part):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise FetchError(self.dataset, url, f"cannot remove {path}: {exc.strerror or exc}",
                                 "check the data folder, then run the same command again") from exc

    def _keep_validator(self, url: str, part: Path, validator: str | None) -> None:
        """Write (atomically) which version of the file ``.part`` holds; None: remove the old note."""
        path = _validator_path(part)
        try:
            write_validator(part, url, validator)
        except OSError as exc:
            what = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
            raise FetchError(self.dataset, url, f"cannot write {path}: {what}",
                             "check the data folder, then run the same command again") from exc

    def _part_size(self, url: str, part: Path) -> int:
        """Bytes in ``.part`` (0 if absent); a link or a folder there is refused, never followed."""
        try:
            info = os.lstat(part)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise FetchError(self.dataset, url, f"cannot read {part}: {exc.strerror}") from exc
        if stat.S_ISLNK(info.st_mode):
            raise self._symlink_error(url, part)
        if not stat.S_ISREG(info.st_mode):
            raise FetchError(self.dataset, url, f"{part} is not a regular file",
                             "remove it, then run the same command again")
        return info.st_size

    def _hash_part(self, url: str, part: Path) -> str:
        digest = hashlib.sha256()
        try:
            fd = os.open(part, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY)
            with open(fd, "rb", buffering=0) as fh:
                while chunk := fh.read(RECV_BUFFER):
                    digest.update(chunk)
        except OSError as exc:
            raise FetchError(self.dataset, url, f"cannot read {part}: {exc.strerror or exc}") from exc
        return digest.hexdigest()

    def _sync_and_rename(self, url: str, part: Path, dest: Path) -> None:
        try:
            fd = os.open(part, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if dest.is_symlink():
                raise self._symlink_error(url, dest)
            # Before the rename: a stray validator would travel into data/raw with the folder.
            _validator_path(part).unlink(missing_ok=True)
            os.replace(part, dest)
        except OSError as exc:
            what = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
            raise FetchError(self.dataset, url, f"cannot store {dest}: {what}",
                             "check the data folder, then run the same command again") from exc

    def _too_big(self, job: _Job, what: str, size: int) -> IntegrityError:
        if job.pinned is not None:
            problem = f"the server announces {what} {size} bytes, params.yaml pins {job.pinned}"
            hint = "the remote file changed or the pinned size is wrong; check params.yaml"
        else:
            problem = f"the server announces {what} {size} bytes, earlier {job.announced}"
            hint = "the remote file changed during the download; run the same command again"
        return IntegrityError(self.dataset, job.url, problem, hint)

    def _download_once(self, job: _Job) -> None:
        url, part = job.url, job.part
        have = self._part_size(url, part)
        stored = _stored_validator(part, url) if have else None
        # Without a validator nothing tells whether these bytes are of the file served now: start over.
        if have and (stored is None or (job.announced is not None and have > job.announced)):
            self._discard(url, part)
            have = 0
        headers = {"Accept-Encoding": "identity"}
        if have and stored is not None:
            headers["Range"] = f"bytes={have}-"
            headers["If-Range"] = stored  # the file changed since: the server sends all of it (200)
        with self._send("GET", url, headers=headers, stream=True) as r:
            if r.status_code == 416:
                # Nothing left to send: the part is complete if its size is what the server holds.
                total = (_content_range(r.headers.get("Content-Range")) or (0, None))[1]
                if have and total == have:
                    if job.announced is None:
                        job.announced = total
                    return
                self._discard(url, part)
                raise _Retry("HTTP 416 for a resume; restarting from zero")
            length = _content_length(r, of_body=True)  # decoded bytes, which is what we store
            if r.status_code == 206:
                start, total = _content_range(r.headers.get("Content-Range")) or (-1, None)
                if start != have:
                    self._discard(url, part)
                    raise _Retry(f"server answered a range from {start}, asked {have}; restarting")
                if total is not None and job.announced is not None and total != job.announced:
                    raise self._too_big(job, "a total of", total)
                served = _validator(r)
                if have and served != stored:  # a server that ignored If-Range, or cannot say which version
                    self._discard(url, part)
                    raise _Retry("the file changed on the server since the partial download began; restarting"
                                 if served is not None else
                                 "the server's partial answer names no version (no ETag or Last-Modified) to "
                                 "match the partial download's; restarting")
                restart = False
            else:  # 200: the whole body, from byte 0 (the server may ignore Range)
                total = length
                if length is not None and job.announced is not None and length != job.announced:
                    raise self._too_big(job, "a body of", length)
                have, restart = 0, True
            if job.announced is None:
                job.announced = total
            if length is not None and job.announced is not None and have + length > job.announced:
                raise self._too_big(job, "a body of", length)
            job.progress.update(have - job.progress.done)  # resumed bytes count as done; a restart rewinds
            if have:
                job.sink.open(restart, have)
            else:  # a body from byte 0: its validator lands beside .part before any of its bytes
                self._keep_validator(url, part, None)  # first: old bytes never get the new validator
                job.sink.open(restart, 0)
                self._keep_validator(url, part, _validator(r))
            try:
                self._receive(job, r, have, length)
            finally:
                job.sink.close()
                job.sink.check()  # a failed write outranks whatever the network did

    def _receive(self, job: _Job, r: requests.Response, have: int, length: int | None) -> None:
        """Append the body to ``.part``, never past the announced/pinned size."""
        readinto1 = _body_reader(r)
        sink, limit = job.sink, job.announced
        end = None if length is None else have + length  # where this body ends
        pos = have
        guard = _RateGuard(self.policy)
        while True:
            # Ask for no more than this body holds; with an unknown length, for one byte past the
            # limit, so that a body running on past it is caught without writing that byte.
            if end is not None:
                want = end - pos
            elif limit is not None:
                want = limit + 1 - pos
            else:
                want = RECV_BUFFER
            if want <= 0:
                break
            view = sink.buffer()[:min(RECV_BUFFER, want)]
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
                raise IntegrityError(self.dataset, job.url, f"the server sent more than {limit} bytes",
                                     "the remote file changed or the pinned size is wrong; check params.yaml")
            if n:
                sink.append(view[:n])
                pos += n
                job.progress.update(n)
            if failure is not None:
                if isinstance(failure, OSError) and not isinstance(failure, requests.RequestException):
                    raise _Retry(_network_problem(failure, job.url, self.policy)) from failure
                raise failure
            if eof:
                break
            guard.update(n)
        if end is not None and pos < end:
            raise _Retry(f"the connection closed after {pos - have} of {length} bytes")
