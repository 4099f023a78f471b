"""``Volume``: a read-only, fork- and pickle-safe view of one array of an emdata HDF5 file.

A Volume reads through a storage (:mod:`emdata.access.storage`): the file on this machine
(:class:`~emdata.access.local.LocalStorage`) or the same file left in a DVC remote
(:class:`~emdata.access.remote.RemoteStorage`). Everything else is the same code on both:
slicing, padded reads, nm ROIs, blocks, labels, metadata, dask and xarray views, and through
them the samplers, tiled inference, the torch adapter and collections.

A Volume and the label Volumes made from it (``volume.labels``, samplers' labels) share one
storage, so a sample's image and labels always come from the same version of the file, even
when ``normalize`` renames a new file over it between two reads.

Names used throughout the read API:

- ``start``: a box's first voxel (z, y, x); ``shape``: its extent in voxels. A box is
  ``[start, start + shape)`` (``read(start, shape)``); ``stop`` (one past the last voxel) appears
  only where the name says so.
- ``patch_shape``: the extent of a sampled patch; ``block_shape``: the extent of a block of an
  exact covering (its read window is ``block_shape + 2 * halo``).
- ``origin``: the first voxel (z, y, x) of a patch in its volume.

Coordinates: voxel ``i`` along an axis starts at ``offset + i * resolution`` nm (the gunpowder /
CREMI convention used by the ``resolution`` and ``offset`` attributes).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import namedtuple
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from emdata.access.blocks import Block, block_grid
from emdata.access.local import LocalStorage
from emdata.access.padding import PAD_MODES, gather, source_indices
from emdata.access.storage import Storage
from emdata.core.indexing import basic_box
from emdata.errors import AccessError, ConfigError, FormatError
from emdata.h5 import hdf5

if TYPE_CHECKING:
    from emdata.access.remote import Transfer

PhysicalPixelSizes = namedtuple("PhysicalPixelSizes", ["Z", "Y", "X"])  # micrometres, as in bioio


class Volume:
    """One 3D array (``/raw`` or ``/labels/<name>``) of a canonical emdata HDF5 file.

    ``Volume(path)`` reads a local file; ``Volume(storage, array)`` reads through any
    :class:`~emdata.access.storage.Storage` (``open_dataset(..., remote=...)`` builds one).
    """

    ndim = 3

    def __init__(self, source: str | os.PathLike | Storage, array: str = hdf5.RAW, *, name: str | None = None,
                 resolution: Any = None, offset: Any = None, index: str | os.PathLike | None = None) -> None:
        """``resolution``/``offset`` (nm, z/y/x) are needed only for files that do not record them.

        ``index``: a local file's chunk-offset index (``data/metadata/<ds>.chunks``); found on its
        own beside the file or in the repository layout, and used only if it matches the file.
        """
        if isinstance(source, (str, os.PathLike)):
            source = LocalStorage(source, index=index, name=name)
        elif index is not None:
            raise ConfigError("Volume: index= applies to a local file, not to a given storage")
        self.storage: Storage = source
        self.array = array
        self.name = name or source.name
        info = source.describe(array, self.name)
        self.stored_shape: tuple[int, ...] = info.stored_shape
        self.shape: tuple[int, int, int] = info.shape
        self.dtype = info.dtype
        self.chunks: tuple[int, int, int] = info.chunks
        self.attrs = info.attrs
        self.label_names = list(info.label_names)
        axes = str(self.attrs.get("axes", "zyx"))
        self.dims = "YX" if len(self.stored_shape) == 2 else axes.upper()  # "ZYX", or "TYX" for a time series
        where = f"{source.location}:/{array}"
        if resolution is None and "resolution" not in self.attrs:
            raise ConfigError(f"{where} records no resolution; pass resolution=(z, y, x) in nm "
                              "(a voxel size is never guessed)")
        # 2D images and time series record a (y, x) pixel size: the first axis (one plane, or
        # time) gets 1.0 so that voxel and nm coordinates still map one to one along it.
        planar = len(self.stored_shape) == 2 or "z" not in axes.lower()
        self.resolution = _geometry(resolution, self.attrs.get("resolution"), "resolution", planar, self.name, where,
                                    positive=True)
        self.offset = _geometry(offset, self.attrs.get("offset", (0.0, 0.0, 0.0)), "offset", planar, self.name,
                                where, positive=False)

    @property
    def path(self) -> Path | None:
        """The local HDF5 file, or None when the storage has none (a remote volume)."""
        return self.storage.path

    @property
    def location(self) -> str:
        """The file's path or URL (for messages and records)."""
        return self.storage.location

    @property
    def transfer(self) -> "Transfer | None":
        """Requests and bytes a remote volume has fetched so far; None for a local file."""
        return getattr(self.storage, "transfer", None)

    def identity(self) -> str:
        """What names this array's file in ledgers (the resolved path; a remote volume's URL)."""
        return self.storage.identity()

    def close(self) -> None:
        """Close the file (shared with this Volume's labels: they reopen it on their next read)."""
        self.storage.close()

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = "" if self.path is not None else f", {self.location}"
        return (f"Volume({self.name!r}, /{self.array}, shape={self.shape}, dtype={self.dtype}, "
                f"resolution={self.resolution.tolist()} nm{where})")

    # -- the file's other arrays and attributes -----------------------------------------------

    @property
    def labels(self) -> dict[str, "Volume"]:
        """The label arrays of the file, as Volumes sharing this one's storage (one version)."""
        return {n: Volume(self.storage, f"{hdf5.LABELS}/{n}", name=f"{self.name}:{n}") for n in self.label_names}

    @property
    def metadata(self) -> dict[str, Any]:
        """Root and array attributes of the file (statistics and params decoded from JSON)."""
        return file_metadata(self.storage.root_attrs(self.array), self.attrs)

    def chunk_foreground(self) -> np.ndarray | None:
        """For a label Volume: nonzero voxels per chunk (written by normalize), None if not recorded."""
        kind, _, label = self.array.partition("/")
        return self.storage.chunk_foreground(label) if kind == hdf5.LABELS and label else None

    # -- bioimage-ecosystem views -------------------------------------------------------------

    @property
    def physical_pixel_sizes(self) -> PhysicalPixelSizes:
        """Voxel size in micrometres, Z, Y, X (bioio's convention)."""
        return PhysicalPixelSizes(*(self.resolution / 1000.0).tolist())

    def to_dask(self, chunks: tuple[int, ...] | None = None):
        """A lazy dask array over this volume, chunked like the file (needs the ``dask`` extra)."""
        import dask.array as da

        tag = hashlib.sha1(self.location.encode()).hexdigest()[:8]
        return da.from_array(self, chunks=chunks or self.chunks, asarray=True, fancy=False,
                             name=f"emdata-{self.name}-{self.array}-{tag}")

    def to_xarray(self):
        """An xarray DataArray (dask-backed) with z/y/x coordinates in nm."""
        import xarray as xr

        coords = {axis: self.offset[i] + np.arange(self.shape[i]) * self.resolution[i] for i, axis in enumerate("zyx")}
        return xr.DataArray(self.to_dask(), dims=("z", "y", "x"), coords=coords, name=self.name,
                            attrs={"units": "nm", "resolution": self.resolution.tolist(), "offset": self.offset.tolist()})

    # -- reading ------------------------------------------------------------------------------

    def _read_box(self, start: Any, stop: Any) -> np.ndarray:
        """Every voxel read goes through here: ``[start, stop)``, inside the volume."""
        return self.storage.read_box(self.array, start, stop)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[:, :, :]
        return data if dtype is None else data.astype(dtype)

    def __getitem__(self, index: Any) -> np.ndarray:
        """numpy-style basic indexing in voxels (integers, unit-step slices, Ellipsis)."""
        start, stop, squeeze = basic_box(index, self.shape, self.name)
        if any(b <= a for a, b in zip(start, stop)):
            data = np.empty([b - a for a, b in zip(start, stop)], self.dtype)
        else:
            data = self._read_box(start, stop)
        return data.squeeze(axis=squeeze) if squeeze else data

    def read(self, start: tuple[int, ...], shape: tuple[int, ...], *, pad: str | None = None,
             constant: float = 0) -> np.ndarray:
        """The box ``[start, start + shape)`` in voxels: ``shape`` is its extent, not its stop.

        Inside the volume only, unless ``pad`` is one of the ``numpy.pad`` modes that copy voxels
        or a constant (``PAD_MODES``): then parts outside are filled that way. Otherwise AccessError.
        """
        start_t = tuple(int(v) for v in start)
        stop_t = tuple(a + int(n) for a, n in zip(start_t, shape))
        if all(0 <= a < b <= n for a, b, n in zip(start_t, stop_t, self.shape)):
            return self._read_box(start_t, stop_t)  # the common case, kept free of numpy overhead
        first = np.asarray(start_t, np.int64)
        stop = np.asarray(stop_t, np.int64)
        if np.any(np.asarray(shape) <= 0):
            raise AccessError(f"{self.name}: empty box shape {tuple(shape)}")
        inner_start = np.clip(first, 0, self.shape)
        inner_stop = np.clip(stop, 0, self.shape)
        outside = np.any(inner_start != first) or np.any(inner_stop != stop)
        if outside and pad is None:
            raise AccessError(f"{self.name}: box {first.tolist()}..{stop.tolist()} is outside the volume "
                              f"{list(self.shape)}; pass pad='reflect' (or another numpy.pad mode) to fill it")
        if outside and pad not in PAD_MODES:  # "mean", "linear_ramp", ...: computed, not copied
            raise ConfigError(f"{self.name}: pad={pad!r} is not supported; use one of {', '.join(PAD_MODES)}")
        # Boxes inside the volume returned above: from here on, part of the box lies outside.
        if pad == "constant":
            out = np.full(tuple(stop - first), constant, self.dtype)
            if np.all(inner_stop > inner_start):
                out[tuple(slice(a - s, b - s) for a, b, s in zip(inner_start, inner_stop, first))] = \
                    self._read_box(inner_start, inner_stop)
            return out
        # numpy.pad's other modes are separable: each output index along an axis comes from one
        # source index. Read the span those indices cover, and gather. This is exact for boxes of
        # any size or position, even off the volume.
        index = [source_indices(s, e, n, str(pad)) for s, e, n in zip(first, stop, self.shape)]
        span = tuple(slice(int(i.min()), int(i.max()) + 1) for i in index)
        data = self._read_box([sl.start for sl in span], [sl.stop for sl in span])
        for axis, (i, sl) in enumerate(zip(index, span)):
            data = gather(data, i - sl.start, axis)
        return data

    def roi_to_voxels(self, offset_nm: tuple[float, ...], shape_nm: tuple[float, ...]) -> tuple[slice, ...]:
        """Voxel slices of a nm ROI: both bounds snap to the nearest voxel boundary.

        ``start = round((offset_nm - offset) / resolution)`` and likewise for the end, with
        halves rounded up (``floor(x + 0.5)``), so a ROI on voxel boundaries maps exactly and a
        ROI of ``n * resolution`` nm always gives ``n`` voxels.
        """
        begin = (np.asarray(offset_nm, np.float64) - self.offset) / self.resolution
        end = begin + np.asarray(shape_nm, np.float64) / self.resolution
        start = np.floor(begin + 0.5).astype(np.int64)
        stop = np.floor(end + 0.5).astype(np.int64)
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))

    def read_roi(self, offset_nm: tuple[float, ...], shape_nm: tuple[float, ...], **pad: Any) -> np.ndarray:
        """The ROI ``[offset_nm, offset_nm + shape_nm)`` in world nm (see ``roi_to_voxels``)."""
        box = self.roi_to_voxels(offset_nm, shape_nm)
        return self.read(tuple(s.start for s in box), tuple(s.stop - s.start for s in box), **pad)

    def blocks(self, block_shape: int | tuple[int, ...], *, halo: int | tuple[int, ...] = 0,
               fit: str = "pad") -> Iterator[Block]:
        """Blocks covering the volume exactly (see :func:`emdata.access.blocks.block_grid`)."""
        return block_grid(self.shape, block_shape, halo=halo, fit=fit)

    def read_block(self, block: Block, *, pad: str = "reflect", constant: float = 0) -> np.ndarray:
        """A block's read region; with ``fit="pad"`` the parts outside are filled with ``pad``."""
        return self.read(block.read_start, block.read_shape, pad=pad, constant=constant)

def _geometry(given: Any, stored: Any, what: str, planar: bool, name: str, where: str, *,
              positive: bool) -> np.ndarray:
    """A resolution or offset as three finite floats (nm, z/y/x); one line naming the file if not.

    Three values, or two (y, x) for a 2D image or time series (its first axis: 1.0 nm, offset 0).
    """
    source = "given" if given is not None else "recorded"
    raw = given if given is not None else stored
    try:
        values = np.asarray(raw, np.float64).reshape(-1)
    except (TypeError, ValueError):
        values = None
    sizes = (2, 3) if planar else (3,)
    if values is None or values.size not in sizes:
        problem = f"{source} {what} {raw!r} is not {' or '.join(map(str, sizes))} numbers"
    elif not np.all(np.isfinite(values)) or (positive and not np.all(values > 0)):
        problem = f"{source} {what} {values.tolist()} nm is not {'positive and ' if positive else ''}finite"
    else:
        return _three(values, 1.0 if positive else 0.0)
    if given is not None:
        raise ConfigError(f"{name}: {where}: {problem}; pass {what}=(z, y, x) in nm")
    raise FormatError(name, where, problem, f"pass {what}=(z, y, x) in nm to Volume, or normalize again")


def _three(values: np.ndarray, first: float) -> np.ndarray:
    """(y, x) values of a 2D image or time series as three, ``first`` for the leading axis."""
    return np.concatenate([np.full(3 - values.size, first), values]) if values.size < 3 else values


def file_metadata(root_attrs: dict[str, Any], array_attrs: dict[str, Any]) -> dict[str, Any]:
    """A file's root attributes with their JSON strings decoded, and the array's under ``array``."""
    meta = dict(root_attrs)
    for key in ("source_urls", "source_checksums", "params"):
        if isinstance(meta.get(key), str):
            meta[key] = json.loads(meta[key])
    array = dict(array_attrs)
    if isinstance(array.get("statistics"), str):
        array["statistics"] = json.loads(array["statistics"])
    meta["array"] = array
    return meta
