"""ROI reads straight from a DVC remote: ``open_dataset(name, rev=..., remote="s3")``.

No ``dvc pull``: DVC's own API says which object holds ``data/processed/<name>.h5`` at ``rev``
(its md5 in ``dvc.lock``) and where the remote keeps it (the content-addressed layout,
``<remote url>/files/md5/<first 2 hex>/<rest>`` for DVC 3, with the remote's configured
endpoint and credentials). The chunk-offset index that normalize wrote beside the metadata
record (``data/metadata/<name>.chunks``, :mod:`emdata.h5.chunk_index`, pushed with the HDF5) says
where each chunk lies in that object, so a read fetches only the chunks the ROI touches, with
HTTP range requests through the remote's fsspec filesystem (s3fs for S3), concurrently, and
adjacent chunks in one request. Compressed chunks are decoded by HDF5's own filter pipeline
(hdf5plugin), as h5py would decode them (:class:`emdata.h5.chunks.ChunkDecoder`).

The result is a :class:`RemoteVolume`, a :class:`~emdata.access.volume.Volume` with the same
reading API (slicing, ``read``, ``read_roi``, ``blocks``, ``to_dask``, labels, metadata);
``transfer`` counts the requests and bytes it made. The index tables are read in pages on
demand (the whole index at once when it is small), so opening a 1 TB-class file fetches a
few KB and never builds one Python object per chunk.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from emdata.h5.chunk_index import ENTRY, PREFIX, ArrayIndex, ChunkIndex, IndexFormatError, index_path_for
from emdata.errors import ConfigError, FetchError, NotBuiltError
from emdata.h5 import hdf5
from emdata.h5.chunks import ChunkDecoder
from emdata.access.volume import Volume, _geometry

HEAD_BYTES = 1 << 20  # an index up to this size is read whole at open
PAGE_ENTRIES = 4096  # index table entries per page read on demand (64 KiB)
MAX_REQUEST = 64 << 20  # adjacent chunks are merged into one range request up to this size


@dataclass
class Transfer:
    """Requests and bytes a remote volume has fetched (index and chunks), counted at the client."""

    requests: int = 0
    bytes: int = 0
    chunk_bytes: int = 0  # bytes of chunk payloads among ``bytes``
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, requests: int, nbytes: int, chunk_bytes: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes += nbytes
            self.chunk_bytes += chunk_bytes

    def reset(self) -> None:
        with self._lock:
            self.requests = self.bytes = self.chunk_bytes = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"requests": self.requests, "bytes": self.bytes, "chunk_bytes": self.chunk_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class RangeReader:
    """Byte ranges of one object through an fsspec filesystem (concurrent for async ones like s3fs)."""

    def __init__(self, fs: Any, path: str, size: int, url: str, dataset: str, transfer: Transfer) -> None:
        self.fs, self.path, self.size, self.url, self.dataset = fs, path, size, url, dataset
        self.transfer = transfer

    def read(self, ranges: list[tuple[int, int]], chunk_payload: bool = False) -> list[bytes]:
        if not ranges:
            return []
        starts = [int(a) for a, _ in ranges]
        ends = [int(b) for _, b in ranges]
        try:
            parts = self.fs.cat_ranges([self.path] * len(ranges), starts, ends, on_error="return")
        except Exception as exc:  # noqa: BLE001 - one line naming the object
            parts = [exc]
        out = []
        for part, a, b in zip(parts, starts, ends):
            if isinstance(part, BaseException) or len(part) != b - a:
                problem = (f"{type(part).__name__}: {part}" if isinstance(part, BaseException)
                           else f"got {len(part)} bytes for the range {a}-{b}")
                raise FetchError(self.dataset, self.url, f"range read failed ({problem})",
                                 "check the remote's endpoint and credentials, or `dvc pull` the file")
            out.append(part)
        total = sum(len(p) for p in out)
        self.transfer.add(len(out), total, total if chunk_payload else 0)
        return out


class RemoteIndex:
    """A chunk index read from the remote: header at open, table pages on demand."""

    def __init__(self, reader: RangeReader) -> None:
        self.reader = reader
        # A small index is read whole in one request; a large one, its header first (tables on demand).
        first = reader.size if reader.size <= HEAD_BYTES else min(reader.size, 64 << 10)
        head = reader.read([(0, first)])[0]
        length, start = ChunkIndex.parse_prefix(head[:PREFIX])
        if start > len(head):
            head += reader.read([(len(head), start)])[0]
        self.index = ChunkIndex(json.loads(head[PREFIX:start]), start, self.table)
        self._whole = head if len(head) == reader.size else None
        self._pages: dict[tuple[str, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def table(self, a: ArrayIndex) -> np.ndarray:
        """The whole table of one array (every page; for exports such as kerchunk references)."""
        return self.rows(a, np.arange(a.entries_count))

    def rows(self, a: ArrayIndex, flats: np.ndarray) -> np.ndarray:
        """Table entries of the given flat chunk numbers."""
        if self._whole is not None:
            table = np.frombuffer(self._whole, ENTRY, a.entries_count, a.table_start)
            return table[flats]
        pages = np.unique(flats // PAGE_ENTRIES)
        with self._lock:
            missing = [int(p) for p in pages if (a.name, int(p)) not in self._pages]
        if missing:
            ranges: list[tuple[int, int]] = []
            for p in missing:  # one request per run of consecutive pages
                lo = a.table_start + p * PAGE_ENTRIES * ENTRY.itemsize
                hi = a.table_start + min(a.entries_count, (p + 1) * PAGE_ENTRIES) * ENTRY.itemsize
                if ranges and ranges[-1][1] == lo:
                    ranges[-1] = (ranges[-1][0], hi)
                else:
                    ranges.append((lo, hi))
            blobs = self.reader.read(ranges)
            with self._lock:
                for (lo, hi), blob in zip(ranges, blobs):
                    first = (lo - a.table_start) // ENTRY.itemsize // PAGE_ENTRIES
                    entries = np.frombuffer(blob, ENTRY)
                    for i in range(0, entries.size, PAGE_ENTRIES):
                        self._pages[(a.name, first + i // PAGE_ENTRIES)] = entries[i:i + PAGE_ENTRIES]
        with self._lock:
            return np.array([self._pages[(a.name, int(f) // PAGE_ENTRIES)][int(f) % PAGE_ENTRIES] for f in flats],
                            ENTRY)


class RemoteVolume(Volume):
    """One array of an emdata HDF5 that stays in a DVC remote; reads fetch only the chunks they touch."""

    def __init__(self, index: RemoteIndex, data: RangeReader, array: str = hdf5.RAW, *, name: str) -> None:
        # Volume.__init__ opens a local file; everything it sets comes from the index instead.
        if array not in index.index.arrays:
            raise ConfigError(f"{name}: the file has no array /{array}")
        a = index.index.arrays[array]
        self._remote_index, self._data = index, data
        self._array_index = a
        self.path = Path(data.url)  # for messages and dask names; never opened
        self.url = data.url
        self.array = array
        self.name = name
        self.index = None
        self._handle = None
        self.shape = tuple(a.shape)  # type: ignore[assignment]
        self.dtype = a.dtype
        self.chunks = tuple(a.chunks)
        self.attrs = dict(a.attrs)
        if "resolution" not in self.attrs:
            raise ConfigError(f"{name}: /{array} records no resolution")
        planar = len(self.shape) == 2 or "z" not in str(self.attrs.get("axes", "zyx")).lower()
        where = f"{self.url}:/{array}"
        self.resolution = _geometry(None, self.attrs["resolution"], "resolution", planar, self, where, positive=True)
        self.offset = _geometry(None, self.attrs.get("offset", (0.0, 0.0, 0.0)), "offset", planar, self, where,
                                positive=False)
        self.label_names = sorted(n.split("/", 1)[1] for n in index.index.arrays
                                  if n.startswith(hdf5.LABELS + "/")) if array == hdf5.RAW else []
        self._decoder = ChunkDecoder(a.dtype, a.chunks, a.compression, a.compression_level)

    @property
    def transfer(self) -> Transfer:
        return self._data.transfer

    def identity(self) -> str:
        return self.url

    def close(self) -> None:
        pass

    def _open(self) -> Any:
        """There is no local file: what needs one (a sampler's per-chunk label statistics) says so."""
        raise ConfigError(f"{self.name}: this needs the HDF5 file itself (e.g. min_foreground reads per-chunk label "
                          f"statistics), which a remote volume does not open; `dvc pull` it and open it without remote=")

    def __repr__(self) -> str:
        return (f"RemoteVolume({self.name!r}, /{self.array}, shape={self.shape}, dtype={self.dtype}, "
                f"url={self.url!r})")

    @property
    def labels(self) -> dict[str, "Volume"]:
        return {n: RemoteVolume(self._remote_index, self._data, f"{hdf5.LABELS}/{n}", name=f"{self.name}:{n}")
                for n in self.label_names}

    @property
    def metadata(self) -> dict[str, Any]:
        from emdata.access.volume import file_metadata

        return file_metadata(self._remote_index.index.root_attrs, self.attrs)

    def chunk_ranges(self, start: tuple[int, ...], stop: tuple[int, ...]) -> tuple[list, np.ndarray]:
        """The chunk grid indices a box touches and their index rows (for planning and accounting)."""
        a = self._array_index
        axes = [np.arange(s // c, (e - 1) // c + 1) for s, e, c in zip(start, stop, a.chunks)]
        ks = [tuple(int(v) for v in k) for k in np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)]
        flats = np.array([a.flat(k) for k in ks], np.int64)
        return ks, self._remote_index.rows(a, flats)

    def _read_box(self, start: Any, stop: Any) -> np.ndarray:
        start = tuple(int(v) for v in start)
        stop = tuple(int(v) for v in stop)
        a = self._array_index
        out = np.empty(tuple(b - s for s, b in zip(start, stop)), self.dtype)
        ks, rows = self.chunk_ranges(start, stop)
        stored = [i for i in range(len(ks)) if rows[i]["size"]]
        order = sorted(stored, key=lambda i: int(rows[i]["offset"]))
        requests: list[tuple[int, int]] = []
        members: list[list[int]] = []
        for i in order:  # exactly adjacent chunks share one request: no byte is fetched twice or in vain
            first, end = int(rows[i]["offset"]), int(rows[i]["offset"]) + int(rows[i]["size"])
            if requests and requests[-1][1] == first and end - requests[-1][0] <= MAX_REQUEST:
                requests[-1] = (requests[-1][0], end)
                members[-1].append(i)
            else:
                requests.append((first, end))
                members.append([i])
        payloads: dict[int, memoryview] = {}
        for (base, _), group, blob in zip(requests, members, self._data.read(requests, chunk_payload=True)):
            view = memoryview(blob)
            for i in group:
                o = int(rows[i]["offset"]) - base
                payloads[i] = view[o:o + int(rows[i]["size"])]
        for i, k in enumerate(ks):
            chunk_start = [kk * c for kk, c in zip(k, a.chunks)]
            lo = [max(s, cs) for s, cs in zip(start, chunk_start)]
            hi = [min(e, cs + c) for e, cs, c in zip(stop, chunk_start, a.chunks)]
            dst = tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))
            if i not in payloads:
                out[dst] = a.fill_value  # never written: HDF5 returns the fill value
                continue
            block = self._decoder.decode(payloads[i], int(rows[i]["mask"]))
            out[dst] = block[tuple(slice(l - cs, h - cs) for l, h, cs in zip(lo, hi, chunk_start))]
        return out


def _remote_fs(odb: Any) -> Any:
    """The fsspec filesystem under a DVC object database (s3fs for S3 remotes)."""
    fs = getattr(odb.fs, "fs", None)
    return fs if fs is not None and hasattr(fs, "cat_ranges") else odb.fs


def open_remote(name: str, *, rev: str | None = None, repo: str | os.PathLike | None = None, remote: str = "s3",
                label: str | None = None, remote_config: dict[str, Any] | None = None) -> RemoteVolume:
    """``data/processed/<name>.h5`` at ``rev`` of ``repo``, read in place from the DVC remote ``remote``.

    ``remote`` names a remote of the repository's DVC config (``remote_config`` adds or overrides
    its settings, e.g. ``{"endpointurl": ...}`` for a clone without ``.dvc/config.local``).
    """
    from dvc.repo import Repo

    from emdata.params.layout import find_root, processed_relpath

    rel = processed_relpath(name)
    rel_index = str(PurePosixPath(index_path_for(Path(f"data/metadata/{name}.json"))))
    if repo is None:
        repo_str = str(find_root())
    else:
        repo_str = str(Path(repo).resolve()) if Path(repo).exists() else str(repo)
    where = f"{rel} at rev {rev!r} of {repo_str}"
    try:
        r = Repo.open(repo_str, rev=rev, uninitialized=False, subrepos=False, remote=remote,
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
    volume = RemoteVolume(index, readers[rel], hdf5.RAW, name=name)
    if label is None:
        return volume
    if label not in volume.label_names:
        raise ConfigError(f"{name}: no label {label!r} (labels: {', '.join(volume.label_names) or 'none'})")
    return RemoteVolume(index, readers[rel], f"{hdf5.LABELS}/{label}", name=f"{name}:{label}")
