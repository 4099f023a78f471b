"""A real DataLoader with worker processes, and opening an exact DVC version of a dataset."""

from __future__ import annotations

import numpy as np
import pytest

from emdata.access.sampling import RandomPatches
from emdata.access.volume import Volume, open_dataset
from emdata.testing.volumes import blob_labels, coordinate_volume, write_canonical

SHAPE = (19, 37, 47)


@pytest.mark.torch
def test_dataloader_with_two_workers_matches_one_process(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from emdata.access.torch import PatchDataset

    path = write_canonical(tmp_path / "v.h5", coordinate_volume(SHAPE, np.uint16),
                           labels={"mito": blob_labels(SHAPE, seed=5, count=6)})
    volume = Volume(path)
    volume[0, 0, 0]  # a handle open in the parent must not leak into the workers
    sampler = RandomPatches(volume, (5, 9, 13), seed=11, length=24, label="mito", min_foreground=0.1)
    dataset = PatchDataset(sampler)
    single = [dataset[i] for i in range(len(dataset))]
    loader = DataLoader(dataset, batch_size=4, num_workers=2, shuffle=False,
                        multiprocessing_context="fork", persistent_workers=False)
    batches = list(loader)
    raw = torch.cat([b["raw"] for b in batches])
    assert raw.shape == (24, 1, 5, 9, 13) and raw.dtype == torch.float32
    assert torch.equal(raw, torch.stack([s["raw"] for s in single]))
    assert torch.equal(torch.cat([b["label"] for b in batches]), torch.stack([s["label"] for s in single]))
    assert torch.equal(torch.cat([b["origin"] for b in batches]), torch.stack([s["origin"] for s in single]))
    spawn = DataLoader(dataset, batch_size=6, num_workers=2, multiprocessing_context="spawn")
    assert torch.equal(torch.cat([b["raw"] for b in spawn]), raw)  # pickled, not forked


@pytest.mark.dvc
def test_open_dataset_at_a_tagged_version(tmp_path) -> None:
    from emdata.testing.dvc import dvc, git, offline_env

    env = offline_env(tmp_path / "env")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text("datasets: {}\n")
    git(["init", "-q", "-b", "main"], repo, env)
    dvc(["init", "-q"], repo, env)
    dvc(["config", "core.analytics", "false"], repo, env)
    target = repo / "data" / "processed" / "toy.h5"
    v1 = coordinate_volume(SHAPE)
    write_canonical(target, v1)
    dvc(["add", "data/processed/toy.h5"], repo, env)
    git(["add", "-A"], repo, env)
    git(["commit", "-qm", "v1"], repo, env)
    git(["tag", "v1"], repo, env)
    v2 = v1[::-1].copy()
    write_canonical(target, v2)
    dvc(["add", "data/processed/toy.h5"], repo, env)
    git(["add", "-A"], repo, env)
    git(["commit", "-qm", "v2"], repo, env)
    old = open_dataset("toy", rev="v1", repo=repo, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(old[:, :, :], v1)
    np.testing.assert_array_equal(Volume(target)[:, :, :], v2)  # the working tree holds v2
    again = open_dataset("toy", rev="v1", repo=repo, cache_dir=tmp_path / "cache")
    assert again.path == old.path  # served from the cache, keyed by the file's DVC md5
    lock = (repo / "data" / "processed" / "toy.h5.dvc").read_text()
    assert old.path.parent.name not in lock and len(old.path.parent.name) == 32
    head = open_dataset("toy", rev="main", repo=repo, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(head[:, :, :], v2)
