"""Block access: Volume reads, nm ROIs, block coverings, ecosystem views, open_dataset."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from emdata.access.blocks import block_grid
from emdata.access.open import open_dataset
from emdata.access.volume import Volume
from emdata.errors import AccessError, ConfigError, NotBuiltError
from emdata.testing.volumes import blob_labels, coordinate_volume, write_canonical

SHAPE = (23, 41, 57)


@pytest.fixture
def vol_array() -> np.ndarray:
    return coordinate_volume(SHAPE, np.uint16)


@pytest.fixture
def volume(tmp_path, vol_array) -> Volume:
    path = write_canonical(tmp_path / "data" / "processed" / "toy.h5", vol_array,
                           labels={"mito": blob_labels(SHAPE, seed=3)},
                           resolution=(30.0, 4.0, 4.0), offset=(90.0, 8.0, -12.0))
    return Volume(path)


def test_basic_properties(volume, vol_array) -> None:
    assert volume.shape == SHAPE and volume.dtype == np.uint16 and volume.dims == "ZYX"
    np.testing.assert_array_equal(volume.resolution, [30, 4, 4])
    np.testing.assert_array_equal(volume.offset, [90, 8, -12])
    assert volume.physical_pixel_sizes == (0.03, 0.004, 0.004)
    assert set(volume.labels) == {"mito"} and volume.labels["mito"].shape == SHAPE
    assert volume.metadata["array"]["statistics"]["max"] == vol_array.max()


def test_numpy_slicing_in_voxels(volume, vol_array) -> None:
    np.testing.assert_array_equal(volume[3:9, 10:30, 5:50], vol_array[3:9, 10:30, 5:50])
    np.testing.assert_array_equal(volume[-1, :, 7], vol_array[-1, :, 7])
    np.testing.assert_array_equal(volume[..., 3], vol_array[..., 3])
    np.testing.assert_array_equal(np.asarray(volume), vol_array)
    with pytest.raises(AccessError):
        volume[23]
    with pytest.raises(IndexError):  # AccessError is an IndexError
        volume[0, 0, 100]


def test_read_roi_in_nm_matches_voxel_slicing(volume, vol_array) -> None:
    # voxel i starts at offset + i * resolution
    roi = volume.read_roi(offset_nm=(90 + 2 * 30, 8 + 5 * 4, -12 + 7 * 4), shape_nm=(4 * 30, 10 * 4, 20 * 4))
    np.testing.assert_array_equal(roi, vol_array[2:6, 5:15, 7:27])
    # bounds snap to the nearest voxel boundary: +-0.4 voxel does not change the result
    near = volume.read_roi(offset_nm=(90 + 2 * 30 + 11, 8 + 5 * 4 - 1.5, -12 + 7 * 4 + 1.5),
                           shape_nm=(4 * 30, 10 * 4, 20 * 4))
    np.testing.assert_array_equal(near, roi)
    with pytest.raises(AccessError, match="outside the volume"):
        volume.read_roi(offset_nm=(0, 0, 0), shape_nm=(100, 100, 100))


def test_read_with_padding(volume, vol_array) -> None:
    box = volume.read((-2, 0, 50), (5, 4, 10), pad="constant", constant=7)
    assert box.shape == (5, 4, 10)
    np.testing.assert_array_equal(box[2:, :, :7], vol_array[0:3, 0:4, 50:57])
    assert (box[:2] == 7).all() and (box[:, :, 7:] == 7).all()
    reflected = volume.read((-2, 0, 0), (4, 2, 2), pad="reflect")
    np.testing.assert_array_equal(reflected[0], vol_array[2, 0:2, 0:2])


@pytest.mark.parametrize("fit", ["pad", "shrink"])
@pytest.mark.parametrize("block, halo", [((8, 16, 16), (2, 3, 5)), ((5, 7, 11), (0, 0, 0)), ((30, 50, 60), (4, 4, 4))])
def test_blocks_tile_the_volume_exactly(volume, vol_array, fit, block, halo) -> None:
    cover = np.zeros(SHAPE, np.int32)
    for b in volume.blocks(block, halo=halo, fit=fit):
        cover[b.write] += 1
        data = volume.read_block(b, pad="reflect")
        assert data.shape == b.read_shape
        if fit == "pad":
            assert b.read_shape == tuple(k + 2 * h for k, h in zip(block, halo))
        else:
            assert all(0 <= a and c <= s for a, c, s in zip(b.read_start, b.read_stop, SHAPE))
        # the write region inside the read region holds exactly the volume's voxels
        np.testing.assert_array_equal(b.crop(data), vol_array[b.write])
        # the halo holds true neighbours wherever it lies inside the volume
        inside = tuple(slice(max(0, r0), min(s, r1)) for r0, r1, s in zip(b.read_start, b.read_stop, SHAPE))
        local = tuple(slice(i.start - r0, i.stop - r0) for i, r0 in zip(inside, b.read_start))
        np.testing.assert_array_equal(data[local], vol_array[inside])
    assert (cover == 1).all()


def test_pickle_and_fork_safety(volume, vol_array) -> None:
    volume[0, 0, 0]  # open a handle in this process
    clone = pickle.loads(pickle.dumps(volume))
    assert getattr(clone, "_handle", None) is None
    np.testing.assert_array_equal(clone[1:3, 2:4, 5:9], vol_array[1:3, 2:4, 5:9])


def test_concurrent_first_reads_from_threads(tmp_path, vol_array, monkeypatch) -> None:
    """dask's threaded scheduler opens a Volume from many threads at once.

    A slow dataset lookup widens the window in which a half-opened handle could be seen.
    """
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import h5py

    fresh = Volume(write_canonical(tmp_path / "t.h5", vol_array))
    lookup = h5py.File.__getitem__

    def slow_lookup(self, name):
        time.sleep(0.05)
        return lookup(self, name)

    monkeypatch.setattr(h5py.File, "__getitem__", slow_lookup)
    start = threading.Barrier(8)

    def read(z):
        start.wait() if z < 8 else None
        return fresh[z]

    with ThreadPoolExecutor(8) as pool:
        parts = list(pool.map(read, range(SHAPE[0])))
    np.testing.assert_array_equal(np.stack(parts), vol_array)


def test_dask_and_xarray_views(volume, vol_array) -> None:
    pytest.importorskip("dask")
    xr = pytest.importorskip("xarray")
    arr = volume.to_dask()
    assert arr.chunks[0][0] == 8 and arr.shape == SHAPE
    np.testing.assert_array_equal(arr[5:9, ::3].compute(), vol_array[5:9, ::3])
    da = volume.to_xarray()
    assert da.dims == ("z", "y", "x")
    assert float(da.z[1]) == 120.0 and float(da.x[0]) == -12.0
    np.testing.assert_array_equal(da.sel(z=150.0).values, vol_array[2])
    assert isinstance(da, xr.DataArray)


def test_open_dataset_by_name(volume, monkeypatch, tmp_path) -> None:
    (tmp_path / "params.yaml").write_text("datasets: {}\n")
    monkeypatch.chdir(tmp_path)
    assert open_dataset("toy").shape == SHAPE
    assert open_dataset("toy", label="mito").array == "labels/mito"
    with pytest.raises(NotBuiltError, match="dvc pull data/processed/other.h5"):
        open_dataset("other")


def test_block_grid_rejects_bad_arguments() -> None:
    from emdata.errors import ConfigError

    with pytest.raises(ConfigError):
        list(block_grid(SHAPE, (0, 4, 4)))
    with pytest.raises(ConfigError):
        list(block_grid(SHAPE, (4, 4, 4), fit="wrap"))


@pytest.mark.parametrize("mode", ["reflect", "symmetric", "edge", "wrap", "constant"])
def test_padded_reads_equal_padding_the_whole_volume(volume, vol_array, mode) -> None:
    margin = 130  # boxes wider than the volume: padding that reflects or wraps more than once
    kwargs = {"constant_values": 5} if mode == "constant" else {}
    reference = np.pad(vol_array, margin, mode=mode, **kwargs)
    rng = np.random.default_rng(0)
    for k in range(80):
        shape = rng.integers(1, 25 if k < 60 else 120, 3)
        start = [int(rng.integers(-20 if k < 60 else -60, s - 1)) for s in SHAPE]
        box = volume.read(start, shape, pad=mode, constant=5)
        expected = reference[tuple(slice(a + margin, a + margin + n) for a, n in zip(start, shape))]
        np.testing.assert_array_equal(box, expected)


@pytest.mark.parametrize("mode", ["mean", "linear_ramp", "bogus"])
def test_padding_that_computes_values_is_refused(volume, mode) -> None:
    with pytest.raises(ConfigError, match="pad="):
        volume.read((-2, 0, 0), (5, 5, 5), pad=mode)


def test_memory_mapped_reads_match_h5py(tmp_path) -> None:
    """The ChunkMap fast path returns exactly what h5py returns, unwritten chunks included."""
    import h5py

    from emdata.h5.hdf5 import ChunkMap

    path = tmp_path / "sparse.h5"
    data = coordinate_volume((21, 35, 50), np.uint16)
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("raw", shape=data.shape, dtype=np.uint16, chunks=(8, 16, 16), fillvalue=9)
        dset[:, :16] = data[:, :16]  # the other chunks are never written
    with h5py.File(path, "r") as f:
        chunkmap = ChunkMap.build(f["raw"])
        assert chunkmap is not None
        rng = np.random.default_rng(1)
        for _ in range(50):
            start = [int(rng.integers(0, s)) for s in data.shape]
            stop = [int(rng.integers(a + 1, s + 1)) for a, s in zip(start, data.shape)]
            box = tuple(slice(a, b) for a, b in zip(start, stop))
            np.testing.assert_array_equal(chunkmap.read(start, stop), f["raw"][box])
    with h5py.File(tmp_path / "z.h5", "w") as f:
        f.create_dataset("raw", data=data, chunks=(8, 16, 16), compression="gzip")
    with h5py.File(tmp_path / "z.h5", "r") as f:
        assert ChunkMap.build(f["raw"]) is None  # filters: h5py reads instead


def test_compressed_files_read_in_a_fresh_process(tmp_path, vol_array) -> None:
    """zstd/blosc files open through emdata without the user importing hdf5plugin."""
    import subprocess
    import sys

    for compression in ("zstd", "blosc-lz4"):
        path = write_canonical(tmp_path / f"{compression}.h5", vol_array, compression=compression)
        code = ("import sys, numpy as np; from emdata.access.volume import Volume; "
                f"v = Volume({str(path)!r}); assert v.storage.handle(v.array).chunkmap is None; "
                "print(int(v[:, :, :].astype(np.int64).sum()))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert int(out) == int(vol_array.astype(np.int64).sum())


def test_reads_during_replacement_are_old_or_new_never_a_mix(tmp_path) -> None:
    """20 re-normalizations with alternating chunk shapes while patches are read from fresh Volumes."""
    import os
    import threading

    from emdata.errors import AccessError

    versions = [coordinate_volume((19, 33, 41)), coordinate_volume((19, 33, 41))[::-1, ::-1].copy()]
    chunk_shapes = [(8, 16, 16), (5, 7, 9)]
    path = write_canonical(tmp_path / "v.h5", versions[0], chunks=chunk_shapes[0])
    done = threading.Event()

    def renormalize() -> None:
        for i in range(1, 21):
            tmp = write_canonical(tmp_path / f"next{i}.h5", versions[i % 2], chunks=chunk_shapes[i % 2])
            os.replace(tmp, path)
        done.set()

    writer = threading.Thread(target=renormalize)
    writer.start()
    rng = np.random.default_rng(0)
    reads = replaced = 0
    while not done.is_set() or reads < 50:
        z, y, x = (int(rng.integers(0, n - 6)) for n in (19, 33, 41))
        try:
            vol = Volume(path)
            patch = vol[z:z + 6, y:y + 9, x:x + 11]
            vol.close()
        except AccessError as exc:
            assert "replaced" in str(exc)
            replaced += 1
            continue
        except OSError:  # the path is briefly between two files on some filesystems: open again
            continue
        reads += 1
        assert any(np.array_equal(patch, v[z:z + 6, y:y + 9, x:x + 11]) for v in versions)
    writer.join()
    assert reads >= 50


def test_a_file_without_resolution_is_not_given_a_guessed_one(tmp_path) -> None:
    import h5py

    from emdata.errors import ConfigError

    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("raw", data=coordinate_volume((3, 4, 5)), chunks=(3, 4, 5))
    with pytest.raises(ConfigError, match="records no resolution"):
        Volume(path)
    vol = Volume(path, resolution=(30, 4, 4))
    assert vol.resolution.tolist() == [30, 4, 4] and vol.offset.tolist() == [0, 0, 0]


def test_open_dataset_accepts_a_file_path(tmp_path) -> None:
    from pathlib import Path

    raw = coordinate_volume((6, 7, 9))
    path = write_canonical(tmp_path / "from_a_colleague.h5", raw, labels={"mito": (raw % 3 == 0).astype(np.uint8)})
    for spec in (path, str(path), Path(path)):
        np.testing.assert_array_equal(open_dataset(spec)[:], raw)
    assert open_dataset(path, label="mito").shape == raw.shape
    with pytest.raises(NotBuiltError, match="no such file"):
        open_dataset(tmp_path / "missing.h5")
    from emdata.errors import ConfigError

    with pytest.raises(ConfigError, match="neither a dataset name"):
        open_dataset("Not A Name")
