"""Verified, resumable HTTP downloads shared by every HTTP source.

A download streams to ``<dest>.part``. When the connection drops, the next attempt asks for the
rest with a ``Range`` request, so bytes already on disk are never fetched twice (also across
runs: a later ``emdata fetch`` resumes the same ``.part``). Connection errors, 429 and 5xx are
retried a bounded number of times with exponential backoff and jitter, honouring ``Retry-After``.
The finished file is checked against the size the server announced and the size and sha256
pinned in params.yaml, then renamed into place. Every failure is a FetchError or IntegrityError
naming the dataset and the URL.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import requests
import urllib3

from ..errors import FetchError, IntegrityError
from ..progress import Progress

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
BLOCK = 1 << 20
USER_AGENT = "emdata (+https://github.com/emdata; research data pipeline)"


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds for one request: how often, how long to wait, how long to wait for bytes."""

    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 120.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Exponential backoff with equal jitter: half fixed, half random."""
        delay = min(self.max_delay, self.base_delay * (2 ** attempt))
        return delay / 2 + rng.uniform(0, delay / 2)


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


def sha256_file(path: Path, block: int = 8 * BLOCK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _content_range(value: str | None) -> tuple[int | None, int | None] | None:
    """(start, total) from ``bytes start-end/total`` or a 416's ``bytes */total`` (start None)."""
    match = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", (value or "").strip())
    if not match:
        return None
    start = None if match.group(1) is None else int(match.group(1))
    total = None if match.group(2) == "*" else int(match.group(2))
    return start, total


class _Retry(Exception):
    """Internal: this attempt failed in a way worth another try."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait


class HttpClient:
    """One dataset's HTTP transfers, with one session and one retry policy."""

    def __init__(
        self,
        dataset: str,
        *,
        policy: RetryPolicy = RetryPolicy(),
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.policy = policy
        self.session = session or requests.Session()
        self.session.headers.setdefault("User-Agent", USER_AGENT)
        self.sleep = sleep
        self.rng = random.Random(seed)
        self.requests = 0

    # -- the retry loop shared by every verb --------------------------------------------------

    def _with_retries(self, url: str, attempt_once: Callable[[], Any]) -> Any:
        last = ""
        for attempt in range(self.policy.attempts):
            try:
                return attempt_once()
            except _Retry as exc:
                retry = exc
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    urllib3.exceptions.HTTPError) as exc:
                retry = _Retry(f"{type(exc).__name__}: {exc}")
            last = str(retry)
            if attempt + 1 == self.policy.attempts:
                break
            wait = retry.wait if retry.wait is not None else self.policy.backoff(attempt, self.rng)
            log.warning("%s: %s (%s); retry %d/%d in %.1fs", self.dataset, url, last,
                        attempt + 1, self.policy.attempts - 1, wait)
            self.sleep(wait)
        raise FetchError(self.dataset, url, f"failed after {self.policy.attempts} attempts ({last})",
                         "check the network or the server, then run the same command again to resume")

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        self.requests += 1
        timeout = (self.policy.connect_timeout, self.policy.read_timeout)
        response = self.session.request(method, url, timeout=timeout, **kwargs)
        if response.status_code in RETRY_STATUS:
            wait = parse_retry_after(response.headers.get("Retry-After"))
            if wait is not None:
                wait = min(wait, self.policy.max_retry_after)
            response.close()
            raise _Retry(f"HTTP {response.status_code} {response.reason}", wait)
        if response.status_code >= 400 and response.status_code != 416:
            response.close()
            raise FetchError(self.dataset, url, f"HTTP {response.status_code} {response.reason}",
                             "check the URL in params.yaml (datasets.<name>.source)")
        return response

    # -- verbs --------------------------------------------------------------------------------

    def head(self, url: str) -> RemoteInfo:
        def once() -> RemoteInfo:
            with self._send("HEAD", url, allow_redirects=True) as r:
                size = r.headers.get("Content-Length")
                return RemoteInfo(url, int(size) if size and size.isdigit() else None,
                                  r.headers.get("Accept-Ranges", "").lower() == "bytes")

        return self._with_retries(url, once)

    def get_json(self, url: str) -> Any:
        def once() -> Any:
            with self._send("GET", url, headers={"Accept": "application/json"}) as r:
                try:
                    return r.json()
                except ValueError as exc:
                    raise FetchError(self.dataset, url, "the response is not JSON",
                                     "check the API URL in params.yaml") from exc

        return self._with_retries(url, once)

    def download(self, url: str, dest: Path, *, size: int | None = None,
                 sha256: str | None = None, label: str | None = None) -> Downloaded:
        """Fetch ``url`` into ``dest`` (resuming ``dest.part``), verify it, rename it into place."""
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")
        start_requests = self.requests
        state = {"announced": size}
        progress = Progress(size, label or dest.name)
        try:
            self._with_retries(url, lambda: self._download_once(url, part, state, progress))
        finally:
            progress.close()
        got = part.stat().st_size
        announced = state["announced"]
        try:
            if announced is not None and got != announced:
                raise IntegrityError(self.dataset, url, f"received {got} bytes, expected {announced}",
                                     "the server sent a different size; check params.yaml or try later")
            digest = sha256_file(part)
            if sha256 is not None and digest != sha256:
                raise IntegrityError(self.dataset, url, f"sha256 {digest} does not match params.yaml ({sha256})",
                                     "the remote file changed or is corrupt; check the pinned sha256")
        except IntegrityError:
            part.unlink(missing_ok=True)  # bad bytes must not be resumed from
            raise
        with open(part, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(part, dest)
        return Downloaded(dest, got, digest, self.requests - start_requests)

    def _download_once(self, url: str, part: Path, state: dict, progress: Progress) -> None:
        have = part.stat().st_size if part.exists() else 0
        expected = state["announced"]
        if expected is not None and have > expected:
            part.unlink()
            have = 0
        headers = {"Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        with self._send("GET", url, headers=headers, stream=True) as r:
            if r.status_code == 416:
                # Nothing left to send: the part is complete if its size is what the server holds.
                total = (_content_range(r.headers.get("Content-Range")) or (0, None))[1]
                if have and total == have:
                    state["announced"] = expected if expected is not None else total
                    return
                part.unlink(missing_ok=True)
                raise _Retry("HTTP 416 for a resume; restarting from zero")
            if r.status_code == 206:
                start, total = _content_range(r.headers.get("Content-Range")) or (-1, None)
                if start != have:
                    part.unlink(missing_ok=True)
                    raise _Retry(f"server answered a range from {start}, asked {have}; restarting")
                mode = "ab"
            else:  # 200: the whole body, from byte 0 (the server may ignore Range)
                length = r.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                have, mode = 0, "wb"
            if state["announced"] is None:
                state["announced"] = total
            progress.update(have - progress.done)  # resumed bytes count as done; a restart rewinds
            with open(part, mode) as fh:
                # read1 hands over whatever arrived, so a dropped connection loses no byte
                # already received: the next attempt resumes exactly where this one stopped.
                while block := r.raw.read1(BLOCK, decode_content=True):
                    fh.write(block)
                    progress.update(len(block))
