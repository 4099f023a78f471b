"""Pieces shared by the sources: remote file specs, fetch/plan of file lists, lazy volumes."""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..config import Section, as_int, as_sha256, as_str
from ..errors import ConfigError
from ..indexing import basic_box
from ..io.http import HttpClient, sha256_file


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: where it lives and what it must be."""

    name: str
    url: str
    size: int | None = None
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FilePlan:
    name: str
    url: str
    size: int | None
    to_transfer: int | None
    requests: int
    state: str  # "done", "resume", "new"


def parse_file_spec(sec: Section, base_url: str) -> RemoteFile:
    """``{file, size?, sha256?}`` under ``base_url`` (a folder URL ending in ``/``)."""
    name = sec.required("file", as_str)
    if "/" in name or name in {".", ".."}:
        raise ConfigError(f"params.yaml: {sec.path}.file: a plain file name is expected, got {name!r}")
    spec = RemoteFile(
        name=name,
        url=urllib.parse.urljoin(base_url, urllib.parse.quote(name)),
        size=sec.optional("size", as_int),
        sha256=sec.optional("sha256", as_sha256),
    )
    sec.finish()
    return spec


def plan_files(client: HttpClient, files: Iterable[RemoteFile], partial: Path) -> list[FilePlan]:
    """Sizes from params or a HEAD request, less what a resumable ``.part`` already holds."""
    plans = []
    for spec in files:
        done = partial / spec.name
        part = partial / (spec.name + ".part")
        if done.exists():
            plans.append(FilePlan(spec.name, spec.url, done.stat().st_size, 0, 0, "done"))
            continue
        size, requests = spec.size, 0
        if size is None:
            size, requests = client.head(spec.url).size, 1
        have = part.stat().st_size if part.exists() else 0
        left = None if size is None else max(0, size - have)
        plans.append(FilePlan(spec.name, spec.url, size, left, requests + 1, "resume" if have else "new"))
    return plans


def fetch_files(client: HttpClient, files: Iterable[RemoteFile], dest: Path) -> dict[str, Any]:
    """Download each file into ``dest`` (skipping finished ones); return what was fetched."""
    record = {}
    for spec in files:
        target = dest / spec.name
        if target.exists():  # finished by an earlier, interrupted fetch
            digest = sha256_file(target)
        else:
            digest = client.download(spec.url, target, size=spec.size, sha256=spec.sha256,
                                     label=f"{client.dataset}: {spec.name}").sha256
        record[spec.name] = {"url": spec.url, "size": target.stat().st_size, "sha256": digest}
    return record


class RawVolume:
    """A lazy, read-only ZYX view over a dataset's raw files.

    Subclasses set ``shape``/``dtype`` and implement ``read(z0, z1)``, which returns the full
    YX extent of sections ``z0:z1``. Slicing with unit steps is provided on top of it.
    """

    shape: tuple[int, int, int]
    dtype: np.dtype

    def read(self, z0: int, z1: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "RawVolume":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, index: Any) -> np.ndarray:
        """numpy-style basic indexing (integers, unit-step slices, Ellipsis) in voxels."""
        start, stop, squeeze = basic_box(index, self.shape, getattr(self, "dataset", "volume"))
        z0, z1 = start[0], stop[0]
        data = self.read(z0, z1)[:, start[1]:stop[1], start[2]:stop[2]]
        return data.squeeze(axis=squeeze) if squeeze else data


def json_safe(value: Any) -> Any:
    """Round-trip through JSON with numpy scalars and bytes made plain."""

    def default(obj: Any) -> Any:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, bytes):
            return obj.decode("utf-8", "replace")
        return str(obj)

    return json.loads(json.dumps(value, default=default))


class ArrayVolume(RawVolume):
    """An in-memory array as a RawVolume (tests, replicas, small derived volumes)."""

    def __init__(self, array: np.ndarray, dataset: str = "array") -> None:
        if array.ndim != 3:
            raise ConfigError(f"{dataset}: a 3D array is expected, got shape {array.shape}")
        self.array = array
        self.dataset = dataset
        self.shape = tuple(array.shape)
        self.dtype = array.dtype

    def read(self, z0: int, z1: int) -> np.ndarray:
        return np.ascontiguousarray(self.array[z0:z1])
