"""Small compiled loops that numpy has no fast, GIL-free form for (numba, cached on disk).

Imported only when a large volume needs them: loading numba costs ~0.3 s, compiling once ~3 s
(then cached next to this file, or in ``NUMBA_CACHE_DIR``).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def _count(codes, hist):  # pragma: no cover - compiled
    # Four interleaved sub-histograms: consecutive equal values do not wait on one counter.
    lanes = np.zeros((4, hist.size), np.int64)
    n = codes.size - codes.size % 4
    for i in range(0, n, 4):
        lanes[0, codes[i]] += 1
        lanes[1, codes[i + 1]] += 1
        lanes[2, codes[i + 2]] += 1
        lanes[3, codes[i + 3]] += 1
    for i in range(n, codes.size):
        lanes[0, codes[i]] += 1
    for b in range(hist.size):
        hist[b] += lanes[0, b] + lanes[1, b] + lanes[2, b] + lanes[3, b]


def add_histogram(codes: np.ndarray, hist: np.ndarray) -> None:
    """``hist += bincount(codes)`` for a 1D uint8/uint16 array, without holding the GIL."""
    _count(np.ascontiguousarray(codes).reshape(-1), hist)
