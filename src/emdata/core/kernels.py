"""Small compiled loops that numpy has no fast, GIL-free form for (numba, cached on disk).

numba is loaded on the first call, so importing this module costs nothing: loading numba costs
~0.3 s, compiling once ~3 s (then cached next to this file, or in ``NUMBA_CACHE_DIR``), and only
a large volume needs the kernel.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np

_compiled: Callable[[np.ndarray, np.ndarray], None] | None = None
_compiling = threading.Lock()  # the warm-up thread and a reader thread may ask at once


def _count(codes: Any, hist: Any) -> None:  # pragma: no cover - compiled
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


def _kernel() -> Callable[[np.ndarray, np.ndarray], None]:
    global _compiled
    if _compiled is not None:
        return _compiled
    with _compiling:
        if _compiled is None:
            from numba import njit  # heavy: loaded only when a histogram needs the kernel

            _compiled = njit(nogil=True, cache=True)(_count)
        return _compiled


def add_histogram(codes: np.ndarray, hist: np.ndarray) -> None:
    """``hist += bincount(codes)`` for a 1D uint8/uint16 array, without holding the GIL."""
    _kernel()(np.ascontiguousarray(codes).reshape(-1), hist)
