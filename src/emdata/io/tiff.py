"""Greyscale TIFF stacks as lazy ZYX volumes, with the axes taken from the file.

tifffile's series says what the pages are: a plain multipage file or a shaped/ImageJ stack whose
only non-YX axis is Z (or tifffile's generic ``I``/``Q``) is read with pages as Z. Channels,
time points or samples (C, T, S with more than one entry) are refused with a clear error rather
than flattened into Z. The page orientation (TIFF tag 274) is applied, never assumed; big-endian
files are read correctly and returned in native byte order.

Boxes are read without holding more than the box: an uncompressed contiguous stack is memory
mapped and sliced; otherwise pages are decoded one at a time and cropped. Any reader failure
becomes a FormatError naming the dataset and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError
from ..raw import IntTriple, RawVolume

ORIENTATION_TAG = 274
STACK_AXES = "ZIQ"  # tifffile's names for "a stack of planes": Z, generic images, unknown
# TIFF orientation -> (transpose rows/cols first, flip rows, flip cols) to reach top-left.
_ORIENT = {
    1: (False, False, False), 2: (False, False, True), 3: (False, True, True), 4: (False, True, False),
    5: (True, False, False), 6: (True, False, True), 7: (True, True, True), 8: (True, True, False),
}


class TiffStack(RawVolume):
    """Read-only ZYX view of a greyscale TIFF stack (no voxel size: plain TIFFs carry none)."""

    def __init__(self, path: Path, dataset: str) -> None:
        import tifffile

        self.path = Path(path)
        self.dataset = dataset
        self._tif: Any = None
        self._map: np.ndarray | None = None
        try:
            self._tif = tifffile.TiffFile(self.path)
            self._open_series()
        except FormatError:
            self.close()
            raise
        except Exception as exc:  # tifffile raises many types on broken files
            self.close()
            raise self._error(f"not a readable TIFF ({type(exc).__name__}: {exc})") from exc

    def _open_series(self) -> None:
        tif = self._tif
        series = tif.series
        first = tif.pages.first
        if first.samplesperpixel != 1:
            raise self._error(f"pages have {first.samplesperpixel} samples per pixel; a greyscale stack is expected")
        if len(series) == 1:
            s = series[0]
            self.file_axes = s.get_axes(False)
            # One sample per pixel was checked above: a trailing S axis of length 1 is no axis.
            pairs = [(a, n) for a, n in zip(self.file_axes, s.get_shape(False)) if not (a == "S" and n == 1)]
            axes = "".join(a for a, _ in pairs)
            shape = tuple(n for _, n in pairs)
            extra = [(a, n) for a, n in pairs[:-2] if n > 1]
            if axes[-2:] != "YX" or any(a not in STACK_AXES for a, _ in extra) or len(extra) > 1:
                raise self._error(f"the file's axes are {self.file_axes} {tuple(shape)}; only a Z stack of "
                                  "greyscale planes (axes Z/I/Q, Y, X) can be read: split channels or time points first")
            depth = extra[0][1] if extra else 1
            page_shape = tuple(shape[-2:])
            pages = list(s.pages) if len(s.pages) == depth else None
            offset = s.dataoffset
        else:  # one series per page: each page must be a plane of the same shape and dtype
            self.file_axes = "IYX"
            pages = list(tif.pages)
            depth, page_shape, offset = len(pages), tuple(first.shape), None
            for i, page in enumerate(pages):
                if page.shape != page_shape or page.dtype != first.dtype or page.samplesperpixel != 1:
                    raise self._error(f"page {i} is {page.shape} {page.dtype}, page 0 is {page_shape} "
                                      f"{first.dtype}; all pages must match")
        file_dtype = np.dtype(first.dtype).newbyteorder(tif.byteorder)
        orientation = int(first.tags.valueof(ORIENTATION_TAG, 1))
        if orientation not in _ORIENT:
            raise self._error(f"unknown TIFF orientation {orientation}")
        self.orientation = orientation
        self.page_shape = page_shape
        self._pages = pages
        if offset is not None:  # uncompressed and contiguous: slice a memory map
            nbytes = depth * page_shape[0] * page_shape[1] * file_dtype.itemsize
            size = self.path.stat().st_size
            if offset + nbytes > size:
                raise self._error(f"the file holds {size} bytes but its {depth} pages need {offset + nbytes}; "
                                  "it is truncated")
            self._map = np.memmap(self.path, dtype=file_dtype, mode="r", offset=offset,
                                  shape=(depth, *page_shape))
        elif pages is None:
            raise self._error(f"the series has {len(series[0].pages)} page entries for {depth} planes "
                              "and is not contiguous; it cannot be read plane by plane")
        transpose = _ORIENT[orientation][0]
        self.shape = (depth, *(page_shape[::-1] if transpose else page_shape))
        self.dtype = file_dtype.newbyteorder("=")

    def _error(self, problem: str) -> FormatError:
        return FormatError(self.dataset, str(self.path), problem,
                           f"delete data/raw/{self.dataset} and run `emdata fetch {self.dataset}` again")

    def _oriented(self, plane: np.ndarray) -> np.ndarray:
        """A stored plane (or stack of planes) as displayed: views only, no copy."""
        transpose, flip_rows, flip_cols = _ORIENT[self.orientation]
        if transpose:
            plane = plane.swapaxes(-1, -2)
        if flip_rows:
            plane = plane[..., ::-1, :]
        if flip_cols:
            plane = plane[..., :, ::-1]
        return plane

    def read_box(self, start: IntTriple, stop: IntTriple) -> np.ndarray:
        (z0, y0, x0), (z1, y1, x1) = start, stop
        out = np.empty((z1 - z0, y1 - y0, x1 - x0), self.dtype)
        try:
            if self._map is not None:
                out[...] = self._oriented(self._map[z0:z1])[:, y0:y1, x0:x1]
            elif self._pages is not None:
                for i, z in enumerate(range(z0, z1)):
                    page = self._pages[z].asarray(maxworkers=1)
                    out[i] = self._oriented(page.reshape(self.page_shape))[y0:y1, x0:x1]
        except FormatError:
            raise
        except Exception as exc:
            raise self._error(f"pages {z0}..{z1 - 1} cannot be read ({type(exc).__name__}: {exc})") from exc
        return out

    def tags(self) -> dict[str, Any]:
        """Tags of the first page, the page count and the file's axes, for the metadata record."""
        first = self._tif.pages.first
        tags = {}
        for tag in first.tags.values():
            if tag.name in ("StripOffsets", "StripByteCounts", "TileOffsets", "TileByteCounts"):
                continue
            value = tag.value
            tags[tag.name] = value if isinstance(value, (int, float, str)) else repr(value)
        return {"byteorder": self._tif.byteorder, "is_bigtiff": self._tif.is_bigtiff, "axes": self.file_axes,
                "pages": self.shape[0], "first_page_tags": tags}

    def native_metadata(self) -> dict[str, Any]:
        return self.tags()

    def close(self) -> None:
        self._map = None
        tif, self._tif = self._tif, None
        if tif is not None:
            tif.close()
