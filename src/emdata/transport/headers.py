"""What a response's headers say, read strictly: numbers in ASCII digits, anything else is absent.

A server's headers are input like any other: a ``Content-Length`` of ``²`` or a ``Content-Range``
with Arabic-Indic digits is no number (``int()`` would accept both), so it is treated as missing.
"""

from __future__ import annotations

import email.utils
import re
import time

import requests

from emdata.core.numbers import ascii_int


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


def content_range(value: str | None) -> tuple[int | None, int | None] | None:
    """(start, total) from ``bytes start-end/total`` or a 416's ``bytes */total`` (start None)."""
    match = re.fullmatch(r"bytes (?:([0-9]{1,30})-[0-9]{1,30}|\*)/([0-9]{1,30}|\*)", (value or "").strip())
    if not match:
        return None
    start = None if match.group(1) is None else int(match.group(1))
    total = None if match.group(2) == "*" else int(match.group(2))
    return start, total


def content_length(response: requests.Response, *, of_body: bool = False) -> int | None:
    """The Content-Length; ``of_body``: None when a Content-Encoding makes it the encoded size."""
    value = response.headers.get("Content-Length", "").strip()
    if of_body and response.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
        return None
    return ascii_int(value)


def version_of(response: requests.Response) -> str | None:
    """What identifies the version of the file a response carries, for ``If-Range``: its ETag
    unless weak (``W/``, which If-Range must not carry), else its Last-Modified date, else None."""
    etag = response.headers.get("ETag", "").strip()
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified", "").strip() or None
