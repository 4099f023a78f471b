"""PyTorch ``Dataset`` adapter (optional extra ``torch``; torch is imported only here).

Works with ``DataLoader(num_workers=N)``: the sampler's Volume is pickled into each worker
without an open file handle and reopens the file lazily there (read-only, no HDF5 locking), and
patch ``i`` depends only on (seed, epoch, i), so any number of workers yields the same patches.
``PatchDataset.set_epoch`` reaches persistent workers as well (the epoch is in shared memory).

Patches keep the file's dtype (8-bit EM stays uint8, a quarter of the bytes of float32), and small
batches cross from the workers inline in the pipe message rather than as one shared-memory segment
per tensor, whose set-up dominated at batch size 1 (benchmarks/access.py measures both).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import collate as torch_collate
from torch.utils.data._utils.collate import default_collate_fn_map

from emdata.errors import AccessError, ConfigError
from emdata.access.sampling import GridPatches, Patch, RandomPatches

#: Samples and batches up to this many bytes are pickled inline (through the worker's pipe);
#: larger ones go as shared-memory tensors, as torch does by default. On the 2-core machine of
#: benchmarks/README.md, each shared-memory tensor cost about 1 ms to set up and hand over (a new
#: segment, its page faults and a file-descriptor handshake with the worker) and the pipe moved
#: about 1.3 GB/s; inline was faster up to about 2 MiB (a 64^3 float32 patch is 1 MiB).
INLINE_BYTES = 2 << 20


class Sample(dict):
    """One sample, or a batch of them: a plain dict of tensors, apart from how it travels.

    The DataLoader's default collate stacks Samples with :func:`collate` (registered for this type),
    which stacks in ordinary memory instead of one new shared-memory segment per tensor. Pickled
    (from a DataLoader worker to the main process), a Sample whose values are CPU tensors of at most
    :data:`INLINE_BYTES` together goes inline as numpy arrays, in one message; otherwise its tensors
    pickle as torch pickles them (shared memory). Either way the receiver gets a plain ``dict`` of
    tensors with the same values, dtypes and shapes.
    """

    def __copy__(self) -> Sample:
        return type(self)(self)  # copy.copy would otherwise go through __reduce__

    def __reduce__(self) -> tuple:
        arrays = _inline_arrays(self)
        if arrays is None:
            return (dict, (dict(self),))
        return (_sample_from_arrays, (arrays,))


def _nbytes(values: Any) -> int | None:
    """Total bytes of ``values`` if all are plain CPU tensors, else None."""
    total = 0
    for value in values:
        if type(value) is not torch.Tensor or value.device.type != "cpu" or value.requires_grad:
            return None
        total += value.numel() * value.element_size()
    return total


def _inline_arrays(sample: dict) -> dict[str, np.ndarray] | None:
    total = _nbytes(sample.values())
    if total is None or total > INLINE_BYTES:
        return None
    try:
        return {key: value.numpy() for key, value in sample.items()}
    except TypeError:  # a dtype numpy lacks (bfloat16, ...): let torch pickle it
        return None


def _sample_from_arrays(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(value) for key, value in arrays.items()}


def collate(batch: Sequence[Mapping[str, Any]], *, collate_fn_map: dict | None = None) -> Sample:
    """Stack samples into one batch Sample (``B x ...`` per key; one sample: a view, no copy).

    The DataLoader's default collate calls this for :class:`Sample` items, so there is no need to
    pass it as ``collate_fn``. A batch too large to go inline (:data:`INLINE_BYTES`) and collated
    in a worker is stacked by torch's own collate, straight into shared memory; so are values that
    are not plain tensors.
    """
    keys = list(batch[0].keys())
    columns = [[sample[key] for sample in batch] for key in keys]
    sizes = [_nbytes(column) for column in columns]
    big = sum(INLINE_BYTES + 1 if size is None else size for size in sizes) > INLINE_BYTES
    out = Sample()
    for key, column, size in zip(keys, columns, sizes):
        if size is None or (big and torch.utils.data.get_worker_info() is not None):
            out[key] = torch_collate(column, collate_fn_map=collate_fn_map or default_collate_fn_map)
        else:
            out[key] = column[0].unsqueeze(0) if len(column) == 1 else torch.stack(column)
    return out


default_collate_fn_map[Sample] = collate  # torch's documented way to extend default_collate


def _tensor(array: np.ndarray, dtype: torch.dtype | None) -> torch.Tensor:
    """``array`` as a tensor without a copy (a copy only when converting to ``dtype``)."""
    array = np.ascontiguousarray(array)
    try:
        tensor = torch.from_numpy(array)
    except TypeError:  # torch < 2.3 has no uint16/uint32/uint64: widen (uint16 to int32, the others to int64)
        tensor = torch.from_numpy(array.astype(np.int32 if array.dtype.itemsize < 4 else np.int64))
    return tensor if dtype is None else tensor.to(dtype)


INT64_MAX = np.iinfo(np.int64).max


def _label_tensor(label: np.ndarray, dtype: torch.dtype | None, sampler: Any) -> torch.Tensor:
    """A label patch as a tensor; uint64 instance ids become int64 (torch has no uint64 arithmetic: no
    comparisons, indexing or losses), refused in one line when an id does not fit."""
    if label.dtype.kind == "u" and label.dtype.itemsize == 8:
        top = int(label.max()) if label.size else 0
        if top > INT64_MAX:
            raise AccessError(f"{_where(sampler)}: label id {top} is above the int64 maximum {INT64_MAX}, which "
                              "torch cannot hold; use a transform and map the ids first")
        label = np.ascontiguousarray(label, np.uint64).view(np.int64)  # native order, the same ids, no copy
    return _tensor(label, dtype)


def _where(sampler: Any) -> str:
    """What a sampler's labels are, for an error line: a volume's or a collection's name and the label."""
    source = getattr(sampler, "volume", None) or getattr(sampler, "collection", None)
    name = getattr(source, "name", None) or type(sampler).__name__
    label = getattr(sampler, "label_name", None) or getattr(sampler, "target", None) or ""
    return f"{name}: label {label}".rstrip()


def _check_dtype(value: Any, name: str) -> torch.dtype | None:
    if value is not None and not isinstance(value, torch.dtype):
        raise ConfigError(f"PatchDataset: {name} must be a torch dtype such as torch.float32, got {value!r}")
    return value


class PatchDataset(Dataset):
    """Map-style dataset over a RandomPatches or GridPatches sampler.

    Each item is a dict (a :class:`Sample`) of tensors in the file's own dtypes:

    - ``raw``: 1 x Z x Y x X, the volume's dtype (``torch.uint8`` for 8-bit EM);
    - ``label``: 1 x Z x Y x X, the label's dtype, when the sampler has a label;
    - ``origin``: int64 (z, y, x) of the patch's first voxel.

    The DataLoader's default collate stacks them into a batch dict (B x 1 x Z x Y x X, origins
    B x 3); small batches travel from the workers inline (see :class:`Sample`), which is what makes
    batch size 1 fast. Convert on the consumer side, best after moving to the device (a quarter of
    the bytes of float32 to copy)::

        raw = batch["raw"].to(device, non_blocking=True).float()   # values unchanged, not rescaled
        label = batch["label"].to(device, non_blocking=True).long()

    ``dtype=torch.float32`` / ``label_dtype=torch.int64`` convert in the workers instead (what
    earlier versions always did; values are converted, never rescaled). torch >= 2.3 has uint16,
    uint32 and uint64 as limited dtypes: convert them before computing; older torch gets int32 or
    int64 for them. uint64 labels (instance ids such as hemibrain body ids) always come as int64
    tensors with the same ids; an id above the int64 maximum is refused with one line.

    ``transform`` maps each :class:`Patch` (numpy arrays, native dtypes) to whatever the model
    needs, instead of the dict above (it cannot be combined with ``dtype``/``label_dtype``). Its
    output travels as torch ships it; return a :class:`Sample` of tensors to keep the fast path.
    """

    def __init__(self, sampler: RandomPatches | GridPatches, transform: Callable[[Patch], Any] | None = None, *,
                 dtype: torch.dtype | None = None, label_dtype: torch.dtype | None = None) -> None:
        self.sampler = sampler
        self.transform = transform
        self.dtype = _check_dtype(dtype, "dtype")
        self.label_dtype = _check_dtype(label_dtype, "label_dtype")
        if transform is not None and (dtype is not None or label_dtype is not None):
            raise ConfigError("PatchDataset: dtype/label_dtype apply to the default items; with a transform, "
                              "convert inside the transform")
        # One int64 in shared memory, shared with DataLoader workers (forked or spawned): see set_epoch.
        self._epoch = torch.tensor([int(getattr(sampler, "epoch", 0))], dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        """New random patches for a new epoch (same seed, same epoch: same patches).

        Call it before iterating the DataLoader for that epoch. It reaches the workers of a
        ``DataLoader(persistent_workers=True)`` too: the epoch is kept in shared memory, which the
        workers' copies of this dataset read before each item (a worker keeps the copy it got when
        it started, so a plain attribute would stay at the epoch of that moment).
        """
        self._epoch[0] = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __getitem__(self, index: int) -> Any:
        epoch = int(self._epoch[0])
        if hasattr(self.sampler, "set_epoch") and getattr(self.sampler, "epoch", None) != epoch:
            self.sampler.set_epoch(epoch)  # a worker's copy catching up with the main process
        patch = self.sampler[int(index)]
        if self.transform is not None:
            return self.transform(patch)
        item = Sample(raw=_tensor(patch.raw, self.dtype)[None],
                      origin=torch.tensor(patch.origin, dtype=torch.int64))
        if patch.label is not None:
            item["label"] = _label_tensor(patch.label, self.label_dtype, self.sampler)[None]
        return item
