"""How normalize cuts a volume into boxes that fit a memory budget.

Writes go in chunk-aligned *tiles*: one chunk deep in Z (every write covers whole chunks, so
HDF5 never reads back what it wrote) and as wide in Y and X as the budget allows. When a whole
chunk-deep slab fits, a tile is the slab, and the slabs in Z order are also the volume in C order,
so the voxel sha256 is fed from the same reads. When it does not fit (a 5500 x 5496 section
with 64-deep chunks is 1.9 GB), the tiles are narrower and the sha256, which must see the voxels
in C order, gets its own pass over *hash boxes*: whole planes, or bands of rows of one plane.
"""

from __future__ import annotations

from dataclasses import dataclass

Box = tuple[tuple[int, int, int], tuple[int, int, int]]
IN_FLIGHT = 4  # tiles alive at once: being read, being written, being hashed, HDF5's copy of one


@dataclass(frozen=True)
class TilePlan:
    tiles: list[Box]  # chunk-aligned write boxes, in Z-major order
    hash_boxes: list[Box] | None  # C-order boxes for the sha256 pass; None: the tiles are in C order
    tile_bytes: int

    @property
    def one_pass(self) -> bool:
        return self.hash_boxes is None


def _steps(size: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(size, a + step)) for a in range(0, size, step)]


def plan_tiles(shape: tuple[int, ...], chunks: tuple[int, ...], itemsize: int, budget: int) -> TilePlan:
    """Tiles of at most ``budget / IN_FLIGHT`` bytes (never less than one chunk)."""
    z, y, x = shape
    cz, cy, cx = chunks
    limit = max(1, budget // IN_FLIGHT)
    slab = cz * y * x * itemsize
    if slab <= limit:
        tiles = [((z0, 0, 0), (z1, y, x)) for z0, z1 in _steps(z, cz)]
        return TilePlan(tiles, None, slab)
    row_chunks = cz * cy * x * itemsize  # one chunk row across the full width
    if row_chunks <= limit:
        ty, tx = cy * max(1, limit // row_chunks), x
    else:
        ty = cy
        tx = min(x, cx * max(1, limit // (cz * cy * cx * itemsize)))
    tiles = [((z0, y0, x0), (z1, y1, x1)) for z0, z1 in _steps(z, cz) for y0, y1 in _steps(y, ty)
             for x0, x1 in _steps(x, tx)]
    plane = y * x * itemsize
    if plane <= limit:
        hash_boxes = [((z0, 0, 0), (z1, y, x)) for z0, z1 in _steps(z, max(1, limit // plane))]
    else:
        rows = max(1, limit // (x * itemsize))
        hash_boxes = [((k, y0, 0), (k + 1, y1, x)) for k in range(z) for y0, y1 in _steps(y, rows)]
    return TilePlan(tiles, hash_boxes, ty * tx * cz * itemsize)
