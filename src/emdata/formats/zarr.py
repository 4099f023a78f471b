"""A box of a local zarr v2 array as a lazy ZYX volume, read with tensorstore.

The fetch of a chunked source (OME-Zarr on S3) leaves a local zarr subset: the group and array
metadata as served, and exactly the chunk objects a region of interest touches. This reader
opens such an array with tensorstore's ``zarr`` driver on the ``file`` key-value store, so the
``.zarray`` decides everything (dtype and byte order, chunks, compressor, fill value, order,
``dimension_separator``), and a chunk the service does not have reads as the fill value, as zarr
specifies. Leading axes of length one (``t``, ``c``) are dropped; the remaining three are Z, Y, X.
Values come back in native byte order and are never rescaled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from emdata.errors import FormatError, refetch_hint
from emdata.formats.raw import IntTriple, RawVolume, Triple

READ_TIMEOUT = 600.0  # seconds for one box from local disk: only a broken file system gets near it


class ZarrVolume(RawVolume):
    """The box ``[start, stop)`` (ZYX voxels) of the zarr v2 array at ``path``."""

    def __init__(self, path: Path, dataset: str, *, start: IntTriple | None = None, stop: IntTriple | None = None,
                 voxel_size_nm: Triple | None = None, offset_nm: Triple | None = None) -> None:
        import tensorstore as ts

        self.path = Path(path)
        self.dataset = dataset
        try:
            self.zarray = json.loads((self.path / ".zarray").read_text())
        except (OSError, ValueError) as exc:
            raise self._error(f"no readable .zarray ({exc})") from exc
        spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(self.path) + "/"},
                "recheck_cached_data": False, "recheck_cached_metadata": False}
        try:
            self._array: Any = ts.open(spec, read=True, open=True,
                                  context=ts.Context({"cache_pool": {"total_bytes_limit": 0}})).result(
                timeout=READ_TIMEOUT)
        except Exception as exc:  # tensorstore reports every failure as ValueError with a status text
            raise self._error(f"tensorstore cannot open the array ({_first_line(exc)})") from exc
        full = tuple(int(n) for n in self._array.shape)
        self._lead = len(full) - 3
        if self._lead < 0 or any(n != 1 for n in full[:self._lead]):
            raise self._error(f"array shape {full}: three spatial axes (after axes of length 1) are expected")
        space = full[self._lead:]
        self.start = tuple(start) if start is not None else (0, 0, 0)
        self.stop = tuple(stop) if stop is not None else space
        if not all(0 <= a < b <= n for a, b, n in zip(self.start, self.stop, space)):
            raise self._error(f"the box {self.start}..{self.stop} is not inside the array {space}")
        self.shape = tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[assignment]
        self.dtype = np.dtype(self._array.dtype.numpy_dtype)
        self.voxel_size_nm = voxel_size_nm
        self.offset_nm = offset_nm

    def _error(self, problem: str) -> FormatError:
        return FormatError(self.dataset, str(self.path), problem, refetch_hint(self.dataset))

    def read_box(self, start: IntTriple, stop: IntTriple) -> np.ndarray:
        index = (0,) * self._lead + tuple(slice(o + a, o + b) for o, a, b in zip(self.start, start, stop))
        try:
            data = self._array[index].read().result(timeout=READ_TIMEOUT)
        except Exception as exc:
            raise self._error(f"reading the box {start}..{stop} failed ({_first_line(exc)})") from exc
        return np.ascontiguousarray(data)

    def native_metadata(self) -> dict[str, Any]:
        return {"zarray": self.zarray}

    def close(self) -> None:
        self._array = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
