"""The raw-volume type every source returns: a lazy, read-only ZYX view that reads boxes.

Neutral on purpose: it imports neither the HTTP layer nor the source registry, so readers in
``emdata.io`` (TIFF, later DM3, zarr, precomputed) build on it without pulling in ``requests``.

A raw volume reports its geometry when the format carries one (DM3 calibration, NGFF
scale/translation, precomputed resolution/voxel_offset, OMERO physical sizes) and ``None`` when
it does not (a plain TIFF); :mod:`emdata.core.geometry` reconciles it with params.yaml.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, TypeVar

import numpy as np

from emdata.errors import ConfigError
from emdata.core.indexing import basic_box

Triple = tuple[float, float, float]
IntTriple = tuple[int, int, int]
V = TypeVar("V", bound="RawVolume")


class RawVolume:
    """A lazy, read-only ZYX view of a dataset's raw data.

    Subclasses set ``shape``, ``dtype`` and ``dataset`` (for messages), optionally
    ``voxel_size_nm``/``offset_nm``, and implement :meth:`read_box`. Axis conversion to Z, Y, X
    happens once, inside the subclass: callers only ever see ZYX.
    """

    shape: IntTriple
    dtype: np.dtype
    dataset: str = "volume"
    axes: str = "zyx"
    voxel_size_nm: Triple | None = None
    offset_nm: Triple | None = None

    def read_box(self, start: IntTriple, stop: IntTriple) -> np.ndarray:  # pragma: no cover - abstract
        """Voxels ``[start, stop)`` (inside the volume), C-contiguous, shape ``stop - start``."""
        raise NotImplementedError

    def read_between(self, start: tuple[int, ...], stop: tuple[int, ...]) -> np.ndarray:
        """Voxels ``[start, stop)``: :meth:`read_box` after checking the box lies inside the volume.

        ``stop`` is one past the last voxel (not a shape, as in ``emdata.Volume.read(start, shape)``).
        """
        start3, stop3 = check_box(start, stop, self.shape, self.dataset)
        if any(b == a for a, b in zip(start3, stop3)):
            return np.empty(tuple(b - a for a, b in zip(start3, stop3)), self.dtype)
        return self.read_box(start3, stop3)

    def read(self, start: tuple[int, ...], stop: tuple[int, ...]) -> np.ndarray:
        """Deprecated: :meth:`read_between` (same arguments); ``Volume.read`` takes a shape instead."""
        warnings.warn("RawVolume.read(start, stop) is deprecated, use read_between(start, stop) (same meaning; "
                      "emdata.Volume.read takes a shape)", DeprecationWarning, stacklevel=2)
        return self.read_between(start, stop)

    def native_metadata(self) -> dict[str, Any]:
        """What the format says about itself (tags, attributes), JSON-safe; empty by default."""
        return {}

    def close(self) -> None:
        pass

    def __enter__(self: V) -> V:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, index: Any) -> np.ndarray:
        """numpy-style basic indexing (integers, unit-step slices, Ellipsis) in voxels."""
        start, stop, squeeze = basic_box(index, self.shape, self.dataset)
        data = self.read_between(tuple(start), tuple(stop))
        return data.squeeze(axis=squeeze) if squeeze else data


def check_box(start: tuple[int, ...], stop: tuple[int, ...], shape: tuple[int, ...],
              name: str) -> tuple[IntTriple, IntTriple]:
    """Integer ZYX bounds inside ``shape``; a ValueError names the volume otherwise."""
    a = tuple(int(v) for v in start)
    b = tuple(int(v) for v in stop)
    if len(a) != 3 or len(b) != 3 or not all(0 <= lo <= hi <= n for lo, hi, n in zip(a, b, shape)):
        raise ValueError(f"{name}: box {a}..{b} is not inside the volume {tuple(shape)}")
    return a, b


class ArrayVolume(RawVolume):
    """An in-memory array as a RawVolume (tests, replicas, small derived volumes)."""

    def __init__(self, array: np.ndarray, dataset: str = "array", *, voxel_size_nm: Triple | None = None,
                 offset_nm: Triple | None = None) -> None:
        if array.ndim != 3:
            raise ConfigError(f"{dataset}: a 3D array is expected, got shape {array.shape}")
        self.array = array
        self.dataset = dataset
        self.shape = tuple(array.shape)
        self.dtype = array.dtype
        self.voxel_size_nm = voxel_size_nm
        self.offset_nm = offset_nm

    def read_box(self, start: IntTriple, stop: IntTriple) -> np.ndarray:
        return np.ascontiguousarray(self.array[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]])


class MappedVolume(RawVolume):
    """Another volume with some integer values replaced (``{255: 1}``); the rest pass unchanged."""

    def __init__(self, inner: RawVolume, mapping: dict[int, int]) -> None:
        self.inner = inner
        self.mapping = dict(mapping)
        self.dataset = inner.dataset
        self.shape = inner.shape
        self.dtype = inner.dtype
        self.voxel_size_nm, self.offset_nm = inner.voxel_size_nm, inner.offset_nm
        if self.dtype.kind not in "iu":
            raise ConfigError(f"{self.dataset}: label values can be mapped only in integer volumes, not {self.dtype}")
        info = np.iinfo(self.dtype)
        bad = [v for pair in self.mapping.items() for v in pair if not info.min <= v <= info.max]
        if bad:
            raise ConfigError(f"{self.dataset}: label value {bad[0]} does not fit the labels' type {self.dtype}")
        self._lut = None
        if self.dtype.itemsize == 1:  # a lookup table is one pass for 8-bit labels
            self._lut = np.arange(info.min, info.max + 1, dtype=np.int64).astype(self.dtype)
            for native, stored in self.mapping.items():
                self._lut[native - info.min] = stored

    def read_box(self, start: IntTriple, stop: IntTriple) -> np.ndarray:
        data = self.inner.read_box(start, stop)
        if self._lut is not None:
            offset = int(np.iinfo(self.dtype).min)
            return self._lut[data.astype(np.int16) - offset] if offset else self._lut[data]
        out = data.copy()
        for native, stored in self.mapping.items():
            out[data == native] = stored
        return out

    def close(self) -> None:
        self.inner.close()


def json_safe(value: Any) -> Any:
    """Round-trip through JSON with numpy scalars, arrays and bytes made plain."""

    def default(obj: Any) -> Any:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, bytes):
            return obj.decode("utf-8", "replace")
        return str(obj)

    return json.loads(json.dumps(value, default=default))
