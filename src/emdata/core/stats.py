"""Exact one-pass statistics of a volume fed slab by slab.

Integer volumes up to 16 bits keep an exact histogram, so min, max, mean, std and percentiles
(numpy's default ``linear`` method) come out as numpy would compute them on the whole array,
with one slab of memory instead of numpy's 8x-the-volume temporaries. Wider or float dtypes get
exact min/max/mean and a merged (Chan et al.) variance; their percentiles are not computed.
Instance labels (an integer label wider than 16 bits, such as uint64 body ids) are ids, not
intensities: they get the exact object count and background (zero) fraction from the set of ids
seen (:class:`InstanceStats`), never a 2^64-bin histogram; memory grows with the objects, not the
voxels.

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


def is_instance_label(dtype: np.dtype) -> bool:
    """Labels of this dtype hold object ids (too many values for a histogram): wider than 16 bits, integer."""
    dtype = np.dtype(dtype)
    return dtype.kind in "iu" and dtype.itemsize > 2


def run_values(data: np.ndarray) -> np.ndarray:
    """The values of a label block with runs of equal neighbours collapsed (ids come in long runs, so
    ``np.unique`` then sorts a few values per object instead of every voxel)."""
    flat = np.ascontiguousarray(data).reshape(-1)
    if flat.size < 2:
        return flat
    keep = np.empty(flat.size, bool)
    keep[0] = True
    np.not_equal(flat[1:], flat[:-1], out=keep[1:])
    return flat[keep]


class InstanceStats:
    """Exact statistics of instance labels: voxels, background (0) fraction, object count, min and max id.

    The ids seen are kept as one sorted array (plus the not yet merged ones), so ``partial`` and
    ``merge`` work across processes as :class:`StreamingStats` does; ids stay exact integers
    (uint64 ids above 2^53 would not survive a float).
    """

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.count = 0
        self.zeros = 0
        self.ids = np.zeros(0, self.dtype.newbyteorder("="))
        self._pending: list[np.ndarray] = []
        self._pending_size = 0

    def update(self, data: np.ndarray) -> None:
        self.merge(self.partial(data))

    def partial(self, data: np.ndarray) -> dict[str, Any] | None:
        """One block's voxel count, zeros and non-zero ids (a JSON-safe list of ints)."""
        if data.size == 0:
            return None
        ids = np.unique(run_values(data))
        return {"n": int(data.size), "zeros": int(data.size - np.count_nonzero(data)),
                "ids": [int(v) for v in ids if v != 0]}

    def merge(self, part: dict[str, Any] | None) -> None:
        if part is None:
            return
        self.count += int(part["n"])
        self.zeros += int(part["zeros"])
        ids = np.asarray(part["ids"], self.ids.dtype)
        self._pending.append(ids)
        self._pending_size += ids.size
        if self._pending_size > max(self.ids.size, 1 << 16):  # amortised: merge when the pending ids are many
            self._compact()

    def _compact(self) -> None:
        if self._pending:
            self.ids = np.unique(np.concatenate([self.ids, *self._pending]))
            self._pending, self._pending_size = [], 0

    def result(self) -> dict[str, Any]:
        if self.count == 0:
            return {"count": 0}
        self._compact()
        values = ([0] if self.zeros else []) + ([int(self.ids[0]), int(self.ids[-1])] if self.ids.size else [])
        return {"count": self.count, "object_count": int(self.ids.size), "min": min(values), "max": max(values),
                "zero_fraction": self.zeros / self.count, "background_fraction": self.zeros / self.count,
                "percentiles": None, "exact": True, "instances": True}


def statistics_for(dtype: np.dtype, *, label: bool = False) -> StreamingStats | InstanceStats:
    """The statistics an array gets: instance statistics for wide integer labels, else :class:`StreamingStats`
    (8- and 16-bit labels keep their exact histogram: class masks)."""
    return InstanceStats(dtype) if label and is_instance_label(dtype) else StreamingStats(dtype)


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
