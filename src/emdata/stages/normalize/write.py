"""One array of the canonical HDF5, streamed in chunk-aligned tiles under a memory budget.

The writer every normalize path shares (a volume, each array of a collection, and the chunk
placement of a distributed run use these functions), so all of them give the same bytes. Tiles
come from :mod:`emdata.core.boxes`. Three things overlap on the two cores: a reader thread reads
tile k+1, the main thread writes tile k, a digest thread hashes tile k and adds it to the exact
statistics. File reads, HDF5 writes, sha256 and the histogram kernel all release the GIL. At most
``tiles.IN_FLIGHT`` tiles are alive, so memory is bounded by the budget in params
(``normalize.memory_budget_mb``), whatever the XY size. Output is little-endian whatever the
source's byte order, and the statistics and ``array_sha256`` are computed on the values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np

from emdata.core.boxes import Box, plan_tiles
from emdata.core.kernels import add_histogram
from emdata.core.progress import Progress
from emdata.core.stats import statistics_for
from emdata.errors import FormatError, OutputError
from emdata.formats.raw import RawVolume
from emdata.h5 import hdf5
from emdata.h5.chunks import encode_tile, place

log = logging.getLogger(__name__)
DEFAULT_BUDGET = 256 << 20


class Counter(Protocol):
    """Where a writer counts its voxels: a :class:`~emdata.core.progress.Progress`, or a caller's own."""

    def update(self, n: int) -> None: ...


def output_dtype(dtype: np.dtype) -> np.dtype:
    """The stored dtype: the same values, little-endian (bool and single bytes as they are)."""
    dtype = np.dtype(dtype)
    return dtype.newbyteorder("<") if dtype.byteorder in (">", "=", "<") and dtype.itemsize > 1 else dtype


def chunk_counts(mask: np.ndarray, chunks: tuple[int, ...]) -> np.ndarray:
    """Number of True voxels per chunk of a chunk-aligned box."""
    grid = [-(-n // c) for n, c in zip(mask.shape, chunks)]
    padded = np.zeros([g * c for g, c in zip(grid, chunks)], bool)
    padded[: mask.shape[0], : mask.shape[1], : mask.shape[2]] = mask
    cz, cy, cx = chunks
    return padded.reshape(grid[0], cz, grid[1], cy, grid[2], cx).sum(axis=(1, 3, 5))


class _Digest:
    """sha256 of the voxels in C order, little-endian; exact statistics; label foreground."""

    def __init__(self, dtype: np.dtype, chunks: tuple[int, ...], shape: tuple[int, ...], label: bool) -> None:
        self.sha = hashlib.sha256()
        self.stats = statistics_for(dtype, label=label)
        self.chunks = chunks
        grid = tuple(-(-s // c) for s, c in zip(shape, chunks))
        self.foreground = np.zeros(grid, np.int64) if label else None

    def hash(self, data: np.ndarray) -> None:
        """Voxels in C order: every call must continue where the previous box ended."""
        self.sha.update(hdf5.voxel_bytes(data))

    def tally(self, data: np.ndarray) -> None:
        """Exact statistics: order-free, so they come from the write pass, on the reader thread."""
        self.stats.update(data)

    def count(self, start: tuple[int, ...], data: np.ndarray) -> None:
        """Nonzero voxels per chunk of a chunk-aligned tile."""
        if self.foreground is None:
            return
        counts = chunk_counts(data != 0, self.chunks)
        k = [a // c for a, c in zip(start, self.chunks)]
        self.foreground[k[0]:k[0] + counts.shape[0], k[1]:k[1] + counts.shape[1], k[2]:k[2] + counts.shape[2]] += counts


def _pipeline(boxes: list[Box], read: Callable[[Box], np.ndarray], consume: Callable[[Box, np.ndarray], None],
              digest: Callable[[Box, np.ndarray], None], progress: Counter) -> None:
    """read box k+1 | consume box k (main thread) | digest box k, each waiting for the one before."""
    if not boxes:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="emdata-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="emdata-digest") as hasher:
        next_data: Future = reader.submit(read, boxes[0])
        pending: Future | None = None
        for i, box in enumerate(boxes):
            data = next_data.result()
            if i + 1 < len(boxes):
                next_data = reader.submit(read, boxes[i + 1])
            if pending is not None:
                pending.result()  # box k-1 is digested and released
            pending = hasher.submit(digest, box, data)
            consume(box, data)
            progress.update(int(np.prod([b - a for a, b in zip(*box)])))
            del data
        assert pending is not None
        pending.result()


def create_array(group: Any, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...],
                 compression: str, level: int) -> Any:
    """The empty chunked dataset ``name`` (both normalize paths create arrays here)."""
    return group.create_dataset(name, shape=shape, dtype=dtype, chunks=hdf5.chunk_shape(chunks, shape), fillvalue=0,
                                **hdf5.compression_options(compression, level))


def finish_array(dset: Any, attrs: dict[str, Any], array_sha256: str, statistics: dict[str, Any]) -> None:
    """Flush the placed chunks, then set the attributes (in this order, in both normalize paths)."""
    dset.flush()  # write failures surface here, not in a __dealloc__ that cannot raise
    dset.attrs.update(attrs)
    dset.attrs["array_sha256"] = array_sha256
    dset.attrs["statistics"] = json.dumps(statistics, sort_keys=True)


def read_tile(volume: RawVolume, box: Box, dtype: np.dtype, desc: str) -> np.ndarray:
    """A box of the source in the output dtype; a reader returning the wrong shape is a FormatError."""
    start, stop = box
    data = volume.read_between(start, stop)
    want = tuple(b - a for a, b in zip(start, stop))
    if data.shape != want:
        raise FormatError(getattr(volume, "dataset", "?"), desc, f"read {data.shape} for the box {start}..{stop}, "
                          f"expected {want}", "the source reader returned the wrong shape; please report it")
    return data.astype(dtype, copy=False)


def hash_boxes(plan: Any) -> list[Box]:
    """The boxes whose voxels, in this order, are the volume in C order (the sha256's input)."""
    return plan.tiles if plan.one_pass else (plan.hash_boxes or [])


def write_volume(group: Any, name: str, volume: RawVolume, *, chunks: tuple[int, int, int], compression: str,
                 level: int, attrs: dict[str, Any], label: bool, desc: str,
                 budget: int = DEFAULT_BUDGET, plane: bool = False,
                 progress: Counter | None = None) -> dict[str, Any]:
    """Stream ``volume`` into dataset ``name``; return its sha256, statistics and chunk counts.

    Each tile is encoded chunk by chunk and placed with direct chunk writes in C order of the
    chunk grid (:mod:`emdata.h5.chunks`), exactly as the distributed path places the chunks its
    workers encode, so both give the same bytes. ``plane``: the volume is one Z plane, stored as
    a 2D (Y, X) dataset (collections of 2D images). ``progress``: count into a caller's progress
    (one for many small arrays).
    """
    shape = tuple(int(n) for n in volume.shape)
    dtype = output_dtype(volume.dtype)
    if plane and shape[0] != 1:
        raise FormatError(getattr(volume, "dataset", "?"), desc, f"a 2D image was expected, got shape {shape}",
                          "please report it (a source bug)")
    if plane:
        dset = create_array(group, name, shape[1:], dtype, chunks[1:], compression, level)
        chunk = (1, *dset.chunks)
    else:
        dset = create_array(group, name, shape, dtype, chunks, compression, level)
        chunk = tuple(dset.chunks)
    digest = _Digest(dtype, chunk, shape, label)
    plan = plan_tiles(shape, chunk, dtype.itemsize, budget)

    def read(box: Box) -> np.ndarray:
        return read_tile(volume, box, dtype, desc)

    def read_and_tally(box: Box) -> np.ndarray:
        # The histogram runs here so that the three threads carry similar loads: read + histogram |
        # encode + HDF5 write | sha256 (+ label counts).
        data = read(box)
        digest.tally(data)
        return data

    def write(box: Box, data: np.ndarray) -> None:
        if plane:
            place(dset, encode_tile(data[0], box[0][1:], chunk[1:], compression, level))
        else:
            place(dset, encode_tile(data, box[0], chunk, compression, level))

    def hash_and_count(box: Box, data: np.ndarray) -> None:
        if plan.one_pass:
            digest.hash(data)
        digest.count(box[0], data)

    voxels = int(np.prod(shape))
    with ExitStack() as stack:
        if progress is None:
            progress = stack.enter_context(Progress(voxels * (1 if plan.one_pass else 2), desc, unit="vox"))
        _pipeline(plan.tiles, read_and_tally, write, hash_and_count, progress)
        if not plan.one_pass:  # the sha256 needs C order: a second, read-only pass in hash boxes
            _pipeline(hash_boxes(plan), read, lambda box, data: None, lambda box, data: digest.hash(data),
                      progress)
    array_sha256 = digest.sha.hexdigest()
    statistics = digest.stats.result()
    finish_array(dset, attrs, array_sha256, statistics)
    return {"array_sha256": array_sha256, "statistics": statistics, "foreground": digest.foreground,
            "tiles": len(plan.tiles), "one_pass": plan.one_pass}


class KernelWarmer:
    """Loads the histogram kernel on a thread of its own once started; joined when the block ends."""

    def __init__(self) -> None:
        self._thread = threading.Thread(target=warm_kernels, name="emdata-warm", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def __enter__(self) -> "KernelWarmer":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self._thread.join()


def warm_kernels() -> None:
    """Load the compiled histogram kernel while the files are opened (it costs ~0.5 s per process)."""
    try:
        for codes, bins in ((np.zeros(8, np.uint8), 256), (np.zeros(8, np.uint16), 65536)):
            add_histogram(codes, np.zeros(bins, np.int64))
    except Exception:  # noqa: BLE001 - a failure shows again, with its cause, where the kernel is used
        log.debug("preloading the histogram kernel failed", exc_info=True)


def check_free_space(key: str, out: Path, arrays: Iterable[Any], compression: str) -> None:
    """Refuse to start when the disk cannot hold the output (HDF5 fails badly when a write hits ENOSPC).

    ``arrays``: anything with a ``shape`` and a ``dtype`` (source volumes, a collection's items).
    """
    voxels = sum(int(np.prod(a.shape)) * output_dtype(a.dtype).itemsize for a in arrays)
    need = voxels // (2 if compression != "none" else 1) + (4 << 20)  # compressed: assume at most half saved
    free = shutil.disk_usage(out.parent).free
    old = out.stat().st_size if out.is_file() else 0  # replaced only after the new file is complete
    if free < need:
        raise OutputError(key, str(out.parent), f"not enough free disk space: {free / 2**20:.0f} MiB free, "
                          f"the output needs about {need / 2**20:.0f} MiB (the old output, {old / 2**20:.0f} MiB, "
                          "stays until the new one is complete)", "free some space and run normalize again")
