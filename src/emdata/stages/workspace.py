"""Where fetch and normalize write a dataset's files under ``data/``, and two rules for those places.

- No folder between the repository and them may be a symbolic link: each command checks the
  folders it writes before it creates anything (the lock file included), so nothing is written
  through a link.
- What a killed run was writing is removed by the next run of the same dataset, under its lock,
  so it neither piles up nor gets published into ``data/raw/<dataset>``: the temporaries
  (``.<name>.<pid>.tmp``, see :mod:`emdata.core.atomic`) of the files below
  (:func:`remove_stale_temporaries`; the raw folder's old copy that fetch moves aside while it
  publishes is one), and, in a partial fetch that is complete, every file its record does not list
  that is a temporary, a download in progress or tensorstore's lock file (:func:`drop_unfinished`).
  The staged tiles of a distributed normalize clean their own folder
  (:class:`emdata.stages.normalize.ledger.Ledger`).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from emdata.core.atomic import stale_temporaries
from emdata.errors import OutputError
from emdata.h5.chunk_index import index_path_for
from emdata.params.layout import DatasetPaths
from emdata.sources.fetch.record import RECORD_NAME

log = logging.getLogger(__name__)
SPEC_MARKER = ".spec.json"  # the params a partial fetch was started with (stages.fetch.fetch_dataset)
# In a partial fetch: a temporary (core.atomic's, or an older emdata's <name>.tmp), a download in
# progress and the note of its version (transport.download), tensorstore's temporary (.__lock).
UNFINISHED = (".tmp", ".part", ".part.validator", ".__lock")


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


def write_folders(paths: DatasetPaths, command: str) -> list[Path]:
    """The folders ``fetch`` or ``normalize`` writes in for a dataset (both: the lock and the hash cache)."""
    both = [paths.locks, paths.hash_state.parent]
    if command == "fetch":
        return [*both, paths.raw, paths.partial, paths.input_stamp.parent]
    return [*both, paths.processed.parent, paths.record.parent]


def refuse_dataset_links(paths: DatasetPaths, command: str) -> None:
    """The check ``fetch`` and ``normalize`` make first, before the lock file or any folder is created."""
    refuse_links(paths.key, paths.root, write_folders(paths, command))


def written_files(paths: DatasetPaths) -> list[Path]:
    """What fetch and normalize replace atomically for a dataset (each through ``.<name>.<pid>.tmp``):
    files, and the raw folder (its old copy steps aside under that name while fetch publishes)."""
    return [paths.partial / RECORD_NAME, paths.partial / SPEC_MARKER, paths.hash_state, paths.input_stamp,
            paths.record, index_path_for(paths.record), paths.processed, paths.raw]


def legacy_leftovers(paths: DatasetPaths) -> list[Path]:
    """What a killed run of an older emdata may have left: the raw folder's old copy, ``.partial/<key>.old``."""
    return [paths.partial.with_name(paths.key + ".old")]


def remove_stale_temporaries(paths: DatasetPaths) -> None:
    """Temporaries that killed runs of a dataset left beside its files (call it holding the dataset's lock)."""
    stale = [old for path in written_files(paths) for old in stale_temporaries(path)]
    for old in stale + [p for p in legacy_leftovers(paths) if os.path.lexists(p)]:
        log.info("removing %s, left by an interrupted run", old)
        _remove(old)


def _remove(path: Path) -> None:
    """A file, or a folder (never followed if it is a link)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def drop_unfinished(folder: Path, keep: set[str]) -> None:
    """Remove unfinished files (:data:`UNFINISHED`) under a complete partial fetch that its record does not list.

    A run killed while writing leaves them; a later run that completes the fetch does not need them,
    and they must not be published into ``data/raw/<dataset>`` with the fetched files.
    """
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = Path(dirpath) / name
            if name.endswith(UNFINISHED) and path.relative_to(folder).as_posix() not in keep:
                log.info("removing %s, left by an interrupted run", path)
                path.unlink(missing_ok=True)
