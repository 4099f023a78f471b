"""``RemoteStorage``: an emdata HDF5 read in place from a DVC remote, by byte ranges.

Where the file and its chunk-offset index lie in the remote is resolved by
:func:`emdata.access.versions.remote_storage` (DVC's API: the md5 in ``dvc.lock`` at a rev, the
remote's content-addressed layout, endpoint and credentials). The index that normalize wrote
beside the metadata record (``data/metadata/<name>.chunks``, :mod:`emdata.h5.chunk_index`, pushed
with the HDF5) says where each chunk lies, so a read fetches only the chunks a box touches, with
range requests through the remote's fsspec filesystem (s3fs for S3), concurrently, and adjacent
chunks in one request. Compressed chunks are decoded by HDF5's own filter pipeline (hdf5plugin),
as h5py would decode them (:class:`emdata.h5.chunks.ChunkDecoder`). Per-chunk label statistics
(for samplers' ``min_foreground``) are one contiguous extent the index also records.

A :class:`~emdata.access.volume.Volume` on this storage has the whole reading API (slicing,
``read``, ``read_roi``, ``blocks``, ``to_dask``, labels, metadata, samplers, tiled inference);
``transfer`` counts the requests and bytes it made. The index tables are read in pages on demand
(the whole index at once when it is small), so opening a 1 TB-class file fetches a few KB and
never builds one Python object per chunk.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emdata.access.storage import ArrayInfo
from emdata.errors import ConfigError, FetchError
from emdata.h5 import hdf5
from emdata.h5.chunk_index import ENTRY, PREFIX, ArrayIndex, ChunkIndex
from emdata.h5.chunks import ChunkDecoder

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


class RemoteStorage:
    """One emdata HDF5 that stays in a DVC remote: reads fetch only the chunks they touch.

    ``index`` is the file's chunk-offset index (read from the remote too), ``data`` the file's bytes.
    """

    path: Path | None = None  # no local file: nothing may open one behind this storage's back

    def __init__(self, index: RemoteIndex, data: RangeReader) -> None:
        self.index, self.data = index, data
        self.name = data.dataset
        self.location = data.url
        self._decoders: dict[str, ChunkDecoder] = {}

    def __repr__(self) -> str:
        return f"RemoteStorage({self.location!r})"

    @property
    def transfer(self) -> Transfer:
        """Requests and bytes fetched so far (index and chunks)."""
        return self.data.transfer

    def describe(self, array: str, name: str) -> ArrayInfo:
        a = self.index.index.arrays.get(array)
        if a is None:
            raise ConfigError(f"{name}: the file has no array /{array}")
        labels = sorted(n.split("/", 1)[1] for n in self.index.index.arrays if n.startswith(hdf5.LABELS + "/"))
        return ArrayInfo(tuple(a.shape), a.dtype, tuple(a.chunks), dict(a.attrs),
                         tuple(labels) if array == hdf5.RAW else ())

    def root_attrs(self, array: str) -> dict[str, Any]:
        return self.index.index.root_attrs

    def identity(self) -> str:
        return self.location

    def close(self) -> None:
        pass  # nothing stays open: every read is its own requests

    def chunk_foreground(self, label: str) -> np.ndarray | None:
        """The label's per-chunk statistics: one contiguous extent of the file, read in one request."""
        extent = self.index.index.contiguous.get(f"{hdf5.LABEL_STATS}/{label}/chunk_foreground")
        if extent is None:
            return None
        blob = self.data.read([(int(extent["offset"]), int(extent["offset"]) + int(extent["size"]))])[0]
        return np.frombuffer(blob, np.dtype(extent["dtype"])).reshape(extent["shape"]).copy()

    def chunk_ranges(self, array: str, start: tuple[int, ...], stop: tuple[int, ...]) -> tuple[list, np.ndarray]:
        """The chunk grid indices a box touches and their index rows (for planning and accounting)."""
        a = self.index.index.arrays[array]
        axes = [np.arange(s // c, (e - 1) // c + 1) for s, e, c in zip(start, stop, a.chunks)]
        ks = [tuple(int(v) for v in k) for k in np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)]
        flats = np.array([a.flat(k) for k in ks], np.int64)
        return ks, self.index.rows(a, flats)

    def _decoder(self, a: ArrayIndex) -> ChunkDecoder:
        decoder = self._decoders.get(a.name)
        if decoder is None:
            decoder = self._decoders[a.name] = ChunkDecoder(a.dtype, a.chunks, a.compression, a.compression_level)
        return decoder

    def read_box(self, array: str, start: tuple[int, ...], stop: tuple[int, ...]) -> np.ndarray:
        start = tuple(int(v) for v in start)
        stop = tuple(int(v) for v in stop)
        a = self.index.index.arrays[array]
        out = np.empty(tuple(b - s for s, b in zip(start, stop)), a.dtype)
        ks, rows = self.chunk_ranges(array, start, stop)
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
        for (base, _), group, blob in zip(requests, members, self.data.read(requests, chunk_payload=True)):
            view = memoryview(blob)
            for i in group:
                o = int(rows[i]["offset"]) - base
                payloads[i] = view[o:o + int(rows[i]["size"])]
        decoder = self._decoder(a)
        for i, k in enumerate(ks):
            chunk_start = [kk * c for kk, c in zip(k, a.chunks)]
            lo = [max(s, cs) for s, cs in zip(start, chunk_start)]
            hi = [min(e, cs + c) for e, cs, c in zip(stop, chunk_start, a.chunks)]
            dst = tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))
            if i not in payloads:
                out[dst] = a.fill_value  # never written: HDF5 returns the fill value
                continue
            block = decoder.decode(payloads[i], int(rows[i]["mask"]))
            out[dst] = block[tuple(slice(l - cs, h - cs) for l, h, cs in zip(lo, hi, chunk_start))]
        return out
