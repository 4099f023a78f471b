"""The pipeline steps behind the CLI and the DVC stages: glue only, no format knowledge."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from emdata.core.atomic import temporary_path, write_json_atomic
from emdata.core.digest import sha256_file
from emdata.errors import EmdataError, IntegrityError, NotBuiltError
from emdata.h5 import hdf5
from emdata.h5.collection import hashed_arrays, is_collection
from emdata.h5.metadata import hash_dataset, read_record
from emdata.params.config import Config
from emdata.sources.dataset import Dataset, resolve_dataset
from emdata.sources.fetch.context import FetchContext, workers_from_env
from emdata.sources.fetch.files import FilePlan
from emdata.sources.fetch.digests import group_problems, recorded_groups
from emdata.sources.fetch.record import (
    FetchRecord,
    HashState,
    fetched,
    plain_spec,
    raw_integrity_error,
    require_fetched,
)
from emdata.stages.workspace import (
    SPEC_MARKER,
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


def fetch_context(ds: Dataset, http_factory: Callable[[], Any] | None = None, policy: Any = None) -> FetchContext:
    """The context of one dataset's plan or fetch (``policy``: a RetryPolicy for S3/tensorstore; tests)."""
    return FetchContext(dataset=ds.key, kind=ds.source_kind, spec=ds.source.to_dict(), dest=ds.paths.partial,
                        policy=policy, workers=workers_from_env(), http_factory=http_factory)


def fetch_dataset(cfg: Config, key: str, http_factory: Callable[[], Any] | None = None,
                  policy: Any = None) -> FetchResult:
    """Make ``data/raw/<key>`` hold exactly what the source serves, or leave it untouched.

    Up to date (same spec in params.yaml, files of the recorded size): no request at all.
    Otherwise files go to ``data/raw/.partial/<key>/`` (kept across interruptions, so the next
    run resumes) and the folder is renamed into place only when every file is verified.
    """
    ds = resolve_dataset(cfg, key)
    paths = ds.paths
    refuse_dataset_links(paths, "fetch")  # before anything is read or created (the lock file, the hash cache)
    record = fetched(paths.raw, ds.source.to_dict(), state=HashState(paths.hash_state))
    if record is not None:
        reason = _inputs_changed(ds, _read_json(paths.input_stamp))  # local imports
        if reason is None:
            log.info("%s: up to date in %s", key, paths.raw)
            return FetchResult(paths.raw, True, 0)
        log.debug("%s: %s; importing again", key, reason)  # debug: a failing import stays one line
    with ds.lock("fetch"):
        return _fetch_locked(ds, fetch_context(ds, http_factory, policy))


def _inputs_changed(ds: Dataset, last: Any) -> str | None:
    """Why a source's local files differ from the stamp of the last import (None: they do not).

    No stamp (a checkout that got data/raw by ``dvc pull``) counts as changed: import again."""
    stamp = getattr(ds.module, "input_stamp", None)
    if stamp is None:
        return None
    try:
        now = stamp(ds.source, ds.key)
    except EmdataError as exc:
        return str(exc)
    return None if now == last else "the source files changed since they were imported"


def _fetch_locked(ds: Dataset, ctx: FetchContext) -> FetchResult:
    key, paths, spec = ds.key, ds.paths, ds.source.to_dict()
    partial = ctx.dest
    refuse_links(key, paths.root, [paths.raw, partial])  # again, holding the lock
    remove_stale_temporaries(paths)
    marker = partial / SPEC_MARKER
    if partial.exists() and (not marker.is_file() or _read_json(marker) != plain_spec(spec)):
        shutil.rmtree(partial)  # left by a fetch for other params: nothing to resume
    partial.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, spec, dataset=key)
    record: FetchRecord = ds.module.fetch(ds.source, ctx)
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
    _replace_dir(partial, paths.raw)
    if stamp is not None:
        write_json_atomic(paths.input_stamp, stamp, dataset=key)
    HashState(paths.hash_state).remember_record(paths.raw, record)
    log.info("%s: fetched %d file(s) into %s (%d requests)", key, len(record.files), paths.raw, ctx.requests)
    return FetchResult(paths.raw, False, ctx.requests)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deep
        return None


def _replace_dir(new: Path, final: Path) -> None:
    """Rename the complete partial folder to ``final``, in two renames: a folder cannot be renamed over
    one that holds files. The old folder steps aside under core.atomic's temporary name for ``final``,
    so if this process is killed between the renames, the next run of the dataset removes it
    (stages.workspace.remove_stale_temporaries)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = temporary_path(final)
    if old.exists():  # a killed process of the same pid
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def plan_dataset(cfg: Config, key: str, http_factory: Callable[[], Any] | None = None,
                 policy: Any = None) -> list[FilePlan]:
    ds = resolve_dataset(cfg, key)
    record = fetched(ds.paths.raw, ds.source.to_dict())
    if record is not None:
        return [FilePlan(n, f.url, f.size, 0, 0, "done") for n, f in record.files.items()]
    return ds.module.plan(ds.source, fetch_context(ds, http_factory, policy))


def plan_notes(cfg: Config, key: str, policy: Any = None) -> list[str]:
    """Lines a source adds to the plan of a fetch (its optional ``plan_notes``: e.g. the label arrays it has)."""
    ds = resolve_dataset(cfg, key)
    notes = getattr(ds.module, "plan_notes", None)
    if notes is None or fetched(ds.paths.raw, ds.source.to_dict()) is not None:
        return []
    return list(notes(ds.source, fetch_context(ds, None, policy)))


def dataset_state(ds: Dataset) -> dict[str, Any]:
    """What exists locally for one dataset (no network, no hashing)."""
    paths = ds.paths
    record = fetched(paths.raw, ds.source.to_dict())
    return {
        "dataset": ds.key,
        "kind": ds.source_kind,
        "fetched": record is not None,
        "raw_bytes": sum(f.size for f in record.files.values()) if record else None,
        "normalized": paths.processed.is_file() and paths.record.is_file(),
        "h5_bytes": paths.processed.stat().st_size if paths.processed.is_file() else None,
    }


def verify_raw(ds: Dataset) -> list[tuple[str, str]]:
    """Re-hash the fetched raw files against their fetch record, and recompute each group digest the
    record holds (:mod:`emdata.sources.fetch.digests`) from its recorded files and from their bytes."""
    folder, state = ds.paths.raw, HashState(ds.paths.hash_state)
    record = require_fetched(folder, ds.key, ds.source.to_dict())  # the record, its params, every file's size
    problems = record.problems(folder, hashes=True, state=state)  # every file hashed once; state keeps the sha256
    on_disk = {name: state.verified(name, folder / name) for name in record.files}
    problems = group_problems(record, on_disk) + problems  # first the array (or group) a changed file is in
    if problems:
        raise raw_integrity_error(ds.key, folder, problems)
    return ([(f"raw {name} sha256", f.sha256 or "-") for name, f in sorted(record.files.items())]
            + [(f"raw {url} group sha256", digest) for url, digest in sorted(recorded_groups(record).items())])


def verify_dataset(cfg: Config, key: str, *, raw: bool = False) -> list[tuple[str, str]]:
    """Re-hash the HDF5 file and its voxels against the recorded checksums (first the fetched raw
    files against their fetch record, with ``raw``, when they are present).

    Returns the checks that passed; raises IntegrityError on the first mismatch.
    """
    ds = resolve_dataset(cfg, key)  # an unknown dataset is a ConfigError, not "not built"
    passed = verify_raw(ds) if raw and ds.paths.raw.exists() else []
    h5, record_path = ds.paths.processed, ds.paths.record
    if not h5.is_file() or not record_path.is_file():
        raise NotBuiltError(f"{key}: {h5} or {record_path} is missing; run `dvc pull` or `emdata normalize {key}`")
    record = read_record(cfg, key)
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
