"""Exact one-pass statistics of a volume fed slab by slab.

Integer volumes up to 16 bits keep an exact histogram, so min, max, mean, std and percentiles
(numpy's default ``linear`` method) come out as numpy would compute them on the whole array,
with one slab of memory instead of numpy's 8x-the-volume temporaries. Wider or float dtypes get
exact min/max/mean and a merged (Chan et al.) variance; their percentiles are not computed.

The histogram is counted by a small numba kernel (:mod:`emdata.core.kernels`): ``np.bincount`` runs
at ~0.5 GB/s here and holds the GIL, so it stalled the whole normalize pipeline; the kernel
runs at ~1.5 GB/s without the GIL, beside the sha256 and the HDF5 writes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from emdata.core.kernels import add_histogram

PERCENTILES = (0.1, 1.0, 50.0, 99.0, 99.9)
_SMALL = 1 << 16  # below this many voxels np.bincount is cheaper than loading the kernel


def _percentile_from_hist(values: np.ndarray, counts: np.ndarray, percent: float, dtype: np.dtype) -> float:
    """numpy.percentile(data, percent) ('linear') from sorted bin values and their counts.

    Mirrors numpy's arithmetic step by step (virtual index ``(n-1)*q``, the difference taken in
    the data's own dtype, then ``_lerp``), so the result is bit-identical, not merely close.
    """
    n = int(counts.sum())
    virtual = np.float64((n - 1) * np.true_divide(percent, 100))
    lo = int(np.floor(virtual))
    gamma = np.float64(virtual - np.floor(virtual))
    if virtual >= n - 1:
        lo, hi = n - 1, n - 1
    else:
        hi = lo + 1
    cum = np.cumsum(counts)
    a = np.array([values[np.searchsorted(cum, lo, side="right")]], dtype)
    b = np.array([values[np.searchsorted(cum, hi, side="right")]], dtype)
    diff = b - a  # in the data dtype, as numpy does
    if gamma >= 0.5:
        return float(np.subtract(b, diff * (1 - gamma), dtype=np.float64)[0])
    return float(np.add(a, diff * gamma)[0])


class StreamingStats:
    """Accumulate statistics over slabs; ``result()`` gives a JSON-safe dict."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.count = 0
        self.exact = self.dtype.kind in "iub" and self.dtype.itemsize <= 2
        if self.exact:
            self.hist = np.zeros(256 if self.dtype.itemsize == 1 else 65536, np.int64)
        else:
            self._min = math.inf
            self._max = -math.inf
            self._mean = 0.0
            self._m2 = 0.0
            self._zeros = 0

    def update(self, data: np.ndarray) -> None:
        self.merge(self.partial(data))

    def partial(self, data: np.ndarray) -> dict[str, Any] | None:
        """The statistics of one block, to be merged (possibly in another process) with ``merge``.

        ``update(a); update(b)`` and ``merge(partial(a)); merge(partial(b))`` give identical
        results: histograms add, and moments merge with the same arithmetic in the same order.
        """
        flat = np.ascontiguousarray(data).reshape(-1)
        if flat.size == 0:
            return None
        if self.exact:
            return {"n": int(flat.size), "hist": self._histogram(flat)}
        block = flat.astype(np.float64, copy=False)
        mean = float(block.mean())
        return {"n": int(block.size), "mean": mean, "m2": float(((block - mean) ** 2).sum()),
                "min": float(block.min()), "max": float(block.max()), "zeros": int(np.count_nonzero(flat == 0))}

    def merge(self, part: dict[str, Any] | None) -> None:
        if part is None:
            return
        self.count += part["n"]
        if self.exact:
            self.hist += part["hist"]
            return
        n_b, mean_b, m2_b = part["n"], part["mean"], part["m2"]
        n_a = self.count - n_b
        delta = mean_b - self._mean
        total = n_a + n_b
        self._mean += delta * n_b / total
        self._m2 += m2_b + delta * delta * n_a * n_b / total
        self._min = min(self._min, part["min"])
        self._max = max(self._max, part["max"])
        self._zeros += part["zeros"]

    def _histogram(self, flat: np.ndarray) -> np.ndarray:
        codes = flat.view(np.uint8 if self.dtype.itemsize == 1 else np.uint16)
        if codes.size < _SMALL:  # not worth compiling or loading the kernel
            return np.bincount(codes, minlength=self.hist.size).astype(np.int64, copy=False)
        hist = np.zeros(self.hist.size, np.int64)
        add_histogram(codes, hist)
        return hist

    def _bins(self) -> tuple[np.ndarray, np.ndarray]:
        """Bin values in increasing order and their counts."""
        codes = np.arange(self.hist.size, dtype=np.uint16 if self.hist.size > 256 else np.uint8)
        values = codes.view(self.dtype.newbyteorder("=") if self.dtype.kind != "b" else np.uint8)
        order = np.argsort(values, kind="stable")
        return values[order].astype(np.float64), self.hist[order]

    def result(self) -> dict[str, Any]:
        if self.count == 0:
            return {"count": 0}
        if not self.exact:
            return {"count": self.count, "min": self._min, "max": self._max, "mean": self._mean,
                    "std": math.sqrt(self._m2 / self.count), "zero_fraction": self._zeros / self.count,
                    "percentiles": None, "exact": False}
        values, counts = self._bins()
        present = np.nonzero(counts)[0]
        total = int(counts.sum())
        # Integer sums are exact; numpy's float64 pairwise sum of integers below 2**53 is too.
        mean = float(np.float64(int((values.astype(np.int64) * counts).sum())) / total)
        var = float((counts * (values - mean) ** 2).sum() / total)
        zero_bin = np.searchsorted(values, 0.0)
        zeros = int(counts[zero_bin]) if zero_bin < values.size and values[zero_bin] == 0 else 0
        return {
            "count": total,
            "min": float(values[present[0]]),
            "max": float(values[present[-1]]),
            "mean": mean,
            "std": math.sqrt(var),
            "zero_fraction": zeros / total,
            "percentiles": {f"p{p:g}": _percentile_from_hist(values, counts, p, self.dtype) for p in PERCENTILES},
            "exact": True,
        }
