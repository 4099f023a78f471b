"""The chunk-offset index of a canonical HDF5: where every chunk of every array lies in the file.

normalize writes ``data/metadata/<ds>.chunks`` beside the metadata record (both DVC outputs of
``normalize@<ds>``). With it a reader finds any chunk without parsing HDF5's B-trees: a remote
reader fetches only the byte ranges an ROI touches (:mod:`emdata.access.remote`), and the local
memory-mapped fast path opens a 1 TB-class file without walking millions of chunk records
(HDF5's own per-chunk queries are linear in the chunk count).

Layout (little-endian; version 1)::

    magic      8 bytes  b"EMDCIDX1"
    length     uint64   n, the byte length of the header
    header     n bytes  JSON (sorted keys): file name, size and sha256; root attributes; for each
                        chunked array its shape, dtype, chunk shape, grid, filters, compression,
                        attributes and where its table starts (``table``, relative to the end of
                        the header); contiguous datasets (label_stats) as one extent each
    tables     per array, one 16-byte entry per chunk in C order of the chunk grid:
                        offset uint64, size uint32, filter_mask uint32 (size 0: never written)

The tables are plain arrays: a reader maps or range-reads them and never builds one Python
object per chunk (a 10k^3 uint8 volume in 64^3 chunks has 3.8 million). The file is deterministic:
the same HDF5 gives the same index bytes. :func:`to_kerchunk` exports kerchunk's JSON reference
format (version 1) for small files, for tools that read through fsspec's ``ReferenceFileSystem``.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from emdata.core.atomic import write_bytes_atomic
from emdata.h5 import hdf5

MAGIC = b"EMDCIDX1"
VERSION = 1
ENTRY = np.dtype([("offset", "<u8"), ("size", "<u4"), ("mask", "<u4")])
PREFIX = 16  # magic + header length


def index_path_for(record_path: Path) -> Path:
    """``data/metadata/<ds>.chunks`` beside ``data/metadata/<ds>.json``."""
    return record_path.with_suffix(".chunks")


def _filters(dset: Any) -> list[list[Any]]:
    plist = dset.id.get_create_plist()
    out = []
    for i in range(plist.get_nfilters()):
        code, flags, values, name = plist.get_filter(i)
        out.append([int(code), int(flags), [int(v) for v in values],
                    name.decode(errors="replace") if isinstance(name, bytes) else str(name)])
    return out


# HDF5 filter ids of the codecs a ChunkDecoder knows (hdf5plugin's registered ids).
FILTER_CODECS = {32015: "zstd", 32001: "blosc-lz4"}


def _compression(name: str, filters: list[list[Any]]) -> str:
    """The codec of an array, from its own filter pipeline (not from what params say was asked for)."""
    if not filters:
        return "none"
    codecs = [FILTER_CODECS.get(f[0]) for f in filters]
    if len(codecs) != 1 or codecs[0] is None:
        raise IndexFormatError(f"/{name} has HDF5 filters {[f[3] or f[0] for f in filters]} that a chunk index "
                               f"cannot describe (known: {', '.join(sorted(FILTER_CODECS.values()))})")
    return codecs[0]


def _chunk_table(dset: Any) -> np.ndarray:
    """One entry per chunk of ``dset`` in C order of its chunk grid (one pass over HDF5's index)."""
    chunks = tuple(dset.chunks)
    grid = tuple(-(-s // c) for s, c in zip(dset.shape, chunks))
    table = np.zeros(grid, ENTRY)

    def visit(info: Any) -> None:
        k = tuple(o // c for o, c in zip(info.chunk_offset, chunks))
        table[k] = (info.byte_offset, info.size, info.filter_mask)

    if hasattr(dset.id, "chunk_iter"):
        dset.id.chunk_iter(visit)
    else:  # pragma: no cover - HDF5 < 1.14: walks the index per call, fine for the files this library writes
        for i in range(dset.id.get_num_chunks()):
            visit(dset.id.get_chunk_info(i))
    return table.reshape(-1)


def build(h5_path: Path, *, file_name: str, file_sha256: str) -> bytes:
    """The index of the canonical HDF5 at ``h5_path`` (to be published as ``file_name``)."""
    arrays: dict[str, Any] = {}
    contiguous: dict[str, Any] = {}
    tables: list[bytes] = []
    position = 0
    with hdf5.open_read(h5_path) as f:
        root = hdf5.read_attrs(f)
        params = json.loads(root.get("params", "{}")).get("normalize", {})
        names: list[str] = []
        f.visititems(lambda name, obj: names.append(name) if hasattr(obj, "shape") else None)
        for name in sorted(names):
            dset = f[name]
            if dset.ndim != 3 and dset.chunks is not None:
                continue
            if dset.chunks is None:
                if dset.dtype.kind in "biuf" and dset.id.get_offset() is not None:
                    contiguous[name] = {"shape": list(dset.shape), "dtype": dset.dtype.str,
                                        "offset": int(dset.id.get_offset()), "size": int(dset.id.get_storage_size())}
                continue
            table = _chunk_table(dset)
            arrays[name] = {
                "shape": list(dset.shape), "dtype": dset.dtype.str, "chunks": list(dset.chunks),
                "grid": [-(-s // c) for s, c in zip(dset.shape, dset.chunks)],
                "fill_value": dset.fillvalue.item() if hasattr(dset.fillvalue, "item") else dset.fillvalue,
                "filters": _filters(dset),
                "compression": _compression(name, _filters(dset)),
                "compression_level": int(params.get("compression_level", 0)),
                "attrs": hdf5.read_attrs(dset), "table": position, "entries": int(table.size),
            }
            tables.append(table.tobytes())
            position += len(tables[-1])
    header = {
        "format": "emdata-chunk-index", "version": VERSION,
        "file": {"name": file_name, "size": int(Path(h5_path).stat().st_size), "sha256": file_sha256},
        "root_attrs": root, "arrays": arrays, "contiguous": contiguous, "entry": "offset <u8, size <u4, mask <u4",
    }
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + len(text).to_bytes(8, "little") + text + b"".join(tables)


def write(h5_path: Path, index_path: Path, *, file_name: str, file_sha256: str) -> None:
    write_bytes_atomic(index_path, build(h5_path, file_name=file_name, file_sha256=file_sha256))


class IndexFormatError(ValueError):
    """Not an emdata chunk index (or of a newer version)."""


@dataclass(frozen=True)
class ArrayIndex:
    """The chunks of one array; ``entries(flat)`` gives table rows for flat chunk numbers."""

    name: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    chunks: tuple[int, int, int]
    grid: tuple[int, int, int]
    compression: str
    compression_level: int
    filters: list
    fill_value: Any
    attrs: dict[str, Any]
    table_start: int  # absolute offset of the table in the index file
    entries_count: int

    @property
    def chunk_bytes(self) -> int:
        return int(np.prod(self.chunks)) * self.dtype.itemsize

    def flat(self, k: tuple[int, ...]) -> int:
        return (k[0] * self.grid[1] + k[1]) * self.grid[2] + k[2]


class ChunkIndex:
    """A parsed index; the tables stay where they are (a memory map, or remote pages read on demand)."""

    def __init__(self, header: dict[str, Any], data_start: int,
                 table: Callable[["ArrayIndex"], np.ndarray] | None = None) -> None:
        if header.get("format") != "emdata-chunk-index" or header.get("version") != VERSION:
            raise IndexFormatError(f"unsupported chunk index (format {header.get('format')!r}, "
                                   f"version {header.get('version')!r})")
        self.header = header
        self.file = header["file"]
        self.root_attrs: dict[str, Any] = header["root_attrs"]
        self.contiguous: dict[str, Any] = header.get("contiguous", {})
        self.arrays = {
            name: ArrayIndex(name, tuple(a["shape"]), np.dtype(a["dtype"]), tuple(a["chunks"]), tuple(a["grid"]),
                             a["compression"], int(a["compression_level"]), a["filters"], a["fill_value"], a["attrs"],
                             data_start + int(a["table"]), int(a["entries"]))
            for name, a in header["arrays"].items()
        }
        self._table = table

    def table(self, array: str) -> np.ndarray:
        """The whole table of ``array`` (a memory map for a local index)."""
        if self._table is None:
            raise IndexFormatError("this index has no table access")
        return self._table(self.arrays[array])

    @staticmethod
    def parse_prefix(prefix: bytes) -> tuple[int, int]:
        """(header length, where the tables start) from the first 16 bytes."""
        if len(prefix) < PREFIX or prefix[:8] != MAGIC:
            raise IndexFormatError("not an emdata chunk index (bad magic)")
        length = int.from_bytes(prefix[8:16], "little")
        return length, PREFIX + length

    @classmethod
    def from_bytes(cls, head: bytes, read: Callable[[int, int], bytes] | None = None) -> "ChunkIndex":
        """From the first bytes of an index (at least the header); ``read(start, stop)`` fetches more."""
        length, start = cls.parse_prefix(head[:PREFIX])
        if len(head) < start:
            if read is None:
                raise IndexFormatError("truncated chunk index header")
            head = head + read(len(head), start)
        header = json.loads(head[PREFIX:start])
        return cls(header, start)

    @classmethod
    def open(cls, path: Path) -> "ChunkIndex":
        """A local index; its tables are memory-mapped, read only where touched.

        Header and tables come from the one file opened here: mapping the path again would read the
        tables of whatever index has replaced it since (normalize renames a new one over it).
        """
        with open(path, "rb") as fh:
            prefix = fh.read(PREFIX)
            length, start = cls.parse_prefix(prefix)
            header = json.loads(fh.read(length))
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)  # keeps its own descriptor

        def table(a: ArrayIndex) -> np.ndarray:
            return np.frombuffer(mapped, ENTRY, count=a.entries_count, offset=a.table_start)

        return cls(header, start, table)


def to_kerchunk(index: ChunkIndex, url: str) -> dict[str, Any]:
    """kerchunk's JSON references (version 1) to the HDF5 at ``url``: zarr v2 metadata per array
    plus ``[url, offset, size]`` per chunk. For small files: this builds one entry per chunk."""
    codecs = {"none": None, "zstd": lambda lvl: {"id": "zstd", "level": lvl},
              "blosc-lz4": lambda lvl: {"id": "blosc", "cname": "lz4", "clevel": lvl, "shuffle": 1, "blocksize": 0}}
    refs: dict[str, Any] = {".zgroup": json.dumps({"zarr_format": 2}),
                            ".zattrs": json.dumps(index.root_attrs, sort_keys=True)}
    for name, a in index.arrays.items():
        codec = codecs[a.compression]
        refs[f"{name}/.zarray"] = json.dumps({
            "zarr_format": 2, "shape": list(a.shape), "chunks": list(a.chunks), "dtype": a.dtype.str,
            "order": "C", "fill_value": a.fill_value, "filters": None,
            "compressor": codec(a.compression_level) if callable(codec) else None,
        })
        refs[f"{name}/.zattrs"] = json.dumps({**a.attrs, "_ARRAY_DIMENSIONS": ["z", "y", "x"]}, sort_keys=True)
        table = index.table(name)
        for flat in np.flatnonzero(table["size"]):
            k = np.unravel_index(int(flat), a.grid)
            row = table[int(flat)]
            refs[f"{name}/{'.'.join(str(int(i)) for i in k)}"] = [url, int(row["offset"]), int(row["size"])]
    return {"version": 1, "refs": refs}


def local_table(h5_path: Path, array: str, dset: Any, explicit: Path | None = None) -> np.ndarray | None:
    """The index table of ``array`` for the local file ``h5_path``, if an index that matches it is found.

    Looked for at ``explicit``, beside the file (``<name>.chunks``) and in the repository layout
    (``data/metadata/<name>.chunks`` for ``data/processed/<name>.h5``). It must describe a file of
    this size with this array's layout and ``array_sha256``, and its first and last entries must be
    where HDF5's own index puts those chunks; otherwise it is ignored. Everything is checked against
    the file ``dset`` belongs to (its open descriptor), not the path, which may name a newer file.
    """
    h5_path = Path(h5_path)
    opened_size = os.fstat(dset.file.id.get_vfd_handle()).st_size
    candidates = [explicit] if explicit is not None else []
    candidates += [h5_path.with_suffix(".chunks"), h5_path.parent.parent / "metadata" / f"{h5_path.stem}.chunks"]
    for path in candidates:
        if path is None or not Path(path).is_file():
            continue
        try:
            index = ChunkIndex.open(Path(path))
            a = index.arrays.get(array)
            if a is None or index.file.get("size") != opened_size:
                continue
            if (a.shape, a.dtype, a.chunks) != (tuple(dset.shape), dset.dtype, tuple(dset.chunks)):
                continue
            attr = dset.attrs.get("array_sha256")
            if attr is None or str(a.attrs.get("array_sha256")) != (attr.decode() if isinstance(attr, bytes) else str(attr)):
                continue
            table = index.table(array)
            if _spot_check(dset, a, table):
                return table
        except (OSError, ValueError, KeyError, RuntimeError, IndexFormatError):
            continue
    return None


def _spot_check(dset: Any, a: ArrayIndex, table: np.ndarray) -> bool:
    """The first and last entries say what HDF5's own chunk index of the open file says (an
    unallocated chunk included: a check that skipped those passed for any table of zeros)."""
    flats = [0, table.size - 1] if table.size > 1 else [0]
    for flat in flats:
        row = table[flat]
        coord = tuple(int(i) * c for i, c in zip(np.unravel_index(flat, a.grid), a.chunks))
        info = dset.id.get_chunk_info_by_coord(coord)
        if info.byte_offset is None:  # not allocated: the index must say so too
            if int(row["size"]) != 0:
                return False
        elif (int(row["offset"]), int(row["size"]), int(row["mask"])) != (
                int(info.byte_offset), int(info.size), int(info.filter_mask)):
            return False
    return True
