"""``open_dataset`` and ``Volume``: a read-only, fork- and pickle-safe view of one HDF5 array.

The HDF5 file opens lazily, once per process: a Volume created before ``fork`` (or pickled into
a DataLoader worker) reopens the file in the child on first read instead of sharing a handle.
A Volume and the label Volumes made from it (``volume.labels``, samplers' labels) share that one
handle, so a sample's image and labels always come from the same version of the file, even when
``normalize`` renames a new file over it between two reads.
Files open read-only without HDF5 file locking, with a chunk cache sized to a row of chunks.

Coordinates: voxel ``i`` along an axis starts at ``offset + i * resolution`` nm (the gunpowder /
CREMI convention used by the ``resolution`` and ``offset`` attributes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections import namedtuple
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from emdata.errors import AccessError, ConfigError, FormatError, NotBuiltError
from emdata.core.indexing import basic_box
from emdata.h5 import hdf5
from emdata.core.atomic import temporary_path

if TYPE_CHECKING:
    from emdata.access.blocks import Block

PhysicalPixelSizes = namedtuple("PhysicalPixelSizes", ["Z", "Y", "X"])  # micrometres, as in bioio
_Handle = namedtuple("_Handle", ["pid", "file", "dset", "chunkmap"])


# numpy.pad modes whose padded voxels are copies of voxels inside (or one constant).
PAD_MODES = ("reflect", "symmetric", "edge", "wrap", "constant")


class _SharedFile:
    """One HDF5 file opened once per process, shared by a Volume and the label Volumes made from it.

    Every array of one sample is read through this one open file, so when the path is replaced
    (a new version renamed over it) they all keep reading the version that was open. Opening is
    serialized by a lock: two threads never open two versions of the file in one process.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.opened: tuple[int, Any] | None = None  # (pid, h5py.File) of the process that opened it

    def current(self) -> Any | None:
        """This process's open file, or None if it has not been opened here."""
        opened = self.opened
        return opened[1] if opened is not None and opened[0] == os.getpid() else None

    def get(self) -> tuple[int, Any]:
        opened = self.opened
        if opened is not None and opened[0] == os.getpid():
            return opened
        with _OPEN_LOCK:
            opened = self.opened
            if opened is None or opened[0] != os.getpid():
                opened = (os.getpid(), hdf5.open_read(self.path))
                self.opened = opened
        return opened

    def close(self) -> None:
        opened, self.opened = self.opened, None
        if opened is not None and opened[0] == os.getpid():
            opened[1].close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "opened": None}  # never an open file: the receiver opens its own


_OPEN_LOCK = threading.Lock()


def _new_lock_in_child() -> None:
    global _OPEN_LOCK
    _OPEN_LOCK = threading.Lock()  # a lock held by another thread at fork would stay held in the child


os.register_at_fork(after_in_child=_new_lock_in_child)


class Volume:
    """One 3D array (``/raw`` or ``/labels/<name>``) of a canonical emdata HDF5 file."""

    def __init__(self, path: str | os.PathLike, array: str = hdf5.RAW, *, name: str | None = None,
                 resolution: Any = None, offset: Any = None, index: str | os.PathLike | None = None,
                 shared: _SharedFile | None = None) -> None:
        """``resolution``/``offset`` (nm, z/y/x) are needed only for files that do not record them.

        ``index``: the file's chunk-offset index (``data/metadata/<ds>.chunks``); found on its own
        beside the file or in the repository layout, and used only if it matches the file.
        ``shared``: the open file of another Volume of the same file (how ``labels`` are made).
        """
        self.path = Path(path)
        self.index = Path(index) if index is not None else None
        self.array = array
        self.name = name or self.path.stem
        self._handle: _Handle | None = None
        self._shared = shared if shared is not None else _SharedFile(self.path)
        where = f"{self.path}:/{array}"
        open_here = self._shared.current()
        if open_here is not None:  # the arrays' metadata from the version its reads will see
            self._describe(open_here, where, resolution, offset)
            return
        try:
            with hdf5.open_read(self.path) as f:
                self._describe(f, where, resolution, offset)
        except OSError as exc:  # not HDF5, truncated, unreadable: h5py's message names the cause
            raise FormatError(self.name, str(self.path), f"not a readable HDF5 file ({_reason(exc)})",
                              "open an HDF5 file written by emdata normalize, or normalize again") from exc

    def _describe(self, f: Any, where: str, resolution: Any, offset: Any) -> None:
        """Shape, dtype, chunks, axes and geometry of the array, checked as emdata writes them."""
        import h5py

        array = self.array
        dset = f.get(array)
        if dset is None:
            raise FormatError(self.name, where, "no such array (not an emdata volume file)",
                              f"arrays at the top: {', '.join(sorted(f.keys())) or 'none'}")
        if not isinstance(dset, h5py.Dataset):
            raise FormatError(self.name, where, "is a group, not an array (not an emdata volume file)")
        if dset.ndim not in (2, 3):
            raise AccessError(f"{self.path}:/{array} is {dset.ndim}D; a Volume reads 2D and 3D arrays")
        if dset.dtype.kind not in "biuf":
            raise FormatError(self.name, where, f"holds {dset.dtype} values; a Volume reads numbers")
        lead = (1,) * (3 - dset.ndim)  # a 2D image (collections) is a volume of one Z plane
        self.stored_shape: tuple[int, ...] = tuple(dset.shape)
        self.shape: tuple[int, int, int] = lead + tuple(dset.shape)  # type: ignore[assignment]
        self.dtype = dset.dtype
        self.chunks: tuple[int, ...] = lead + tuple(dset.chunks or dset.shape)
        attrs = hdf5.read_attrs(dset)
        axes = str(attrs.get("axes", "zyx"))
        self.dims = "YX" if dset.ndim == 2 else axes.upper()  # "ZYX", or "TYX" for a time series
        if resolution is None and "resolution" not in attrs:
            raise ConfigError(f"{self.path}:/{array} records no resolution; pass resolution=(z, y, x) in nm "
                              "(a voxel size is never guessed)")
        # 2D images and time series record a (y, x) pixel size: the first axis (one plane, or
        # time) gets 1.0 so that voxel and nm coordinates still map one to one along it.
        planar = dset.ndim == 2 or "z" not in axes.lower()
        self.resolution = _geometry(resolution, attrs.get("resolution"), "resolution", planar, self, where,
                                    positive=True)
        self.offset = _geometry(offset, attrs.get("offset", (0.0, 0.0, 0.0)), "offset", planar, self, where,
                                positive=False)
        self.attrs = attrs
        labels = f.get(hdf5.LABELS)
        if array == hdf5.RAW and labels is not None and not isinstance(labels, h5py.Group):
            raise FormatError(self.name, f"{self.path}:/{hdf5.LABELS}", "is an array, not a group of label arrays")
        self.label_names = sorted(labels.keys()) if array == hdf5.RAW and labels is not None else []

    # -- lazy, per-process file handle --------------------------------------------------------

    def _open(self) -> "_Handle":
        """This process's handle on the shared file, opened on first use.

        Published in one assignment once complete: threads (dask's scheduler) that race here
        at worst build a second handle on the same open file, and never see a half-built one.
        """
        handle, opened = self._handle, self._shared.opened
        if handle is None or opened is None or handle.file is not opened[1] or handle.pid != os.getpid():
            import h5py

            _, file = self._shared.get()
            dset = file.get(self.array)
            # The same layout and voxels (array_sha256) as when this Volume was created, else its
            # shape, geometry and statistics would describe another file than the one read.
            if not isinstance(dset, h5py.Dataset) or (tuple(dset.shape), dset.dtype, tuple(dset.chunks or dset.shape),
                                                      _attr_text(dset, "array_sha256")) != (
                    self.stored_shape, self.dtype, self.chunks[3 - len(self.stored_shape):],
                    str(self.attrs.get("array_sha256", ""))):
                raise AccessError(f"{self.path} was replaced by a different file since this Volume was "
                                  f"created; open it again (emdata.open_dataset or Volume)")
            row = self.chunks[0] * self.chunks[1] * self.shape[2] * self.dtype.itemsize
            dset = _with_cache(file, self.array, max(row, 4 << 20))  # a row of chunks, for this array alone
            table = None
            if hdf5.ChunkMap.usable(dset):
                from emdata.h5.chunk_index import local_table

                table = local_table(self.path, self.array, dset, self.index)
            handle = _Handle(os.getpid(), file, dset, hdf5.ChunkMap.build(dset, table))
            self._handle = handle
        return handle

    def _read_box(self, start: Any, stop: Any) -> np.ndarray:
        """A box inside the volume: memory-mapped chunks when uncompressed, else h5py."""
        handle = self._open()
        if handle.chunkmap is not None:
            return handle.chunkmap.read(tuple(int(v) for v in start), tuple(int(v) for v in stop))
        if len(self.stored_shape) == 2:
            return handle.dset[int(start[1]):int(stop[1]), int(start[2]):int(stop[2])][None]
        return handle.dset[tuple(slice(int(a), int(b)) for a, b in zip(start, stop))]

    def identity(self) -> str:
        """What names this array's file in ledgers (the resolved path; a remote volume's URL)."""
        return str(self.path.resolve())

    def close(self) -> None:
        """Close the file (shared with this Volume's labels: they reopen it on their next read)."""
        self._handle = None
        self._shared.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"] = None  # never pickle an open file or memory map: the receiver opens its own
        return state

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Volume({self.name!r}, /{self.array}, shape={self.shape}, dtype={self.dtype}, "
                f"resolution={self.resolution.tolist()} nm)")

    # -- bioimage-ecosystem views -------------------------------------------------------------

    ndim = 3
    dims = "ZYX"  # "YX" for a 2D image (shape (1, Y, X)), "TYX" for a time series

    @property
    def physical_pixel_sizes(self) -> PhysicalPixelSizes:
        """Voxel size in micrometres, Z, Y, X (bioio's convention)."""
        return PhysicalPixelSizes(*(self.resolution / 1000.0).tolist())

    @property
    def labels(self) -> dict[str, "Volume"]:
        return {n: Volume(self.path, f"{hdf5.LABELS}/{n}", name=f"{self.name}:{n}", index=self.index,
                          shared=self._shared) for n in self.label_names}

    @property
    def metadata(self) -> dict[str, Any]:
        """Root and array attributes of the file (statistics and params decoded from JSON)."""
        return file_metadata(hdf5.read_attrs(self._open().file), self.attrs)

    def to_dask(self, chunks: tuple[int, ...] | None = None):
        """A lazy dask array over this volume, chunked like the file (needs the ``dask`` extra)."""
        import dask.array as da

        return da.from_array(self, chunks=chunks or self.chunks, asarray=True, fancy=False,
                             name=f"emdata-{self.name}-{self.array}-{hashlib.sha1(str(self.path).encode()).hexdigest()[:8]}")

    def to_xarray(self):
        """An xarray DataArray (dask-backed) with z/y/x coordinates in nm."""
        import xarray as xr

        coords = {axis: self.offset[i] + np.arange(self.shape[i]) * self.resolution[i] for i, axis in enumerate("zyx")}
        return xr.DataArray(self.to_dask(), dims=("z", "y", "x"), coords=coords, name=self.name,
                            attrs={"units": "nm", "resolution": self.resolution.tolist(), "offset": self.offset.tolist()})

    # -- reading ------------------------------------------------------------------------------

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
        """The box ``[start, start + shape)`` in voxels.

        Inside the volume only, unless ``pad`` is one of the ``numpy.pad`` modes that copy voxels
        or a constant (``PAD_MODES``): then parts outside are filled that way. Otherwise AccessError.
        """
        start_t = tuple(int(v) for v in start)
        stop_t = tuple(a + int(n) for a, n in zip(start_t, shape))
        if all(0 <= a < b <= n for a, b, n in zip(start_t, stop_t, self.shape)):
            return self._read_box(start_t, stop_t)  # the common case, kept free of numpy overhead
        start = np.asarray(start_t, np.int64)
        stop = np.asarray(stop_t, np.int64)
        if np.any(np.asarray(shape) <= 0):
            raise AccessError(f"{self.name}: empty box shape {tuple(shape)}")
        inner_start = np.clip(start, 0, self.shape)
        inner_stop = np.clip(stop, 0, self.shape)
        outside = np.any(inner_start != start) or np.any(inner_stop != stop)
        if outside and pad is None:
            raise AccessError(f"{self.name}: box {start.tolist()}..{stop.tolist()} is outside the volume "
                              f"{list(self.shape)}; pass pad='reflect' (or another numpy.pad mode) to fill it")
        if outside and pad not in PAD_MODES:  # "mean", "linear_ramp", ...: computed, not copied
            raise ConfigError(f"{self.name}: pad={pad!r} is not supported; use one of {', '.join(PAD_MODES)}")
        # Boxes inside the volume returned above: from here on, part of the box lies outside.
        if pad == "constant":
            out = np.full(tuple(stop - start), constant, self.dtype)
            if np.all(inner_stop > inner_start):
                out[tuple(slice(a - s, b - s) for a, b, s in zip(inner_start, inner_stop, start))] = \
                    self._read_box(inner_start, inner_stop)
            return out
        # numpy.pad's other modes are separable: each output index along an axis comes from one
        # source index. Map the box's indices through np.pad of arange, read the span they need,
        # and gather. This is exact for boxes of any size or position, even off the volume.
        index = []
        for s, e, n in zip(start, stop, self.shape):
            margin = int(max(0, -s, e - n))
            index.append(np.pad(np.arange(n), margin, mode=pad)[s + margin:e + margin])
        span = tuple(slice(int(i.min()), int(i.max()) + 1) for i in index)
        data = self._read_box([sl.start for sl in span], [sl.stop for sl in span])
        for axis, (i, sl) in enumerate(zip(index, span)):
            data = _gather(data, i - sl.start, axis)
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

    def blocks(self, block_shape: tuple[int, int, int], *, halo: tuple[int, int, int] = (0, 0, 0),
               fit: str = "pad") -> Iterator["Block"]:
        """Blocks covering the volume exactly (see :func:`emdata.access.blocks.block_grid`)."""
        from emdata.access.blocks import block_grid

        return block_grid(self.shape, block_shape, halo=halo, fit=fit)

    def read_block(self, block: "Block", *, pad: str = "reflect", constant: float = 0) -> np.ndarray:
        """A block's read region; with ``fit="pad"`` the parts outside are filled with ``pad``."""
        return self.read(block.read_start, block.read_shape, pad=pad, constant=constant)


def _runs(index: np.ndarray) -> list[slice]:
    """``index`` as consecutive slices of step +1 or -1 (what numpy.pad's modes produce)."""
    runs, start, n = [], 0, len(index)
    while start < n:
        end = start + 1
        step = int(index[end] - index[start]) if end < n else 1
        step = step if step in (1, -1) else 1  # a repeated index ("edge") is a run of one
        while end < n and index[end] - index[end - 1] == step:
            end += 1
        first, last = int(index[start]), int(index[end - 1])
        runs.append(slice(first, last + 1) if step == 1 else slice(first, last - 1 if last > 0 else None, -1))
        start = end
    return runs


def _gather(data: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """``numpy.take(data, index, axis)`` by concatenating slices: ~5x faster than fancy indexing
    for padded blocks, and a view when ``index`` is the whole axis in order."""
    runs = _runs(index)
    if runs == [slice(0, data.shape[axis])]:
        return data
    lead = (slice(None),) * axis
    return np.concatenate([data[lead + (run,)] for run in runs], axis=axis)


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


def _geometry(given: Any, stored: Any, what: str, planar: bool, volume: "Volume", where: str, *,
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
    problem = None
    if values is None or values.size not in sizes:
        problem = f"{source} {what} {raw!r} is not {' or '.join(map(str, sizes))} numbers"
    elif not np.all(np.isfinite(values)) or (positive and not np.all(values > 0)):
        problem = f"{source} {what} {values.tolist()} nm is not {'positive and ' if positive else ''}finite"
    if problem is None:
        return _three(values, 1.0 if positive else 0.0)
    if given is not None:
        raise ConfigError(f"{volume.name}: {where}: {problem}; pass {what}=(z, y, x) in nm")
    raise FormatError(volume.name, where, problem, f"pass {what}=(z, y, x) in nm to Volume, or normalize again")


def _three(values: np.ndarray, first: float) -> np.ndarray:
    """(y, x) values of a 2D image or time series as three, ``first`` for the leading axis."""
    return np.concatenate([np.full(3 - values.size, first), values]) if values.size < 3 else values


def open_dataset(name: str | os.PathLike, *, rev: str | None = None, repo: str | os.PathLike | None = None,
                 label: str | None = None, cache_dir: str | os.PathLike | None = None, remote: str | None = None,
                 remote_config: dict[str, Any] | None = None) -> Volume:
    """Open ``data/processed/<name>.h5`` read-only (``label`` picks ``/labels/<label>``).

    ``name`` may also be the path of an emdata HDF5 file (a ``Path``, or a string ending in
    ``.h5``/``.hdf5`` or containing a ``/``), e.g. one from ``dvc import`` or a colleague.

    Without ``rev``/``repo``: the file in this repository's working tree (the nearest folder
    holding params.yaml, or ``$EMDATA_PROJECT``). With them: that exact version, fetched through
    DVC's Python API from ``repo`` (a path or Git URL) at ``rev`` (tag, branch or commit) into a
    cache keyed by the file's DVC content hash (``cache_dir``, ``$EMDATA_CACHE`` or
    ``~/.cache/emdata``) first, so a moved branch never serves stale data.

    With ``remote`` (a DVC remote's name, e.g. ``"s3"``): nothing is downloaded; the file stays in
    the remote and each read fetches only the chunks it touches (:mod:`emdata.access.remote`),
    through the chunk-offset index normalize writes. ``remote_config`` overrides that remote's
    DVC settings (e.g. ``{"endpointurl": ...}``).
    """
    if remote is not None:
        from emdata.params.schema import KEY_PATTERN

        if _looks_like_path(name):
            raise ConfigError(f"{name}: rev=, repo= and remote= take a dataset name, not a file path")
        if not KEY_PATTERN.fullmatch(str(name)):
            raise ConfigError(f"{name!r}: remote= takes a dataset name")
        from emdata.access.remote import open_remote

        return open_remote(str(name), rev=rev, repo=repo, remote=remote, label=label, remote_config=remote_config)
    path, display = dataset_path(name, rev=rev, repo=repo, cache_dir=cache_dir)
    volume = Volume(path) if _looks_like_path(name) else Volume(path, name=display)
    return volume if label is None else _label_of(volume, display, label)


def dataset_path(name: str | os.PathLike, *, rev: str | None = None, repo: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The HDF5 file ``name`` stands for (see :func:`open_dataset`), and the name to show."""
    from emdata.params.layout import find_root, processed_relpath
    from emdata.params.schema import KEY_PATTERN

    if _looks_like_path(name):
        if rev is not None or repo is not None:
            raise ConfigError(f"{name}: rev=, repo= and remote= take a dataset name, not a file path")
        file = Path(name).expanduser()
        if not file.is_file():
            raise NotBuiltError(f"{file}: no such file (opened as a path because it is a Path, ends in .h5/.hdf5 "
                                f"or contains '/'); for a dataset of this repository pass its name")
        return file, str(file)
    name = str(name)
    if not KEY_PATTERN.fullmatch(name):
        raise ConfigError(f"{name!r} is neither a dataset name (names match {KEY_PATTERN.pattern}) nor an "
                          f"HDF5 path (a Path, a string ending in .h5/.hdf5, or containing '/')")
    if rev is None and repo is None:
        path = find_root() / processed_relpath(name)
        if not path.is_file():
            raise NotBuiltError(f"{name}: {path} is missing; get it with `dvc pull {processed_relpath(name)}` "
                                f"or build it with `dvc repro normalize@{name}`")
        return path, name
    return _fetch_version(name, rev=rev, repo=repo, cache_dir=cache_dir), name


def _looks_like_path(name: Any) -> bool:
    if isinstance(name, os.PathLike):
        return True
    return isinstance(name, str) and ("/" in name or os.sep in name or name.endswith((".h5", ".hdf5")))


def _label_of(volume: Volume, name: str, label: str) -> Volume:
    if label not in volume.label_names:
        raise ConfigError(f"{name}: no label {label!r} (labels: {', '.join(volume.label_names) or 'none'})")
    return volume.labels[label]


def _fetch_version(name: str, *, rev: str | None, repo: Any, cache_dir: Any) -> Path:
    """Copy ``data/processed/<name>.h5`` at ``rev`` into a cache keyed by its DVC content hash."""
    from dvc.api import DVCFileSystem

    from emdata.params.layout import processed_relpath

    repo_str = str(Path(repo).resolve()) if repo is not None and Path(repo).exists() else (str(repo) if repo else None)
    rel = processed_relpath(name)
    try:
        fs = DVCFileSystem(repo_str, rev=rev)
        info = fs.info(rel)
        digest = info.get("md5") or (info.get("dvc_info") or {}).get("md5")
        if not digest:
            raise NotBuiltError(f"{name}: {rel} at rev {rev!r} is not tracked by DVC")
        cache = Path(cache_dir or os.environ.get("EMDATA_CACHE") or Path.home() / ".cache" / "emdata") / digest
        target = cache / f"{name}.h5"
        if target.is_file():
            return target
        cache.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(target)
        try:
            with fs.open(rel, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    except NotBuiltError:
        raise
    except Exception as exc:
        raise NotBuiltError(f"{name}: cannot get {rel} at rev {rev!r} of {repo_str or 'this repository'} "
                            f"({type(exc).__name__}: {exc}); check the rev and that its data were pushed") from exc
    return target


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
