"""numpy basic indexing of a 3D volume as a box: shared by raw source views and Volumes."""

from __future__ import annotations

from typing import Any

import numpy as np

from emdata.errors import AccessError


def basic_box(index: Any, shape: tuple[int, ...], name: str) -> tuple[list[int], list[int], tuple[int, ...]]:
    """``(start, stop, squeezed axes)`` for integers, unit-step slices and one Ellipsis.

    Slices clip to the volume as in numpy; an integer outside its axis raises AccessError.
    """
    if not isinstance(index, tuple):
        index = (index,)
    if sum(i is Ellipsis for i in index) > 1:
        raise AccessError(f"{name}: only one Ellipsis is allowed: {index!r}")
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1:]
    if len(index) > len(shape):
        raise AccessError(f"{name}: too many indices for a {len(shape)}D volume: {index!r}")
    index = index + (slice(None),) * (len(shape) - len(index))
    start, stop, squeeze = [], [], []
    for axis, (item, size) in enumerate(zip(index, shape)):
        if isinstance(item, (int, np.integer)):
            if not -size <= item < size:
                raise AccessError(f"{name}: index {item} is outside axis {'zyx'[axis]} of size {size}")
            i = int(item) % size
            start.append(i), stop.append(i + 1), squeeze.append(axis)
        elif isinstance(item, slice) and item.step in (None, 1):
            a, b, _ = item.indices(size)
            start.append(a), stop.append(max(a, b))
        else:
            raise AccessError(f"{name}: only integers, unit-step slices and ... are supported, got {item!r}")
    return start, stop, tuple(squeeze)
