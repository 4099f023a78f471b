"""The DVC pipeline for real: repro, no-op rerun, per-dataset reruns, push/pull, import.

These run the dvc command line in throw-away repositories, against the EPFL replica and a real
S3 server (SeaweedFS) on loopback.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from emdata.testing.demo import replica_repository
from emdata.core.digest import sha256_file
from emdata.testing.dvc import dvc, git, offline_env
from tests.conftest import REPO

pytestmark = pytest.mark.dvc


@pytest.fixture
def producer(tmp_path: Path):
    env = offline_env(tmp_path / "env")
    repo = tmp_path / "work" / "producer"
    with ExitStack() as stack:
        # the EPFL datasets only: every kind's dataset goes through dvc repro in the demo test below
        replica_repository(REPO, repo, tmp_path / "replicas", env, stack, kinds={"epfl"})
        yield repo, env


def ran_stages(output: str) -> list[str]:
    return sorted(re.findall(r"Running stage '([^']+)'", output))


def test_repro_is_a_noop_the_second_time_and_reruns_only_what_changed(producer) -> None:
    repo, env = producer
    first = dvc(["repro"], repo, env)
    datasets = yaml.safe_load((repo / "params.yaml").read_text())["datasets"]
    assert len(ran_stages(first)) == 2 * len(datasets) + 2  # inputs, fetch and normalize each, summarize
    assert ran_stages(dvc(["repro"], repo, env)) == ["inputs"]  # always runs; changed nothing
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["datasets"]["epfl_mito_test"]["voxel_size_nm"] = [30.0, 5.0, 5.0]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran_stages(dvc(["repro"], repo, env)) == ["inputs", "normalize@epfl_mito_test", "summarize"]
    record = json.loads((repo / "data" / "metadata" / "epfl_mito_test.json").read_text())
    assert record["voxel_size_nm"] == [30.0, 5.0, 5.0]
    params["datasets"]["epfl_mito_test"]["source"]["image"]["size"] = 12345  # a fetch param
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert dvc(["status", "fetch@epfl_mito_train"], repo, env).strip().endswith("up to date.")
    assert "fetch@epfl_mito_test" in dvc(["status"], repo, env)


@pytest.mark.s3
def test_demo_pushes_and_pulls_identical_files(tmp_path: Path) -> None:
    from emdata.testing.demo import run_demo

    result = run_demo(REPO, workdir=tmp_path / "demo", keep=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(result["hashes"]) == set(params["datasets"]) | set(params["optional_datasets"])
    assert {"epfl_hippocampus", "epfl_mito_train", "epfl_mito_test"} <= set(result["hashes"])
    for remote in ("local", "s3"):
        assert result["checks"][remote] == result["hashes"]
        clone = tmp_path / "demo" / "work" / f"clone-{remote}"
        for key, digest in result["hashes"].items():
            assert sha256_file(clone / "data" / "processed" / f"{key}.h5") == digest
    objects = list((tmp_path / "demo" / "s3" / "data").rglob("*"))
    assert objects, "nothing reached the S3 server's storage"
    _check_croissant(result["producer"], sorted(result["hashes"]))


def _check_croissant(producer: Path, built: list[str]) -> None:
    """Every Croissant file the demo's summarize wrote is valid for mlcroissant, and every record
    of every array record set gives the shape and dtype of the HDF5 array it names."""
    mlc = pytest.importorskip("mlcroissant")
    import h5py

    files = [producer / "data" / "croissant.json", *sorted((producer / "data" / "croissant").glob("*.json"))]
    assert [p.stem for p in files[1:]] == built
    checked = 0
    for path in files:
        doc = mlc.Dataset(jsonld=str(path))  # raises on an invalid file
        if path.parent.name != "croissant":
            continue
        with h5py.File(producer / "data" / "processed" / f"{path.stem}.h5") as f:
            for record_set in doc.metadata.record_sets:
                for record in doc.records(record_set.name):
                    row = {k.split("/", 1)[1]: v for k, v in record.items()}
                    if "hdf5_path" not in row:
                        continue
                    array = f[row["hdf5_path"]]
                    assert tuple(row["shape"]) == array.shape and row["dtype"] == str(array.dtype), row
                    checked += 1
    assert checked >= len(built)


def test_downstream_repo_imports_one_hdf5(producer, tmp_path: Path) -> None:
    repo, env = producer
    dvc(["repro", "normalize@epfl_mito_train"], repo, env)
    dvc(["push"], repo, env)
    git(["add", "-A"], repo, env)
    git(["commit", "-qm", "outputs"], repo, env)
    downstream = tmp_path / "work" / "downstream"
    downstream.mkdir()
    git(["init", "-q", "-b", "main"], downstream, env)
    dvc(["init", "-q"], downstream, env)
    dvc(["config", "core.analytics", "false"], downstream, env)
    dvc(["import", str(repo), "data/processed/epfl_mito_train.h5", "-o", "train.h5"], downstream, env)
    assert sha256_file(downstream / "train.h5") == sha256_file(repo / "data" / "processed" / "epfl_mito_train.h5")
    assert (downstream / "train.h5.dvc").is_file()


def test_a_tagged_release_is_consumed_by_pull_import_and_open_dataset(producer, tmp_path: Path) -> None:
    """What `make publish` does (repro, push, commit dvc.lock, tag), then three ways to consume the tag."""
    import h5py
    import numpy as np

    from emdata.access.open import open_dataset

    repo, env = producer
    dvc(["repro", "normalize@epfl_mito_train"], repo, env)
    dvc(["push"], repo, env)
    git(["add", "-A"], repo, env)
    git(["commit", "-qm", "publish v1.0"], repo, env)
    git(["tag", "-a", "v1.0", "-m", "release"], repo, env)
    produced = repo / "data" / "processed" / "epfl_mito_train.h5"
    digest = sha256_file(produced)
    # Later work on main must not change what the tag serves.
    dvc(["repro", "normalize@epfl_mito_test"], repo, env)
    git(["add", "-A"], repo, env)
    git(["commit", "-qm", "more data"], repo, env)

    clone = tmp_path / "work" / "clone"
    git(["clone", "-q", "--branch", "v1.0", str(repo), str(clone)], tmp_path, env)
    dvc(["pull", "data/processed/epfl_mito_train.h5"], clone, env)
    assert sha256_file(clone / "data" / "processed" / "epfl_mito_train.h5") == digest

    downstream = tmp_path / "work" / "downstream"
    downstream.mkdir()
    git(["init", "-q", "-b", "main"], downstream, env)
    dvc(["init", "-q"], downstream, env)
    dvc(["import", str(repo), "data/processed/epfl_mito_train.h5", "--rev", "v1.0", "-o", "train.h5"], downstream, env)
    assert sha256_file(downstream / "train.h5") == digest

    vol = open_dataset("epfl_mito_train", rev="v1.0", repo=str(repo), cache_dir=tmp_path / "cache")
    assert sha256_file(vol.path) == digest
    with h5py.File(produced, "r") as f:
        np.testing.assert_array_equal(vol[:], f["raw"][()])
