"""Reads through RemoteStorage, in process: the chunk index and the HDF5 behind any fsspec filesystem.

The DVC + S3 path (open_remote on a pushed repository) is covered in test_remote_access (slow
tier); here the same reader runs on fsspec's local filesystem, so every ROI is compared with h5py
and every byte requested is counted without a server.
"""

from __future__ import annotations

import pickle

import fsspec
import numpy as np
import pytest

from emdata.access.remote import RangeReader, RemoteIndex, RemoteStorage, Transfer
from emdata.access.volume import Volume
from emdata.h5.chunk_index import write as write_index
from emdata.testing.volumes import blob_labels, coordinate_volume, write_canonical

SHAPE = (23, 41, 57)  # odd, non-cubic
CHUNKS = (8, 16, 16)


@pytest.fixture(params=["none", "zstd"])
def files(request, tmp_path):
    raw = coordinate_volume(SHAPE, np.uint16)
    label = blob_labels(SHAPE, seed=3, count=4)
    h5 = write_canonical(tmp_path / "v.h5", raw, labels={"blobs": label}, chunks=CHUNKS, compression=request.param)
    index = tmp_path / "v.chunks"
    write_index(h5, index, file_name=h5.name, file_sha256="not needed here")
    return h5, index, raw, label


def remote(h5, index, array: str = "raw") -> Volume:
    fs, transfer = fsspec.filesystem("file"), Transfer()
    data = RangeReader(fs, str(h5), h5.stat().st_size, h5.as_uri(), "toy", transfer)
    idx = RangeReader(fs, str(index), index.stat().st_size, index.as_uri(), "toy", transfer)
    return Volume(RemoteStorage(RemoteIndex(idx), data), array, name="toy")


def test_rois_labels_and_geometry_equal_the_local_file(files) -> None:
    h5, index, raw, label = files
    vol, local = remote(h5, index), Volume(h5)
    assert vol.shape == SHAPE and vol.dtype == raw.dtype and vol.label_names == ["blobs"]
    np.testing.assert_array_equal(vol.resolution, local.resolution)
    np.testing.assert_array_equal(vol.offset, local.offset)
    rng = np.random.default_rng(0)
    for _ in range(12):
        start = tuple(int(rng.integers(0, s - 1)) for s in SHAPE)
        shape = tuple(int(rng.integers(1, s - a + 1)) for a, s in zip(start, SHAPE))
        box = tuple(slice(a, a + n) for a, n in zip(start, shape))
        np.testing.assert_array_equal(vol.read(start, shape), raw[box])
    np.testing.assert_array_equal(vol.labels["blobs"][()], label)


def stored_bytes(h5, start, stop) -> int:
    """Stored bytes of the /raw chunks a box touches, from HDF5's own chunk index."""
    import h5py

    with h5py.File(h5, "r") as f:
        dset = f["raw"]
        grid = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(start, stop, CHUNKS)]
        return sum(dset.id.get_chunk_info_by_coord(tuple(k * c for k, c in zip(key, CHUNKS))).size
                   for key in np.ndindex(*[len(r) for r in grid])
                   for key in [tuple(r[i] for r, i in zip(grid, key))])


@pytest.mark.parametrize("start, shape", [((9, 17, 33), (6, 10, 12)), ((7, 15, 31), (2, 2, 2)),
                                          ((0, 0, 0), SHAPE)])
def test_a_box_fetches_exactly_the_chunks_it_touches(files, start, shape) -> None:
    h5, index, raw, _ = files
    vol = remote(h5, index)
    vol.transfer.reset()
    box = tuple(slice(a, a + n) for a, n in zip(start, shape))
    np.testing.assert_array_equal(vol.read(start, shape), raw[box])
    stop = tuple(a + n for a, n in zip(start, shape))
    assert vol.transfer.chunk_bytes == stored_bytes(h5, start, stop)


def test_pickles_to_a_reader_of_the_same_voxels(files) -> None:
    h5, index, raw, _ = files
    again = pickle.loads(pickle.dumps(remote(h5, index)))
    np.testing.assert_array_equal(again.read((0, 0, 0), SHAPE), raw)


def test_samplers_tiling_and_torch_run_the_same_code_on_either_storage(files, tmp_path) -> None:
    """Nothing behind the storage's back: every consumer of a Volume gets the same voxels remotely."""
    import h5py

    from emdata.access.sampling import GridPatches, RandomPatches
    from emdata.access.tiling import run_tiled

    h5, index, _, _ = files
    vol, local = remote(h5, index), Volume(h5)
    both = [RandomPatches(v, (5, 9, 11), label="blobs", min_foreground=0.3, seed=2, length=5) for v in (vol, local)]
    grids = [GridPatches(v, (8, 16, 16), overlap=(2, 3, 4), label="blobs") for v in (vol, local)]
    for a, b in [*zip(*both), *zip(*grids)]:
        assert a.origin == b.origin
        np.testing.assert_array_equal(a.raw, b.raw)
        np.testing.assert_array_equal(a.label, b.label)
    outputs = [run_tiled(v, lambda x: x.astype(np.float32) / 2, tmp_path / f"{i}.h5", block_shape=(8, 16, 16),
                         halo=(2, 3, 4), blend="gaussian") for i, v in enumerate((vol, local))]
    with h5py.File(outputs[0]) as r, h5py.File(outputs[1]) as l:
        np.testing.assert_array_equal(r["prediction"][()], l["prediction"][()])
    torch = pytest.importorskip("torch")
    from emdata.access.torch import PatchDataset

    items = [PatchDataset(s)[3] for s in both]
    assert all(torch.equal(items[0][k], items[1][k]) for k in ("raw", "label", "origin"))
