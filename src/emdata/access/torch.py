"""PyTorch ``Dataset`` adapter (optional extra ``torch``; torch is imported only here).

Works with ``DataLoader(num_workers=N)``: the sampler's Volume is pickled into each worker
without an open file handle and reopens the file lazily there (read-only, no HDF5 locking), and
patch ``i`` depends only on (seed, epoch, i), so any number of workers yields the same patches.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .sampling import GridPatches, Patch, RandomPatches


class PatchDataset(Dataset):
    """Map-style dataset over a RandomPatches or GridPatches sampler.

    Each item is a dict: ``raw`` (float32 tensor, 1 x Z x Y x X), ``label`` (int64 tensor,
    1 x Z x Y x X, when the sampler has a label) and ``origin`` (int64 tensor, z, y, x).
    ``transform`` maps a :class:`Patch` to anything else instead.
    """

    def __init__(self, sampler: RandomPatches | GridPatches, transform: Callable[[Patch], Any] | None = None) -> None:
        self.sampler = sampler
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        """New random patches for a new epoch (same seed, same epoch: same patches)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __getitem__(self, index: int) -> Any:
        patch = self.sampler[int(index)]
        if self.transform is not None:
            return self.transform(patch)
        item = {"raw": torch.from_numpy(patch.raw.astype(np.float32, copy=False)[None]),
                "origin": torch.tensor(patch.origin, dtype=torch.int64)}
        if patch.label is not None:
            item["label"] = torch.from_numpy(patch.label.astype(np.int64)[None])
        return item
