"""One dataset's HTTP client: a session, one retry policy, and the verbs every HTTP source uses.

``head``/``probe`` ask about a file, ``get_bytes``/``get_text``/``get_json`` read a small whole
answer (bounded in size), ``download`` copies a file resumably (:mod:`emdata.transport.download`).
Every request goes through one retry loop (:mod:`emdata.transport.retry` says how often and how
long; a host name that does not resolve fails at once, a host that never answered is given up
within ``unreachable_after``). Redirects are followed to http and https URLs only. Every failure
is a one-line FetchError or IntegrityError naming the dataset and the URL (and, for an HTTP
answer, its ``status``). Requests are counted, per client and per thread.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import requests
from requests import Response  # the annotation inside HttpClient, whose ``requests`` is a count

from emdata.errors import Cancelled, FetchError
from emdata.transport.download import Downloaded, ResumableDownload
from emdata.transport.failures import (FATAL, TRANSIENT, clip, fatal_problem, netloc, network_problem, short_url,
                                       unresolved_host)
from emdata.transport.header_deadline import HeaderDeadlineAdapter
from emdata.transport.headers import content_length, parse_retry_after
from emdata.transport.retry import RETRY_STATUS, RateGuard, Retry, RetryPolicy

log = logging.getLogger(__name__)

USER_AGENT = "emdata (+https://github.com/emdata; research data pipeline)"
API_MAX_BYTES = 64 << 20  # cap on a whole-response read (API answers, listings, tiles)


@dataclass(frozen=True)
class RemoteInfo:
    url: str
    size: int | None
    accepts_ranges: bool


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

    def retrying(self, url: str, attempt_once: Callable[[], Any], *, resumable: bool = False,
                 cancel: threading.Event | None = None) -> Any:
        """``attempt_once()``, tried again (after a wait) when it raises Retry or a transient failure.

        ``resumable``: the hint of the final error says a later run resumes. ``cancel``: checked
        before each attempt; once set, the next attempt raises Cancelled instead.
        """
        last, status = "", None
        spent = 0.0  # seconds in tries and waits (waits as planned: tests replace ``sleep``)
        host = netloc(url)
        for attempt in range(self.policy.attempts):
            if cancel is not None and cancel.is_set():  # another transfer of this fetch failed for good
                raise Cancelled(self.dataset, url, "stopped: another transfer of this fetch failed")
            began = time.monotonic()
            try:
                return attempt_once()
            except Retry as exc:
                retry = exc
            except FATAL as exc:
                raise FetchError(self.dataset, url, fatal_problem(exc, self.session.max_redirects),
                                 self._check_source()) from exc
            except TRANSIENT as exc:
                if unresolved_host(exc):
                    host = urllib.parse.urlsplit(url).hostname or url
                    raise FetchError(self.dataset, short_url(url), f"cannot resolve host {clip(host, 80)}",
                                     "check the URL in params.yaml or the network") from exc
                retry = Retry(network_problem(exc, url, self.policy))
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
                    raise FetchError(self.dataset, url, f"redirected to an invalid URL ({clip(location, 80)}: "
                                     f"{clip(exc, 60)})", self._check_source(),
                                     status=response.status_code) from exc
                if scheme not in ("http", "https"):
                    response.close()
                    raise FetchError(self.dataset, url, f"redirected to a {scheme or 'non-http'} URL "
                                     f"({clip(target, 80)}); only http and https are followed",
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

    def thread_requests(self) -> int:
        """Requests sent so far by the calling thread (what one download cost, with others running)."""
        return getattr(self._local, "requests", 0)

    def send(self, method: str, url: str, **kwargs: Any) -> Response:
        """One request (counted); a status worth a retry raises Retry, another error status FetchError."""
        self._count(1)
        timeout = (self.policy.connect_timeout, self.policy.read_timeout)
        try:
            response = self.session.request(method, url, timeout=timeout,
                                            hooks={"response": [self._check_redirect(url)]}, **kwargs)
        except UnicodeError as exc:  # requests decodes a redirect's Location as UTF-8
            raise FetchError(self.dataset, short_url(url), "redirected to a location that is not valid UTF-8 "
                             f"({clip(str(exc), 80)})", self._check_source()) from exc
        with self._count_lock:
            self._answered.add(netloc(url))
        self._count(len(response.history))  # each redirect followed was a request too
        status = response.status_code
        if status in RETRY_STATUS:
            wait = parse_retry_after(response.headers.get("Retry-After"))
            if wait is not None:
                wait = min(wait, self.policy.max_retry_after)
            response.close()
            raise Retry(f"HTTP {status} {clip(response.reason, 60)}", wait, status)
        if status >= 400 and status != 416:
            response.close()
            raise FetchError(self.dataset, url, f"HTTP {status} {clip(response.reason, 60)}",
                             self._check_source(), status=status)
        return response

    # -- verbs --------------------------------------------------------------------------------

    def head(self, url: str) -> RemoteInfo:
        def once() -> RemoteInfo:
            with self.send("HEAD", url, allow_redirects=True) as r:
                return RemoteInfo(url, content_length(r), r.headers.get("Accept-Ranges", "").lower() == "bytes")

        return self.retrying(url, once)

    def probe(self, url: str) -> RemoteInfo | None:
        """``head`` that answers None for 404/410 instead of failing (does this file exist?)."""
        def once() -> RemoteInfo | None:
            try:
                with self.send("HEAD", url, allow_redirects=True) as r:
                    return RemoteInfo(url, content_length(r), r.headers.get("Accept-Ranges", "").lower() == "bytes")
            except FetchError as exc:
                if exc.status in (404, 410):
                    return None
                raise

        return self.retrying(url, once)

    def get_bytes(self, url: str, *, max_bytes: int = API_MAX_BYTES, accept: str | None = None,
                  cancel: threading.Event | None = None) -> bytes:
        """A small whole response (API answer, listing, image tile), at most ``max_bytes``, with retries.

        ``cancel``: checked before each attempt; once set, the next attempt raises Cancelled instead.
        """
        def once() -> bytes:
            headers = {"Accept": accept} if accept else {}
            with self.send("GET", url, headers=headers, stream=True) as r:
                announced = content_length(r, of_body=True)
                if announced is not None and announced > max_bytes:
                    raise FetchError(self.dataset, url, f"the response announces {announced} bytes, more than "
                                     f"the {max_bytes} expected here", "check the URL in params.yaml")
                body, guard = bytearray(), RateGuard(self.policy)
                # read1: whatever has arrived (iter_content waits for whole blocks, so a trickle
                # of one byte a second would never reach the rate check)
                while block := r.raw.read1(1 << 16, decode_content=True):
                    body += block
                    if len(body) > max_bytes:
                        raise FetchError(self.dataset, url, f"the response is longer than the {max_bytes} bytes "
                                         "expected here", "check the URL in params.yaml")
                    guard.update(len(block))
                if announced is not None and len(body) != announced:
                    raise Retry(f"received {len(body)} of {announced} bytes")
                return bytes(body)

        return self.retrying(url, once, cancel=cancel)

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
        return ResumableDownload(self, url, dest, size=size, label=label).run(sha256)
