"""A time series of single-plane TIFFs (one file per frame) as a lazy (T, Y, X) volume.

Frames are read as boxes through :class:`emdata.formats.tiff.TiffStack` (row bands of uncompressed
files, no memory map), one file open at a time, so a series of 9,000 x 9,000 montages is never
held whole. Frames of different sizes (stitched montages vary) are padded with 0 at the bottom
and right to the largest. The pixel size comes from the TIFF resolution tags when they are in
centimetres (or ImageJ's micron unit); inch-based tags are screen defaults (72 dpi), not a
microscope's pixel size, and give None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from emdata.errors import FormatError
from emdata.formats.raw import RawVolume
from emdata.formats.tiff import TiffStack


def pixel_size_nm(path: Path, dataset: str) -> tuple[float, float] | None:
    """(y, x) nm from the TIFF's resolution tags in centimetres (or ImageJ's micron unit), else None."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            tags = page.tags
            unit = int(tags.valueof(296, 2))  # ResolutionUnit: 1 none, 2 inch, 3 cm
            xres, yres = tags.valueof(282), tags.valueof(283)
            imagej = tif.imagej_metadata or {}
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types on broken files
        raise FormatError(dataset, str(path), f"not a readable TIFF ({type(exc).__name__}: {exc})",
                          f"fix the source file, then run `emdata fetch {dataset}` again") from exc
    if xres is None or yres is None:
        return None
    per = {3: 1e7} if unit == 3 else {}
    if unit == 1 and str(imagej.get("unit", "")).lower() in ("micron", "um", "µm", "\\u00b5m"):
        per = {1: 1e3}
    if not per:
        return None  # inches are screen defaults (72 dpi), not a microscope's pixel size
    scale = next(iter(per.values()))
    x, y = (float(v[0]) / float(v[1]) if isinstance(v, tuple) else float(v) for v in (xres, yres))
    if x <= 0 or y <= 0:
        return None
    return (scale / y, scale / x)


class TiffSeries(RawVolume):
    """(T, Y, X) of a well's frames, read as boxes, padded with 0 to the largest frame."""

    def __init__(self, dataset: str, frames: list[Path], shapes: list[tuple[int, int]], dtype: np.dtype) -> None:
        self.dataset = dataset
        self.frames = frames
        self.shapes = shapes
        self.dtype = dtype
        self.shape = (len(frames), max(s[0] for s in shapes), max(s[1] for s in shapes))
        self._open: tuple[int, Any] | None = None

    def _stack(self, i: int) -> Any:
        if self._open is None or self._open[0] != i:
            self.close()
            self._open = (i, TiffStack(self.frames[i], self.dataset))
        return self._open[1]

    def opener(self) -> "RawVolume":
        """Itself (a CollectionItem's ``open``): files open lazily, one at a time."""
        return self

    def read_box(self, start: tuple[int, int, int], stop: tuple[int, int, int]) -> np.ndarray:
        (z0, y0, x0), (z1, y1, x1) = start, stop
        out = np.zeros((z1 - z0, y1 - y0, x1 - x0), self.dtype)
        for k, i in enumerate(range(z0, z1)):
            h, w = self.shapes[i]
            if y0 < h and x0 < w:
                out[k, : min(y1, h) - y0, : min(x1, w) - x0] = \
                    self._stack(i).read_between((0, y0, x0), (1, min(y1, h), min(x1, w)))[0]
        return out

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None
