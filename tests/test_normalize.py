"""normalize: the canonical layout, exact statistics and hashes, atomic and deterministic output."""

from __future__ import annotations

import hashlib
import json
import shutil
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from emdata.errors import FormatError, NotBuiltError
from emdata.core.digest import sha256_file
from emdata.h5.metadata import build_record, write_record
from emdata.stages.normalize.volume import normalize_dataset
from emdata.stages.fetch import fetch_dataset, verify_dataset


@pytest.fixture
def fetched(epfl_project):
    for key in ("epfl_hippocampus", "epfl_mito_train"):
        fetch_dataset(epfl_project, key)
    return epfl_project


def test_layout_and_attributes(fetched, epfl_replica) -> None:
    expected = epfl_replica.arrays["volumedata.tif"]
    path = normalize_dataset(fetched, "epfl_hippocampus")
    with h5py.File(path, "r") as f:
        raw = f["raw"]
        assert raw.shape == expected.shape == (21, 37, 53) and raw.dtype == np.uint8
        assert raw.chunks == (8, 16, 16) and raw.compression is None
        assert raw.attrs["axes"] == "zyx" and raw.attrs["unit"] == "nm"
        np.testing.assert_array_equal(raw.attrs["resolution"], [5, 5, 5])
        np.testing.assert_array_equal(raw.attrs["offset"], [0, 0, 0])
        np.testing.assert_allclose(raw.attrs["element_size_um"], [0.005] * 3)
        assert raw.attrs["array_sha256"] == hashlib.sha256(expected.tobytes()).hexdigest()
        stats = json.loads(raw.attrs["statistics"])
        assert stats["min"] == expected.min() and stats["max"] == expected.max()
        assert stats["mean"] == expected.mean() and stats["std"] == pytest.approx(expected.std(), rel=1e-12)
        assert stats["percentiles"]["p0.1"] == np.percentile(expected, 0.1)
        assert stats["percentiles"]["p99.9"] == np.percentile(expected, 99.9)
        assert f.attrs["dataset"] == "epfl_hippocampus" and f.attrs["format_version"] == 1
        assert json.loads(f.attrs["source_urls"])[0].endswith("%20ElectronMicroscopy_Hippocampus/volumedata.tif")
        assert "created" not in f.attrs  # no timestamps: identical inputs give identical bytes
        assert json.loads(f["provenance/native_metadata"][()])["tiff"]["volumedata.tif"]["pages"] == 21


def test_label_chunk_statistics(fetched, epfl_replica) -> None:
    labels = epfl_replica.arrays["training_groundtruth.tif"]
    with h5py.File(normalize_dataset(fetched, "epfl_mito_train"), "r") as f:
        counts = f["label_stats/mitochondria/chunk_foreground"][()]
        chunks = f["labels/mitochondria"].chunks
    assert counts.shape == tuple(-(-s // c) for s, c in zip(labels.shape, chunks))
    assert counts.sum() == np.count_nonzero(labels)
    assert counts[0, 1, 2] == np.count_nonzero(labels[0:8, 16:32, 32:48])


def test_output_is_bit_identical_on_rerun(fetched) -> None:
    first = sha256_file(normalize_dataset(fetched, "epfl_mito_train"))
    second = sha256_file(normalize_dataset(fetched, "epfl_mito_train"))
    assert first == second


@pytest.mark.parametrize("compression, filter_name", [("zstd", "zstd"), ("blosc-lz4", "blosc")])
def test_compressed_layouts_round_trip(make_project, server, epfl_replica, compression, filter_name) -> None:
    from emdata.testing.epfl import epfl_datasets

    cfg = make_project(epfl_datasets(epfl_replica.base_url(server.url)),
                       normalize={"chunks": [4, 8, 16], "compression": compression, "compression_level": 3})
    fetch_dataset(cfg, "epfl_hippocampus")
    path = normalize_dataset(cfg, "epfl_hippocampus")
    import hdf5plugin  # noqa: F401  (registers the filters for plain h5py reads)

    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["raw"][()], epfl_replica.arrays["volumedata.tif"])
    assert build_record(cfg, "epfl_hippocampus")["compression"] == filter_name


def test_failure_midway_keeps_the_previous_output(fetched, monkeypatch) -> None:
    path = normalize_dataset(fetched, "epfl_hippocampus")
    before = sha256_file(path)
    from emdata.formats.tiff import TiffStack

    original = TiffStack.read_box

    def failing_read(self, start, stop):
        if start[0] >= 8:
            raise FormatError("epfl_hippocampus", str(self.path), "simulated damage")
        return original(self, start, stop)

    monkeypatch.setattr(TiffStack, "read_box", failing_read)
    with pytest.raises(FormatError, match="simulated damage"):
        normalize_dataset(fetched, "epfl_hippocampus")
    assert sha256_file(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["epfl_hippocampus.h5"]


def test_a_failed_flush_to_disk_is_one_line_and_publishes_nothing(fetched, monkeypatch) -> None:
    """The HDF5 is flushed on a thread while its record is built; the flush's own error (EIO at
    write-back) must still stop the rename and name the output."""
    import errno

    from emdata.errors import OutputError
    from emdata.stages.normalize import publish

    path = normalize_dataset(fetched, "epfl_hippocampus")
    before = sha256_file(path), fetched.record_path("epfl_hippocampus").read_bytes()

    def failing_sync(tmp):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(publish, "sync_file", failing_sync)
    with pytest.raises(OutputError, match=r"epfl_hippocampus: .*epfl_hippocampus\.h5: cannot write it \(Input/output"):
        normalize_dataset(fetched, "epfl_hippocampus")
    assert (sha256_file(path), fetched.record_path("epfl_hippocampus").read_bytes()) == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["epfl_hippocampus.h5"]


def test_normalize_before_fetch_says_what_to_run(epfl_project) -> None:
    with pytest.raises(NotBuiltError, match="emdata fetch epfl_mito_test"):
        normalize_dataset(epfl_project, "epfl_mito_test")


def test_record_and_verify(fetched) -> None:
    normalize_dataset(fetched, "epfl_mito_train")
    record = json.loads(write_record(fetched, "epfl_mito_train").read_text())
    assert record["file_sha256"] == sha256_file(fetched.processed_path("epfl_mito_train"))
    assert record["shape"] == [17, 29, 43] and record["extent_nm"] == [85.0, 145.0, 215.0]
    assert set(record["labels"]) == {"mitochondria"}
    assert [what for what, _ in verify_dataset(fetched, "epfl_mito_train")] == [
        "file sha256", "/raw voxels sha256", "/labels/mitochondria voxels sha256"]


def test_verify_detects_a_changed_voxel(fetched) -> None:
    from emdata.errors import IntegrityError

    path = normalize_dataset(fetched, "epfl_mito_train")
    record_path = write_record(fetched, "epfl_mito_train")
    with h5py.File(path, "r+") as f:
        f["raw"][3, 4, 5] ^= 1
    record = json.loads(record_path.read_text())
    record["file_sha256"] = sha256_file(path)  # a consistent file hash: only the voxel hash can tell
    record_path.write_text(json.dumps(record))
    with pytest.raises(IntegrityError, match="voxel sha256"):
        verify_dataset(fetched, "epfl_mito_train")


@pytest.mark.skipif(shutil.which("h5ls") is None, reason="h5ls (Debian hdf5-tools) is not installed")
def test_plain_h5ls_reads_the_file(fetched) -> None:
    path = normalize_dataset(fetched, "epfl_mito_train")
    out = subprocess.run(["h5ls", "-r", str(path)], capture_output=True, text=True, check=True).stdout
    assert "/raw" in out and "{17, 29, 43}" in out and "/labels/mitochondria" in out
    attrs = subprocess.run(["h5dump", "-A", "-d", "/raw", str(path)], capture_output=True, text=True, check=True).stdout
    assert "resolution" in attrs and "element_size_um" in attrs and "offset" in attrs


def test_a_killed_run_leaves_a_temporary_that_the_next_run_removes(fetched) -> None:
    out = fetched.processed_path("epfl_mito_train")
    out.parent.mkdir(parents=True, exist_ok=True)
    stale = out.with_name(f".{out.name}.999999.tmp")
    stale.write_bytes(b"\0" * 4096)  # what `kill -9` mid-write leaves
    normalize_dataset(fetched, "epfl_mito_train")
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_a_second_run_on_the_same_dataset_says_who_holds_it(fetched) -> None:
    from emdata.core.lock import LockedError, dataset_lock

    with dataset_lock(fetched.lock_dir(), "epfl_mito_train", "normalize"):
        proc = subprocess.run([sys.executable, "-m", "emdata", "normalize", "epfl_mito_train"], cwd=fetched.root,
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == LockedError.exit_code
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pid {os.getpid()}" in lines[0] and "normalize since" in lines[0]
    normalize_dataset(fetched, "epfl_mito_train")  # the lock is free again
