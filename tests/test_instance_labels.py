"""uint64 instance labels end to end (issue 23): the hemibrain neuron labels of the EM crop, exact
instance statistics under a memory budget, verify, label-aware sampling and int64 torch tensors.

Against the loopback replica of the hemibrain bucket (EM and the v1.2 segmentation, both written
by tensorstore): the labels equal tensorstore's own read of the replica's segmentation for the
crop's box; a label layer on another grid is refused in one line naming both grids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import yaml

from emdata.access.sampling import GridPatches, RandomPatches
from emdata.access.volume import Volume
from emdata.core.stats import InstanceStats, StreamingStats, statistics_for
from emdata.errors import AccessError, FetchError, FormatError
from emdata.formats.precomputed import parse_info
from emdata.formats.raw import ArrayVolume
from emdata.params.config import load_config
from emdata.stages.fetch import fetch_dataset, plan_dataset, verify_dataset
from emdata.stages.normalize.volume import normalize_dataset
from emdata.stages.normalize.write import write_volume
from emdata.testing.precomputed import (FINE_OFFSET, NEURON_IDS, REPLICA, SEGMENTATION_LAYER, SEGMENTATION_PATH,
                                        RunningPrecomputed, precomputed_dataset)
from emdata.testing.volumes import coordinate_volume, write_canonical
from emdata.transport.retry import RetryPolicy

KEY = "hemibrain_em_crop"
START = (FINE_OFFSET[0] + 25, FINE_OFFSET[1] + 31, FINE_OFFSET[2] + 37)
CROP = (29, 37, 45)
STOP = tuple(a + c for a, c in zip(START, CROP))


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory):
    with REPLICA.start(tmp_path_factory.mktemp("replica")) as replica:
        yield replica


def project(root: Path, dataset: dict[str, Any], **normalize: Any):
    root.mkdir(parents=True, exist_ok=True)
    params = {"normalize": {"chunks": [8, 16, 16], **normalize}, "datasets": {KEY: dataset}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return load_config(root)


def labelled(running: RunningPrecomputed, layer: str = SEGMENTATION_LAYER, **kw: Any) -> dict[str, Any]:
    return precomputed_dataset(running.layer_url, scale=8, crop=CROP, seed=None, roi_start=START,
                               block=(16, 16, 32), labels={"neurons": layer}, **kw)


@pytest.fixture(scope="module")
def built(running, tmp_path_factory) -> Path:
    cfg = project(tmp_path_factory.mktemp("built"), labelled(running))
    fetch_dataset(cfg, KEY)
    return normalize_dataset(cfg, KEY)


# -- acceptance 1: /labels/neurons is the segmentation of the EM crop's box ------------------------


def test_neuron_labels_are_tensorstores_read_of_the_segmentation_on_the_raw_grid(running, built) -> None:
    want = running.replica.decoded("8.0x8.0x8.0", START, STOP, segmentation=True)
    assert want.dtype == np.uint64 and len(np.unique(want)) > 3 and want.max() > 2**53  # ids a float would round
    with h5py.File(built, "r") as f:
        raw, neurons = f["raw"], f["labels/neurons"]
        assert neurons.dtype == np.dtype("<u8") and neurons.shape == raw.shape == CROP
        for attr in ("resolution", "offset"):
            np.testing.assert_array_equal(neurons.attrs[attr], raw.attrs[attr])
        np.testing.assert_array_equal(raw.attrs["offset"], [8.0 * a for a in START])
        np.testing.assert_array_equal(neurons[()], want)
        stats = json.loads(neurons.attrs["statistics"])
    ids = np.unique(want[want != 0])
    assert stats["object_count"] == ids.size and stats["max"] == int(ids[-1])  # exact, above 2**53
    assert stats["background_fraction"] == stats["zero_fraction"] == np.mean(want == 0)


def test_the_record_gives_the_object_count_and_the_label_layer(running, built) -> None:
    cfg = load_config(built.parents[2])
    record = json.loads(cfg.record_path(KEY).read_text())
    stats = record["labels"]["neurons"]["statistics"]
    assert stats["object_count"] >= 3 and 0 < stats["background_fraction"] < 1
    source = json.loads((cfg.raw_dir(KEY) / "source.json").read_text())
    label = source["extra"]["labels"]["neurons"]
    assert label["layer"]["url"] == running.server.url + SEGMENTATION_PATH
    assert label["scale"]["encoding"] == "compressed_segmentation" and label["scale"]["sharding"]


def test_verify_rehashes_the_uint64_labels(built) -> None:
    cfg = load_config(built.parents[2])
    passed = dict(verify_dataset(cfg, KEY, raw=True))
    assert "/labels/neurons voxels sha256" in passed
    assert any(name.startswith("raw labels/neurons.zarr/") for name in passed)


def test_plan_lists_the_label_blocks_from_the_segmentation(running, tmp_path) -> None:
    cfg = project(tmp_path / "p", labelled(running))
    rows = plan_dataset(cfg, KEY)
    image = [r for r in rows if r.name.startswith("crop.zarr/")]
    labels = [r for r in rows if r.name.startswith("labels/neurons.zarr/")]
    assert image and len(labels) == len(image)
    assert all(SEGMENTATION_PATH in r.url and r.size > 0 for r in labels)
    assert sum(r.size for r in labels) == 8 * sum(r.size for r in image)  # uint64 ids beside uint8 EM
    assert not cfg.raw_dir(KEY).exists()


def test_a_failed_label_shard_keeps_the_finished_blocks_for_the_next_run(running, tmp_path) -> None:
    """EM and label blocks are one journalled copy: a failure on a segmentation shard loses nothing."""
    seg = parse_info(running.replica.segmentation_info, "t", "seg").scales[0]
    shard = sorted({seg.shard_of(c) for c in seg.chunks_in(START, STOP)})[-1]
    path = f"{SEGMENTATION_PATH}/8.0x8.0x8.0/{shard}"
    cfg = project(tmp_path / "p", labelled(running))
    running.server.fail(path, status=503, times=10**6)
    try:
        with pytest.raises(FetchError) as err:
            fetch_dataset(cfg, KEY, policy=RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02,
                                                        connect_timeout=2, read_timeout=5))
    finally:
        running.server.faults.fail.clear()
    assert "\n" not in str(err.value) and shard in str(err.value)
    partial = cfg.partial_dir(KEY)
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in partial.rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.name != ".zarray"}
    assert any("crop.zarr" in str(p) for p in kept), "no EM block was finished before the failure"
    fetch_dataset(cfg, KEY)
    raw = cfg.raw_dir(KEY)
    for p, stamp in kept.items():
        moved = raw / p.relative_to(partial)
        assert (moved.stat().st_ino, moved.stat().st_mtime_ns) == stamp, moved
    with h5py.File(normalize_dataset(cfg, KEY), "r") as f:
        np.testing.assert_array_equal(f["labels/neurons"][()],
                                      running.replica.decoded("8.0x8.0x8.0", START, STOP, segmentation=True))


# -- acceptance 2: a label layer on another grid is one line naming both grids ---------------------


def _other_layer(running: RunningPrecomputed, name: str, **scale0: Any) -> str:
    """A copy of the segmentation's info whose first scale differs (no voxels needed: refused before)."""
    info = json.loads(json.dumps(running.replica.segmentation_info))
    info["scales"] = [dict(info["scales"][0], **scale0)]
    folder = running.replica.root / "neuroglancer-janelia-flyem-hemibrain" / "other" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "info").write_text(json.dumps(info))
    return f"other/{name}"


@pytest.mark.parametrize("name, scale0, problem", [
    ("coarser", {"key": "8.0x8.0x16.0", "resolution": [8.0, 8.0, 16.0]}, "has no scale on the image's grid"),
    ("shifted", {"voxel_offset": [0, 0, STOP[0] - 5]}, "leaves label 'neurons'"),
    ("elsewhere", {"voxel_offset": [0, 0, 4000]}, "share no"),
])
def test_a_label_layer_on_another_grid_is_refused_in_one_line(running, tmp_path, name, scale0, problem) -> None:
    layer = _other_layer(running, name, **scale0)
    cfg = project(tmp_path / name, labelled(running, layer))
    with pytest.raises(FormatError) as err:
        fetch_dataset(cfg, KEY)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{KEY}: ") and problem in message, message
    assert f"{running.layer_url} scale 8.0x8.0x8.0" in message  # the image's grid ...
    assert f"/other/{name} " in message or f"/other/{name}/info" in message  # ... and the label's
    assert not cfg.raw_dir(KEY).exists()


def test_a_search_keeps_the_crop_inside_the_label_layer(running, tmp_path) -> None:
    dataset = precomputed_dataset(running.layer_url, scale=8, crop=(36, 44, 52), seed=0,
                                  labels={"neurons": SEGMENTATION_LAYER})
    cfg = project(tmp_path / "p", dataset)
    fetch_dataset(cfg, KEY)
    extra = json.loads((cfg.raw_dir(KEY) / "source.json").read_text())["extra"]
    start, stop = extra["roi"]["start_zyx"], extra["roi"]["stop_zyx"]
    seg = running.replica.segmentation
    assert seg is not None and all(0 <= a and b <= n for a, b, n in zip(start, stop, seg.shape))


# -- statistics: exact, bounded, no 2**64-bin histogram ------------------------------------------


def test_instance_statistics_are_exact_and_merge_like_one_pass() -> None:
    rng = np.random.default_rng(4)
    ids = np.array([0, 3, 2**53 + 1, 2**63 + 7, 5], np.uint64)
    data = ids[rng.integers(0, ids.size, (7, 9, 11))]
    whole = InstanceStats(np.dtype(np.uint64))
    whole.update(data)
    parts = InstanceStats(np.dtype(np.uint64))
    for k in range(data.shape[0]):  # as the distributed path merges partials (JSON-safe)
        parts.merge(json.loads(json.dumps(parts.partial(data[k]))))
    got = whole.result()
    assert got == parts.result()
    present = np.unique(data[data != 0])
    assert got["object_count"] == present.size and got["max"] == int(present[-1]) and got["min"] == 0
    assert got["zero_fraction"] == np.mean(data == 0) and got["count"] == data.size
    assert isinstance(statistics_for(np.dtype("<u8"), label=True), InstanceStats)
    assert isinstance(statistics_for(np.dtype("<u8")), StreamingStats)  # an image is not ids
    assert isinstance(statistics_for(np.dtype(np.uint8), label=True), StreamingStats)  # class masks keep theirs


def test_uint64_labels_stream_in_tiles_under_the_budget(tmp_path) -> None:
    shape = (23, 70, 90)
    ids = np.array([0, 11, 2**40 + 3, 2**60 + 9], np.uint64)
    labels = ids[(coordinate_volume(shape, np.uint16) // 7) % ids.size]
    with h5py.File(tmp_path / "t.h5", "w") as f:
        result = write_volume(f, "labels/x", ArrayVolume(labels, "t"), chunks=(4, 16, 16), compression="none",
                              level=0, attrs={}, label=True, desc="x", budget=1 << 20)
        assert result["tiles"] > 4  # 2.9 MB of ids in tiles of a 1 MiB budget
        np.testing.assert_array_equal(f["labels/x"][()], labels)
    stats = result["statistics"]
    assert stats["object_count"] == 3 and stats["max"] == 2**60 + 9
    assert result["foreground"].sum() == np.count_nonzero(labels)


# -- acceptance 3: label-aware sampling and int64 tensors --------------------------------------


def test_min_foreground_patches_of_the_crop_are_int64_tensors_with_the_body_ids(built) -> None:
    torch = pytest.importorskip("torch")
    from emdata.access.torch import PatchDataset

    volume = Volume(built)
    labels = volume.labels["neurons"][...]
    counts = volume.labels["neurons"].chunk_foreground()
    assert counts is not None and counts.sum() == np.count_nonzero(labels)  # non-zero is foreground
    sampler = RandomPatches(volume, (8, 12, 12), seed=2, length=6, label="neurons", min_foreground=0.6)
    dataset = PatchDataset(sampler)
    for i in range(len(dataset)):
        item = dataset[i]
        z, y, x = item["origin"].tolist()
        want = labels[z:z + 8, y:y + 12, x:x + 12]
        assert item["label"].dtype == torch.int64 and item["label"].shape == (1, 8, 12, 12)
        assert np.count_nonzero(want) >= 0.6 * want.size
        np.testing.assert_array_equal(item["label"][0].numpy().view(np.uint64), want)
        assert set(np.unique(want).tolist()) <= {0, *NEURON_IDS}
    assert GridPatches(volume, (8, 12, 12), label="neurons")[0].label.dtype == np.uint64


def test_ids_above_int64_are_refused_by_the_torch_adapter_in_one_line(tmp_path) -> None:
    pytest.importorskip("torch")
    from emdata.access.torch import PatchDataset

    shape = (6, 10, 12)
    label = np.full(shape, 2**63 + 5, np.uint64)
    path = write_canonical(tmp_path / "big.h5", coordinate_volume(shape, np.uint8), labels={"cells": label})
    dataset = PatchDataset(GridPatches(Volume(path), (6, 10, 12), label="cells"))
    with pytest.raises(AccessError) as err:
        dataset[0]
    assert "\n" not in str(err.value) and str(2**63 + 5) in str(err.value) and "cells" in str(err.value)
