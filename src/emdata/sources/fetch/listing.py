"""Folders served as an HTTP index page (Apache autoindex, as the EBI mirrors serve them).

:func:`parse_listing` reads the direct children a page links to, :func:`list_tree` walks a folder
recursively, and :func:`missing_in_series` names what a numbered series of files lacks (a listing
was seen to leave out a file the server still answers for).
"""

from __future__ import annotations

import html
import itertools
import re
import urllib.parse

from emdata.errors import FormatError
from emdata.sources.fetch.context import FetchContext

MAX_DEPTH = 16
_HREF = re.compile(r"""href\s*=\s*(?:"([^"]*)"|'([^']*)')""", re.IGNORECASE)


def parse_listing(page: str) -> tuple[list[str], list[str]]:
    """(files, folders) linked from an Apache autoindex page: direct children only, unquoted."""
    files, folders = [], []
    for match in _HREF.finditer(page):
        href = html.unescape(match.group(1) if match.group(1) is not None else match.group(2))
        href = href.split("?", 1)[0].split("#", 1)[0]
        if not href or href.startswith(("/", ".")) or ":" in href:
            continue  # sort links, the parent folder, absolute links
        name = urllib.parse.unquote(href)
        if name.endswith("/") and "/" not in name[:-1]:
            folders.append(name[:-1])
        elif "/" not in name:
            files.append(name)
    return sorted(set(files)), sorted(set(folders))


def child_url(folder_url: str, name: str) -> str:
    """The URL of ``name`` (a file, or a folder when it ends in ``/``) inside ``folder_url``."""
    return urllib.parse.urljoin(folder_url, urllib.parse.quote(name))


def list_tree(ctx: FetchContext, url: str, prefix: str, out: list[tuple[str, str]], depth: int = 0) -> int:
    """Every file under ``url`` as (relpath, url) appended to ``out``; returns the listing requests."""
    if depth > MAX_DEPTH:
        raise FormatError(ctx.dataset, url, f"folders nest more than {MAX_DEPTH} deep", "check source.include_folders")
    files, folders = parse_listing(ctx.http.get_text(url))
    out += [(prefix + name, child_url(url, name)) for name in files]
    requests = 1
    for folder in folders:
        requests += list_tree(ctx, child_url(url, folder + "/"), f"{prefix}{folder}/", out, depth + 1)
    return requests


def _numbered(names: list[str]) -> tuple[str, int, str, list[int]] | None:
    """(prefix, zero-padded width or 0, suffix, numbers) when the names are one numbered series."""
    parts = [re.fullmatch(r"(.*?)([0-9]+)([^0-9.]*(?:\..*)?)", n) for n in names]
    if not parts or any(p is None for p in parts):
        return None
    keys = {(p.group(1), p.group(3)) for p in parts if p}
    if len(keys) != 1:
        return None
    prefix, suffix = keys.pop()
    digits = [p.group(2) for p in parts if p]
    widths = {len(d) for d in digits}
    width = widths.pop() if len(widths) == 1 and any(d.startswith("0") for d in digits) else 0
    return prefix, width, suffix, sorted(int(d) for d in digits)


def missing_in_series(names: list[str], count: int) -> list[str]:
    """Names a numbered series of ``count`` lacks, from its first number on; then those before it.

    At most ``count`` of them: a sparse series (``_0`` and ``_999999999``) would name far more.
    """
    series = _numbered(names)
    if series is None or len(names) >= count:
        return []
    prefix, width, suffix, numbers = series
    have, lo = set(numbers), numbers[0]
    expected = (n for n in range(lo, max(lo + count, numbers[-1] + 1)) if n not in have)
    before = (n for n in range(lo - 1, lo - 1 - (count - len(names)), -1) if n >= 0)
    return [f"{prefix}{n:0{width}d}{suffix}" for n in itertools.islice(itertools.chain(expected, before), count)]
