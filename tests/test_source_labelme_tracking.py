"""Organoid tracking (labelme) specifics; the shared contract runs in test_contract.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from emdata.params.config import load_config
from emdata.sources.dataset import resolve_entry
from emdata.errors import FormatError, IntegrityError
from emdata.testing.labelme_tracking import REPLICA, organoid_dataset
from tests.conftest import REPO


@pytest.fixture
def organoids(tmp_path: Path):
    with REPLICA.start(tmp_path / "replica") as running:
        yield running


def _project(root: Path, datasets: dict, **normalize) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    params = {"normalize": {"chunks": [8, 16, 16], "image_chunks": [16, 16], **normalize}, "datasets": datasets}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emdata", *args], cwd=root, capture_output=True, text=True,
                          timeout=120)


def test_real_params_record_the_licence_and_a_local_path() -> None:
    cfg = load_config(REPO)
    ds = resolve_entry(cfg.optional, "organoid_tracking", cfg)
    assert ds.license == "free for non-commercial research use"
    assert Path(ds.source.path).is_absolute() and ds.source.subset == "Tracking"


def test_a_well_is_a_time_series_with_24_hour_spacing_boxes_and_masks(organoids, tmp_path) -> None:
    from emdata.stages.normalize.volume import normalize_dataset
    from emdata.stages.fetch import fetch_dataset

    root = _project(tmp_path / "p", {"org": organoid_dataset(organoids.replica.folder, "Tracking")})
    cfg = load_config(root)
    fetch_dataset(cfg, "org")
    with h5py.File(normalize_dataset(cfg, "org")) as f:
        raw = f["images/W_E4_12/raw"]
        assert raw.shape == (3, 37, 53) and raw.attrs["axes"] == "tyx"
        assert raw.attrs["time_spacing"] == 24.0 and raw.attrs["time_unit"] == "h"
        assert list(raw.attrs["t"]) == [1, 2, 3]
        frames = f["images/W_E4_12/frames"][()]
        assert list(frames["height"]) == [37, 35, 37] and list(frames["boxes"]) == [3, 3, 3]
        assert not raw[1, 35:].any()  # the smaller frame is padded with 0 at the bottom
        masks = f["images/W_E4_12/labels/organoids"]
        boxes = f["images/W_E4_12/annotations/boxes"][()]
        for b in boxes:  # every box's own pixels carry its identity + 1 unless a smaller box covers them
            region = masks[int(b["t"]) - 1, int(np.floor(b["y0"])):int(np.ceil(b["y1"])),
                           int(np.floor(b["x0"])):int(np.ceil(b["x1"]))]
            assert (region == b["identity"] + 1).any()
        assert set(np.unique(masks[()])) == {0, 1, 2, 3}
        assert f["images/W_E4_12/label_stats/organoids/chunk_foreground"][()].sum() == np.count_nonzero(masks[()])
        row = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in zip(f["table"].dtype.names, f["table"][0])}
        assert row["image"] == "W_E4_12" and row["padded"] and row["identities"] == 3 and row["boxes"] == 9
    record = json.loads(cfg.record_path("org").read_text())
    assert record["license"] == "free for non-commercial research use"
    assert record["native"]["wells"]["W_E4_12"]["imageData"] == ["base64"]
    assert record["native"]["wells"]["W_F10_3"]["labelme_versions"] == ["4.5.7"]


def _edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


BAD_LABELME = {
    "not a rectangle": (lambda d: d["shapes"][0].update(shape_type="polygon"), "is a 'polygon', not a rectangle"),
    "outside": (lambda d: d["shapes"][1].update(points=[[1, 1], [60, 9]]), "lies outside the 53 x 35 image"),
    "duplicate": (lambda d: d["shapes"][2].update(label="0"), "identity 0 appears twice in this frame"),
    "version": (lambda d: d.update(version="5.0.1"), "labelme version '5.0.1' is not one this reader knows"),
    "image data": (lambda d: d.update(imageData="not base64!"), "imageData is neither base64 nor null"),
    "size": (lambda d: d.update(imageHeight=99), "says the image is 53 x 99, Proj_2.tif is 53 x 35"),
    "label": (lambda d: d["shapes"][0].update(label="organoid"), "the label must be the organoid's identity"),
}


@pytest.mark.parametrize("name", sorted(BAD_LABELME))
def test_a_bad_labelme_file_is_one_line_naming_it_and_the_last_import_stays(organoids, tmp_path, name) -> None:
    root = _project(tmp_path / "p", {"org": organoid_dataset(organoids.replica.folder, "Tracking")})
    assert _cli(root, "fetch", "org").returncode == 0
    raw = root / "data" / "raw" / "org"
    before = {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()}
    change, message = BAD_LABELME[name]
    bad = organoids.replica.folder / "Tracking" / "W_E4_12" / "Proj_2.json"
    _edit_json(bad, change)
    proc = _cli(root, "fetch", "org")
    assert proc.returncode == 6, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "org: " in lines[0] and "W_E4_12/Proj_2.json" in lines[0] and message in lines[0]
    assert {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()} == before


def test_invalid_json_and_a_missing_tif_are_one_line_each(organoids, tmp_path) -> None:
    root = _project(tmp_path / "p", {"org": organoid_dataset(organoids.replica.folder, "Tracking")})
    well = organoids.replica.folder / "Tracking" / "W_F10_3"
    (well / "Proj_2.json").write_text('{"version": "4.5.6", "shapes": [')
    proc = _cli(root, "fetch", "org")
    assert proc.returncode == 6 and len(proc.stderr.strip().splitlines()) == 1
    assert "W_F10_3/Proj_2.json: is not valid JSON" in proc.stderr
    (well / "Proj_2.json").unlink()
    (well / "Proj_1.tif").unlink()
    proc = _cli(root, "fetch", "org")
    assert proc.returncode == 6 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "W_F10_3/Proj_1.json: has no image beside it (W_F10_3/Proj_1.tif is missing)" in proc.stderr
    assert not (root / "data" / "raw" / "org").exists()


def test_a_zip_and_the_folder_import_the_same_files(organoids, tmp_path) -> None:
    from emdata.stages.fetch import fetch_dataset

    root = _project(tmp_path / "p", {"a": organoid_dataset(organoids.replica.folder, "Tracking"),
                                      "b": organoid_dataset(organoids.replica.zip, "Tracking")})
    cfg = load_config(root)
    a, b = fetch_dataset(cfg, "a").raw_dir, fetch_dataset(cfg, "b").raw_dir
    ra, rb = (json.loads((r / "source.json").read_text()) for r in (a, b))
    assert {k: (v["size"], v["sha256"]) for k, v in ra["files"].items()} == \
        {k: (v["size"], v["sha256"]) for k, v in rb["files"].items()}
    assert sorted(ra["files"]) == ["W_E4_12/Proj_1.json", "W_E4_12/Proj_1.tif", "W_E4_12/Proj_2.json",
                                   "W_E4_12/Proj_2.tif", "W_E4_12/Proj_3.json", "W_E4_12/Proj_3.tif",
                                   "W_F10_3/Proj_1.json", "W_F10_3/Proj_1.tif", "W_F10_3/Proj_2.json",
                                   "W_F10_3/Proj_2.tif"]
    assert ra["extra"]["skipped"][0]["name"] == "Tracking/README.txt"
    assert rb["extra"]["sources"][0]["what"] == "zip archive"


def test_unsafe_sources_are_refused(organoids, tmp_path) -> None:
    from emdata.stages.fetch import fetch_dataset

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("Organoid/Tracking/W_A1_1/Proj_1.json", "{}")
        zf.writestr("../outside.txt", "x")
    root = _project(tmp_path / "p", {"z": organoid_dataset(evil, "Tracking")})
    with pytest.raises(FormatError, match=r"member '\.\./outside\.txt'.*'\.\.' part"):
        fetch_dataset(load_config(root), "z")
    link = organoids.replica.folder / "Tracking" / "W_F10_3" / "Proj_9.tif"
    os.symlink("/etc/passwd", link)
    root = _project(tmp_path / "q", {"f": organoid_dataset(organoids.replica.folder, "Tracking")})
    with pytest.raises(FormatError, match=r"Proj_9.tif: is a symbolic link"):
        fetch_dataset(load_config(root), "f")


def test_wells_and_a_pinned_digest(organoids, tmp_path) -> None:
    from emdata.stages.fetch import fetch_dataset

    entry = organoid_dataset(organoids.replica.folder, "Tracking")
    entry["source"]["wells"] = ["W_F10_3"]
    root = _project(tmp_path / "p", {"org": entry})
    raw = fetch_dataset(load_config(root), "org").raw_dir
    assert sorted(p.name for p in raw.iterdir() if p.is_dir()) == ["W_F10_3"]
    digest = json.loads((raw / "source.json").read_text())["extra"]["sources"][0]["sha256"]
    entry["source"]["sha256"] = digest  # pin what was imported
    _project(root, {"org": entry})
    assert not fetch_dataset(load_config(root), "org").up_to_date  # the spec changed: imported again, same digest
    entry["source"]["sha256"] = "0" * 64
    _project(root, {"org": entry})
    with pytest.raises(IntegrityError, match="params.yaml pins 0000"):
        fetch_dataset(load_config(root), "org")
    entry["source"]["wells"] = ["W_Z9_9"]
    entry["source"].pop("sha256")
    _project(root, {"org": entry})
    with pytest.raises(FormatError, match="no well 'W_Z9_9'"):
        fetch_dataset(load_config(root), "org")


def test_a_large_frame_is_read_in_tiles_never_as_a_series(organoids, tmp_path, monkeypatch) -> None:
    """With a small memory budget, no read covers a whole frame, let alone the series."""
    import tifffile

    from emdata.formats.tiff import TiffStack
    from emdata.stages.normalize.volume import normalize_dataset
    from emdata.stages.fetch import fetch_dataset

    big = tmp_path / "big" / "Tracking" / "W_B2_1"
    big.mkdir(parents=True)
    shape = (1500, 2100)  # 6 MB per uint16 frame, budget 16 MB: tiles of 4 MB at most
    frames = []
    for t in (1, 2):
        array = (np.arange(shape[0] * shape[1], dtype=np.uint32).reshape(shape) * t % 65521).astype(np.uint16)
        tifffile.imwrite(big / f"Proj_{t}.tif", array, resolution=(6211.18, 6211.18), resolutionunit="CENTIMETER")
        (big / f"Proj_{t}.json").write_text(json.dumps({"version": "4.5.7", "flags": {}, "shapes": [], "imagePath": "",
                                                        "imageData": None, "imageHeight": shape[0],
                                                        "imageWidth": shape[1]}))
        frames.append(array)
    root = _project(tmp_path / "p", {"big": organoid_dataset(tmp_path / "big", "Tracking")},
                    memory_budget_mb=16, image_chunks=[256, 256])
    cfg = load_config(root)
    fetch_dataset(cfg, "big")
    reads: list[int] = []
    real = TiffStack.read_box

    def spy(self, start, stop):
        reads.append(int(np.prod([b - a for a, b in zip(start, stop)])))
        return real(self, start, stop)

    monkeypatch.setattr(TiffStack, "read_box", spy)
    with h5py.File(normalize_dataset(cfg, "big")) as f:
        np.testing.assert_array_equal(f["images/W_B2_1/raw"][()], np.stack(frames))
    assert reads and max(reads) < shape[0] * shape[1]


def test_changed_files_make_fetch_import_again(organoids, tmp_path) -> None:
    from emdata.stages.fetch import fetch_dataset

    root = _project(tmp_path / "p", {"org": organoid_dataset(organoids.replica.folder, "Tracking")})
    cfg = load_config(root)
    fetch_dataset(cfg, "org")
    path = organoids.replica.folder / "Tracking" / "W_F10_3" / "Proj_2.json"
    _edit_json(path, lambda d: d["shapes"].pop())
    result = fetch_dataset(cfg, "org")
    assert not result.up_to_date
    assert json.loads((result.raw_dir / "W_F10_3" / "Proj_2.json").read_text()) == json.loads(path.read_text())


def test_inputs_stage_records_the_files_and_says_when_they_are_missing(organoids, tmp_path) -> None:
    """`emdata inputs` never fails for one dataset: a missing folder is recorded; fetch then says so."""
    root = _project(tmp_path / "p", {"org": organoid_dataset(organoids.replica.folder, "Tracking"),
                                     "gone": organoid_dataset(tmp_path / "nowhere", "Tracking")})
    proc = _cli(root, "inputs")
    assert proc.returncode == 0, proc.stderr
    assert "2 of 2 dataset(s) changed" in proc.stdout and "nowhere" in proc.stderr
    org = json.loads((root / "data" / "inputs" / "org.json").read_text())
    assert org["kind"] == "labelme_tracking" and "Tracking/W_E4_12/Proj_2.json" in json.dumps(org["stamp"])
    assert "nowhere" in json.loads((root / "data" / "inputs" / "gone.json").read_text())["unavailable"]
    assert "0 of 2 dataset(s) changed" in _cli(root, "inputs").stdout
    fetch = _cli(root, "fetch", "gone")
    assert fetch.returncode != 0 and len(fetch.stderr.strip().splitlines()) == 1 and "nowhere" in fetch.stderr
    # an invalid entry elsewhere does not stop the stage (its fetch reports it)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["datasets"]["bad"] = organoid_dataset(organoids.replica.folder, "Detectio")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    proc = _cli(root, "inputs")
    assert proc.returncode == 0, proc.stderr
    assert "Detectio" in json.loads((root / "data" / "inputs" / "bad.json").read_text())["invalid"]
    # files imported once and then absent (a clone after `dvc pull`): the recorded stamp stays
    assert _cli(root, "fetch", "org").returncode == 0
    before = (root / "data" / "inputs" / "org.json").read_bytes()
    params["datasets"]["org"]["source"]["path"] = str(tmp_path / "unmounted")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert _cli(root, "inputs").returncode == 0
    assert (root / "data" / "inputs" / "org.json").read_bytes() == before


@pytest.mark.dvc
def test_dvc_repro_reruns_only_this_import_when_the_users_files_change(organoids, tmp_path) -> None:
    """Acceptance: the stage re-runs when the local files change, through `dvc repro` itself."""
    import re

    from emdata.testing.demo import copy_repository
    from emdata.testing.dvc import dvc, git, offline_env

    env = offline_env(tmp_path / "env")
    repo = tmp_path / "repo"
    copy_repository(REPO, repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params.pop("optional_datasets")
    params["datasets"] = {"org": organoid_dataset(organoids.replica.folder, "Tracking")}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "params"]):
        git(command, repo, env)

    def repro() -> list[str]:
        return sorted(re.findall(r"Running stage '([^']+)'", dvc(["repro"], repo, env)))

    def boxes() -> int:
        with h5py.File(repo / "data" / "processed" / "org.h5", "r") as f:
            return len(f["images/W_F10_3/annotations/boxes"])

    assert repro() == ["fetch@org", "inputs", "normalize@org", "summarize"]
    before = boxes()
    assert repro() == ["inputs"]  # nothing changed: only the look at the user's files
    h5 = (repo / "data" / "processed" / "org.h5").read_bytes()
    os.utime(organoids.replica.folder / "Tracking" / "W_F10_3" / "Proj_1.tif")  # touched, same bytes
    assert repro() == ["fetch@org", "inputs"]  # imported again: same raw bytes, so no new HDF5
    assert (repo / "data" / "processed" / "org.h5").read_bytes() == h5
    _edit_json(organoids.replica.folder / "Tracking" / "W_F10_3" / "Proj_2.json", lambda d: d["shapes"].pop())
    assert repro() == ["fetch@org", "inputs", "normalize@org", "summarize"]
    assert boxes() == before - 1
