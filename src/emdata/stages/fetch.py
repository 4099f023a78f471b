"""The pipeline steps behind the CLI and the DVC stages: glue only, no format knowledge."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from emdata.params.config import Config
from emdata.errors import EmdataError, IntegrityError, NotBuiltError
from emdata.sources.fetch.context import FetchContext, workers_from_env
from emdata.sources.fetch.record import FetchRecord, HashState, fetched, plain_spec, require_fetched
from emdata.core.atomic import write_json_atomic
from emdata.core.digest import sha256_file
from emdata.core.lock import dataset_lock
from emdata.sources import get_source
from emdata.sources.fetch.files import FilePlan
from emdata.stages.workspace import SPEC_MARKER as _SPEC_MARKER
from emdata.stages.workspace import (
    drop_unfinished,
    refuse_dataset_links,
    refuse_links,
    remove_stale_temporaries,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchResult:
    raw_dir: Path
    up_to_date: bool
    requests: int


def fetch_context(cfg: Config, key: str, http_factory: Callable[[], Any] | None = None,
                  policy: Any = None) -> FetchContext:
    """The context of one dataset's plan or fetch (``policy``: a RetryPolicy for S3/tensorstore; tests)."""
    ds = cfg.dataset(key)
    return FetchContext(dataset=key, kind=ds.source_kind, spec=ds.source.to_dict(), dest=cfg.partial_dir(key),
                        policy=policy, workers=workers_from_env(), http_factory=http_factory)


def fetch_dataset(cfg: Config, key: str, http_factory: Callable[[], Any] | None = None,
                  policy: Any = None) -> FetchResult:
    """Make ``data/raw/<key>`` hold exactly what the source serves, or leave it untouched.

    Up to date (same spec in params.yaml, files of the recorded size): no request at all.
    Otherwise files go to ``data/raw/.partial/<key>/`` (kept across interruptions, so the next
    run resumes) and the folder is renamed into place only when every file is verified.
    """
    ds = cfg.dataset(key)
    source = get_source(ds.source_kind)
    spec = ds.source.to_dict()
    raw = cfg.raw_dir(key)
    refuse_dataset_links(cfg, key, "fetch")  # before anything is read or created (the lock file, the hash cache)
    record = fetched(raw, spec, state=HashState(cfg.hash_state_path(key)))
    if record is not None:
        reason = _inputs_changed(source, ds.source, key, _read_json(cfg.input_stamp_path(key)))  # local imports
        if reason is None:
            log.info("%s: up to date in %s", key, raw)
            return FetchResult(raw, True, 0)
        log.debug("%s: %s; importing again", key, reason)  # debug: a failing import stays one line
    with dataset_lock(cfg.lock_dir(), key, "fetch"):
        return _fetch_locked(cfg, key, source, spec, http_factory, policy)


def _inputs_changed(source: Any, params: Any, key: str, last: Any) -> str | None:
    """Why a source's local files differ from the stamp of the last import (None: they do not).

    No stamp (a checkout that got data/raw by ``dvc pull``) counts as changed: import again."""
    stamp = getattr(source, "input_stamp", None)
    if stamp is None:
        return None
    try:
        now = stamp(params, key)
    except EmdataError as exc:
        return str(exc)
    return None if now == last else "the source files changed since they were imported"


def _fetch_locked(cfg: Config, key: str, source: Any, spec: dict[str, Any],
                  http_factory: Callable[[], Any] | None, policy: Any = None) -> FetchResult:
    ds = cfg.dataset(key)
    raw = cfg.raw_dir(key)
    ctx = fetch_context(cfg, key, http_factory, policy)
    partial = ctx.dest
    refuse_links(key, cfg.root, [raw, partial])  # again, holding the lock
    remove_stale_temporaries(cfg, key)
    marker = partial / _SPEC_MARKER
    if partial.exists() and (not marker.is_file() or _read_json(marker) != plain_spec(spec)):
        shutil.rmtree(partial)  # left by a fetch for other params: nothing to resume
    partial.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, spec, dataset=key)
    record: FetchRecord = source.fetch(ds.source, ctx)
    missing = record.problems(partial)
    if missing:
        raise IntegrityError(key, str(partial), f"the fetch reported files it did not write: {missing[0]}",
                             "this is a bug in the source module; please report it")
    # The stamp (mtimes) is local state, not provenance: kept out of source.json, which the HDF5
    # copies, so that touching or copying the user's files does not change the data's version.
    stamp = record.extra.pop("input_stamp", None)
    drop_unfinished(partial, set(record.files))  # a killed run's temporaries are not published with the files
    record.write(partial)
    marker.unlink()
    _replace_dir(partial, raw)
    if stamp is not None:
        write_json_atomic(cfg.input_stamp_path(key), stamp, dataset=key)
    HashState(cfg.hash_state_path(key)).remember_record(raw, record)
    log.info("%s: fetched %d file(s) into %s (%d requests)", key, len(record.files), raw, ctx.requests)
    return FetchResult(raw, False, ctx.requests)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deep
        return None


def _replace_dir(new: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    old = new.with_name(new.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def plan_dataset(cfg: Config, key: str, http_factory: Callable[[], Any] | None = None,
                 policy: Any = None) -> list[FilePlan]:
    ds = cfg.dataset(key)
    record = fetched(cfg.raw_dir(key), ds.source.to_dict())
    if record is not None:
        return [FilePlan(n, f.url, f.size, 0, 0, "done") for n, f in record.files.items()]
    return get_source(ds.source_kind).plan(ds.source, fetch_context(cfg, key, http_factory, policy))


def dataset_state(cfg: Config, key: str) -> dict[str, Any]:
    """What exists locally for one dataset (no network, no hashing)."""
    ds = cfg.dataset(key)
    raw, h5 = cfg.raw_dir(key), cfg.processed_path(key)
    record = fetched(raw, ds.source.to_dict())
    return {
        "dataset": key,
        "kind": ds.source_kind,
        "fetched": record is not None,
        "raw_bytes": sum(f.size for f in record.files.values()) if record else None,
        "normalized": h5.is_file() and cfg.record_path(key).is_file(),
        "h5_bytes": h5.stat().st_size if h5.is_file() else None,
    }


def verify_raw(cfg: Config, key: str) -> list[tuple[str, str]]:
    """Re-hash the fetched raw files against their fetch record (when they are present)."""
    ds = cfg.dataset(key)
    record = require_fetched(cfg.raw_dir(key), key, ds.source.to_dict(), hashes=True,
                             state=HashState(cfg.hash_state_path(key)))
    return [(f"raw {name} sha256", f.sha256 or "-") for name, f in sorted(record.files.items())]


def verify_dataset(cfg: Config, key: str) -> list[tuple[str, str]]:
    """Re-hash the HDF5 file and its voxels against the recorded checksums.

    Returns the checks that passed; raises IntegrityError on the first mismatch.
    """
    from emdata.h5.collection import hashed_arrays, is_collection
    from emdata.h5 import hdf5
    from emdata.h5.metadata import hash_dataset

    cfg.dataset(key)  # an unknown dataset is a ConfigError, not "not built"
    h5, record_path = cfg.processed_path(key), cfg.record_path(key)
    if not h5.is_file() or not record_path.is_file():
        raise NotBuiltError(f"{key}: {h5} or {record_path} is missing; run `dvc pull` or `emdata normalize {key}`")
    from emdata.h5.metadata import read_record

    record = read_record(cfg, key)
    passed = []
    digest = sha256_file(h5)
    if digest != record["file_sha256"]:
        raise IntegrityError(key, str(h5), f"file sha256 {digest} differs from the record ({record['file_sha256']})",
                             f"run `dvc checkout {h5}` or `emdata normalize {key}`")
    passed.append(("file sha256", digest))
    with hdf5.open_read(h5) as f:
        if is_collection(f):  # every image array of the collection
            names = hashed_arrays(f)
        else:
            names = [hdf5.RAW] + [f"{hdf5.LABELS}/{n}" for n in f.get(hdf5.LABELS, {})]
        for name in names:
            stored = f[name].attrs["array_sha256"]
            actual = hash_dataset(f[name])
            if actual != stored:
                raise IntegrityError(key, f"{h5}:/{name}", f"voxel sha256 {actual} differs from the stored {stored}",
                                     f"run `emdata normalize {key}` again")
            passed.append((f"/{name} voxels sha256", actual))
    return passed
