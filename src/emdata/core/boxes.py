"""Boxes of voxels and the regular grids that cut a volume into them: the one box type of the package.

A :class:`Box` is ``[start, stop)`` in Z, Y, X. It is a named pair, so code that unpacks
``start, stop = box`` or stores it as JSON (two lists) sees the same plain pair as before. A
:class:`Grid` cuts a shape into steps of ``step`` voxels in C order (Z slowest), the last cell of
each axis clipped to the shape: normalize's tiles, a precomputed crop's blocks, IDR's render
tiles and the access blocks are all cells of one, and the chunks a box touches in a zarr array or
a precomputed scale are its :meth:`Grid.touched` cells.

How normalize cuts a volume into boxes that fit a memory budget (:func:`plan_tiles`): writes go in
chunk-aligned *tiles*: one chunk deep in Z (every write covers whole chunks, so HDF5 never reads
back what it wrote) and as wide in Y and X as the budget allows. When a whole chunk-deep slab
fits, a tile is the slab, and the slabs in Z order are also the volume in C order, so the voxel
sha256 is fed from the same reads. When it does not fit (a 5500 x 5496 section with 64-deep chunks
is 1.9 GB), the tiles are narrower and the sha256, which must see the voxels in C order, gets its
own pass over *hash boxes*: whole planes, or bands of rows of one plane.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple

IntTriple = tuple[int, int, int]
IN_FLIGHT = 4  # tiles alive at once: being read, being written, being hashed, HDF5's copy of one


class Box(NamedTuple):
    """Voxels ``[start, stop)``, Z, Y, X."""

    start: IntTriple
    stop: IntTriple

    @property
    def shape(self) -> IntTriple:
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    def shifted(self, by: IntTriple) -> Box:
        """The same box ``by`` voxels further (a crop's block in the coordinates of the whole scale)."""
        start, stop = (tuple(a + d for a, d in zip(corner, by)) for corner in self)
        return Box(start, stop)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Grid:
    """``shape`` cut into cells of ``step`` voxels, C order; the last cell of an axis ends at the shape."""

    shape: IntTriple
    step: IntTriple

    @property
    def counts(self) -> IntTriple:
        """Cells per axis."""
        return tuple(-(-n // s) for n, s in zip(self.shape, self.step))  # type: ignore[return-value]

    def __len__(self) -> int:
        return math.prod(self.counts)

    def __iter__(self) -> Iterator[tuple[IntTriple, Box]]:
        """(index, box) of every cell, Z slowest, made one at a time (a fine grid of a big volume is long)."""
        for index in itertools.product(*(range(c) for c in self.counts)):
            yield index, self.cell(index)  # type: ignore[misc]

    def cell(self, index: IntTriple) -> Box:
        """The box of the cell at ``index``."""
        start = tuple(i * s for i, s in zip(index, self.step))
        stop = tuple(min(a + s, n) for a, s, n in zip(start, self.step, self.shape))
        return Box(start, stop)  # type: ignore[arg-type]

    def cells(self) -> list[tuple[IntTriple, Box]]:
        """(index, box) of every cell, Z slowest."""
        return list(self)

    def boxes(self) -> list[Box]:
        return [box for _, box in self]

    def touched(self, box: Box) -> list[IntTriple]:
        """Indices of the cells ``box`` overlaps, Z slowest (the chunks a read of ``box`` needs);
        the parts of ``box`` outside the shape touch no cell."""
        ranges = [range(max(0, a // s), min(c, -(-b // s))) for a, b, s, c in zip(*box, self.step, self.counts)]
        return list(itertools.product(*ranges))  # type: ignore[arg-type]


# -- normalize's tiles ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TilePlan:
    tiles: list[Box]  # chunk-aligned write boxes, in Z-major order
    hash_boxes: list[Box] | None  # C-order boxes for the sha256 pass; None: the tiles are in C order
    tile_bytes: int

    @property
    def one_pass(self) -> bool:
        return self.hash_boxes is None


def plan_tiles(shape: tuple[int, ...], chunks: tuple[int, ...], itemsize: int, budget: int) -> TilePlan:
    """Tiles of at most ``budget / IN_FLIGHT`` bytes (never less than one chunk)."""
    z, y, x = shape
    cz, cy, cx = chunks
    limit = max(1, budget // IN_FLIGHT)
    slab = cz * y * x * itemsize
    if slab <= limit:
        return TilePlan(Grid((z, y, x), (cz, y, x)).boxes(), None, slab)
    row_chunks = cz * cy * x * itemsize  # one chunk row across the full width
    if row_chunks <= limit:
        ty, tx = cy * max(1, limit // row_chunks), x
    else:
        ty = cy
        tx = min(x, cx * max(1, limit // (cz * cy * cx * itemsize)))
    tiles = Grid((z, y, x), (cz, ty, tx)).boxes()
    plane = y * x * itemsize
    if plane <= limit:
        hash_boxes = Grid((z, y, x), (max(1, limit // plane), y, x)).boxes()
    else:
        hash_boxes = Grid((z, y, x), (1, max(1, limit // (x * itemsize)), x)).boxes()
    return TilePlan(tiles, hash_boxes, ty * tx * cz * itemsize)
