"""``LocalStorage``: an emdata HDF5 file on this machine, opened lazily once per process.

A storage created before ``fork`` (or pickled into a DataLoader worker) opens the file again in
the child on first read instead of sharing a handle. The Volumes of one file (an image and the
label Volumes made from it) share one storage, so every array of a sample is read through one
open file: when ``normalize`` renames a new version over the path, they all keep reading the
version that was open. Each array is described once; a file replaced between that description
and the first read fails with an error instead of mixing versions. Files open read-only without
HDF5 file locking, each array with a chunk cache sized to a row of its chunks; uncompressed
chunks are memory-mapped (through the chunk-offset index when one matches the file).
"""

from __future__ import annotations

import os
import threading
from collections import namedtuple
from pathlib import Path
from typing import Any

import numpy as np

from emdata.access.storage import ArrayInfo
from emdata.errors import AccessError, FormatError
from emdata.h5 import hdf5
from emdata.h5.chunk_index import local_table

#: This process's view of one array: the open file, the dataset with its own chunk cache, and
#: the memory map of its chunks (None when compressed: h5py decodes them).
ArrayHandle = namedtuple("ArrayHandle", ["pid", "file", "dset", "chunkmap"])


class LocalStorage:
    """One HDF5 file at ``path``; ``index``: its chunk-offset index, if not at the usual places."""

    def __init__(self, path: str | os.PathLike, *, index: str | os.PathLike | None = None,
                 name: str | None = None) -> None:
        self.path: Path | None = Path(path)
        self.index = Path(index) if index is not None else None
        self.name = name or self.file.stem
        self.location = str(self.file)
        self._opened: tuple[int, Any] | None = None  # (pid, h5py.File) of the process that opened it
        self._described: dict[str, ArrayInfo] = {}
        self._handles: dict[str, ArrayHandle] = {}

    @property
    def file(self) -> Path:
        assert self.path is not None  # a local storage always has its file
        return self.path

    def __repr__(self) -> str:
        return f"LocalStorage({self.location!r})"

    # -- describing -----------------------------------------------------------------------------

    def describe(self, array: str, name: str) -> ArrayInfo:
        """The array as the open file has it (if open in this process), else as the path has it now."""
        known = self._described.get(array)
        if known is not None:
            return known
        open_here = self._current()
        if open_here is not None:
            info = _describe(open_here, array, name, self.location)
        else:
            try:
                with hdf5.open_read(self.file) as f:
                    info = _describe(f, array, name, self.location)
            except OSError as exc:  # not HDF5, truncated, unreadable: h5py's message names the cause
                raise FormatError(name, self.location, f"not a readable HDF5 file ({_reason(exc)})",
                                  "open an HDF5 file written by emdata normalize, or normalize again") from exc
        return self._described.setdefault(array, info)

    # -- reading --------------------------------------------------------------------------------

    def handle(self, array: str) -> ArrayHandle:
        """This process's handle on ``array`` of the shared open file, opened on first use.

        Published in one assignment once complete: threads (dask's scheduler) that race here at
        worst build a second handle on the same open file, and never see a half-built one.
        """
        handle, opened = self._handles.get(array), self._opened
        if handle is not None and opened is not None and handle.file is opened[1] and handle.pid == os.getpid():
            return handle
        import h5py

        _, file = self._get()
        info = self.describe(array, self.name)
        dset = file.get(array)
        # The same layout and voxels (array_sha256) as described, else shapes, geometry and
        # statistics would describe another file than the one read.
        if not isinstance(dset, h5py.Dataset) or (tuple(dset.shape), dset.dtype, tuple(dset.chunks or dset.shape),
                                                  _attr_text(dset, "array_sha256")) != (
                info.stored_shape, info.dtype, info.stored_chunks, str(info.attrs.get("array_sha256", ""))):
            raise AccessError(f"{self.file} was replaced by a different file since this Volume was "
                              f"created; open it again (emdata.open_dataset or Volume)")
        chunks, shape = info.chunks, info.shape
        row = chunks[0] * chunks[1] * shape[2] * info.dtype.itemsize
        # A row of chunks, for this array alone; volumes get at least 4 MiB. A 2D image gets just
        # its row: a collection keeps hundreds of them open, each with its own cache.
        dset = _with_cache(file, array, row if len(info.stored_shape) == 2 else max(row, 4 << 20))
        table = local_table(self.file, array, dset, self.index) if hdf5.ChunkMap.usable(dset) else None
        handle = ArrayHandle(os.getpid(), file, dset, hdf5.ChunkMap.build(dset, table))
        self._handles[array] = handle
        return handle

    def read_box(self, array: str, start: tuple[int, ...], stop: tuple[int, ...]) -> np.ndarray:
        """Memory-mapped chunks when uncompressed, else h5py."""
        handle = self.handle(array)
        if handle.chunkmap is not None:
            return handle.chunkmap.read(tuple(int(v) for v in start), tuple(int(v) for v in stop))
        if handle.dset.ndim == 2:
            return handle.dset[int(start[1]):int(stop[1]), int(start[2]):int(stop[2])][None]
        return handle.dset[tuple(slice(int(a), int(b)) for a, b in zip(start, stop))]

    def root_attrs(self, array: str) -> dict[str, Any]:
        return hdf5.read_attrs(self.handle(array).file)

    def chunk_foreground(self, label: str) -> np.ndarray | None:
        # Through the label's open file: the statistics of the very version its voxels come from.
        stats = self.handle(f"{hdf5.LABELS}/{label}").file.get(f"{hdf5.LABEL_STATS}/{label}/chunk_foreground")
        return None if stats is None else stats[()]

    def identity(self) -> str:
        return str(self.file.resolve())

    # -- the one open file of this process --------------------------------------------------------

    def _current(self) -> Any | None:
        """This process's open file, or None if it has not been opened here."""
        opened = self._opened
        return opened[1] if opened is not None and opened[0] == os.getpid() else None

    def _get(self) -> tuple[int, Any]:
        opened = self._opened
        if opened is not None and opened[0] == os.getpid():
            return opened
        with _OPEN_LOCK:  # two threads never open two versions of the file in one process
            opened = self._opened
            if opened is None or opened[0] != os.getpid():
                opened = (os.getpid(), hdf5.open_read(self.file))
                self._opened = opened
        return opened

    def close(self) -> None:
        """Close the file (the Volumes sharing this storage reopen it on their next read)."""
        self._handles = {}
        opened, self._opened = self._opened, None
        if opened is not None and opened[0] == os.getpid():
            opened[1].close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_opened"], state["_handles"] = None, {}  # never an open file: the receiver opens its own
        return state


_OPEN_LOCK = threading.Lock()


def _new_lock_in_child() -> None:
    global _OPEN_LOCK
    _OPEN_LOCK = threading.Lock()  # a lock held by another thread at fork would stay held in the child


os.register_at_fork(after_in_child=_new_lock_in_child)


def _describe(f: Any, array: str, name: str, location: str) -> ArrayInfo:
    """Shape, dtype, chunks and attributes of ``array``, checked as emdata writes them."""
    import h5py

    where = f"{location}:/{array}"
    dset = f.get(array)
    if dset is None:
        raise FormatError(name, where, "no such array (not an emdata volume file)",
                          f"arrays at the top: {', '.join(sorted(f.keys())) or 'none'}")
    if not isinstance(dset, h5py.Dataset):
        raise FormatError(name, where, "is a group, not an array (not an emdata volume file)")
    if dset.ndim not in (2, 3):
        raise AccessError(f"{where} is {dset.ndim}D; a Volume reads 2D and 3D arrays")
    if dset.dtype.kind not in "biuf":
        raise FormatError(name, where, f"holds {dset.dtype} values; a Volume reads numbers")
    labels = f.get(hdf5.LABELS) if array == hdf5.RAW else None
    if labels is not None and not isinstance(labels, h5py.Group):
        raise FormatError(name, f"{location}:/{hdf5.LABELS}", "is an array, not a group of label arrays")
    return ArrayInfo(tuple(dset.shape), dset.dtype, tuple(dset.chunks or dset.shape), hdf5.read_attrs(dset),
                     tuple(sorted(labels.keys())) if labels is not None else ())


def _reason(exc: BaseException) -> str:
    """h5py's reason without the C library's call chain: "file signature not found"."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    found = text.rfind("(")
    return text[found + 1:].rstrip(")") if found >= 0 and text.endswith(")") else text


def _attr_text(dset: Any, key: str) -> str:
    value = dset.attrs.get(key)
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _with_cache(file: Any, array: str, nbytes: int) -> Any:
    """``file[array]`` opened with its own chunk cache of ``nbytes`` (the file's default is small)."""
    import h5py

    dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    dapl.set_chunk_cache(1_000_003, int(nbytes), 0.75)
    return h5py.Dataset(h5py.h5d.open(file.id, array.encode(), dapl))
