"""The baseline of ``fetch_http.py --plain``: a plain write-and-hash loop in place of transport/sink.py.

Same interface as :class:`emdata.transport.sink.Sink`, none of its machinery: each received
buffer is written to ``.part`` through the page cache and hashed, one after the other, on the
receiving thread; the download's fsync at the end does the rest. A failed write is cut back
(or the part removed) as the real sink does, so the download code runs unchanged. Not part of
the package: the benchmark copies the source tree and puts this file in as ``sink.py``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

from emdata.errors import FetchError
from emdata.transport.retry import Retry

RECV_BUFFER = 4 << 20
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_BINARY = getattr(os, "O_BINARY", 0)


def symlink_error(dataset: str, url: str, path: Path) -> FetchError:
    return FetchError(dataset, url, f"{path} is a symbolic link; refusing to write through it",
                      "remove it, then run the same command again")


class Sink:
    def __init__(self, dataset: str, url: str, part: Path) -> None:
        self.dataset, self.url, self.part = dataset, url, part
        self.fd: int | None = None
        self.size = 0
        self.sha = hashlib.sha256()
        self.hashed = -1  # bytes of .part fed to sha, in order; -1: hash the file at the end
        self._buffer = memoryview(bytearray(RECV_BUFFER))
        self._failure: OSError | None = None
        self._bad_tail = False

    def open(self, restart: bool, expect: int) -> None:
        flags = os.O_WRONLY | os.O_CREAT | O_NOFOLLOW | O_CLOEXEC | O_BINARY | (os.O_TRUNC if restart else 0)
        try:
            fd = os.open(self.part, flags, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP or self.part.is_symlink():
                raise symlink_error(self.dataset, self.url, self.part) from exc
            raise self._disk_error(exc, "open") from exc
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise FetchError(self.dataset, self.url, f"{self.part} is not a regular file")
        os.lseek(fd, 0, os.SEEK_END)
        self.fd, self.size, self._failure, self._bad_tail = fd, info.st_size, None, False
        if info.st_size != expect:
            self.close()
            raise Retry(f"{self.part} changed during the request; starting again")
        if restart or self.hashed != self.size:  # an earlier run's prefix: hash it first
            self.sha, self.hashed = hashlib.sha256(), self.size
            with open(self.part, "rb") as fh:
                while chunk := fh.read(RECV_BUFFER):
                    self.sha.update(chunk)

    def buffer(self) -> memoryview:
        self.check()
        return self._buffer

    def append(self, view: memoryview) -> None:
        assert self.fd is not None
        try:
            piece = view
            while piece:
                n = os.write(self.fd, piece)
                self.size += n
                piece = piece[n:]
        except OSError as exc:
            self._failure = exc
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                self._bad_tail = True
            return
        if self.hashed >= 0:
            self.sha.update(view)
            self.hashed += len(view)

    def close(self) -> None:
        if self._failure is not None:
            self.hashed = -1
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)
            if self._bad_tail:
                self.part.unlink(missing_ok=True)

    def check(self) -> None:
        if self._failure is not None:
            raise self._disk_error(self._failure) from self._failure

    def _disk_error(self, exc: OSError, action: str = "write") -> FetchError:
        what = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
        return FetchError(self.dataset, self.url, f"cannot {action} {self.part}: {what}")

    def digest(self, size: int) -> str | None:
        return self.sha.hexdigest() if self.hashed == size else None

    def shutdown(self) -> None:
        self.close()
