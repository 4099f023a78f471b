"""HDF5 chunks encoded outside the file that holds them, and placed with direct chunk writes.

normalize writes every chunk the same way, in one process or on a cluster: the tile is encoded
chunk by chunk (:func:`encode_tile`), then one writer places the encoded chunks in C order of
the chunk grid with ``write_direct_chunk`` (:func:`place`). HDF5 allocates file space in the
order chunks are placed, so the file depends only on the voxels and the layout, not on which
process encoded a chunk nor on HDF5's chunk-cache heuristics (with plain ``dset[...] = tile``
writes, chunks as large as the cache are allocated in a different order than smaller ones).

Encoding goes through HDF5 itself: a tile is written into a dataset of an in-memory HDF5 file
created with the same type, chunk shape and filter options (:func:`emdata.h5.hdf5.compression_options`,
i.e. the hdf5plugin filters with the same settings), and its chunks are read back with
``read_direct_chunk``. So a compressed chunk holds exactly the bytes h5py would have written,
whatever filter library version is installed, and an edge chunk is padded with the fill value
as HDF5 pads it. Uncompressed chunks are plain C-order copies. :class:`ChunkDecoder` runs the
same pipeline backwards for chunks read without HDF5 (range requests to a remote object).
"""

from __future__ import annotations

import itertools
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from emdata.h5 import hdf5

@dataclass(frozen=True)
class EncodedChunk:
    offset: tuple[int, ...]  # the chunk's first voxel in the dataset (a multiple of the chunk shape)
    filter_mask: int  # HDF5's per-chunk mask of skipped filters (0: every filter applied)
    data: bytes | memoryview  # what write_direct_chunk stores (a view into the tile's chunk-major copy)


def chunk_slices(start: tuple[int, ...], stop: tuple[int, ...], chunks: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
    """Slices (relative to ``start``) of the chunks of a chunk-aligned box, in C order."""
    axes = [[slice(a - s, min(a + c, e) - s) for a in range(s, e, c)] for s, e, c in zip(start, stop, chunks)]
    yield from itertools.product(*axes)


def _memory_file(nbytes: int) -> Any:
    """An HDF5 file in memory only, without a chunk cache (writes go straight through the filters)."""
    import h5py

    increment = max(1 << 20, min(int(nbytes) + (1 << 20), 1 << 30))
    return h5py.File(f"emdata-{uuid.uuid4().hex}.h5", "w", driver="core", backing_store=False,
                     block_size=increment, rdcc_nbytes=0)


def encode_tile(data: np.ndarray, start: tuple[int, ...], chunks: tuple[int, ...], compression: str,
                level: int) -> list[EncodedChunk]:
    """The chunks of a chunk-aligned tile (whose far edges lie on chunk boundaries or on the
    dataset's edge), encoded as ``write_direct_chunk`` expects them, in C order."""
    data = np.ascontiguousarray(data)
    chunks = tuple(int(c) for c in chunks)
    origin = tuple(int(a) for a in start)
    stop = tuple(a + n for a, n in zip(origin, data.shape))
    out: list[EncodedChunk] = []
    if compression == "none":
        for sl in chunk_slices(origin, stop, chunks):
            piece = data[sl]
            if piece.shape != chunks:  # an edge chunk: HDF5 stores it full-size, padded with the fill value 0
                full = np.zeros(chunks, data.dtype)
                full[tuple(slice(0, n) for n in piece.shape)] = piece
                piece = full
            offset = tuple(o + s.start for o, s in zip(origin, sl))
            # One copy per chunk (measured faster than one 6-D transpose of the tile), no bytes copy.
            payload = np.ascontiguousarray(piece).data.cast("B")
            out.append(EncodedChunk(offset, 0, payload))
        return out
    with _memory_file(data.nbytes) as f:
        # Rounded up to whole chunks: the part outside the tile is never written, so an edge chunk
        # is padded with the fill value exactly as in the dataset whose edge it is.
        padded = tuple(-(-n // c) * c for n, c in zip(data.shape, chunks))
        dset = f.create_dataset("tile", shape=padded, dtype=data.dtype, chunks=chunks, fillvalue=0,
                                **hdf5.compression_options(compression, level))
        dset.write_direct(data, dest_sel=tuple(slice(0, n) for n in data.shape))
        for sl in chunk_slices((0,) * data.ndim, data.shape, chunks):
            mask, payload = dset.id.read_direct_chunk(tuple(s.start for s in sl))
            offset = tuple(o + s.start for o, s in zip(origin, sl))
            out.append(EncodedChunk(offset, int(mask), bytes(payload)))
    return out


def place(dset: Any, encoded: list[EncodedChunk]) -> None:
    """Write encoded chunks into ``dset`` in the given order (callers give C order)."""
    write = dset.id.write_direct_chunk
    for chunk in encoded:
        write(chunk.offset, chunk.data, chunk.filter_mask)


class ChunkDecoder:
    """Decode chunk bytes read outside HDF5 through the HDF5 filter pipeline (hdf5plugin's codecs).

    One in-memory, one-chunk dataset per thread with the same type, chunk shape and filters:
    a chunk is placed there with ``write_direct_chunk`` and read back, so HDF5 runs exactly the
    filters h5py would run on the file. Uncompressed chunks are reinterpreted without HDF5.
    """

    def __init__(self, dtype: np.dtype, chunks: tuple[int, ...], compression: str, level: int) -> None:
        self.dtype = np.dtype(dtype)
        self.chunks = tuple(int(c) for c in chunks)
        self.compression = compression
        self.level = level
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_local"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _dataset(self) -> Any:
        dset = getattr(self._local, "dset", None)
        if dset is None:
            import hdf5plugin  # noqa: F401  (registers the filters for reading)

            nbytes = int(np.prod(self.chunks)) * self.dtype.itemsize
            self._local.file = _memory_file(2 * nbytes)
            dset = self._local.file.create_dataset("chunk", shape=self.chunks, dtype=self.dtype, chunks=self.chunks,
                                                   fillvalue=0, **hdf5.compression_options(self.compression,
                                                                                           self.level))
            self._local.dset = dset
        return dset

    def decode(self, payload: bytes | memoryview, filter_mask: int = 0) -> np.ndarray:
        """One full chunk as an array of the chunk shape."""
        if self.compression == "none" and filter_mask == 0:
            return np.frombuffer(payload, self.dtype).reshape(self.chunks)
        dset = self._dataset()
        dset.id.write_direct_chunk((0,) * len(self.chunks), bytes(payload), int(filter_mask))
        return dset[()]
