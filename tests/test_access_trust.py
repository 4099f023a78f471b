"""Issue 20, access layer: one file version per sample, honest tiled-inference resume, epochs that
reach persistent DataLoader workers, one-line errors for files that are not emdata's, and a
bad ``--scheduler`` address that neither hangs nor prints a traceback."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from emdata import GridPatches, RandomPatches, open_dataset
from emdata.access.volume import Volume
from emdata.errors import AccessError, ConfigError, EmdataError
from emdata.testing.volumes import coordinate_volume, write_canonical

SHAPE = (13, 27, 35)


# -- item 3: a sample's image and label come from one version of the file -----------------------

def _version(v: int) -> tuple[np.ndarray, np.ndarray]:
    """Version ``v``: every raw voxel is ``1000 * v + (coordinate % 1000)``, every label voxel ``v``."""
    raw = (coordinate_volume(SHAPE).astype(np.int64) % 1000 + 1000 * v).astype(np.uint16)
    return raw, np.full(SHAPE, v, np.uint8)


def _write_version(path: Path, v: int) -> Path:
    """Version ``v`` of the file, renamed over ``path`` as normalize publishes a new file."""
    raw, label = _version(v)
    tmp = write_canonical(path.with_name(f".v{v}.{path.name}"), raw, labels={"mito": label}, chunks=(4, 8, 8))
    os.replace(tmp, path)
    return path


def _versions(raw: np.ndarray, label: np.ndarray) -> tuple[set[int], set[int]]:
    return set(np.unique(raw // 1000).tolist()), set(np.unique(label).tolist())


def _check_pairs(patches) -> list[int]:
    """Each patch's image and label come from one version; the versions seen, in order."""
    seen = []
    for p in patches:
        raw_v, label_v = _versions(p.raw, p.label)
        assert raw_v == label_v and len(raw_v) == 1, f"patch at {p.origin}: image of {raw_v}, label of {label_v}"
        seen.append(raw_v.pop())
    return seen


def test_label_sampler_keeps_one_version_when_the_file_is_replaced(tmp_path) -> None:
    """min_foreground reads the label (origin) before the image: a replacement in between must not
    pair the old label with the new image."""
    path = _write_version(tmp_path / "v.h5", 1)
    sampler = RandomPatches(open_dataset(path), (3, 5, 7), seed=3, length=6, label="mito", min_foreground=0.5)
    sampler.origin(0)  # the label is read first
    _write_version(path, 2)
    assert _check_pairs(sampler[i] for i in range(6)) == [1] * 6
    # A new Volume sees the new version, again consistently.
    fresh = RandomPatches(open_dataset(path), (3, 5, 7), seed=3, length=6, label="mito", min_foreground=0.5)
    assert _check_pairs(fresh[i] for i in range(6)) == [2] * 6


def test_labels_made_after_a_read_share_the_open_file(tmp_path) -> None:
    """The image was read, the file replaced, then a sampler with a label made from the same Volume."""
    path = _write_version(tmp_path / "v.h5", 1)
    vol = open_dataset(path)
    assert int(vol[0, 0, 0]) // 1000 == 1
    _write_version(path, 2)
    grid = GridPatches(vol, (5, 9, 11), overlap=(1, 2, 3), label="mito")
    assert _check_pairs(grid) == [1] * len(grid)
    assert set(np.unique(vol.labels["mito"][:, :, :]).tolist()) == {1}


def test_a_pickled_sampler_keeps_one_version_in_the_worker(tmp_path) -> None:
    """As in a DataLoader worker: the sampler arrives without a handle and opens one file for both."""
    path = _write_version(tmp_path / "v.h5", 1)
    sampler = RandomPatches(open_dataset(path), (3, 5, 7), seed=1, length=4, label="mito", min_foreground=0.5)
    worker = pickle.loads(pickle.dumps(sampler))
    worker.origin(1)  # the worker's first read: the label
    _write_version(path, 2)
    assert _check_pairs(worker[i] for i in range(4)) == [1] * 4


def test_a_volume_read_first_after_a_replacement_asks_to_be_reopened(tmp_path) -> None:
    """Created from version 1, first read after version 2 (same shape) replaced it: its geometry and
    statistics describe version 1, so reading version 2 through it is refused, not served."""
    path = _write_version(tmp_path / "v.h5", 1)
    vol = open_dataset(path)
    _write_version(path, 2)
    with pytest.raises(AccessError, match="replaced by a different file"):
        vol[0:2, 0:2, 0:2]
    assert int(open_dataset(path)[0, 0, 0]) // 1000 == 2


# -- item 13: files that are not emdata's ---------------------------------------------------------

def _h5(path: Path, build) -> Path:
    with h5py.File(path, "w") as f:
        build(f)
    return path


def _raw(resolution=None, offset=None, shape=(3, 4, 5), dtype=np.uint8):
    def build(f) -> None:
        f["raw"] = np.zeros(shape, dtype)
        if resolution is not None:
            f["raw"].attrs["resolution"] = resolution
        if offset is not None:
            f["raw"].attrs["offset"] = offset
    return build


BAD_FILES = {
    "not-hdf5": (lambda p: p.write_bytes(b"this is not an HDF5 file\n"), "not a readable HDF5 file"),
    "empty": (lambda p: p.write_bytes(b""), "not a readable HDF5 file"),
    "no-raw": (lambda p: _h5(p, lambda f: f.create_dataset("data", data=np.zeros((2, 3, 4)))), "/raw: no such array"),
    "raw-is-group": (lambda p: _h5(p, lambda f: f.create_group("raw")), "/raw: is a group"),
    "labels-is-array": (lambda p: _h5(p, lambda f: (_raw((4, 4, 4))(f), f.create_dataset("labels", data=[1]))),
                        "/labels: is an array"),
    "zero-resolution": (lambda p: _h5(p, _raw((0.0, 4.0, 4.0))), "resolution [0.0, 4.0, 4.0] nm is not positive"),
    "nan-resolution": (lambda p: _h5(p, _raw((4.0, np.nan, 4.0))), "resolution [4.0, nan, 4.0] nm is not positive"),
    "negative-resolution": (lambda p: _h5(p, _raw((4.0, 4.0, -4.0))), "is not positive and finite"),
    "text-resolution": (lambda p: _h5(p, _raw("4 nm")), "resolution '4 nm' is not 3 numbers"),
    "two-resolutions-for-zyx": (lambda p: _h5(p, _raw((4.0, 4.0))), "is not 3 numbers"),
    "inf-offset": (lambda p: _h5(p, _raw((4.0, 4.0, 4.0), (0.0, np.inf, 0.0))), "offset [0.0, inf, 0.0] nm is not finite"),
    "compound-dtype": (lambda p: _h5(p, _raw((4.0, 4.0, 4.0), dtype=[("a", "<i4")])), "a Volume reads numbers"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_file_that_is_not_emdatas_is_one_line_naming_it(tmp_path, case) -> None:
    make, words = BAD_FILES[case]
    path = tmp_path / f"{case}.h5"
    make(path)
    with pytest.raises(EmdataError) as info:
        open_dataset(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and words in message, message


@pytest.mark.parametrize("given", [(0, 4, 4), (4, float("nan"), 4), (-1, 4, 4), (4, 4)])
def test_a_given_resolution_is_checked_too(tmp_path, given) -> None:
    path = _h5(tmp_path / "nores.h5", _raw())
    with pytest.raises(ConfigError, match="given resolution") as info:
        Volume(path, resolution=given)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_two_values_are_a_pixel_size_for_images_and_time_series(tmp_path) -> None:
    path = _h5(tmp_path / "t.h5", lambda f: (_raw((6.0, 7.0))(f), f["raw"].attrs.__setitem__("axes", "tyx")))
    assert open_dataset(path).resolution.tolist() == [1.0, 6.0, 7.0]
    plane = _h5(tmp_path / "p.h5", _raw((6.0, 7.0), shape=(4, 5)))
    assert open_dataset(plane).resolution.tolist() == [1.0, 6.0, 7.0]


# -- item 10: a scheduler address Dask cannot use --------------------------------------------------

def test_a_bad_scheduler_address_is_one_line_without_a_hang(make_project, server, epfl_replica) -> None:
    """The half-built Dask client is closed: no "Exception ignored" traceback from its __del__,
    which also waited 40 s (twice the connect timeout) before the process could exit."""
    pytest.importorskip("distributed")
    from emdata.stages.fetch import fetch_dataset
    from emdata.testing.epfl import epfl_datasets

    cfg = make_project(epfl_datasets(epfl_replica.base_url(server.url)))
    fetch_dataset(cfg, "epfl_hippocampus")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMDATA_")}
    # The bound is for a hang (the old __del__ waited 40 s), not a speed requirement.
    proc = subprocess.run([sys.executable, "-m", "emdata", "-C", str(cfg.root), "normalize", "epfl_hippocampus",
                           "--scheduler", "not a url"], env=env, capture_output=True, text=True, timeout=20)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 11, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("emdata: error: epfl_hippocampus: cannot reach the Dask "
                                                   "scheduler at 'not a url'"), lines
    assert not cfg.processed_path("epfl_hippocampus").exists()


# -- item 5: set_epoch reaches persistent DataLoader workers ---------------------------------------

@pytest.mark.parametrize("context,workers", [("fork", 2), ("spawn", 1)])
def test_set_epoch_reaches_persistent_workers(tmp_path, context, workers) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from emdata.access.torch import PatchDataset

    path = write_canonical(tmp_path / "e.h5", coordinate_volume((11, 23, 29)), chunks=(4, 8, 8))
    sampler = RandomPatches(open_dataset(path), (3, 5, 7), seed=7, length=6)
    dataset = PatchDataset(sampler)
    loader = DataLoader(dataset, batch_size=2, num_workers=workers, persistent_workers=True,
                        multiprocessing_context=context)
    seen = {}
    for epoch in (0, 1, 2):
        dataset.set_epoch(epoch)
        origins = torch.cat([batch["origin"] for batch in loader]).tolist()
        seen[epoch] = origins
        assert origins == [list(sampler.origin(i, epoch)) for i in range(6)], f"epoch {epoch}"
    assert seen[0] != seen[1] != seen[2]
    del loader


# -- item 4: run_tiled resumes only with the same model -------------------------------------------

TILE_SHAPE, TILE_BLOCK, TILE_HALO, TILE_BLOCKS = (13, 21, 27), (8, 16, 16), (1, 2, 2), 8


class _Stop(Exception):
    pass


def _torch_model(scale: float, shift: float):
    """A torch module whose output depends on a plain attribute and on a non-persistent buffer,
    neither of which is in its ``state_dict()`` (the class is the same for every value)."""
    pytest.importorskip("torch")
    from _access_trust_models import Affine

    return Affine(scale, shift).eval()


@pytest.mark.parametrize("a,b", [((2.0, 0.0), (3.0, 0.0)), ((2.0, 0.0), (2.0, 5.0))], ids=["attribute", "buffer"])
def test_run_tiled_does_not_resume_with_a_model_differing_outside_its_state_dict(tmp_path, monkeypatch, a, b) -> None:
    from emdata.access import tiling

    vol = Volume(write_canonical(tmp_path / "v.h5", coordinate_volume(TILE_SHAPE, np.uint8), chunks=(8, 16, 16)))
    model_a, model_b = _torch_model(*a), _torch_model(*b)
    assert model_a.state_dict().keys() == model_b.state_dict().keys()
    assert all((model_a.state_dict()[k] == model_b.state_dict()[k]).all() for k in model_a.state_dict())
    calls = {"n": 0, "stop": None}
    predict = tiling.predict_block

    def counted(volume, fn, block, pad):
        if calls["stop"] is not None and calls["n"] >= calls["stop"]:
            raise _Stop
        calls["n"] += 1
        return predict(volume, fn, block, pad)

    monkeypatch.setattr(tiling, "predict_block", counted)
    out = tmp_path / "pred.h5"

    def run(model, stop=None) -> int:
        calls["n"], calls["stop"] = 0, stop
        tiling.run_tiled(vol, model, out, block_shape=TILE_BLOCK, halo=TILE_HALO)
        return calls["n"]

    with pytest.raises(_Stop):
        run(model_a, stop=5)
    assert run(model_b) == TILE_BLOCKS  # nothing of model A reused
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["prediction"][()], vol[()].astype(np.float32) * b[0] + b[1])
    with pytest.raises(_Stop):
        run(model_a, stop=5)
    assert run(_torch_model(*a)) == TILE_BLOCKS - 5  # an equal model (a new object) resumes


def test_a_label_sampler_on_a_remote_volume_reads_the_statistics_from_the_remote(tmp_path) -> None:
    """Per-chunk label statistics come through the storage: a remote volume reads their extent
    by range, so min_foreground draws the same patches as on the local file."""
    import fsspec

    from emdata.h5 import chunk_index
    from emdata.access.remote import RangeReader, RemoteIndex, RemoteStorage, Transfer

    raw, _ = _version(1)
    label = np.zeros(SHAPE, np.uint8)
    label[2:9, 4:20, 6:30] = 1  # foreground in one corner: the bound rules most origins out
    h5 = write_canonical(tmp_path / "r.h5", raw, labels={"mito": label}, chunks=(4, 8, 8))
    chunk_index.write(h5, tmp_path / "r.chunks", file_name="r.h5", file_sha256="0" * 64)
    fs, transfer = fsspec.filesystem("file"), Transfer()
    readers = [RangeReader(fs, str(p), p.stat().st_size, f"file://{p}", "r", transfer)
               for p in (h5, tmp_path / "r.chunks")]
    vol = Volume(RemoteStorage(RemoteIndex(readers[1]), readers[0]), name="r")
    assert vol.path is None and vol.labels["mito"][2, 4, 6] == 1 and vol.resolution.tolist() == [5.0, 5.0, 5.0]
    np.testing.assert_array_equal(vol.labels["mito"].chunk_foreground(), Volume(h5).labels["mito"].chunk_foreground())
    remote = RandomPatches(vol, (3, 5, 7), label="mito", min_foreground=0.5, seed=4, length=6)
    local = RandomPatches(Volume(h5), (3, 5, 7), label="mito", min_foreground=0.5, seed=4, length=6)
    for a, b in zip(remote, local):
        assert a.origin == b.origin and np.count_nonzero(a.label) >= 0.5 * a.label.size
        np.testing.assert_array_equal(a.raw, b.raw)
    with pytest.raises(ConfigError, match="no 13x27x35 patch can have") as info:  # 22% of the volume is mito
        RandomPatches(vol, SHAPE, label="mito", min_foreground=0.5)
    assert "\n" not in str(info.value)
