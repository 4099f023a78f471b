"""Greyscale TIFF stacks as lazy ZYX volumes, with the axes taken from the file.

tifffile's series says what the pages are: a plain multipage file or a shaped/ImageJ stack whose
only non-YX axis is Z (or tifffile's generic ``I``/``Q``) is read with pages as Z. Channels,
time points or samples (C, T, S with more than one entry) are refused with a clear error rather
than flattened into Z. The page orientation (TIFF tag 274) is applied, never assumed; big-endian
files are read correctly and returned in native byte order.

A file cut short is refused, never read as fewer planes: every page's strips must lie inside the
file, and the page chain must end where tifffile stopped reading it (tifffile stops at a
next-page pointer beyond the end or into a cut directory and only logs it; a classic libtiff
file, each page's strips followed by its directory, cut in half then reads as half the planes).

Boxes are read without holding more than the box: an uncompressed contiguous stack is read with
``os.preadv`` straight into the output (row bands of each plane; no memory map, whose touched
pages would stay in the process's RSS and fault in page by page); otherwise pages are decoded one
at a time and cropped. Any reader failure
becomes a FormatError naming the dataset and the file.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from emdata.errors import FormatError, refetch_hint
from emdata.formats.raw import IntTriple, RawVolume

ORIENTATION_TAG = 274
STACK_AXES = "ZIQ"  # tifffile's names for "a stack of planes": Z, generic images, unknown
# Fetching again cannot change a file's layout: say what can.
CONVERT = "fetching again gives the same file: convert it to a greyscale Z stack, or use another file"
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
        self._fd: int | None = None
        self._data_offset: int | None = None
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
            raise self._error(f"pages have {first.samplesperpixel} samples per pixel (RGB or multichannel); "
                              "a greyscale stack is expected", CONVERT)
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
                                  "greyscale planes (axes Z/I/Q, Y, X) can be read",
                                  "fetching again gives the same file: split its channels or time points into "
                                  "greyscale Z stacks, or use another file")
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
                                      f"{first.dtype}; all pages must match", CONVERT)
        # A truncated ImageJ stack loses its page chain: tifffile then offers the pages it still
        # finds (often one), so the planes ImageJ's description declares are the authority.
        declared = (tif.imagej_metadata or {}).get("images") if tif.is_imagej else None
        if isinstance(declared, int) and declared > depth:
            raise self._error(f"the ImageJ description declares {declared} planes but only {depth} can be "
                              "found; it is truncated")
        self._check_extent(pages)
        file_dtype = np.dtype(first.dtype).newbyteorder(tif.byteorder)
        orientation = int(first.tags.valueof(ORIENTATION_TAG, 1))
        if orientation not in _ORIENT:
            raise self._error(f"unknown TIFF orientation {orientation}")
        self.orientation = orientation
        self.page_shape = page_shape
        self._pages = pages
        if offset is not None:  # uncompressed and contiguous: read byte ranges directly
            nbytes = depth * page_shape[0] * page_shape[1] * file_dtype.itemsize
            size = self.path.stat().st_size
            if offset + nbytes > size:
                raise self._error(f"the file holds {size} bytes but its {depth} pages need {offset + nbytes}; "
                                  "it is truncated")
            self._data_offset = int(offset)
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        elif pages is None:
            raise self._error(f"the series has {len(series[0].pages)} page entries for {depth} planes "
                              "and is not contiguous; it cannot be read plane by plane")
        transpose = _ORIENT[orientation][0]
        self.shape = (depth, *(page_shape[::-1] if transpose else page_shape))
        self.dtype = file_dtype.newbyteorder("=")
        self.file_dtype = file_dtype

    def _check_extent(self, pages: list[Any] | None) -> None:
        """Strips and the page chain inside the file: a file cut short is refused, not read as fewer planes."""
        tif = self._tif
        size = tif.filehandle.size
        for i, page in enumerate(pages or []):
            if page is None:
                continue
            end = max((int(o) + int(n) for o, n in zip(page.dataoffsets, page.databytecounts)), default=0)
            if end > size:
                raise self._error(f"page {i}'s image data end at byte {end} but the file has {size} bytes; "
                                  "it is truncated")
        if tif.is_imagej:
            # ImageJ's own checks cover it (declared planes, contiguous size); its files over 4 GiB
            # have 32-bit page pointers that wrap, and tifffile reads them without the chain.
            return
        count = len(tif.pages)  # tifffile follows the whole chain here, stopping where it cannot go on
        after = self._next_page_pointer(tif.pages[count - 1].offset)
        if after is None:
            raise self._error(f"the directory of page {count - 1} ends beyond the file's {size} bytes; "
                              "it is truncated")
        if after != 0:
            where = f"beyond the file's {size} bytes" if after >= size else "where no page can be read"
            raise self._error(f"page {count - 1} points to a next page at byte {after}, {where}; the file is "
                              f"truncated or damaged ({count} pages readable)")

    def _next_page_pointer(self, offset: int) -> int | None:
        """The next-IFD offset stored after the directory at ``offset``; None when the file ends first."""
        fmt, fh = self._tif.tiff, self._tif.filehandle
        with fh.lock:
            fh.seek(offset)
            head = fh.read(fmt.tagnosize)
            if len(head) < fmt.tagnosize:
                return None
            fh.seek(offset + fmt.tagnosize + struct.unpack(fmt.tagnoformat, head)[0] * fmt.tagsize)
            tail = fh.read(fmt.offsetsize)
        return int(struct.unpack(fmt.offsetformat, tail)[0]) if len(tail) == fmt.offsetsize else None

    def _error(self, problem: str, hint: str | None = None) -> FormatError:
        return FormatError(self.dataset, str(self.path), problem, hint or refetch_hint(self.dataset))

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
            if self._fd is not None:
                self._read_contiguous(out, start, stop)
            elif self._pages is not None:
                for i, z in enumerate(range(z0, z1)):
                    page = self._pages[z].asarray(maxworkers=1)
                    out[i] = self._oriented(page.reshape(self.page_shape))[y0:y1, x0:x1]
        except FormatError:
            raise
        except Exception as exc:
            raise self._error(f"pages {z0}..{z1 - 1} cannot be read ({type(exc).__name__}: {exc})") from exc
        return out

    def _pread(self, buffer: np.ndarray, offset: int) -> None:
        view = buffer.data.cast("B")
        got = 0
        while got < len(view):  # preadv may return short counts
            n = os.preadv(self._fd, [view[got:]], offset + got)  # type: ignore[arg-type]
            if n == 0:
                raise self._error(f"the file ends at byte {offset + got}, before the pages it declares; it is truncated")
            got += n

    def _read_contiguous(self, out: np.ndarray, start: IntTriple, stop: IntTriple) -> None:
        """Read a box of a contiguous stack: whole bands of stored rows per plane, then orient and crop."""
        (z0, y0, x0), (z1, y1, x1) = start, stop
        h, w = self.page_shape
        item = self.file_dtype.itemsize
        base = self._data_offset or 0
        plain = self.orientation == 1
        native = self.file_dtype == self.dtype
        if plain and native and (y0, x0, y1, x1) == (0, 0, h, w):  # whole planes: one read into the output
            self._pread(out, base + z0 * h * w * item)
            return
        # Stored rows that hold the box: display rows when not transposed, display columns when transposed.
        transpose = _ORIENT[self.orientation][0]
        lo, hi = (x0, x1) if transpose else (y0, y1)
        flip = _ORIENT[self.orientation][2 if transpose else 1]
        rows_lo, rows_hi = (h - hi, h - lo) if flip else (lo, hi)
        band = np.empty((rows_hi - rows_lo, w), self.file_dtype)
        for i, z in enumerate(range(z0, z1)):
            self._pread(band, base + (z * h + rows_lo) * w * item)
            if plain:
                out[i] = band[:, x0:x1]
                continue
            plane = np.zeros((h, w), self.file_dtype)  # views only need the band's rows to be right
            plane[rows_lo:rows_hi] = band
            out[i] = self._oriented(plane)[y0:y1, x0:x1]

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
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        tif, self._tif = self._tif, None
        if tif is not None:
            tif.close()
