"""Collections after normalize: open_collection, PairedPatches (DataLoader workers), verify, summary rows."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
import yaml

from emdata.params.config import load_config
from emdata.errors import ConfigError, IntegrityError, NotBuiltError


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Both collection kinds fetched and normalized once, in one project; the expected arrays."""
    from emdata.stages.normalize.volume import normalize_dataset
    from emdata.stages.fetch import fetch_dataset
    from emdata.testing.labelme_tracking import REPLICA as ORGANOIDS
    from emdata.testing.lightmycells import REPLICA as LMC

    tmp = tmp_path_factory.mktemp("collections")
    with LMC.start(tmp / "lmc") as lmc, ORGANOIDS.start(tmp / "org") as org:
        cases = {c.key: c for c in [*lmc.cases(), *org.cases()]}
        root = tmp / "project"
        root.mkdir()
        params = {"normalize": {"chunks": [8, 16, 16], "image_chunks": [16, 16]},
                  "datasets": {k: c.dataset for k, c in cases.items()}}
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        cfg = load_config(root)
        for key in cases:
            fetch_dataset(cfg, key)
            normalize_dataset(cfg, key)
        yield cfg, cases


def test_open_collection_lists_images_and_opens_each_as_a_volume(built, monkeypatch) -> None:
    import emdata

    cfg, cases = built
    monkeypatch.chdir(cfg.root)
    col = emdata.open_collection("lightmycells_study_1")
    assert col.images == ["3", "11", "12"] and len(col.table) == 3
    assert col.paths("12") == ["inputs/BF_z0", "targets/Actin", "targets/Nucleus"]
    vol = col.open("11", "inputs/BF_z1")
    expected = cases["lightmycells_study_1"].expected["images/11/inputs/BF_z1"]
    assert vol.shape == (1, *expected.shape) and vol.dims == "YX"
    np.testing.assert_array_equal(vol[0], expected)
    np.testing.assert_array_equal(vol.read((0, 3, 4), (1, 20, 9))[0], expected[3:23, 4:13])
    np.testing.assert_allclose(vol.resolution[1:], [325.0, 325.0])
    well = emdata.open_collection("organoid_tracking").open("W_E4_12", "raw")
    assert well.dims == "TYX" and well.shape == (3, 37, 53)
    np.testing.assert_array_equal(well[:, :, :], cases["organoid_tracking"].expected["images/W_E4_12/raw"])
    from emdata.testing.volumes import coordinate_volume, write_canonical

    volume = write_canonical(cfg.root / "volume.h5", coordinate_volume((3, 4, 5)))
    with pytest.raises(NotBuiltError, match="is not a collection"):
        emdata.open_collection(volume)


def test_paired_patches_are_aligned_and_only_from_images_with_the_target(built) -> None:
    from emdata.access.collection import Collection, PairedPatches

    cfg, cases = built
    expected = cases["lightmycells_study_1"].expected
    col = Collection(cfg.processed_path("lightmycells_study_1"))
    sampler = PairedPatches(col, inputs="BF", target="Mitochondria", patch_shape=(20, 24), seed=7, length=40)
    assert {c.image for c in sampler.candidates} == {"3", "11"}  # image 12 has no Mitochondria
    seen = set()
    for i in range(len(sampler)):
        p = sampler[i]
        (z, y, x), (h, w) = p.origin, (20, 24)  # ZYX, as every Patch: a 2D image is one Z plane
        assert z == 0 and sampler.origin(i) == p.origin and sampler.locate(i) == (p.image, p.input, p.origin)
        np.testing.assert_array_equal(p.raw, expected[f"images/{p.image}/{p.input}"][y:y + h, x:x + w])
        np.testing.assert_array_equal(p.label, expected[f"images/{p.image}/targets/Mitochondria"][y:y + h, x:x + w])
        seen.add((p.image, p.input))
    assert {image for image, _ in seen} == {"3", "11"} and len(seen) >= 4  # several planes of several images
    again = PairedPatches(col, "BF", "Mitochondria", (20, 24), seed=7, length=40)
    assert all(again.locate(i) == sampler.locate(i) for i in range(40))
    with pytest.warns(DeprecationWarning, match="shape= is deprecated, use patch_shape="):
        old = PairedPatches(col, inputs="BF", target="Mitochondria", shape=(20, 24), seed=7, length=40)
    assert old.patch_shape == (20, 24) and all(old.locate(i) == sampler.locate(i) for i in range(40))
    with pytest.warns(DeprecationWarning, match=r"\.shape is deprecated"):
        assert old.shape == (20, 24)
    with pytest.raises(TypeError, match="pass patch_shape= only"):
        PairedPatches(col, patch_shape=(20, 24), shape=(20, 24))


def test_paired_patches_fail_at_construction_when_nothing_can_be_drawn(built) -> None:
    from emdata.access.collection import Collection, PairedPatches

    cfg, _ = built
    col = Collection(cfg.processed_path("lightmycells_study_2"))
    with pytest.raises(ConfigError, match=r"0 of 2 images have targets/Mitochondria.*targets present: Actin, Nucleus"):
        PairedPatches(col, inputs="PC", target="Mitochondria", patch_shape=(16, 16))
    with pytest.raises(ConfigError, match=r"1 of 2 images have targets/Tubulin \(0 without such inputs, 1 smaller"):
        PairedPatches(col, inputs="PC", target="Tubulin", patch_shape=(64, 64))
    with pytest.raises(ConfigError, match=r"\(1 without such inputs"):
        PairedPatches(col, inputs="BF", target="Tubulin", patch_shape=(8, 8))


@pytest.mark.torch
def test_paired_patches_with_two_dataloader_workers_equal_one_process(built) -> None:
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from emdata.access.collection import Collection, PairedPatches
    from emdata.access.torch import PatchDataset

    cfg, _ = built
    col = Collection(cfg.processed_path("lightmycells_study_1"))
    col.read("3", "inputs/BF_z0", (0, 0), (4, 4))  # an open handle in the parent: workers must not share it
    dataset = PatchDataset(PairedPatches(col, inputs="BF", target="Nucleus", patch_shape=(16, 16), seed=3, length=24))
    local = [dataset[i] for i in range(len(dataset))]
    loader = DataLoader(dataset, batch_size=4, num_workers=2, shuffle=False)
    batches = list(loader)
    assert len(batches) == 6
    for b, batch in enumerate(batches):
        for k in range(4):
            one = local[b * 4 + k]
            assert batch["raw"][k].shape == (1, 16, 16) and batch["raw"].dtype == one["raw"].dtype
            assert np.array_equal(batch["raw"][k].numpy(), one["raw"].numpy())
            assert np.array_equal(batch["label"][k].numpy(), one["label"].numpy())
            assert np.array_equal(batch["origin"][k].numpy(), one["origin"].numpy())


def test_verify_rehashes_every_image_and_finds_a_changed_one(built, tmp_path) -> None:
    from emdata.stages.fetch import verify_dataset

    cfg, cases = built
    passed = verify_dataset(cfg, "organoid_tracking")
    names = [what for what, _ in passed]
    assert names[0] == "file sha256"
    assert "/images/W_E4_12/raw voxels sha256" in names and "/images/W_F10_3/labels/organoids voxels sha256" in names
    proc = subprocess.run([sys.executable, "-m", "emdata", "verify", "lightmycells_study_2"], cwd=cfg.root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.count("voxels sha256") == 6, proc.stdout + proc.stderr
    # A changed pixel inside the file (and the record updated to the new file hash) is still found.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cfg.root, copy, ignore=shutil.ignore_patterns("raw"))
    h5 = copy / "data" / "processed" / "lightmycells_study_2.h5"
    with h5py.File(h5, "r+") as f:
        f["images/2/targets/Actin"][5, 7] ^= 1
    import json

    from emdata.core.atomic import write_json_atomic
    from emdata.core.digest import sha256_file

    record_path = copy / "data" / "metadata" / "lightmycells_study_2.json"
    record = json.loads(record_path.read_text())
    record["file_sha256"] = sha256_file(h5)
    write_json_atomic(record_path, record)
    with pytest.raises(IntegrityError, match="images/2/targets/Actin: voxel sha256"):
        verify_dataset(load_config(copy), "lightmycells_study_2")


def test_summary_has_a_row_and_a_thumbnail_per_collection_with_boxes_drawn(built) -> None:
    from PIL import Image

    from emdata.stages.summarize import summarize

    cfg, cases = built
    summarize(cfg)
    text = (cfg.root / "METADATA_SUMMARY.md").read_text()
    for key in cases:
        assert f"| `{key}` |" in text and f"![{key}](thumbnails/{key}_images.png)" in text
    assert "| `lightmycells_study_1` | light microscopy (BF/PC/DIC) | 3 images (collection) | 162.5-325 (y, x) |" in text
    assert "| image | modality | z_planes | z | height | width |" in text  # the per-image table, in file order
    thumb = np.asarray(Image.open(cfg.root / "thumbnails" / "organoid_tracking_images.png").convert("RGB"))
    red = (thumb[..., 0] > 200) & (thumb[..., 1] < 90) & (thumb[..., 2] < 90)
    assert red.any()  # the boxes of the first frame
    plain = np.asarray(Image.open(cfg.root / "thumbnails" / "lightmycells_study_1_images.png").convert("RGB"))
    assert plain.shape[0] > 0 and not ((plain[..., 0] > 200) & (plain[..., 1] < 90)).any()
    csv = (cfg.root / "data" / "metadata.csv").read_text()
    assert "organoid_tracking" in csv and '"2 images, 4 arrays"' in csv
