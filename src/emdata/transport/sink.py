"""The ``.part`` file of one download: received bytes go to disk and to sha256 at once.

The body is received into a few reusable, page-aligned buffers. While the next buffer fills, one
worker thread appends the last one to ``.part`` and another computes its sha256 (both release the
GIL), so the file is never read back, except to hash the prefix that an earlier run left in
``.part``. The aligned bulk is written with ``O_DIRECT`` where the file system allows it: no
page-cache copy and nothing left for the final fsync (the file is then not in the page cache
afterwards). Elsewhere writes go through the page cache and a third worker starts the write-back
as the file grows.

Why not one plain loop (write, hash, fsync at the end; ``benchmarks/plain_sink.py``): for 1 GiB
from nginx on loopback, ``benchmarks/fetch_http.py`` measured it at 0.25-0.44x curl's speed and
this sink at 0.75-1.30x, in the same runs (benchmarks/README.md, "fetch_http").

Why it writes ``.part`` itself and not through :func:`emdata.core.atomic.atomic_output`: a
``.part`` is a resumable partial download, not a temporary. It outlives a failed attempt and the
process (a later run resumes it by ``Range``), so its name has no pid and an error keeps it;
:mod:`emdata.transport.download` flushes and renames it when it is complete and verified.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no O_DIRECT either
    fcntl = None  # type: ignore[assignment]

from emdata.errors import FetchError
from emdata.transport.retry import Retry

RECV_BUFFER = 4 << 20  # one receive buffer; they rotate between receiving, writing and hashing
RECV_BUFFERS = 6
ALIGN = 4096  # O_DIRECT alignment of memory, file offsets and lengths
DIRECT_IO = True  # write the aligned bulk of a download with O_DIRECT where the file system allows
FLUSH_EVERY = 64 << 20  # without O_DIRECT: start the write-back after this many new bytes
# .part is opened without following a symbolic link; O_BINARY matters on Windows only
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_BINARY = getattr(os, "O_BINARY", 0)
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def symlink_error(dataset: str, url: str, path: Path) -> FetchError:
    return FetchError(dataset, url, f"{path} is a symbolic link; refusing to write through it",
                      "remove it, then run the same command again")


class Sink:
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

    def __init__(self, dataset: str, url: str, part: Path) -> None:
        self.dataset, self.url, self.part = dataset, url, part
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
        flags = os.O_WRONLY | os.O_CREAT | O_NOFOLLOW | O_CLOEXEC | O_BINARY | (os.O_TRUNC if restart else 0)
        try:
            fd = os.open(self.part, flags, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP or self.part.is_symlink():
                raise symlink_error(self.dataset, self.url, self.part) from exc
            raise self._disk_error(exc, "open") from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise FetchError(self.dataset, self.url, f"{self.part} is not a regular file",
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
            raise Retry(f"{self.part} changed during the request; starting again")
        if restart or self.hashed != self.size:
            self.sha, self.hashed = hashlib.sha256(), self.size
            if self.size:
                self._prefix = self._hasher.submit(self._hash_prefix, self.sha, self.size)

    def _hash_prefix(self, sha: Any, size: int) -> None:
        fd = os.open(self.part, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_BINARY)
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
        fd = self.fd
        assert fd is not None
        jobs = self._pending[self._slot]
        jobs.append(self._writer.submit(self._write, fd, view, self.queued))
        if self.hashed >= 0:
            jobs.append(self._hasher.submit(self.sha.update, view))
            self.hashed += len(view)
        self.queued += len(view)
        self._slot = (self._slot + 1) % RECV_BUFFERS
        if not self._direct_ok and self.queued - self._flushed_at >= FLUSH_EVERY and (
                self._flush is None or self._flush.done()):
            self._note_flush_failure()
            self._flush = self._flusher.submit(os.fdatasync if hasattr(os, "fdatasync") else os.fsync, fd)
            self._flushed_at = self.queued

    def _write(self, fd: int, view: memoryview, offset: int) -> None:
        """Writer thread: append ``view`` at ``offset``, the aligned middle with O_DIRECT."""
        if self._failure is not None:
            return  # after a failed write nothing else may land in the file
        head = min(len(view), -offset % ALIGN)
        bulk = (len(view) - head) // ALIGN * ALIGN if self._direct_ok else 0
        try:
            for piece, direct in ((view[:head], False), (view[head:head + bulk], True),
                                  (view[head + bulk:], False)):
                while piece:
                    if direct != self.direct and not self._set_direct(fd, direct):
                        direct = False
                    try:
                        n = os.write(fd, piece)
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
                if os.fstat(fd).st_size != self.size:
                    os.ftruncate(fd, self.size)
            except OSError:
                self._bad_tail = True

    def _set_direct(self, fd: int, on: bool) -> bool:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT if on else flags & ~_O_DIRECT)
        except OSError:
            if on:
                self._direct_ok = False
                return False
            raise
        self.direct = on
        return True

    def _note_flush_failure(self) -> None:
        """A failed write-back (fdatasync raises OSError only) counts as a failed write."""
        error = self._flush.exception() if self._flush is not None else None
        if isinstance(error, OSError) and self._failure is None:
            self._failure = error

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
        self._note_flush_failure()
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
        return FetchError(self.dataset, self.url, f"cannot {action} {self.part}: {what}", hint)

    # -- the whole download -----------------------------------------------------------------

    def digest(self, size: int) -> str | None:
        return self.sha.hexdigest() if self.hashed == size else None

    def shutdown(self) -> None:
        self.close()
        self._hasher.shutdown()
        self._writer.shutdown()
        self._flusher.shutdown()
        self._buffers = {}
