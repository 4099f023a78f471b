"""What ``plan`` and ``fetch`` of every source receive: one transport-neutral fetch context.

It carries the dataset, the folder to write into (``data/raw/.partial/<ds>/``, kept across
interruptions so the next run resumes), the retry policy, a lazily built HTTP client
(:mod:`emdata.transport.client`), and the bounded-retry context for tensorstore (an S3 source
builds its :class:`emdata.transport.s3.S3Folder` over this context). Work on many files or
chunks goes through :meth:`map`, a bounded worker pool. Nothing here knows a source: a source
asks for the transport it needs.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from emdata.core.numbers import ascii_int
from emdata.core.progress import Progress
from emdata.errors import Cancelled, ConfigError, FetchError
from emdata.formats.raw import json_safe
from emdata.sources.fetch.record import FetchedFile, FetchRecord, plain_spec, safe_relpath
from emdata.transport.client import HttpClient
from emdata.transport.retry import RetryPolicy

T = TypeVar("T")
R = TypeVar("R")
DEFAULT_WORKERS = 4


@dataclass
class FetchContext:
    dataset: str
    kind: str
    spec: dict[str, Any]
    dest: Path  # where fetch writes: the partial folder, renamed into data/raw/<ds> when complete
    policy: RetryPolicy | None = None
    workers: int = DEFAULT_WORKERS
    http_factory: Callable[[], HttpClient] | None = None  # tests inject fast-retry clients here
    _http: HttpClient | None = field(default=None, repr=False)
    other_requests: int = 0  # requests a source sent through its own transport (S3, tensorstore)
    _folders: set[Path] = field(default_factory=set, repr=False)  # folders path() made and checked
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    # -- transports ---------------------------------------------------------------------------

    @property
    def http(self) -> HttpClient:
        """The dataset's HTTP client (one session, one retry policy), built on first use.

        Under a lock: the workers of :meth:`map` may ask at once, and two clients would each count
        only their own requests."""
        with self._lock:
            if self._http is None:
                if self.http_factory is not None:
                    self._http = self.http_factory()
                else:
                    self._http = HttpClient(self.dataset, policy=self.policy)  # None: RetryPolicy.from_env()
            return self._http

    @property
    def requests(self) -> int:
        """Requests sent so far: through the HTTP client, plus those a source counted in ``other_requests``."""
        return (self._http.requests if self._http is not None else 0) + self.other_requests

    @property
    def retry_policy(self) -> RetryPolicy:
        """This fetch's retry policy: the explicit one, else the (injected) HTTP client's, else the environment's."""
        if self.policy is not None:
            return self.policy
        if self.http_factory is not None or self._http is not None:
            return self.http.policy
        return RetryPolicy.from_env()

    def tensorstore_context(self) -> dict[str, Any]:
        """A tensorstore ``context`` with bounded HTTP and S3 retries (unbounded ones hang for minutes)."""
        policy = self.retry_policy
        # tensorstore's max_retries is the number of tries; it has no request timeout of its own, so
        # callers bound each operation with ``future.result(timeout=...)``, and a stalled transfer
        # (under 1 byte/s for the read timeout) is cut by curl's low-speed watchdog, which tensorstore
        # configures from the environment when it makes its first HTTP request in this process.
        # Public data: no credentials.
        os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", str(max(1, math.ceil(policy.read_timeout))))
        os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "1")
        retries = {"max_retries": max(1, policy.attempts), "initial_delay": f"{policy.base_delay}s",
                   "max_delay": f"{policy.max_delay}s"}
        limit = {"limit": max(1, self.workers)}
        return {"http_request_retries": retries, "s3_request_retries": retries, "aws_credentials": {"type": "anonymous"},
                "http_request_concurrency": limit, "s3_request_concurrency": limit}

    # -- files ---------------------------------------------------------------------------------

    def path(self, relpath: str) -> Path:
        """Where a file of this dataset goes; the folder is created, symlinks are refused."""
        name = safe_relpath(relpath, f"{self.dataset}: file name")
        target = self.dest / name
        parent = target.parent
        if parent not in self._folders:  # thousands of zarr chunks share a few folders: check each once
            parent.mkdir(parents=True, exist_ok=True)
            for folder in (parent, *parent.relative_to(self.dest).parents):
                if (self.dest / folder).is_symlink():
                    raise FetchError(self.dataset, str(self.dest / folder), "is a symbolic link",
                                     f"remove it; emdata writes only real folders under data/raw/.partial/{self.dataset}")
            self._folders.add(parent)
        if target.is_symlink():
            raise FetchError(self.dataset, str(target), "is a symbolic link",
                             "remove it; emdata never writes through links it did not create")
        return target

    def record(self, files: dict[str, FetchedFile], extra: dict[str, Any] | None = None) -> FetchRecord:
        """The fetch record a source returns from ``fetch`` (``extra`` made JSON-plain)."""
        return FetchRecord(self.dataset, self.kind, plain_spec(self.spec),
                           {safe_relpath(k): v for k, v in files.items()}, json_safe(extra or {}))

    # -- work ----------------------------------------------------------------------------------

    def map(self, fn: Callable[[T], R], items: Iterable[T], *, cancel: threading.Event | None = None) -> list[R]:
        """``fn`` over ``items`` on at most ``workers`` threads, results in order; the first error wins.

        After an error the items not yet started are cancelled (those running finish), so a dead
        server costs one item's retries, not every item's. With ``cancel``, the failing item sets
        it before its worker is free, no item starts once it is set, and work that checks it (the
        HTTP client's ``get_bytes(cancel=)`` does, before each attempt) stops at its next attempt:
        after a failure each other worker sends at most the request it has in flight.
        """
        items = list(items)
        if self.workers <= 1 or len(items) <= 1:
            return [fn(item) for item in items]
        run = fn if cancel is None else _cancelling(fn, cancel, self.dataset)
        with ThreadPoolExecutor(min(self.workers, len(items)), thread_name_prefix="emdata-fetch") as pool:
            futures = [pool.submit(run, item) for item in items]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            finally:  # an item failed (or we were interrupted): start no more, stop what checks cancel
                if cancel is not None and not all(future.done() for future in futures):
                    cancel.set()
                for future in futures:
                    future.cancel()  # a no-op for finished and running ones
            wait(futures)  # the running ones finish (as leaving the pool would wait for them anyway)
            # The first failed item's error, in item order; never that of an item another's failure stopped.
            failed = [error for f in futures if not f.cancelled() and (error := f.exception()) is not None]
            if failed:
                raise next((e for e in failed if not isinstance(e, Cancelled)), failed[0])
            return [future.result() for future in futures]

    def progress(self, total: int | None, desc: str, unit: str = "B") -> Progress:
        return Progress(total, f"{self.dataset}: {desc}", unit=unit)


def _cancelling(fn: Callable[[T], R], cancel: threading.Event, dataset: str) -> Callable[[T], R]:
    """``fn`` that does not start once ``cancel`` is set, and sets it when it fails."""

    def run(item: T) -> R:
        if cancel.is_set():
            raise Cancelled(dataset, "fetch", "not started: another transfer of this fetch failed")
        try:
            return fn(item)
        except BaseException:
            cancel.set()  # before this worker takes the next item
            raise

    return run


def workers_from_env(default: int = DEFAULT_WORKERS) -> int:
    """``EMDATA_FETCH_WORKERS`` (1-64), or the default."""
    value = os.environ.get("EMDATA_FETCH_WORKERS")
    if not value:
        return default
    number = ascii_int(value)
    if number is None or not 1 <= number <= 64:
        raise ConfigError(f"EMDATA_FETCH_WORKERS={value!r}: expected an integer from 1 to 64")
    return number
