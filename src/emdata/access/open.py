"""``open_dataset``: a dataset name, file path or version to a :class:`~emdata.access.volume.Volume`.

A name stands for ``data/processed/<name>.h5`` of this repository (the nearest folder holding
params.yaml, or ``$EMDATA_PROJECT``), a path for itself; ``rev``/``repo`` pick a version through
DVC (:mod:`emdata.access.versions`), and ``remote`` reads that version in place from a DVC remote.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from emdata.access.versions import fetch_version, remote_storage
from emdata.access.volume import Volume
from emdata.errors import ConfigError, NotBuiltError
from emdata.params.layout import find_root, processed_relpath
from emdata.params.schema import KEY_PATTERN


def open_dataset(name: str | os.PathLike, *, rev: str | None = None, repo: str | os.PathLike | None = None,
                 label: str | None = None, cache_dir: str | os.PathLike | None = None, remote: str | None = None,
                 remote_config: dict[str, Any] | None = None) -> Volume:
    """Open ``data/processed/<name>.h5`` read-only (``label`` picks ``/labels/<label>``).

    ``name`` may also be the path of an emdata HDF5 file (a ``Path``, or a string ending in
    ``.h5``/``.hdf5`` or containing a ``/``), e.g. one from ``dvc import`` or a colleague.

    Without ``rev``/``repo``: the file in this repository's working tree (the nearest folder
    holding params.yaml, or ``$EMDATA_PROJECT``). With them: that exact version, fetched through
    DVC's Python API from ``repo`` (a path or Git URL) at ``rev`` (tag, branch or commit) into a
    cache keyed by the file's DVC content hash (``cache_dir``, ``$EMDATA_CACHE`` or
    ``~/.cache/emdata``) first, so a moved branch never serves stale data.

    With ``remote`` (a DVC remote's name, e.g. ``"s3"``): nothing is downloaded; the file stays in
    the remote and each read fetches only the chunks it touches (:mod:`emdata.access.remote`),
    through the chunk-offset index normalize writes. ``remote_config`` overrides that remote's
    DVC settings (e.g. ``{"endpointurl": ...}``). The Volume is the same either way.
    """
    if remote is not None:
        if _looks_like_path(name):
            raise ConfigError(f"{name}: rev=, repo= and remote= take a dataset name, not a file path")
        if not KEY_PATTERN.fullmatch(str(name)):
            raise ConfigError(f"{name!r}: remote= takes a dataset name")
        storage = remote_storage(str(name), rev=rev, repo=repo, remote=remote, remote_config=remote_config)
        return _with_label(Volume(storage, name=str(name)), str(name), label)
    path, display = dataset_path(name, rev=rev, repo=repo, cache_dir=cache_dir)
    volume = Volume(path) if _looks_like_path(name) else Volume(path, name=display)
    return _with_label(volume, display, label)


def dataset_path(name: str | os.PathLike, *, rev: str | None = None, repo: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The HDF5 file ``name`` stands for (see :func:`open_dataset`), and the name to show."""
    if _looks_like_path(name):
        if rev is not None or repo is not None:
            raise ConfigError(f"{name}: rev=, repo= and remote= take a dataset name, not a file path")
        file = Path(name).expanduser()
        if not file.is_file():
            raise NotBuiltError(f"{file}: no such file (opened as a path because it is a Path, ends in .h5/.hdf5 "
                                f"or contains '/'); for a dataset of this repository pass its name")
        return file, str(file)
    name = str(name)
    if not KEY_PATTERN.fullmatch(name):
        raise ConfigError(f"{name!r} is neither a dataset name (names match {KEY_PATTERN.pattern}) nor an "
                          f"HDF5 path (a Path, a string ending in .h5/.hdf5, or containing '/')")
    if rev is None and repo is None:
        path = find_root() / processed_relpath(name)
        if not path.is_file():
            raise NotBuiltError(f"{name}: {path} is missing; get it with `dvc pull {processed_relpath(name)}` "
                                f"or build it with `dvc repro normalize@{name}`")
        return path, name
    return fetch_version(name, rev=rev, repo=repo, cache_dir=cache_dir), name


def _looks_like_path(name: Any) -> bool:
    if isinstance(name, os.PathLike):
        return True
    return isinstance(name, str) and ("/" in name or os.sep in name or name.endswith((".h5", ".hdf5")))


def _with_label(volume: Volume, name: str, label: str | None) -> Volume:
    if label is None:
        return volume
    if label not in volume.label_names:
        raise ConfigError(f"{name}: no label {label!r} (labels: {', '.join(volume.label_names) or 'none'})")
    return volume.labels[label]
