"""``data/raw/<ds>/source.json``: what a fetch wrote, and the one definition of "fetched".

A raw folder is fetched for the current params when its record holds the same source spec as
params.yaml and every recorded file is present with its recorded size (and, when asked, its
recorded sha256). ``fetch``, ``plan``, ``normalize``, ``verify`` and ``list`` all ask here.
Files are keyed by their path relative to the raw folder (``a/b.tif``, zarr chunk keys).

Changed bytes of the same size are found without re-hashing every run: a :class:`HashState`
(``data/.state/<ds>.json``, a local cache like DVC's state database, never versioned) remembers
each file's sha256 together with its inode, size, mtime and ctime when it was last verified.
``fetch``'s up-to-date check and ``normalize`` pass one: a file whose stat still matches is
trusted, any other (edited in place, restored by ``dvc checkout``, copied) is hashed once more.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emdata.errors import ConfigError, IntegrityError, NotBuiltError
from emdata.core.atomic import write_json_atomic
from emdata.core.digest import sha256_file

RECORD_NAME = "source.json"
RESERVED = frozenset({RECORD_NAME, ".spec.json"})


def safe_relpath(name: str, where: str = "file name") -> str:
    """A relative POSIX path that stays inside its folder (no absolute, ``..``, empty or reserved parts)."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name or "\n" in name:
        raise ConfigError(f"{where}: {name!r} is not a usable relative path")
    norm = posixpath.normpath(name)
    if norm.startswith("/") or norm == "." or norm.split("/")[0] == ".." or norm != name or norm in RESERVED:
        raise ConfigError(f"{where}: {name!r} must be a plain relative path inside the dataset folder "
                          f"(not {', '.join(sorted(RESERVED))})")
    return norm


@dataclass(frozen=True)
class FetchedFile:
    """One file of a raw folder: where it came from and what it must be."""

    url: str
    size: int
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class FetchRecord:
    dataset: str
    kind: str
    spec: dict[str, Any]
    files: dict[str, FetchedFile] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # source-specific facts (API answers, ROI, ...)

    def to_dict(self) -> dict[str, Any]:
        out = {"dataset": self.dataset, "kind": self.kind, "spec": self.spec,
               "files": {name: f.to_dict() for name, f in sorted(self.files.items())}}
        if self.extra:
            out["extra"] = self.extra
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "FetchRecord":
        files = {safe_relpath(name): FetchedFile(str(f["url"]), int(f["size"]), f.get("sha256"))
                 for name, f in data["files"].items()}
        return cls(str(data["dataset"]), str(data["kind"]), data["spec"], files, data.get("extra") or {})

    def write(self, folder: Path) -> None:
        write_json_atomic(folder / RECORD_NAME, self.to_dict(), dataset=self.dataset)

    @classmethod
    def load(cls, folder: Path) -> "FetchRecord | None":
        """The record of ``folder``, or None when it is missing or damaged."""
        try:
            return cls.from_dict(json.loads((folder / RECORD_NAME).read_text()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, ConfigError):
            return None

    def problems(self, folder: Path, *, hashes: bool = False, state: "HashState | None" = None) -> list[str]:
        """What is wrong with the files on disk: missing, other size, other sha256.

        sha256 is checked for every file with ``hashes``, and with a ``state`` for the files whose
        stat changed since they were last verified (see :class:`HashState`).
        """
        found = []
        for name, info in sorted(self.files.items()):
            path = folder / name
            try:
                if path.is_symlink() or not path.is_file():
                    found.append(f"{name} is missing")
                    continue
                size = path.stat().st_size
            except OSError as exc:
                found.append(f"{name} cannot be read ({exc.strerror})")
                continue
            if size != info.size:
                found.append(f"{name} has {size} bytes, the fetch recorded {info.size}")
            elif info.sha256 and (hashes or state is not None) and not _hash_matches(path, name, info.sha256,
                                                                                       state, recheck=hashes):
                found.append(f"{name} does not match its recorded sha256 (its bytes changed after the fetch)")
        if state is not None:
            state.save()
        return found


def _hash_matches(path: Path, name: str, expected: str, state: "HashState | None", *, recheck: bool) -> bool:
    if state is not None and not recheck and state.verified(name, path) == expected:
        return True
    digest = sha256_file(path)
    if state is not None:
        state.remember(name, path, digest)
    return digest == expected


class HashState:
    """sha256 of raw files as last verified, keyed by what a changed file cannot keep (inode, ctime).

    An in-place edit changes mtime and ctime, a restored or copied file gets a new inode, so a
    matching entry means the bytes are the ones that were hashed. A damaged or missing state file
    only costs a re-hash.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._dirty = False
        try:  # a planted symlink is not read (it could vouch for changed bytes)
            loaded = None if path.is_symlink() else json.loads(path.read_text())
            self.entries: dict[str, dict[str, Any]] = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deep
            self.entries = {}

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def verified(self, name: str, path: Path) -> str | None:
        entry = self.entries.get(name)
        try:
            if isinstance(entry, dict) and entry.get("stat") == self._stamp(path):
                return str(entry.get("sha256"))
        except OSError:
            pass
        return None

    def remember(self, name: str, path: Path, digest: str) -> None:
        try:
            self.entries[name] = {"stat": self._stamp(path), "sha256": digest}
            self._dirty = True
        except OSError:
            pass

    def remember_record(self, folder: Path, record: "FetchRecord") -> None:
        """Files a fetch just verified while downloading (their sha256 is in the record)."""
        self.entries = {}
        for name, info in record.files.items():
            if info.sha256:
                self.remember(name, folder / name, info.sha256)
        self._dirty = True
        self.save()

    def save(self) -> None:
        if not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.entries)
            self._dirty = False
        except OSError:
            pass  # a cache: failing to keep it costs a re-hash next time, nothing else


def plain_spec(spec: dict[str, Any]) -> Any:
    """A source spec as JSON gives it back (tuples as lists...), so a stored spec compares equal."""
    return json.loads(json.dumps(spec, sort_keys=True, default=str))


def fetched(folder: Path, spec: dict[str, Any], *, hashes: bool = False,
            state: HashState | None = None) -> FetchRecord | None:
    """The record when ``folder`` is a complete fetch of ``spec``, else None (the one definition).

    Specs compare as JSON sees them, so a tuple in a source's params equals the list stored.
    """
    record = FetchRecord.load(folder)
    if record is None or record.spec != plain_spec(spec) or record.problems(folder, hashes=hashes, state=state):
        return None
    return record


def require_fetched(folder: Path, key: str, spec: dict[str, Any], *, hashes: bool = False,
                    state: HashState | None = None) -> FetchRecord:
    """Like :func:`fetched`, but says what to run when the folder is not a complete fetch of ``spec``."""
    record = FetchRecord.load(folder)
    if record is None:
        raise NotBuiltError(f"{key}: not fetched yet ({folder / RECORD_NAME} is missing or damaged); "
                            f"run `emdata fetch {key}` or `dvc pull data/raw/{key}`")
    if record.spec != plain_spec(spec):
        raise NotBuiltError(f"{key}: {folder} was fetched with other source params than params.yaml has now; "
                            f"run `emdata fetch {key}` (or `dvc repro fetch@{key}`)")
    problems = record.problems(folder, hashes=hashes, state=state)
    if problems:
        raise raw_integrity_error(key, folder, problems)
    return record


def raw_integrity_error(key: str, folder: Path, problems: list[str]) -> IntegrityError:
    """The one-line error for what is wrong with a raw folder (its first three problems)."""
    return IntegrityError(key, str(folder), "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""),
                          f"run `emdata fetch {key}` to fetch it again, or `dvc checkout data/raw/{key}`")
