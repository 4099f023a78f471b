"""One run per dataset at a time: an advisory lock file that says who holds it.

Two ``emdata fetch`` (or normalize) runs of one dataset would write the same partial folder or
temporary file. The second one stops at once with one line naming the holder (pid, command,
host), instead of both failing halfway. The kernel drops the lock when the holder dies, so a
killed run never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from emdata.errors import EmdataError


class LockedError(EmdataError):
    """Another run holds the dataset's lock."""

    exit_code = 9


@contextmanager
def dataset_lock(folder: Path, key: str, action: str) -> Iterator[None]:
    """Hold ``folder/<key>.lock``. Callers first check that no folder above it is a link
    (:func:`emdata.stages.workspace.refuse_dataset_links`); the folder and the file are checked here too,
    before anything is created."""
    path = folder / f"{key}.lock"
    for link in (folder, path):
        if link.is_symlink():
            raise LockedError(f"{key}: {link} is a symbolic link; remove it (emdata never writes through links)")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise LockedError(f"{key}: cannot open the lock file {path} ({exc.strerror}); check the folder") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"{key}: another emdata run holds {path} ({_holder(fd)}); "
                              f"wait for it to finish, or stop it and run again") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "action": action, "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}, {info['action']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
