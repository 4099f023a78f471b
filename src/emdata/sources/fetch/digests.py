"""Group digests: one sha256 that stands for many files, written by sources and checked by ``verify``.

The one convention: a group digest is the sha256 of the lines ``<relpath> <size> <sha256>\\n`` of
its files (relpath in the raw folder, size in bytes, the file's sha256 in hex), sorted. A fetch
record keeps its groups in ``extra["array_digests"]`` as ``{url: digest}``; the files of a group
are the record's files whose URL lies under that URL (``url + "/"``), so the record alone says
which files each digest covers. ``ome_zarr_s3`` writes one per zarr array; normalize's
``source_checksums`` digest several files behind one URL the same way.

Not group digests in this sense: ``extra["sources"]`` (an archive's bytes, or a local folder's
manifest in its own pinned format), which cannot be recomputed from the raw folder.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Mapping

from emdata.sources.fetch.record import FetchedFile, FetchRecord

GROUPS = "array_digests"  # the record's extra key holding {url: group digest}


def group_digest(files: Iterable[tuple[str, FetchedFile]]) -> str:
    """The digest of ``(relpath, file)`` pairs: sha256 over their sorted ``relpath size sha256`` lines."""
    lines = sorted(f"{rel} {f.size} {f.sha256}\n" for rel, f in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def files_under(files: Mapping[str, FetchedFile], url: str) -> dict[str, FetchedFile]:
    """The files whose URL lies under ``url`` (a folder: ``s3://b/a`` holds ``s3://b/a/0``, not ``s3://b/ab``)."""
    prefix = url.rstrip("/") + "/"
    return {rel: f for rel, f in files.items() if f.url.startswith(prefix)}


def group_digests(files: Mapping[str, FetchedFile], urls: Iterable[str]) -> dict[str, str]:
    """``{url: group digest}`` of the files under each URL, for a record's ``extra["array_digests"]``."""
    return {url: group_digest(files_under(files, url).items()) for url in urls}


def recorded_groups(record: FetchRecord) -> dict[str, str]:
    """The record's ``{url: group digest}`` (empty when it has none or it is not a mapping)."""
    groups = record.extra.get(GROUPS)
    return dict(groups) if isinstance(groups, dict) else {}


def group_problems(record: FetchRecord, on_disk: Mapping[str, str | None]) -> list[str]:
    """What is wrong with each group digest of ``record``, one line each naming its URL.

    Each is recomputed from the record's per-file sha256 (a mismatch: the record was edited) and
    from ``on_disk``, the sha256 of each file as it is now (a mismatch: a file of the group changed).
    """
    groups = record.extra.get(GROUPS, {})
    if not isinstance(groups, dict):
        return [f"extra.{GROUPS} is not a mapping of URL to group digest (source.json was edited after the fetch)"]
    found = []
    for url, recorded in sorted(groups.items()):
        members = files_under(record.files, url)
        as_recorded = group_digest(members.items())
        if as_recorded != recorded:
            found.append(f"{url}: the record's group digest {recorded} differs from {as_recorded}, the digest of "
                         f"its {len(members)} recorded files (source.json was edited after the fetch)")
            continue
        changed = sorted(rel for rel, f in members.items() if on_disk.get(rel) != f.sha256)
        if changed:
            now = group_digest((rel, FetchedFile(f.url, f.size, on_disk.get(rel))) for rel, f in members.items())
            found.append(f"{url}: its files on disk digest to {now}, the record says {recorded} "
                         f"({len(changed)} of {len(members)} files changed, first {changed[0]})")
    return found
