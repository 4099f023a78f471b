"""The torch adapter: PatchDataset dtypes and pickling, a real DataLoader with worker processes."""

from __future__ import annotations

import numpy as np
import pytest

from emdata.access.sampling import RandomPatches
from emdata.access.volume import Volume
from emdata.testing.volumes import blob_labels, coordinate_volume, write_canonical

SHAPE = (19, 37, 47)


def _labelled_sampler(tmp_path, length: int = 24) -> RandomPatches:
    path = write_canonical(tmp_path / "v.h5", coordinate_volume(SHAPE, np.uint16),
                           labels={"mito": blob_labels(SHAPE, seed=5, count=6)})
    volume = Volume(path)
    volume[0, 0, 0]  # a handle open in the parent must not leak into the workers
    return RandomPatches(volume, (5, 9, 13), seed=11, length=length, label="mito", min_foreground=0.1)


@pytest.mark.torch
def test_patch_dataset_ships_native_dtypes_and_converts_on_request(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from emdata.access.torch import PatchDataset
    from emdata.errors import ConfigError

    sampler = _labelled_sampler(tmp_path)
    patch = sampler[3]
    item = PatchDataset(sampler)[3]
    assert isinstance(item, dict) and list(item) == ["raw", "origin", "label"]
    assert item["raw"].dtype == torch.uint16 and item["raw"].shape == (1, 5, 9, 13)
    assert item["label"].dtype == torch.uint8 and item["label"].shape == (1, 5, 9, 13)
    assert item["origin"].dtype == torch.int64 and item["origin"].tolist() == list(patch.origin)
    np.testing.assert_array_equal(item["raw"][0].numpy(), patch.raw)
    np.testing.assert_array_equal(item["label"][0].numpy(), patch.label)

    old = PatchDataset(sampler, dtype=torch.float32, label_dtype=torch.int64)[3]  # the former default
    assert old["raw"].dtype == torch.float32 and old["label"].dtype == torch.int64
    assert torch.equal(old["raw"], item["raw"].float()) and torch.equal(old["label"], item["label"].long())

    shaped = PatchDataset(sampler, transform=lambda p: (p.raw.mean(), p.origin))[3]
    assert shaped == (patch.raw.mean(), patch.origin)
    with pytest.raises(ConfigError, match="torch dtype"):
        PatchDataset(sampler, dtype="float32")
    with pytest.raises(ConfigError, match="transform"):
        PatchDataset(sampler, transform=lambda p: p, dtype=torch.float32)


@pytest.mark.torch
def test_patch_dataset_widens_unsigned_dtypes_for_torch_without_them(tmp_path, monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    from emdata.access import torch as adapter

    real = torch.from_numpy

    def old_torch(array):  # torch < 2.3 could not hold uint16/uint32/uint64
        if array.dtype in (np.uint16, np.uint32, np.uint64):
            raise TypeError(f"can't convert np.ndarray of type numpy.{array.dtype}")
        return real(array)

    sampler = _labelled_sampler(tmp_path)
    monkeypatch.setattr(adapter.torch, "from_numpy", old_torch)
    item = adapter.PatchDataset(sampler)[0]
    assert item["raw"].dtype == torch.int32 and item["label"].dtype == torch.uint8
    np.testing.assert_array_equal(item["raw"][0].numpy(), sampler[0].raw)


@pytest.mark.torch
def test_samples_pickle_to_plain_dicts_inline_or_through_torch(monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    import pickle
    from multiprocessing.reduction import ForkingPickler

    from torch.utils.data import default_collate

    from emdata.access import torch as adapter

    one = adapter.Sample(raw=torch.arange(60, dtype=torch.uint8).reshape(1, 3, 4, 5),
                         origin=torch.tensor([1, 2, 3]))
    two = adapter.Sample(raw=one["raw"] + 1, origin=torch.tensor([4, 5, 6]))
    batch = default_collate([one, two])  # registered: stacks Samples into a Sample
    assert type(batch) is adapter.Sample and batch["raw"].shape == (2, 1, 3, 4, 5)
    assert batch["origin"].tolist() == [[1, 2, 3], [4, 5, 6]]
    single = default_collate([one])
    assert single["raw"].shape == (1, 1, 3, 4, 5) and torch.equal(single["raw"][0], one["raw"])
    for limit in (adapter.INLINE_BYTES, 0):  # inline, then as torch pickles tensors
        monkeypatch.setattr(adapter, "INLINE_BYTES", limit)
        back = pickle.loads(ForkingPickler.dumps(batch))
        assert type(back) is dict and list(back) == ["raw", "origin"]
        assert all(torch.equal(back[k], batch[k]) and back[k].dtype == batch[k].dtype for k in batch)
    monkeypatch.setattr(adapter, "INLINE_BYTES", 1 << 20)
    half = adapter.Sample(raw=torch.ones(2, 3, dtype=torch.bfloat16))  # no numpy dtype: torch pickles it
    assert torch.equal(pickle.loads(ForkingPickler.dumps(half))["raw"], half["raw"])


def _cat(batches, key):
    import torch

    return torch.cat([b[key] for b in batches])


@pytest.mark.torch
@pytest.mark.parametrize("inline", [True, False], ids=["inline", "shared-memory"])
def test_dataloader_batches_and_workers_give_the_sampler_patches(tmp_path, monkeypatch, inline) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from emdata.access import torch as adapter

    if not inline:  # every batch as shared-memory tensors, as for batches above INLINE_BYTES
        monkeypatch.setattr(adapter, "INLINE_BYTES", 0)
    sampler = _labelled_sampler(tmp_path)
    patches = [sampler[i] for i in range(len(sampler))]
    raw = torch.from_numpy(np.stack([p.raw for p in patches]))[:, None]
    label = torch.from_numpy(np.stack([p.label for p in patches]))[:, None]
    origin = torch.tensor([p.origin for p in patches])
    dataset = adapter.PatchDataset(sampler)
    runs = {(batch_size, workers): list(DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                                   multiprocessing_context="fork" if workers else None))
            for batch_size in (1, 8) for workers in (0, 2)}
    for (batch_size, workers), batches in runs.items():
        assert len(batches) == 24 // batch_size
        assert all(b["raw"].shape == (batch_size, 1, 5, 9, 13) and b["raw"].dtype == torch.uint16 for b in batches)
        assert torch.equal(_cat(batches, "raw"), raw), (batch_size, workers)
        assert torch.equal(_cat(batches, "label"), label), (batch_size, workers)
        assert torch.equal(_cat(batches, "origin"), origin), (batch_size, workers)
    floats = list(DataLoader(adapter.PatchDataset(sampler, dtype=torch.float32, label_dtype=torch.int64),
                             batch_size=8, num_workers=2, multiprocessing_context="fork"))
    assert torch.equal(_cat(floats, "raw"), raw.float()) and _cat(floats, "raw").dtype == torch.float32
    assert torch.equal(_cat(floats, "label"), label.long())


@pytest.mark.torch
def test_dataloader_with_spawned_workers_matches_one_process(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from emdata.access.torch import PatchDataset

    sampler = _labelled_sampler(tmp_path)
    dataset = PatchDataset(sampler)
    single = [dataset[i] for i in range(len(dataset))]
    spawn = list(DataLoader(dataset, batch_size=6, num_workers=2, multiprocessing_context="spawn"))  # pickled
    for key in ("raw", "label", "origin"):
        assert torch.equal(_cat(spawn, key), torch.stack([s[key] for s in single]))
    assert _cat(spawn, "raw").dtype == torch.uint16
