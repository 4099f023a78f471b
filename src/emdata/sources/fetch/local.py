"""Files the user has, in a folder or a zip given by an absolute path: listed safely, copied verified.

A kind that imports such files (data sent by e-mail, not downloadable) says which members it
takes (``accept``); this module refuses what could write or read outside the raw folder (symbolic
links, devices, ``..`` or absolute zip members), copies each taken file into the fetch folder while
hashing it, and digests the whole source (the zip's bytes, or a manifest of the folder's files) so
params.yaml can pin it. The input stamp (sizes and mtimes, no hashing) tells a later fetch that
the user's files changed.
"""

from __future__ import annotations

import hashlib
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

from emdata.core.atomic import write_stream
from emdata.errors import FetchError, FormatError
from emdata.sources.fetch.context import FetchContext
from emdata.sources.fetch.record import FetchedFile
from emdata.transport.archive import unsafe_name

BLOCK = 1 << 20


@dataclass(frozen=True)
class LocalFile:
    rel: str  # where it goes in the raw folder
    member: str  # path inside the folder or zip
    size: int
    mtime_ns: int


# (member path split at "/", member, size, mtime_ns) -> the file taken, or None to leave it out
Accept = Callable[[list[str], str, int, int], "LocalFile | None"]


class LocalTree:
    """The user's folder or zip at ``path`` (absolute); ``hint`` says where to set it."""

    def __init__(self, path: str, dataset: str, hint: str) -> None:
        self.path = path
        self.dataset = dataset
        self.root = Path(path).expanduser()
        if not self.root.exists():
            raise FetchError(dataset, str(self.root), "no such folder or file", hint)
        if self.root.is_symlink():
            raise FetchError(dataset, str(self.root), "is a symbolic link", "give the real path in params.yaml")
        self.url = self.root.as_uri() + ("" if self.is_zip else "/")

    @property
    def is_zip(self) -> bool:
        return self.root.is_file()

    def files(self, accept: Accept) -> list[LocalFile]:
        """The files ``accept`` takes, in listing order (real files only; links are refused)."""
        return self._zip_files(accept) if self.is_zip else self._folder_files(accept)

    def _folder_files(self, accept: Accept) -> list[LocalFile]:
        out = []
        for folder, dirs, names in os.walk(self.root):
            here = Path(folder)
            for name in sorted(dirs):
                if (here / name).is_symlink():
                    raise FormatError(self.dataset, str(here / name), "is a symbolic link",
                                      "emdata imports real folders and files only; copy the data instead")
            dirs.sort()
            for name in sorted(names):
                path = here / name
                info = path.lstat()
                rel = path.relative_to(self.root).as_posix()
                if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
                    raise FormatError(self.dataset, str(path), "is a symbolic link or not a regular file",
                                      "emdata imports real files only; copy the data instead")
                got = accept(rel.split("/"), rel, info.st_size, info.st_mtime_ns)
                if got is not None:
                    out.append(got)
        return out

    def _zip_files(self, accept: Accept) -> list[LocalFile]:
        out = []
        try:
            with zipfile.ZipFile(self.root) as zf:
                for info in zf.infolist():
                    why = unsafe_name(info.filename.rstrip("/"))
                    if why is not None:
                        raise FormatError(self.dataset, f"{self.root} member {info.filename!r}", f"refused: the member {why}",
                                          "the zip is not what the authors ship; do not extract it by hand")
                    if stat.S_ISLNK(info.external_attr >> 16):
                        raise FormatError(self.dataset, f"{self.root} member {info.filename!r}",
                                          "refused: the member is a symbolic link", "the zip is not what the authors ship")
                    if info.is_dir():
                        continue
                    got = accept(info.filename.split("/"), info.filename, info.file_size, 0)
                    if got is not None:
                        out.append(got)
        except zipfile.BadZipFile as exc:
            raise FormatError(self.dataset, str(self.root), f"not a readable zip ({exc})",
                              "give the folder, or a complete .zip of it") from exc
        return out

    def where(self, f: LocalFile) -> str:
        """How messages name a source file: its path, or the zip and the member."""
        return f"{self.root} member {f.member}" if self.is_zip else str(self.root / f.member)

    def stamp(self, files: list[LocalFile]) -> dict[str, Any]:
        """The input stamp: (size, mtime) of the zip, or of each folder file (no hashing: cheap on
        every ``dvc repro``)."""
        if self.is_zip:
            info = self.root.stat()
            listed = {"": [info.st_size, info.st_mtime_ns]}
        else:
            listed = {f.member: [f.size, f.mtime_ns] for f in files}
        return {"path": str(self.path), "files": listed}

    def copy(self, files: list[LocalFile], ctx: FetchContext) -> tuple[dict[str, FetchedFile], dict[str, Any]]:
        """Each file copied into the fetch folder with its size and sha256, and the whole source's
        ``{url, size, sha256, what}`` (the zip's bytes, or the manifest of the folder's files)."""
        fetched: dict[str, FetchedFile] = {}
        whole = hashlib.sha256()
        zf = zipfile.ZipFile(self.root) if self.is_zip else None
        try:
            for f in files:
                size, digest = self._copy(f, zf, ctx.path(f.rel))
                fetched[f.rel] = FetchedFile(f"{self.url}#{f.member}", size, digest)
                if zf is None:
                    whole.update(f"{f.member}\t{size}\t{digest}\n".encode())
        finally:
            if zf is not None:
                zf.close()
        if zf is None:
            total = sum(v.size for v in fetched.values())
        else:
            total = self.root.stat().st_size
            with open(self.root, "rb") as fh:
                for block in iter(lambda: fh.read(BLOCK), b""):
                    whole.update(block)
        what = "zip archive" if self.is_zip else "folder manifest (member, size, sha256 per line)"
        return fetched, {"url": self.url, "size": total, "sha256": whole.hexdigest(), "what": what}

    def _open(self, f: LocalFile, zf: zipfile.ZipFile | None) -> IO[bytes]:
        return zf.open(f.member) if zf is not None else open(self.root / f.member, "rb")

    def _copy(self, f: LocalFile, zf: zipfile.ZipFile | None, target: Path) -> tuple[int, str]:
        try:
            with self._open(f, zf) as src:
                return write_stream(target, iter(lambda: src.read(BLOCK), b""))
        except (OSError, zipfile.BadZipFile) as exc:
            raise FetchError(self.dataset, f"{self.root}#{f.member}", f"cannot be copied ({exc})",
                             "check the source files and the free space, then run fetch again") from exc
