"""A volume stored as PNG tiles (one file per tile of each plane), read as lazy ZYX boxes.

Rendered planes from an image server arrive this way: ``tile_path(z, y, x)`` names the file of
the tile whose top-left voxel is (z, y, x) on a grid of ``tile`` × ``tile`` pixels (edge tiles
are smaller). A box read decodes only the tiles it overlaps (Pillow) and copies their overlap.
Tiles must be 8-bit grey, or 8-bit RGB with three equal channels (greyscale rendering), of
exactly their grid size; anything else is a FormatError naming the tile file.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable

import numpy as np

from emdata.errors import FormatError
from emdata.formats.raw import IntTriple, RawVolume, Triple

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def header_problem(data: bytes, width: int, height: int) -> str | None:
    """Why ``data`` is not an 8-bit grey or RGB PNG of ``width`` × ``height`` (header only); None if it is."""
    if not data.startswith(SIGNATURE):
        kind = "JPEG" if data[:3] == b"\xff\xd8\xff" else "HTML" if data.lstrip()[:1] == b"<" else "not a PNG"
        return f"the answer is {kind}, not a PNG"
    if len(data) < 33 or data[12:16] != b"IHDR":
        return "the PNG has no header"
    got_w, got_h, depth, colour = struct.unpack(">IIBB", data[16:26])
    if (got_w, got_h) != (width, height):
        return f"the tile is {got_w} × {got_h} pixels, {width} × {height} were asked for"
    if depth != 8 or colour not in (0, 2):
        return f"the PNG is {depth}-bit colour type {colour}; 8-bit grey (0) or RGB (2) is expected"
    return None


class PngTiles(RawVolume):
    """A uint8 ZYX volume from PNG tiles in ``root`` (``tile_path(z, y, x)`` -> relative path)."""

    def __init__(self, root: Path, dataset: str, shape: IntTriple, tile: int,
                 tile_path: Callable[[int, int, int], str], *, voxel_size_nm: Triple | None = None,
                 offset_nm: Triple | None = None) -> None:
        self.root = Path(root)
        self.dataset = dataset
        self.shape = tuple(int(n) for n in shape)  # type: ignore[assignment]
        self.dtype = np.dtype(np.uint8)
        self.tile = int(tile)
        self.tile_path = tile_path
        self.voxel_size_nm = voxel_size_nm
        self.offset_nm = offset_nm

    def _error(self, path: Path, problem: str) -> FormatError:
        return FormatError(self.dataset, str(path), problem,
                           f"delete data/raw/{self.dataset} and run `emdata fetch {self.dataset}` again")

    def decode(self, z: int, y: int, x: int) -> np.ndarray:
        """The tile at (z, y, x) as a (rows, cols) uint8 array, checked."""
        from PIL import Image

        path = self.root / self.tile_path(z, y, x)
        want = (min(self.tile, self.shape[1] - y), min(self.tile, self.shape[2] - x))
        try:
            with Image.open(path) as img:
                if img.format != "PNG":
                    raise self._error(path, f"is {img.format}, not PNG")
                plane = np.asarray(img)
        except FormatError:
            raise
        except Exception as exc:  # Pillow raises many types on missing or broken files
            raise self._error(path, f"not a readable PNG ({type(exc).__name__}: {exc})") from exc
        if plane.ndim == 3 and plane.shape[2] == 3:
            grey = plane[..., 0]
            if not (np.array_equal(grey, plane[..., 1]) and np.array_equal(grey, plane[..., 2])):
                raise self._error(path, "the tile is not grey (its RGB channels differ)")
            plane = grey
        if plane.shape != want or plane.dtype != np.uint8:
            raise self._error(path, f"decodes to {plane.shape} {plane.dtype}; {want} uint8 is expected")
        return plane

    def read_box(self, start: IntTriple, stop: IntTriple) -> np.ndarray:
        (z0, y0, x0), (z1, y1, x1) = start, stop
        out = np.empty((z1 - z0, y1 - y0, x1 - x0), self.dtype)
        s = self.tile
        for z in range(z0, z1):
            for ty in range(y0 // s * s, y1, s):
                for tx in range(x0 // s * s, x1, s):
                    plane = self.decode(z, ty, tx)
                    a, b = max(y0, ty), min(y1, ty + plane.shape[0])
                    c, d = max(x0, tx), min(x1, tx + plane.shape[1])
                    out[z - z0, a - y0:b - y0, c - x0:d - x0] = plane[a - ty:b - ty, c - tx:d - tx]
        return out
