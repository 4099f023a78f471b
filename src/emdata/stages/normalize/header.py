"""What a canonical HDF5 says about itself: the root attributes and the ``/provenance`` group.

Shared by the volume and the collection writers (a collection replaces a few root attributes,
see :mod:`emdata.stages.normalize.collection`).
"""

from __future__ import annotations

import json
from typing import Any

from emdata import __version__
from emdata.core.geometry import Geometry
from emdata.formats.raw import json_safe
from emdata.h5 import hdf5
from emdata.params.config import Config
from emdata.sources.fetch.digests import group_digest
from emdata.sources.fetch.record import FetchedFile, FetchRecord
from emdata.sources.dataset import Dataset

MAX_SOURCE_ENTRIES = 64  # root attributes live in the object header (64 KiB in all): keep the lists bounded


def source_entries(files: dict[str, FetchedFile]) -> dict[str, str | None]:
    """URL -> sha256 for the root attributes ``source_urls``/``source_checksums``, at most 64 entries.

    One entry per distinct URL, in the order of the files' relative paths: the file's sha256, or,
    when one URL stands for several local files (a decoded chunk store), the sha256 of their
    group digest (:mod:`emdata.sources.fetch.digests`). Beyond 64 URLs (a copy of
    thousands of objects), URLs are folded into their parent folders until they fit. The full
    per-file list is always in ``/provenance/source_record``.
    """
    groups: dict[str, list[tuple[str, FetchedFile]]] = {}
    for rel, f in sorted(files.items()):
        groups.setdefault(f.url, []).append((rel, f))
    while len(groups) > MAX_SOURCE_ENTRIES:
        folded: dict[str, list[tuple[str, FetchedFile]]] = {}
        for url, items in groups.items():
            folded.setdefault(_parent_url(url), []).extend(items)
        if len(folded) == len(groups):
            break
        groups = folded
    return {url: items[0][1].sha256 if len(items) == 1 else group_digest(items) for url, items in groups.items()}


def _parent_url(url: str) -> str:
    """``https://h/a/b/c`` -> ``https://h/a/b/``; a host's root stays itself."""
    head, sep, path = url.partition("://")
    host, slash, rest = path.partition("/")
    parts = rest.rstrip("/").split("/")
    if not sep or not slash or parts == [""]:
        return url
    return f"{head}://{host}/" + "".join(p + "/" for p in parts[:-1])


def root_attrs(cfg: Config, ds: Dataset, record: FetchRecord, geometry: Geometry,
               description: dict[str, Any]) -> dict[str, Any]:
    """The root attributes of a dataset's HDF5, in the order they are written."""
    entries = source_entries(record.files)
    return {
        "emdata_version": __version__,
        "format_version": hdf5.FORMAT_VERSION,
        "dataset": ds.key,
        "title": ds.title,
        "license": ds.license,
        "citation": ds.citation,
        "accession": ds.accession or "",
        "doi": ds.doi or "",
        "modality": ds.modality,
        "source_kind": ds.source_kind,
        "source_urls": json.dumps(list(entries)),
        "source_checksums": json.dumps(entries, sort_keys=True),
        "params": json.dumps({"dataset": json_safe(ds.raw_params), "normalize": cfg.normalize.to_dict()},
                             sort_keys=True),
        "geometry_origin": json.dumps(geometry.origin, sort_keys=True),
        "description": json.dumps(description, sort_keys=True),
    }


def source_metadata(ds: Dataset) -> tuple[Any, dict[str, Any]]:
    """The source's native metadata (for ``/provenance``) and its description (a root attribute)."""
    params, raw = ds.source, ds.paths.raw
    native = json_safe(ds.module.read_metadata(params, raw, ds.key))
    describe = getattr(ds.module, "describe", None)
    return native, (json_safe(describe(params, raw, ds.key)) if describe else {})


def write_header(f: Any, attrs: dict[str, Any], record: FetchRecord, native: Any) -> None:
    """The root attributes, then ``/provenance`` (the fetch record, the native metadata) of a new file."""
    f.attrs.update(attrs)
    prov = f.create_group("provenance")
    prov.create_dataset("source_record", data=json.dumps(record.to_dict(), sort_keys=True))
    prov.create_dataset("native_metadata", data=json.dumps(native, sort_keys=True))
