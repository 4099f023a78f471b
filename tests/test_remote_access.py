"""ROI reads straight from the DVC S3 remote (SeaweedFS on loopback), through the chunk index.

One producer repository is built once for the module: the EPFL replica, ``dvc repro`` of two
datasets with small chunks, ``dvc push -r s3``, committed and tagged for each compression
(``v-none``, ``v-zstd``, ``v-blosc-lz4``). Reads at each tag are compared with the local file
of that tag (``open_dataset(rev=...)``, which downloads it whole).
"""

from __future__ import annotations

import pickle
from contextlib import ExitStack
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from emdata.access.remote import RemoteStorage
from emdata.access.open import open_dataset
from emdata.h5.chunk_index import ChunkIndex, to_kerchunk
from emdata.testing.demo import replica_repository
from emdata.errors import NotBuiltError
from emdata.testing.dvc import dvc, git, offline_env
from emdata.testing.s3 import SeaweedS3
from tests.conftest import REPO

pytestmark = [pytest.mark.s3, pytest.mark.dvc]
COMPRESSIONS = ("none", "zstd", "blosc-lz4")
KEYS = ("epfl_hippocampus", "epfl_mito_train")


@pytest.fixture(scope="module")
def producer(tmp_path_factory):
    base = tmp_path_factory.mktemp("remote")
    env = offline_env(base / "env")
    repo = base / "producer"
    with ExitStack() as stack:
        replica_repository(REPO, repo, base / "replicas", env, stack, kinds={"epfl"})
        s3 = stack.enter_context(SeaweedS3(base / "s3", access_key=env["AWS_ACCESS_KEY_ID"],
                                           secret_key=env["AWS_SECRET_ACCESS_KEY"]))
        s3.create_bucket("emdata-dvc")
        dvc(["remote", "modify", "--local", "s3", "endpointurl", s3.endpoint], repo, env)
        for compression in COMPRESSIONS:
            params = yaml.safe_load((repo / "params.yaml").read_text())
            params["normalize"].update(chunks=[8, 16, 16], compression=compression)
            (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            dvc(["repro", *(f"normalize@{k}" for k in KEYS)], repo, env)
            dvc(["push", "-r", "s3"], repo, env)
            git(["add", "-A"], repo, env)
            git(["commit", "-qm", f"normalize with {compression}"], repo, env)
            git(["tag", f"v-{compression}"], repo, env)
        yield {"repo": repo, "env": env, "s3": s3, "base": base}


@pytest.fixture
def aws(producer, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, producer["env"][name])
    return producer


def local_copy(producer, key: str, rev: str, label: str | None = None):
    return open_dataset(key, rev=rev, repo=producer["repo"], cache_dir=producer["base"] / "cache", label=label)


def touched_chunk_bytes(path: Path, array: str, start, stop) -> int:
    """Stored bytes of the chunks a box touches, from HDF5's own chunk index of the local file."""
    total = 0
    with h5py.File(path, "r", locking=False) as f:
        dset = f[array]
        chunks = dset.chunks
        ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(start, stop, chunks)]
        for kz in ranges[0]:
            for ky in ranges[1]:
                for kx in ranges[2]:
                    info = dset.id.get_chunk_info_by_coord((kz * chunks[0], ky * chunks[1], kx * chunks[2]))
                    total += info.size
    return total


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_remote_rois_equal_the_local_file(aws, compression) -> None:
    rev = f"v-{compression}"
    remote = open_dataset("epfl_hippocampus", rev=rev, repo=aws["repo"], remote="s3")
    local = local_copy(aws, "epfl_hippocampus", rev)
    assert isinstance(remote.storage, RemoteStorage) and remote.path is None
    assert remote.location.startswith("s3://emdata-dvc/cache/files/md5/")
    assert (remote.shape, remote.dtype, remote.chunks) == (local.shape, local.dtype, local.chunks)
    np.testing.assert_array_equal(remote.resolution, local.resolution)
    assert remote.metadata["array"]["array_sha256"] == local.metadata["array"]["array_sha256"]
    rng = np.random.default_rng(7)
    boxes = [((0, 0, 0), local.shape), ((8, 16, 32), (8, 16, 16)), ((16, 32, 48), (5, 5, 5))]  # whole, aligned, edge
    for _ in range(12):
        size = [int(rng.integers(1, n + 1)) for n in local.shape]
        start = [int(rng.integers(0, n - s + 1)) for n, s in zip(local.shape, size)]
        boxes.append((tuple(start), tuple(size)))
    for start, size in boxes:
        remote.transfer.reset()
        got = remote.read(start, size)
        np.testing.assert_array_equal(got, local.read(start, size))
        stop = tuple(a + s for a, s in zip(start, size))
        touched = touched_chunk_bytes(local.path, "raw", start, stop)
        assert 0 < remote.transfer.chunk_bytes <= 1.2 * touched, (start, size, remote.transfer)
        assert remote.transfer.bytes == remote.transfer.chunk_bytes  # the index is small: read whole at open
    # numpy slicing, padding at the borders, nm ROIs and a dask view go through the same reads
    np.testing.assert_array_equal(remote[3:9, -5:, 7], local[3:9, -5:, 7])
    np.testing.assert_array_equal(remote.read((-3, 30, 40), (6, 10, 20), pad="reflect"),
                                  local.read((-3, 30, 40), (6, 10, 20), pad="reflect"))
    np.testing.assert_array_equal(remote.read_roi((10.0, 20.0, 30.0), (50.0, 60.0, 70.0)),
                                  local.read_roi((10.0, 20.0, 30.0), (50.0, 60.0, 70.0)))
    np.testing.assert_array_equal(remote.to_dask(chunks=(7, 11, 13)).compute(), local[:])


def test_labels_metadata_and_pickling(aws) -> None:
    remote = open_dataset("epfl_mito_train", rev="v-zstd", repo=aws["repo"], remote="s3")
    local = local_copy(aws, "epfl_mito_train", "v-zstd")
    assert remote.label_names == ["mitochondria"]
    np.testing.assert_array_equal(remote.labels["mitochondria"][:], local.labels["mitochondria"][:])
    direct = open_dataset("epfl_mito_train", rev="v-zstd", repo=aws["repo"], remote="s3", label="mitochondria")
    np.testing.assert_array_equal(direct[2:9, 3:20, 5:40], local.labels["mitochondria"][2:9, 3:20, 5:40])
    meta, expected = remote.metadata, local.metadata
    assert meta["params"] == expected["params"] and meta["array"]["statistics"] == expected["array"]["statistics"]
    clone = pickle.loads(pickle.dumps(remote))  # DataLoader workers and dask get their own copy
    np.testing.assert_array_equal(clone[4:7, 10:20, 0:43], local[4:7, 10:20, 0:43])


def test_kerchunk_references_point_at_the_chunks(aws) -> None:
    import fsspec

    rev = "v-none"
    remote = open_dataset("epfl_hippocampus", rev=rev, repo=aws["repo"], remote="s3")
    local = local_copy(aws, "epfl_hippocampus", rev)
    refs = to_kerchunk(remote.storage.index.index, local.path.as_uri())
    assert len([k for k in refs["refs"] if k.startswith("raw/") and not k.startswith("raw/.")]) == 3 * 3 * 4
    fs = fsspec.filesystem("reference", fo=refs)
    chunk = np.frombuffer(fs.cat("raw/1.2.3"), np.uint8).reshape(8, 16, 16)
    np.testing.assert_array_equal(chunk[:, :5, :5], local[8:16, 32:37, 48:53])  # an edge chunk of (21, 37, 53)
    assert not chunk[:, 5:, :].any() and not chunk[:, :, 5:].any()  # stored full-size, padded with the fill value


def test_a_revision_without_an_index_says_to_pull(aws) -> None:
    repo, env = aws["repo"], aws["env"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = lock["stages"]["normalize@epfl_hippocampus"]["outs"]
    lock["stages"]["normalize@epfl_hippocampus"]["outs"] = [o for o in outs if not o["path"].endswith(".chunks")]
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    git(["commit", "-qam", "as written before chunk indexes existed"], repo, env)
    git(["tag", "no-index"], repo, env)
    try:
        with pytest.raises(NotBuiltError, match=r"no chunk-offset index.*dvc pull data/processed/epfl_hippocampus.h5"):
            open_dataset("epfl_hippocampus", rev="no-index", repo=repo, remote="s3")
    finally:
        git(["reset", "-q", "--hard", "v-blosc-lz4"], repo, env)


def test_an_object_missing_from_the_remote_says_to_push(aws, tmp_path) -> None:
    index = ChunkIndex.open(aws["repo"] / "data" / "metadata" / "epfl_hippocampus.chunks")
    assert index.file["name"] == "epfl_hippocampus.h5"
    with pytest.raises(Exception, match="no usable DVC remote 'nowhere'"):
        open_dataset("epfl_hippocampus", rev="v-none", repo=aws["repo"], remote="nowhere")
    # an empty bucket behind the same remote name: the object is not there
    empty = aws["s3"]
    empty.create_bucket("empty-bucket")
    with pytest.raises(NotBuiltError, match=r"not in the remote 's3'.*dvc push -r s3"):
        open_dataset("epfl_hippocampus", rev="v-none", repo=aws["repo"], remote="s3",
                     remote_config={"url": "s3://empty-bucket/cache"})
