"""One metadata record per dataset, built from the HDF5 itself (the table of all records: stages.table)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from emdata.h5.collection import collection_record, is_collection
from emdata.params.config import Config
from emdata.errors import FormatError
from emdata.h5 import hdf5
from emdata.core.atomic import write_json_atomic
from emdata.core.digest import sha256_file

FILTER_NAMES = {1: "gzip", 2: "shuffle", 32001: "blosc", 32015: "zstd", 32004: "lz4", 32008: "bitshuffle"}


def hash_dataset(dset: Any) -> str:
    """sha256 of a dataset's voxels in C order, little-endian, read one chunk-deep slab at a time."""
    digest = hashlib.sha256()
    depth = (dset.chunks or dset.shape)[0] or 1
    for z0 in range(0, dset.shape[0], depth):
        digest.update(hdf5.voxel_bytes(dset[z0:z0 + depth]))
    return digest.hexdigest()


def _filters(dset: Any) -> list[str]:
    plist = dset.id.get_create_plist()
    names = []
    for i in range(plist.get_nfilters()):
        code = plist.get_filter(i)[0]
        names.append(FILTER_NAMES.get(code, f"filter-{code}"))
    return names


def _array_info(dset: Any) -> dict[str, Any]:
    attrs = hdf5.read_attrs(dset)
    return {
        "shape": list(dset.shape),
        "dtype": str(dset.dtype),
        "chunks": list(dset.chunks) if dset.chunks else None,
        "compression": "+".join(_filters(dset)) or "none",
        "array_sha256": attrs["array_sha256"],
        "statistics": json.loads(attrs["statistics"]),
    }


def build_record(cfg: Config, key: str, path: Path | None = None) -> dict[str, Any]:
    """Read ``data/processed/<key>.h5`` (or ``path``, a file about to take that name) and describe it."""
    path = cfg.processed_path(key) if path is None else path
    with hdf5.open_read(path) as f:
        root = hdf5.read_attrs(f)
        if is_collection(f):  # many images with a table (emdata.h5.collection)
            record = {**_common(key, root, f), **collection_record(f)}
            first = f[next(iter(record["arrays"]))] if record["arrays"] else None
            record["compression"] = ("+".join(_filters(first)) or "none") if first is not None else "none"
            record["native"] = json.loads(f["provenance/native_metadata"][()])
            record["emdata_version"], record["format_version"] = root["emdata_version"], root["format_version"]
        else:
            record = _volume_record(key, root, f)
    record["bytes_on_disk"] = path.stat().st_size
    record["file_sha256"] = sha256_file(path)
    return record


def _common(key: str, root: dict[str, Any], f: Any) -> dict[str, Any]:
    """The record fields every layout has (from the root attributes)."""
    return {
        "dataset": key,
        "title": root["title"],
        "source_kind": root["source_kind"],
        "source_urls": json.loads(root["source_urls"]),
        "source_checksums": json.loads(root["source_checksums"]),
        "accession": root["accession"] or None,
        "doi": root["doi"] or None,
        "license": root["license"],
        "citation": root["citation"],
        "modality": root["modality"],
        "description": json.loads(root.get("description", "{}")),
    }


def _volume_record(key: str, root: dict[str, Any], f: Any) -> dict[str, Any]:
    raw = f[hdf5.RAW]
    spatial = hdf5.read_attrs(raw)
    return {
        **_common(key, root, f),
        "voxel_size_nm": spatial["resolution"],
        "offset_nm": spatial["offset"],
        "extent_nm": [float(s * r) for s, r in zip(raw.shape, spatial["resolution"])],
        **_array_info(raw),
        "labels": {name: _array_info(f[f"{hdf5.LABELS}/{name}"]) for name in f.get(hdf5.LABELS, {})},
        "native": json.loads(f["provenance/native_metadata"][()]),
        "emdata_version": root["emdata_version"],
        "format_version": root["format_version"],
    }


def write_record(cfg: Config, key: str) -> Path:
    path = cfg.record_path(key)
    write_json_atomic(path, build_record(cfg, key))
    return path


def read_record(cfg: Config, key: str) -> dict[str, Any]:
    """``data/metadata/<key>.json``, checked against :data:`VOLUME_RECORD` or :data:`COLLECTION_RECORD`.

    A damaged record (not JSON, or JSON of the wrong shape) is one line naming the first bad field
    and saying how to rebuild it, so ``info``, ``verify`` and ``summarize`` can index it freely.
    """
    path = cfg.record_path(key)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        problem: str | None = f"{type(exc).__name__}: {exc}" if isinstance(exc, RecursionError) else str(exc)
    else:
        problem = record_problem(record, key)
    if problem is not None:
        raise FormatError(key, str(path), f"the metadata record is damaged ({problem})",
                          f"run `emdata normalize {key}` (or `dvc checkout {path.relative_to(cfg.root)}`)")
    return record


# -- the shape of a record: what info, verify and summarize read ------------------------------------
# A schema is a _Leaf (a test of one value), an _Each (a JSON object whose every value matches) or
# a dict (a JSON object with these keys; a key ending in "?" may be absent or null).

@dataclass(frozen=True)
class _Leaf:
    what: str
    test: Callable[[Any], bool]


@dataclass(frozen=True)
class _Each:
    item: Any


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _triple(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and len(v) == 3 and all(test(x) for x in v)


def _list_of(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and all(test(x) for x in v)


def _text(v: Any) -> bool:
    return isinstance(v, str)


TEXT = _Leaf("a string", _text)
OPTIONAL_TEXT = _Leaf("a string or null", lambda v: v is None or isinstance(v, str))
SHA256 = _Leaf("a sha256 (64 hex digits)", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None)
NUMBER = _Leaf("a number", _number)
OPTIONAL_NUMBER = _Leaf("a number or null", lambda v: v is None or _number(v))
COUNT = _Leaf("a whole number >= 0", _count)
COMMON_RECORD: dict[str, Any] = {
    "dataset": TEXT, "title": TEXT, "source_kind": TEXT, "source_urls": _Leaf("a list of URLs", _list_of(_text)),
    "accession": OPTIONAL_TEXT, "doi": OPTIONAL_TEXT, "license": TEXT, "modality": TEXT, "compression": TEXT,
    "bytes_on_disk": COUNT, "file_sha256": SHA256,
}
STATISTICS: dict[str, Any] = {"min": NUMBER, "max": NUMBER, "mean": NUMBER, "std": NUMBER, "zero_fraction": NUMBER,
                              "percentiles?": {"p0.1": NUMBER, "p99.9": NUMBER}}
VOLUME_RECORD: dict[str, Any] = {
    **COMMON_RECORD, "dtype": TEXT, "array_sha256": SHA256,
    "shape": _Leaf("a list of 3 whole numbers", _triple(_count)),
    "chunks": _Leaf("a list of 3 whole numbers", _triple(_count)),
    **{name: _Leaf("a list of 3 numbers", _triple(_number)) for name in ("voxel_size_nm", "extent_nm", "offset_nm")},
    "statistics": STATISTICS,
    "labels": _Each({"dtype": TEXT, "array_sha256": SHA256, "statistics": {"zero_fraction": NUMBER}}),
}
COLLECTION_RECORD: dict[str, Any] = {
    **COMMON_RECORD, "n_images": COUNT,
    "arrays": _Each({"dtype": TEXT, "min": OPTIONAL_NUMBER, "max": OPTIONAL_NUMBER,
                     "resolution?": _Leaf("a list of numbers", _list_of(_number))}),
    "roles": _Each({"count": COUNT, "pixels": COUNT, "mean": OPTIONAL_NUMBER, "min": OPTIONAL_NUMBER,
                    "max": OPTIONAL_NUMBER, "dtypes": _Leaf("a list of strings", _list_of(_text))}),
    "table": _Leaf("a list of JSON objects", _list_of(lambda v: isinstance(v, dict))),
    "table_columns?": _Leaf("a list of strings", _list_of(_text)),
    "tables": _Leaf("a list of strings", _list_of(_text)),
}


def record_problem(record: Any, key: str) -> str | None:
    """The first field of ``record`` that ``info``, ``verify`` or ``summarize`` could not use, or None."""
    if not isinstance(record, dict):
        return f"it is {_shown(record)}, not a JSON object"
    schema = COLLECTION_RECORD if record.get("layout") == "collection" else VOLUME_RECORD
    problem = _problem(record, schema, "")
    if problem is None and record["dataset"] != key:
        problem = f"field dataset is {_shown(record['dataset'])}: it is the record of another dataset"
    return problem


def _problem(value: Any, schema: Any, where: str) -> str | None:
    if isinstance(schema, _Leaf):
        return None if schema.test(value) else f"field {where} is {_shown(value)}, not {schema.what}"
    if not isinstance(value, dict):
        return f"field {where} is {_shown(value)}, not a JSON object"
    if isinstance(schema, _Each):
        fields = [(name, schema.item, False) for name in value]
    else:
        fields = [(name.rstrip("?"), sub, name.endswith("?")) for name, sub in schema.items()]
    for name, sub, optional in fields:
        path = f"{where}.{name}" if where else name
        if value.get(name) is None and optional:
            continue
        if name not in value:
            return f"field {path} is missing"
        found = _problem(value[name], sub, path)
        if found is not None:
            return found
    return None


def _shown(value: Any) -> str:
    """A short one-line rendering of a JSON value for an error message."""
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def load_records(cfg: Config) -> dict[str, dict[str, Any]]:
    """Records of the datasets in params.yaml that have one, in key order."""
    records = {}
    for key in sorted(cfg.datasets):
        path = cfg.record_path(key)
        if path.is_file():
            records[key] = read_record(cfg, key)
    return records


def central_slices(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The central XY and XZ sections of /raw (two chunk layers of reads, not the volume)."""
    with hdf5.open_read(path) as f:
        raw = f[hdf5.RAW]
        z, y, _ = raw.shape
        return raw[z // 2], raw[:, y // 2, :]
