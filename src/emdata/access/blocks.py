"""Exact block coverings of a volume, with a halo and a border policy.

Write regions are the cells of a :class:`~emdata.core.boxes.Grid` of ``block_shape`` starting at
voxel 0, clipped to the volume: they are disjoint and their union is the volume. The read region
of a block is its cell grown by ``halo`` on every side. Two border policies:

- ``fit="pad"``: the read region is always ``block_shape + 2 * halo`` voxels (the cell is not
  clipped for reading); the parts outside the volume are filled when read (``Volume.read_block``
  pads with ``reflect`` by default, or any ``numpy.pad`` mode). Networks get a constant shape.
- ``fit="shrink"``: the read region is clipped to the volume; no padding, smaller arrays at the
  borders.

``Block.crop(output)`` cuts a block's write region out of an array shaped like its read region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from emdata.core.boxes import Grid
from emdata.errors import ConfigError

FITS = ("pad", "shrink")
Triple = tuple[int, int, int]


def triple(values: Iterable[int]) -> Triple:
    """Three integers (z, y, x) as a typed triple."""
    z, y, x = values
    return int(z), int(y), int(x)


@dataclass(frozen=True)
class Block:
    index: tuple[int, int, int]
    write_start: tuple[int, int, int]
    write_stop: tuple[int, int, int]
    read_start: tuple[int, int, int]
    read_stop: tuple[int, int, int]

    @property
    def write(self) -> tuple[slice, slice, slice]:
        (z0, y0, x0), (z1, y1, x1) = self.write_start, self.write_stop
        return slice(z0, z1), slice(y0, y1), slice(x0, x1)

    @property
    def read_shape(self) -> tuple[int, int, int]:
        return triple(b - a for a, b in zip(self.read_start, self.read_stop))

    @property
    def write_shape(self) -> tuple[int, int, int]:
        return triple(b - a for a, b in zip(self.write_start, self.write_stop))

    def crop(self, output: np.ndarray) -> np.ndarray:
        """The write region of an array that covers this block's read region (trailing axes kept)."""
        if tuple(output.shape[:3]) != self.read_shape:
            raise ValueError(f"block {self.index}: output shape {output.shape[:3]} != read shape {self.read_shape}")
        inner = tuple(slice(w0 - r0, w1 - r0) for w0, w1, r0 in zip(self.write_start, self.write_stop, self.read_start))
        return output[inner]


def parse_triple(value: int | tuple[int, ...], what: str, minimum: int) -> tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, (int, np.integer)) else tuple(value)
    if len(values) != 3 or any(int(v) != v or v < minimum for v in values):
        raise ConfigError(f"{what} must be three integers >= {minimum}, got {value!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def block_grid(shape: tuple[int, ...], block_shape: int | tuple[int, ...], *, halo: int | tuple[int, ...] = 0,
               fit: str = "pad") -> Iterator[Block]:
    """Yield the blocks of ``shape`` in C order (z slowest)."""
    block = parse_triple(block_shape, "block_shape", 1)
    margin = parse_triple(halo, "halo", 0)
    if fit not in FITS:
        raise ConfigError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    for index, (w0, w1) in Grid(triple(shape[:3]), block):  # the write regions: the grid's cells
        if fit == "pad":
            r0 = tuple(a - h for a, h in zip(w0, margin))
            r1 = tuple(a + b + h for a, b, h in zip(w0, block, margin))
        else:
            r0 = tuple(max(0, a - h) for a, h in zip(w0, margin))
            r1 = tuple(min(s, b + h) for b, h, s in zip(w1, margin, shape))
        yield Block(triple(index), triple(w0), triple(w1), triple(r0), triple(r1))


def count_blocks(shape: tuple[int, ...], block_shape: int | tuple[int, ...]) -> int:
    return len(Grid(triple(shape[:3]), parse_triple(block_shape, "block_shape", 1)))
