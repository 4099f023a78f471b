"""The chunk-offset index normalize writes, and the local fast path that uses it at 1 TB-class sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from emdata.access.volume import Volume
from emdata.h5.chunk_index import ENTRY, ChunkIndex, build, local_table, write
from emdata.h5 import hdf5
from emdata.stages.normalize.volume import normalize_dataset
from emdata.stages.fetch import fetch_dataset
from emdata.testing.epfl import epfl_datasets
from emdata.testing.volumes import coordinate_volume, write_canonical


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_index_lists_every_chunk_where_hdf5_has_it(make_project, server, epfl_replica, compression) -> None:
    cfg = make_project(epfl_datasets(epfl_replica.base_url(server.url)),
                       normalize={"chunks": [8, 16, 16], "compression": compression})
    fetch_dataset(cfg, "epfl_mito_train")
    h5 = normalize_dataset(cfg, "epfl_mito_train")
    path = cfg.record_path("epfl_mito_train").with_suffix(".chunks")
    record = json.loads(cfg.record_path("epfl_mito_train").read_text())
    index = ChunkIndex.open(path)
    assert index.file == {"name": "epfl_mito_train.h5", "size": h5.stat().st_size, "sha256": record["file_sha256"]}
    assert set(index.arrays) == {"raw", "labels/mitochondria"}
    assert set(index.contiguous) == {"label_stats/mitochondria/chunk_foreground"}
    assert path.read_bytes() == build(h5, file_name=h5.name, file_sha256=record["file_sha256"])  # deterministic
    blob = h5.read_bytes()
    with h5py.File(h5, "r") as f:
        for name, a in index.arrays.items():
            dset = f[name]
            assert (a.shape, a.dtype, a.chunks) == (dset.shape, dset.dtype, dset.chunks)
            assert a.attrs["array_sha256"] == dset.attrs["array_sha256"]
            assert a.compression == compression
            table = index.table(name)
            assert table.size == int(np.prod(a.grid)) == dset.id.get_num_chunks()
            for flat, row in enumerate(table):
                k = np.unravel_index(flat, a.grid)
                mask, stored = dset.id.read_direct_chunk(tuple(int(i) * c for i, c in zip(k, a.chunks)))
                assert blob[int(row["offset"]):int(row["offset"]) + int(row["size"])] == stored
                assert int(row["mask"]) == mask
        extent = index.contiguous["label_stats/mitochondria/chunk_foreground"]
        counts = np.frombuffer(blob[extent["offset"]:extent["offset"] + extent["size"]], extent["dtype"])
        np.testing.assert_array_equal(counts.reshape(extent["shape"]),
                                      f["label_stats/mitochondria/chunk_foreground"][()])


def test_the_local_fast_path_uses_a_matching_index_only(make_project, server, epfl_replica, tmp_path) -> None:
    cfg = make_project(epfl_datasets(epfl_replica.base_url(server.url)), normalize={"chunks": [8, 16, 16]})
    for key in ("epfl_hippocampus", "epfl_mito_test"):
        fetch_dataset(cfg, key)
        normalize_dataset(cfg, key)
    h5 = cfg.processed_path("epfl_hippocampus")
    with h5py.File(h5, "r") as f:
        assert local_table(h5, "raw", f["raw"]) is not None  # found in the repository layout
        other = cfg.record_path("epfl_mito_test").with_suffix(".chunks")
        assert local_table(tmp_path / "x.h5", "raw", f["raw"], explicit=other) is None
        stale = tmp_path / "stale.chunks"  # right size and sha256 attribute, wrong offsets
        data = bytearray(cfg.record_path("epfl_hippocampus").with_suffix(".chunks").read_bytes())
        index = ChunkIndex.open(cfg.record_path("epfl_hippocampus").with_suffix(".chunks"))
        start = index.arrays["raw"].table_start
        data[start:start + 8] = (int.from_bytes(data[start:start + 8], "little") + 64).to_bytes(8, "little")
        stale.write_bytes(bytes(data))
        assert local_table(Path(h5), "raw", f["raw"], explicit=stale) is not None  # the repository's is found first
        moved = tmp_path / "moved.h5"
        moved.write_bytes(h5.read_bytes())
        assert local_table(moved, "raw", f["raw"], explicit=stale) is None  # the spot check rejects it
    vol = Volume(h5)
    handle = vol.storage.handle(vol.array)
    assert handle.chunkmap is not None
    np.testing.assert_array_equal(vol[:], epfl_replica.arrays["volumedata.tif"])


def _sparse_file(path: Path, shape: tuple[int, int, int], chunks: tuple[int, int, int]) -> Path:
    """A chunked uint8 dataset whose chunks are all allocated but never written (a sparse file)."""
    with h5py.File(path, "w") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk(chunks)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        dcpl.set_fill_value(np.array(0, np.uint8))
        h5py.h5d.create(f.id, b"raw", h5py.h5t.STD_U8LE, h5py.h5s.create_simple(shape), dcpl=dcpl)
        f["raw"].attrs.update(hdf5.spatial_attrs((8.0, 8.0, 8.0), (0.0, 0.0, 0.0)))
        f["raw"].attrs["array_sha256"] = "0" * 64
        f.attrs["params"] = json.dumps({"normalize": {"compression": "none", "compression_level": 0}})
    return path


OPEN_AND_READ = """
import json, resource, sys
import numpy as np
from emdata.access.volume import Volume
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()
before = rss()
vol = Volume(sys.argv[1], index=sys.argv[2] if len(sys.argv) > 2 else None)
box = vol.read((1000, 2000, 3000), (64, 64, 64))
vol.read((4000, 100, 4000), (70, 70, 70))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"rss_growth": rss() - before, "peak": peak, "base": before,
                  "fast": vol.storage.handle(vol.array).chunkmap is not None, "zeros": int(np.count_nonzero(box)) == 0}))
"""


def test_a_large_sparse_file_opens_without_walking_its_chunks(tmp_path) -> None:
    """4096^3 uint8 (64 GiB apparent, 262,144 chunks of 64^3): open + two reads through the index, < 200 MB."""
    h5 = _sparse_file(tmp_path / "big.h5", (4096, 4096, 4096), (64, 64, 64))
    index = tmp_path / "elsewhere" / "big.chunks"  # not beside the file: only found when passed
    write(h5, index, file_name=h5.name, file_sha256="not computed for a sparse test file")
    assert index.stat().st_size < 16 + 8192 + 262_144 * ENTRY.itemsize
    results = {}
    for name, args in (("index", [str(h5), str(index)]), ("no index", [str(h5)])):
        out = subprocess.run([sys.executable, "-c", OPEN_AND_READ, *args], capture_output=True, text=True,
                             check=True, timeout=120).stdout
        results[name] = json.loads(out)
    assert results["index"]["fast"] and not results["no index"]["fast"]  # without one: h5py, not a chunk walk
    for r in results.values():
        assert r["zeros"] and r["rss_growth"] < 200 << 20, results


def test_an_index_replaced_after_opening_is_not_read_half_old_half_new(tmp_path) -> None:
    """normalize renames a new index over the old: an index opened before keeps reading its own tables."""
    from emdata.h5.chunk_index import ChunkIndex

    first = write_canonical(tmp_path / "a.h5", coordinate_volume((13, 21, 27), np.uint16), chunks=(5, 7, 9))
    second = write_canonical(tmp_path / "b.h5", coordinate_volume((13, 21, 27), np.uint16), chunks=(8, 16, 16))
    index = tmp_path / "v.chunks"
    write(first, index, file_name="v.h5", file_sha256="-")
    opened = ChunkIndex.open(index)  # the header is read; no table yet
    write(second, tmp_path / "new.chunks", file_name="v.h5", file_sha256="-")
    os.replace(tmp_path / "new.chunks", index)
    got = opened.table("raw")
    with h5py.File(first, "r") as f:
        dset = f["raw"]
        for flat in (0, got.size // 2, got.size - 1):
            k = np.unravel_index(flat, opened.arrays["raw"].grid)
            info = dset.id.get_chunk_info_by_coord(tuple(int(i) * c for i, c in zip(k, (5, 7, 9))))
            assert (int(got[flat]["offset"]), int(got[flat]["size"])) == (info.byte_offset, info.size)


def test_a_table_that_misplaces_the_first_or_last_chunk_is_not_used(tmp_path) -> None:
    """Checked against HDF5's own index of the open file, unallocated entries included (a table of zeros
    used to pass: the check skipped entries of size 0)."""
    from emdata.h5.chunk_index import ChunkIndex, _spot_check

    h5 = write_canonical(tmp_path / "v.h5", coordinate_volume((13, 21, 27), np.uint16), chunks=(5, 7, 9))
    index = tmp_path / "v.chunks"
    write(h5, index, file_name="v.h5", file_sha256="-")
    a = ChunkIndex.open(index).arrays["raw"]
    good = np.array(ChunkIndex.open(index).table("raw"))
    with h5py.File(h5, "r") as f:
        assert _spot_check(f["raw"], a, good)
        assert not _spot_check(f["raw"], a, np.zeros_like(good))
        moved = good.copy()
        moved[-1]["offset"] += 8
        assert not _spot_check(f["raw"], a, moved)
