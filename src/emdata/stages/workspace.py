"""Where fetch and normalize write a dataset's files under ``data/``, and two rules for those places.

- No folder between the repository and them may be a symbolic link: each command checks the
  folders it writes before it creates anything (the lock file included), so nothing is written
  through a link.
- Temporaries of an earlier run that was killed (``.<name>.<pid>.tmp``, see :mod:`emdata.core.atomic`)
  are removed by the next run of the same dataset, under its lock, so they neither pile up nor
  get published into ``data/raw/<dataset>``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from emdata.params.config import Config
from emdata.errors import OutputError
from emdata.sources.fetch.record import RECORD_NAME
from emdata.core.atomic import stale_temporaries

log = logging.getLogger(__name__)
SPEC_MARKER = ".spec.json"  # the params a partial fetch was started with (pipeline.fetch_dataset)
UNFINISHED = (".tmp", ".part")  # a temporary or a download in progress


def refuse_links(key: str, root: Path, paths: list[Path]) -> None:
    """No folder on the way from the repository to ``paths`` may be a symlink emdata did not make."""
    seen: set[Path] = set()
    for path in paths:
        for folder in [path, *path.parents]:
            if folder == root or root not in folder.parents or folder in seen:
                break
            seen.add(folder)
            if folder.is_symlink():
                raise OutputError(key, str(folder), "is a symbolic link",
                                  "remove it; emdata writes only real files and folders under data/")


def write_folders(cfg: Config, key: str, command: str) -> list[Path]:
    """The folders ``fetch`` or ``normalize`` writes in for ``key`` (both: the lock and the hash cache)."""
    both = [cfg.lock_dir(), cfg.hash_state_path(key).parent]
    if command == "fetch":
        return [*both, cfg.raw_dir(key), cfg.partial_dir(key), cfg.input_stamp_path(key).parent]
    return [*both, cfg.processed_path(key).parent, cfg.record_path(key).parent]


def refuse_dataset_links(cfg: Config, key: str, command: str) -> None:
    """The check ``fetch`` and ``normalize`` make first, before the lock file or any folder is created."""
    refuse_links(key, cfg.root, write_folders(cfg, key, command))


def written_files(cfg: Config, key: str) -> list[Path]:
    """Files fetch and normalize write atomically for ``key`` (each through ``.<name>.<pid>.tmp``)."""
    from emdata.h5.chunk_index import index_path_for

    record = cfg.record_path(key)
    partial = cfg.partial_dir(key)
    return [partial / RECORD_NAME, partial / SPEC_MARKER, cfg.hash_state_path(key), cfg.input_stamp_path(key),
            record, index_path_for(record), cfg.processed_path(key)]


def remove_stale_temporaries(cfg: Config, key: str) -> None:
    """Temporaries that killed runs of ``key`` left beside its files (call it holding the dataset's lock)."""
    for path in written_files(cfg, key):
        for old in stale_temporaries(path):
            log.info("removing %s, left by an interrupted run", old)
            old.unlink(missing_ok=True)


def drop_unfinished(folder: Path, keep: set[str]) -> None:
    """Remove ``*.tmp`` and ``*.part`` files under a complete partial fetch that its record does not list.

    A run killed while writing leaves them; a later run that completes the fetch does not need them,
    and they must not be published into ``data/raw/<dataset>`` with the fetched files.
    """
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = Path(dirpath) / name
            if name.endswith(UNFINISHED) and path.relative_to(folder).as_posix() not in keep:
                log.info("removing %s, left by an interrupted run", path)
                path.unlink(missing_ok=True)
