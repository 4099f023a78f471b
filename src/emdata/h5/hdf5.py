"""The one writer and reader of the canonical HDF5 layout (docs/architecture.md, "HDF5 layout").

::

    /<ds>.h5     attrs: emdata_version, format_version, dataset, title, license, citation, ...
    /raw         3D ZYX, native dtype; attrs axes, unit, resolution, offset, element_size_um,
                 array_sha256, statistics (JSON)
    /labels/<n>  same conventions
    /label_stats/<n>/chunk_foreground   nonzero voxels per chunk of /labels/<n> (for samplers)

No timestamps are written, so identical inputs give bit-identical files (stable DVC hashes).
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from emdata.errors import OutputError

FORMAT_VERSION = 1
RAW = "raw"
LABELS = "labels"
LABEL_STATS = "label_stats"


def voxel_bytes(array: np.ndarray) -> memoryview:
    """The bytes ``array_sha256`` covers: C order, little-endian, whatever the array's byte order."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).data


def compression_options(compression: str, level: int) -> dict[str, Any]:
    """h5py ``create_dataset`` keywords for a compression name from params.yaml."""
    if compression == "none":
        return {}
    import hdf5plugin

    if compression == "zstd":
        return dict(hdf5plugin.Zstd(clevel=level))
    if compression == "blosc-lz4":
        return dict(hdf5plugin.Blosc(cname="lz4", clevel=level, shuffle=hdf5plugin.Blosc.SHUFFLE))
    raise ValueError(f"unknown compression {compression!r}")


def chunk_shape(chunks: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """HDF5 needs chunks no larger than a fixed-size dataset."""
    return tuple(max(1, min(c, s)) for c, s in zip(chunks, shape))


def spatial_attrs(resolution_nm: tuple[float, ...], offset_nm: tuple[float, ...]) -> dict[str, Any]:
    """The attributes that make gunpowder, CREMI readers, Fiji and ilastik see the right scale."""
    return {
        "axes": "zyx",
        "unit": "nm",
        "resolution": np.asarray(resolution_nm, np.float64),
        "offset": np.asarray(offset_nm, np.float64),
        "element_size_um": np.asarray(resolution_nm, np.float64) / 1000.0,
    }


def open_read(path: Path, cache_bytes: int | None = None):
    """Open read-only without HDF5 file locking (safe on shared and read-only storage).

    Imports hdf5plugin first, which registers the zstd/blosc filters a compressed layout needs.
    """
    import h5py
    import hdf5plugin  # noqa: F401  (registers filters on import)

    kwargs: dict[str, Any] = {"locking": False}
    if cache_bytes:
        kwargs.update(rdcc_nbytes=int(cache_bytes), rdcc_nslots=1_000_003)
    return h5py.File(path, "r", **kwargs)


def attr_json(obj: Any, name: str) -> Any:
    value = obj.attrs.get(name)
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode()
    return json.loads(value)


def read_attrs(obj: Any) -> dict[str, Any]:
    """Attributes as plain Python values (arrays to lists, bytes to str)."""
    out = {}
    for key, value in obj.attrs.items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, bytes):
            value = value.decode()
        out[key] = value
    return out


class ChunkMap:
    """Zero-copy reads of an *uncompressed* chunked dataset through a memory map (3D, or 2D as Z = 1).

    HDF5 stores each uncompressed chunk as one contiguous, full-size block (edge chunks too) at
    an offset its chunk index reports. Mapping the file and copying sub-boxes out of those blocks
    avoids h5py's per-call selection overhead (measured here: random 64^3 patches ~1.9x and XY
    sections ~12x faster than h5py, random 64^3 patches ~0.72x a numpy memmap). Only for datasets
    with no filters; ``None`` from ``build`` otherwise.

    The chunk offsets are arrays over the chunk grid, never one Python object per chunk. They come
    from the file's chunk-offset index (:mod:`emdata.h5.chunk_index`, written by normalize; memory-
    mapped, so opening a 1 TB-class file reads nothing up front) when one is given and matches
    the file, else from one pass over HDF5's chunk index for files of up to ``ITERATE_MAX``
    chunks (HDF5's per-chunk queries are linear in the chunk count, so larger files without an
    index are read through h5py).
    """

    ITERATE_MAX = 200_000

    def __init__(self, dset: Any, offsets: np.ndarray, sizes: np.ndarray) -> None:
        lead = (1,) * (3 - dset.ndim)  # a 2D image is read as one Z plane
        self.shape = lead + tuple(dset.shape)
        self.chunks = lead + tuple(dset.chunks)
        self.dtype = dset.dtype
        self.fill = dset.fillvalue
        self.offsets = offsets  # chunk grid -> byte offset in the file
        self.sizes = sizes  # chunk grid -> stored bytes (0: never written, reads give the fill value)
        self._count = int(np.prod(self.chunks))
        # Map the very file h5py opened (its descriptor), never the path again: if the path is
        # replaced meanwhile (normalize renames a new file over it), offsets and bytes still
        # come from the same file, so a reader sees old voxels or new ones, never a mix.
        self._mmap = mmap.mmap(dset.file.id.get_vfd_handle(), 0, access=mmap.ACCESS_READ)
        self._data = np.frombuffer(self._mmap, dtype=np.uint8)  # a plain ndarray view: no memmap overhead
        self._nbytes = self._count * self.dtype.itemsize
        # Up to ITERATE_MAX chunks, the views are built once (the lookup sits in the innermost loop
        # of every read: ~13 % more random 64^3 patches/s); beyond, each read makes its own.
        self._views: list | None = None
        grid = self.sizes.shape
        if int(np.prod(grid)) <= self.ITERATE_MAX:
            self._views = [[[self._view(kz, ky, kx) for kx in range(grid[2])] for ky in range(grid[1])]
                           for kz in range(grid[0])]

    def _view(self, kz: int, ky: int, kx: int) -> np.ndarray | None:
        if not self.sizes[kz, ky, kx]:
            return None
        offset = int(self.offsets[kz, ky, kx])
        return self._data[offset:offset + self._nbytes].view(self.dtype).reshape(self.chunks)

    @staticmethod
    def usable(dset: Any) -> bool:
        if dset.chunks is None or dset.id.get_create_plist().get_nfilters() > 0 or dset.dtype.hasobject:
            return False
        return dset.file.driver == "sec2" and not dset.file.userblock_size  # raw offsets at face value

    @classmethod
    def build(cls, dset: Any, index: Any = None) -> "ChunkMap | None":
        """``index``: a chunk-index table (:meth:`emdata.h5.chunk_index.ChunkIndex.table`) for ``dset``."""
        if not cls.usable(dset) or dset.ndim not in (2, 3):
            return None
        chunks = tuple(dset.chunks)
        lead = (0,) * (3 - dset.ndim)  # a 2D image is one Z plane
        grid = (1,) * len(lead) + tuple(-(-s // c) for s, c in zip(dset.shape, chunks))
        if index is not None:
            return cls(dset, index["offset"].reshape(grid), index["size"].reshape(grid))
        if int(np.prod(grid)) > cls.ITERATE_MAX:
            return None
        offsets = np.zeros(grid, np.int64)
        sizes = np.zeros(grid, np.int64)

        def visit(info: Any) -> None:
            k = lead + tuple(o // c for o, c in zip(info.chunk_offset, chunks))
            offsets[k] = info.byte_offset
            sizes[k] = info.size

        if hasattr(dset.id, "chunk_iter"):  # one pass over the chunk index (HDF5 >= 1.14)
            dset.id.chunk_iter(visit)
        else:  # get_chunk_info(i) walks the index each call: fine for small files only
            for i in range(dset.id.get_num_chunks()):
                visit(dset.id.get_chunk_info(i))
        return cls(dset, offsets, sizes)

    def block(self, kz: int, ky: int, kx: int) -> np.ndarray | None:
        """Chunk ``(kz, ky, kx)`` as a read-only view into the map, or None if never written."""
        views = self._views
        return views[kz][ky][kx] if views is not None else self._view(kz, ky, kx)

    def read(self, start: tuple[int, ...], stop: tuple[int, ...]) -> np.ndarray:
        """The box ``[start, stop)``, which must lie inside the dataset."""
        out = np.empty(tuple(b - a for a, b in zip(start, stop)), self.dtype)
        # Per axis: (chunk index, slice in the output, slice in the chunk) of each piece.
        pieces = []
        for a, b, c in zip(start, stop, self.chunks):
            axis = []
            for k in range(a // c, (b - 1) // c + 1):
                lo, hi = max(a, k * c), min(b, k * c + c)
                axis.append((k, slice(lo - a, hi - a), slice(lo - k * c, hi - k * c)))
            pieces.append(axis)
        views = self._views
        for kz, oz, sz in pieces[0]:
            for ky, oy, sy in pieces[1]:
                for kx, ox, sx in pieces[2]:
                    block = views[kz][ky][kx] if views is not None else self._view(kz, ky, kx)
                    # never written: HDF5 would return the fill value
                    out[oz, oy, ox] = self.fill if block is None else block[sz, sy, sx]
        return out


# HDF5 reports some write failures only from h5py's ObjectID.__dealloc__, where Python hands
# them to sys.unraisablehook: the one place to catch them, and it is process-wide (Python has no
# per-thread or per-object variant). So one collector is installed while any create() is open
# (reference-counted, so nested or concurrent creates never restore a stale hook), and it routes
# an error only to a create() open in the thread where the object died (h5py objects die in the
# thread that writes them); anything else goes on to the hook that was installed before.
_HOOK_LOCK = threading.RLock()  # re-entrant: a dealloc may run while this thread holds the lock
_COLLECTORS: dict[int, list[list[BaseException]]] = {}  # thread id -> the open creates' error lists
_previous_hook: Any = None


def _collect_unraisable(unraisable: Any) -> None:
    if isinstance(unraisable.exc_value, (OSError, RuntimeError)):  # HDF5's errors in h5py's __dealloc__
        with _HOOK_LOCK:
            open_here = _COLLECTORS.get(threading.get_ident())
            if open_here:
                open_here[-1].append(unraisable.exc_value)
                return
    (_previous_hook or sys.__unraisablehook__)(unraisable)


@contextlib.contextmanager
def _dealloc_errors() -> Iterator[list[BaseException]]:
    """Errors HDF5 raises in deallocations in this thread while the block runs (see above)."""
    global _previous_hook
    swallowed: list[BaseException] = []
    thread = threading.get_ident()
    with _HOOK_LOCK:
        if not _COLLECTORS:
            _previous_hook = sys.unraisablehook
            sys.unraisablehook = _collect_unraisable
        _COLLECTORS.setdefault(thread, []).append(swallowed)
    try:
        yield swallowed
    finally:
        with _HOOK_LOCK:
            mine = _COLLECTORS[thread]
            del mine[next(i for i, x in enumerate(mine) if x is swallowed)]
            if not mine:
                del _COLLECTORS[thread]
            if not _COLLECTORS:
                if sys.unraisablehook is _collect_unraisable:  # unless someone replaced it meanwhile
                    sys.unraisablehook = _previous_hook
                _previous_hook = None


@contextlib.contextmanager
def create(path: Path, dataset: str) -> Iterator[Any]:
    """A new HDF5 file that counts as written only once everything in it reached the disk.

    HDF5 reports some write failures only where h5py cannot raise them (a dataset's chunk cache
    is flushed when the object is deallocated: "Exception ignored in ObjectID.__dealloc__"), and
    a file whose flush failed cannot be closed: the library then crashes at interpreter exit. So
    the body's writes are flushed explicitly, dealloc errors in this thread are collected
    (:func:`_dealloc_errors`) and count as a failure, and a failed file's descriptor is pointed
    at /dev/null before it is closed (the close then succeeds; the caller removes the temporary
    file). A failure is an ``OutputError`` naming the dataset and the file, one line, with ENOSPC
    called what it is.
    """
    import h5py

    try:  # a full disk (blocks or inodes) can already refuse the new file
        f = h5py.File(path, "w")
    except (OSError, RuntimeError) as exc:
        raise _write_error(dataset, path, exc) from exc
    with _dealloc_errors() as swallowed:
        try:
            yield f
            f.flush()
            if swallowed:
                raise swallowed[0]
            f.close()
            if swallowed:
                raise swallowed[0]
        except BaseException as exc:
            _abandon(f)
            if isinstance(exc, (OSError, RuntimeError)):
                raise _write_error(dataset, path, exc) from exc
            raise


def _abandon(f: Any) -> None:
    """Close a file whose writes failed without writing to it again (see :func:`create`)."""
    with contextlib.suppress(Exception):
        if not f.id.valid:
            return
        fd = f.id.get_vfd_handle()
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
    with contextlib.suppress(Exception):
        f.close()


def _write_error(dataset: str, path: Path, exc: BaseException) -> OutputError:
    text = str(exc)
    if getattr(exc, "errno", None) == errno.ENOSPC or "errno = 28" in text or "No space left" in text:
        return OutputError(dataset, str(path), "the disk became full while the HDF5 was written "
                           "(No space left on device); the old output is unchanged",
                           "free some space and run normalize again")
    first = " ".join(text.split("(file write failed")[0].split())[:160]
    return OutputError(dataset, str(path), f"writing the HDF5 failed ({type(exc).__name__}: {first}); "
                       "the old output is unchanged", "check the disk and run normalize again")
