"""What went wrong with a request, in a few words, and whether another try can cure it.

requests wraps urllib3, which wraps the socket; their own messages run to 300 characters. The
client's error lines name the cause found in that chain instead (refused, timed out, reset, cut
mid-response, TLS), and a URL or a server's text is clipped so the line stays one line.
"""

from __future__ import annotations

import http.client
import socket
import urllib.parse
from typing import Iterator

import requests
import urllib3

from emdata.transport.retry import READ_TIMEOUT_ENV, RetryPolicy

# Requests failures that no retry can cure: a bad URL or scheme, a redirect loop, a body that
# cannot be decoded. Checked before the retried ones (every requests exception is an OSError).
FATAL = (requests.TooManyRedirects, requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL,
         requests.exceptions.MissingSchema, requests.exceptions.InvalidHeader,
         requests.exceptions.ContentDecodingError, requests.exceptions.StreamConsumedError,
         requests.exceptions.RetryError, requests.exceptions.InvalidJSONError, urllib3.exceptions.DecodeError)
TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
             urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)


def clip(text: object, limit: int = 100) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_url(url: str, limit: int = 90) -> str:
    """``scheme://host/…/name`` when a URL is long: the host and the file still say which it is."""
    if len(url) <= limit:
        return url
    parts = urllib.parse.urlsplit(url)
    name = parts.path.rstrip("/").rsplit("/", 1)[-1]
    return clip(f"{parts.scheme}://{parts.netloc}/…/{name}", limit)


def netloc(url: str) -> str:
    try:
        return urllib.parse.urlsplit(url).netloc
    except ValueError:  # a malformed URL: requests says what is wrong with it
        return url


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps (requests -> urllib3 -> socket), breadth first, each once."""
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo and len(seen) < 32:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = (getattr(current, "reason", None), current.__cause__, current.__context__, *current.args)
        todo.extend(x for x in linked if isinstance(x, BaseException))


def unresolved_host(exc: BaseException) -> bool:
    return any(isinstance(e, (urllib3.exceptions.NameResolutionError, socket.gaierror)) for e in causes(exc))


def network_problem(exc: BaseException, url: str, policy: RetryPolicy) -> str:
    """A short reason for a transport failure (urllib3's own messages run to 300 characters)."""
    host = urllib.parse.urlsplit(url).netloc or url
    for e in causes(exc):
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
            return f"TLS error ({clip(e, 80)})"
    for e in causes(exc):
        if isinstance(e, OSError) and e.strerror:
            return f"{host}: {clip(e.strerror, 80)}"
    return f"{type(exc).__name__}: {clip(exc, 80)}"


def fatal_problem(exc: BaseException, max_redirects: int) -> str:
    """A short reason for one of the FATAL failures."""
    if isinstance(exc, requests.TooManyRedirects):
        return f"more than {max_redirects} redirects (a redirect loop?)"
    if isinstance(exc, requests.exceptions.InvalidSchema):
        return f"unsupported URL scheme ({clip(exc, 80)})"
    if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema)):
        return f"invalid URL ({clip(exc, 80)})"
    if isinstance(exc, (requests.exceptions.ContentDecodingError, urllib3.exceptions.DecodeError)):
        return "the response body could not be decoded"
    return f"{type(exc).__name__}: {clip(exc, 80)}"
