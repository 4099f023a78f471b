"""Multipage greyscale TIFF as a lazy ZYX volume: pages are Z, rows are Y, columns are X.

The page orientation is read from the file (TIFF tag 274) and applied, never assumed; every
page must have the same shape and dtype. Reads are slab by slab, so a 3 GB file is never held
in memory. Any failure of the TIFF reader becomes a FormatError naming dataset and file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError
from ..sources.base import RawVolume

ORIENTATION_TAG = 274
# TIFF orientation -> (transpose rows/cols first, flip rows, flip cols) to reach top-left.
_ORIENT = {
    1: (False, False, False), 2: (False, False, True), 3: (False, True, True), 4: (False, True, False),
    5: (True, False, False), 6: (True, False, True), 7: (True, True, True), 8: (True, True, False),
}


class TiffStack(RawVolume):
    """Read-only ZYX view of a multipage TIFF."""

    def __init__(self, path: Path, dataset: str) -> None:
        import tifffile

        self.path = Path(path)
        self.dataset = dataset
        try:
            self._tif = tifffile.TiffFile(self.path)
            pages = self._tif.pages
            first = pages.first
            shape, dtype = first.shape, first.dtype
            orientation = int(first.tags.valueof(ORIENTATION_TAG, 1))
            count = len(pages)
            if first.samplesperpixel != 1 or len(shape) != 2:
                raise self._error(f"pages are {shape} with {first.samplesperpixel} samples; "
                                  "a greyscale stack (one sample per pixel) is expected")
            for i, page in enumerate(pages):
                if page.shape != shape or page.dtype != dtype:
                    raise self._error(f"page {i} is {page.shape} {page.dtype}, page 0 is {shape} {dtype}; "
                                      "all pages must match")
        except FormatError:
            self.close()
            raise
        except Exception as exc:  # tifffile raises many types on broken files
            self.close()
            raise self._error(f"not a readable TIFF ({type(exc).__name__}: {exc})") from exc
        if orientation not in _ORIENT:
            raise self._error(f"unknown TIFF orientation {orientation}")
        self.orientation = orientation
        transpose = _ORIENT[orientation][0]
        self.page_shape = tuple(shape)
        self.shape = (count, *(shape[::-1] if transpose else shape))
        self.dtype = np.dtype(dtype).newbyteorder("=")

    def _error(self, problem: str) -> FormatError:
        return FormatError(self.dataset, str(self.path), problem,
                           f"delete data/raw/{self.dataset} and run `emdata fetch {self.dataset}` again")

    def read(self, z0: int, z1: int) -> np.ndarray:
        if z1 <= z0:
            return np.empty((0, *self.shape[1:]), self.dtype)
        try:
            data = self._tif.asarray(key=range(z0, z1), maxworkers=1)
        except Exception as exc:
            raise self._error(f"pages {z0}..{z1 - 1} cannot be read ({type(exc).__name__}: {exc})") from exc
        data = data.reshape((z1 - z0, *self.page_shape))
        transpose, flip_rows, flip_cols = _ORIENT[self.orientation]
        if transpose:
            data = data.transpose(0, 2, 1)
        if flip_rows:
            data = data[:, ::-1, :]
        if flip_cols:
            data = data[:, :, ::-1]
        return np.ascontiguousarray(data, dtype=self.dtype)

    def tags(self) -> dict[str, Any]:
        """Tags of the first page and the page count, for the metadata record."""
        first = self._tif.pages.first
        tags = {}
        for tag in first.tags.values():
            if tag.name in ("StripOffsets", "StripByteCounts", "TileOffsets", "TileByteCounts"):
                continue
            value = tag.value
            tags[tag.name] = value if isinstance(value, (int, float, str)) else repr(value)
        return {"byteorder": self._tif.byteorder, "is_bigtiff": self._tif.is_bigtiff,
                "pages": self.shape[0], "first_page_tags": tags}

    def close(self) -> None:
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()
            self._tif = None
