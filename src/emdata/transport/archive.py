"""Safe streaming extraction of a tar archive (plain, gzip, bzip2 or xz) into a dataset's folder.

The archive is read once, member by member (``tarfile`` stream mode: no seeking, no index held),
and each accepted member is copied in 1 MiB blocks into a temporary file that is renamed when its
bytes are complete, with its sha256 computed on the way. A member is refused, with one line naming
it, when it could write anywhere but the dataset's folder or is not plain data:

- an absolute name, a ``..`` part, a backslash or NUL in the name;
- a symbolic or hard link, a device, a FIFO, or any other non-regular type;
- a member larger than the per-member cap, or a running total beyond the total cap, or more
  members than the count cap;
- two members that would land on the same file.

Safe members the caller does not expect (``accept`` returns None) are not written; they are
returned in ``Extracted.skipped`` for the fetch record, never silently dropped. Directory entries
with safe names are neither written nor listed (folders are created as files need them).
"""

from __future__ import annotations

import posixpath
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from emdata.core.atomic import write_stream
from emdata.errors import EmdataError, FormatError

BLOCK = 1 << 20


class ArchiveDamaged(FormatError):
    """The archive's bytes end early or do not decode: downloading it again may help."""


@dataclass(frozen=True)
class Limits:
    member_bytes: int
    total_bytes: int
    members: int = 1_000_000


@dataclass
class Extracted:
    files: dict[str, tuple[int, str]] = field(default_factory=dict)  # relpath -> (size, sha256)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # name, type, size, reason
    members: int = 0
    total: int = 0


_TYPES = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a character device",
          tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}


def unsafe_name(name: str) -> str | None:
    """Why a member name could escape the folder it is extracted into (None if it cannot)."""
    if not name or "\x00" in name or "\\" in name:
        return "has an empty name or one with a NUL or backslash"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "has an absolute name"
    if ".." in name.split("/"):
        return "has a '..' part"
    if posixpath.normpath(name).startswith(".."):
        return "points outside the archive's folder"
    return None


def extract_tar(archive: Path, dest_of: Callable[[str], Path], *, dataset: str, url: str,
                accept: Callable[[str], str | None], limits: Limits, hint: str = "") -> Extracted:
    """Extract the members ``accept`` maps to a relative path (``dest_of(relpath)`` gives the file).

    Raises FormatError naming ``url`` and the member for an unsafe member, a cap exceeded, or a
    damaged or truncated archive, and OutputError naming the file for a failed write (full disk);
    files already extracted stay in the destination folder (the caller's partial folder) and are
    never published.
    """
    hint = hint or "the archive is not what the service normally serves; do not extract it by hand"
    out = Extracted()

    def fail(member: str, problem: str, advice: str = hint) -> FormatError:
        return FormatError(dataset, f"{url} member {member!r}", problem, advice)

    try:
        with open(archive, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                out.members += 1
                name = member.name
                if out.members > limits.members:
                    raise fail(name, f"the archive holds more than {limits.members} members")
                why = unsafe_name(name)
                if why is not None:
                    raise fail(name, f"refused: the member {why}")
                if member.type in _TYPES or member.issym() or member.islnk():
                    target = f" -> {member.linkname!r}" if member.linkname else ""
                    raise fail(name, f"refused: the member is {_TYPES.get(member.type, 'a link')}{target}")
                if member.isdir():
                    continue
                if not member.isreg():
                    raise fail(name, f"refused: member type {member.type!r} is not a regular file")
                if member.size > limits.member_bytes:
                    raise fail(name, f"refused: {member.size} bytes, more than the per-member cap of "
                               f"{limits.member_bytes}", "raise the cap in params.yaml if the service really "
                               "ships files this large")
                out.total += member.size
                if out.total > limits.total_bytes:
                    raise fail(name, f"refused: the archive's files pass the total cap of {limits.total_bytes} "
                               "bytes", "raise the cap in params.yaml if the study is really this large")
                rel = accept(posixpath.normpath(name))
                if rel is None:
                    out.skipped.append({"name": name, "size": int(member.size), "reason": "unexpected name"})
                    continue
                if rel in out.files:
                    raise fail(name, f"refused: a second member lands on {rel!r}")
                out.files[rel] = _copy(tar, member, dest_of(rel), dataset, fail)
    except EmdataError:  # a refused member, or core.atomic's OutputError for a failed write
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as exc:
        last = f" (after {out.members} members)" if out.members else ""
        raise ArchiveDamaged(dataset, url, f"the archive is damaged or truncated{last}: {type(exc).__name__}: {exc}",
                          "run the same command again to download it again; if it fails the same way, the "
                          "file on the server is damaged") from exc
    return out


def _copy(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, dataset: str,
          fail: Callable[[str, str], FormatError]) -> tuple[int, str]:
    """Copy one member into ``target`` through core.atomic's temporary (opened without following a link).

    A failed write (full disk...) is core.atomic's OutputError naming ``target``; an error of the
    archive itself (truncated, damaged) passes through for :func:`extract_tar` to report.
    """
    source = tar.extractfile(member)
    if source is None:
        raise fail(member.name, "refused: the member has no data")

    def blocks() -> Iterator[bytes]:
        size = 0
        while block := source.read(BLOCK):
            size += len(block)
            yield block
        if size != member.size:  # raised inside write_stream: the temporary is removed, nothing published
            raise EOFError(f"member {member.name!r} ends after {size} of {member.size} bytes")

    return write_stream(target, blocks(), dataset=dataset)
