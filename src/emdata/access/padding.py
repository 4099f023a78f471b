"""Boxes that reach outside a volume, filled like ``numpy.pad`` without reading the padding.

Only the modes whose padded voxels are copies of voxels inside (or one constant) are offered:
``numpy.pad``'s other modes ("mean", "linear_ramp", ...) compute values from the whole axis.
"""

from __future__ import annotations

import numpy as np

PAD_MODES = ("reflect", "symmetric", "edge", "wrap", "constant")


def source_indices(start: int, stop: int, size: int, mode: str) -> np.ndarray:
    """For each index in ``start..stop`` along an axis of ``size``, the index inside it whose value
    ``numpy.pad(..., mode)`` copies there (modes other than "constant")."""
    margin = int(max(0, -start, stop - size))
    return np.pad(np.arange(size), margin, mode=mode)[start + margin:stop + margin]  # type: ignore[call-overload]


def _runs(index: np.ndarray) -> list[slice]:
    """``index`` as consecutive slices of step +1 or -1 (what numpy.pad's modes produce)."""
    runs, start, n = [], 0, len(index)
    while start < n:
        end = start + 1
        step = int(index[end] - index[start]) if end < n else 1
        step = step if step in (1, -1) else 1  # a repeated index ("edge") is a run of one
        while end < n and index[end] - index[end - 1] == step:
            end += 1
        first, last = int(index[start]), int(index[end - 1])
        runs.append(slice(first, last + 1) if step == 1 else slice(first, last - 1 if last > 0 else None, -1))
        start = end
    return runs


def gather(data: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """``numpy.take(data, index, axis)`` by concatenating slices: ~5x faster than fancy indexing
    for padded blocks, and a view when ``index`` is the whole axis in order."""
    runs = _runs(index)
    if runs == [slice(0, data.shape[axis])]:
        return data
    lead = (slice(None),) * axis
    return np.concatenate([data[lead + (run,)] for run in runs], axis=axis)
