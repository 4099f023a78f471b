"""open_dataset(name, rev=...): an exact DVC version of a dataset, fetched once into a cache."""

from __future__ import annotations

import numpy as np
import pytest

from emdata.access.open import open_dataset
from emdata.access.volume import Volume
from emdata.testing.volumes import coordinate_volume, write_canonical

SHAPE = (19, 37, 47)


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
