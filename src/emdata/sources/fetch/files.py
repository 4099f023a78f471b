"""Helpers for sources whose data are plain files over HTTP(S): file params, plan, fetch.

Sources of other transports (S3, tensorstore) use :class:`~emdata.sources.fetch.context.FetchContext`
directly; the raw-volume type lives in :mod:`emdata.formats.raw`.
"""

from __future__ import annotations

import stat
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from emdata.core.digest import sha256_file
from emdata.params.schema import PARAMS_FILE, Parser, Section, as_int, as_sha256, as_str, as_str_list, config_error
from emdata.sources.fetch.context import FetchContext
from emdata.sources.fetch.record import FetchedFile, safe_relpath


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: its path in the raw folder, where it lives, and what it must be."""

    name: str
    url: str
    size: int | None = None
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FilePlan:
    """What a fetch would do for one file (or object, or group of chunks)."""

    name: str
    url: str
    size: int | None
    to_transfer: int | None
    requests: int
    state: str  # "done", "resume", "new"
    files: int = 1  # how many files or objects the row stands for (a group of zarr chunks: its count)


# -- params of files: typed parsers for the sources' Params fields ------------------------------


def as_file_name(value: Any, path: str) -> str:
    """A plain file name (no folder), safe to join onto the raw folder."""
    name = as_str(value, path)
    if "/" in name:
        raise config_error(path, f"a plain file name is expected, got {name!r}")
    return safe_relpath(name, f"{PARAMS_FILE}: {path}")


def in_folder(base_url: str) -> Callable[[str], str]:
    """Where a file of the folder ``base_url`` (ending in ``/``) is served."""
    return lambda name: urllib.parse.urljoin(base_url, urllib.parse.quote(name))


def as_remote_file(url_of: Callable[[str], str], name: Parser = as_file_name) -> Callable[[Any, str], RemoteFile]:
    """``{file, size?, sha256?}`` -> :class:`RemoteFile`, served at ``url_of(file)``."""

    def parse(value: Any, path: str) -> RemoteFile:
        sec = Section(value, path)
        file = sec.required("file", name)
        spec = RemoteFile(name=file, url=url_of(file), size=sec.optional("size", as_int),
                          sha256=sec.optional("sha256", as_sha256))
        sec.finish()
        return spec

    return parse


def as_relpaths(value: Any, path: str) -> tuple[str, ...]:
    """Relative paths inside the dataset folder (a trailing ``/`` dropped)."""
    names = tuple(name.rstrip("/") for name in as_str_list()(value, path))
    for name in names:
        safe_relpath(name, f"{PARAMS_FILE}: {path}")
    return names


def as_pins(value: Any, path: str) -> dict[str, dict[str, Any]]:
    """``{file: {size?, sha256?}}``: what named files must be (pinned after a first download)."""
    sec = Section(value, path)
    pins = {}
    for name in sec.keys():
        pin = sec.section(str(name))
        safe_relpath(str(name), f"{PARAMS_FILE}: {pin.path}")
        pins[str(name)] = {"size": pin.optional("size", as_int), "sha256": pin.optional("sha256", as_sha256)}
        pin.finish()
    return pins


def plan_files(ctx: FetchContext, files: Iterable[RemoteFile]) -> list[FilePlan]:
    """Sizes from params or a HEAD request, less what a resumable ``.part`` already holds."""
    plans = []
    for spec in files:
        done = ctx.dest / spec.name
        part = ctx.dest / (spec.name + ".part")
        if _regular_file(done):
            plans.append(FilePlan(spec.name, spec.url, done.stat().st_size, 0, 0, "done"))
            continue
        size, requests = spec.size, 0
        if size is None:
            size, requests = ctx.http.head(spec.url).size, 1
        # A .part is resumed only with the validator io.http keeps beside it; without, fetch starts over.
        resumable = _regular_file(part) and _regular_file(part.with_name(part.name + ".validator"))
        have = part.lstat().st_size if resumable else 0
        left = None if size is None else max(0, size - have)
        plans.append(FilePlan(spec.name, spec.url, size, left, requests + 1, "resume" if have else "new"))
    return plans


def _regular_file(path: Path) -> bool:
    """A real file, not a symlink (never follow links planted in the partial folder)."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def fetch_files(ctx: FetchContext, files: Iterable[RemoteFile]) -> dict[str, FetchedFile]:
    """Download each file into the context's folder (skipping finished ones)."""
    fetched = {}
    for spec in files:
        target = ctx.path(spec.name)
        if target.is_file():  # finished by an earlier, interrupted fetch: check it, keep it
            size, digest = target.stat().st_size, sha256_file(target)
            if (spec.size is not None and size != spec.size) or (spec.sha256 and digest != spec.sha256):
                target.unlink()
        if not target.is_file():
            got = ctx.http.download(spec.url, target, size=spec.size, sha256=spec.sha256,
                                    label=f"{ctx.dataset}: {spec.name}")
            size, digest = got.size, got.sha256
        fetched[spec.name] = FetchedFile(spec.url, size, digest)
    return fetched
