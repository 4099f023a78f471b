"""Versions of a dataset through DVC: a cached local copy, or where the remote keeps the file.

``open_dataset(name, rev=..., repo=...)`` reads a local copy of ``data/processed/<name>.h5`` at
that rev, fetched once into a cache keyed by the file's DVC content hash (a moved branch never
serves stale data); with ``remote=`` nothing is downloaded: DVC's API says which objects of the
remote hold the file and its chunk-offset index, and a :class:`RemoteStorage` reads them by ranges.
DVC is imported only here, when a version is asked for; the light install (``pip install emdata``,
without the ``pipeline`` extra) has no DVC, and asking it for a version is one line saying what to
install.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path, PurePosixPath
from typing import Any

from emdata.access.remote import RangeReader, RemoteIndex, RemoteStorage, Transfer
from emdata.core.atomic import write_stream
from emdata.errors import ConfigError, FetchError, NotBuiltError
from emdata.h5.chunk_index import IndexFormatError, index_path_for
from emdata.params.layout import find_root, processed_relpath


PIPELINE_EXTRA = "pip install 'emdata[pipeline]'"


def _dvc(module: str, name: str, option: str) -> Any:
    """``module`` of DVC, or a ConfigError naming the extra that brings DVC."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "dvc":
            raise
        raise ConfigError(f"{name}: open_dataset(..., {option}=) reads versions through DVC, which this install "
                          f"lacks; {PIPELINE_EXTRA}") from None


def _repo_text(repo: str | os.PathLike) -> str:
    """A repository as DVC takes it: a resolved local path, or a Git URL as given."""
    return str(Path(repo).resolve()) if Path(repo).exists() else str(repo)


def fetch_version(name: str, *, rev: str | None, repo: str | os.PathLike | None,
                  cache_dir: str | os.PathLike | None) -> Path:
    """Copy ``data/processed/<name>.h5`` at ``rev`` into a cache keyed by its DVC content hash."""
    dvc_api = _dvc("dvc.api", name, "rev= or repo")
    repo_str = _repo_text(repo) if repo else None
    rel = processed_relpath(name)
    try:
        fs = dvc_api.DVCFileSystem(repo_str, rev=rev)
        info = fs.info(rel)
        digest = info.get("md5") or (info.get("dvc_info") or {}).get("md5")
        if not digest:
            raise NotBuiltError(f"{name}: {rel} at rev {rev!r} is not tracked by DVC")
        cache = Path(cache_dir or os.environ.get("EMDATA_CACHE") or Path.home() / ".cache" / "emdata") / digest
        target = cache / f"{name}.h5"
        if target.is_file():
            return target
        with fs.open(rel, "rb") as src:
            write_stream(target, iter(lambda: src.read(8 << 20), b""))
    except NotBuiltError:
        raise
    except Exception as exc:
        raise NotBuiltError(f"{name}: cannot get {rel} at rev {rev!r} of {repo_str or 'this repository'} "
                            f"({type(exc).__name__}: {exc}); check the rev and that its data were pushed") from exc
    return target


def _remote_fs(odb: Any) -> Any:
    """The fsspec filesystem under a DVC object database (s3fs for S3 remotes)."""
    fs = getattr(odb.fs, "fs", None)
    return fs if fs is not None and hasattr(fs, "cat_ranges") else odb.fs


def remote_storage(name: str, *, rev: str | None = None, repo: str | os.PathLike | None = None, remote: str = "s3",
                   remote_config: dict[str, Any] | None = None) -> RemoteStorage:
    """``data/processed/<name>.h5`` at ``rev`` of ``repo``, read in place from the DVC remote ``remote``.

    ``remote`` names a remote of the repository's DVC config (``remote_config`` adds or overrides
    its settings, e.g. ``{"endpointurl": ...}`` for a clone without ``.dvc/config.local``).
    """
    dvc_repo = _dvc("dvc.repo", name, "remote")
    rel = processed_relpath(name)
    rel_index = str(PurePosixPath(index_path_for(Path(f"data/metadata/{name}.json"))))
    repo_str = str(find_root()) if repo is None else _repo_text(repo)
    where = f"{rel} at rev {rev!r} of {repo_str}"
    try:
        r = dvc_repo.Repo.open(repo_str, rev=rev, uninitialized=False, subrepos=False, remote=remote,
                                 remote_config=remote_config)
    except Exception as exc:  # noqa: BLE001 - dvc raises many kinds; one line
        raise NotBuiltError(f"{name}: cannot open {repo_str} at rev {rev!r} ({type(exc).__name__}: {exc})") from exc
    try:
        try:
            odb = r.cloud.get_remote_odb(remote, "open_dataset")
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"{name}: no usable DVC remote {remote!r} in {repo_str} ({type(exc).__name__}: "
                              f"{exc}); name a remote from `dvc remote list`") from exc
        objects = {}
        for path in (rel, rel_index):
            try:
                info = r.dvcfs.info(path)
            except FileNotFoundError:
                info = None
            dvc_info = (info or {}).get("dvc_info") or {}
            md5 = (info or {}).get("md5") or dvc_info.get("md5")
            objects[path] = (md5, int(dvc_info.get("size") or (info or {}).get("size") or 0))
        if not objects[rel][0]:
            raise NotBuiltError(f"{name}: {where} is not tracked by DVC; run normalize and `dvc push` there")
        if not objects[rel_index][0]:
            raise NotBuiltError(f"{name}: {where} has no chunk-offset index ({rel_index}, written by normalize "
                                f"since chunk indexes exist), so it cannot be read in place; `dvc pull {rel}` "
                                f"(or open_dataset({name!r}, rev=...) without remote=) and read the local copy")
    finally:
        r.close()
    fs = _remote_fs(odb)
    transfer = Transfer()
    readers = {}
    for path, (md5, size) in objects.items():
        obj = odb.oid_to_path(md5)
        url = f"{odb.fs.protocol if isinstance(odb.fs.protocol, str) else odb.fs.protocol[0]}://{obj}"
        try:
            actual = int(fs.size(obj))
        except FileNotFoundError:
            raise NotBuiltError(f"{name}: {path} (md5 {md5}) is not in the remote {remote!r} at {url}; "
                                f"push it there (`dvc push -r {remote}`) or `dvc pull {rel}`") from None
        except Exception as exc:  # noqa: BLE001
            raise FetchError(name, url, f"cannot reach the remote ({type(exc).__name__}: {exc})",
                             "check the remote's endpoint and credentials") from exc
        if size and actual != size:
            raise FetchError(name, url, f"the remote object has {actual} bytes, DVC records {size}",
                             "push the file again")
        readers[path] = RangeReader(fs, obj, actual, url, name, transfer)
    try:
        index = RemoteIndex(readers[rel_index])
    except IndexFormatError as exc:
        raise NotBuiltError(f"{name}: {rel_index} is not a chunk index this version reads ({exc}); "
                            f"`dvc pull {rel}` and read the local copy") from exc
    if index.index.file.get("size") != readers[rel].size:
        raise FetchError(name, readers[rel].url, "the chunk index describes another file (sizes differ)",
                         f"`dvc pull {rel}` instead")
    return RemoteStorage(index, readers[rel])
