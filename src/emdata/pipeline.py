"""The pipeline steps behind the CLI and the DVC stages: glue only, no format knowledge."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config
from .errors import IntegrityError, NotBuiltError
from .io.atomic import write_json_atomic
from .io.http import HttpClient, sha256_file
from .normalize import SOURCE_RECORD
from .sources import get_source
from .sources.base import FilePlan

log = logging.getLogger(__name__)
_SPEC_MARKER = ".spec.json"


@dataclass(frozen=True)
class FetchResult:
    raw_dir: Path
    up_to_date: bool
    requests: int


def _fetched_spec(raw: Path) -> dict[str, Any] | None:
    """The source spec of a complete raw folder, or None when it is missing or damaged."""
    try:
        record = json.loads((raw / SOURCE_RECORD).read_text())
        for name, info in record["files"].items():
            if (raw / name).stat().st_size != info["size"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record.get("spec")


def fetch_dataset(cfg: Config, key: str, client: HttpClient | None = None) -> FetchResult:
    """Make ``data/raw/<key>`` hold exactly what the source serves, or leave it untouched.

    Up to date (same spec in params.yaml, files of the recorded size): no request at all.
    Otherwise files go to ``data/raw/.partial/<key>/`` (kept across interruptions, so the next
    run resumes) and the folder is renamed into place only when every file is verified.
    """
    ds = cfg.dataset(key)
    source = get_source(ds.source_kind)
    spec = ds.source.to_dict()
    raw = cfg.raw_dir(key)
    if _fetched_spec(raw) == spec:
        log.info("%s: up to date in %s", key, raw)
        return FetchResult(raw, True, 0)
    partial = cfg.partial_dir(key)
    marker = partial / _SPEC_MARKER
    if partial.exists() and (not marker.exists() or json.loads(marker.read_text()) != spec):
        shutil.rmtree(partial)  # left by a fetch for other params: nothing to resume
    partial.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, spec)
    client = client or HttpClient(key)
    files = source.fetch(ds.source, client, partial)
    write_json_atomic(partial / SOURCE_RECORD, {"dataset": key, "kind": ds.source_kind, "spec": spec, "files": files})
    marker.unlink()
    _replace_dir(partial, raw)
    log.info("%s: fetched %d file(s) into %s (%d requests)", key, len(files), raw, client.requests)
    return FetchResult(raw, False, client.requests)


def _replace_dir(new: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    old = new.with_name(new.name + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def plan_dataset(cfg: Config, key: str, client: HttpClient | None = None) -> list[FilePlan]:
    ds = cfg.dataset(key)
    raw = cfg.raw_dir(key)
    if _fetched_spec(raw) == ds.source.to_dict():
        record = json.loads((raw / SOURCE_RECORD).read_text())
        return [FilePlan(n, f["url"], f["size"], 0, 0, "done") for n, f in record["files"].items()]
    return get_source(ds.source_kind).plan(ds.source, client or HttpClient(key), cfg.partial_dir(key))


def dataset_state(cfg: Config, key: str) -> dict[str, Any]:
    """What exists locally for one dataset (no network, no hashing)."""
    ds = cfg.dataset(key)
    raw, h5 = cfg.raw_dir(key), cfg.processed_path(key)
    fetched = _fetched_spec(raw) == ds.source.to_dict()
    raw_bytes = sum(p.stat().st_size for p in raw.iterdir() if p.is_file()) if fetched else None
    return {
        "dataset": key,
        "kind": ds.source_kind,
        "fetched": fetched,
        "raw_bytes": raw_bytes,
        "normalized": h5.is_file() and cfg.record_path(key).is_file(),
        "h5_bytes": h5.stat().st_size if h5.is_file() else None,
    }


def verify_dataset(cfg: Config, key: str) -> list[tuple[str, str]]:
    """Re-hash the HDF5 file and its voxels against the recorded checksums.

    Returns the checks that passed; raises IntegrityError on the first mismatch.
    """
    from .io import hdf5
    from .metadata import hash_dataset

    h5, record_path = cfg.processed_path(key), cfg.record_path(key)
    if not h5.is_file() or not record_path.is_file():
        raise NotBuiltError(f"{key}: {h5} or {record_path} is missing; run `dvc pull` or `emdata normalize {key}`")
    record = json.loads(record_path.read_text())
    passed = []
    digest = sha256_file(h5)
    if digest != record["file_sha256"]:
        raise IntegrityError(key, str(h5), f"file sha256 {digest} differs from the record ({record['file_sha256']})",
                             f"run `dvc checkout {h5}` or `emdata normalize {key}`")
    passed.append(("file sha256", digest))
    with hdf5.open_read(h5) as f:
        names = [hdf5.RAW] + [f"{hdf5.LABELS}/{n}" for n in f.get(hdf5.LABELS, {})]
        for name in names:
            stored = f[name].attrs["array_sha256"]
            actual = hash_dataset(f[name])
            if actual != stored:
                raise IntegrityError(key, f"{h5}:/{name}", f"voxel sha256 {actual} differs from the stored {stored}",
                                     f"run `emdata normalize {key}` again")
            passed.append((f"/{name} voxels sha256", actual))
    return passed
